//! Writes of the identity resources (docs/medplum-compat.md §4.2–§4.5), shared by the FHIR CRUD and the
//! admin API: the caller's policy on the way in, client secrets as keyed hashes, the snapshot
//! refreshed after every write. Per-type validation lives in `validate`, the answer (the
//! caller's view of a stored resource) in `present`.

pub mod fields;
pub mod present;
pub mod validate;

use crate::state::State;
use crate::store::StoredResource;
use axum::http::StatusCode;
use axum::response::Response;
use fhirgate_core::fhir::request::Interaction;
use serde_json::{Map, Value, json};

use crate::control::base::access::Caller;
use crate::control::base::index::index_rows;
use crate::control::web::check::{Commit, checked_only};
use crate::control::web::error::ApiError;
use crate::obs::security::{SecurityEvent, SecurityEventKind};
use fhirgate_core::fhir::path::is_valid_id;

use crate::control::base::resources::fields::str_field;
use crate::control::base::resources::present::present;
use crate::control::base::resources::present::resource_response;
use crate::control::base::resources::present::strip_secrets;
use crate::control::base::resources::validate::SideEffects;
use crate::control::base::resources::validate::check_client_write;
use crate::control::base::resources::validate::create_managed_fields;
use crate::control::base::resources::validate::keep_idp_secret;
use crate::control::base::resources::validate::prepare;
use crate::control::base::resources::validate::take_client_secrets;

/// Refreshes the shared snapshot after a write. A failure is logged: the change feed will catch
/// up, and the write itself succeeded.
pub(crate) async fn refreshed(state: &State) {
    if let Err(e) = state.refresh().await {
        tracing::error!(error = %e, "snapshot refresh after a control API write failed");
    }
}

/// A stored identity resource by id; an id that is not a FHIR id names nothing (the store is
/// never asked about it).
pub(crate) async fn read_by_id(
    state: &State,
    resource_type: &str,
    id: &str,
) -> Result<Option<StoredResource>, ApiError> {
    if !is_valid_id(id) {
        return Ok(None);
    }
    Ok(state.store.read(resource_type, id).await?)
}

/// Keeps only the client-settable parts of `meta` and records the author.
fn normalize_meta(resource: &mut Value, caller: &Caller) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let mut meta = Map::new();
    if let Some(old) = obj.get("meta").and_then(Value::as_object) {
        for key in ["tag", "security", "profile"] {
            if let Some(v) = old.get(key) {
                meta.insert(key.to_string(), v.clone());
            }
        }
    }
    meta.insert("author".into(), json!({"reference": caller.profile()}));
    obj.insert("meta".into(), Value::Object(meta));
}

/// The security event of the caller's write of `stored` (named `subject`).
fn write_event<'a>(
    caller: &'a Caller,
    kind: SecurityEventKind,
    stored: &'a StoredResource,
    subject: &'a str,
) -> SecurityEvent<'a> {
    caller.event(kind, subject, stored.project_id.as_deref().unwrap_or(""))
}

/// The `meta` every write stores (after [`prepare`]): normalized, and naming the project the
/// resource lives in.
fn stamp_meta(resource: &mut Value, caller: &Caller, project: Option<&str>) {
    normalize_meta(resource, caller);
    if let (Some(p), Some(meta)) = (
        project,
        resource.get_mut("meta").and_then(Value::as_object_mut),
    ) {
        meta.insert("project".into(), Value::String(p.to_string()));
    }
}

async fn apply_client_secrets(
    state: &State,
    id: &str,
    fx: &SideEffects,
    existing: bool,
) -> Result<(), ApiError> {
    if fx.client_secret.is_none() && fx.client_retiring.is_none() {
        return Ok(());
    }
    // From the store itself, not a cache: a rotation must start from the hashes as they are.
    let current = if existing {
        state.store.client_secret(id).await?.unwrap_or_default()
    } else {
        (None, None)
    };
    let primary = fx
        .client_secret
        .as_deref()
        .map(|s| state.hash_secret(s))
        .or(current.0);
    let retiring = fx
        .client_retiring
        .as_deref()
        .map(|s| state.hash_secret(s))
        .or(current.1);
    state
        .store
        .set_client_secret(id, primary.as_deref(), retiring.as_deref())
        .await?;
    Ok(())
}

/// Creates a resource. `id_from_url`: an update-as-create (`PUT Type/id`), where the caller
/// names the id; otherwise only super admins choose ids.
pub(crate) async fn create_resource(
    state: &State,
    caller: &Caller,
    resource_type: &str,
    mut resource: Value,
    id_from_url: bool,
    commit: Commit,
) -> Result<Response, ApiError> {
    if str_field(&resource, "resourceType") != Some(resource_type) {
        return Err(ApiError::bad_request("Incorrect resource type"));
    }
    let id = match str_field(&resource, "id") {
        Some(id) if caller.super_admin() || id_from_url => {
            if !is_valid_id(id) {
                return Err(ApiError::bad_request("Invalid id"));
            }
            id.to_string()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    };
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    let fx = if resource_type == "ClientApplication" {
        take_client_secrets(&mut resource)
    } else {
        SideEffects::default()
    };
    let shown_secret = fx.client_secret.clone();
    if resource_type == "ClientApplication" {
        check_client_write(caller, &resource, None, &fx)?;
    }
    let project = prepare(state, caller, &mut resource, None).await?;
    stamp_meta(&mut resource, caller, project.as_deref());
    let entry = caller
        .policy
        .satisfied(&resource, Interaction::Create)
        .ok_or_else(ApiError::forbidden)?;
    let managed: Vec<(String, Value)> = create_managed_fields(resource_type)
        .iter()
        .filter_map(|k| resource.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    caller
        .policy
        .restore_protected_fields(&mut resource, None, entry);
    if let Some(obj) = resource.as_object_mut() {
        obj.extend(managed);
    }
    if commit == Commit::CheckOnly {
        return Ok(checked_only());
    }
    let index = index_rows(&resource);
    let stored = state
        .store
        .put(resource, project.as_deref(), &index, None, true)
        .await?;
    if let Err(e) = apply_client_secrets(state, &stored.id, &fx, false).await {
        // Leave nothing half-made behind.
        let _ = state.store.delete(&stored.resource_type, &stored.id).await;
        return Err(e);
    }
    refreshed(state).await;
    let subject = format!("{}/{}", stored.resource_type, stored.id);
    write_event(
        caller,
        SecurityEventKind::ResourceCreated,
        &stored,
        &subject,
    )
    .versions(None, Some(&stored.version_id))
    .emit();
    let entry = caller.policy.satisfied(&stored.content, Interaction::Read);
    let mut body = match entry {
        Some(e) => present(caller, stored.content.clone(), e),
        None => {
            let mut c = stored.content.clone();
            strip_secrets(&mut c);
            c
        }
    };
    if let (Some(secret), Some(obj)) = (shown_secret, body.as_object_mut()) {
        obj.insert("secret".into(), Value::String(secret));
    }
    Ok(resource_response(
        state,
        StatusCode::CREATED,
        &stored,
        &body,
    ))
}

/// Updates `existing` with `resource` under the caller's policy: the current version must grant
/// `update`, readonly and hidden fields are restored from it, the new version must grant
/// `update` too. Returns the resource as the caller sees it, and the stored form.
pub(crate) async fn update_resource(
    state: &State,
    caller: &Caller,
    existing: &StoredResource,
    mut resource: Value,
    expected_version: Option<&str>,
    commit: Commit,
) -> Result<Option<(Value, StoredResource)>, ApiError> {
    if caller
        .policy
        .satisfied(&existing.content, Interaction::Update)
        .is_none()
    {
        return Err(
            if caller
                .policy
                .satisfied(&existing.content, Interaction::Read)
                .is_some()
            {
                ApiError::forbidden()
            } else {
                ApiError::not_found()
            },
        );
    }
    if expected_version.is_some_and(|v| v != existing.version_id) {
        return Err(ApiError::from(crate::store::StoreError::VersionConflict));
    }
    let fx = if existing.resource_type == "ClientApplication" {
        take_client_secrets(&mut resource)
    } else {
        SideEffects::default()
    };
    let shown_secret = fx.client_secret.clone();
    if existing.resource_type == "ClientApplication" {
        check_client_write(caller, &resource, Some(&existing.content), &fx)?;
    }
    if matches!(
        existing.resource_type.as_str(),
        "ClientApplication" | "DomainConfiguration"
    ) {
        keep_idp_secret(&mut resource, &existing.content);
    }
    let project = prepare(state, caller, &mut resource, Some(existing)).await?;
    stamp_meta(&mut resource, caller, project.as_deref());
    let pre = caller
        .policy
        .satisfied(&existing.content, Interaction::Update)
        .ok_or_else(ApiError::forbidden)?;
    caller
        .policy
        .restore_protected_fields(&mut resource, Some(&existing.content), pre);
    let post = caller
        .policy
        .satisfied(&resource, Interaction::Update)
        .ok_or_else(ApiError::forbidden)?;
    if commit == Commit::CheckOnly {
        return Ok(None);
    }
    let unchanged = without_meta(&resource) == without_meta(&existing.content);
    let stored = if unchanged && shown_secret.is_none() && fx.client_retiring.is_none() {
        existing.clone()
    } else {
        let index = index_rows(&resource);
        let stored = state
            .store
            .put(
                resource,
                project.as_deref(),
                &index,
                expected_version,
                false,
            )
            .await?;
        apply_client_secrets(state, &stored.id, &fx, true).await?;
        refreshed(state).await;
        let subject = format!("{}/{}", stored.resource_type, stored.id);
        write_event(
            caller,
            SecurityEventKind::ResourceUpdated,
            &stored,
            &subject,
        )
        .versions(Some(&existing.version_id), Some(&stored.version_id))
        .emit();
        stored
    };
    let mut body = present(caller, stored.content.clone(), post);
    if let (Some(secret), Some(obj)) = (shown_secret, body.as_object_mut()) {
        obj.insert("secret".into(), Value::String(secret));
    }
    Ok(Some((body, stored)))
}

fn without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("meta");
    }
    v
}
