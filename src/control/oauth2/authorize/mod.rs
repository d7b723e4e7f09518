//! `GET|POST /oauth2/authorize` (docs/medplum-compat.md §2.12) with fhirgate's own sign-in page: where
//! Medplum redirects to its web app, fhirgate answers the browser itself, with server-rendered
//! forms posting back to the same URL, one step at a time:
//!
//! 1. the authorization request is checked in Medplum's order: client, then redirect URI (plain
//!    text 400 until the redirect URI is trusted), then 302 errors to the client;
//! 2. an existing browser session (the `medplum-<clientId>` cookie; an `id_token_hint` must name
//!    the same Login) is reused: `prompt=none` gets a new code at once, otherwise the consent page;
//!    `prompt=none` without a session gets `login_required`;
//! 3. otherwise the sign-in page: e-mail and password (→ `login::password_login`), then MFA
//!    (enrolment when required), the profile choice when the user has several memberships, the
//!    scope consent (boxes may be unticked), and finally a code (`login::issue_code`) on a 302 to
//!    the redirect URI with `state`, plus the session cookie.
//!
//! Every form carries a CSRF token: a random value in the `fhirgate-csrf` cookie that the form
//! repeats, and — once a Login exists — whose hash is stored in that Login, so a form only
//! works for its own Login in its own browser. The session cookie holds `<loginId>.<secret>`;
//! the Login keeps only the secret's keyed hash.

mod picker;
mod render;
mod request;
pub mod saml;
mod session;

use crate::control::login::external::ExternalLogin;
use crate::control::login::external::external_login;
use crate::control::login::flow::choose_profile;
use crate::control::login::flow::issue_code;
use crate::control::login::flow::password_login;
use crate::control::login::flow::scope_narrows;
use crate::control::login::flow::set_scope;
use crate::control::login::google::verify_google_credential;
use crate::control::login::mfa::SignInCode;
use crate::control::login::mfa::send_code;
use crate::control::login::mfa::start_code_enrolment;
use crate::control::login::otp::Channel;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::LoginRequest;
use crate::control::login::state::get_login;
use crate::control::login::state::is_granted;
use crate::control::login::state::keys;
use crate::control::login::state::mfa_satisfied;
use crate::control::login::state::revoke;
use crate::control::login::state::set_extra;
use crate::control::oauth2::authorize::picker::Picked;
use crate::control::oauth2::authorize::picker::needs_patient;
use crate::control::oauth2::authorize::picker::patient_page;
use crate::control::oauth2::authorize::picker::pick_patient;
use crate::control::oauth2::authorize::render::START_AGAIN;
use crate::control::oauth2::authorize::render::TOO_MANY;
use crate::control::oauth2::authorize::render::accept_form;
use crate::control::oauth2::authorize::render::inline_message;
use crate::control::oauth2::authorize::render::message_page;
use crate::control::oauth2::authorize::render::render_step;
use crate::control::oauth2::authorize::render::resume_consent_page;
use crate::control::oauth2::authorize::render::signin_page;
use crate::control::oauth2::authorize::request::AuthRequest;
use crate::control::oauth2::authorize::request::Params;
use crate::control::oauth2::authorize::request::Redirect;
use crate::control::oauth2::authorize::request::Refusal;
use crate::control::oauth2::authorize::request::check_request;
use crate::control::oauth2::authorize::request::login_client;
use crate::control::oauth2::authorize::request::redirect;
use crate::control::oauth2::authorize::session::SESSION_COOKIE_SECONDS;
use crate::control::oauth2::authorize::session::bind_csrf;
use crate::control::oauth2::authorize::session::csrf_matches;
use crate::control::oauth2::authorize::session::csrf_token;
use crate::control::oauth2::authorize::session::find_session;
use crate::control::oauth2::authorize::session::reopen;
use crate::control::oauth2::authorize::session::session_cookie_name;
use crate::control::oauth2::authorize::session::set_cookie;
use crate::control::web::AppState;
use crate::control::web::ControlState;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::store::{LoginRecord, now_unix};
use crate::tokens::{hashes_equal, random_hex};
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::Value;

pub async fn authorize(
    AxState(state): AxState<AppState>,
    parts: Parts,
    params: Params,
) -> Result<Response, ApiError> {
    match params.one("step") {
        None if params.count("step") == 0 => start(&state, &parts, &params).await,
        Some("signin") if parts.method == axum::http::Method::POST => {
            signin(&state, &parts, &params).await
        }
        Some("resume") if parts.method == axum::http::Method::POST => {
            resume(&state, &parts, &params).await
        }
        Some("google") if parts.method == axum::http::Method::POST => {
            google_signin(&state, &parts, &params).await
        }
        Some("sso") if parts.method == axum::http::Method::POST => {
            saml::start(&state, &parts, &params).await
        }
        // The IdP's Response came back through `/auth/saml/acs`, which sends the browser here.
        Some("saml") if parts.method == axum::http::Method::GET => {
            match saml::signed_in(&state, &parts, &params).await? {
                saml::SignedIn::CarryOn(login, csrf) => next_step(&state, *login, &csrf).await,
                saml::SignedIn::Answer(answer) => Ok(answer),
            }
        }
        Some(step) if parts.method == axum::http::Method::POST => {
            continue_step(&state, &parts, &params, step).await
        }
        _ => Ok(Refusal::Text("Invalid request").into_response()),
    }
}

/// The authorization request itself (GET, or POST without a step).
async fn start(state: &ControlState, parts: &Parts, p: &Params) -> Result<Response, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let session = if request.prompt("login") {
        None
    } else {
        find_session(state, parts, &request).await?
    };
    if request.prompt("none") {
        let reopened = match session {
            Some(login) => reopen(state, &login, &request).await?,
            None => None,
        };
        return Ok(match reopened {
            Some((_, code)) => redirect(
                &request.redirect_uri,
                &[("code", &code), ("state", &request.state)],
                &[],
            ),
            None => Refusal::Redirect(Redirect {
                redirect_uri: request.redirect_uri.clone(),
                error: "login_required",
                description: "Login required",
                state: request.state.clone(),
            })
            .into_response(),
        });
    }
    let csrf = csrf_token(state, parts);
    if let Some(login) = session
        && scope_narrows(&login.scope, &request.scope)
    {
        // Nothing changes until the person answers: the consent form carries the request.
        return resume_consent_page(state, &request, &csrf, None, StatusCode::OK);
    }
    signin_page(state, &request, &csrf, None, "", StatusCode::OK).await
}

/// `step=signin`: the e-mail and password form.
async fn signin(state: &ControlState, parts: &Parts, p: &Params) -> Result<Response, ApiError> {
    let email = p.one("email").unwrap_or_default().to_string();
    let (request, csrf) = match accept_form(state, parts, p, &email).await? {
        Ok(accepted) => accepted,
        Err(answer) => return Ok(answer),
    };
    let login_request = LoginRequest {
        email: email.clone(),
        password: p.one("password").unwrap_or_default().to_string(),
        client_id: Some(request.client.id.clone()),
        project_id: None,
        resource_type: None,
        remember: false,
        ask: request.ask(),
        // The page is fhirgate's own: the client's allowed origins are about its own front end.
        origin: None,
        remote_address: client_ip(state, parts)?,
        user_agent: user_agent(&parts.headers),
    };
    let login = match password_login(state, &login_request).await {
        Ok(l) => l,
        Err(e) => {
            let message = match inline_message(&e) {
                // Which half was wrong is not the browser's business.
                Some(m) if m == "User not found" => "Email or password is invalid".to_string(),
                Some(m) => m,
                None => return Err(e),
            };
            return signin_page(
                state,
                &request,
                &csrf,
                Some(message),
                &email,
                StatusCode::BAD_REQUEST,
            )
            .await;
        }
    };
    continue_signed_in(state, login, &request, &csrf).await
}

/// A Login the page just started (password or Google): it keeps the client's `state` and is
/// bound to this browser's CSRF token; then its next step.
async fn continue_signed_in(
    state: &ControlState,
    mut login: LoginRecord,
    request: &AuthRequest,
    csrf: &str,
) -> Result<Response, ApiError> {
    set_extra(
        &mut login,
        keys::AUTHORIZE_STATE,
        Value::String(request.state.clone()),
    );
    bind_csrf(state, &mut login, csrf).await?;
    next_step(state, login, csrf).await
}

/// `step=google`: the credential Google Identity Services gave the page's "Sign in with
/// Google" button, verified as `POST /auth/google` verifies it; then the same steps as after
/// a password (no MFA code: Google vouched for the person).
async fn google_signin(
    state: &ControlState,
    parts: &Parts,
    p: &Params,
) -> Result<Response, ApiError> {
    let (request, csrf) = match accept_form(state, parts, p, "").await? {
        Ok(accepted) => accepted,
        Err(answer) => return Ok(answer),
    };
    let refused = async |message: &str| {
        let message = Some(message.to_string());
        signin_page(state, &request, &csrf, message, "", StatusCode::BAD_REQUEST).await
    };
    let Some(google_client) = state.config.google.client_ids.first() else {
        return refused("Google sign-in is not available").await;
    };
    let credential = p.one("credential").unwrap_or_default();
    let person = match verify_google_credential(state, google_client, credential).await {
        Ok(person) => person,
        Err(ApiError::Outcome(Outcome::BadRequest(_))) => {
            return refused("Google sign-in failed").await;
        }
        Err(e) => return Err(e),
    };
    let external = ExternalLogin {
        auth_method: "google",
        email: Some(person.email),
        external_id: None,
        project_id: request.client.project_id.clone(),
        client: Some(&request.client),
        ask: request.ask(),
        remote_address: client_ip(state, parts)?,
        user_agent: user_agent(&parts.headers),
        force_first_membership: false,
        membership_id: None,
        bind_redirect_uri: true,
        own_mfa: false,
    };
    let login = match external_login(state, &external).await {
        Ok(l) => l,
        Err(e) => {
            return match inline_message(&e) {
                Some(m) if m == "User not found" => {
                    refused("No account uses this Google address").await
                }
                Some(m) => refused(&m).await,
                None => Err(e),
            };
        }
    };
    continue_signed_in(state, login, &request, &csrf).await
}

/// `GET /oauth2/google-signin.js`: the page's half of the Google button (a page may run no
/// inline script).
pub async fn google_script() -> Response {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        GOOGLE_SCRIPT,
    )
        .into_response()
}

const GOOGLE_SCRIPT: &str = include_str!("google-signin.js");

/// The steps after sign-in: the Login named by the form, in the browser that created it.
async fn continue_step(
    state: &ControlState,
    parts: &Parts,
    p: &Params,
    step: &str,
) -> Result<Response, ApiError> {
    let login = match p.one("login") {
        Some(id) => get_login(state, id).await.ok(),
        None => None,
    };
    let now = now_unix();
    let Some(login) = login.filter(|l| !l.revoked && l.expires_at > now && !is_granted(l)) else {
        return message_page(None, START_AGAIN, StatusCode::BAD_REQUEST);
    };
    let bound = csrf_matches(state, parts, p).filter(|token| {
        LoginFlow::of(&login)
            .csrf
            .is_some_and(|h| hashes_equal(&h, &state.hash_secret(token)))
    });
    let Some(csrf) = bound else {
        return message_page(
            login_client(state, &login).await.as_ref(),
            START_AGAIN,
            StatusCode::FORBIDDEN,
        );
    };
    let token = p.one("token").unwrap_or_default();
    match step {
        "mfa" | "enroll" => {
            let code = if step == "mfa" {
                SignInCode::Verify
            } else {
                SignInCode::Enroll
            };
            match code.check(state, &login.id, token).await {
                Ok(l) => next_step(state, l, &csrf).await,
                Err(e) => step_error(state, login, &csrf, e).await,
            }
        }
        // The code step's other buttons: a new code, or (enrolling) a method that sends codes.
        "send" | "enroll-method" => {
            let chosen = p
                .one(if step == "send" { "channel" } else { "method" })
                .and_then(Channel::parse);
            let done = match chosen {
                None => Err(ApiError::bad_request("Choose where the code goes")),
                Some(channel) if step == "send" => send_code(state, &login, channel).await,
                Some(channel) => {
                    let phone = p.one("phone").filter(|p| !p.is_empty());
                    start_code_enrolment(state, &login, channel, phone).await
                }
            };
            match done {
                Ok(()) => {
                    let login = get_login(state, &login.id).await?;
                    render_step(state, &login, &csrf, None, StatusCode::OK).await
                }
                Err(e) => step_error(state, login, &csrf, e).await,
            }
        }
        "profile" => {
            let ip = client_ip(state, parts)?;
            let chosen = p.one("profile").unwrap_or_default();
            match choose_profile(state, &login, chosen, ip).await {
                Ok(l) => next_step(state, l, &csrf).await,
                Err(e) => step_error(state, login, &csrf, e).await,
            }
        }
        "consent" => consent(state, login, &csrf, p).await,
        "patient" => {
            // Only the step it is: after MFA, the profile and consent, and only when the Login
            // still needs a patient (the picker lists people's names).
            let due = mfa_satisfied(&login)
                && login.membership_id.is_some()
                && !needs_consent(&login)
                && needs_patient(state, &login).await?;
            if !due {
                return message_page(None, START_AGAIN, StatusCode::BAD_REQUEST);
            }
            let picked = pick_patient(
                state,
                &login,
                p.one("decision"),
                p.one("q"),
                p.one("patient"),
            )
            .await?;
            match picked {
                Picked::Chosen(l) => next_step(state, *l, &csrf).await,
                Picked::Search(query) => {
                    patient_page(state, &login, &csrf, &query, None, StatusCode::OK).await
                }
                Picked::Refused(message) => {
                    let message = Some(message.to_string());
                    patient_page(state, &login, &csrf, "", message, StatusCode::BAD_REQUEST).await
                }
            }
        }
        _ => message_page(None, START_AGAIN, StatusCode::BAD_REQUEST),
    }
}

/// A failed step: the same page again with the message, or — when the Login is gone (too many
/// wrong codes revoke it) — a page saying to start again.
async fn step_error(
    state: &ControlState,
    login: LoginRecord,
    csrf: &str,
    e: ApiError,
) -> Result<Response, ApiError> {
    let Some(message) = inline_message(&e) else {
        return Err(e);
    };
    let fresh = get_login(state, &login.id).await?;
    if fresh.revoked {
        let message = if matches!(e, ApiError::Outcome(Outcome::TooManyRequests)) {
            TOO_MANY.to_string()
        } else {
            format!("{message}. {START_AGAIN}")
        };
        return message_page(
            login_client(state, &fresh).await.as_ref(),
            &message,
            StatusCode::BAD_REQUEST,
        );
    }
    render_step(state, &fresh, csrf, Some(message), StatusCode::BAD_REQUEST).await
}

/// What a consent form says.
enum Consent<'a> {
    Deny,
    /// The ticked scopes: each one asked for, at least one.
    Grant(Vec<&'a str>),
    /// The form again, with this message.
    Invalid(&'static str),
}

/// Reads a consent form for a request that asked for `requested`.
fn consent_answer<'a>(p: &'a Params, requested: &str) -> Consent<'a> {
    if p.one("decision") == Some("deny") {
        return Consent::Deny;
    }
    let mut chosen: Vec<&str> = Vec::new();
    for word in p.all("grant") {
        if !fhirgate_core::policy::scope::has_word(requested, word) {
            return Consent::Invalid("Invalid scope");
        }
        if !chosen.contains(&word) {
            chosen.push(word);
        }
    }
    if chosen.is_empty() {
        return Consent::Invalid("Choose at least one permission, or deny access.");
    }
    Consent::Grant(chosen)
}

/// Where the page's Login goes back to: its redirect URI and the client's `state`.
fn return_to(login: &LoginRecord) -> Result<(String, String), ApiError> {
    let flow = LoginFlow::of(login);
    let redirect_uri = flow
        .ask
        .redirect_uri
        .ok_or_else(|| ApiError::internal("sign-in page", "Login without redirect URI"))?;
    let client_state = flow.authorize_state.unwrap_or_default();
    Ok((redirect_uri, client_state))
}

/// `step=consent`: the ticked scopes (a subset of those asked for), or a denial, which ends
/// the Login.
async fn consent(
    state: &ControlState,
    login: LoginRecord,
    csrf: &str,
    p: &Params,
) -> Result<Response, ApiError> {
    let (redirect_uri, client_state) = return_to(&login)?;
    let chosen = match consent_answer(p, &login.scope) {
        Consent::Grant(chosen) => chosen,
        Consent::Deny => {
            revoke(state, &login.id).await?;
            return Ok(denied(&redirect_uri, &client_state));
        }
        Consent::Invalid(message) => {
            let message = Some(message.to_string());
            return render_step(state, &login, csrf, message, StatusCode::BAD_REQUEST).await;
        }
    };
    match set_scope(state, &login, &chosen.join(" ")).await {
        Ok(l) => next_step(state, l, csrf).await,
        Err(e) => step_error(state, login, csrf, e).await,
    }
}

fn denied(redirect_uri: &str, client_state: &str) -> Response {
    redirect(
        redirect_uri,
        &[
            ("error", "access_denied"),
            ("error_description", "Access denied"),
            ("state", client_state),
        ],
        &[],
    )
}

/// `step=resume`: consent for a new request in an existing session. The session is looked up
/// again (it may have ended since the page was shown); then it gets a new code with the
/// chosen scopes. A denial leaves the session as it was.
async fn resume(state: &ControlState, parts: &Parts, p: &Params) -> Result<Response, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let Some(csrf) = csrf_matches(state, parts, p) else {
        return message_page(Some(&request.client), START_AGAIN, StatusCode::FORBIDDEN);
    };
    let session = find_session(state, parts, &request)
        .await?
        .filter(|l| scope_narrows(&l.scope, &request.scope));
    let Some(session) = session else {
        return signin_page(
            state,
            &request,
            &csrf,
            Some("Your session has ended. Please sign in again.".into()),
            "",
            StatusCode::BAD_REQUEST,
        )
        .await;
    };
    let chosen = match consent_answer(p, &request.scope) {
        Consent::Grant(chosen) => chosen,
        // The session stays as it was.
        Consent::Deny => return Ok(denied(&request.redirect_uri, &request.state)),
        Consent::Invalid(message) => {
            let message = Some(message.to_string());
            return resume_consent_page(state, &request, &csrf, message, StatusCode::BAD_REQUEST);
        }
    };
    let Some((login, _)) = reopen(state, &session, &request).await? else {
        return message_page(Some(&request.client), START_AGAIN, StatusCode::CONFLICT);
    };
    let mut login = set_scope(state, &login, &chosen.join(" ")).await?;
    set_extra(
        &mut login,
        keys::CSRF,
        Value::String(state.hash_secret(&csrf)),
    );
    finish(state, login).await
}

/// Consent is asked for anything beyond a plain sign-in.
fn needs_consent(login: &LoginRecord) -> bool {
    !LoginFlow::of(login).scope_granted
        && login.scope.split_ascii_whitespace().any(|w| w != "openid")
}

/// The next page for a Login, or — when it is ready — the code.
async fn next_step(
    state: &ControlState,
    login: LoginRecord,
    csrf: &str,
) -> Result<Response, ApiError> {
    let ready = mfa_satisfied(&login) && login.membership_id.is_some() && !needs_consent(&login);
    if !ready {
        return render_step(state, &login, csrf, None, StatusCode::OK).await;
    }
    if needs_patient(state, &login).await? {
        return patient_page(state, &login, csrf, "", None, StatusCode::OK).await;
    }
    finish(state, login).await
}

/// The code, on a 302 to the redirect URI with the client's `state`, and the session cookie
/// whose secret's hash the Login keeps.
async fn finish(state: &ControlState, mut login: LoginRecord) -> Result<Response, ApiError> {
    let (redirect_uri, client_state) = return_to(&login)?;
    let secret = random_hex(32);
    set_extra(
        &mut login,
        keys::COOKIE,
        Value::String(state.hash_secret(&secret)),
    );
    let code = issue_code(state, &mut login).await?;
    let mut cookies = Vec::new();
    if let Some(client_id) = &login.client_id {
        cookies.push(set_cookie(
            state,
            session_cookie_name(client_id),
            format!("{}.{secret}", login.id),
            SESSION_COOKIE_SECONDS,
        ));
    }
    Ok(redirect(
        &redirect_uri,
        &[("code", &code), ("state", &client_state)],
        &cookies,
    ))
}

#[cfg(test)]
mod tests;
