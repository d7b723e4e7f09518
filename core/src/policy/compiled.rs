//! The compiled form of an AccessPolicy, used on every request: entries with an interaction
//! bitset, compiled criteria, parsed field paths and compiled IP rules, plus the decisions made
//! on it (docs/medplum-compat.md §4.3–§4.5) and the save-time validation of stored policies.
//!
//! Fail closed (docs/contract.md §2): an entry that cannot be compiled grants nothing, and it also stops the
//! first-match walk for the (type, interaction) pairs it covers, because it might have been the
//! first match with stricter `hiddenFields` or `readonlyFields` than the entries after it.
//! Invariant: pure; no I/O, no clock.

use std::borrow::Cow;
use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::fhir::request::Interaction;
use crate::policy::criteria::{Criteria, CriteriaError};
use crate::policy::ip::{CompiledIpRule, IpVerdict, check_ip};
use crate::policy::model::{
    AccessPolicy, AccessPolicyResource, CREDENTIAL_TYPES, PROJECT_ADMIN_TYPES, PROTECTED_TYPES,
    TRAIL_TYPES,
};

// === InteractionSet ===

/// A set of [`Interaction`]s as a bitset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InteractionSet(u8);

impl InteractionSet {
    pub const EMPTY: InteractionSet = InteractionSet(0);
    pub const ALL: InteractionSet = InteractionSet(0x7f);
    /// What a `readonly` entry grants: read, vread, history, search (docs/medplum-compat.md §4.3).
    pub const READ_ONLY: InteractionSet = InteractionSet(
        Self::bit(Interaction::Read)
            | Self::bit(Interaction::Vread)
            | Self::bit(Interaction::History)
            | Self::bit(Interaction::Search),
    );

    const fn bit(i: Interaction) -> u8 {
        match i {
            Interaction::Read => 1,
            Interaction::Vread => 1 << 1,
            Interaction::Update => 1 << 2,
            Interaction::Delete => 1 << 3,
            Interaction::History => 1 << 4,
            Interaction::Create => 1 << 5,
            Interaction::Search => 1 << 6,
        }
    }

    pub fn of(interactions: &[Interaction]) -> InteractionSet {
        interactions
            .iter()
            .fold(InteractionSet::EMPTY, |s, &i| s.with(i))
    }

    /// Parses `AccessPolicy.resource.interaction` codes; unknown codes are returned apart.
    pub fn from_codes<S: AsRef<str>>(codes: &[S]) -> (InteractionSet, Vec<String>) {
        let mut set = InteractionSet::EMPTY;
        let mut unknown = Vec::new();
        for code in codes {
            match Interaction::parse(code.as_ref()) {
                Some(i) => set = set.with(i),
                None => unknown.push(code.as_ref().to_string()),
            }
        }
        (set, unknown)
    }

    /// What an entry grants at type level: its `interaction` list when set, else the read-only
    /// set when `readonly`, else everything.
    pub fn of_entry(entry: &AccessPolicyResource) -> InteractionSet {
        match &entry.interaction {
            Some(codes) => InteractionSet::from_codes(codes).0,
            None if entry.readonly == Some(true) => InteractionSet::READ_ONLY,
            None => InteractionSet::ALL,
        }
    }

    #[must_use]
    pub fn with(self, i: Interaction) -> InteractionSet {
        InteractionSet(self.0 | Self::bit(i))
    }

    pub fn contains(self, i: Interaction) -> bool {
        self.0 & Self::bit(i) != 0
    }

    #[must_use]
    pub fn intersection(self, other: InteractionSet) -> InteractionSet {
        InteractionSet(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Members in the order of [`Interaction::ALL`].
    pub fn iter(self) -> impl Iterator<Item = Interaction> {
        Interaction::ALL
            .into_iter()
            .filter(move |&i| self.contains(i))
    }

    /// Wire codes in the order of [`Interaction::ALL`].
    pub fn codes(self) -> Vec<String> {
        self.iter().map(|i| i.as_str().to_string()).collect()
    }
}

// === PolicyError ===

/// Why a policy (or part of it) is refused at save time, or was compiled to "grants nothing".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("resourceType must be `AccessPolicy`")]
    NotAccessPolicy,
    #[error("unsupported element `{name}`")]
    UnsupportedPolicyElement { name: String },
    #[error("resource[{index}]: unknown resource type `{resource_type}`")]
    UnknownResourceType { index: usize, resource_type: String },
    #[error("resource[{index}]: unsupported element `{name}`")]
    UnsupportedEntryElement { index: usize, name: String },
    #[error("resource[{index}]: unknown interaction `{code}`")]
    UnknownInteraction { index: usize, code: String },
    #[error("resource[{index}]: criteria `{criteria}` must start with `{resource_type}?` (axp-3)")]
    CriteriaPrefix {
        index: usize,
        criteria: String,
        resource_type: String,
    },
    #[error("resource[{index}]: chained search parameter `{name}` is not allowed in criteria")]
    ChainedParameter { index: usize, name: String },
    #[error("resource[{index}]: invalid search parameter name `{name}` in criteria")]
    ParameterName { index: usize, name: String },
    #[error("resource[{index}]: invalid criteria `{criteria}`: {reason}")]
    Criteria {
        index: usize,
        criteria: String,
        reason: String,
    },
    #[error("resource[{index}]: invalid field path `{path}`")]
    FieldPath { index: usize, path: String },
    #[error(
        "resource[{index}]: writeConstraint[{constraint}] needs language `text/fhirpath` and an expression (axp-1)"
    )]
    WriteConstraint { index: usize, constraint: usize },
    #[error("resource[{index}]: compartment needs a reference")]
    Compartment { index: usize },
    #[error(
        "resource[{index}]: fhirgateOperation must be a list of operation names (`process-message`, without `$`)"
    )]
    OperationGrant { index: usize },
    #[error("invalid IP rule value `{value}`")]
    IpValue { value: String },
    #[error("invalid IP rule action `{action}`: must be `allow` or `block`")]
    IpAction { action: String },
    #[error("ipAccessRule[{index}]: {source}")]
    IpRule {
        index: usize,
        #[source]
        source: Box<PolicyError>,
    },
}

// === Resource types ===

/// Medplum's resource types that a policy may name (docs/medplum-compat.md §1, docs/contract.md §1) beyond those
/// `fhir::types` knows (R4 and the Medplum types a request can address).
const POLICY_ONLY_TYPES: &[&str] = &[
    "AsyncJob",
    "IdentityProvider",
    "Package",
    "PackageInstallation",
    "PackageRelease",
    "PasswordChangeRequest",
];

/// True for a FHIR R4 or Medplum resource type name.
pub fn is_known_resource_type(name: &str) -> bool {
    crate::fhir::types::is_resource_type(name) || POLICY_ONLY_TYPES.contains(&name)
}

/// `Project`, `ProjectMembership`, `User`, `UserSecurityRequest`: never granted by `*`.
pub fn is_project_admin_type(name: &str) -> bool {
    PROJECT_ADMIN_TYPES.contains(&name)
}

/// True for every type a `*` entry does not reach: the project admin types, the protected types
/// and the credential types (`AccessPolicy`, `ClientApplication`, `IdentityProvider`). Only an
/// entry naming the type grants it.
pub fn is_identity_type(name: &str) -> bool {
    is_project_admin_type(name) || is_protected_type(name) || CREDENTIAL_TYPES.contains(&name)
}

/// Whether a `*` entry grants `name`: not for identity types nor the security trail
/// ([`TRAIL_TYPES`]).
pub fn wildcard_reaches(name: &str) -> bool {
    !is_identity_type(name) && !TRAIL_TYPES.contains(&name)
}

/// `DomainConfiguration`, `JsonWebKey`, `Login`: super admins only.
pub fn is_protected_type(name: &str) -> bool {
    PROTECTED_TYPES.contains(&name)
}

// === FieldPath ===

/// One segment of a field path: an element name, or a choice element `value[x]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    name: String,
    choice: bool,
}

impl Segment {
    /// Does `key` name this element? At the leaf, the primitive sibling `_name` counts too.
    fn matches(&self, key: &str, leaf: bool) -> bool {
        let key = match key.strip_prefix('_') {
            Some(k) if leaf && !self.name.starts_with('_') => k,
            _ => key,
        };
        if self.choice {
            key.strip_prefix(self.name.as_str())
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_uppercase())
        } else {
            key == self.name
        }
    }
}

/// A `hiddenFields` / `readonlyFields` dot path (`meta.tag`, `name.given`, `value[x]`). Paths go
/// through arrays element by element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    raw: String,
    segments: Vec<Segment>,
}

impl FieldPath {
    /// Segments are element names (`[A-Za-z_][A-Za-z0-9_]*`), optionally ending in `[x]`.
    pub fn parse(raw: &str) -> Option<FieldPath> {
        let mut segments = Vec::new();
        for part in raw.split('.') {
            let (name, choice) = match part.strip_suffix("[x]") {
                Some(name) => (name, true),
                None => (part, false),
            };
            let mut chars = name.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None;
            }
            segments.push(Segment {
                name: name.to_string(),
                choice,
            });
        }
        Some(FieldPath {
            raw: raw.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The path's segments as written, `[x]` included.
    pub fn segments(&self) -> Vec<&str> {
        self.raw.split('.').collect()
    }

    /// Removes every value at this path (and the `_name` primitive siblings of the leaf).
    pub fn remove_from(&self, value: &mut Value) {
        remove_at(value, &self.segments);
    }

    /// Makes the value at this path in `new` equal to the one in `old` (or absent when `old` is
    /// `None`, i.e. on create). Where the path crosses an array, the whole array is restored, so
    /// that nothing under the path can differ from `old`.
    pub fn restore_from(&self, new: &mut Value, old: Option<&Value>) {
        match (new, old) {
            (Value::Object(n), Some(Value::Object(o))) => restore_at(n, Some(o), &self.segments),
            (n, _) => remove_at(n, &self.segments),
        }
    }
}

fn remove_at(value: &mut Value, segments: &[Segment]) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    match value {
        Value::Array(items) => {
            for item in items {
                remove_at(item, segments);
            }
        }
        Value::Object(map) => {
            if rest.is_empty() {
                map.retain(|k, _| !first.matches(k, true));
            } else {
                for (k, v) in map.iter_mut() {
                    if first.matches(k, false) {
                        remove_at(v, rest);
                    }
                }
            }
        }
        _ => {}
    }
}

fn restore_at(
    new: &mut Map<String, Value>,
    old: Option<&Map<String, Value>>,
    segments: &[Segment],
) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    let Some(old) = old else {
        let mut v = Value::Object(std::mem::take(new));
        remove_at(&mut v, segments);
        if let Value::Object(m) = v {
            *new = m;
        }
        return;
    };
    let leaf = rest.is_empty();
    if leaf || first.choice {
        // Replace every matching key wholesale with the old value (or drop it).
        new.retain(|k, _| !first.matches(k, leaf) || old.contains_key(k));
        for (k, v) in old.iter().filter(|(k, _)| first.matches(k, leaf)) {
            new.insert(k.clone(), v.clone());
        }
        return;
    }
    let key = first.name.as_str();
    match (new.get_mut(key), old.get(key)) {
        (None, None) => {}
        (Some(n), None) => remove_at(n, rest),
        (Some(Value::Object(n)), Some(Value::Object(o))) => restore_at(n, Some(o), rest),
        (None, Some(Value::Object(o))) => {
            let mut n = Map::new();
            restore_at(&mut n, Some(o), rest);
            if !n.is_empty() {
                new.insert(key.to_string(), Value::Object(n));
            }
        }
        (_, Some(o)) => {
            new.insert(key.to_string(), o.clone());
        }
    }
}

// === CompiledEntry ===

/// One `AccessPolicy.resource[]` entry, compiled.
#[derive(Debug, Clone)]
pub struct CompiledEntry {
    /// Position in the (effective) policy's `resource` list.
    pub index: usize,
    /// A type name or `*`.
    pub resource_type: String,
    /// What the entry grants at type level (after `readonly`, `interaction` and SMART letters).
    pub interactions: InteractionSet,
    /// Compiled criteria; for a `*` entry, the generic `*?…` form (see [`Self::criteria_for`]).
    pub criteria: Option<Criteria>,
    /// The deprecated `entry.compartment` reference string.
    pub compartment: Option<String>,
    pub hidden_fields: Vec<FieldPath>,
    pub readonly_fields: Vec<FieldPath>,
    /// FHIRPath `writeConstraint` expressions (language checked: `text/fhirpath`).
    pub write_constraints: Vec<String>,
    /// Operations granted by name (`fhirgateOperation`, without the `$`).
    pub operations: Vec<String>,
    /// Criteria that narrow a search: `criteria` AND `_compartment=<compartment>`.
    search_criteria: Option<Criteria>,
    broken: bool,
}

impl CompiledEntry {
    /// The entry could not be compiled: it grants nothing and stops the first-match walk.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    pub fn is_wildcard(&self) -> bool {
        self.resource_type == "*"
    }

    /// docs/medplum-compat.md §4.3: same type, or `*` for a type that is not an identity type (stricter
    /// than Medplum: `*` reaches neither admin nor credential types); and the interaction is
    /// granted. Broken entries still match here (so that they stop the walk).
    pub fn shallow_matches(&self, resource_type: &str, interaction: Interaction) -> bool {
        (self.resource_type == resource_type
            || (self.is_wildcard() && wildcard_reaches(resource_type)))
            && self.interactions.contains(interaction)
    }

    /// The criteria for a resource of `resource_type`: a `*?…` criteria is instantiated as
    /// `Type?…` (an error when one of its parameters does not exist on that type). `None` when
    /// the entry has no criteria.
    pub fn criteria_for(
        &self,
        resource_type: &str,
    ) -> Option<Result<Cow<'_, Criteria>, CriteriaError>> {
        Some(instantiate(self, self.criteria.as_ref()?, resource_type))
    }

    /// The criteria that narrow a search of `resource_type` (criteria AND deprecated
    /// compartment), instantiated like [`Self::criteria_for`]. `None` when the entry does not
    /// restrict searches.
    pub fn search_criteria_for(
        &self,
        resource_type: &str,
    ) -> Option<Result<Cow<'_, Criteria>, CriteriaError>> {
        Some(instantiate(
            self,
            self.search_criteria.as_ref()?,
            resource_type,
        ))
    }

    /// Instance conditions of docs/medplum-compat.md §4.4 (the type and interaction are assumed to
    /// shallow-match). A `*?…` criteria whose parameters do not exist on the resource's type does
    /// not match it.
    ///
    /// A `Binary` gets no exemption (Medplum lets every Binary through): it is checked like any
    /// other resource, so under an entry with conditions it passes only when it satisfies them
    /// itself. The gateway also grants it through its `securityContext`, FHIR's rule.
    fn instance_holds(&self, resource: &Value) -> bool {
        if let Some(compartment) = &self.compartment
            && !meta_compartment_contains(resource, compartment)
        {
            return false;
        }
        self.criteria.as_ref().is_none_or(|c| c.matches(resource))
    }
}

/// A concrete entry's criteria are used as they are; a `*` entry's are instantiated for the
/// concrete type (`*?a=b` → `Observation?a=b`).
fn instantiate<'a>(
    entry: &CompiledEntry,
    criteria: &'a Criteria,
    resource_type: &str,
) -> Result<Cow<'a, Criteria>, CriteriaError> {
    if entry.is_wildcard() {
        criteria.for_type(resource_type).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(criteria))
    }
}

fn meta_compartment_contains(resource: &Value, reference: &str) -> bool {
    resource
        .get("meta")
        .and_then(|m| m.get("compartment"))
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|r| r.get("reference").and_then(Value::as_str) == Some(reference))
        })
}

// === SearchNarrowing ===

/// How a search of one type is narrowed (docs/medplum-compat.md §4.5, failing closed).
#[derive(Debug, Clone)]
pub enum SearchNarrowing {
    /// Some entry granting search has no criteria: no filter.
    Unrestricted,
    /// The OR of these criteria (one per entry granting search).
    AnyOf(Vec<Criteria>),
    /// No entry grants search on the type.
    Denied,
}

// === CompiledPolicy ===

/// An AccessPolicy compiled for decisions. Built by [`CompiledPolicy::compile`], normally from an
/// effective policy (`effective.rs`).
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    entries: Vec<CompiledEntry>,
    ip_rules: Vec<CompiledIpRule>,
    super_admin: bool,
}

impl CompiledPolicy {
    /// Compiles `policy`. Never fails as a whole: what cannot be compiled is reported and fails
    /// closed (a broken entry grants nothing and stops the walk; a broken IP rule blocks).
    /// `super_admin` lifts the protected-type refusal in instance-level decisions.
    pub fn compile(policy: &AccessPolicy, super_admin: bool) -> (CompiledPolicy, Vec<PolicyError>) {
        let mut errors = Vec::new();
        let entries = policy
            .resource
            .iter()
            .enumerate()
            .map(|(index, entry)| compile_entry(index, entry, Mode::Compile, &mut errors))
            .collect();
        let ip_rules = policy
            .ip_access_rule
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                CompiledIpRule::compile(rule).unwrap_or_else(|e| {
                    errors.push(PolicyError::IpRule {
                        index,
                        source: Box::new(e),
                    });
                    CompiledIpRule::block_all(rule.name.clone())
                })
            })
            .collect();
        let compiled = CompiledPolicy {
            entries,
            ip_rules,
            super_admin,
        };
        (compiled, errors)
    }

    /// A policy that grants nothing (and has no IP rules, so refusals are 403s).
    pub fn deny_all(super_admin: bool) -> CompiledPolicy {
        CompiledPolicy {
            entries: Vec::new(),
            ip_rules: Vec::new(),
            super_admin,
        }
    }

    pub fn entries(&self) -> &[CompiledEntry] {
        &self.entries
    }

    pub fn ip_rules(&self) -> &[CompiledIpRule] {
        &self.ip_rules
    }

    pub fn is_super_admin(&self) -> bool {
        self.super_admin
    }

    /// Type-level check (docs/medplum-compat.md §4.3): protected types are refused unless `super_admin`;
    /// otherwise the first entry that shallow-matches must exist and not be broken.
    pub fn type_allows(
        &self,
        resource_type: &str,
        interaction: Interaction,
        super_admin: bool,
    ) -> bool {
        if is_protected_type(resource_type) && !super_admin {
            return false;
        }
        self.entries
            .iter()
            .find(|e| e.shallow_matches(resource_type, interaction))
            .is_some_and(|e| !e.broken)
    }

    /// Whether an entry grants the operation `$name` on `resource_type` (`None`: at the base,
    /// which only a `*` entry names) and, for an instance-level operation, on the instance `id`.
    /// The entry must allow `create` and list the operation in `fhirgateOperation`. An instance
    /// is granted only by an entry without instance conditions or one whose criteria pin exactly
    /// that id (`Bot?_id=stripe-webhook`): the gateway does not fetch the instance to match other
    /// criteria against it, so those grant nothing (fail closed).
    pub fn grants_operation(
        &self,
        name: &str,
        resource_type: Option<&str>,
        id: Option<&str>,
    ) -> bool {
        let ty = resource_type.unwrap_or("*");
        self.entries_for(ty, Interaction::Create)
            .filter(|e| e.operations.iter().any(|op| op == name))
            .any(|e| {
                e.compartment.is_none()
                    && match (&e.criteria, id) {
                        (None, _) => true,
                        (Some(c), Some(id)) => !e.is_wildcard() && c.pins_id(id),
                        (Some(_), None) => false,
                    }
            })
    }

    /// GraphQL (`$graphql`) answers are not resources the gateway can check one by one, so a
    /// policy may allow it only where nothing would have been filtered: some entry names
    /// `graphql` in `fhirgateOperation`, a `*` entry reads and searches every non-admin type
    /// without criteria, and no entry hides fields.
    pub fn allows_graphql(&self) -> bool {
        let named = self
            .entries
            .iter()
            .take_while(|e| !e.broken)
            .any(|e| e.operations.iter().any(|op| op == "graphql"));
        named
            && self.wildcard_unrestricted(Interaction::Read)
            && self.wildcard_unrestricted(Interaction::Search)
            && self.entries.iter().all(|e| e.hidden_fields.is_empty())
    }

    /// The entries that grant `interaction` on `resource_type`, in order, up to (excluding) the
    /// first broken one. Empty for a protected type unless this is a super admin's policy.
    pub fn entries_for<'a, 'r>(
        &'a self,
        resource_type: &'r str,
        interaction: Interaction,
    ) -> impl Iterator<Item = &'a CompiledEntry> + use<'a, 'r> {
        let refused = is_protected_type(resource_type) && !self.super_admin;
        self.entries
            .iter()
            .filter(move |e| !refused && e.shallow_matches(resource_type, interaction))
            .take_while(|e| !e.broken)
    }

    /// True when a `*` entry grants `interaction` on every non-admin type without criteria or
    /// compartment, and no broken entry granting `interaction` comes before it. Untyped targets
    /// (system-level searches, `_include=*`) need this.
    pub fn wildcard_unrestricted(&self, interaction: Interaction) -> bool {
        for entry in self
            .entries
            .iter()
            .filter(|e| e.interactions.contains(interaction))
        {
            if entry.broken {
                return false;
            }
            if entry.is_wildcard() && entry.criteria.is_none() && entry.compartment.is_none() {
                return true;
            }
        }
        false
    }

    /// False only when every resource of `resource_type` gets `interaction` from the same entry,
    /// unchanged: the first granting entry has no criteria, no compartment, no hiddenFields, no
    /// readonlyFields and no writeConstraint. Then a response can stream through unfiltered and
    /// a write needs no instance check. True when nothing grants (callers check the type first).
    pub fn instance_checks_needed(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.entries_for(resource_type, interaction)
            .next()
            .is_none_or(|e| {
                e.criteria.is_some()
                    || e.compartment.is_some()
                    || !e.hidden_fields.is_empty()
                    || !e.readonly_fields.is_empty()
                    || !e.write_constraints.is_empty()
            })
    }

    /// Whether a direct read of `resource_type/id` needs its response body checked. It does not
    /// when, walking the granting entries in order, one that certainly matches (no criteria, or
    /// criteria that pin exactly this id) is reached before any entry with hiddenFields, criteria
    /// on a `*` entry aside: whichever entry matches first then hides nothing. This is the
    /// common "a patient reads their own Patient" request, which can then stream.
    pub fn read_needs_check(&self, resource_type: &str, id: &str) -> bool {
        for e in self.entries_for(resource_type, Interaction::Read) {
            if !e.hidden_fields.is_empty() {
                return true;
            }
            let certain = e.compartment.is_none()
                && match &e.criteria {
                    None => true,
                    Some(c) => !e.is_wildcard() && c.pins_id(id),
                };
            if certain {
                return false;
            }
        }
        true
    }

    /// Whether a search may filter on `resource_type` as a target (`_has`, a chain, `_list`,
    /// `_filter`): only when every resource of it is searchable and nothing of it is hidden, since
    /// the primary results then reveal which targets match (an oracle on resources or fields
    /// the caller may not see). `*` (an untyped target) needs every searching entry to be so.
    pub fn search_target_open(&self, resource_type: &str) -> bool {
        let plain = |e: &CompiledEntry| {
            !e.broken
                && e.criteria.is_none()
                && e.compartment.is_none()
                && e.hidden_fields.is_empty()
        };
        if resource_type == "*" {
            let mut searching = self
                .entries
                .iter()
                .filter(|e| e.interactions.contains(Interaction::Search))
                .peekable();
            return searching.peek().is_some()
                && self.wildcard_unrestricted(Interaction::Search)
                && searching.all(plain);
        }
        self.entries_for(resource_type, Interaction::Search)
            .next()
            .is_some_and(plain)
    }

    /// The top-level elements hidden from a search of `resource_type` by any entry granting it:
    /// searching or sorting on them would reveal them.
    pub fn hidden_search_elements(&self, resource_type: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for e in self.entries_for(resource_type, Interaction::Search) {
            for path in &e.hidden_fields {
                let first = path.raw.split('.').next().unwrap_or("");
                let first = first.strip_suffix("[x]").unwrap_or(first);
                if !out.contains(&first) {
                    out.push(first);
                }
            }
        }
        out
    }

    /// How to narrow a search of `resource_type`: any granting entry without criteria leaves it
    /// unrestricted; otherwise the OR of their criteria; no granting entry denies.
    pub fn search_narrowing(&self, resource_type: &str) -> SearchNarrowing {
        let mut any = Vec::new();
        for entry in self.entries_for(resource_type, Interaction::Search) {
            match entry.search_criteria_for(resource_type) {
                None => return SearchNarrowing::Unrestricted,
                Some(Ok(c)) => any.push(c.into_owned()),
                // A `*?…` criteria naming parameters this type lacks matches nothing of it.
                Some(Err(_)) => {}
            }
        }
        if any.is_empty() {
            SearchNarrowing::Denied
        } else {
            SearchNarrowing::AnyOf(any)
        }
    }

    /// Instance-level check (docs/medplum-compat.md §4.4): the first entry, in list order, that
    /// shallow-matches the resource's type and `interaction` and whose instance conditions hold.
    pub fn satisfied(&self, resource: &Value, interaction: Interaction) -> Option<&CompiledEntry> {
        let resource_type = resource.get("resourceType")?.as_str()?;
        self.entries_for(resource_type, interaction)
            .find(|entry| entry.instance_holds(resource))
    }

    /// Removes `entry`'s hiddenFields from `resource`.
    pub fn redact(&self, resource: &mut Value, entry: &CompiledEntry) {
        for path in &entry.hidden_fields {
            path.remove_from(resource);
        }
    }

    /// Replaces `entry`'s readonlyFields in `new` by their values in `old` (removes them when
    /// `old` is `None`, on create).
    pub fn restore_readonly(&self, new: &mut Value, old: Option<&Value>, entry: &CompiledEntry) {
        for path in &entry.readonly_fields {
            path.restore_from(new, old);
        }
    }

    /// What every write does (docs/medplum-compat.md §4.5): readonly and hidden fields are the current
    /// version's (dropped on create), so a client can neither set them nor, by omitting a field
    /// it never saw, erase it.
    pub fn restore_protected_fields(
        &self,
        new: &mut Value,
        old: Option<&Value>,
        entry: &CompiledEntry,
    ) {
        for path in entry.readonly_fields.iter().chain(&entry.hidden_fields) {
            path.restore_from(new, old);
        }
    }

    pub fn check_ip(&self, addr: IpAddr) -> IpVerdict {
        check_ip(&self.ip_rules, addr)
    }
}

// === compile / validate ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Run time: criteria are compiled; failures make the entry broken.
    Compile,
    /// Save time: `%name` parameter placeholders may appear in criteria values.
    Validate,
}

/// `fhirgateOperation`: the operations an entry grants by name (see [`CompiledPolicy::grants_operation`]).
const ENTRY_ELEMENTS_OK: &[&str] = &["id", "extension", OPERATION_GRANT];
pub(crate) const OPERATION_GRANT: &str = "fhirgateOperation";
const POLICY_ELEMENTS_OK: &[&str] = &["meta", "text", "language", "contained", "extension"];

/// A non-empty list of operation names as a request path spells them after `$`; `None` for
/// anything else.
fn operation_names(ops: &Value) -> Option<Vec<String>> {
    let names = ops
        .as_array()?
        .iter()
        .map(|op| {
            op.as_str()
                .filter(|name| {
                    !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
                .map(str::to_string)
        })
        .collect::<Option<Vec<_>>>()?;
    (!names.is_empty()).then_some(names)
}

fn compile_entry(
    index: usize,
    entry: &AccessPolicyResource,
    mode: Mode,
    errors: &mut Vec<PolicyError>,
) -> CompiledEntry {
    let mut broken = false;
    let rt = entry.resource_type.as_str();
    if rt != "*" && !is_known_resource_type(rt) {
        // Reported; harmless at run time, since no real resource has that type.
        errors.push(PolicyError::UnknownResourceType {
            index,
            resource_type: rt.to_string(),
        });
    }
    let operations = match entry.extra.get(OPERATION_GRANT) {
        None => Vec::new(),
        Some(ops) => operation_names(ops).unwrap_or_else(|| {
            broken = true;
            errors.push(PolicyError::OperationGrant { index });
            Vec::new()
        }),
    };
    for name in entry.extra.keys() {
        if !ENTRY_ELEMENTS_OK.contains(&name.as_str()) {
            // A modifier extension could change the meaning of the entry: fail closed.
            broken |= name == "modifierExtension";
            errors.push(PolicyError::UnsupportedEntryElement {
                index,
                name: name.clone(),
            });
        }
    }

    let interactions = match &entry.interaction {
        Some(codes) => {
            let (set, unknown) = InteractionSet::from_codes(codes);
            for code in unknown {
                errors.push(PolicyError::UnknownInteraction { index, code });
            }
            set
        }
        None => InteractionSet::of_entry(entry),
    };

    let mut field_paths = |paths: &[String], broken: &mut bool| -> Vec<FieldPath> {
        paths
            .iter()
            .filter_map(|p| {
                let parsed = FieldPath::parse(p);
                if parsed.is_none() {
                    *broken = true;
                    errors.push(PolicyError::FieldPath {
                        index,
                        path: p.clone(),
                    });
                }
                parsed
            })
            .collect()
    };
    let hidden_fields = field_paths(&entry.hidden_fields, &mut broken);
    let readonly_fields = field_paths(&entry.readonly_fields, &mut broken);

    let mut write_constraints = Vec::new();
    for (constraint, expr) in entry.write_constraint.iter().enumerate() {
        match (expr.language.as_deref(), expr.expression.as_deref()) {
            // Outside the supported FHIRPath subset: refused at save time, broken at run time.
            (Some("text/fhirpath"), Some(e))
                if !e.trim().is_empty()
                    && crate::policy::fhirpath::Expression::parse(e).is_ok() =>
            {
                write_constraints.push(e.to_string());
            }
            _ => {
                broken = true;
                errors.push(PolicyError::WriteConstraint { index, constraint });
            }
        }
    }

    let compartment = match &entry.compartment {
        None => None,
        Some(r) => match r.reference.as_deref() {
            Some(s) if !s.is_empty() => Some(s.to_string()),
            _ => {
                broken = true;
                errors.push(PolicyError::Compartment { index });
                None
            }
        },
    };

    let mut criteria = None;
    let mut query = None;
    if let Some(raw) = &entry.criteria {
        match check_criteria_shape(index, rt, raw, errors) {
            None => broken = true,
            Some(q) => {
                query = Some(q);
                match mode {
                    Mode::Compile => match Criteria::parse(rt, raw) {
                        Ok(c) => criteria = Some(c),
                        Err(e) => {
                            broken = true;
                            errors.push(criteria_error(index, raw, &e));
                        }
                    },
                    Mode::Validate => validate_criteria_values(index, rt, raw, q, errors),
                }
            }
        }
    }

    let mut search_criteria = criteria.clone();
    if let Some(reference) = &compartment
        && mode == Mode::Compile
        && !broken
    {
        let value: String = form_urlencoded::byte_serialize(reference.as_bytes()).collect();
        let combined = match query {
            Some(q) if !q.is_empty() => format!("{rt}?{q}&_compartment={value}"),
            _ => format!("{rt}?_compartment={value}"),
        };
        match Criteria::parse(rt, &combined) {
            Ok(c) => search_criteria = Some(c),
            Err(e) => {
                broken = true;
                errors.push(criteria_error(index, &combined, &e));
            }
        }
    }

    CompiledEntry {
        index,
        resource_type: rt.to_string(),
        interactions,
        criteria,
        compartment,
        hidden_fields,
        readonly_fields,
        write_constraints,
        operations,
        search_criteria,
        broken,
    }
}

fn criteria_error(index: usize, criteria: &str, e: &CriteriaError) -> PolicyError {
    PolicyError::Criteria {
        index,
        criteria: criteria.to_string(),
        reason: e.to_string(),
    }
}

/// axp-3 and parameter names: `Type?…` (or `*?…`), every name non-empty, without `%`, and not a
/// chain (`a.b`, `_has:…`; #8948). Returns the query part, or `None` after reporting errors.
fn check_criteria_shape<'a>(
    index: usize,
    resource_type: &str,
    criteria: &'a str,
    errors: &mut Vec<PolicyError>,
) -> Option<&'a str> {
    let Some(query) = criteria
        .strip_prefix(resource_type)
        .and_then(|rest| rest.strip_prefix('?'))
    else {
        errors.push(PolicyError::CriteriaPrefix {
            index,
            criteria: criteria.to_string(),
            resource_type: resource_type.to_string(),
        });
        return None;
    };
    let before = errors.len();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let raw_name = piece.split_once('=').map_or(piece, |(n, _)| n);
        let name = decode_component(raw_name);
        if name.is_empty() || raw_name.contains('%') {
            errors.push(PolicyError::ParameterName { index, name });
        } else if is_chained(&name) {
            errors.push(PolicyError::ChainedParameter { index, name });
        }
    }
    (errors.len() == before).then_some(query)
}

/// A chained (`subject.name`, `subject:Patient.name`) or reverse-chained (`_has:…`) parameter.
fn is_chained(name: &str) -> bool {
    name.contains('.') || name == "_has" || name.starts_with("_has:")
}

fn decode_component(s: &str) -> String {
    form_urlencoded::parse(format!("{s}=").as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

/// Save-time check of the criteria semantics. Pieces whose value holds a `%name` placeholder
/// cannot be checked as written, so each is checked with stand-in values and accepted when any of
/// them parses (the parameter name and modifier are what is being checked).
fn validate_criteria_values(
    index: usize,
    resource_type: &str,
    criteria: &str,
    query: &str,
    errors: &mut Vec<PolicyError>,
) {
    const STAND_INS: [&str; 4] = ["x", "Patient/x", "2000-01-01", "0"];
    let (templated, plain): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .filter(|p| !p.is_empty())
        .partition(|p| p.split_once('=').is_some_and(|(_, v)| v.contains('%')));
    if templated.is_empty() {
        if let Err(e) = Criteria::parse(resource_type, criteria) {
            errors.push(criteria_error(index, criteria, &e));
        }
        return;
    }
    if !plain.is_empty() {
        let probe = format!("{resource_type}?{}", plain.join("&"));
        if let Err(e) = Criteria::parse(resource_type, &probe) {
            errors.push(criteria_error(index, criteria, &e));
        }
    }
    for piece in templated {
        let name = piece.split_once('=').map_or(piece, |(n, _)| n);
        let mut first_error = None;
        let ok = STAND_INS.iter().any(|v| {
            match Criteria::parse(resource_type, &format!("{resource_type}?{name}={v}")) {
                Ok(_) => true,
                Err(e) => {
                    first_error.get_or_insert(e);
                    false
                }
            }
        });
        if let (false, Some(e)) = (ok, first_error) {
            errors.push(criteria_error(index, criteria, &e));
        }
    }
}

/// Save-time validation of a stored AccessPolicy: resource types, interaction codes, criteria
/// (axp-3, no chains, known parameters; `%name` placeholders accepted in values), field paths,
/// writeConstraints (axp-1), compartments and IP rules. Returns every problem found.
pub fn validate_policy(policy: &AccessPolicy) -> Result<(), Vec<PolicyError>> {
    let mut errors = Vec::new();
    if policy.resource_type != "AccessPolicy" {
        errors.push(PolicyError::NotAccessPolicy);
    }
    for name in policy.extra.keys() {
        if !POLICY_ELEMENTS_OK.contains(&name.as_str()) {
            errors.push(PolicyError::UnsupportedPolicyElement { name: name.clone() });
        }
    }
    for (index, entry) in policy.resource.iter().enumerate() {
        compile_entry(index, entry, Mode::Validate, &mut errors);
    }
    for (index, rule) in policy.ip_access_rule.iter().enumerate() {
        if let Err(e) = CompiledIpRule::compile(rule) {
            errors.push(PolicyError::IpRule {
                index,
                source: Box::new(e),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests;
