//! `POST /oauth2/revoke` (RFC 7009).

use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::control::base::client_auth::authenticate_client;
use crate::control::base::client_auth::with_basic_challenge;
use crate::control::login::state::revoke;
use crate::control::oauth2::live_token;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::error::ApiError;
use crate::control::web::form::as_form;
use crate::obs::security::{SecurityEvent, SecurityEventKind};

/// `POST /oauth2/revoke` (RFC 7009): revokes the Login of an access or refresh token issued to
/// the calling client. Answers 200 whatever the token was (§2.2).
pub async fn revoke_token(
    AxState(state): AxState<AppState>,
    parts: Parts,
    body: Result<AuthBody, ApiError>,
) -> Result<Response, ApiError> {
    let AuthBody(body) = body.map_err(ApiError::into_oauth)?;
    let form = as_form(&body);
    let (client_id, _) = match authenticate_client(&state, &parts, &form, true).await {
        Ok(found) => found,
        Err(e) => {
            let refusal = e.into_oauth().into_response();
            return Ok(with_basic_challenge(&parts.headers, refusal));
        }
    };
    let token = body_str(&body, "token").ok_or_else(|| ApiError::oauth("Missing token"))?;
    if let Some((_, login)) = live_token(&state, &token).await
        && login.client_id.as_deref() == Some(client_id.as_str())
    {
        revoke(&state, &login.id)
            .await
            .map_err(ApiError::into_oauth)?;
        let subject = format!("Login/{}", login.id);
        let mut event = SecurityEvent::new(SecurityEventKind::TokenRevoked)
            .actor(&client_id)
            .subject(&subject);
        if let Some(project) = &login.project_id {
            event = event.project(project);
        }
        event.emit();
    }
    Ok((StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response())
}
