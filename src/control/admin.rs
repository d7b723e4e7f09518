//! The admin API (medplum-auth.md §8.2, §8.3): project info, members, client creation and
//! `$rotate-secret`. Callers must be project admins or super admins (403 otherwise). For
//! project admins the `:projectId` of the URL is ignored and their own project is used; super
//! admins act on the project the URL names.

use std::sync::Arc;

use axum::extract::{Path, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::{Value, json};

use super::access::{Caller, authenticate_admin};
use super::error::{FHIR_JSON, outcome_response};
use super::fhir::{refreshed, strip_secrets, update_resource, valid_id};
use super::index::index_rows;
use super::{ApiError, json_body, json_response, ok_json};
use crate::state::{ProjectInfo, State};
use crate::store::StoredResource;
use crate::tokens::random_hex;

/// The project an admin call acts on.
pub(crate) fn target_project(caller: &Caller, url_project: &str) -> Result<ProjectInfo, ApiError> {
    if caller.super_admin() {
        caller
            .snap
            .projects
            .get(url_project)
            .cloned()
            .ok_or_else(ApiError::not_found)
    } else {
        Ok(caller.project.clone())
    }
}

/// `GET /admin/projects/:projectId`.
pub async fn get_project(
    AxState(state): AxState<Arc<State>>,
    Path(project_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let caller = authenticate_admin(&state, &parts).await?;
    let project = target_project(&caller, &project_id)?;
    let mut p = json!({"id": project.id, "name": project.name});
    for key in ["secret", "site"] {
        if let Some(v) = project.content.get(key) {
            p[key] = v.clone();
        }
    }
    Ok(ok_json(&json!({ "project": p })))
}

/// The admin caller, the project the call acts on and the membership `membership_id` of it
/// (the members routes): 404 when it does not exist, 403 when it belongs elsewhere.
async fn admin_member(
    state: &State,
    parts: &Parts,
    url_project: &str,
    membership_id: &str,
) -> Result<(Caller, ProjectInfo, StoredResource), ApiError> {
    let caller = authenticate_admin(state, parts).await?;
    let project = target_project(&caller, url_project)?;
    let member = member_in_project(state, &project, membership_id).await?;
    Ok((caller, project, member))
}

/// Reads a membership and checks it belongs to `project`.
async fn member_in_project(
    state: &State,
    project: &ProjectInfo,
    membership_id: &str,
) -> Result<StoredResource, ApiError> {
    if !valid_id(membership_id) {
        return Err(ApiError::not_found());
    }
    let m = state
        .store
        .read("ProjectMembership", membership_id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let project_ref = m
        .content
        .get("project")
        .and_then(|p| p.get("reference"))
        .and_then(Value::as_str);
    if project_ref != Some(format!("Project/{}", project.id).as_str()) {
        return Err(ApiError::forbidden());
    }
    Ok(m)
}

/// `GET /admin/projects/:projectId/members/:membershipId`.
pub async fn get_member(
    AxState(state): AxState<Arc<State>>,
    Path((project_id, membership_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let (_, _, m) = admin_member(&state, &parts, &project_id, &membership_id).await?;
    Ok(json_response(StatusCode::OK, FHIR_JSON, &m.content))
}

/// `POST /admin/projects/:projectId/members/:membershipId`: the body must be that membership;
/// `project` and `user` stay as they are.
pub async fn update_member(
    AxState(state): AxState<Arc<State>>,
    Path((project_id, membership_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let (caller, _, existing) = admin_member(&state, &parts, &project_id, &membership_id).await?;
    let resource = json_body(&parts, body).await?;
    let resource_type = resource.get("resourceType").and_then(Value::as_str);
    let id = resource.get("id").and_then(Value::as_str);
    if resource_type != Some("ProjectMembership") || id != Some(membership_id.as_str()) {
        return Err(ApiError::forbidden());
    }
    let (body, _) = update_resource(&state, &caller, &existing, resource, None).await?;
    Ok(json_response(StatusCode::OK, FHIR_JSON, &body))
}

/// `DELETE /admin/projects/:projectId/members/:membershipId`.
pub async fn delete_member(
    AxState(state): AxState<Arc<State>>,
    Path((project_id, membership_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let (_, project, m) = admin_member(&state, &parts, &project_id, &membership_id).await?;
    let owner = project
        .content
        .get("owner")
        .and_then(|o| o.get("reference"))
        .and_then(Value::as_str);
    let user = m
        .content
        .get("user")
        .and_then(|u| u.get("reference"))
        .and_then(Value::as_str);
    if owner.is_some() && owner == user {
        return Err(ApiError::bad_request(
            "Cannot delete the owner of the project",
        ));
    }
    state.store.delete("ProjectMembership", &m.id).await?;
    if let Some(user) = user {
        remove_project_user_without_memberships(&state, &project.id, user).await;
    }
    refreshed(&state).await;
    Ok(outcome_response(&Outcome::AllOk))
}

/// A project-scoped User exists only for its project: once its last membership there is gone,
/// it goes too (as in newer Medplum), so no orphan can still sign in or hold the e-mail.
async fn remove_project_user_without_memberships(state: &State, project_id: &str, user_ref: &str) {
    let Some(user_id) = user_ref.strip_prefix("User/") else {
        return;
    };
    let result = async {
        let Some(user) = state.store.read("User", user_id).await? else {
            return Ok(());
        };
        if user.project_id.as_deref() != Some(project_id) {
            return Ok(());
        }
        let left = state
            .store
            .search(
                "ProjectMembership",
                &[("user".to_string(), vec![user_ref.to_string()])],
                None,
                1,
            )
            .await?;
        if left.is_empty() {
            state.store.delete("User", user_id).await?;
        }
        Ok::<(), crate::store::StoreError>(())
    };
    if let Err(e) = result.await {
        tracing::error!(error = %e, "could not remove a project-scoped user without memberships");
    }
}

/// A reference to an AccessPolicy usable in `project` (its own, or a global one).
pub(crate) async fn check_policy_reference(
    state: &State,
    project: &str,
    reference: &Value,
) -> Result<Value, ApiError> {
    let bad = || ApiError::invalid("accessPolicy", "Invalid access policy");
    let r = reference
        .get("reference")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let id = r
        .strip_prefix("AccessPolicy/")
        .filter(|id| valid_id(id))
        .ok_or_else(bad)?;
    let policy = state
        .store
        .read("AccessPolicy", id)
        .await?
        .ok_or_else(bad)?;
    if policy.project_id.as_deref().is_some_and(|p| p != project) {
        return Err(bad());
    }
    Ok(json!({"reference": r}))
}

/// `POST /admin/projects/:projectId/client`: creates a ClientApplication with a fresh secret
/// and its membership; 201 with the client, the secret shown this once.
pub async fn create_client(
    AxState(state): AxState<Arc<State>>,
    Path(project_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate_admin(&state, &parts).await?;
    let project = target_project(&caller, &project_id)?;
    let input = json_body(&parts, body).await?;
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

/// A client made by [`create_client_with_membership`].
pub(crate) struct CreatedClient {
    pub client: StoredResource,
    pub secret: String,
}

/// Stores a ClientApplication (`client` without id: one is generated unless `client.id` is
/// set), the hash of `secret` and its membership (`user = profile = client`). On failure,
/// nothing is left behind. Refreshes the snapshot.
pub(crate) async fn create_client_with_membership(
    state: &State,
    project_id: &str,
    mut client: Value,
    access_policy: Option<Value>,
    admin: bool,
    author: Option<&str>,
    secret: String,
) -> Result<CreatedClient, ApiError> {
    let client_id = match client.get("id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    client["id"] = Value::String(client_id.clone());
    if let Some(a) = author {
        client["meta"] = json!({"author": {"reference": a}});
    }
    let client_ref = format!("ClientApplication/{client_id}");
    let mut membership = json!({
        "resourceType": "ProjectMembership",
        "id": uuid::Uuid::new_v4().to_string(),
        "project": {"reference": format!("Project/{project_id}")},
        "user": {"reference": client_ref},
        "profile": {"reference": client_ref},
    });
    if let Some(p) = access_policy {
        membership["accessPolicy"] = p;
    }
    if admin {
        membership["admin"] = Value::Bool(true);
    }
    if let Some(a) = author {
        membership["meta"] = json!({"author": {"reference": a}});
    }
    let index = index_rows(&client);
    let stored_client = state
        .store
        .put(client, Some(project_id), &index, None, true)
        .await?;
    let hash = state.hash_secret(&secret);
    let rest = async {
        state
            .store
            .set_client_secret(&client_id, Some(&hash), None)
            .await?;
        state
            .store
            .put(
                membership.clone(),
                Some(project_id),
                &index_rows(&membership),
                None,
                true,
            )
            .await
    };
    if let Err(e) = rest.await {
        if let Err(cleanup) = state.store.delete("ClientApplication", &client_id).await {
            tracing::error!(error = %cleanup, "could not remove a half-created client");
        }
        return Err(e.into());
    }
    refreshed(state).await;
    Ok(CreatedClient {
        client: stored_client,
        secret,
    })
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

/// `POST /fhir/R4/ClientApplication/:id/$rotate-secret` (medplum-auth.md §8.3).
pub async fn rotate_secret(state: &State, id: &str, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate_admin(state, &parts).await?;
    let params = json_body(&parts, body).await?;
    if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request("Incorrect resource type"));
    }
    let secret = parameter(&params, "secret");
    let retiring = parameter(&params, "retiringSecret");
    let client = if valid_id(id) {
        state.store.read("ClientApplication", id).await?
    } else {
        None
    };
    // Stricter than Medplum: another project's client does not exist for this caller.
    let client = client
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
    let snap = state.snapshot();
    let info = snap.clients.get(id).ok_or_else(ApiError::not_found)?;
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
    Ok(json_response(StatusCode::OK, FHIR_JSON, &body))
}
