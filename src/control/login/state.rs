//! A Login's flow state (docs/medplum-compat.md §1.5): the keys it keeps in `LoginRecord.extra`, what
//! a sign-in asked for, the readiness rule of a code, and reading, saving and revoking a Login.

use crate::state::State;
use crate::store::LoginRecord;
use serde::Serialize;
use serde_json::{Map, Value};
use std::net::IpAddr;

use crate::control::web::error::ApiError;

/// An authorization code is good for this many seconds (docs/contract.md §2: at most 10 minutes).
pub const CODE_LIFETIME: i64 = 600;

/// A Login that has issued no token yet may be continued (MFA, profile, scope) this long.
pub const PENDING_LIFETIME: i64 = 3600;

/// The `code` column of a redeemed Login: this prefix and the code's hash, so that a replayed
/// code still finds its Login (and revokes it).
pub const GRANTED_PREFIX: &str = "g:";

/// Keys of `LoginRecord.extra` (shared with the page, MFA and registration modules).
pub mod keys {
    pub const CODE_CHALLENGE: &str = "codeChallenge";
    pub const CODE_CHALLENGE_METHOD: &str = "codeChallengeMethod";
    pub const NONCE: &str = "nonce";
    pub const REDIRECT_URI: &str = "redirectUri";
    pub const LAUNCH: &str = "launch";
    pub const GRANTED: &str = "granted";
    pub const MFA_REQUIRED: &str = "mfaRequired";
    pub const MFA_VERIFIED: &str = "mfaVerified";
    pub const MFA_ENROLL_REQUIRED: &str = "mfaEnrollRequired";
    pub const SCOPE_GRANTED: &str = "scopeGranted";
    pub const PROFILE_SET: &str = "profileSet";
    pub const COOKIE: &str = "cookie";
    pub const REMEMBER: &str = "remember";
    pub const USER_AGENT: &str = "userAgent";
    /// The profile type the membership must have (`resourceType` of `/auth/login`).
    pub const PROFILE_TYPE: &str = "profileType";
    /// Offline access was asked for (`offline`, `offline_access` or `remember`) and is allowed:
    /// the code exchange then creates a refresh secret.
    pub const OFFLINE: &str = "offline";
    /// Unix seconds after which the current code is refused.
    pub const CODE_EXPIRES_AT: &str = "codeExpiresAt";
}

/// The flow state a new Login starts with, stored as its `extra` under the keys of [`keys`], in
/// this order (the rows earlier versions wrote have the same shape). Later steps add to it
/// (`scopeGranted`, `profileSet`, the code's expiry, the page's keys, MFA attempts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginFlow {
    pub granted: bool,
    pub nonce: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_challenge: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_challenge_method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launch: Option<String>,
    /// Set by `/oauth2/authorize`: the code is then bound to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The profile type the membership must have.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_type: Option<String>,
    pub remember: bool,
    /// Offline access was asked for and is allowed: the code exchange creates a refresh secret.
    pub offline: bool,
    pub mfa_required: bool,
    pub mfa_verified: bool,
    pub mfa_enroll_required: bool,
}

impl LoginFlow {
    /// The state as a Login's `extra`.
    pub fn to_extra(&self) -> Value {
        // Strings and booleans only: serializing cannot fail.
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()))
    }
}

/// What `/auth/login` (or the sign-in page) received.
#[derive(Debug, Clone, Default)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    pub client_id: Option<String>,
    pub project_id: Option<String>,
    /// Profile type filter (`Patient`, `Practitioner`, …).
    pub resource_type: Option<String>,
    pub scope: Option<String>,
    pub nonce: Option<String>,
    pub launch: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub remember: bool,
    /// Set by `/oauth2/authorize`: the code is then bound to it.
    pub redirect_uri: Option<String>,
    /// The request's `Origin` header.
    pub origin: Option<String>,
    pub remote_address: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl LoginRequest {
    /// The requested scope, `openid` when none was asked for (Medplum's default).
    pub(crate) fn scope_or_openid(&self) -> String {
        self.scope
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "openid".to_string())
    }
}

pub fn flag(login: &LoginRecord, key: &str) -> bool {
    login
        .extra
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub fn extra_str<'a>(login: &'a LoginRecord, key: &str) -> Option<&'a str> {
    login
        .extra
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

pub fn set_extra(login: &mut LoginRecord, key: &str, value: Value) {
    if !login.extra.is_object() {
        login.extra = Value::Object(Map::new());
    }
    if let Some(obj) = login.extra.as_object_mut() {
        obj.insert(key.to_string(), value);
    }
}

/// Tokens have been issued from this Login (its code was redeemed, or it is a client
/// credentials Login).
pub fn is_granted(login: &LoginRecord) -> bool {
    flag(login, keys::GRANTED)
        || login
            .code
            .as_deref()
            .is_some_and(|c| c.starts_with(GRANTED_PREFIX))
}

/// The scope words ask for a refresh token.
pub fn wants_offline(scope: &str) -> bool {
    scope
        .split_ascii_whitespace()
        .any(|w| w == "offline" || w == "offline_access")
}

/// MFA is satisfied: not enrolled, or verified on this Login; and no enrolment is pending.
pub fn mfa_satisfied(login: &LoginRecord) -> bool {
    (!flag(login, keys::MFA_REQUIRED) || flag(login, keys::MFA_VERIFIED))
        && (!flag(login, keys::MFA_ENROLL_REQUIRED) || flag(login, keys::MFA_VERIFIED))
}

/// Why a Login cannot have a code yet, in the order it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Revoked,
    Granted,
    NoProfile,
    NoScope,
    MfaRequired,
}

impl NotReady {
    /// Medplum's text of the error that refuses the code.
    pub fn text(self) -> &'static str {
        match self {
            NotReady::Revoked => "Login revoked",
            NotReady::Granted => "Login granted",
            NotReady::NoProfile => "Profile not set",
            NotReady::NoScope => "Scope not set",
            NotReady::MfaRequired => "MFA verification required",
        }
    }
}

/// Why no code can be issued yet; `None` when one can.
pub fn not_ready(login: &LoginRecord) -> Option<NotReady> {
    if login.revoked {
        return Some(NotReady::Revoked);
    }
    if is_granted(login) {
        return Some(NotReady::Granted);
    }
    if login.membership_id.is_none() {
        return Some(NotReady::NoProfile);
    }
    if login.scope.trim().is_empty() {
        return Some(NotReady::NoScope);
    }
    if !mfa_satisfied(login) {
        return Some(NotReady::MfaRequired);
    }
    None
}

/// The keyed hash under which a code is stored and looked up.
pub fn code_hash(state: &State, code: &str) -> String {
    state.hash_secret(code)
}

/// A Login by id: 404 `not-found` when the id is not a UUID or nothing has it.
pub async fn get_login(state: &State, id: &str) -> Result<LoginRecord, ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::not_found());
    }
    state.store.login(id).await?.ok_or_else(ApiError::not_found)
}

/// `revoked` → "Login revoked", `granted` → "Login granted" (the `/auth/profile` and
/// `/auth/scope` checks).
pub fn ensure_pending(login: &LoginRecord) -> Result<(), ApiError> {
    if login.revoked {
        return Err(ApiError::bad_request("Login revoked"));
    }
    if is_granted(login) {
        return Err(ApiError::bad_request("Login granted"));
    }
    Ok(())
}

/// The `User/<id>` a Login belongs to, when it is a user's Login.
pub fn user_id(login: &LoginRecord) -> Option<&str> {
    login.user_ref.strip_prefix("User/")
}

/// Stores the flow state of a Login that has no tokens yet; a Login revoked in between is
/// refused.
pub async fn save_pending(state: &State, login: &LoginRecord) -> Result<(), ApiError> {
    if state.store.update_login(login).await? {
        Ok(())
    } else {
        Err(ApiError::bad_request("Login revoked"))
    }
}

/// Revokes a Login and makes the gateway see it at once; false when it does not exist.
pub async fn revoke(state: &State, login_id: &str) -> Result<bool, ApiError> {
    let found = state.store.revoke_login(login_id).await?;
    state
        .refresh()
        .await
        .map_err(|e| ApiError::internal("refreshing after a revocation", e))?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn login() -> LoginRecord {
        LoginRecord {
            id: "l".into(),
            user_ref: "User/u".into(),
            client_id: None,
            membership_id: Some("m".into()),
            project_id: Some("p".into()),
            scope: "openid".into(),
            auth_method: "password".into(),
            auth_time: 0,
            expires_at: 0,
            revoked: false,
            remote_address: None,
            code: None,
            refresh_secret: None,
            extra: json!({}),
        }
    }

    #[test]
    fn readiness_needs_membership_scope_and_mfa() {
        let mut l = login();
        assert_eq!(not_ready(&l), None);
        l.membership_id = None;
        assert_eq!(not_ready(&l), Some(NotReady::NoProfile));
        l = login();
        set_extra(&mut l, keys::MFA_REQUIRED, Value::Bool(true));
        assert_eq!(not_ready(&l), Some(NotReady::MfaRequired));
        set_extra(&mut l, keys::MFA_VERIFIED, Value::Bool(true));
        assert_eq!(not_ready(&l), None);
        l = login();
        set_extra(&mut l, keys::MFA_ENROLL_REQUIRED, Value::Bool(true));
        assert_eq!(not_ready(&l), Some(NotReady::MfaRequired));
        l = login();
        l.code = Some(format!("{GRANTED_PREFIX}abc"));
        assert_eq!(not_ready(&l), Some(NotReady::Granted));
        l = login();
        l.revoked = true;
        assert_eq!(not_ready(&l), Some(NotReady::Revoked));
    }
}
