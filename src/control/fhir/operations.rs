//! Instance operations: `POST /fhir/R4/ClientApplication/:id/$rotate-secret` (docs/medplum-compat.md
//! §8.3) and `GET /fhir/R4/ClientApplication/:id/$smart-launch` (SMART EHR launch); any other
//! operation is 404 after authentication.

use crate::state::State;
use crate::tokens::random_hex;
use axum::body::Body;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::control::base::access::Caller;
use crate::control::base::resources::create_resource;
use crate::control::base::resources::present::fhir_base;
use crate::control::base::resources::present::strip_secrets;
use crate::control::base::resources::read_by_id;
use crate::control::base::resources::refreshed;
use crate::control::web::AppState;
use crate::control::web::body::json_body;
use crate::control::web::body::json_response;
use crate::control::web::check::Commit;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;
use crate::control::web::error::required;
use crate::obs::security::SecurityEventKind;

/// `POST /fhir/R4/<Type>/<id>/<$operation>`.
pub async fn instance_operation(
    AxState(state): AxState<AppState>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    match (resource_type.as_str(), operation.as_str()) {
        ("ClientApplication", "$rotate-secret") => {
            // As `AdminCaller`, here because other operations take any caller.
            if !caller.is_admin() {
                return Err(ApiError::forbidden());
            }
            let params = json_body(&headers, body).await?;
            rotate_secret(&state, &caller, &id, &params).await
        }
        _ => Err(ApiError::not_found()),
    }
}

/// `GET /fhir/R4/<Type>/<id>/<$operation>`.
pub async fn instance_operation_get(
    AxState(state): AxState<AppState>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    caller: Caller,
    uri: Uri,
) -> Result<Response, ApiError> {
    match (resource_type.as_str(), operation.as_str()) {
        ("ClientApplication", "$smart-launch") => {
            let query = uri.query().unwrap_or_default();
            smart_launch(&state, &caller, &id, query).await
        }
        _ => Err(ApiError::not_found()),
    }
}

/// `GET /fhir/R4/ClientApplication/:id/$smart-launch?patient=|encounter=` (SMART EHR launch,
/// docs/medplum-compat.md §2.19): stores the launch context as a SmartAppLaunch of the caller's
/// project (under the caller's policy, like any create) and sends the browser to the app's
/// `launchUri` with `iss` (the FHIR base URL) and `launch` (the context's id).
async fn smart_launch(
    state: &State,
    caller: &Caller,
    client_id: &str,
    query: &str,
) -> Result<Response, ApiError> {
    let client = read_by_id(state, "ClientApplication", client_id)
        .await?
        .filter(|c| caller.in_scope(c.project_id.as_deref()))
        .ok_or_else(ApiError::not_found)?;
    let launch_uri = client
        .content
        .get("launchUri")
        .and_then(Value::as_str)
        .and_then(|u| url::Url::parse(u).ok())
        .ok_or_else(|| ApiError::bad_request("ClientApplication not configured for launch"))?;
    let mut context: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, v)| (k == "patient" || k == "encounter") && !v.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if context.len() > 1 {
        return Err(ApiError::bad_request(
            "Only one launch context can be specified",
        ));
    }
    // The launch belongs to the app's project (a super admin may launch any project's app);
    // `/oauth2/authorize` accepts only a launch of the client's own project.
    let mut launch = json!({"resourceType": "SmartAppLaunch"});
    if let Some(project) = &client.project_id {
        launch["meta"] = json!({"project": project});
    }
    if let Some((field, id)) = context.pop() {
        let ty = if field == "patient" {
            "Patient"
        } else {
            "Encounter"
        };
        let id = id
            .strip_prefix(&format!("{ty}/"))
            .unwrap_or(&id)
            .to_string();
        launch[field] = json!({"reference": format!("{ty}/{id}")});
    }
    let launch_id = uuid::Uuid::new_v4().to_string();
    launch["id"] = Value::String(launch_id.clone());
    let created =
        create_resource(state, caller, "SmartAppLaunch", launch, true, Commit::Write).await?;
    if !created.status().is_success() {
        return Ok(created);
    }
    let mut target = launch_uri;
    target
        .query_pairs_mut()
        .append_pair("iss", &fhir_base(state))
        .append_pair("launch", &launch_id);
    let mut r = StatusCode::FOUND.into_response();
    let location = HeaderValue::from_str(target.as_str())
        .map_err(|_| ApiError::bad_request("ClientApplication not configured for launch"))?;
    r.headers_mut().insert(header::LOCATION, location);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// Reads `parameter[name].valueString` of a Parameters resource.
fn parameter<'a>(params: &'a Value, name: &str) -> Option<&'a str> {
    params
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("valueString")?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// `POST /fhir/R4/ClientApplication/:id/$rotate-secret` (docs/medplum-compat.md §8.3).
async fn rotate_secret(
    state: &State,
    caller: &Caller,
    id: &str,
    params: &Value,
) -> Result<Response, ApiError> {
    if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request("Incorrect resource type"));
    }
    let secret = parameter(params, "secret");
    let retiring = parameter(params, "retiringSecret");
    // Stricter than Medplum: another project's client does not exist for this caller.
    let client = read_by_id(state, "ClientApplication", id)
        .await?
        .filter(|c| caller.in_scope(c.project_id.as_deref()))
        .ok_or_else(ApiError::not_found)?;
    let (secret, retiring) = match (secret, retiring) {
        (None, None) => return Err(ApiError::bad_request("Secret to rotate must be provided")),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "Only one secret can be rotated at a time",
            ));
        }
        other => other,
    };
    // The decision needs the current hashes: make sure this instance has seen the latest write.
    if let Err(e) = state.refresh_if_changed().await {
        return Err(ApiError::internal("refreshing before a secret rotation", e));
    }
    let info = required(state.identities.client(id).await, ApiError::not_found)?;
    let matches = |stored: Option<&str>, presented: &str| {
        stored.is_some_and(|h| crate::tokens::hashes_equal(h, &state.hash_secret(presented)))
    };
    let mut body = client.content.clone();
    strip_secrets(&mut body);
    if let Some(current) = secret {
        if !matches(info.secret_hash.as_deref(), current) {
            return Err(ApiError::bad_request(
                "Provided secret does not match client",
            ));
        }
        let new_secret = random_hex(32);
        let new_hash = state.hash_secret(&new_secret);
        state
            .store
            .set_client_secret(id, Some(&new_hash), info.secret_hash.as_deref())
            .await?;
        body["secret"] = Value::String(new_secret);
        body["retiringSecret"] = Value::String(current.to_string());
    } else if let Some(old) = retiring {
        if !matches(info.retiring_hash.as_deref(), old) {
            return Err(ApiError::bad_request(
                "Provided secret does not match client",
            ));
        }
        state
            .store
            .set_client_secret(id, info.secret_hash.as_deref(), None)
            .await?;
    }
    refreshed(state).await;
    let subject = format!("ClientApplication/{id}");
    caller
        .event(
            SecurityEventKind::SecretRotated,
            &subject,
            caller.project_id(),
        )
        .emit();
    Ok(json_response(StatusCode::OK, FHIR_JSON, &body))
}
