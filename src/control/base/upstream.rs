//! Calls to the upstream FHIR server made by the control API itself: profile resources of
//! invited and registered users (created idempotently by an identifier fhirgate sets, removed
//! again after a failed write) and the profile `/auth/me` and `/oauth2/userinfo` show.

use fhirgate_core::fhir::outcome::Stock;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

use crate::state::upstreams::UpstreamBinding;
use crate::upstream_headers::UpstreamIdentity;
use fhirgate_core::policy::isolation::Isolation;

use crate::control::base::access::Caller;
use crate::control::base::resources::present::strip_secrets;
use crate::control::base::users::find_memberships;
use crate::control::web::ControlState;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;
use fhirgate_core::fhir::path::is_valid_id;

/// Identifier system of the profiles invites create: the value names the project and the
/// invited e-mail (or external id), which makes the conditional create idempotent.
pub const PROFILE_IDENTIFIER_SYSTEM: &str = "urn:fhirgate:invite";

/// The identifier value of the profile of `email` in `project`.
pub fn profile_key(project: &str, email: &str) -> String {
    format!("{project}/{email}")
}

/// The HTTP client of calls to the upstream FHIR server, built once at start
/// (`ControlState::upstream`): no redirects, 5 s to connect; each call sets its deadline.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
}

/// A project's upstream as the control API reaches it: the binding (address, credentials) and
/// what the project sees there (docs/contract.md §3). Profiles are written and read through it, so an
/// invited person's profile lands in the project's own server, with its marker.
pub(crate) struct ProjectUpstream {
    binding: Arc<UpstreamBinding>,
    isolation: Isolation,
}

impl ProjectUpstream {
    /// The upstream of an existing project, from the snapshot; 503 when the project is bound to
    /// an upstream the operator has not configured (as on the gateway).
    pub(crate) fn of(state: &ControlState, project_id: &str) -> Result<ProjectUpstream, ApiError> {
        let snap = state.snapshot();
        let project = snap
            .projects
            .get(project_id)
            .ok_or_else(ApiError::not_found)?;
        let binding = state
            .upstreams
            .get(&project.upstream)
            .cloned()
            .ok_or_else(|| ApiError::Outcome(Stock::UpstreamNotConfigured.outcome()))?;
        Ok(ProjectUpstream {
            binding,
            isolation: project.isolation.clone(),
        })
    }

    /// The upstream of a project being created by self-registration: the global one, shared
    /// with the default project, so isolated by its marker from the start.
    pub(crate) fn new_project(state: &ControlState, project_id: &str) -> ProjectUpstream {
        ProjectUpstream {
            binding: state.upstreams.default_binding().clone(),
            isolation: Isolation::Tag {
                project: project_id.to_string(),
            },
        }
    }
}

/// A request to the project's upstream FHIR server: its base URL and credentials, `Accept` FHIR
/// JSON, no redirects followed; `identity` adds the `X-Fhirgate-*` headers of a write made for
/// someone.
pub(crate) fn upstream_request(
    state: &ControlState,
    target: &ProjectUpstream,
    identity: Option<(&str, &str)>,
    method: reqwest::Method,
    path: &str,
) -> Result<reqwest::RequestBuilder, ApiError> {
    let up = &target.binding.upstream;
    let mut rb = state
        .upstream
        .request(method, format!("{}/{path}", up.base_url))
        .timeout(up.connect_timeout + up.read_timeout)
        .header("accept", FHIR_JSON);
    // Who the write is for, as on every request the gateway forwards.
    let headers = UpstreamIdentity {
        authorization: up.authorization.as_deref(),
        caller: identity,
        on_behalf_of: None,
    };
    for (name, value) in headers.headers() {
        rb = rb.header(name, value);
    }
    Ok(rb)
}

fn upstream_failure(e: &reqwest::Error) -> ApiError {
    if e.is_timeout() {
        ApiError::Outcome(Stock::UpstreamTimedOut.outcome())
    } else {
        ApiError::Outcome(Stock::UpstreamUnavailable.outcome())
    }
}

/// A resource of the project's upstream, `None` when it does not exist or is not the project's
/// (another project's marker, or none under `tag`).
pub(crate) async fn upstream_read(
    state: &ControlState,
    target: &ProjectUpstream,
    ty: &str,
    id: &str,
) -> Result<Option<Value>, ApiError> {
    let path = format!("{ty}/{id}");
    let resp = upstream_request(state, target, None, reqwest::Method::GET, &path)?
        .send()
        .await
        .map_err(|e| upstream_failure(&e))?;
    match resp.status().as_u16() {
        200 => Ok(resp
            .json::<Value>()
            .await
            .ok()
            .filter(|v| target.isolation.admits(v))),
        404 | 410 => Ok(None),
        _ => Err(ApiError::Outcome(Stock::ProfileUnreadable.outcome())),
    }
}

/// The resources of one page of an upstream search of `ty` (at most `count`), narrowed to the
/// project's view (its marker, as the gateway narrows every search).
pub(crate) async fn upstream_search(
    state: &ControlState,
    target: &ProjectUpstream,
    ty: &str,
    params: &[(&str, &str)],
    count: usize,
) -> Result<Vec<Value>, ApiError> {
    let query = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in params {
            query.append_pair(name, value);
        }
        for p in target.isolation.narrowing() {
            query.append_pair(&p.name, &p.value);
        }
        query.append_pair("_count", &count.to_string());
        query.finish()
    };
    let path = format!("{ty}?{query}");
    let resp = upstream_request(state, target, None, reqwest::Method::GET, &path)?
        .send()
        .await
        .map_err(|e| upstream_failure(&e))?;
    if resp.status().as_u16() != 200 {
        return Err(ApiError::Outcome(Stock::UpstreamUnavailable.outcome()));
    }
    let bundle: Value = resp
        .json()
        .await
        .map_err(|_| ApiError::Outcome(Stock::UpstreamUnavailable.outcome()))?;
    Ok(bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("resource"))
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(ty))
        .filter(|r| target.isolation.admits(r))
        .take(count)
        .cloned()
        .collect())
}

/// A profile resource to create in the upstream FHIR server.
pub struct ProfileSpec<'a> {
    pub resource_type: &'a str,
    pub first_name: &'a str,
    pub last_name: &'a str,
    pub email: Option<&'a str>,
    /// The value of its [`PROFILE_IDENTIFIER_SYSTEM`] identifier: project plus e-mail or
    /// external id, which makes the create idempotent.
    pub key: String,
}

/// Creates a profile upstream unless the one of an earlier attempt exists (found by its
/// identifier). `identity` is the (profile, project) the write is made for. Returns the
/// profile's reference and whether this call created it.
pub async fn ensure_profile(
    state: &ControlState,
    target: &ProjectUpstream,
    identity: Option<(&str, &str)>,
    spec: &ProfileSpec<'_>,
) -> Result<(String, bool), ApiError> {
    let key = &spec.key;
    let mut profile = json!({
        "resourceType": spec.resource_type,
        "identifier": [{"system": PROFILE_IDENTIFIER_SYSTEM, "value": key}],
        "name": [{"given": [spec.first_name], "family": spec.last_name}],
    });
    if let Some(email) = spec.email {
        profile["telecom"] = json!([{"system": "email", "use": "work", "value": email}]);
    }
    // The project's marker, as on every write the gateway makes for it.
    target.isolation.stamp(&mut profile);
    let condition = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("identifier", &format!("{PROFILE_IDENTIFIER_SYSTEM}|{key}"));
        for p in target.isolation.narrowing() {
            query.append_pair(&p.name, &p.value);
        }
        query.finish()
    };
    // A server may refuse a conditional create that raced another with the same condition
    // (HAPI: 409, HAPI-2745) instead of serialising them: asked again, it finds the winner's.
    let mut attempt = 0;
    let resp = loop {
        let resp = upstream_request(
            state,
            target,
            identity,
            reqwest::Method::POST,
            spec.resource_type,
        )?
        .header("content-type", FHIR_JSON)
        .header("if-none-exist", condition.as_str())
        .body(profile.to_string())
        .send()
        .await
        .map_err(|e| upstream_failure(&e))?;
        attempt += 1;
        if resp.status().as_u16() != 409 || attempt == CONDITIONAL_CREATE_ATTEMPTS {
            break resp;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
    };
    let status = resp.status().as_u16();
    let refused = || ApiError::Outcome(Stock::ProfileNotCreated.outcome());
    if status == 412 {
        return Err(ApiError::conflict(
            "Several profiles in the FHIR server match this invite",
        ));
    }
    if status != 200 && status != 201 {
        tracing::warn!(status, "the upstream refused an invited profile");
        return Err(refused());
    }
    let body: Value = resp.json().await.map_err(|_| refused())?;
    let id = body
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| is_valid_id(id))
        .ok_or_else(refused)?;
    if body.get("resourceType").and_then(Value::as_str) != Some(spec.resource_type) {
        return Err(refused());
    }
    Ok((format!("{}/{id}", spec.resource_type), status == 201))
}

/// How often a profile's conditional create is sent when the server answers 409.
const CONDITIONAL_CREATE_ATTEMPTS: u64 = 3;

/// Deletes a profile this invite created, unless a membership uses it by now (a concurrent
/// invite of the same person may have found it). Failures are logged: the profile then stays,
/// harmless, and the next invite of that person reuses it.
pub async fn remove_profile(state: &ControlState, target: &ProjectUpstream, reference: &str) {
    let used = find_memberships(state, &[("profile", reference)], None, 1).await;
    if !matches!(used, Ok(ref v) if v.is_empty()) {
        return;
    }
    let request = upstream_request(state, target, None, reqwest::Method::DELETE, reference);
    let result = match request {
        Ok(rb) => rb
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("{e:?}")),
    };
    match result {
        Ok(s) if (200..300).contains(&s) || s == 404 || s == 410 => {}
        other => tracing::warn!(
            profile = reference,
            result = ?other,
            "could not remove the profile of a failed invite"
        ),
    }
}

/// `/auth/me` waits at most this long for the profile from the upstream.
const PROFILE_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The full profile resource. ClientApplications live in the store; the other profile types
/// live in the upstream FHIR server and are read from it. When the upstream cannot be reached,
/// a bare `{resourceType, id}` stands in, so that `/auth/me` itself still works.
pub(crate) async fn profile_resource(state: &ControlState, caller: &Caller) -> Value {
    let profile = caller.identity.profile.as_str();
    let Some((resource_type, id)) = profile.split_once('/') else {
        return json!({});
    };
    let bare = json!({"resourceType": resource_type, "id": id});
    if resource_type == "ClientApplication" {
        return match state.identities.client(id).await.ok().flatten() {
            Some(c) => {
                let mut content = c.content.clone();
                strip_secrets(&mut content);
                content
            }
            None => bare,
        };
    }
    if !is_valid_id(id)
        || !matches!(
            resource_type,
            "Patient" | "Practitioner" | "RelatedPerson" | "Bot"
        )
    {
        return bare;
    }
    let Ok(target) = ProjectUpstream::of(state, caller.project_id()) else {
        return bare;
    };
    match fetch_upstream(state, &target, resource_type, id).await {
        // Only the project's own: a profile reference pointing at another project's resource
        // shows nothing of it.
        Some(v)
            if v.get("resourceType").and_then(Value::as_str) == Some(resource_type)
                && target.isolation.admits(&v) =>
        {
            v
        }
        _ => bare,
    }
}

/// The profile as the upstream FHIR server has it (through [`upstream_request`], which knows the
/// upstream's address and credentials), with a shorter deadline: `/auth/me` answers without it.
async fn fetch_upstream(
    state: &ControlState,
    target: &ProjectUpstream,
    resource_type: &str,
    id: &str,
) -> Option<Value> {
    let path = format!("{resource_type}/{id}");
    let resp = upstream_request(state, target, None, reqwest::Method::GET, &path)
        .ok()?
        .timeout(
            target
                .binding
                .upstream
                .read_timeout
                .min(PROFILE_FETCH_TIMEOUT),
        )
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<Value>().await.ok()
}
