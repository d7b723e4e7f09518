//! Writes of the identity resources (docs/medplum-compat.md §4.2–§4.5), shared by the FHIR CRUD and the
//! admin API: per-type validation and normalisation, the caller's policy on the way in and out,
//! client secrets as keyed hashes, the snapshot refreshed after every write, and the FHIR
//! answer of a stored resource.

use crate::state::State;
use crate::store::StoredResource;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::request::Interaction;
use fhirgate_core::policy::compiled::{CompiledEntry, validate_policy};
use fhirgate_core::policy::model::{AccessPolicy, ProjectMembership};
use serde_json::{Map, Value, json};

use crate::control::base::access::Caller;
use crate::control::base::domains::prepare_domain_configuration;
use crate::control::base::index::index_rows;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;
use crate::obs::security::{SecurityEvent, SecurityEventKind};
use fhirgate_core::fhir::path::is_valid_id;

pub(crate) fn fhir_base(state: &State) -> String {
    format!("{}fhir/R4/", state.config.base_url)
}

/// Refreshes the shared snapshot after a write. A failure is logged: the change feed will catch
/// up, and the write itself succeeded.
pub(crate) async fn refreshed(state: &State) {
    if let Err(e) = state.refresh().await {
        tracing::error!(error = %e, "snapshot refresh after a control API write failed");
    }
}

/// Removes what must never be serialized.
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

pub(crate) fn strip_secrets(resource: &mut Value) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    match obj.get("resourceType").and_then(Value::as_str) {
        Some("ClientApplication") => {
            obj.remove("secret");
            obj.remove("retiringSecret");
            remove_idp_secret(obj);
        }
        Some("DomainConfiguration") => remove_idp_secret(obj),
        Some("User") => {
            obj.remove("passwordHash");
            obj.remove("mfaSecret");
        }
        _ => {}
    }
}

/// `identityProvider.clientSecret`: fhirgate's own secret at the identity provider, used by the
/// control API only; never read back by anyone.
fn remove_idp_secret(obj: &mut serde_json::Map<String, Value>) {
    if let Some(idp) = obj
        .get_mut("identityProvider")
        .and_then(Value::as_object_mut)
    {
        idp.remove("clientSecret");
    }
}

/// An update that omits `identityProvider.clientSecret` (it never saw it) keeps the stored one.
fn keep_idp_secret(new: &mut Value, old: &Value) {
    let Some(secret) = old
        .get("identityProvider")
        .and_then(|i| i.get("clientSecret"))
        .cloned()
    else {
        return;
    };
    if let Some(idp) = new
        .get_mut("identityProvider")
        .and_then(Value::as_object_mut)
        && !idp.contains_key("clientSecret")
    {
        idp.insert("clientSecret".into(), secret);
    }
}

/// The fields of a ClientApplication that decide how it authenticates and where its codes and
/// tokens go (docs/contract.md §2): only a project admin sets or changes them.
const CLIENT_CREDENTIAL_FIELDS: [&str; 9] = [
    "jwksUri",
    "jwks",
    "identityProvider",
    "redirectUri",
    "redirectUris",
    "accessTokenLifetime",
    "refreshTokenLifetime",
    "pkceOptional",
    "launchUri",
];

/// Refuses a ClientApplication write that would take the client over: a non-admin setting or
/// changing a credential-bearing field, or anyone changing a secret other than through
/// `$rotate-secret` (a secret may be given only when the client is created, by an admin).
fn check_client_write(
    caller: &Caller,
    new: &Value,
    existing: Option<&Value>,
    fx: &SideEffects,
) -> Result<(), ApiError> {
    let secret_given = fx.client_secret.is_some() || fx.client_retiring.is_some();
    if existing.is_some() && secret_given {
        return Err(ApiError::invalid(
            "ClientApplication.secret",
            "Secrets change only through $rotate-secret",
        ));
    }
    if caller.is_admin() {
        return Ok(());
    }
    if secret_given {
        return Err(ApiError::forbidden());
    }
    let changed = |field: &str| {
        let was = existing.and_then(|e| e.get(field));
        let now = new.get(field);
        match field {
            // The stored secret is never shown, so an update leaves it out: compare without it.
            "identityProvider" => {
                let strip = |v: Option<&Value>| {
                    v.cloned().map(|mut v| {
                        if let Some(o) = v.as_object_mut() {
                            o.remove("clientSecret");
                        }
                        v
                    })
                };
                strip(was) != strip(now) || now.and_then(|i| i.get("clientSecret")).is_some()
            }
            _ => was != now,
        }
    };
    if CLIENT_CREDENTIAL_FIELDS.iter().any(|f| changed(f)) {
        return Err(ApiError::forbidden());
    }
    Ok(())
}

/// The resource as the caller may see it: hidden fields of the granting entry removed, secrets
/// stripped.
pub(crate) fn present(caller: &Caller, mut content: Value, entry: &CompiledEntry) -> Value {
    caller.policy.redact(&mut content, entry);
    strip_secrets(&mut content);
    content
}

fn etag(version: &str) -> String {
    format!("W/\"{version}\"")
}

pub(crate) fn resource_response(
    state: &State,
    status: StatusCode,
    stored: &StoredResource,
    body: &Value,
) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body.to_string(),
    )
        .into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag(&stored.version_id)) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::CREATED {
        let location = format!(
            "{}{}/{}/_history/{}",
            fhir_base(state),
            stored.resource_type,
            stored.id,
            stored.version_id
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            h.insert(header::LOCATION, v);
        }
    }
    r
}

/// What a write needs done besides storing the resource.
#[derive(Default)]
struct SideEffects {
    /// A new primary secret for the client (`None`: keep the current one).
    client_secret: Option<String>,
    /// A new retiring secret for the client (`None`: keep the current one).
    client_retiring: Option<String>,
}

/// Takes `secret` / `retiringSecret` out of a ClientApplication body.
fn take_client_secrets(resource: &mut Value) -> SideEffects {
    let mut fx = SideEffects::default();
    if let Some(obj) = resource.as_object_mut() {
        if let Some(Value::String(s)) = obj.remove("secret") {
            fx.client_secret = Some(s).filter(|s| !s.is_empty());
        }
        if let Some(Value::String(s)) = obj.remove("retiringSecret") {
            fx.client_retiring = Some(s).filter(|s| !s.is_empty());
        }
    }
    fx
}

/// The strings of a JSON array joined by spaces (given names, a client's `defaultScope`); other
/// values count as absent.
pub(crate) fn joined_strings(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub(crate) fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

fn reference_id<'a>(v: &'a Value, field: &str, expected_type: &str) -> Option<&'a str> {
    let r = v.get(field)?.get("reference")?.as_str()?;
    let (ty, id) = r.split_once('/')?;
    (ty == expected_type && is_valid_id(id)).then_some(id)
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

/// Validation and normalisation per type; returns the project the resource belongs to.
async fn prepare(
    state: &State,
    caller: &Caller,
    resource: &mut Value,
    existing: Option<&StoredResource>,
) -> Result<Option<String>, ApiError> {
    let resource_type = str_field(resource, "resourceType")
        .unwrap_or_default()
        .to_string();
    let requested_project = resource
        .get("meta")
        .and_then(|m| m.get("project"))
        .and_then(Value::as_str)
        .map(str::to_string);
    // The project a new resource goes to: the caller's, or for super admins an explicit one.
    let default_project = || -> Result<String, ApiError> {
        match requested_project.as_deref() {
            Some(p) if caller.super_admin() && p != caller.project_id() => {
                if caller.snap.projects.contains_key(p) {
                    Ok(p.to_string())
                } else {
                    Err(ApiError::bad_request("Invalid project"))
                }
            }
            _ => Ok(caller.project_id().to_string()),
        }
    };
    match resource_type.as_str() {
        "Project" => {
            if existing.is_none() && !caller.super_admin() {
                return Err(ApiError::forbidden());
            }
            if !caller.super_admin() {
                if let Some(obj) = resource.as_object_mut() {
                    obj.remove("superAdmin");
                }
                if let (Some(old), Some(obj)) = (existing, resource.as_object_mut())
                    && let Some(v) = old.content.get("superAdmin")
                {
                    obj.insert("superAdmin".into(), v.clone());
                }
            }
            if let Some(owner) = resource.get("owner")
                && owner
                    .get("reference")
                    .and_then(Value::as_str)
                    .is_none_or(|r| !r.starts_with("User/"))
            {
                return Err(ApiError::invalid(
                    "Project.owner",
                    "Project owner must be a User",
                ));
            }
            // A Project belongs to itself.
            Ok(Some(
                str_field(resource, "id").unwrap_or_default().to_string(),
            ))
        }
        "ProjectMembership" => {
            let project = match existing {
                Some(old) => old
                    .project_id
                    .clone()
                    .unwrap_or_else(|| caller.project_id().to_string()),
                None if caller.super_admin() => {
                    match reference_id(resource, "project", "Project") {
                        Some(p) if caller.snap.projects.contains_key(p) => p.to_string(),
                        Some(_) => {
                            return Err(ApiError::invalid(
                                "ProjectMembership.project",
                                "Invalid project",
                            ));
                        }
                        None => default_project()?,
                    }
                }
                None => caller.project_id().to_string(),
            };
            if let Some(obj) = resource.as_object_mut() {
                obj.insert(
                    "project".into(),
                    json!({"reference": format!("Project/{project}")}),
                );
                if let Some(old) = existing
                    && let Some(user) = old.content.get("user")
                {
                    obj.insert("user".into(), user.clone());
                }
            }
            validate_membership(state, resource, &project, existing.map(|e| e.id.as_str())).await?;
            Ok(Some(project))
        }
        "User" => {
            if let Some(obj) = resource.as_object_mut() {
                obj.remove("passwordHash");
                obj.remove("mfaSecret");
                if let Some(old) = existing {
                    for key in ["passwordHash", "mfaSecret"] {
                        if let Some(v) = old.content.get(key) {
                            obj.insert(key.into(), v.clone());
                        }
                    }
                }
                if let Some(Value::String(email)) = obj.get("email") {
                    let lower = email.trim().to_lowercase();
                    obj.insert("email".into(), Value::String(lower));
                }
            }
            let project = match existing {
                Some(old) => old.project_id.clone(),
                None if caller.super_admin() => {
                    match reference_id(resource, "project", "Project") {
                        Some(p) if caller.snap.projects.contains_key(p) => Some(p.to_string()),
                        Some(_) => {
                            return Err(ApiError::invalid("User.project", "Invalid project"));
                        }
                        None => None,
                    }
                }
                None => Some(caller.project_id().to_string()),
            };
            if let Some(obj) = resource.as_object_mut() {
                match &project {
                    Some(p) => obj.insert(
                        "project".into(),
                        json!({"reference": format!("Project/{p}")}),
                    ),
                    None => obj.remove("project"),
                };
            }
            if let Some(email) = str_field(resource, "email") {
                let project_filter = project
                    .as_ref()
                    .map(|p| ("project".to_string(), vec![format!("Project/{p}")]));
                let mut filters = vec![("email".to_string(), vec![email.to_string()])];
                filters.extend(project_filter);
                let same = state
                    .store
                    .search("User", &filters, project.as_deref(), 10)
                    .await?;
                let id = str_field(resource, "id").unwrap_or_default();
                if same.iter().any(|u| u.id != id && u.project_id == project) {
                    return Err(ApiError::conflict("Email already registered"));
                }
            }
            Ok(project)
        }
        "ClientApplication" => {
            if let Some(status) = resource.get("status")
                && !matches!(status.as_str(), Some("active" | "off" | "error"))
            {
                return Err(ApiError::invalid(
                    "ClientApplication.status",
                    "Invalid status",
                ));
            }
            for field in ["accessTokenLifetime", "refreshTokenLifetime"] {
                if let Some(v) = resource.get(field)
                    && v.as_str().and_then(crate::config::parse_lifetime).is_none()
                {
                    return Err(ApiError::invalid(
                        &format!("ClientApplication.{field}"),
                        "Constraint clapp-1 not met: Token lifetime must be a valid string representing time duration (eg. 2w, 1h)",
                    ));
                }
            }
            match existing {
                Some(old) => Ok(old.project_id.clone()),
                None => default_project().map(Some),
            }
        }
        "AccessPolicy" => {
            let policy: AccessPolicy = serde_json::from_value(resource.clone())
                .map_err(|e| ApiError::bad_request(format!("Invalid AccessPolicy: {e}")))?;
            if let Err(errors) = validate_policy(&policy) {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                // Well-formed but not enforceable as written: refused, never saved to fail later.
                return Err(ApiError::Outcome(Outcome::Unprocessable(format!(
                    "Invalid AccessPolicy: {text}"
                ))));
            }
            match existing {
                Some(old) => Ok(old.project_id.clone()),
                None => default_project().map(Some),
            }
        }
        // Protected: only super admins get here (the type check refuses everyone else).
        "DomainConfiguration" => prepare_domain_configuration(state, resource, existing).await,
        _ => Err(ApiError::not_found()),
    }
}

/// A membership must deserialize into the model, name a user of an allowed type that belongs to
/// its project, reference only policies of its project, and keep per-project uniqueness.
async fn validate_membership(
    state: &State,
    resource: &Value,
    project: &str,
    own_id: Option<&str>,
) -> Result<(), ApiError> {
    let m: ProjectMembership = serde_json::from_value(resource.clone())
        .map_err(|e| ApiError::bad_request(format!("Invalid ProjectMembership: {e}")))?;
    let (user_type, user_id) = m
        .user
        .type_and_id()
        .ok_or_else(|| ApiError::invalid("ProjectMembership.user", "Invalid user reference"))?;
    let (profile_type, _) = m.profile.type_and_id().ok_or_else(|| {
        ApiError::invalid("ProjectMembership.profile", "Invalid profile reference")
    })?;
    match user_type {
        "ClientApplication" | "Bot" => {
            if m.profile.reference != m.user.reference {
                return Err(ApiError::invalid(
                    "ProjectMembership.profile",
                    "Profile must equal user for a ClientApplication or Bot",
                ));
            }
            if user_type == "ClientApplication" {
                let client = state.store.read("ClientApplication", user_id).await?;
                if client.is_none_or(|c| c.project_id.as_deref() != Some(project)) {
                    return Err(ApiError::invalid(
                        "ProjectMembership.user",
                        "ClientApplication does not belong to project",
                    ));
                }
            }
        }
        "User" => {
            let user = state.store.read("User", user_id).await?;
            match user {
                Some(u) if u.project_id.is_none() || u.project_id.as_deref() == Some(project) => {}
                _ => {
                    return Err(ApiError::invalid(
                        "ProjectMembership.user",
                        "User not found",
                    ));
                }
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "ProjectMembership.user",
                "Invalid user reference",
            ));
        }
    }
    if !matches!(
        profile_type,
        "Patient" | "Practitioner" | "RelatedPerson" | "ClientApplication" | "Bot"
    ) {
        return Err(ApiError::invalid(
            "ProjectMembership.profile",
            "Invalid profile reference",
        ));
    }
    let mut policies: Vec<&fhirgate_core::policy::model::Reference> =
        m.access_policy.iter().collect();
    policies.extend(m.access.iter().map(|a| &a.policy));
    for p in policies {
        let Some(("AccessPolicy", id)) = p.type_and_id() else {
            return Err(ApiError::invalid(
                "ProjectMembership.access",
                "Invalid access policy reference",
            ));
        };
        // Only the membership's own project's policies: the snapshot resolves references
        // within the project, so any other could never take effect (and must not).
        let found = state.store.read("AccessPolicy", id).await?;
        let ok = found.is_some_and(|f| f.project_id.as_deref() == Some(project));
        if !ok {
            return Err(ApiError::invalid(
                "ProjectMembership.access",
                "Access policy not found",
            ));
        }
    }
    let project_ref = format!("Project/{project}");
    let mut unique: Vec<(&str, String)> = Vec::new();
    if let Some(e) = &m.external_id {
        unique.push(("external-id", e.clone()));
    }
    if let Some(u) = &m.user_name {
        unique.push(("user-name", u.clone()));
    }
    // A client or bot has exactly one membership per project: its credentials resolve to it.
    if matches!(user_type, "ClientApplication" | "Bot") {
        unique.push(("profile", m.profile_ref().unwrap_or_default().to_string()));
    }
    for (name, value) in unique {
        let filters = vec![
            ("project".to_string(), vec![project_ref.clone()]),
            (name.to_string(), vec![value.clone()]),
        ];
        let dupes = state
            .store
            .search("ProjectMembership", &filters, Some(project), 2)
            .await?;
        if dupes.iter().any(|d| Some(d.id.as_str()) != own_id) {
            return Err(ApiError::conflict(format!(
                "Key (project, {name})=({project}, {value}) already exists."
            )));
        }
    }
    Ok(())
}

/// A reference to an AccessPolicy usable in `project`: one of its own.
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
        .filter(|id| is_valid_id(id))
        .ok_or_else(bad)?;
    let policy = state
        .store
        .read("AccessPolicy", id)
        .await?
        .ok_or_else(bad)?;
    if policy.project_id.as_deref() != Some(project) {
        return Err(bad());
    }
    Ok(json!({"reference": r}))
}

/// Fields the control API sets or checks itself on create, which policy readonlyFields (made for
/// updates) must not strip.
fn create_managed_fields(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "ProjectMembership" => &["project", "user"],
        "User" => &["email", "project"],
        _ => &[],
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
) -> Result<(Value, StoredResource), ApiError> {
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
    Ok((body, stored))
}

fn without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("meta");
    }
    v
}
