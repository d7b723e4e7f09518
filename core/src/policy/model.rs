//! Wire types of the identity resources that policies are built from, as Medplum stores them
//! (reference docs/medplum-compat.md §1, §4.1). Unknown fields are kept in `extra` so that a resource
//! read and written back loses nothing; the compiler decides what it refuses.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A FHIR `Reference` as far as fhirgate needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reference {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Reference {
    pub fn to(reference: impl Into<String>) -> Self {
        Reference {
            reference: Some(reference.into()),
            display: None,
        }
    }

    /// `"Patient/123"` → `Some(("Patient", "123"))`.
    pub fn type_and_id(&self) -> Option<(&str, &str)> {
        let r = self.reference.as_deref()?;
        let (ty, id) = r.split_once('/')?;
        if ty.is_empty() || id.is_empty() || id.contains('/') {
            return None;
        }
        Some((ty, id))
    }
}

/// `AccessPolicy` (docs/medplum-compat.md §4.1).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    #[serde(default = "access_policy_type")]
    pub resource_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub based_on: Vec<Reference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compartment: Option<Reference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource: Vec<AccessPolicyResource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_access_rule: Vec<IpAccessRule>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn access_policy_type() -> String {
    "AccessPolicy".to_string()
}

/// One `AccessPolicy.resource[]` entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyResource {
    pub resource_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criteria: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readonly_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_constraint: Vec<Expression>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compartment: Option<Reference>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A FHIR `Expression` (used by `writeConstraint`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Expression {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One `AccessPolicy.ipAccessRule[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IpAccessRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub value: String,
    pub action: String,
}

/// `ProjectMembership.access[]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MembershipAccess {
    pub policy: Reference,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameter: Vec<AccessParameter>,
}

/// `ProjectMembership.access[].parameter[]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessParameter {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_reference: Option<Reference>,
}

/// `ProjectMembership` (docs/medplum-compat.md §1.3).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectMembership {
    #[serde(default = "membership_type")]
    pub resource_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    pub project: Reference,
    pub user: Reference,
    pub profile: Reference,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_policy: Option<Reference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<MembershipAccess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn membership_type() -> String {
    "ProjectMembership".to_string()
}

impl ProjectMembership {
    /// Only an explicit `active: false` counts as inactive (docs/medplum-compat.md §1.3).
    pub fn is_active(&self) -> bool {
        self.active != Some(false)
    }

    pub fn is_admin(&self) -> bool {
        self.admin == Some(true)
    }

    /// The id of the project the membership belongs to (`project.reference`).
    pub fn project_id(&self) -> Option<&str> {
        self.project.type_and_id().map(|(_, id)| id)
    }

    /// The reference of the profile the membership acts as (`Patient/…`, `ClientApplication/…`).
    pub fn profile_ref(&self) -> Option<&str> {
        self.profile.reference.as_deref()
    }
}

/// The four "project admin" resource types: wildcards never grant them (docs/medplum-compat.md §4.3).
pub const PROJECT_ADMIN_TYPES: [&str; 4] = [
    "Project",
    "ProjectMembership",
    "User",
    "UserSecurityRequest",
];

/// Types only super admins may touch, whatever a policy says (docs/medplum-compat.md §4.3).
pub const PROTECTED_TYPES: [&str; 3] = ["DomainConfiguration", "JsonWebKey", "Login"];

/// Types that carry credentials or decide access: besides the project admin and protected
/// types, a `*` entry never grants these (docs/contract.md §2, stricter than Medplum, whose `*` lets any
/// member rewrite a client's secret or widen a policy). Admins get them by name.
pub const CREDENTIAL_TYPES: [&str; 3] = ["AccessPolicy", "ClientApplication", "IdentityProvider"];

/// The security trail: fhirgate writes it (`obs::audit_events`), project admins read it. A `*`
/// entry reaches neither its reads (who signed in from where) nor its writes (a forged trail);
/// an entry naming the type does. It lives upstream, isolated like any clinical type.
pub const TRAIL_TYPES: [&str; 1] = ["AuditEvent"];
