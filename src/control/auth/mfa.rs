//! MFA endpoints (docs/medplum-compat.md §10): `GET /auth/mfa/status`, `POST /auth/mfa/enroll`,
//! `/auth/mfa/verify`, `/auth/mfa/login-enroll` and `/auth/mfa/disable`; the rules are
//! `login::mfa`'s.

use axum::extract::{FromRequestParts, State as AxState};
use axum::http::request::Parts;
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::{Map, Value, json};

use crate::state::State;

use crate::control::base::access::Caller;
use crate::control::base::users::revoke_sessions_of;
use crate::control::login::flow::login_response;
use crate::control::login::mfa::MfaUser;
use crate::control::login::mfa::SignInCode;
use crate::control::login::mfa::caller_attempt;
use crate::control::login::mfa::enroll_details;
use crate::control::login::mfa::ensure_secret;
use crate::control::login::mfa::new_secret;
use crate::control::login::mfa::read_user;
use crate::control::login::mfa::update_user;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::body::login_and;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;
use crate::obs::security::{SecurityEvent, SecurityEventKind};

/// The authenticated caller's User and Login. MFA belongs to Users: a client gets 403.
pub struct CallerUser {
    user: MfaUser,
    login_id: Option<String>,
}

impl FromRequestParts<AppState> for CallerUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let user = read_user(state, &caller.identity.user_ref)
            .await?
            .ok_or_else(ApiError::forbidden)?;
        Ok(CallerUser {
            user,
            login_id: caller.identity.login_id.clone(),
        })
    }
}

/// `GET /auth/mfa/status`.
pub async fn status(
    AxState(state): AxState<AppState>,
    CallerUser { user, .. }: CallerUser,
) -> Result<Response, ApiError> {
    if user.enrolled() {
        return Ok(ok_json(&json!({"enrolled": true})));
    }
    let user = ensure_secret(&state, user).await?;
    let secret = user
        .secret()
        .ok_or_else(|| ApiError::internal("MFA status", "secret missing after creation"))?;
    let (uri, qr) = enroll_details(user.email(), secret)?;
    Ok(ok_json(
        &json!({"enrolled": false, "enrollUri": uri, "enrollQrCode": qr}),
    ))
}

/// `POST /auth/mfa/enroll {token}`.
pub async fn enroll(
    AxState(state): AxState<AppState>,
    CallerUser { user, login_id }: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let token =
        body_str(&body, "token").ok_or_else(|| ApiError::invalid("token", "Missing token"))?;
    let secret = user.enrolment_secret()?;
    caller_attempt(&state, login_id.as_deref(), &user, &secret, &token).await?;
    update_user(&state, user.id(), |current, obj| {
        if current.enrolled() {
            return Err(ApiError::bad_request("Already enrolled"));
        }
        if current.secret() != Some(secret.as_str()) {
            return Err(ApiError::bad_request("Secret not found"));
        }
        obj.insert("mfaEnrolled".into(), Value::Bool(true));
        Ok(())
    })
    .await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// `POST /auth/mfa/disable {token}`: un-enrolls and rotates the secret, so a new enrolment
/// needs a new authenticator entry.
pub async fn disable(
    AxState(state): AxState<AppState>,
    CallerUser { user, login_id }: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let secret = user.secret_or("Secret not found")?;
    if !user.enrolled() {
        return Err(ApiError::bad_request("User not enrolled in MFA"));
    }
    let token = body_str(&body, "token").ok_or_else(|| ApiError::bad_request("Missing token"))?;
    caller_attempt(&state, login_id.as_deref(), &user, &secret, &token).await?;
    let rotated = new_secret();
    update_user(&state, user.id(), |current, obj| {
        if current.secret() != Some(secret.as_str()) {
            return Err(ApiError::bad_request("Secret not found"));
        }
        obj.insert("mfaEnrolled".into(), Value::Bool(false));
        obj.insert("mfaSecret".into(), Value::String(rotated.clone()));
        Ok(())
    })
    .await?;
    // Weaker credentials from now on: every session signed in under the old ones ends.
    let user_ref = format!("User/{}", user.id());
    SecurityEvent::new(SecurityEventKind::MfaDisabled)
        .subject(&user_ref)
        .emit();
    revoke_sessions_of(&state, &user_ref, None).await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// `POST /auth/mfa/verify {login, token}`: the sign-in step, then the usual login result.
pub async fn verify(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    sign_in_code(&state, &body, SignInCode::Verify).await
}

/// `POST /auth/mfa/login-enroll {login, token}` (no bearer: the Login is the credential).
pub async fn login_enroll_handler(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    sign_in_code(&state, &body, SignInCode::Enroll).await
}

/// `{login, token}`: the code checked on the Login, then the answer `/auth/login` would give now.
async fn sign_in_code(
    state: &State,
    body: &Map<String, Value>,
    step: SignInCode,
) -> Result<Response, ApiError> {
    let (login, token) = login_and(body, "token", "Missing token")?;
    let login = step.check(state, &login, &token).await?;
    login_response(state, login).await
}
