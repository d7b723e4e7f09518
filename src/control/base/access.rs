//! Who is calling the control API, and what they may do: authentication through
//! `State::authenticate` (Bearer or Basic), the effective policy of the caller's membership, the
//! per-request IP check, and the admin rules of docs/medplum-compat.md §4.8 and §8.
//!
//! Handlers get the caller through extractors, which run in the order of the handler's
//! arguments and before its body: [`Caller`] (any authenticated caller), [`AdminCaller`]
//! (project admin or super admin), [`SuperAdmin`], and [`AdminProject`] (an admin and the
//! project of the URL's `project_id` it acts on: the project boundary of the admin API).

use crate::obs::security::{SecurityEvent, SecurityEventKind};
use crate::state::{Identity, ProjectInfo, Snapshot, State};
use axum::extract::{FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use fhirgate_core::policy::effective::EffectivePolicy;
use fhirgate_core::policy::model::ProjectMembership;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::control::web::AppState;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::control::web::error::required;

/// An authenticated caller, with everything decisions need, read once per request.
pub struct Caller {
    pub identity: Arc<Identity>,
    pub snap: Arc<Snapshot>,
    pub membership: Arc<ProjectMembership>,
    pub project: ProjectInfo,
    pub policy: Arc<EffectivePolicy>,
    pub client_ip: Option<IpAddr>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("membership", &self.identity.membership_id)
            .field("project", &self.project.id)
            .field("profile", &self.identity.profile)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// A member of a `superAdmin` project (docs/medplum-compat.md §4.8).
    pub fn super_admin(&self) -> bool {
        self.project.super_admin
    }

    /// `ProjectMembership.admin`.
    pub fn project_admin(&self) -> bool {
        self.membership.is_admin()
    }

    /// Admin API access: project admin or super admin.
    pub fn is_admin(&self) -> bool {
        self.project_admin() || self.super_admin()
    }

    pub fn project_id(&self) -> &str {
        &self.project.id
    }

    /// The caller's profile reference (`meta.author` of what it writes).
    pub fn profile(&self) -> &str {
        &self.identity.profile
    }

    /// A security event of something the caller did to `subject` in `project` (actor and
    /// address filled in); the caller adds what else it knows and emits it.
    pub fn event<'a>(
        &'a self,
        kind: SecurityEventKind,
        subject: &'a str,
        project: &'a str,
    ) -> SecurityEvent<'a> {
        SecurityEvent::new(kind)
            .actor(self.profile())
            .subject(subject)
            .project(project)
            .from_ip(self.client_ip)
    }

    /// May the caller see or change something stored in `project`? Super admins see every
    /// project; everyone else only their own.
    pub fn in_scope(&self, project: Option<&str>) -> bool {
        self.super_admin() || project == Some(self.project_id())
    }
}

/// True when the query string names `_medplum-prompt-basic-auth` (docs/medplum-compat.md §0.1).
fn prompts_basic(parts: &Parts) -> bool {
    parts.uri.query().is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "_medplum-prompt-basic-auth")
    })
}

/// Authenticates the request; 401 OperationOutcome when it cannot. IP rules of the caller's
/// effective policy are checked on every request (docs/contract.md §2), not only at token time.
pub async fn authenticate(state: &State, parts: &Parts) -> Result<Caller, ApiError> {
    let unauthorized = || ApiError::Unauthorized {
        basic_realm: prompts_basic(parts).then(|| state.config.base_url.clone()),
    };
    let header = match parts.headers.get(header::AUTHORIZATION) {
        Some(v) => Some(v.to_str().map_err(|_| unauthorized())?),
        None => None,
    };
    let (result, _cache) = state.authenticate(header).await;
    let identity = result.map_err(|e| match e {
        // The credential may be fine: the store that would say so cannot be reached.
        crate::state::AuthError::StoreUnavailable => ApiError::Outcome(
            fhirgate_core::fhir::outcome::Stock::CredentialStoreUnavailable.outcome(),
        ),
        _ => unauthorized(),
    })?;
    let snap = state.snapshot();
    let membership = required(
        state.identities.membership(&identity.membership_id).await,
        unauthorized,
    )?;
    if !membership.is_active() {
        return Err(unauthorized());
    }
    let project = snap
        .projects
        .get(&identity.project_id)
        .cloned()
        .ok_or_else(unauthorized)?;
    // A membership whose policies cannot be built grants nothing: fail closed.
    let own_policy = state
        .effective_policy_in_context(
            &snap,
            &identity.membership_id,
            identity.scope.as_deref(),
            identity.patient.as_deref(),
        )
        .await?
        .ok_or_else(ApiError::forbidden)?;
    let ip = client_ip(state, parts)?;
    if let Some(ip) = ip
        && !own_policy.check_ip(ip).is_allowed()
    {
        return Err(ApiError::forbidden());
    }
    // On behalf of another member (admins only, same project), the target's membership replaces
    // the caller's entirely, its `admin` flag included: an admin acting for a plain member has
    // that member's rights here, as on the gateway.
    let (membership, policy) = match parts.headers.get("x-medplum-on-behalf-of") {
        None => (membership, own_policy),
        Some(value) => {
            let value = value.to_str().map_err(|_| ApiError::forbidden())?;
            if !(membership.is_admin() || project.super_admin) {
                return Err(ApiError::forbidden());
            }
            let target = state
                .identities
                .on_behalf_of(&project.id, value)
                .await?
                .ok_or_else(ApiError::forbidden)?;
            let target_membership = state
                .identities
                .membership(&target)
                .await?
                .filter(|m| m.is_active())
                .ok_or_else(ApiError::forbidden)?;
            let target_policy = state
                .effective_policy_in_context(
                    &snap,
                    &target,
                    identity.scope.as_deref(),
                    identity.patient.as_deref(),
                )
                .await?
                .ok_or_else(ApiError::forbidden)?;
            if let Some(ip) = ip
                && !target_policy.check_ip(ip).is_allowed()
            {
                return Err(ApiError::forbidden());
            }
            (target_membership, target_policy)
        }
    };
    Ok(Caller {
        identity,
        snap,
        membership,
        project,
        policy,
        client_ip: ip,
    })
}

/// Authenticates and requires a project admin or super admin (403 otherwise).
pub async fn authenticate_admin(state: &State, parts: &Parts) -> Result<Caller, ApiError> {
    let caller = authenticate(state, parts).await?;
    if !caller.is_admin() {
        return Err(ApiError::forbidden());
    }
    Ok(caller)
}

/// The project an admin call acts on: the URL's for a super admin (404 when it does not
/// exist), the caller's own for a project admin.
fn target_project(caller: &Caller, url_project: &str) -> Result<ProjectInfo, ApiError> {
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

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(state, parts).await
    }
}

/// A project admin or super admin ([`authenticate_admin`]).
pub struct AdminCaller(pub Caller);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate_admin(state, parts).await.map(AdminCaller)
    }
}

/// Proof that the caller is a member of a `superAdmin` project; 403 for anyone else.
pub struct SuperAdmin;

impl FromRequestParts<AppState> for SuperAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !authenticate(state, parts).await?.super_admin() {
            return Err(ApiError::forbidden());
        }
        Ok(SuperAdmin)
    }
}

/// An admin caller and the project the call acts on (the `/admin/projects/{project_id}/…`
/// routes): the path first (its own rejection), then [`authenticate_admin`], then
/// [`target_project`].
pub struct AdminProject {
    pub caller: Caller,
    pub project: ProjectInfo,
}

impl FromRequestParts<AppState> for AdminProject {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let caller = authenticate_admin(state, parts)
            .await
            .map_err(IntoResponse::into_response)?;
        let url_project = params.get("project_id").map_or("", String::as_str);
        let project = target_project(&caller, url_project).map_err(IntoResponse::into_response)?;
        Ok(AdminProject { caller, project })
    }
}
