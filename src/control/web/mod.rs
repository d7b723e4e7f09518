//! Axum plumbing shared by every handler, and nothing else: the app state type, the answers of
//! the router itself (405, 404, the store gate, the security headers), and below it the body
//! readers, errors, client address, rate limit and pages. Imports no other room of the control API.

pub mod body;
pub mod check;
pub mod client_addr;
pub mod error;
pub mod form;
pub mod pages;
pub mod ratelimit;

use crate::control::web::error::ApiError;
use crate::state::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use std::sync::Arc;

/// The state every handler gets: the shared state (snapshots, store, caches, configuration),
/// and the HTTP clients of the control API's own calls, built once at start.
pub struct ControlState {
    pub(crate) shared: Arc<State>,
    /// Calls to services outside fhirgate (`base::outbound`): identity providers, clients' JWK
    /// Sets, reCAPTCHA, the breached-password service.
    pub(crate) outbound: reqwest::Client,
    /// Calls to addresses a client record chose (`crate::outbound::Guarded`): a client's JWK Set,
    /// an identity provider's endpoints; internal addresses refused.
    pub(crate) guarded: crate::outbound::Guarded,
    /// Calls to the upstream FHIR server (`base::upstream`).
    pub(crate) upstream: reqwest::Client,
    /// Clients' JWK Sets (`private_key_jwt`), kept by `base::client_auth`.
    pub(crate) client_jwks: ClientJwks,
}

/// A client's JWK Set as fetched, when, and until when it may be used.
pub(crate) struct FetchedJwks {
    pub(crate) set: jsonwebtoken::jwk::JwkSet,
    pub(crate) fetched: std::time::Instant,
    pub(crate) fresh_until: std::time::Instant,
}

/// Clients' JWK Sets by URL, and the URLs that could not be fetched lately (not fetched again
/// before their entry expires, so unauthenticated assertions cannot make fhirgate call out in a
/// loop). One per router, bounded.
pub(crate) struct ClientJwks {
    pub(crate) sets: moka::future::Cache<String, Arc<FetchedJwks>>,
    pub(crate) failures: moka::sync::Cache<String, ()>,
}

impl ClientJwks {
    pub(crate) fn new(ttl: std::time::Duration, failure_ttl: std::time::Duration) -> ClientJwks {
        ClientJwks {
            sets: moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(ttl)
                .build(),
            failures: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(failure_ttl)
                .build(),
        }
    }
}

impl std::ops::Deref for ControlState {
    type Target = State;

    fn deref(&self) -> &State {
        &self.shared
    }
}

pub(crate) type AppState = Arc<ControlState>;

/// While the store is known to be unreachable (the change feed's last round trip failed),
/// answer 503 at once instead of letting each handler wait for the pool to give up: nothing can
/// be read or written meanwhile. Discovery and the JWKS come from the snapshot and stay up.
pub(crate) async fn store_gate(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !state.store_up() && !req.uri().path().contains("/.well-known/") {
        return ApiError::Outcome(fhirgate_core::fhir::outcome::Stock::StoreUnavailable.outcome())
            .into_response();
    }
    next.run(req).await
}

pub(crate) fn with_405(m: MethodRouter<AppState>) -> MethodRouter<AppState> {
    m.fallback(method_not_allowed)
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// Medplum's response hygiene: nothing the control API answers may be cached or sniffed.
pub(crate) async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store, no-cache, must-revalidate"),
        );
    }
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
