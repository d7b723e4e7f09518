//! The data plane: `impl ProxyHttp for Gateway`. Invariant: this is the only module (with
//! `server.rs`) that imports pingora, and it never awaits the store on the hot path — it reads
//! `state` (snapshot and caches). Each hook is short and hands the work to a named helper.
//!
//! | step           | hook                          | helper                              |
//! |----------------|-------------------------------|-------------------------------------|
//! | identify       | `request_filter`              | `route::route`, `net::resolve`        |
//! | authenticate   | `request_filter`              | `State::authenticate`                |
//! | policy, decide | `request_filter`              | `authorize::authorize`               |
//! | forward        | `upstream_peer`, `upstream_request_filter` | `forward`               |
//! | filter         | `response_filter`, `response_body_filter`  | `filter`                |
//! | record         | `logging`                     | `obs`                                |

pub mod authorize;
pub mod check;
pub mod cors;
pub mod ctx;
pub mod filter;
mod forward;
mod mediate;
pub mod metadata;
mod names;
pub mod respond;
pub mod route;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::outcome::Stock;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::obs::{Children, METRICS};
use crate::state::State;
use ctx::{FilterSpec, ResponsePlan};
use ctx::{Mode, RequestCtx};
use route::Route;

pub struct Gateway {
    pub state: Arc<State>,
    http: reqwest::Client,
    /// The public CapabilityStatement, rendered once per upstream answer.
    metadata: metadata::MetadataCache,
    forwarded: forward::Forwarded,
}

impl Gateway {
    /// The gateway and the HTTP client of its mediated requests. Fails when the client cannot be
    /// built (TLS cannot be set up): a client without the upstream's timeouts is never used.
    pub fn try_new(state: Arc<State>) -> Result<Gateway, reqwest::Error> {
        let up = &state.config.upstream;
        let http = reqwest::Client::builder()
            .connect_timeout(up.connect_timeout)
            .timeout(up.read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Gateway {
            forwarded: forward::Forwarded::new(&state.config),
            state,
            http,
            metadata: metadata::MetadataCache::default(),
        })
    }

    fn client_ip(
        &self,
        session: &Session,
    ) -> Result<std::net::IpAddr, crate::net::BadForwardedFor> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        let xff: Vec<&str> = session
            .req_header()
            .headers
            .get_all(&names::X_FORWARDED_FOR)
            .iter()
            .map(|v| v.to_str().map_err(|_| crate::net::BadForwardedFor))
            .collect::<Result<_, _>>()?;
        crate::net::resolve(peer, &xff, &self.state.config.trusted_proxies)
    }

    async fn deny(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        outcome: Outcome,
        label: &'static str,
    ) -> Result<bool> {
        let mut extra = Vec::new();
        if outcome == Outcome::Unauthorized
            && session
                .req_header()
                .uri
                .query()
                .is_some_and(|q| q.contains("_medplum-prompt-basic-auth"))
        {
            extra.push((
                "www-authenticate",
                format!("Basic realm=\"{}\"", self.state.config.base_url),
            ));
        }
        if let Some(secs) = ctx.retry_after {
            extra.push(("retry-after", secs.to_string()));
        }
        ctx.decision = label;
        if ctx.mode == Mode::Check && check::is_verdict(outcome.status()) {
            let reason = check::public_reason(&outcome, label);
            check::answer(session, ctx, check::Verdict::denied(&outcome, reason)).await?;
            return Ok(true);
        }
        let extra = cors::with_cors(&extra, ctx.cors.as_ref());
        ctx.answered = Some(respond::outcome(session, &outcome, &extra).await?);
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// No downstream modules. pingora's default is a response compression module switched
    /// off, which is still set up, asked about the request and the response, and dropped on
    /// every request (about 540 instructions and three allocations); the gateway compresses
    /// nothing, and an upstream's encoding goes through as it came.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Identify, authenticate, decide. Returns `Ok(true)` when the gateway answered itself.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // `ctx.started` was set by `new_ctx`, once the request head was read.
        let req = session.req_header();
        ctx.route = route::route(req.method.as_str(), req.uri.path());
        ctx.present = names::Present::of(&req.headers);
        ctx.client_ip = match self.client_ip(session) {
            Ok(ip) => Some(ip),
            Err(_) => {
                let o = Stock::InvalidForwardedFor.outcome();
                return self.deny(session, ctx, o, "bad_forwarded_for").await;
            }
        };
        // Browsers first: a preflight is answered here, before any credential is looked at,
        // and never travels further.
        ctx.cors = if ctx.present.has(names::Present::ORIGIN) {
            cors::grant(&self.state, session).await
        } else {
            None
        };
        if cors::is_preflight(session) {
            ctx.decision = if ctx.cors.is_some() {
                "preflight"
            } else {
                "preflight_refused"
            };
            ctx.answered = Some(cors::answer_preflight(session, ctx.cors.as_ref()).await?);
            return Ok(true);
        }
        // A malformed question is an error (the mode stays `Serve`), not a verdict.
        match check::prepare(session, &mut ctx.route, ctx.present) {
            Ok(mode) => ctx.mode = mode,
            Err(e) => {
                let o = Outcome::BadRequest(e.to_string());
                return self.deny(session, ctx, o, "bad_check").await;
            }
        }
        match ctx.route {
            Route::Metadata if ctx.mode == Mode::Check => {
                ctx.decision = "check_public";
                check::answer(session, ctx, check::Verdict::allowed(&[])).await?;
                Ok(true)
            }
            Route::Control => {
                ctx.decision = "pass";
                Ok(false)
            }
            Route::Metadata => {
                ctx.decision = "public";
                if metadata::cacheable(session) {
                    if let Some(rendered) = self.metadata.fresh() {
                        let cors = cors::with_cors(&[], ctx.cors.as_ref());
                        ctx.answered = Some(metadata::answer(session, &rendered, &cors).await?);
                        return Ok(true);
                    }
                    ctx.metadata_kept = Some(Vec::new());
                }
                static METADATA: std::sync::LazyLock<Arc<FilterSpec>> =
                    std::sync::LazyLock::new(|| {
                        Arc::new(FilterSpec {
                            policy: None,
                            metadata: true,
                            drop_total: false,
                            subset: None,
                            seal_pages: false,
                            strip_seal: false,
                        })
                    });
                ctx.plan = ResponsePlan::Buffer(METADATA.clone());
                Ok(false)
            }
            Route::NotFound => {
                self.deny(session, ctx, Outcome::NotFound, "not_found")
                    .await
            }
            Route::BadPath => {
                let o = Stock::InvalidPath.outcome();
                self.deny(session, ctx, o, "bad_path").await
            }
            Route::Fhir { .. } => match authorize::authorize(self, session, ctx).await {
                authorize::Verdict::Forward if ctx.mode == Mode::Check => {
                    ctx.decision = "check_allowed";
                    check::answer(session, ctx, check::Verdict::allowed(&[])).await?;
                    Ok(true)
                }
                authorize::Verdict::Forward => Ok(false),
                authorize::Verdict::Deny(outcome, label) => {
                    self.deny(session, ctx, outcome, label).await
                }
                authorize::Verdict::Explain(trace) => {
                    ctx.decision = "explain";
                    let body = Bytes::from(serde_json::to_vec_pretty(&trace).unwrap_or_default());
                    let cors = cors::with_cors(&[], ctx.cors.as_ref());
                    respond::write(session, 200, "application/json", &cors, body).await?;
                    ctx.answered = Some(200);
                    Ok(true)
                }
                authorize::Verdict::Mediate(plan) => {
                    // Boxed: the exchange's state is large, and inline it would be part of
                    // every request's hook future, allocated and copied on every request.
                    let status = Box::pin(mediate::run(self, session, ctx, plan)).await?;
                    ctx.answered = Some(status);
                    Ok(true)
                }
            },
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_started = Some(Instant::now());
        forward::peer(&self.state, ctx)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        forward::rewrite_request(&self.state, &self.forwarded, session, upstream, ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(t) = ctx.upstream_started {
            ctx.upstream_elapsed = Some(t.elapsed());
        }
        cors::apply(resp, ctx.cors.as_ref())?;
        filter::prepare_response(&self.state, resp, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        filter::body_chunk(&self.state, &self.metadata, body, end, ctx)?;
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        use pingora::ErrorType::*;
        let outcome = match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout => Stock::UpstreamTimedOut.outcome(),
            _ if matches!(e.esource(), pingora::ErrorSource::Upstream) => {
                Stock::UpstreamUnavailable.outcome()
            }
            ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure => {
                Stock::UpstreamUnavailable.outcome()
            }
            _ if matches!(e.esource(), pingora::ErrorSource::Downstream) => {
                Stock::BadRequest.outcome()
            }
            _ => Stock::UpstreamError.outcome(),
        };
        ctx.decision = "upstream_error";
        let code = outcome.status();
        if session.response_written().is_none() {
            let cors = cors::with_cors(&[], ctx.cors.as_ref());
            let _ = respond::outcome(session, &outcome, &cors).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        _e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        let status = ctx
            .answered
            .or_else(|| session.response_written().map(|r| r.status.as_u16()))
            .unwrap_or(0);
        static GATEWAY_SECONDS: Children<prometheus::Histogram, 5> = Children::new(Route::LABELS);
        static UPSTREAM_SECONDS: Children<prometheus::Histogram, 5> = Children::new(Route::LABELS);
        let route = ctx.route.as_str();
        crate::obs::count_request(route, ctx.decision);
        let total = ctx.started.elapsed();
        let upstream = ctx.upstream_elapsed.unwrap_or_default();
        GATEWAY_SECONDS
            .get(&METRICS.gateway_seconds, ctx.route.index())
            .observe(total.saturating_sub(upstream).as_secs_f64());
        if ctx.upstream_elapsed.is_some() {
            UPSTREAM_SECONDS
                .get(&METRICS.upstream_seconds, ctx.route.index())
                .observe(upstream.as_secs_f64());
        }
        if matches!(ctx.route, Route::Fhir { .. }) {
            if crate::obs::audit_enabled() {
                crate::obs::audit(crate::obs::audit_log::Record {
                    at: std::time::SystemTime::now(),
                    request_id: ctx.request_id,
                    route,
                    method: session.req_header().method.clone(),
                    resource_type: ctx.resource_type.clone(),
                    identity: ctx.identity.clone(),
                    on_behalf_of: ctx.on_behalf_of_profile.clone(),
                    client_ip: ctx.client_ip,
                    decision: ctx.decision,
                    status,
                });
            }
            // A refusal of an authenticated caller joins the project's security trail.
            if status == 403
                && crate::obs::trail::active()
                && let Some(identity) = &ctx.identity
            {
                crate::obs::trail::record_denial(
                    &identity.profile,
                    &identity.project_id,
                    ctx.resource_type.as_deref(),
                    ctx.decision,
                    ctx.client_ip,
                );
            }
        }
    }
}
