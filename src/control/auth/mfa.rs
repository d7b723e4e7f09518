//! MFA endpoints (docs/medplum-compat.md §10): `GET /auth/mfa/status`, `POST /auth/mfa/enroll`,
//! `/auth/mfa/verify`, `/auth/mfa/login-enroll` and `/auth/mfa/disable`; the rules are
//! `login::mfa`'s.

use axum::extract::{FromRequestParts, State as AxState};
use axum::http::request::Parts;
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::{Map, Value, json};

use crate::state::State;
use crate::store::now_unix;

use crate::control::base::access::Caller;
use crate::control::base::users::revoke_sessions_of;
use crate::control::login::flow::login_response;
use crate::control::login::mfa::Accept;
use crate::control::login::mfa::Factor;
use crate::control::login::mfa::MfaUser;
use crate::control::login::mfa::SignInCode;
use crate::control::login::mfa::add_method;
use crate::control::login::mfa::allowed_methods;
use crate::control::login::mfa::caller_attempt;
use crate::control::login::mfa::destination;
use crate::control::login::mfa::destinations;
use crate::control::login::mfa::enroll_details;
use crate::control::login::mfa::ensure_secret;
use crate::control::login::mfa::push_method;
use crate::control::login::mfa::read_user;
use crate::control::login::mfa::remove_methods;
use crate::control::login::mfa::require_allowed;
use crate::control::login::mfa::send_code;
use crate::control::login::mfa::send_to;
use crate::control::login::mfa::start_code_enrolment;
use crate::control::login::mfa::update_user;
use crate::control::login::otp;
use crate::control::login::otp::Channel;
use crate::control::login::otp::Pending;
use crate::control::login::otp::mask_phone;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::get_login;
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
    project_id: String,
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
            project_id: caller.project.id.clone(),
        })
    }
}

/// `GET /auth/mfa/status`.
pub async fn status(
    AxState(state): AxState<AppState>,
    CallerUser {
        user, project_id, ..
    }: CallerUser,
) -> Result<Response, ApiError> {
    let methods = user.methods();
    let mut out = json!({
        "enrolled": user.enrolled(),
        "enrolledMethods": methods,
        "allowedMethods": allowed_methods(&state, Some(&project_id)),
        "email": user.email(),
    });
    if let Some(phone) = user.phone() {
        out["phone"] = Value::String(mask_phone(phone));
    }
    if !methods.iter().any(|m| m == "totp") {
        let user = ensure_secret(&state, user).await?;
        let secret = user
            .secret()
            .ok_or_else(|| ApiError::internal("MFA status", "secret missing after creation"))?;
        let (uri, qr) = enroll_details(user.email(), secret)?;
        out["enrollUri"] = Value::String(uri);
        out["enrollQrCode"] = Value::String(qr);
    }
    Ok(ok_json(&out))
}

/// The `method` of a body: `totp` unless it names another known one (Medplum's parsing).
fn method_of(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body_str(body, "method").as_deref() {
        None | Some("totp") => Ok("totp".into()),
        Some(m @ ("email" | "sms")) => Ok(m.into()),
        Some(_) => Err(ApiError::bad_request("Invalid method")),
    }
}

/// `POST /auth/mfa/send-email {login}` and `/auth/mfa/send-sms {login}` (no bearer: the Login is
/// the credential): a new code for a sign-in, to an enrolled method or the one being enrolled.
pub async fn send_email(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    send_sign_in_code(&state, &body, Channel::Email).await
}

pub async fn send_sms(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    send_sign_in_code(&state, &body, Channel::Sms).await
}

async fn send_sign_in_code(
    state: &State,
    body: &Map<String, Value>,
    channel: Channel,
) -> Result<Response, ApiError> {
    let login_id =
        body_str(body, "login").ok_or_else(|| ApiError::invalid("login", "Missing login"))?;
    let login = get_login(state, &login_id).await?;
    send_code(state, &login, channel).await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// `POST /auth/mfa/send-email-challenge` and `/auth/mfa/send-sms-challenge {phone?}` (bearer):
/// a code on the caller's own session, to enrol that method (`/auth/mfa/enroll`) or to prove
/// presence (`/auth/mfa/disable`).
pub async fn send_email_challenge(
    AxState(state): AxState<AppState>,
    caller: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    send_challenge(&state, caller, &body, Channel::Email).await
}

pub async fn send_sms_challenge(
    AxState(state): AxState<AppState>,
    caller: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    send_challenge(&state, caller, &body, Channel::Sms).await
}

async fn send_challenge(
    state: &State,
    CallerUser {
        user,
        login_id,
        project_id,
    }: CallerUser,
    body: &Map<String, Value>,
    channel: Channel,
) -> Result<Response, ApiError> {
    let login_id = login_id.ok_or_else(ApiError::forbidden)?;
    let login = get_login(state, &login_id).await?;
    let enrolled = user.methods().iter().any(|m| m == channel.as_str());
    if !enrolled {
        require_allowed(state, Some(&project_id), channel.as_str())?;
        require_fresh_sign_in(state, Some(&login_id), &user).await?;
    }
    let phone = body_str(body, "phone");
    let to = destination(
        &user,
        channel,
        if enrolled { None } else { phone.as_deref() },
    )?;
    send_to(state, &login, channel, &to, !enrolled).await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// Seconds after a sign-in during which its session may add an MFA method to a user who has one.
const RECENT_SIGN_IN: i64 = 15 * 60;

/// A user who already has a second factor adds another only from a fresh sign-in that passed
/// MFA: a stolen (or forgotten, open) session must not be able to plant its own factor.
async fn require_fresh_sign_in(
    state: &State,
    login_id: Option<&str>,
    user: &MfaUser,
) -> Result<(), ApiError> {
    if user.methods().is_empty() {
        return Ok(());
    }
    let login_id = login_id.ok_or_else(ApiError::forbidden)?;
    let login = get_login(state, login_id).await?;
    let fresh =
        login.auth_time >= now_unix() - RECENT_SIGN_IN && LoginFlow::of(&login).mfa_verified;
    if fresh {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "Sign in again (with your current verification method) to add another",
        ))
    }
}

/// `POST /auth/mfa/enroll {token}`.
pub async fn enroll(
    AxState(state): AxState<AppState>,
    CallerUser {
        user,
        login_id,
        project_id,
    }: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let method = method_of(&body)?;
    if user.methods().contains(&method) {
        return Err(ApiError::bad_request("Already enrolled"));
    }
    require_allowed(&state, Some(&project_id), &method)?;
    require_fresh_sign_in(&state, login_id.as_deref(), &user).await?;
    let token =
        body_str(&body, "token").ok_or_else(|| ApiError::invalid("token", "Missing token"))?;
    if method != "totp" {
        // The code of `send-*-challenge`, sent on this session to the method being enrolled.
        let login_id = login_id.as_deref().ok_or_else(ApiError::forbidden)?;
        let login = get_login(&state, login_id).await?;
        let Some(pending) = Pending::of(&login).filter(|p| p.channel.as_str() == method) else {
            return Err(ApiError::bad_request("Send a code to this method first"));
        };
        let expected: Vec<String> = user
            .pending_address(&pending)
            .map(|to| otp::destination_hash(&state, to))
            .into_iter()
            .collect();
        let accept = Accept {
            secret: None,
            destinations: &expected,
        };
        match caller_attempt(&state, Some(login_id), &user, &accept, &token).await? {
            Factor::Sent(channel) if channel == pending.channel => {}
            _ => return Err(ApiError::bad_request("Invalid token")),
        }
        add_method(&state, &user, &method, pending.phone.as_deref()).await?;
        return Ok(outcome_response(&Outcome::AllOk));
    }
    let secret = user.secret_or("Secret not found")?;
    let accept = Accept {
        secret: Some(&secret),
        destinations: &[],
    };
    caller_attempt(&state, login_id.as_deref(), &user, &accept, &token).await?;
    update_user(&state, user.id(), |current, obj| {
        if current.methods().iter().any(|m| m == "totp") {
            return Err(ApiError::bad_request("Already enrolled"));
        }
        if current.secret() != Some(secret.as_str()) {
            return Err(ApiError::bad_request("Secret not found"));
        }
        obj.insert("mfaEnrolled".into(), Value::Bool(true));
        push_method(obj, &current.methods(), "totp");
        Ok(())
    })
    .await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// `POST /auth/mfa/preferred {method}` (fhirgate's): the method whose code a sign-in asks for
/// first (and, for e-mail and SMS, sends on its own).
pub async fn preferred(
    AxState(state): AxState<AppState>,
    CallerUser { user, .. }: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let method = method_of(&body)?;
    update_user(&state, user.id(), |current, obj| {
        let mut methods = current.methods();
        let Some(i) = methods.iter().position(|m| *m == method) else {
            return Err(ApiError::bad_request("User not enrolled in MFA method"));
        };
        let chosen = methods.remove(i);
        methods.insert(0, chosen);
        obj.insert("mfaMethod".into(), json!(methods));
        Ok(())
    })
    .await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// `POST /auth/mfa/disable {token}`: un-enrolls and rotates the secret, so a new enrolment
/// needs a new authenticator entry.
pub async fn disable(
    AxState(state): AxState<AppState>,
    CallerUser { user, login_id, .. }: CallerUser,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let methods = user.methods();
    let totp = methods.iter().any(|m| m == "totp");
    let secret = user.secret().map(str::to_string);
    // Medplum's order: no secret at all comes first (a user with only sent-code methods has
    // none to need).
    if secret.is_none() && methods.iter().all(|m| m == "totp") {
        return Err(ApiError::bad_request("Secret not found"));
    }
    if !user.enrolled() || methods.is_empty() {
        return Err(ApiError::bad_request("User not enrolled in MFA"));
    }
    let only = match body.get("method") {
        None | Some(Value::Null) => None,
        Some(_) => Some(method_of(&body)?),
    };
    if only.as_ref().is_some_and(|m| !methods.contains(m)) {
        return Err(ApiError::bad_request("User not enrolled in MFA method"));
    }
    let token = body_str(&body, "token").ok_or_else(|| ApiError::bad_request("Missing token"))?;
    // A TOTP code, or a code sent on this session to where one of the user's methods sends.
    let secret = secret.filter(|_| totp);
    let enrolled = destinations(&state, &user, &methods);
    let accept = Accept {
        secret: secret.as_deref(),
        destinations: &enrolled,
    };
    caller_attempt(&state, login_id.as_deref(), &user, &accept, &token).await?;
    update_user(&state, user.id(), |current, obj| {
        // The code was checked against this secret: it must still be the one stored.
        if secret
            .as_deref()
            .is_some_and(|s| current.secret() != Some(s))
        {
            return Err(ApiError::bad_request("Secret not found"));
        }
        remove_methods(obj, current, only.as_deref());
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
    let method = method_of(&body)?;
    let Some(channel) = Channel::parse(&method) else {
        return sign_in_code(&state, &body, SignInCode::Enroll).await;
    };
    // E-mail or SMS: the method is remembered on the Login and a code sent to it; verifying
    // that code (`/auth/mfa/verify`) enrols the user and completes the sign-in.
    let login_id =
        body_str(&body, "login").ok_or_else(|| ApiError::invalid("login", "Missing login"))?;
    let login = get_login(&state, &login_id).await?;
    let phone = body_str(&body, "phone");
    start_code_enrolment(&state, &login, channel, phone.as_deref()).await?;
    let login = get_login(&state, &login_id).await?;
    login_response(&state, login).await
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
