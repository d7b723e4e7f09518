//! A Login's flow state (docs/medplum-compat.md §1.5): the keys it keeps in `LoginRecord.extra`, what
//! a sign-in asked for, the readiness rule of a code, and reading, saving and revoking a Login.

use crate::state::State;
use crate::store::LoginRecord;
use serde::{Deserialize, Serialize};
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

/// Keys of `LoginRecord.extra`, for the steps that write it (reads go through [`LoginFlow`]).
pub mod keys {
    pub const CODE_CHALLENGE: &str = "codeChallenge";
    pub const CODE_CHALLENGE_METHOD: &str = "codeChallengeMethod";
    pub const NONCE: &str = "nonce";
    pub const REDIRECT_URI: &str = "redirectUri";
    pub const LAUNCH: &str = "launch";
    pub const GRANTED: &str = "granted";
    /// Written only when a Login is created (through [`super::LoginFlow`]); tests set it.
    #[cfg(test)]
    pub const MFA_REQUIRED: &str = "mfaRequired";
    pub const MFA_VERIFIED: &str = "mfaVerified";
    pub const MFA_ENROLL_REQUIRED: &str = "mfaEnrollRequired";
    pub const SCOPE_GRANTED: &str = "scopeGranted";
    pub const PROFILE_SET: &str = "profileSet";
    pub const COOKIE: &str = "cookie";
    /// Offline access was asked for (`offline`, `offline_access` or `remember`) and is allowed:
    /// the code exchange then creates a refresh secret.
    pub const OFFLINE: &str = "offline";
    /// Unix seconds after which the current code is refused.
    pub const CODE_EXPIRES_AT: &str = "codeExpiresAt";
    /// Keyed hash of the CSRF token of the browser that created the Login (sign-in page).
    pub const CSRF: &str = "csrf";
    /// The client's `state`, returned with the code (sign-in page).
    pub const AUTHORIZE_STATE: &str = "authorizeState";
    /// Unix seconds of the wrong MFA codes tried on this Login.
    pub const MFA_FAILURES: &str = "mfaFailures";
    /// The TOTP step of the last accepted code.
    pub const MFA_STEP: &str = "mfaStep";
}

/// A Login's flow state, stored as its `extra` under the keys of [`keys`].
///
/// A new Login is written from this struct, in field order up to `mfa_enroll_required` (the rows
/// earlier versions wrote have the same shape). Later steps add their keys to the stored map in
/// place (`keys`), so a Login's `extra` is never rewritten whole; every read parses it here.
/// Reading is as lenient as the string-keyed reads were: a value of the wrong type counts as
/// absent, and so does an empty string (but for the nonce, which the ID token carries as stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoginFlow {
    /// Tokens were issued from this Login (see also [`GRANTED_PREFIX`]).
    #[serde(deserialize_with = "lenient::flag")]
    pub granted: bool,
    /// The client's nonce, echoed in the ID token.
    #[serde(deserialize_with = "lenient::raw_text")]
    pub nonce: Option<String>,
    /// PKCE (RFC 7636): the code is redeemed only with the verifier of this challenge.
    #[serde(deserialize_with = "lenient::text")]
    pub code_challenge: Option<String>,
    /// `plain` or `S256`.
    #[serde(deserialize_with = "lenient::text")]
    pub code_challenge_method: Option<String>,
    /// The SMART launch context the client asked for.
    #[serde(deserialize_with = "lenient::text")]
    pub launch: Option<String>,
    /// Set by `/oauth2/authorize`: the code is then bound to it.
    #[serde(deserialize_with = "lenient::text")]
    pub redirect_uri: Option<String>,
    /// The `Origin` of the request that started the sign-in.
    #[serde(deserialize_with = "lenient::text")]
    pub origin: Option<String>,
    /// Shown in the user's list of sessions (`/auth/me`).
    #[serde(deserialize_with = "lenient::text")]
    pub user_agent: Option<String>,
    /// The profile type the membership must have.
    #[serde(deserialize_with = "lenient::text")]
    pub profile_type: Option<String>,
    /// "Remember me": offline access whatever the scope says.
    #[serde(deserialize_with = "lenient::flag")]
    pub remember: bool,
    /// Offline access was asked for and is allowed: the code exchange creates a refresh secret.
    #[serde(deserialize_with = "lenient::flag")]
    pub offline: bool,
    /// The user is enrolled in MFA: a code must be verified on this Login.
    #[serde(deserialize_with = "lenient::flag")]
    pub mfa_required: bool,
    #[serde(deserialize_with = "lenient::flag")]
    pub mfa_verified: bool,
    /// MFA is required but the user is not enrolled yet: enrolment comes first.
    #[serde(deserialize_with = "lenient::flag")]
    pub mfa_enroll_required: bool,

    // What later steps add; absent from a new Login.
    /// The user consented to the scope on the sign-in page.
    #[serde(deserialize_with = "lenient::flag", skip_serializing_if = "is_false")]
    pub scope_granted: bool,
    #[serde(deserialize_with = "lenient::flag", skip_serializing_if = "is_false")]
    pub profile_set: bool,
    /// Unix seconds after which the current code is refused; no code, no expiry.
    #[serde(deserialize_with = "lenient::number")]
    pub code_expires_at: Option<i64>,
    /// Keyed hash of the sign-in page's session cookie.
    #[serde(deserialize_with = "lenient::text")]
    pub cookie: Option<String>,
    /// Keyed hash of the CSRF token of the browser that created the Login (sign-in page).
    #[serde(deserialize_with = "lenient::text")]
    pub csrf: Option<String>,
    /// The client's `state`, returned with the code (sign-in page).
    #[serde(deserialize_with = "lenient::text")]
    pub authorize_state: Option<String>,
    /// Unix seconds of the wrong MFA codes tried on this Login (the attempt limits).
    #[serde(
        deserialize_with = "lenient::numbers",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mfa_failures: Vec<i64>,
    /// The TOTP step of the last accepted code: a code is never accepted twice.
    #[serde(deserialize_with = "lenient::step")]
    pub mfa_step: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl LoginFlow {
    /// The flow state of a stored Login (a non-object `extra` reads as the default).
    pub fn of(login: &LoginRecord) -> LoginFlow {
        if !login.extra.is_object() {
            return LoginFlow::default();
        }
        LoginFlow::deserialize(&login.extra).unwrap_or_default()
    }

    /// The state as a Login's `extra`.
    pub fn to_extra(&self) -> Value {
        // Strings, numbers and booleans only: serializing cannot fail.
        let mut extra = serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()));
        // An absent option is left out, not stored as `null`.
        if let Value::Object(map) = &mut extra {
            map.retain(|_, v| !v.is_null());
        }
        extra
    }

    /// MFA is satisfied: not enrolled, or verified on this Login; and no enrolment is pending.
    pub fn mfa_satisfied(&self) -> bool {
        self.mfa_verified || !(self.mfa_required || self.mfa_enroll_required)
    }
}

/// Field readers that take whatever a stored `extra` holds and keep what has the expected type.
mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    fn value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(value(d)?.as_bool().unwrap_or(false))
    }

    pub fn raw_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(value(d)?.as_str().map(str::to_string))
    }

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(raw_text(d)?.filter(|s| !s.is_empty()))
    }

    pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Ok(value(d)?.as_i64())
    }

    pub fn step<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(value(d)?.as_u64())
    }

    pub fn numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
        Ok(match value(d)? {
            Value::Array(a) => a.iter().filter_map(Value::as_i64).collect(),
            _ => Vec::new(),
        })
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
    LoginFlow::of(login).granted
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
    LoginFlow::of(login).mfa_satisfied()
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

    /// A Login written by an earlier version (its creation keys, in their order) reads into the
    /// typed state and is written back to the same text.
    #[test]
    fn an_old_extra_round_trips() {
        let old = concat!(
            r#"{"granted":false,"nonce":"n","codeChallenge":"ch","codeChallengeMethod":"S256","#,
            r#""launch":"l","redirectUri":"https://app/cb","origin":"https://app","#,
            r#""userAgent":"ua","profileType":"Patient","remember":true,"offline":true,"#,
            r#""mfaRequired":true,"mfaVerified":false,"mfaEnrollRequired":false}"#
        );
        let mut l = login();
        l.extra = serde_json::from_str(old).unwrap();
        let flow = LoginFlow::of(&l);
        assert_eq!(flow.nonce.as_deref(), Some("n"));
        assert_eq!(flow.code_challenge_method.as_deref(), Some("S256"));
        assert_eq!(flow.redirect_uri.as_deref(), Some("https://app/cb"));
        assert!(flow.remember && flow.offline && flow.mfa_required && !flow.mfa_verified);
        assert_eq!(serde_json::to_string(&flow.to_extra()).unwrap(), old);
    }

    /// The keys later steps add read back typed, and a whole stored `extra` round-trips.
    #[test]
    fn later_keys_read_typed() {
        let mut l = login();
        l.extra = json!({
            "granted": true, "nonce": "", "remember": false, "offline": false,
            "mfaRequired": false, "mfaVerified": true, "mfaEnrollRequired": false,
            "scopeGranted": true, "profileSet": true, "codeExpiresAt": 1700000000,
            "cookie": "c", "csrf": "x", "authorizeState": "s", "mfaFailures": [1, 2], "mfaStep": 9
        });
        let flow = LoginFlow::of(&l);
        assert!(flow.granted && flow.scope_granted && flow.profile_set && flow.mfa_verified);
        assert_eq!(flow.nonce.as_deref(), Some(""));
        assert_eq!(flow.code_expires_at, Some(1_700_000_000));
        assert_eq!(flow.cookie.as_deref(), Some("c"));
        assert_eq!(flow.csrf.as_deref(), Some("x"));
        assert_eq!(flow.authorize_state.as_deref(), Some("s"));
        assert_eq!(flow.mfa_failures, vec![1, 2]);
        assert_eq!(flow.mfa_step, Some(9));
        assert_eq!(flow.to_extra(), l.extra);
    }

    /// The keys the writing steps use are the names the typed state reads.
    #[test]
    fn keys_name_the_fields() {
        let flow = LoginFlow {
            nonce: Some("n".into()),
            code_challenge: Some("c".into()),
            code_challenge_method: Some("S256".into()),
            launch: Some("l".into()),
            redirect_uri: Some("r".into()),
            scope_granted: true,
            profile_set: true,
            code_expires_at: Some(1),
            cookie: Some("k".into()),
            csrf: Some("x".into()),
            authorize_state: Some("s".into()),
            mfa_failures: vec![1],
            mfa_step: Some(1),
            ..LoginFlow::default()
        };
        let extra = flow.to_extra();
        for key in [
            keys::CODE_CHALLENGE,
            keys::CODE_CHALLENGE_METHOD,
            keys::NONCE,
            keys::REDIRECT_URI,
            keys::LAUNCH,
            keys::GRANTED,
            keys::MFA_REQUIRED,
            keys::MFA_VERIFIED,
            keys::MFA_ENROLL_REQUIRED,
            keys::SCOPE_GRANTED,
            keys::PROFILE_SET,
            keys::COOKIE,
            keys::OFFLINE,
            keys::CODE_EXPIRES_AT,
            keys::CSRF,
            keys::AUTHORIZE_STATE,
            keys::MFA_FAILURES,
            keys::MFA_STEP,
        ] {
            assert!(extra.get(key).is_some(), "{key}");
        }
    }

    /// As the string-keyed reads did: a value of the wrong type or an empty string is absent,
    /// and an `extra` that is not an object is an empty state.
    #[test]
    fn reads_are_lenient() {
        let mut l = login();
        l.extra =
            json!({"granted": "yes", "redirectUri": "", "codeExpiresAt": "soon", "mfaFailures": 3});
        assert_eq!(LoginFlow::of(&l), LoginFlow::default());
        l.extra = json!(["granted"]);
        assert_eq!(LoginFlow::of(&l), LoginFlow::default());
        assert!(!is_granted(&l));
    }
}
