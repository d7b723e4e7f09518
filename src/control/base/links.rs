//! One-time links (docs/medplum-compat.md §11): a security request id plus a secret, of which only a
//! keyed hash is stored; links expire, and are redeemed by compare-and-swap in the same
//! transaction as the change they make.

use crate::state::State;
use crate::store::{BatchWrite, SecurityRequest, now_unix};
use crate::tokens::{hashes_equal, random_hex};
use serde_json::{Map, Value};

use crate::control::base::passwords::hash_password;
use crate::control::base::users::update_user;
use crate::control::web::error::ApiError;

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

/// Why a link cannot be used, in Medplum's order and texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkProblem {
    NotFound,
    AlreadyUsed,
    WrongType,
    IncorrectSecret,
    Expired,
}

impl LinkProblem {
    pub(crate) fn error(self, wrong_type_text: &'static str) -> ApiError {
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
pub(crate) async fn usable_request(
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
pub(crate) async fn redeem(
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
pub(crate) async fn redeem_set_password(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
