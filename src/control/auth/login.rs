//! `POST /auth/login`, `GET /auth/login/:login`, `POST /auth/profile`, `POST /auth/scope`: the
//! JSON front end of the Login lifecycle (`login::flow`).

use axum::extract::{Path, State as AxState};
use axum::http::request::Parts;
use axum::response::Response;

use crate::control::login::flow::choose_profile;
use crate::control::login::flow::login_response;
use crate::control::login::flow::password_login;
use crate::control::login::flow::set_scope;
use crate::control::login::state::ClientAsk;
use crate::control::login::state::LoginRequest;
use crate::control::login::state::get_login;
use crate::control::login::state::is_granted;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_bool;
use crate::control::web::body::body_str;
use crate::control::web::body::login_and;
use crate::control::web::body::origin;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;

/// `POST /auth/login`.
pub async fn login(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let ip = client_ip(&state, &parts)?;
    let request = LoginRequest {
        email: body_str(&body, "email").unwrap_or_default(),
        password: body_str(&body, "password").unwrap_or_default(),
        client_id: body_str(&body, "clientId"),
        project_id: body_str(&body, "projectId"),
        resource_type: body_str(&body, "resourceType"),
        remember: body_bool(&body, "remember"),
        ask: ClientAsk::of_body(&body),
        origin: origin(&parts.headers),
        remote_address: ip,
        user_agent: user_agent(&parts.headers),
    };
    let login = password_login(&state, &request).await?;
    login_response(&state, login).await
}

/// `GET /auth/login/:login`: the state of a sign-in, for clients that resume it.
pub async fn login_status(
    AxState(state): AxState<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(ApiError::bad_request("Login ID is required"));
    }
    let login = get_login(&state, &id).await?;
    if is_granted(&login) {
        return Err(ApiError::bad_request("Login already granted"));
    }
    if login.revoked {
        return Err(ApiError::bad_request("Login revoked"));
    }
    login_response(&state, login).await
}

/// `POST /auth/profile {login, profile}`.
pub async fn profile(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let (login_id, profile) = login_and(&body, "profile", "Missing profile")?;
    let ip = client_ip(&state, &parts)?;
    let login = get_login(&state, &login_id).await?;
    let login = choose_profile(&state, &login, &profile, ip).await?;
    login_response(&state, login).await
}

/// `POST /auth/scope {login, scope}`.
pub async fn scope(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let (login_id, scope) = login_and(&body, "scope", "Missing scope")?;
    let login = get_login(&state, &login_id).await?;
    let login = set_scope(&state, &login, &scope).await?;
    login_response(&state, login).await
}
