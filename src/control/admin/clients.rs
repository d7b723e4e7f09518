//! `POST /admin/projects/:projectId/client`.

use crate::tokens::random_hex;
use axum::extract::State as AxState;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::control::base::access::AdminProject;
use crate::control::base::clients::create_client_with_membership;
use crate::control::base::resources::present::strip_secrets;
use crate::control::base::resources::validate::check_policy_reference;
use crate::control::base::saml_idp::check_saml_idp;
use crate::control::web::AppState;
use crate::control::web::body::JsonBody;
use crate::control::web::body::json_response;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;

/// `POST /admin/projects/:projectId/client`: creates a ClientApplication with a fresh secret
/// and its membership; 201 with the client, the secret shown this once.
pub async fn create_client(
    AxState(state): AxState<AppState>,
    AdminProject { caller, project }: AdminProject,
    JsonBody(input): JsonBody,
) -> Result<Response, ApiError> {
    let name = input
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| ApiError::invalid("name", "Client name is required"))?;
    let mut client = json!({"resourceType": "ClientApplication", "name": name});
    for key in [
        "description",
        "redirectUri",
        "accessTokenLifetime",
        "refreshTokenLifetime",
    ] {
        match input.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => client[key] = Value::String(s.clone()),
            Some(_) => return Err(ApiError::invalid(key, format!("Invalid {key}"))),
        }
    }
    if let Some(uris) = input.get("redirectUris") {
        let ok = uris
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string));
        if !ok {
            return Err(ApiError::invalid("redirectUris", "Invalid redirectUris"));
        }
        client["redirectUris"] = uris.clone();
    }
    if let Some(idp) = input.get("identityProvider").filter(|v| !v.is_null()) {
        if !idp.is_object() {
            return Err(ApiError::invalid(
                "identityProvider",
                "Invalid identityProvider",
            ));
        }
        client["identityProvider"] = idp.clone();
        check_saml_idp(&client, "identityProvider.saml")?;
    }
    for key in ["accessTokenLifetime", "refreshTokenLifetime"] {
        if let Some(v) = client.get(key).and_then(Value::as_str)
            && crate::config::parse_lifetime(v).is_none()
        {
            return Err(ApiError::invalid(
                key,
                "Constraint clapp-1 not met: Token lifetime must be a valid string representing time duration (eg. 2w, 1h)",
            ));
        }
    }
    let access_policy = match input.get("accessPolicy").filter(|v| !v.is_null()) {
        Some(r) => Some(check_policy_reference(&state, &project.id, r).await?),
        None => None,
    };
    let created = create_client_with_membership(
        &state,
        &project.id,
        client,
        access_policy,
        false,
        Some(caller.profile()),
        random_hex(32),
    )
    .await?;
    let mut body = created.client.content.clone();
    strip_secrets(&mut body);
    body["secret"] = Value::String(created.secret);
    let mut r = json_response(StatusCode::CREATED, FHIR_JSON, &body);
    let location = format!(
        "{}fhir/R4/ClientApplication/{}",
        state.config.base_url, created.client.id
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}
