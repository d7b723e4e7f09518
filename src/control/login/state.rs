//! A Login's flow state (docs/medplum-compat.md §1.5): the keys it keeps in `LoginRecord.extra`, what
//! a sign-in asked for, the readiness rule of a code, and reading, saving and revoking a Login.

use crate::state::State;
use crate::store::LoginRecord;
use serde::Serialize;
use serde_json::{Map, Value};
use std::net::IpAddr;

use crate::control::web::body::body_str;
use crate::control::web::error::ApiError;

/// An authorization code is good for this many seconds (docs/contract.md §2: at most 10 minutes).
pub const CODE_LIFETIME: i64 = 600;

/// A Login that has issued no token yet may be continued (MFA, profile, scope) this long.
pub const PENDING_LIFETIME: i64 = 3600;

/// The `code` column of a redeemed Login: this prefix and the code's hash, so that a replayed
/// code still finds its Login (and revokes it).
pub const GRANTED_PREFIX: &str = "g:";

/// Keys of `LoginRecord.extra`: the names [`LoginFlow`] reads, and later steps write in place.
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
    pub const ORIGIN: &str = "origin";
    pub const USER_AGENT: &str = "userAgent";
    /// The profile type the membership must have (`resourceType` of `/auth/login`).
    pub const PROFILE_TYPE: &str = "profileType";
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
    /// The SMART launch context the tokens carry (`patient`, `encounter`, `fhirContext`),
    /// resolved from the SmartAppLaunch (EHR launch) or chosen on the sign-in page.
    pub const CONTEXT: &str = "launchContext";
}

/// A Login's flow state, stored as its `extra` under the keys of [`keys`].
///
/// A new Login is written from this struct, in field order up to `mfa_enroll_required` (the rows
/// earlier versions wrote have the same shape). Later steps add their keys to the stored map in
/// place (`keys`), so a Login's `extra` is never rewritten whole; every read parses it with
/// [`LoginFlow::of`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginFlow {
    /// Tokens were issued from this Login (see also [`GRANTED_PREFIX`]).
    pub granted: bool,
    /// What the client asked for (its scope is the Login's own column). The challenge method
    /// is `plain` or `S256`; the nonce may be empty (the ID token carries it as stored).
    #[serde(flatten)]
    pub ask: ClientAsk,
    /// The `Origin` of the request that started the sign-in.
    pub origin: Option<String>,
    /// Shown in the user's list of sessions (`/auth/me`).
    pub user_agent: Option<String>,
    /// The profile type the membership must have.
    pub profile_type: Option<String>,
    /// "Remember me": offline access whatever the scope says.
    pub remember: bool,
    /// Offline access was asked for and is allowed: the code exchange creates a refresh secret.
    pub offline: bool,
    /// The user is enrolled in MFA: a code must be verified on this Login.
    pub mfa_required: bool,
    pub mfa_verified: bool,
    /// MFA is required but the user is not enrolled yet: enrolment comes first.
    pub mfa_enroll_required: bool,

    // What later steps add; absent from a new Login.
    /// The user consented to the scope on the sign-in page.
    #[serde(skip_serializing_if = "is_false")]
    pub scope_granted: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub profile_set: bool,
    /// Unix seconds after which the current code is refused; no code, no expiry.
    pub code_expires_at: Option<i64>,
    /// Keyed hash of the sign-in page's session cookie.
    pub cookie: Option<String>,
    /// Keyed hash of the CSRF token of the browser that created the Login (sign-in page).
    pub csrf: Option<String>,
    /// The client's `state`, returned with the code (sign-in page).
    pub authorize_state: Option<String>,
    /// Unix seconds of the wrong MFA codes tried on this Login (the attempt limits).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mfa_failures: Vec<i64>,
    /// The TOTP step of the last accepted code: a code is never accepted twice.
    pub mfa_step: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl LoginFlow {
    /// The flow state of a stored Login. As lenient as the string-keyed reads were: a value of
    /// the wrong type counts as absent, and so does an empty string (but for the nonce, which
    /// the ID token carries as stored); an `extra` that is not an object is the default.
    pub fn of(login: &LoginRecord) -> LoginFlow {
        let Some(m) = login.extra.as_object() else {
            return LoginFlow::default();
        };
        let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
        let raw = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
        let text = |k: &str| raw(k).filter(|s| !s.is_empty());
        LoginFlow {
            granted: flag(keys::GRANTED),
            ask: ClientAsk {
                scope: None,
                nonce: raw(keys::NONCE),
                code_challenge: text(keys::CODE_CHALLENGE),
                code_challenge_method: text(keys::CODE_CHALLENGE_METHOD),
                launch: text(keys::LAUNCH),
                redirect_uri: text(keys::REDIRECT_URI),
            },
            origin: text(keys::ORIGIN),
            user_agent: text(keys::USER_AGENT),
            profile_type: text(keys::PROFILE_TYPE),
            remember: flag(keys::REMEMBER),
            offline: flag(keys::OFFLINE),
            mfa_required: flag(keys::MFA_REQUIRED),
            mfa_verified: flag(keys::MFA_VERIFIED),
            mfa_enroll_required: flag(keys::MFA_ENROLL_REQUIRED),
            scope_granted: flag(keys::SCOPE_GRANTED),
            profile_set: flag(keys::PROFILE_SET),
            code_expires_at: m.get(keys::CODE_EXPIRES_AT).and_then(Value::as_i64),
            cookie: text(keys::COOKIE),
            csrf: text(keys::CSRF),
            authorize_state: text(keys::AUTHORIZE_STATE),
            mfa_failures: m
                .get(keys::MFA_FAILURES)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default(),
            mfa_step: m.get(keys::MFA_STEP).and_then(Value::as_u64),
        }
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

/// What the client application asked for when it started a sign-in (the parameters of its
/// authorization request, or the same fields of `/auth/login`), carried as they came to the
/// pending Login, whichever way the user signs in.
///
/// Stored in a Login's flow state ([`LoginFlow`]) under the keys of [`keys`], in this order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientAsk {
    /// Space-separated scopes. Not part of the flow state: a Login keeps its scope in its own
    /// column.
    #[serde(skip)]
    pub scope: Option<String>,
    /// Echoed in the ID token.
    pub nonce: Option<String>,
    /// PKCE (RFC 7636): the code is redeemed only with the verifier of this challenge, …
    pub code_challenge: Option<String>,
    /// … made with this method.
    pub code_challenge_method: Option<String>,
    /// The SMART launch context.
    pub launch: Option<String>,
    /// Set by `/oauth2/authorize`: the code is then bound to it.
    pub redirect_uri: Option<String>,
}

impl ClientAsk {
    /// What an `/auth/*` JSON body asks for (`scope`, `nonce`, `launch`, `codeChallenge`,
    /// `codeChallengeMethod`); never a redirect URI, which only `/oauth2/authorize` binds.
    pub(crate) fn of_body(body: &Map<String, Value>) -> ClientAsk {
        ClientAsk {
            scope: body_str(body, "scope"),
            nonce: body_str(body, "nonce"),
            launch: body_str(body, "launch"),
            code_challenge: body_str(body, "codeChallenge"),
            code_challenge_method: body_str(body, "codeChallengeMethod"),
            redirect_uri: None,
        }
    }

    /// The requested scope, `openid` when none was asked for (Medplum's default).
    pub(crate) fn scope_or_openid(&self) -> String {
        self.scope
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "openid".to_string())
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
    /// "Remember me": offline access whatever the scope says.
    pub remember: bool,
    pub ask: ClientAsk,
    /// The request's `Origin` header.
    pub origin: Option<String>,
    pub remote_address: Option<IpAddr>,
    pub user_agent: Option<String>,
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
        assert_eq!(flow.ask.nonce.as_deref(), Some("n"));
        assert_eq!(flow.ask.code_challenge_method.as_deref(), Some("S256"));
        assert_eq!(flow.ask.redirect_uri.as_deref(), Some("https://app/cb"));
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
        assert_eq!(flow.ask.nonce.as_deref(), Some(""));
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
            ask: ClientAsk {
                scope: None,
                nonce: Some("n".into()),
                code_challenge: Some("c".into()),
                code_challenge_method: Some("S256".into()),
                launch: Some("l".into()),
                redirect_uri: Some("r".into()),
            },
            origin: Some("o".into()),
            user_agent: Some("u".into()),
            profile_type: Some("Patient".into()),
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
        assert_eq!(
            LoginFlow::of(&LoginRecord {
                extra: extra.clone(),
                ..login()
            }),
            flow
        );
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
            keys::REMEMBER,
            keys::ORIGIN,
            keys::USER_AGENT,
            keys::PROFILE_TYPE,
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
