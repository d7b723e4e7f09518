//! Per-request state, created by `new_ctx` (cheap: nothing is allocated until needed).

use std::net::IpAddr;

use bytes::Bytes;
use fhirgate_core::fhir::page;
use fhirgate_core::fhir::request::QueryParam;
use fhirgate_core::fhir::subset::{Subset, strip_query};
use std::sync::Arc;
use std::time::Instant;

use crate::state::Identity;
use crate::state::State;
use crate::state::upstreams::UpstreamBinding;
use fhirgate_core::policy::EffectivePolicy;

use super::route::Route;

/// Whether a request is served, or only checked (`gateway::check`): then nothing is forwarded
/// and nothing is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Check,
}

/// What to do with the upstream response of a forwarded request.
#[derive(Debug, Clone)]
pub enum ResponsePlan {
    /// Untouched (headers still rewritten).
    Stream,
    /// Buffer the JSON body, rewrite upstream URLs, and filter it if `policy` is set.
    Buffer(Arc<FilterSpec>),
}

#[derive(Debug)]
pub struct FilterSpec {
    /// Every returned resource is checked against this policy (read access) and redacted.
    pub policy: Option<Arc<EffectivePolicy>>,
    /// The response is the CapabilityStatement: advertise fhirgate's OAuth endpoints.
    pub metadata: bool,
    /// `Bundle.total` cannot be trusted and is removed.
    pub drop_total: bool,
    /// The part of each resource the client asked for, taken here after the checks (the
    /// upstream was asked for whole resources).
    pub subset: Option<Subset>,
    /// The answer is a search's, history's, page's or operation's: its page handles are sealed
    /// for the caller (`fhir::page`).
    pub seal_pages: bool,
    /// A page request: the seal comes off the query, however its name was spelled.
    pub strip_seal: bool,
}

impl FilterSpec {
    /// The query the upstream gets: the client's, without a subset the gateway takes itself.
    /// The gateway's own page seal never goes upstream either.
    pub fn upstream_query<'a>(&self, query: Option<&'a str>) -> Option<std::borrow::Cow<'a, str>> {
        match (query, &self.subset) {
            (Some(q), Some(_)) => Some(std::borrow::Cow::Owned(strip_query(q))),
            (Some(q), None) if self.strip_seal => {
                Some(std::borrow::Cow::Owned(page::without_seal(q)))
            }
            (q, _) => q.map(std::borrow::Cow::Borrowed),
        }
    }
}

#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: crate::obs::RequestId,
    pub started: Instant,
    pub route: Route,
    pub client_ip: Option<IpAddr>,
    /// Which of the headers the data plane asks about the request carries.
    pub present: super::names::Present,
    pub identity: Option<Arc<Identity>>,
    /// The upstream the caller's project is bound to (`None`: the global one, for public and
    /// unauthenticated routes).
    pub upstream: Option<Arc<UpstreamBinding>>,
    /// `ProjectMembership/…` the request acts as, when `X-Medplum-On-Behalf-Of` was accepted.
    pub on_behalf_of: Option<String>,
    pub on_behalf_of_profile: Option<String>,
    /// Stable label of the decision, for metrics and the audit record.
    pub decision: &'static str,
    pub resource_type: Option<String>,
    /// Query parameters appended to the upstream request (policy narrowing).
    pub extra_query: Vec<QueryParam>,

    /// What to do with the upstream response.
    pub plan: ResponsePlan,
    /// A CapabilityStatement answer to keep (`gateway::metadata`), with the upstream headers
    /// that travel with it once they are known.
    pub metadata_kept: Option<Vec<(&'static str, String)>>,
    /// The response body is being collected for filtering.
    pub buffering: bool,
    /// A body that replaces the upstream's (fail-closed answers decided at header time).
    pub replacement: Option<Bytes>,
    /// Response body collected for filtering.
    pub body: Vec<u8>,
    /// The body grew past the configured bound.
    pub body_overflow: bool,
    pub upstream_started: Option<Instant>,
    pub upstream_elapsed: Option<std::time::Duration>,
    /// Seconds for a `Retry-After` on a 429 the gateway answers.
    pub retry_after: Option<u64>,
    /// The status written by the gateway itself, if it answered.
    pub answered: Option<u16>,
    /// The CORS answer for the request's `Origin`, when admitted.
    pub cors: Option<super::cors::CorsGrant>,
    /// Served, or only checked (`gateway::check`): then nothing is forwarded or written.
    pub mode: Mode,
    /// Counts this request as in flight until the context is dropped (a graceful stop waits for
    /// none to be left, not for the whole grace period).
    _in_flight: crate::obs::InFlight,
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestCtx {
    /// The upstream this request goes to: its project's binding, or the global upstream.
    pub fn binding<'a>(&'a self, state: &'a State) -> &'a UpstreamBinding {
        self.upstream
            .as_deref()
            .unwrap_or_else(|| state.upstreams.default_binding())
    }

    /// What follows `/fhir/R4/` on a FHIR route; `""` on any other route (authorization and
    /// mediation only ever run on a FHIR route).
    pub fn fhir_rest(&self) -> &str {
        match &self.route {
            Route::Fhir { rest } => rest,
            _ => "",
        }
    }

    /// Seals a page handle of this request's answer for its caller ([`page_caller`]); the
    /// caller is spelled out only when a handle is there to seal. Unauthenticated requests
    /// never get an answer that is sealed (no FHIR data is public).
    pub fn page_sealer<'a>(&'a self, state: &'a State) -> impl Fn(&str) -> String + 'a {
        move |handle| {
            let caller = self.identity.as_deref().map(|identity| {
                let membership = match &self.on_behalf_of {
                    Some(target) => target.trim_start_matches("ProjectMembership/"),
                    None => identity.membership_id.as_str(),
                };
                page_caller(identity, membership)
            });
            state.page_seal(&caller.unwrap_or_default(), handle)
        }
    }

    pub fn new() -> RequestCtx {
        RequestCtx {
            request_id: crate::obs::RequestId::next(),
            started: Instant::now(),
            route: Route::NotFound,
            client_ip: None,
            present: super::names::Present::default(),
            identity: None,
            upstream: None,
            retry_after: None,
            on_behalf_of: None,
            on_behalf_of_profile: None,
            decision: "none",
            resource_type: None,
            extra_query: Vec::new(),
            plan: ResponsePlan::Stream,
            metadata_kept: None,
            buffering: false,
            replacement: None,
            body: Vec::new(),
            body_overflow: false,
            upstream_started: None,
            upstream_elapsed: None,
            answered: None,
            cors: None,
            mode: Mode::Serve,
            _in_flight: crate::obs::InFlight::start(),
        }
    }
}

/// Whom a page handle is sealed for: the project, the membership the request acts as, and the
/// sign-in with its scope and patient, so a handle serves neither another caller nor the same
/// person through a narrower token.
pub fn page_caller(identity: &Identity, membership_id: &str) -> String {
    format!(
        "{}\n{}\n{}\n{}\n{}",
        identity.project_id,
        membership_id,
        identity.login_id.as_deref().unwrap_or("basic"),
        identity.scope.as_deref().unwrap_or(""),
        identity.patient.as_deref().unwrap_or("")
    )
}
