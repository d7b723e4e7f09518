//! `POST /auth/revoke {loginId}` (docs/medplum-compat.md §2.16): ends another session of the same user.

use axum::extract::State as AxState;
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;

use crate::control::base::access::Caller;
use crate::control::login::state::get_login;
use crate::control::login::state::revoke;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;
use crate::obs::security::{SecurityEvent, SecurityEventKind};

/// `POST /auth/revoke {loginId}`: ends one of the caller's own sessions.
pub async fn auth_revoke(
    AxState(state): AxState<AppState>,
    caller: Caller,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let login_id = body_str(&body, "loginId")
        .filter(|id| uuid::Uuid::parse_str(id).is_ok())
        .ok_or_else(|| ApiError::invalid("loginId", "Login ID is required."))?;
    let login = get_login(&state, &login_id).await?;
    // Someone else's session does not exist for this caller.
    if login.user_ref != caller.identity.user_ref {
        return Err(ApiError::not_found());
    }
    revoke(&state, &login.id).await?;
    let subject = format!("Login/{}", login.id);
    let mut event = SecurityEvent::new(SecurityEventKind::TokenRevoked)
        .actor(caller.profile())
        .subject(&subject)
        .from_ip(caller.client_ip);
    if let Some(project) = &login.project_id {
        event = event.project(project);
    }
    event.emit();
    Ok(outcome_response(&Outcome::AllOk))
}
