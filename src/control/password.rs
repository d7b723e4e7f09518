//! Passwords and one-time links (medplum-auth.md §2.10, §11): `/auth/setpassword` (JSON, and the
//! server-rendered page the invite and reset e-mails link to), `/auth/resetpassword`,
//! `/auth/changepassword`, `/auth/verifyemail`, and the admins' `setpassword`.
//!
//! A link is a security request id plus a secret; only a keyed hash of the secret is stored
//! (`security_requests`), links expire (reset 1 h, invite and verify-email 7 days), a new link
//! supersedes the user's older unused ones of the same kind, and redemption is a
//! compare-and-swap in the same transaction as the password change, so a link works once even
//! when two instances see it at the same moment.
//!
//! Breached-password check (HaveIBeenPwned in Medplum): fhirgate has no network to ask, so
//! [`breached`] is the hook that says no; the texts and expressions of its refusals are wired.

use std::sync::{Arc, LazyLock};

use axum::extract::{Path, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::{Map, Value};

use super::access::{authenticate, authenticate_admin};
use super::error::outcome_response;
use super::index::index_rows;
use super::login::{auth_body, body_str, find_user, read_user, valid_email, verify_password};
use super::{ApiError, media_type};
use crate::state::State;
use crate::store::{BatchWrite, SecurityRequest, StoreError, StoredResource, now_unix};
use crate::tokens::{hashes_equal, random_hex};

/// Passwords are at least this many characters long…
pub const MIN_PASSWORD_CHARS: usize = 8;
/// …and at most this many bytes (Medplum's bcrypt limit, kept as the one rule everywhere).
pub const MAX_PASSWORD_BYTES: usize = 72;

pub const TOO_SHORT: &str = "Invalid password, must be at least 8 characters";
pub const OUT_OF_RANGE: &str = "Password must be between 8 and 72 characters";
pub const BREACHED: &str = "Password found in breach database";

/// How often a write that lost a race with another writer of the same User is retried.
const WRITE_ATTEMPTS: usize = 3;

/// The kinds of one-time link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Invite,
    Reset,
    VerifyEmail,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Invite => "invite",
            LinkKind::Reset => "reset",
            LinkKind::VerifyEmail => "verify-email",
        }
    }

    /// Seconds a link of this kind stays valid.
    pub fn lifetime(self) -> i64 {
        match self {
            LinkKind::Reset => 3600,
            LinkKind::Invite | LinkKind::VerifyEmail => 7 * 24 * 3600,
        }
    }
}

/// A new link: the row to store (in the caller's batch) and the URL to send.
pub struct NewLink {
    pub request: SecurityRequest,
    pub url: String,
}

/// The one place the link format lives: `<base_url>auth/setpassword/<id>/<secret>` (Medplum's
/// app path `setpassword/<id>/<secret>`, under `/auth/` so the gateway routes it to the
/// control API), or `…auth/verifyemail/…` for e-mail verification.
pub fn link_url(base_url: &str, kind: LinkKind, id: &str, secret: &str) -> String {
    let page = match kind {
        LinkKind::Invite | LinkKind::Reset => "setpassword",
        LinkKind::VerifyEmail => "verifyemail",
    };
    format!("{base_url}auth/{page}/{id}/{secret}")
}

/// Makes a link for `user_id`; nothing is stored yet.
pub fn new_link(
    state: &State,
    kind: LinkKind,
    user_id: &str,
    redirect_uri: Option<String>,
) -> NewLink {
    let id = uuid::Uuid::new_v4().to_string();
    let secret = random_hex(16);
    let now = now_unix();
    let url = link_url(&state.config.base_url, kind, &id, &secret);
    NewLink {
        request: SecurityRequest {
            id,
            kind: kind.as_str().to_string(),
            user_id: user_id.to_string(),
            secret_hash: state.hash_secret(&secret),
            redirect_uri,
            created_at: now,
            expires_at: now.saturating_add(kind.lifetime()),
            used: false,
        },
        url,
    }
}

/// The length rules for a new password. `field` is the expression of the validation error.
pub fn check_new_password(field: &str, password: &str) -> Result<(), ApiError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::invalid(field, TOO_SHORT));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid(field, OUT_OF_RANGE));
    }
    Ok(())
}

/// A new password: the length rules, then the breached-password check (when configured).
pub async fn check_password(state: &State, field: &str, password: &str) -> Result<(), ApiError> {
    check_new_password(field, password)?;
    super::guards::check_not_breached(state, field, password).await
}

/// An argon2id PHC string, computed off the async threads (argon2 is slow on purpose).
pub async fn hash_password(password: &str) -> Result<String, ApiError> {
    let password = password.to_string();
    tokio::task::spawn_blocking(move || super::bootstrap::hash_password(&password))
        .await
        .map_err(|e| ApiError::internal("password hashing task", e))?
        .map_err(|e| ApiError::internal("password hashing", e))
}

fn ok() -> Response {
    outcome_response(&Outcome::AllOk)
}

fn user_put(user: &StoredResource) -> BatchWrite {
    BatchWrite::Put {
        index: index_rows(&user.content),
        content: user.content.clone(),
        project_id: user.project_id.clone(),
        expected_version: Some(user.version_id.clone()),
        create_only: false,
    }
}

/// Changes a User (read fresh, `change` applied, written with a version check), together with
/// `also` in one transaction; retried when another writer changed the User in between.
async fn update_user(
    state: &State,
    user_id: &str,
    also: impl Fn() -> Vec<BatchWrite>,
    change: impl Fn(&mut Map<String, Value>),
) -> Result<(), ApiError> {
    for _ in 0..WRITE_ATTEMPTS {
        let mut user = state
            .store
            .read("User", user_id)
            .await?
            .ok_or_else(ApiError::not_found)?;
        if let Some(obj) = user.content.as_object_mut() {
            change(obj);
        }
        let mut writes = also();
        writes.push(user_put(&user));
        match state.store.write_batch(writes).await {
            Ok(_) => return Ok(()),
            Err(StoreError::VersionConflict) => continue,
            // The only unique step of these batches is a link's redemption: another one won.
            Err(StoreError::Conflict) => return Err(ApiError::bad_request("Already used")),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict("User changed; try again"))
}

// === /auth/setpassword and its page ===

/// Why a link cannot be used, in Medplum's order and texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkProblem {
    NotFound,
    AlreadyUsed,
    WrongType,
    IncorrectSecret,
    Expired,
}

impl LinkProblem {
    fn error(self, wrong_type_text: &'static str) -> ApiError {
        match self {
            LinkProblem::NotFound => ApiError::not_found(),
            LinkProblem::AlreadyUsed => ApiError::bad_request("Already used"),
            LinkProblem::WrongType => ApiError::bad_request(wrong_type_text),
            LinkProblem::IncorrectSecret => ApiError::bad_request("Incorrect secret"),
            LinkProblem::Expired => ApiError::bad_request("Security request expired"),
        }
    }
}

/// Finds the request `id` and checks it can set a password (`setpassword`) or verify an
/// e-mail address.
async fn usable_request(
    state: &State,
    id: &str,
    secret: &str,
    verify_email: bool,
) -> Result<Result<SecurityRequest, LinkProblem>, ApiError> {
    let Some(request) = state.store.security_request(id).await? else {
        return Ok(Err(LinkProblem::NotFound));
    };
    let is_verify = request.kind == LinkKind::VerifyEmail.as_str();
    if verify_email {
        if !is_verify {
            return Ok(Err(LinkProblem::WrongType));
        }
        if request.used {
            return Ok(Err(LinkProblem::AlreadyUsed));
        }
    } else {
        if request.used {
            return Ok(Err(LinkProblem::AlreadyUsed));
        }
        if is_verify {
            return Ok(Err(LinkProblem::WrongType));
        }
    }
    if !hashes_equal(&request.secret_hash, &state.hash_secret(secret)) {
        return Ok(Err(LinkProblem::IncorrectSecret));
    }
    if request.expires_at <= now_unix() {
        return Ok(Err(LinkProblem::Expired));
    }
    Ok(Ok(request))
}

/// Redeems a link: one transaction marks it used (compare-and-swap) and applies `change` to its
/// User.
async fn redeem(
    state: &State,
    request: &SecurityRequest,
    change: impl Fn(&mut Map<String, Value>),
) -> Result<(), ApiError> {
    let write = || {
        vec![BatchWrite::RedeemSecurityRequest {
            id: request.id.clone(),
            now: now_unix(),
        }]
    };
    update_user(state, &request.user_id, write, change).await
}

/// Sets the password through a link, and `emailVerified` (the link reached the address).
async fn redeem_set_password(
    state: &State,
    request: &SecurityRequest,
    password: &str,
) -> Result<(), ApiError> {
    let hash = hash_password(password).await?;
    redeem(state, request, |user| {
        user.insert("passwordHash".into(), Value::String(hash.clone()));
        user.insert("emailVerified".into(), Value::Bool(true));
    })
    .await
}

/// The `id` and `secret` of a link, validated in Medplum's order.
fn link_fields(body: &Map<String, Value>) -> Result<(String, String), ApiError> {
    let id = body_str(body, "id").filter(|id| uuid::Uuid::parse_str(id).is_ok());
    let id = id.ok_or_else(|| ApiError::invalid("id", "Invalid request ID"))?;
    let secret =
        body_str(body, "secret").ok_or_else(|| ApiError::invalid("secret", "Missing secret"))?;
    Ok((id, secret))
}

/// The fields of a set-password request, validated in Medplum's order.
fn set_password_fields(body: &Map<String, Value>) -> Result<(String, String, String), ApiError> {
    let (id, secret) = link_fields(body)?;
    let password = body_str(body, "password").unwrap_or_default();
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::invalid("password", TOO_SHORT));
    }
    Ok((id, secret, password))
}

/// `POST /auth/setpassword`. A browser's form post (the page below) gets the page back; an API
/// call gets Medplum's JSON.
pub async fn set_password(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let from_page = wants_html(&parts);
    let body = auth_body(&parts, body).await?;
    if from_page {
        return Ok(set_password_from_page(&state, &body).await);
    }
    let (id, secret, password) = set_password_fields(&body)?;
    let request = usable_request(&state, &id, &secret, false)
        .await?
        .map_err(|p| p.error("Invalid request type"))?;
    check_password(&state, "password", &password).await?;
    redeem_set_password(&state, &request, &password).await?;
    Ok(ok())
}

/// A form post from a browser: form-encoded, asking for HTML.
fn wants_html(parts: &Parts) -> bool {
    media_type(&parts.headers).as_deref() == Some("application/x-www-form-urlencoded")
        && parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

async fn set_password_from_page(state: &State, body: &Map<String, Value>) -> Response {
    let id = body_str(body, "id").unwrap_or_default();
    let secret = body_str(body, "secret").unwrap_or_default();
    let password = body_str(body, "password").unwrap_or_default();
    let confirm = body_str(body, "confirmPassword").unwrap_or_default();
    let form = |status: StatusCode, error: &str| {
        page(
            status,
            &state.config.base_url,
            PageView::Form {
                id: &id,
                secret: &secret,
                error: Some(error),
            },
        )
    };
    if uuid::Uuid::parse_str(&id).is_err() || secret.is_empty() {
        return page(
            StatusCode::BAD_REQUEST,
            &state.config.base_url,
            PageView::Invalid,
        );
    }
    let request = match usable_request(state, &id, &secret, false).await {
        Ok(Ok(r)) => r,
        Ok(Err(problem)) => return invalid_link_page(state, problem),
        Err(e) => return e.into_response(),
    };
    if password != confirm {
        return form(StatusCode::BAD_REQUEST, "Passwords do not match");
    }
    match check_password(state, "password", &password).await {
        Ok(()) => {}
        Err(ApiError::Invalid { text, .. }) => return form(StatusCode::BAD_REQUEST, &text),
        Err(other) => return other.into_response(),
    }
    match redeem_set_password(state, &request, &password).await {
        Ok(()) => page(StatusCode::OK, &state.config.base_url, PageView::Done),
        Err(ApiError::Outcome(Outcome::BadRequest(_))) => {
            invalid_link_page(state, LinkProblem::AlreadyUsed)
        }
        Err(e) => e.into_response(),
    }
}

fn invalid_link_page(state: &State, problem: LinkProblem) -> Response {
    let status = match problem {
        LinkProblem::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    let view = match problem {
        LinkProblem::AlreadyUsed => PageView::Used,
        LinkProblem::Expired => PageView::Expired,
        _ => PageView::Invalid,
    };
    page(status, &state.config.base_url, view)
}

/// `GET /auth/setpassword/:id/:secret`: the page the e-mails link to.
pub async fn set_password_page(
    AxState(state): AxState<Arc<State>>,
    Path((id, secret)): Path<(String, String)>,
) -> Response {
    if uuid::Uuid::parse_str(&id).is_err() || secret.is_empty() {
        return page(
            StatusCode::NOT_FOUND,
            &state.config.base_url,
            PageView::Invalid,
        );
    }
    match usable_request(&state, &id, &secret, false).await {
        Ok(Ok(_)) => page(
            StatusCode::OK,
            &state.config.base_url,
            PageView::Form {
                id: &id,
                secret: &secret,
                error: None,
            },
        ),
        Ok(Err(problem)) => invalid_link_page(&state, problem),
        Err(e) => e.into_response(),
    }
}

enum PageView<'a> {
    Form {
        id: &'a str,
        secret: &'a str,
        error: Option<&'a str>,
    },
    Done,
    Used,
    Expired,
    Invalid,
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · fhirgate</title>
<style>
body{font-family:system-ui,sans-serif;background:#f4f6f8;color:#1b1f23;margin:0}
main{max-width:26rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002}
h1{font-size:1.4rem;margin-top:0}
label{display:block;font-weight:600;margin:1rem 0 .3rem}
input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;font-size:1rem;border:1px solid #8a949e;border-radius:4px}
input:focus,button:focus,a:focus{outline:3px solid #1f6feb;outline-offset:2px}
button{margin-top:1.5rem;width:100%;padding:.7rem;font-size:1rem;background:#1f6feb;color:#fff;border:0;border-radius:4px;cursor:pointer}
.hint{color:#4a545e;font-size:.9rem;margin:.3rem 0 0}
.error{color:#a40e26;background:#ffebe9;border:1px solid #ff8182;padding:.6rem;border-radius:4px}
</style>
</head>
<body>
<main>
<h1>{{ title }}</h1>
{% if view == "form" %}
{% if error %}<p class="error" role="alert" id="form-error">{{ error }}</p>{% endif %}
<form method="post" action="{{ base }}auth/setpassword">
<input type="hidden" name="id" value="{{ id }}">
<input type="hidden" name="secret" value="{{ secret }}">
<label for="password">New password</label>
<input type="password" id="password" name="password" autocomplete="new-password" required minlength="8" aria-describedby="password-hint{% if error %} form-error{% endif %}"{% if error %} aria-invalid="true"{% endif %} autofocus>
<p class="hint" id="password-hint">At least 8 characters.</p>
<label for="confirmPassword">Confirm new password</label>
<input type="password" id="confirmPassword" name="confirmPassword" autocomplete="new-password" required minlength="8">
<button type="submit">Set password</button>
</form>
{% else %}
<p{% if view != "done" %} role="alert"{% endif %}>{{ message }}</p>
{% endif %}
</main>
</body>
</html>
"#;

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    // `.html` names are auto-escaped: ids, secrets and error texts cannot inject markup.
    if let Err(e) = env.add_template("setpassword.html", PAGE) {
        tracing::error!(error = %e, "set-password page template is invalid");
    }
    env
});

fn page(status: StatusCode, base: &str, view: PageView<'_>) -> Response {
    let (kind, title, message) = match &view {
        PageView::Form { .. } => ("form", "Set your password", ""),
        PageView::Done => (
            "done",
            "Password set",
            "Your password has been set. You can now sign in with your e-mail address and the new password.",
        ),
        PageView::Used => (
            "used",
            "Link already used",
            "This link has already been used. Ask for a new password reset e-mail if you still need to set your password.",
        ),
        PageView::Expired => (
            "expired",
            "Link expired",
            "This link has expired. Ask for a new password reset e-mail.",
        ),
        PageView::Invalid => (
            "invalid",
            "Invalid link",
            "This link is not valid. Check that you copied the whole link from the e-mail.",
        ),
    };
    let (id, secret, error) = match view {
        PageView::Form { id, secret, error } => (id, secret, error),
        _ => ("", "", None),
    };
    let html = TEMPLATES.get_template("setpassword.html").and_then(|t| {
        t.render(minijinja::context! {
            view => kind, title => title, message => message, base => base,
            id => id, secret => secret, error => error,
        })
    });
    match html {
        Ok(html) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            html,
        )
            .into_response(),
        Err(e) => ApiError::internal("rendering the set-password page", e).into_response(),
    }
}

// === /auth/verifyemail ===

/// `POST /auth/verifyemail` (medplum-auth.md §2.10).
pub async fn verify_email(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body).await?;
    let (id, secret) = link_fields(&body)?;
    let request = usable_request(&state, &id, &secret, true)
        .await?
        .map_err(|p| p.error("Invalid user security request type"))?;
    redeem(&state, &request, |user| {
        user.insert("emailVerified".into(), Value::Bool(true));
    })
    .await?;
    Ok(ok())
}

// === /auth/resetpassword ===

/// `POST /auth/resetpassword`: always 200 All OK, whether or not the account exists; for one
/// that does, a reset link (1 h) is e-mailed in the background, so the answer takes as long
/// either way.
pub async fn reset_password(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body).await?;
    let email = body_str(&body, "email")
        .map(|e| e.trim().to_lowercase())
        .filter(|e| (3..=72).contains(&e.chars().count()) && valid_email(e));
    let email = email.ok_or_else(|| {
        ApiError::invalid(
            "email",
            "Valid email address between 3 and 72 characters is required",
        )
    })?;
    // A domain whose users sign in at an external provider has no passwords here to reset.
    if let Some((_, domain)) = email.rsplit_once('@')
        && super::external::domain_configuration(&state, domain)
            .await?
            .is_some_and(|c| c.get("identityProvider").is_some())
    {
        return Err(ApiError::bad_request(
            "Cannot reset password for external auth. Contact your system administrator.",
        ));
    }
    let remote_ip = super::client_ip(&state, &parts)?.map(|ip| ip.to_string());
    super::guards::check_recaptcha(&state, &body, remote_ip.as_deref()).await?;
    let project = body_str(&body, "projectId").filter(|p| p != "new");
    let redirect_uri = body_str(&body, "redirectUri")
        .filter(|u| url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https")));
    let send = !matches!(body.get("sendEmail"), Some(Value::Bool(false)));
    // Medplum looks in exactly one scope here: the project's users, or the server-scoped ones.
    let user = state
        .store
        .users_by_email(&email, project.as_deref())
        .await?
        .into_iter()
        .next();
    if let Some(user) = user {
        let link = new_link(&state, LinkKind::Reset, &user.id, redirect_uri);
        state
            .store
            .write_batch(vec![BatchWrite::NewSecurityRequest(link.request)])
            .await?;
        if send {
            let email = crate::email::Email {
                to: email,
                subject: "fhirgate Password Reset".into(),
                body: reset_body(&link.url),
            };
            let state = state.clone();
            tokio::spawn(async move {
                // The outcome is logged by `send`; the caller learns nothing either way.
                let _ = crate::email::send(&state.config, &email).await;
            });
        }
    }
    Ok(ok())
}

fn reset_body(url: &str) -> String {
    format!(
        "Someone requested to reset your fhirgate password.\n\n\
         To reset your password, please click on the following link (it works once, for one hour):\n\n\
         {url}\n\n\
         If you received this in error, you can safely ignore it.\n\n\
         Thank you,\nfhirgate\n"
    )
}

// === /auth/changepassword ===

/// `POST /auth/changepassword` (authenticated): the caller's own password.
pub async fn change_password(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    let body = auth_body(&parts, body).await?;
    let old = body_str(&body, "oldPassword")
        .ok_or_else(|| ApiError::invalid("oldPassword", "Missing oldPassword"))?;
    let new = body_str(&body, "newPassword").unwrap_or_default();
    if new.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::invalid("newPassword", TOO_SHORT));
    }
    let user = read_user(&state, &caller.identity.user_ref)
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let Some(hash) = user.content.get("passwordHash").and_then(Value::as_str) else {
        return Err(ApiError::invalid(
            "oldPassword",
            "Existing password not set",
        ));
    };
    if !verify_password(hash, &old).await? {
        return Err(ApiError::invalid("oldPassword", "Incorrect password"));
    }
    check_password(&state, "newPassword", &new).await?;
    set_user_password(&state, &user.id, &new).await
}

// === admins ===

/// `POST /admin/projects/setpassword` (project admin): a project-scoped user of the caller's
/// project only.
pub async fn admin_set_password(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate_admin(&state, &parts).await?;
    let body = auth_body(&parts, body).await?;
    let (email, password) = email_and_password(&state, &body).await?;
    let user = state
        .store
        .users_by_email(&email, Some(caller.project_id()))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    set_user_password(&state, &user.id, &password).await
}

/// `POST /admin/super/setpassword` (super admin): any user, by e-mail and optional project.
pub async fn super_set_password(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    if !caller.super_admin() {
        return Err(ApiError::forbidden());
    }
    let body = auth_body(&parts, body).await?;
    let (email, password) = email_and_password(&state, &body).await?;
    let project = body_str(&body, "projectId");
    let user = find_user(&state, &email, project.as_deref())
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    set_user_password(&state, &user.id, &password).await
}

async fn email_and_password(
    state: &State,
    body: &Map<String, Value>,
) -> Result<(String, String), ApiError> {
    let email = body_str(body, "email")
        .map(|e| e.trim().to_lowercase())
        .filter(|e| valid_email(e))
        .ok_or_else(|| ApiError::invalid("email", "Valid email address is required"))?;
    let password = body_str(body, "password").unwrap_or_default();
    check_password(state, "password", &password).await?;
    Ok((email, password))
}

async fn set_user_password(
    state: &State,
    user_id: &str,
    password: &str,
) -> Result<Response, ApiError> {
    let hash = hash_password(password).await?;
    update_user(state, user_id, Vec::new, |u| {
        u.insert("passwordHash".into(), Value::String(hash.clone()));
    })
    .await?;
    Ok(ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_rules_follow_medplum_texts() {
        let text = |r: Result<(), ApiError>| match r {
            Err(ApiError::Invalid { text, expression }) => format!("{expression}: {text}"),
            Err(other) => format!("{other:?}"),
            Ok(()) => "ok".into(),
        };
        assert_eq!(
            text(check_new_password("password", "1234567")),
            format!("password: {TOO_SHORT}")
        );
        assert_eq!(text(check_new_password("password", "12345678")), "ok");
        assert_eq!(text(check_new_password("password", &"x".repeat(72))), "ok");
        assert_eq!(
            text(check_new_password("newPassword", &"x".repeat(73))),
            format!("newPassword: {OUT_OF_RANGE}")
        );
        // 8 characters but 24 bytes is fine; 25 three-byte characters (75 bytes) is not.
        assert_eq!(text(check_new_password("password", &"€".repeat(8))), "ok");
        assert_eq!(
            text(check_new_password("password", &"€".repeat(25))),
            format!("password: {OUT_OF_RANGE}")
        );
    }

    #[test]
    fn links_have_one_format() {
        assert_eq!(
            link_url("https://h.example/", LinkKind::Reset, "i", "s"),
            "https://h.example/auth/setpassword/i/s"
        );
        assert_eq!(
            link_url("https://h.example/", LinkKind::Invite, "i", "s"),
            "https://h.example/auth/setpassword/i/s"
        );
        assert_eq!(
            link_url("https://h.example/", LinkKind::VerifyEmail, "i", "s"),
            "https://h.example/auth/verifyemail/i/s"
        );
        assert_eq!(LinkKind::Reset.lifetime(), 3600);
        assert_eq!(LinkKind::Invite.lifetime(), 7 * 24 * 3600);
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let r = page(
            StatusCode::OK,
            "http://h/",
            PageView::Form {
                id: "\"><script>",
                secret: "s",
                error: Some("<b>x</b>"),
            },
        );
        assert_eq!(r.status(), StatusCode::OK);
        let html = futures_body(r);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>x</b>"), "{html}");
        assert!(html.contains("&lt;b&gt;x&lt;"), "{html}");
        // The base URL is escaped too (`/` as `&#x2f;`, which the browser decodes).
        assert!(
            html.contains(r#"action="http:&#x2f;&#x2f;h&#x2f;auth/setpassword""#),
            "{html}"
        );
        assert!(html.contains(r#"<label for="password">"#), "{html}");
    }

    fn futures_body(r: Response) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let bytes = rt
            .block_on(axum::body::to_bytes(r.into_body(), 1 << 20))
            .unwrap_or_else(|e| panic!("body: {e}"));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
