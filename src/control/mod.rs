//! The control API (SPEC §2): discovery, the OAuth2 token endpoint, `/auth/me`, the admin API
//! and FHIR-style CRUD of the identity resources that live in fhirgate's store. An axum router,
//! mounted at both `/` and `/api/` (as Medplum does).
//!
//! Invariants: every error goes through [`ApiError`] (no 500 for bad input, never a secret in a
//! log line or a response other than the one that creates it); every write refreshes the shared
//! snapshot before answering, so the gateway sees it on the very next request.

mod access;
mod admin;
mod authorize;
pub mod bootstrap;
mod discovery;
mod error;
mod external;
mod fhir;
mod guards;
pub mod index;
mod invite;
mod login;
mod logout;
mod me;
mod mfa;
mod oauth;
mod outbound;
mod pages;
mod password;
mod ratelimit;
mod register;
mod token;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use ipnet::IpNet;

pub use access::Caller;
pub use error::ApiError;

use crate::state::State;

/// Largest request body the control API reads.
pub const MAX_BODY: usize = 1 << 20;

type AppState = Arc<State>;

/// The control API router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`:
/// the client address (and so IP rules) needs the TCP peer.
pub fn router(state: Arc<State>) -> Router {
    let routes = routes();
    let mut router = Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .fallback(not_found);
    if let Some(limit) = ratelimit::AuthRateLimit::new(state.config.auth_rate_limit) {
        router = router.layer(axum::middleware::from_fn_with_state(
            ratelimit::Limiting {
                state: state.clone(),
                limit,
            },
            ratelimit::enforce,
        ));
    }
    router = router.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        store_gate,
    ));
    router
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// While the store is known to be unreachable (the change feed's last round trip failed),
/// answer 503 at once instead of letting each handler wait for the pool to give up: nothing can
/// be read or written meanwhile. Discovery and the JWKS come from the snapshot and stay up.
async fn store_gate(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !state.store_up() && !req.uri().path().contains("/.well-known/") {
        return ApiError::Outcome(fhirgate_core::fhir::outcome::Outcome::ServiceUnavailable(
            "Store unavailable".into(),
        ))
        .into_response();
    }
    next.run(req).await
}

fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            with_405(get(discovery::openid_configuration)),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            with_405(get(discovery::openid_configuration)),
        )
        .route("/.well-known/jwks.json", with_405(get(discovery::jwks)))
        .route(
            "/.well-known/smart-configuration",
            with_405(get(discovery::smart_configuration)),
        )
        .route(
            "/.well-known/smart-styles.json",
            with_405(get(discovery::smart_styles)),
        )
        .route(
            "/.well-known/oauth-protected-resource",
            with_405(get(discovery::protected_resource)),
        )
        .route(
            "/fhir/R4/.well-known/smart-configuration",
            with_405(get(discovery::smart_configuration)),
        )
        .route(
            "/fhir/R4/.well-known/smart-styles.json",
            with_405(get(discovery::smart_styles)),
        )
        .route("/oauth2/token", with_405(post(token::token)))
        .route("/auth/me", with_405(get(me::me)))
        .route("/auth/method", with_405(post(external::method)))
        .route("/auth/external", with_405(get(external::external_callback)))
        .route("/auth/exchange", with_405(post(external::exchange_legacy)))
        .route("/auth/login", with_405(post(login::login)))
        .route("/auth/login/{login_id}", with_405(get(login::login_status)))
        .route("/auth/profile", with_405(post(login::profile)))
        .route("/auth/scope", with_405(post(login::scope)))
        .route("/auth/revoke", with_405(post(oauth::auth_revoke)))
        .route(
            "/oauth2/userinfo",
            with_405(get(oauth::userinfo).post(oauth::userinfo)),
        )
        .route("/oauth2/introspect", with_405(post(oauth::introspect)))
        .route("/oauth2/revoke", with_405(post(oauth::revoke_token)))
        .route(
            "/oauth2/authorize",
            with_405(get(authorize::authorize).post(authorize::authorize)),
        )
        .route("/auth/mfa/status", with_405(get(mfa::status)))
        .route("/auth/mfa/enroll", with_405(post(mfa::enroll)))
        .route("/auth/mfa/verify", with_405(post(mfa::verify)))
        .route(
            "/auth/mfa/login-enroll",
            with_405(post(mfa::login_enroll_handler)),
        )
        .route("/auth/mfa/disable", with_405(post(mfa::disable)))
        .route("/auth/newuser", with_405(post(register::new_user)))
        .route("/auth/newproject", with_405(post(register::new_project)))
        .route("/auth/newpatient", with_405(post(register::new_patient)))
        .route("/auth/setpassword", with_405(post(password::set_password)))
        .route(
            "/auth/setpassword/{id}/{secret}",
            with_405(get(password::set_password_page)),
        )
        .route(
            "/auth/resetpassword",
            with_405(post(password::reset_password)),
        )
        .route(
            "/auth/changepassword",
            with_405(post(password::change_password)),
        )
        .route("/auth/verifyemail", with_405(post(password::verify_email)))
        .route(
            "/admin/projects/setpassword",
            with_405(post(password::admin_set_password)),
        )
        .route(
            "/admin/super/setpassword",
            with_405(post(password::super_set_password)),
        )
        .route(
            "/admin/projects/{project_id}/invite",
            with_405(post(invite::invite)),
        )
        .route(
            "/oauth2/logout",
            with_405(get(logout::logout).post(logout::logout)),
        )
        .route(
            "/admin/projects/{project_id}",
            with_405(get(admin::get_project)),
        )
        .route(
            "/admin/projects/{project_id}/client",
            with_405(post(admin::create_client)),
        )
        .route(
            "/admin/projects/{project_id}/members/{membership_id}",
            with_405(
                get(admin::get_member)
                    .post(admin::update_member)
                    .delete(admin::delete_member),
            ),
        )
        .route(
            "/fhir/R4/{resource_type}",
            with_405(get(fhir::search).post(fhir::create)),
        )
        .route(
            "/fhir/R4/{resource_type}/{id}",
            with_405(
                get(fhir::read)
                    .put(fhir::update)
                    .delete(fhir::delete)
                    .post(fhir::post_search),
            ),
        )
        .route(
            "/fhir/R4/{resource_type}/{id}/{operation}",
            with_405(post(fhir::instance_operation)),
        )
}

fn with_405(m: MethodRouter<AppState>) -> MethodRouter<AppState> {
    m.fallback(method_not_allowed)
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// Medplum's response hygiene: nothing the control API answers may be cached or sniffed.
async fn security_headers(mut response: Response) -> Response {
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

// === request helpers ===

/// The client's address: the TCP peer, or — when the peer is a trusted proxy or loopback (the
/// gateway appends the client to `X-Forwarded-For`) — the right-most untrusted hop. `None` only
/// when the server was started without connect info (in-process use). Malformed → 400.
pub(crate) fn client_ip(state: &State, parts: &Parts) -> Result<Option<IpAddr>, ApiError> {
    let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
        return Ok(None);
    };
    let mut xff = Vec::new();
    for v in parts.headers.get_all("x-forwarded-for") {
        xff.push(
            v.to_str()
                .map_err(|_| ApiError::bad_request("Invalid X-Forwarded-For header"))?,
        );
    }
    let mut proxies: Vec<IpNet> = state.config.trusted_proxies.clone();
    proxies.extend(LOOPBACK.iter().filter_map(|n| n.parse::<IpNet>().ok()));
    crate::net::resolve(peer.ip(), &xff, &proxies)
        .map(Some)
        .map_err(|_| ApiError::bad_request("Invalid X-Forwarded-For header"))
}

const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// Reads the whole body, at most `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::Outcome(fhirgate_core::fhir::outcome::Outcome::PayloadTooLarge(
            "Request body too large".into(),
        ))
    })
}

/// The decoded `name=value` pairs of a request's query string, in order, repeats kept.
pub(crate) fn query_pairs(parts: &Parts) -> Vec<(String, String)> {
    parts
        .uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The media type of a request, lower-case, without parameters.
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// Parses a JSON request body (`application/json` or `application/fhir+json`) into an object.
pub(crate) async fn json_body(parts: &Parts, body: Body) -> Result<serde_json::Value, ApiError> {
    let bytes = read_body(body, MAX_BODY).await?;
    match media_type(&parts.headers).as_deref() {
        Some("application/json" | "application/fhir+json") => {}
        _ => return Err(ApiError::bad_request("Unsupported content type")),
    }
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| ApiError::bad_request("Invalid JSON"))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("Invalid JSON"));
    }
    Ok(value)
}

/// 200 `application/json`: the answer of the `/auth/*`, OAuth and discovery endpoints.
pub(crate) fn ok_json(body: &serde_json::Value) -> Response {
    json_response(axum::http::StatusCode::OK, "application/json", body)
}

/// A JSON response with a content type.
pub(crate) fn json_response(
    status: axum::http::StatusCode,
    content_type: &'static str,
    body: &serde_json::Value,
) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body.to_string(),
    )
        .into_response()
}
