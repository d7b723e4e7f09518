//! The one builder of a new pending Login (password sign-in, registration, external IdPs): its
//! row, and its flow state in `extra` under the keys of `login::state::keys`, always in the same
//! order.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::control::login::pkce::pkce_extra;
use crate::control::login::state::keys;
use crate::store::LoginRecord;

/// What a sign-in that starts a Login knows.
pub struct PendingLogin<'a> {
    pub user_ref: String,
    pub client_id: Option<String>,
    pub project_id: Option<String>,
    pub scope: String,
    pub auth_method: &'a str,
    /// Seconds the Login may be continued (MFA, profile, scope) before it expires.
    pub lifetime: i64,
    pub remote_address: Option<IpAddr>,
    pub nonce: String,
    pub code_challenge: Option<&'a str>,
    pub code_challenge_method: Option<&'a str>,
    pub launch: Option<&'a str>,
    /// Set by `/oauth2/authorize`: the code is then bound to it.
    pub redirect_uri: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The profile type the membership must have.
    pub profile_type: Option<&'a str>,
    pub remember: bool,
    /// Offline access was asked for and is allowed: the code exchange creates a refresh secret.
    pub offline: bool,
    /// The user is enrolled in MFA: a code must be verified on this Login.
    pub mfa_required: bool,
    /// MFA is required but the user is not enrolled yet: enrolment comes first.
    pub mfa_enroll_required: bool,
}

impl PendingLogin<'_> {
    /// The Login, not stored yet, started at `now`.
    pub fn build(&self, now: i64) -> LoginRecord {
        let mut extra = Map::new();
        let mut put = |k: &str, v: Value| {
            extra.insert(k.to_string(), v);
        };
        put(keys::GRANTED, Value::Bool(false));
        put(keys::NONCE, Value::String(self.nonce.clone()));
        for (k, v) in pkce_extra(self.code_challenge, self.code_challenge_method) {
            put(k, v);
        }
        let optional = [
            (keys::LAUNCH, self.launch),
            (keys::REDIRECT_URI, self.redirect_uri),
            (keys::ORIGIN, self.origin),
            (keys::USER_AGENT, self.user_agent),
            (keys::PROFILE_TYPE, self.profile_type),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                put(k, Value::String(v.to_string()));
            }
        }
        put(keys::REMEMBER, Value::Bool(self.remember));
        put(keys::OFFLINE, Value::Bool(self.offline));
        put(keys::MFA_REQUIRED, Value::Bool(self.mfa_required));
        put(keys::MFA_VERIFIED, Value::Bool(false));
        put(
            keys::MFA_ENROLL_REQUIRED,
            Value::Bool(self.mfa_enroll_required),
        );
        LoginRecord {
            id: uuid::Uuid::new_v4().to_string(),
            user_ref: self.user_ref.clone(),
            client_id: self.client_id.clone(),
            membership_id: None,
            project_id: self.project_id.clone(),
            scope: self.scope.clone(),
            auth_method: self.auth_method.into(),
            auth_time: now,
            expires_at: now.saturating_add(self.lifetime),
            revoked: false,
            remote_address: self.remote_address.map(|a| a.to_string()),
            code: None,
            refresh_secret: None,
            extra: Value::Object(extra),
        }
    }
}
