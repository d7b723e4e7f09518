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
use axum::routing::{MethodRouter, get, post};

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
        client_jwks: web::ClientJwks::new(
            base::client_auth::JWKS_TTL,
            base::client_auth::JWKS_FAILURE_TTL,
        ),
    });
    let routes = routes();
    let mut router = Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .fallback(web::not_found)
        .layer(axum::middleware::from_fn(web::check::permission_check));
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

/// Every route answers 405 to a method it does not list.
fn routes() -> Router<web::AppState> {
    #[rustfmt::skip]
    let table: [(&str, MethodRouter<web::AppState>); 55] = [
        ("/.well-known/openid-configuration", get(oauth2::discovery::openid_configuration)),
        ("/.well-known/oauth-authorization-server", get(oauth2::discovery::openid_configuration)),
        ("/.well-known/jwks.json", get(oauth2::discovery::jwks)),
        ("/.well-known/smart-configuration", get(oauth2::discovery::smart_configuration)),
        ("/.well-known/smart-styles.json", get(oauth2::discovery::smart_styles)),
        ("/.well-known/oauth-protected-resource", get(oauth2::discovery::protected_resource)),
        ("/fhir/R4/.well-known/smart-configuration", get(oauth2::discovery::smart_configuration)),
        ("/fhir/R4/.well-known/smart-styles.json", get(oauth2::discovery::smart_styles)),
        ("/oauth2/token", post(oauth2::token::token)),
        ("/oauth2/userinfo", get(oauth2::userinfo::userinfo).post(oauth2::userinfo::userinfo)),
        ("/oauth2/introspect", post(oauth2::introspect::introspect)),
        ("/oauth2/revoke", post(oauth2::revoke::revoke_token)),
        ("/oauth2/authorize", get(oauth2::authorize::authorize).post(oauth2::authorize::authorize)),
        ("/oauth2/google-signin.js", get(oauth2::authorize::google_script)),
        ("/oauth2/logout", get(oauth2::logout::logout).post(oauth2::logout::logout)),
        ("/auth/me", get(auth::me::me)),
        ("/auth/method", post(auth::external::method)),
        ("/auth/google", post(auth::google::google)),
        ("/auth/external", get(auth::external::external_callback)),
        ("/auth/saml/metadata", get(oauth2::authorize::saml::metadata)),
        ("/auth/saml/acs", post(oauth2::authorize::saml::acs)),
        ("/auth/exchange", post(auth::external::exchange_legacy)),
        ("/auth/login", post(auth::login::login)),
        ("/auth/login/{login_id}", get(auth::login::login_status)),
        ("/auth/profile", post(auth::login::profile)),
        ("/auth/scope", post(auth::login::scope)),
        ("/auth/revoke", post(auth::revoke::auth_revoke)),
        ("/auth/mfa/status", get(auth::mfa::status)),
        ("/auth/mfa/enroll", post(auth::mfa::enroll)),
        ("/auth/mfa/verify", post(auth::mfa::verify)),
        ("/auth/mfa/login-enroll", post(auth::mfa::login_enroll_handler)),
        ("/auth/mfa/disable", post(auth::mfa::disable)),
        ("/auth/mfa/send-email", post(auth::mfa::send_email)),
        ("/auth/mfa/send-sms", post(auth::mfa::send_sms)),
        ("/auth/mfa/send-email-challenge", post(auth::mfa::send_email_challenge)),
        ("/auth/mfa/send-sms-challenge", post(auth::mfa::send_sms_challenge)),
        ("/auth/mfa/preferred", post(auth::mfa::preferred)),
        ("/auth/newuser", post(auth::register::new_user)),
        ("/auth/newproject", post(auth::register::new_project)),
        ("/auth/newpatient", post(auth::register::new_patient)),
        ("/auth/setpassword", post(auth::password::set_password)),
        ("/auth/setpassword/{id}/{secret}", get(auth::password::set_password_page)),
        ("/auth/resetpassword", post(auth::password::reset_password)),
        ("/auth/changepassword", post(auth::password::change_password)),
        ("/auth/verifyemail", post(auth::password::verify_email)),
        ("/admin/projects/setpassword", post(admin::password::admin_set_password)),
        ("/admin/super/setpassword", post(admin::password::super_set_password)),
        ("/admin/projects/{project_id}/invite", post(admin::invite::invite)),
        ("/admin/projects/{project_id}", get(admin::project::get_project)),
        ("/admin/projects/{project_id}/client", post(admin::clients::create_client)),
        ("/admin/projects/{project_id}/members/{membership_id}", get(admin::members::get_member).post(admin::members::update_member).delete(admin::members::delete_member)),
        ("/admin/projects/{project_id}/members/{membership_id}/mfa/reset", post(admin::members::reset_mfa)),
        ("/fhir/R4/{resource_type}", get(fhir::search::search).post(fhir::create)),
        ("/fhir/R4/{resource_type}/{id}", get(fhir::read).put(fhir::update).delete(fhir::delete).post(fhir::search::post_search)),
        ("/fhir/R4/{resource_type}/{id}/{operation}", get(fhir::operations::instance_operation_get).post(fhir::operations::instance_operation)),
    ];
    table
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| {
            router.route(path, with_405(methods))
        })
}
