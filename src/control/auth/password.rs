//! Passwords and one-time links (docs/medplum-compat.md §2.10, §11): `/auth/setpassword` (JSON, and the
//! page the invite and reset e-mails link to), `/auth/resetpassword`, `/auth/changepassword` and
//! `/auth/verifyemail`. Links are `base::links`'s.

use crate::store::BatchWrite;
use axum::extract::{Path, State as AxState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::{Map, Value};

use crate::control::base::access::Caller;
use crate::control::base::domains::domain_configuration;
use crate::control::base::guards::check_recaptcha;
use crate::control::base::links::LinkKind;
use crate::control::base::links::LinkProblem;
use crate::control::base::links::new_link;
use crate::control::base::links::redeem;
use crate::control::base::links::redeem_set_password;
use crate::control::base::links::usable_request;
use crate::control::base::passwords::MIN_PASSWORD_CHARS;
use crate::control::base::passwords::TOO_SHORT;
use crate::control::base::passwords::check_password;
use crate::control::base::passwords::owner_of;
use crate::control::base::passwords::set_user_password;
use crate::control::base::passwords::verify_password;
use crate::control::base::users::read_user;
use crate::control::base::users::valid_email;
use crate::control::web::AppState;
use crate::control::web::ControlState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::body::media_type;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;
use crate::control::web::pages::setpassword::PageView;
use crate::control::web::pages::setpassword::page;
use crate::password_policy::PasswordContext;
use crate::store::SecurityRequest;

fn ok() -> Response {
    outcome_response(&Outcome::AllOk)
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
    AxState(state): AxState<AppState>,
    headers: HeaderMap,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let from_page = wants_html(&headers);
    if from_page {
        return Ok(set_password_from_page(&state, &body).await);
    }
    let (id, secret, password) = set_password_fields(&body)?;
    let request = usable_request(&state, &id, &secret, false)
        .await?
        .map_err(|p| p.error("Invalid request type"))?;
    let owner = link_owner(&state, &request).await?;
    check_password(&state, "password", &password, owner).await?;
    redeem_set_password(&state, &request, &password).await?;
    Ok(ok())
}

/// The words the password of a link's User must not be built from.
async fn link_owner(
    state: &ControlState,
    request: &SecurityRequest,
) -> Result<PasswordContext, ApiError> {
    Ok(match state.store.read("User", &request.user_id).await? {
        Some(user) => owner_of(state, &user, None),
        None => PasswordContext::new(),
    })
}

/// A form post from a browser: form-encoded, asking for HTML.
fn wants_html(headers: &HeaderMap) -> bool {
    media_type(headers).as_deref() == Some("application/x-www-form-urlencoded")
        && headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

async fn set_password_from_page(state: &ControlState, body: &Map<String, Value>) -> Response {
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
    let owner = match link_owner(state, &request).await {
        Ok(owner) => owner,
        Err(e) => return e.into_response(),
    };
    match check_password(state, "password", &password, owner).await {
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

fn invalid_link_page(state: &ControlState, problem: LinkProblem) -> Response {
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
    AxState(state): AxState<AppState>,
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

/// `POST /auth/verifyemail` (docs/medplum-compat.md §2.10).
pub async fn verify_email(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
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

/// `POST /auth/resetpassword`: always 200 All OK, whether or not the account exists; for one
/// that does, a reset link (1 h) is e-mailed in the background, so the answer takes as long
/// either way.
pub async fn reset_password(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
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
        && domain_configuration(&state, domain)
            .await?
            .is_some_and(|c| c.get("identityProvider").is_some())
    {
        return Err(ApiError::bad_request(
            "Cannot reset password for external auth. Contact your system administrator.",
        ));
    }
    let remote_ip = client_ip(&state, &parts)?.map(|ip| ip.to_string());
    check_recaptcha(&state, &body, remote_ip.as_deref()).await?;
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

/// `POST /auth/changepassword` (authenticated): the caller's own password.
pub async fn change_password(
    AxState(state): AxState<AppState>,
    caller: Caller,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
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
    let owner = owner_of(&state, &user, Some(&caller.project.id));
    check_password(&state, "newPassword", &new, owner).await?;
    set_user_password(&state, &user.id, &new).await
}
