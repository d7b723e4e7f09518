//! The effective policy of a membership (docs/medplum-compat.md §4.2 steps 1–7): its policies with
//! parameters substituted, concatenated, with the legacy `*` and default entries, narrowed by
//! SMART scopes (letters enforced, docs/contract.md §2) and adjusted for admins; then compiled for decisions.
//! Invariant: pure; policies come in through [`PolicySource`], never from a store.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::BuildHasher;

use serde_json::Value;

use crate::fhir::request::{Interaction, QueryParam};
use crate::policy::compiled::{
    CompiledEntry, CompiledPolicy, InteractionSet, PolicyError, is_identity_type,
    is_project_admin_type,
};
use crate::policy::isolation::Isolation;
use crate::policy::model::{
    AccessParameter, AccessPolicy, AccessPolicyResource, ProjectMembership, Reference,
};
use crate::policy::scope::{ScopeContext, SmartScope, parse_scopes};

pub use crate::policy::compiled::{SearchNarrowing, validate_policy};

/// Where stored AccessPolicies are looked up, by id.
pub trait PolicySource {
    fn access_policy(&self, id: &str) -> Option<&AccessPolicy>;
}

impl<V: Borrow<AccessPolicy>, S: BuildHasher> PolicySource for HashMap<String, V, S> {
    fn access_policy(&self, id: &str) -> Option<&AccessPolicy> {
        self.get(id).map(Borrow::borrow)
    }
}

/// A plain list, looked up by `AccessPolicy.id` (tests, `policy explain`).
impl PolicySource for Vec<AccessPolicy> {
    fn access_policy(&self, id: &str) -> Option<&AccessPolicy> {
        self.iter().find(|p| p.id.as_deref() == Some(id))
    }
}

/// Everything the effective policy depends on. For on-behalf-of, `membership` is the target's
/// and the project fields are the caller's (docs/medplum-compat.md §6).
#[derive(Clone, Copy)]
pub struct EffectiveInputs<'a> {
    pub membership: &'a ProjectMembership,
    pub policies: &'a dyn PolicySource,
    /// Id of the membership's project.
    pub project_id: &'a str,
    /// The project is a super-admin project.
    pub project_super_admin: bool,
    /// Ids of the projects the project links to.
    pub linked_projects: &'a [String],
    /// The Login's scope (`None` for Basic auth, which never narrows).
    pub scope: Option<&'a str>,
    /// The patient id of the token's SMART launch context; `None` falls back to the
    /// membership's own Patient profile. `patient/` scopes reach only this patient.
    pub patient_in_context: Option<&'a str>,
}

/// Why no effective policy can be built. Medplum answers these with 400 "Cannot authenticate:
/// Invalid access policy configuration. …" at login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EffectiveError {
    #[error("access policy reference `{0}` is not `AccessPolicy/<id>`")]
    BadPolicyReference(String),
    #[error("access policy `{0}` not found")]
    PolicyNotFound(String),
    #[error("access policy `{0}` is not valid JSON after parameter substitution")]
    Substitution(String),
}

/// Interactions Medplum gives a `readonly` entry without `interaction` (step 3).
const READONLY_CODES: [&str; 4] = ["search", "read", "history", "vread"];

/// The order in which a super-admin project gets the admin types (step 7), then the types `*`
/// no longer reaches (docs/contract.md §2), which Medplum's super admins get through `*`.
const SUPER_ADMIN_TYPES: [&str; 11] = [
    "UserSecurityRequest",
    "Project",
    "ProjectMembership",
    "User",
    "ClientApplication",
    "AccessPolicy",
    "IdentityProvider",
    "DomainConfiguration",
    "JsonWebKey",
    "Login",
    "AuditEvent",
];

// === EffectivePolicy ===

/// The effective policy of one membership: the wire `AccessPolicy` (what `/auth/me` returns) and
/// its compiled form.
#[derive(Debug, Clone)]
pub struct EffectivePolicy {
    access_policy: AccessPolicy,
    compiled: CompiledPolicy,
    errors: Vec<PolicyError>,
    project_admin: bool,
    failure: Option<EffectiveError>,
    /// What the membership's project sees of its upstream; applies to every type that lives
    /// upstream (not to the identity types, which live in fhirgate's store).
    isolation: Isolation,
}

impl EffectivePolicy {
    /// Compiles an already-built effective wire policy.
    pub fn from_access_policy(
        access_policy: AccessPolicy,
        super_admin: bool,
        project_admin: bool,
    ) -> EffectivePolicy {
        let (compiled, errors) = CompiledPolicy::compile(&access_policy, super_admin);
        EffectivePolicy {
            access_policy,
            compiled,
            errors,
            project_admin,
            failure: None,
            isolation: Isolation::None,
        }
    }

    /// The policy of a membership whose policy could not be built: it grants nothing (its IP
    /// rules are empty, so requests fail with 403 rather than an IP error). `failure` says why.
    pub fn deny_all(
        failure: EffectiveError,
        super_admin: bool,
        project_admin: bool,
    ) -> EffectivePolicy {
        EffectivePolicy {
            access_policy: AccessPolicy {
                resource_type: "AccessPolicy".to_string(),
                ..AccessPolicy::default()
            },
            compiled: CompiledPolicy::deny_all(super_admin),
            errors: Vec::new(),
            project_admin,
            failure: Some(failure),
            isolation: Isolation::None,
        }
    }

    /// The same policy, limited to what `isolation` lets the project see.
    pub fn with_isolation(mut self, isolation: Isolation) -> EffectivePolicy {
        self.isolation = isolation;
        self
    }

    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// Whether resources of `resource_type` are limited by the project's isolation.
    pub fn isolates(&self, resource_type: &str) -> bool {
        self.isolation.is_active() && !is_identity_type(resource_type)
    }

    /// [`CompiledPolicy::satisfied`], and the resource belongs to the project's view.
    pub fn satisfied(&self, resource: &Value, interaction: Interaction) -> Option<&CompiledEntry> {
        let resource_type = resource.get("resourceType")?.as_str()?;
        if self.isolates(resource_type) && !self.isolation.admits(resource) {
            return None;
        }
        self.compiled.satisfied(resource, interaction)
    }

    /// [`CompiledPolicy::instance_checks_needed`]; always under isolation, since any resource
    /// may belong to another project.
    pub fn instance_checks_needed(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.isolates(resource_type)
            || self
                .compiled
                .instance_checks_needed(resource_type, interaction)
    }

    /// [`CompiledPolicy::read_needs_check`]; always under isolation.
    pub fn read_needs_check(&self, resource_type: &str, id: &str) -> bool {
        self.isolates(resource_type) || self.compiled.read_needs_check(resource_type, id)
    }

    /// [`CompiledPolicy::search_target_open`]; never under isolation: a `_has` or a chain
    /// would test another project's resources.
    pub fn search_target_open(&self, resource_type: &str) -> bool {
        !(self.isolation.is_active() && (resource_type == "*" || self.isolates(resource_type)))
            && self.compiled.search_target_open(resource_type)
    }

    /// The parameters that narrow a conditional-create probe (`If-None-Exist`) of
    /// `resource_type` to exactly what the caller may search, so that a match or a miss is only
    /// about resources it may see; `None` when no such narrowing exists (refuse the probe).
    pub fn probe_narrowing(&self, resource_type: &str) -> Option<Vec<QueryParam>> {
        if !self.instance_checks_needed(resource_type, Interaction::Search) {
            return Some(Vec::new());
        }
        if self.isolates(resource_type) && !self.isolation.narrows_exactly() {
            return None;
        }
        let mut params = match self.compiled.search_narrowing(resource_type) {
            SearchNarrowing::AnyOf(list) if list.len() == 1 && list[0].upstream_complete() => {
                list[0].query_params().to_vec()
            }
            SearchNarrowing::Unrestricted => Vec::new(),
            _ => return None,
        };
        if self.isolates(resource_type) {
            params.extend(self.isolation.narrowing());
        }
        Some(params)
    }

    /// Why the membership's policy could not be built (then nothing is granted).
    pub fn failure(&self) -> Option<&EffectiveError> {
        self.failure.as_ref()
    }

    /// The effective AccessPolicy, with `basedOn` (the `/auth/me` `accessPolicy`).
    pub fn access_policy(&self) -> &AccessPolicy {
        &self.access_policy
    }

    pub fn compiled(&self) -> &CompiledPolicy {
        &self.compiled
    }

    /// What could not be compiled (those parts fail closed). Empty for a healthy policy.
    pub fn compile_errors(&self) -> &[PolicyError] {
        &self.errors
    }

    pub fn is_project_admin(&self) -> bool {
        self.project_admin
    }

    /// `AccessPolicy.compartment` of the last source that had one (added to `meta.account` on
    /// create).
    pub fn compartment(&self) -> Option<&Reference> {
        self.access_policy.compartment.as_ref()
    }

    /// docs/medplum-compat.md §12 case 62: a resource created under a policy with a `compartment` is
    /// written with `meta.account` set to it, whatever the client sent, so that the
    /// compartment's `_compartment` criteria find it and no other compartment's do.
    pub fn stamp_account(&self, resource: &mut Value) {
        let Some(reference) = self.compartment().and_then(|c| c.reference.as_deref()) else {
            return;
        };
        let Some(obj) = resource.as_object_mut() else {
            return;
        };
        let meta = obj
            .entry("meta")
            .or_insert_with(|| Value::Object(Default::default()));
        if !meta.is_object() {
            *meta = Value::Object(Default::default());
        }
        if let Some(meta) = meta.as_object_mut() {
            meta.insert(
                "account".into(),
                serde_json::json!({ "reference": reference }),
            );
        }
    }
}

/// The decisions themselves (`type_allows`, `satisfied`, `search_narrowing`, `check_ip`, …) are
/// [`CompiledPolicy`]'s.
impl std::ops::Deref for EffectivePolicy {
    type Target = CompiledPolicy;

    fn deref(&self) -> &CompiledPolicy {
        &self.compiled
    }
}

/// Builds and compiles the effective policy of `inputs.membership`. Fails closed: when a source
/// policy is missing or unusable, the result grants nothing and [`EffectivePolicy::failure`] says
/// why (Medplum refuses the login instead; use [`try_effective`] for that).
pub fn effective(inputs: &EffectiveInputs<'_>) -> EffectivePolicy {
    try_effective(inputs).unwrap_or_else(|e| {
        EffectivePolicy::deny_all(e, inputs.project_super_admin, inputs.membership.is_admin())
    })
}

/// Builds and compiles the effective policy of `inputs.membership`, or says why it cannot.
pub fn try_effective(inputs: &EffectiveInputs<'_>) -> Result<EffectivePolicy, EffectiveError> {
    let access_policy = build_access_policy(inputs)?;
    Ok(EffectivePolicy::from_access_policy(
        access_policy,
        inputs.project_super_admin,
        inputs.membership.is_admin(),
    ))
}

/// docs/medplum-compat.md §4.2 steps 1–7, producing the wire AccessPolicy.
pub fn build_access_policy(inputs: &EffectiveInputs<'_>) -> Result<AccessPolicy, EffectiveError> {
    let membership = inputs.membership;

    // 1. Sources: membership.accessPolicy (no parameters), then access[].
    let mut sources: Vec<(&Reference, &[AccessParameter])> = Vec::new();
    if let Some(policy) = &membership.access_policy {
        sources.push((policy, &[]));
    }
    for access in &membership.access {
        sources.push((&access.policy, &access.parameter));
    }

    // 2.–3. Substitute, then concatenate.
    let mut resource = Vec::new();
    let mut ip_access_rule = Vec::new();
    let mut compartment = None;
    for (reference, parameters) in &sources {
        let raw = reference.reference.clone().unwrap_or_default();
        let id = match reference.type_and_id() {
            Some(("AccessPolicy", id)) => id,
            _ => return Err(EffectiveError::BadPolicyReference(raw)),
        };
        let stored = inputs
            .policies
            .access_policy(id)
            .ok_or(EffectiveError::PolicyNotFound(raw))?;
        let replaced = substitute_parameters(stored, parameters, &membership.profile)?;
        if replaced.compartment.is_some() {
            compartment = replaced.compartment;
        }
        for mut entry in replaced.resource {
            if entry.interaction.is_none() && entry.readonly == Some(true) {
                entry.interaction = Some(READONLY_CODES.iter().map(|c| c.to_string()).collect());
            }
            resource.push(entry);
        }
        ip_access_rule.extend(replaced.ip_access_rule);
    }

    // 4. Legacy: no accessPolicy and no non-empty access[] → full access to non-admin types.
    if membership.access_policy.is_none() && membership.access.is_empty() {
        resource.push(entry_of("*"));
    }

    // 5. Default read-only SearchParameter and StructureDefinition.
    for ty in ["SearchParameter", "StructureDefinition"] {
        if !resource.iter().any(|e| e.resource_type == ty) {
            resource.push(AccessPolicyResource {
                readonly: Some(true),
                ..entry_of(ty)
            });
        }
    }

    // 6. SMART scopes, when at least one resource scope is present. `patient/` scopes reach
    // only the patient in context (stricter than Medplum, as SMART says): the launch context's
    // patient, else the membership's own Patient profile.
    if let Some(scope) = inputs.scope {
        let scopes = parse_scopes(scope);
        if !scopes.is_empty() {
            let patient = inputs.patient_in_context.or_else(|| {
                membership
                    .profile
                    .reference
                    .as_deref()
                    .and_then(|r| r.strip_prefix("Patient/"))
            });
            resource = apply_smart_scopes(resource, &scopes, patient);
        }
    }

    // 7. Admin adjustments, after the scopes so that scopes never remove them.
    if inputs.project_super_admin {
        for ty in SUPER_ADMIN_TYPES {
            if !resource.iter().any(|e| e.resource_type == ty) {
                resource.push(entry_of(ty));
            }
        }
    } else if membership.is_admin() {
        resource.retain(|e| !is_project_admin_type(&e.resource_type));
        resource.extend(project_admin_entries(
            inputs.project_id,
            inputs.linked_projects,
        ));
    } else {
        resource.retain(|e| !is_project_admin_type(&e.resource_type));
    }

    Ok(AccessPolicy {
        resource_type: "AccessPolicy".to_string(),
        based_on: sources.iter().map(|(r, _)| (*r).clone()).collect(),
        compartment,
        resource,
        ip_access_rule,
        ..AccessPolicy::default()
    })
}

fn entry_of(resource_type: &str) -> AccessPolicyResource {
    AccessPolicyResource {
        resource_type: resource_type.to_string(),
        ..AccessPolicyResource::default()
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The entries a project admin gets for the four admin types (docs/medplum-compat.md §4.2 step 7).
fn project_admin_entries(
    project_id: &str,
    linked_projects: &[String],
) -> Vec<AccessPolicyResource> {
    let mut out = vec![AccessPolicyResource {
        criteria: Some(format!("Project?_id={project_id}")),
        readonly_fields: strings(&["features", "link", "systemSetting"]),
        hidden_fields: strings(&["superAdmin", "systemSecret", "strictMode"]),
        ..entry_of("Project")
    }];
    if !linked_projects.is_empty() {
        out.push(AccessPolicyResource {
            criteria: Some(format!("Project?_id={}", linked_projects.join(","))),
            readonly: Some(true),
            hidden_fields: strings(&[
                "superAdmin",
                "setting",
                "systemSetting",
                "secret",
                "systemSecret",
                "strictMode",
            ]),
            ..entry_of("Project")
        });
    }
    out.push(AccessPolicyResource {
        readonly_fields: strings(&["project", "user"]),
        ..entry_of("ProjectMembership")
    });
    out.push(AccessPolicyResource {
        readonly: Some(true),
        ..entry_of("UserSecurityRequest")
    });
    out.push(AccessPolicyResource {
        hidden_fields: strings(&["passwordHash", "mfaSecret"]),
        readonly_fields: strings(&["email", "emailVerified", "mfaEnrolled", "project"]),
        ..entry_of("User")
    });
    // `*` never reaches these (docs/contract.md §2); a project admin manages its project's clients and
    // policies by name. The control API keeps them inside the project.
    out.push(entry_of("ClientApplication"));
    out.push(entry_of("AccessPolicy"));
    // The project's security trail: read, never written (fhirgate writes it).
    out.push(AccessPolicyResource {
        readonly: Some(true),
        ..entry_of("AuditEvent")
    });
    out
}

/// One substitution: `%name` → `value`, and for references `%name.id` → `id` first.
struct Substitution {
    name: String,
    value: String,
    id: Option<String>,
}

/// Step 2: textual parameter substitution on the serialised policy. The parameters are the
/// entry's, then `profile`, then `patient` (unless given). A `valueString` replaces `%name`; a
/// `valueReference` replaces `%name.id` with the id, then `%name` with the reference string.
///
/// Two deliberate departures from Medplum's plain `replaceAll` loop: longer names go first (stable
/// otherwise), so `%patientX` is not clobbered by `%patient` when `patientX` is a parameter; and
/// values are JSON-escaped, so a value holding `"` cannot change the policy's structure.
pub fn substitute_parameters(
    policy: &AccessPolicy,
    parameters: &[AccessParameter],
    profile: &Reference,
) -> Result<AccessPolicy, EffectiveError> {
    let reference_substitution = |name: &str, r: &Reference| {
        // Medplum's resolveId is `reference.split('/')[1]`; a missing piece prints "undefined".
        let raw = r.reference.as_deref();
        let id = raw.and_then(|s| s.split('/').nth(1)).unwrap_or("undefined");
        Substitution {
            name: name.to_string(),
            value: raw.unwrap_or("undefined").to_string(),
            id: Some(id.to_string()),
        }
    };
    let mut subs: Vec<Substitution> = Vec::new();
    for p in parameters {
        match (&p.value_string, &p.value_reference) {
            // An empty valueString is falsy in Medplum and falls through to the reference.
            (Some(s), _) if !s.is_empty() => subs.push(Substitution {
                name: p.name.clone(),
                value: s.clone(),
                id: None,
            }),
            (_, Some(r)) => subs.push(reference_substitution(&p.name, r)),
            _ => {}
        }
    }
    subs.push(reference_substitution("profile", profile));
    if !parameters.iter().any(|p| p.name == "patient") {
        subs.push(reference_substitution("patient", profile));
    }
    subs.sort_by_key(|s| std::cmp::Reverse(s.name.len()));

    let policy_ref = policy.id.clone().unwrap_or_default();
    let mut json = serde_json::to_string(policy)
        .map_err(|_| EffectiveError::Substitution(policy_ref.clone()))?;
    for s in &subs {
        if let Some(id) = &s.id {
            json = json.replace(&format!("%{}.id", s.name), &json_escape(id));
        }
        json = json.replace(&format!("%{}", s.name), &json_escape(&s.value));
    }
    serde_json::from_str(&json).map_err(|_| EffectiveError::Substitution(policy_ref))
}

/// `s` as it appears inside a JSON string literal.
fn json_escape(s: &str) -> String {
    let quoted = Value::String(s.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

/// Step 6 (docs/medplum-compat.md §5): each entry is kept and merged with the scope for its type (exact,
/// then `*`); a `*` entry without such a scope becomes one merged copy per scope; other entries are
/// dropped. Stricter than Medplum (docs/contract.md §2): each merged entry's interactions are narrowed to the
/// scope's letters, and an entry left with none is dropped.
pub fn apply_smart_scopes(
    resource: Vec<AccessPolicyResource>,
    scopes: &[SmartScope],
    patient_in_context: Option<&str>,
) -> Vec<AccessPolicyResource> {
    let mut out = Vec::new();
    for entry in &resource {
        if let Some(scope) = scope_for(scopes, &entry.resource_type) {
            out.extend(
                merge_with_scope(entry, scope)
                    .map(|m| within_patient(m, scope, patient_in_context)),
            );
        } else if entry.resource_type == "*" {
            for scope in scopes {
                out.extend(merge_with_scope(entry, scope).map(|mut merged| {
                    merged.resource_type = scope.resource_type.clone();
                    within_patient(merged, scope, patient_in_context)
                }));
            }
        }
    }
    out
}

/// A `patient/` scope's entry limited to the patient in context: that Patient itself, and for
/// every other type the resources in its compartment.
fn within_patient(
    mut entry: AccessPolicyResource,
    scope: &SmartScope,
    patient: Option<&str>,
) -> AccessPolicyResource {
    let (ScopeContext::Patient, Some(patient)) = (scope.context, patient) else {
        return entry;
    };
    // The definitions every caller reads (step 5) are nobody's data.
    if matches!(
        entry.resource_type.as_str(),
        "SearchParameter" | "StructureDefinition"
    ) {
        return entry;
    }
    let condition = if entry.resource_type == "Patient" {
        format!("_id={patient}")
    } else {
        format!("_compartment=Patient/{patient}")
    };
    entry.criteria = Some(match entry.criteria.take() {
        Some(c) if c.ends_with('&') || c.ends_with('?') => format!("{c}{condition}"),
        Some(c) => format!("{c}&{condition}"),
        None => format!("{}?{condition}", entry.resource_type),
    });
    entry
}

fn scope_for<'a>(scopes: &'a [SmartScope], resource_type: &str) -> Option<&'a SmartScope> {
    scopes
        .iter()
        .find(|s| s.resource_type == resource_type)
        .or_else(|| scopes.iter().find(|s| s.resource_type == "*"))
}

fn merge_with_scope(
    entry: &AccessPolicyResource,
    scope: &SmartScope,
) -> Option<AccessPolicyResource> {
    let granted = InteractionSet::of_entry(entry).intersection(scope.interactions());
    if granted.is_empty() {
        return None;
    }
    let mut merged = entry.clone();
    if scope.resource_type != "*"
        && let Some(c) = &merged.criteria
        && c.starts_with('*')
    {
        merged.criteria = Some(c.replacen('*', &scope.resource_type, 1));
    }
    if scope.is_read_only() {
        merged.readonly = Some(true);
    }
    if let Some(extra) = &scope.criteria {
        merged.criteria = Some(match merged.criteria.take() {
            // Medplum adds `&` unless the criteria already ends with one; after a bare `Type?`
            // it would produce `Type?&…`, which means the same.
            Some(c) if c.ends_with('&') || c.ends_with('?') => format!("{c}{extra}"),
            Some(c) => format!("{c}&{extra}"),
            None => format!("{}?{extra}", scope.resource_type),
        });
    }
    // Letters enforced: make the wire entry say exactly what it grants.
    if InteractionSet::of_entry(&merged) != granted {
        merged.interaction = Some(granted.codes());
    }
    Some(merged)
}

#[cfg(test)]
mod tests;
