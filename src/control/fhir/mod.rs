//! FHIR-style CRUD and search of the identity resources kept in fhirgate's store (`Project`,
//! `ProjectMembership`, `User`, `ClientApplication`, `AccessPolicy`), under the same
//! AccessPolicy rules as everything else (docs/medplum-compat.md §4.2–§4.5):
//! - the caller's effective policy decides at type level (`type_allows`) and per instance
//!   (`satisfied`), and its hiddenFields / readonlyFields shape what is read and written; the
//!   admin types are only in the policies of project admins and super admins;
//! - everything is scoped to the caller's project (`meta.project`); super admins see all;
//! - secrets never leave: a ClientApplication's secret exists only as a keyed hash (shown once,
//!   in the response that sets it), a User's `passwordHash` and `mfaSecret` are never returned
//!   and never accepted from a request.

pub mod operations;
pub mod search;

use crate::state::State;
use crate::store::StoredResource;
use axum::body::Body;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::request::Interaction;
use fhirgate_core::policy::compiled::{CompiledEntry, is_protected_type};

use crate::control::base::access::Caller;
use crate::control::base::resources::create_resource;
use crate::control::base::resources::fields::str_field;
use crate::control::base::resources::present::present;
use crate::control::base::resources::present::resource_response;
use crate::control::base::resources::read_by_id;
use crate::control::base::resources::refreshed;
use crate::control::base::resources::update_resource;
use crate::control::base::users::revoke_sessions_of;
use crate::control::web::AppState;
use crate::control::web::body::json_body;
use crate::control::web::check::{Commit, checked_only};
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;
use crate::obs::security::SecurityEventKind;
use fhirgate_core::fhir::path::is_valid_id;
use fhirgate_core::fhir::types::STORED_IDENTITY_TYPES;
use fhirgate_core::fhir::types::UNSTORED_IDENTITY_TYPES;
use serde_json::Value;

/// Which of the four request shapes a type is handled with.
enum TypeClass {
    Stored,
    /// Routed here, not stored: protected types are 403 for non-super-admins, otherwise
    /// nothing exists.
    Unstored,
    Unknown,
}

fn classify(resource_type: &str) -> TypeClass {
    if STORED_IDENTITY_TYPES.contains(&resource_type) {
        TypeClass::Stored
    } else if UNSTORED_IDENTITY_TYPES.contains(&resource_type) {
        TypeClass::Unstored
    } else {
        TypeClass::Unknown
    }
}

/// Type-level check (docs/medplum-compat.md §4.3).
fn require_type(
    caller: &Caller,
    resource_type: &str,
    interaction: Interaction,
) -> Result<(), ApiError> {
    if caller
        .policy
        .type_allows(resource_type, interaction, caller.super_admin())
    {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

/// Checks for types that are not stored; `Ok(())` means "allowed, but nothing is there".
fn unstored(
    caller: &Caller,
    resource_type: &str,
    interaction: Interaction,
) -> Result<(), ApiError> {
    if is_protected_type(resource_type) && !caller.super_admin() {
        return Err(ApiError::forbidden());
    }
    require_type(caller, resource_type, interaction)
}

/// The first policy entry granting `interaction` on this stored resource, if the caller can
/// see it at all (project scope).
fn granting<'a>(
    caller: &'a Caller,
    stored: &StoredResource,
    interaction: Interaction,
) -> Option<&'a CompiledEntry> {
    if !caller.in_scope(stored.project_id.as_deref()) {
        return None;
    }
    caller.policy.satisfied(&stored.content, interaction)
}

/// `If-Match: W/"<versionId>"` → the version the update requires.
fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::bad_request("Invalid If-Match header"))?
        .trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v);
    if v.is_empty() {
        return Err(ApiError::bad_request("Invalid If-Match header"));
    }
    Ok(Some(v.to_string()))
}

/// Whether the caller may perform `interaction` on `resource_type` at all: stored identity types
/// by the caller's policy; routed-but-unstored types (Login, JsonWebKey, …) only for super admins,
/// and then they do not exist here; anything else is unknown.
fn admit(caller: &Caller, resource_type: &str, interaction: Interaction) -> Result<(), ApiError> {
    match classify(resource_type) {
        TypeClass::Stored => require_type(caller, resource_type, interaction),
        TypeClass::Unstored => {
            unstored(caller, resource_type, interaction)?;
            Err(if interaction == Interaction::Create {
                ApiError::bad_request("Unsupported resource type")
            } else {
                ApiError::not_found()
            })
        }
        TypeClass::Unknown => Err(ApiError::not_found()),
    }
}

/// The body of a create or update, read once the type is admitted: a refused type is refused
/// whatever the body.
async fn admitted_body(
    caller: &Caller,
    resource_type: &str,
    interaction: Interaction,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    admit(caller, resource_type, interaction)?;
    json_body(headers, body).await
}

/// [`admit`], then the stored resource; 404 when there is none.
async fn admitted_resource(
    state: &State,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    interaction: Interaction,
) -> Result<StoredResource, ApiError> {
    admit(caller, resource_type, interaction)?;
    read_by_id(state, resource_type, id)
        .await?
        .ok_or_else(ApiError::not_found)
}

pub async fn read(
    AxState(state): AxState<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let stored = admitted_resource(&state, &caller, &resource_type, &id, Interaction::Read).await?;
    let entry = granting(&caller, &stored, Interaction::Read).ok_or_else(ApiError::not_found)?;
    let body = present(&caller, stored.content.clone(), entry);
    Ok(resource_response(&state, StatusCode::OK, &stored, &body))
}

pub async fn create(
    AxState(state): AxState<AppState>,
    Path(resource_type): Path<String>,
    caller: Caller,
    commit: Commit,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let resource =
        admitted_body(&caller, &resource_type, Interaction::Create, &headers, body).await?;
    create_resource(&state, &caller, &resource_type, resource, false, commit).await
}

pub async fn update(
    AxState(state): AxState<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    caller: Caller,
    commit: Commit,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let resource =
        admitted_body(&caller, &resource_type, Interaction::Update, &headers, body).await?;
    if str_field(&resource, "resourceType") != Some(resource_type.as_str()) {
        return Err(ApiError::bad_request("Incorrect resource type"));
    }
    if str_field(&resource, "id") != Some(id.as_str()) {
        return Err(ApiError::bad_request("Incorrect ID"));
    }
    let expected = if_match(&headers)?;
    let existing = match read_by_id(&state, &resource_type, &id).await? {
        Some(e) if caller.in_scope(e.project_id.as_deref()) => e,
        Some(_) => return Err(ApiError::not_found()),
        None if expected.is_none() && is_valid_id(&id) => {
            // Update-as-create: the client names the id (stable ids for policy files).
            require_type(&caller, &resource_type, Interaction::Create)?;
            return create_resource(&state, &caller, &resource_type, resource, true, commit).await;
        }
        None => return Err(ApiError::not_found()),
    };
    let updated = update_resource(
        &state,
        &caller,
        &existing,
        resource,
        expected.as_deref(),
        commit,
    )
    .await?;
    Ok(match updated {
        Some((body, stored)) => resource_response(&state, StatusCode::OK, &stored, &body),
        None => checked_only(),
    })
}

pub async fn delete(
    AxState(state): AxState<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    caller: Caller,
    commit: Commit,
) -> Result<Response, ApiError> {
    let existing =
        admitted_resource(&state, &caller, &resource_type, &id, Interaction::Delete).await?;
    if granting(&caller, &existing, Interaction::Read).is_none()
        && granting(&caller, &existing, Interaction::Delete).is_none()
    {
        return Err(ApiError::not_found());
    }
    granting(&caller, &existing, Interaction::Delete).ok_or_else(ApiError::forbidden)?;
    // Deleting a project is a super admin's act, whatever a policy says.
    if resource_type == "Project" && !caller.super_admin() {
        return Err(ApiError::forbidden());
    }
    if commit == Commit::CheckOnly {
        return Ok(checked_only());
    }
    state.store.delete(&resource_type, &id).await?;
    let subject = format!("{resource_type}/{id}");
    caller
        .event(
            SecurityEventKind::ResourceDeleted,
            &subject,
            caller.project_id(),
        )
        .emit();
    // A deleted User or membership takes its sessions with it (docs/contract.md §2); ending them refreshes
    // the snapshot, which then holds the deletion too.
    let user_ref = format!("User/{id}");
    let sessions_of = match resource_type.as_str() {
        "User" => Some((user_ref.as_str(), None)),
        "ProjectMembership" => existing
            .content
            .get("user")
            .and_then(|u| u.get("reference"))
            .and_then(Value::as_str)
            .map(|user| (user, Some(id.as_str()))),
        _ => None,
    };
    match sessions_of {
        Some((user, membership)) => {
            revoke_sessions_of(&state, user, membership).await?;
        }
        None => refreshed(&state).await,
    }
    Ok(outcome_response(&Outcome::AllOk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn if_match_accepts_weak_and_strong_tags() {
        let mut h = HeaderMap::new();
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"abc\""));
        assert_eq!(if_match(&h).unwrap().as_deref(), Some("abc"));
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"abc\""));
        assert_eq!(if_match(&h).unwrap().as_deref(), Some("abc"));
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"\""));
        assert!(if_match(&h).is_err());
    }
}
