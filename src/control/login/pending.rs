//! The one builder of a new pending Login (password sign-in, registration, external IdPs): its
//! row, and its flow state in `extra` (a `login::state::LoginFlow`, under the keys of
//! `login::state::keys`, always in the same order).

use std::net::IpAddr;

use crate::control::login::pkce::pkce_state;
use crate::control::login::state::ClientAsk;
use crate::control::login::state::LoginFlow;
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
        let (code_challenge, code_challenge_method) =
            pkce_state(self.code_challenge, self.code_challenge_method);
        let owned = |v: Option<&str>| v.map(str::to_string);
        let flow = LoginFlow {
            granted: false,
            ask: ClientAsk {
                scope: None,
                nonce: Some(self.nonce.clone()),
                code_challenge,
                code_challenge_method,
                launch: owned(self.launch),
                redirect_uri: owned(self.redirect_uri),
            },
            origin: owned(self.origin),
            user_agent: owned(self.user_agent),
            profile_type: owned(self.profile_type),
            remember: self.remember,
            offline: self.offline,
            mfa_required: self.mfa_required,
            mfa_verified: false,
            mfa_enroll_required: self.mfa_enroll_required,
            ..LoginFlow::default()
        };
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
            extra: flow.to_extra(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flow state is stored exactly as the string-keyed builder before it wrote it: the same
    /// keys, in the same order, absent options left out, a bare challenge as plain.
    #[test]
    fn a_new_login_stores_the_same_extra_as_before() {
        let pending = PendingLogin {
            user_ref: "User/u".into(),
            client_id: Some("c".into()),
            project_id: None,
            scope: "openid".into(),
            auth_method: "password",
            lifetime: 60,
            remote_address: None,
            nonce: "n".into(),
            code_challenge: Some("ch"),
            code_challenge_method: None,
            launch: None,
            redirect_uri: Some("https://app/cb"),
            origin: None,
            user_agent: Some("ua"),
            profile_type: Some("Patient"),
            remember: true,
            offline: false,
            mfa_required: true,
            mfa_enroll_required: false,
        };
        let login = pending.build(100);
        assert_eq!(
            serde_json::to_string(&login.extra).unwrap(),
            concat!(
                r#"{"granted":false,"nonce":"n","codeChallenge":"ch","codeChallengeMethod":"plain","#,
                r#""redirectUri":"https://app/cb","userAgent":"ua","profileType":"Patient","#,
                r#""remember":true,"offline":false,"mfaRequired":true,"mfaVerified":false,"#,
                r#""mfaEnrollRequired":false}"#
            )
        );
        assert_eq!(login.expires_at, 160);
    }
}
