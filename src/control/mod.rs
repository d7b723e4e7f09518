//! The control API (docs/contract.md §2): discovery, the OAuth2 token endpoint, `/auth/me`, the admin API
//! and FHIR-style CRUD of the identity resources that live in fhirgate's store. An axum router,
//! mounted at both `/` and `/api/` (as Medplum does).
//!
//! Invariants: every error goes through [`ApiError`] (no 500 for bad input, never a secret in a
//! log line or a response other than the one that creates it); every write refreshes the shared
//! snapshot before answering, so the gateway sees it on the very next request.

//!
//! Rooms, with one-way dependencies `web` ← `base` ← `login` ← handler folders (`oauth2`,
//! `auth`, `admin`, `fhir`), which never import each other; this file (the routes) and
//! `bootstrap` may import anything. `tests/tidy.rs` checks the rule.

mod admin;
mod auth;
mod base;
pub mod bootstrap;
mod fhir;
mod login;
mod oauth2;
mod web;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use base::access::Caller;
pub use base::index;
pub use web::error::ApiError;

use crate::state::State;
use web::with_405;

/// The control API router, for in-process use (tests, benches): [`try_router`], or a panic when
/// its HTTP clients cannot be built (TLS cannot be set up).
///
/// # Panics
/// When [`try_router`] fails.
pub fn router(state: Arc<State>) -> Router {
    try_router(state).expect("the control API's HTTP clients (TLS setup)")
}

/// The control API router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`:
/// the client address (and so IP rules) needs the TCP peer. Fails when the HTTP clients of the
/// control API's own calls cannot be built; the server then does not start.
pub fn try_router(state: Arc<State>) -> Result<Router, reqwest::Error> {
    let control = Arc::new(web::ControlState {
        shared: state.clone(),
        outbound: base::outbound::client()?,
        guarded: crate::outbound::Guarded::new(&state.config.outbound_allow)?,
        upstream: base::upstream::client()?,
    });
    let routes = routes();
    let mut router = Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .fallback(web::not_found);
    if let Some(limit) = web::ratelimit::AuthRateLimit::new(state.config.auth_rate_limit) {
        router = router.layer(axum::middleware::from_fn_with_state(
            web::ratelimit::Limiting {
                state: state.clone(),
                limit,
            },
            web::ratelimit::enforce,
        ));
    }
    router = router.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        web::store_gate,
    ));
    Ok(router
        .layer(axum::middleware::map_response(web::security_headers))
        .with_state(control))
}

fn routes() -> Router<web::AppState> {
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            with_405(get(oauth2::discovery::openid_configuration)),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            with_405(get(oauth2::discovery::openid_configuration)),
        )
        .route(
            "/.well-known/jwks.json",
            with_405(get(oauth2::discovery::jwks)),
        )
        .route(
            "/.well-known/smart-configuration",
            with_405(get(oauth2::discovery::smart_configuration)),
        )
        .route(
            "/.well-known/smart-styles.json",
            with_405(get(oauth2::discovery::smart_styles)),
        )
        .route(
            "/.well-known/oauth-protected-resource",
            with_405(get(oauth2::discovery::protected_resource)),
        )
        .route(
            "/fhir/R4/.well-known/smart-configuration",
            with_405(get(oauth2::discovery::smart_configuration)),
        )
        .route(
            "/fhir/R4/.well-known/smart-styles.json",
            with_405(get(oauth2::discovery::smart_styles)),
        )
        .route("/oauth2/token", with_405(post(oauth2::token::token)))
        .route("/auth/me", with_405(get(auth::me::me)))
        .route("/auth/method", with_405(post(auth::external::method)))
        .route(
            "/auth/external",
            with_405(get(auth::external::external_callback)),
        )
        .route(
            "/auth/exchange",
            with_405(post(auth::external::exchange_legacy)),
        )
        .route("/auth/login", with_405(post(auth::login::login)))
        .route(
            "/auth/login/{login_id}",
            with_405(get(auth::login::login_status)),
        )
        .route("/auth/profile", with_405(post(auth::login::profile)))
        .route("/auth/scope", with_405(post(auth::login::scope)))
        .route("/auth/revoke", with_405(post(auth::revoke::auth_revoke)))
        .route(
            "/oauth2/userinfo",
            with_405(get(oauth2::userinfo::userinfo).post(oauth2::userinfo::userinfo)),
        )
        .route(
            "/oauth2/introspect",
            with_405(post(oauth2::introspect::introspect)),
        )
        .route(
            "/oauth2/revoke",
            with_405(post(oauth2::revoke::revoke_token)),
        )
        .route(
            "/oauth2/authorize",
            with_405(get(oauth2::authorize::authorize).post(oauth2::authorize::authorize)),
        )
        .route("/auth/mfa/status", with_405(get(auth::mfa::status)))
        .route("/auth/mfa/enroll", with_405(post(auth::mfa::enroll)))
        .route("/auth/mfa/verify", with_405(post(auth::mfa::verify)))
        .route(
            "/auth/mfa/login-enroll",
            with_405(post(auth::mfa::login_enroll_handler)),
        )
        .route("/auth/mfa/disable", with_405(post(auth::mfa::disable)))
        .route("/auth/newuser", with_405(post(auth::register::new_user)))
        .route(
            "/auth/newproject",
            with_405(post(auth::register::new_project)),
        )
        .route(
            "/auth/newpatient",
            with_405(post(auth::register::new_patient)),
        )
        .route(
            "/auth/setpassword",
            with_405(post(auth::password::set_password)),
        )
        .route(
            "/auth/setpassword/{id}/{secret}",
            with_405(get(auth::password::set_password_page)),
        )
        .route(
            "/auth/resetpassword",
            with_405(post(auth::password::reset_password)),
        )
        .route(
            "/auth/changepassword",
            with_405(post(auth::password::change_password)),
        )
        .route(
            "/auth/verifyemail",
            with_405(post(auth::password::verify_email)),
        )
        .route(
            "/admin/projects/setpassword",
            with_405(post(admin::password::admin_set_password)),
        )
        .route(
            "/admin/super/setpassword",
            with_405(post(admin::password::super_set_password)),
        )
        .route(
            "/admin/projects/{project_id}/invite",
            with_405(post(admin::invite::invite)),
        )
        .route(
            "/oauth2/logout",
            with_405(get(oauth2::logout::logout).post(oauth2::logout::logout)),
        )
        .route(
            "/admin/projects/{project_id}",
            with_405(get(admin::project::get_project)),
        )
        .route(
            "/admin/projects/{project_id}/client",
            with_405(post(admin::clients::create_client)),
        )
        .route(
            "/admin/projects/{project_id}/members/{membership_id}",
            with_405(
                get(admin::members::get_member)
                    .post(admin::members::update_member)
                    .delete(admin::members::delete_member),
            ),
        )
        .route(
            "/fhir/R4/{resource_type}",
            with_405(get(fhir::search::search).post(fhir::create)),
        )
        .route(
            "/fhir/R4/{resource_type}/{id}",
            with_405(
                get(fhir::read)
                    .put(fhir::update)
                    .delete(fhir::delete)
                    .post(fhir::search::post_search),
            ),
        )
        .route(
            "/fhir/R4/{resource_type}/{id}/{operation}",
            with_405(post(fhir::operations::instance_operation)),
        )
}
