//! Security events of the control plane (docs/contract.md §2, issue 10): sign-in and its failures, MFA,
//! token issuance and refresh, reuse of a rotated refresh token, logout and revocation,
//! sessions ended by a credential change, password changes, invitations, changes to identity
//! resources (members, clients, policies, projects) and secret rotation. Each is a typed
//! record — which event, success or failure and a stable reason, who acted, on what, in which
//! project, from where — written as one JSON line on the `fhirgate::security` target and
//! counted in `fhirgate_security_events_total{event,outcome}`. Built from typed fields only,
//! so no secret, token or password can reach it. (The gateway's per-request decisions are the
//! `fhirgate::audit` records.)

use std::net::IpAddr;

use super::METRICS;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityEventKind {
    SignIn,
    MfaEnrolment,
    MfaVerification,
    MfaDisabled,
    TokenIssued,
    TokenRefreshed,
    RefreshTokenReused,
    Logout,
    TokenRevoked,
    SessionsEnded,
    PasswordChanged,
    Invitation,
    ResourceCreated,
    ResourceUpdated,
    ResourceDeleted,
    SecretRotated,
}

impl SecurityEventKind {
    pub fn label(self) -> &'static str {
        match self {
            SecurityEventKind::SignIn => "sign_in",
            SecurityEventKind::MfaEnrolment => "mfa_enrolment",
            SecurityEventKind::MfaVerification => "mfa_verification",
            SecurityEventKind::MfaDisabled => "mfa_disabled",
            SecurityEventKind::TokenIssued => "token_issued",
            SecurityEventKind::TokenRefreshed => "token_refreshed",
            SecurityEventKind::RefreshTokenReused => "refresh_token_reused",
            SecurityEventKind::Logout => "logout",
            SecurityEventKind::TokenRevoked => "token_revoked",
            SecurityEventKind::SessionsEnded => "sessions_ended",
            SecurityEventKind::PasswordChanged => "password_changed",
            SecurityEventKind::Invitation => "invitation",
            SecurityEventKind::ResourceCreated => "resource_created",
            SecurityEventKind::ResourceUpdated => "resource_updated",
            SecurityEventKind::ResourceDeleted => "resource_deleted",
            SecurityEventKind::SecretRotated => "secret_rotated",
        }
    }
}

/// One security event. `reason` is a stable label (never free text from a request).
#[derive(Debug, Clone, Copy)]
pub struct SecurityEvent<'a> {
    pub kind: SecurityEventKind,
    pub success: bool,
    pub reason: Option<&'static str>,
    /// Who acted: a profile or user reference (`Practitioner/…`, `ClientApplication/…`).
    pub actor: Option<&'a str>,
    /// What it acted on: `ProjectMembership/…`, `Login/…`, `User/…`.
    pub subject: Option<&'a str>,
    pub project: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    /// A change's version ids of the subject: before, after.
    pub versions: (Option<&'a str>, Option<&'a str>),
}

impl<'a> SecurityEvent<'a> {
    pub fn new(kind: SecurityEventKind) -> SecurityEvent<'a> {
        SecurityEvent {
            kind,
            success: true,
            reason: None,
            actor: None,
            subject: None,
            project: None,
            client_ip: None,
            versions: (None, None),
        }
    }

    pub fn failed(mut self, reason: &'static str) -> Self {
        self.success = false;
        self.reason = Some(reason);
        self
    }

    pub fn actor(mut self, actor: &'a str) -> Self {
        self.actor = Some(actor);
        self
    }

    pub fn subject(mut self, subject: &'a str) -> Self {
        self.subject = Some(subject);
        self
    }

    pub fn project(mut self, project: &'a str) -> Self {
        self.project = Some(project);
        self
    }

    pub fn from_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.client_ip = ip;
        self
    }

    /// The subject's version before and after a change.
    pub fn versions(mut self, before: Option<&'a str>, after: Option<&'a str>) -> Self {
        self.versions = (before, after);
        self
    }

    pub fn emit(&self) {
        let outcome = if self.success { "success" } else { "failure" };
        METRICS
            .security_events
            .with_label_values(&[self.kind.label(), outcome])
            .inc();
        tracing::info!(
            target: "fhirgate::security",
            event = self.kind.label(),
            outcome,
            reason = self.reason,
            actor = self.actor,
            subject = self.subject,
            project = self.project,
            client_ip = self.client_ip.map(|i| i.to_string()),
            version_before = self.versions.0,
            version_after = self.versions.1,
            "security event"
        );
        if super::trail::active() {
            super::trail::record(self.trail_record());
        }
    }

    fn trail_record(&self) -> super::trail::TrailRecord {
        use super::trail::{ChangeAction, TrailKind};
        let kind = match self.kind {
            SecurityEventKind::ResourceCreated => TrailKind::Change(ChangeAction::Create),
            SecurityEventKind::ResourceUpdated => TrailKind::Change(ChangeAction::Update),
            SecurityEventKind::ResourceDeleted => TrailKind::Change(ChangeAction::Delete),
            SecurityEventKind::RefreshTokenReused => TrailKind::Alert,
            _ => TrailKind::Authentication,
        };
        super::trail::TrailRecord {
            kind,
            event: self.kind.label(),
            success: self.success,
            reason: self.reason,
            actor: self.actor.map(str::to_string),
            subject: self.subject.map(str::to_string),
            project: self.project.map(str::to_string),
            client_ip: self.client_ip,
            versions: (
                self.versions.0.map(str::to_string),
                self.versions.1.map(str::to_string),
            ),
            recorded_ms: super::trail::now_ms(),
        }
    }
}
