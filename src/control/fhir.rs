//! FHIR-style CRUD and search of the identity resources kept in fhirgate's store (`Project`,
//! `ProjectMembership`, `User`, `ClientApplication`, `AccessPolicy`), under the same
//! AccessPolicy rules as everything else (medplum-auth.md §4.2–§4.5):
//! - the caller's effective policy decides at type level (`type_allows`) and per instance
//!   (`satisfied`), and its hiddenFields / readonlyFields shape what is read and written; the
//!   admin types are only in the policies of project admins and super admins;
//! - everything is scoped to the caller's project (`meta.project`); super admins see all;
//! - secrets never leave: a ClientApplication's secret exists only as a keyed hash (shown once,
//!   in the response that sets it), a User's `passwordHash` and `mfaSecret` are never returned
//!   and never accepted from a request.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::request::Interaction;
use fhirgate_core::policy::compiled::{CompiledEntry, is_protected_type, validate_policy};
use fhirgate_core::policy::model::{AccessPolicy, ProjectMembership};
use serde_json::{Map, Value, json};

use super::access::{Caller, authenticate};
use super::error::FHIR_JSON;
use super::index::{ParamKind, index_rows, param_kind, value_matches};
use super::{ApiError, json_body, media_type, read_body};
use crate::state::State;
use crate::store::StoredResource;

/// The identity types this module stores.
pub const IDENTITY_TYPES: [&str; 6] = [
    "AccessPolicy",
    "ClientApplication",
    "DomainConfiguration",
    "ProjectMembership",
    "Project",
    "User",
];
/// Control-plane types the gateway routes here that fhirgate does not store as resources.
const UNSTORED_TYPES: [&str; 4] = [
    "Login",
    "JsonWebKey",
    "IdentityProvider",
    "UserSecurityRequest",
];

const DEFAULT_COUNT: usize = 20;
const MAX_COUNT: usize = 1000;
const SEARCH_CANDIDATES: i64 = 10_000;

/// FHIR ids: `[A-Za-z0-9\-\.]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn fhir_base(state: &State) -> String {
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
pub(crate) fn strip_secrets(resource: &mut Value) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    match obj.get("resourceType").and_then(Value::as_str) {
        Some("ClientApplication") => {
            obj.remove("secret");
            obj.remove("retiringSecret");
        }
        Some("User") => {
            obj.remove("passwordHash");
            obj.remove("mfaSecret");
        }
        _ => {}
    }
}

/// Which of the four request shapes a type is handled with.
enum TypeClass {
    Stored,
    /// Routed here, not stored: protected types are 403 for non-super-admins, otherwise
    /// nothing exists.
    Unstored,
    Unknown,
}

fn classify(resource_type: &str) -> TypeClass {
    if IDENTITY_TYPES.contains(&resource_type) {
        TypeClass::Stored
    } else if UNSTORED_TYPES.contains(&resource_type) {
        TypeClass::Unstored
    } else {
        TypeClass::Unknown
    }
}

/// Type-level check (medplum-auth.md §4.3).
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

/// The resource as the caller may see it: hidden fields of the granting entry removed, secrets
/// stripped.
fn present(caller: &Caller, mut content: Value, entry: &CompiledEntry) -> Value {
    caller.policy.redact(&mut content, entry);
    strip_secrets(&mut content);
    content
}

fn etag(version: &str) -> String {
    format!("W/\"{version}\"")
}

fn resource_response(
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

// === read ===

pub async fn read(
    AxState(state): AxState<Arc<State>>,
    Path((resource_type, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    admit(&caller, &resource_type, Interaction::Read)?;
    if !valid_id(&id) {
        return Err(ApiError::not_found());
    }
    let stored = state
        .store
        .read(&resource_type, &id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let entry = granting(&caller, &stored, Interaction::Read).ok_or_else(ApiError::not_found)?;
    let body = present(&caller, stored.content.clone(), entry);
    Ok(resource_response(&state, StatusCode::OK, &stored, &body))
}

// === search ===

pub async fn search(
    AxState(state): AxState<Arc<State>>,
    Path(resource_type): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let params: Vec<(String, String)> = super::query_pairs(&parts);
    run_search(&state, &parts, &resource_type, params).await
}

/// `POST /fhir/R4/<Type>/_search` with a form body; any other POST on an instance is refused.
pub async fn post_search(
    AxState(state): AxState<Arc<State>>,
    Path((resource_type, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    if id != "_search" {
        return Err(ApiError::MethodNotAllowed);
    }
    let (parts, body) = req.into_parts();
    if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(ApiError::bad_request("Unsupported content type"));
    }
    let bytes = read_body(body, super::MAX_BODY).await?;
    let mut params: Vec<(String, String)> = super::query_pairs(&parts);
    params.extend(form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), v.into_owned())));
    run_search(&state, &parts, &resource_type, params).await
}

/// One parsed search filter.
struct Filter {
    name: String,
    kind: ParamKind,
    modifier: Modifier,
    values: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Modifier {
    None,
    Not,
    Exact,
    Missing(bool),
}

impl Filter {
    fn matches(&self, rows: &[(String, String)]) -> bool {
        let mut indexed = rows
            .iter()
            .filter(|(n, _)| *n == self.name)
            .map(|(_, v)| v.as_str());
        match self.modifier {
            Modifier::Missing(missing) => indexed.next().is_none() == missing,
            Modifier::Not => !indexed.any(|i| {
                self.values
                    .iter()
                    .any(|w| value_matches(self.kind, &self.name, i, w))
            }),
            Modifier::Exact => indexed.any(|i| self.values.iter().any(|w| i == w)),
            Modifier::None => indexed.any(|i| {
                self.values
                    .iter()
                    .any(|w| value_matches(self.kind, &self.name, i, w))
            }),
        }
    }

    /// The exact index values the store can narrow by (positive filters only).
    fn store_values(&self) -> Option<Vec<String>> {
        if self.modifier != Modifier::None {
            return None;
        }
        match self.kind {
            ParamKind::Reference if self.values.iter().all(|v| v.contains('/')) => {
                Some(self.values.clone())
            }
            ParamKind::Token if self.name == "email" => {
                Some(self.values.iter().map(|v| v.to_lowercase()).collect())
            }
            ParamKind::Token if self.values.iter().all(|v| !v.starts_with('|')) => {
                Some(self.values.clone())
            }
            _ => None,
        }
    }
}

struct SearchRequest {
    filters: Vec<Filter>,
    ids: Option<Vec<String>>,
    count: usize,
    offset: usize,
    summary_count: bool,
}

fn parse_search(
    resource_type: &str,
    params: &[(String, String)],
) -> Result<SearchRequest, ApiError> {
    let mut req = SearchRequest {
        filters: Vec::new(),
        ids: None,
        count: DEFAULT_COUNT,
        offset: 0,
        summary_count: false,
    };
    for (raw_name, value) in params {
        let (name, modifier) = match raw_name.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (raw_name.as_str(), None),
        };
        match name {
            "_count" => {
                req.count = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("Invalid _count: {value}")))?
                    .min(MAX_COUNT);
                continue;
            }
            "_offset" => {
                req.offset = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("Invalid _offset: {value}")))?;
                continue;
            }
            "_summary" => {
                req.summary_count = value == "count";
                continue;
            }
            "_id" => {
                req.ids = Some(value.split(',').map(str::to_string).collect());
                continue;
            }
            // Accepted and ignored: results are ordered by last update, totals are always exact.
            "_sort"
            | "_total"
            | "_format"
            | "_pretty"
            | "_elements"
            | "_medplum-prompt-basic-auth" => continue,
            _ => {}
        }
        let kind = param_kind(resource_type, name)
            .ok_or_else(|| ApiError::bad_request(format!("Unknown search parameter: {name}")))?;
        let modifier = match modifier {
            None => Modifier::None,
            Some("not") => Modifier::Not,
            Some("exact") => Modifier::Exact,
            Some("missing") => match value.as_str() {
                "true" => Modifier::Missing(true),
                "false" => Modifier::Missing(false),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "Invalid value for {raw_name}"
                    )));
                }
            },
            Some(m) => {
                return Err(ApiError::bad_request(format!(
                    "Unsupported search modifier: {m}"
                )));
            }
        };
        let values: Vec<String> = value
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect();
        if values.is_empty() && !matches!(modifier, Modifier::Missing(_)) {
            continue;
        }
        req.filters.push(Filter {
            name: name.to_string(),
            kind,
            modifier,
            values,
        });
    }
    Ok(req)
}

async fn run_search(
    state: &State,
    parts: &Parts,
    resource_type: &str,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = authenticate(state, parts).await?;
    let stored_type = match classify(resource_type) {
        TypeClass::Stored => true,
        TypeClass::Unstored => {
            unstored(&caller, resource_type, Interaction::Search)?;
            false
        }
        TypeClass::Unknown => return Err(ApiError::not_found()),
    };
    let mut matches = Vec::new();
    let mut summary_count = false;
    let mut count = DEFAULT_COUNT;
    let mut offset = 0;
    if stored_type {
        require_type(&caller, resource_type, Interaction::Search)?;
        let req = parse_search(resource_type, &params)?;
        summary_count = req.summary_count;
        count = req.count;
        offset = req.offset;
        let narrowing: Vec<(String, Vec<String>)> = req
            .filters
            .iter()
            .filter_map(|f| f.store_values().map(|v| (f.name.clone(), v)))
            .collect();
        let project = if caller.super_admin() {
            None
        } else {
            Some(caller.project_id())
        };
        let candidates = state
            .store
            .search(resource_type, &narrowing, project, SEARCH_CANDIDATES)
            .await?;
        for stored in candidates {
            if let Some(ids) = &req.ids
                && !ids.contains(&stored.id)
            {
                continue;
            }
            let rows = index_rows(&stored.content);
            if !req.filters.iter().all(|f| f.matches(&rows)) {
                continue;
            }
            let Some(entry) = granting(&caller, &stored, Interaction::Search) else {
                continue;
            };
            let body = present(&caller, stored.content.clone(), entry);
            matches.push((stored.id, body));
        }
    }
    let base = fhir_base(state);
    let total = matches.len();
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let self_url = if query.is_empty() {
        format!("{base}{resource_type}")
    } else {
        format!("{base}{resource_type}?{query}")
    };
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
    });
    if !summary_count {
        let entries: Vec<Value> = matches
            .into_iter()
            .skip(offset)
            .take(count)
            .map(|(id, resource)| json!({"fullUrl": format!("{base}{resource_type}/{id}"), "resource": resource, "search": {"mode": "match"}}))
            .collect();
        if offset.saturating_add(count) < total {
            let mut next: Vec<(String, String)> = params
                .iter()
                .filter(|(k, _)| k != "_offset" && k != "_count")
                .cloned()
                .collect();
            next.push(("_count".into(), count.to_string()));
            next.push(("_offset".into(), (offset + count).to_string()));
            let q: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(next.iter())
                .finish();
            if let Some(links) = bundle["link"].as_array_mut() {
                links
                    .push(json!({"relation": "next", "url": format!("{base}{resource_type}?{q}")}));
            }
        }
        bundle["entry"] = Value::Array(entries);
    }
    Ok(super::json_response(StatusCode::OK, FHIR_JSON, &bundle))
}

// === writes ===

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

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

fn reference_id<'a>(v: &'a Value, field: &str, expected_type: &str) -> Option<&'a str> {
    let r = v.get(field)?.get("reference")?.as_str()?;
    let (ty, id) = r.split_once('/')?;
    (ty == expected_type && valid_id(id)).then_some(id)
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
            validate_membership(
                state,
                caller,
                resource,
                &project,
                existing.map(|e| e.id.as_str()),
            )
            .await?;
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
        "DomainConfiguration" => {
            super::external::prepare_domain_configuration(state, resource, existing).await
        }
        _ => Err(ApiError::not_found()),
    }
}

/// A membership must deserialize into the model, name a user of an allowed type that belongs to
/// its project, reference only policies of its project, and keep per-project uniqueness.
async fn validate_membership(
    state: &State,
    caller: &Caller,
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
        let found = state.store.read("AccessPolicy", id).await?;
        let ok = found.is_some_and(|f| {
            f.project_id.is_none()
                || f.project_id.as_deref() == Some(project)
                || caller.super_admin()
        });
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
        unique.push(("profile", m.profile.reference.clone().unwrap_or_default()));
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
    let current = if existing {
        state
            .snapshot()
            .clients
            .get(id)
            .map(|c| (c.secret_hash.clone(), c.retiring_hash.clone()))
            .unwrap_or_default()
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

pub async fn create(
    AxState(state): AxState<Arc<State>>,
    Path(resource_type): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    admit(&caller, &resource_type, Interaction::Create)?;
    let resource = json_body(&parts, body).await?;
    create_resource(&state, &caller, &resource_type, resource, false).await
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
            if !valid_id(id) {
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
    let project = prepare(state, caller, &mut resource, None).await?;
    normalize_meta(&mut resource, caller);
    if let (Some(p), Some(meta)) = (
        &project,
        resource.get_mut("meta").and_then(Value::as_object_mut),
    ) {
        meta.insert("project".into(), Value::String(p.clone()));
    }
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

pub async fn update(
    AxState(state): AxState<Arc<State>>,
    Path((resource_type, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    admit(&caller, &resource_type, Interaction::Update)?;
    let resource = json_body(&parts, body).await?;
    if str_field(&resource, "resourceType") != Some(resource_type.as_str()) {
        return Err(ApiError::bad_request("Incorrect resource type"));
    }
    if str_field(&resource, "id") != Some(id.as_str()) {
        return Err(ApiError::bad_request("Incorrect ID"));
    }
    let expected = if_match(&parts.headers)?;
    let existing = if valid_id(&id) {
        state.store.read(&resource_type, &id).await?
    } else {
        None
    };
    let existing = match existing {
        Some(e) if caller.in_scope(e.project_id.as_deref()) => e,
        Some(_) => return Err(ApiError::not_found()),
        None if expected.is_none() && valid_id(&id) => {
            // Update-as-create: the client names the id (stable ids for policy files).
            require_type(&caller, &resource_type, Interaction::Create)?;
            return create_resource(&state, &caller, &resource_type, resource, true).await;
        }
        None => return Err(ApiError::not_found()),
    };
    let (body, stored) =
        update_resource(&state, &caller, &existing, resource, expected.as_deref()).await?;
    Ok(resource_response(&state, StatusCode::OK, &stored, &body))
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
    let project = prepare(state, caller, &mut resource, Some(existing)).await?;
    normalize_meta(&mut resource, caller);
    if let (Some(p), Some(meta)) = (
        &project,
        resource.get_mut("meta").and_then(Value::as_object_mut),
    ) {
        meta.insert("project".into(), Value::String(p.clone()));
    }
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

pub async fn delete(
    AxState(state): AxState<Arc<State>>,
    Path((resource_type, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    admit(&caller, &resource_type, Interaction::Delete)?;
    let existing = if valid_id(&id) {
        state.store.read(&resource_type, &id).await?
    } else {
        None
    };
    let existing = existing.ok_or_else(ApiError::not_found)?;
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
    state.store.delete(&resource_type, &id).await?;
    refreshed(&state).await;
    Ok(super::error::outcome_response(&Outcome::AllOk))
}

/// `POST /fhir/R4/<Type>/<id>/<$operation>`.
pub async fn instance_operation(
    AxState(state): AxState<Arc<State>>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    match (resource_type.as_str(), operation.as_str()) {
        ("ClientApplication", "$rotate-secret") => {
            super::admin::rotate_secret(&state, &id, req).await
        }
        _ => {
            let (parts, _body): (Parts, Body) = req.into_parts();
            authenticate(&state, &parts).await?;
            Err(ApiError::not_found())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc-123.x"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(65)));
    }

    #[test]
    fn search_parameters_are_parsed_with_modifiers() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let req = parse_search(
            "ProjectMembership",
            &p(&[
                ("profile-type:not", "Patient,Practitioner"),
                ("_count", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(req.count, 5);
        assert_eq!(req.filters.len(), 1);
        let rows = vec![("profile-type".to_string(), "ClientApplication".to_string())];
        assert!(req.filters[0].matches(&rows));
        let rows = vec![("profile-type".to_string(), "Patient".to_string())];
        assert!(!req.filters[0].matches(&rows));
        assert!(parse_search("ProjectMembership", &p(&[("nonsense", "x")])).is_err());
        assert!(parse_search("ProjectMembership", &p(&[("profile:above", "x")])).is_err());
        assert!(parse_search("ProjectMembership", &p(&[("_count", "-1")])).is_err());
    }

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
