//! `decide`: a classified request under an effective policy → `Decision`. Pure.
//!
//! Denials are values with a stable label; the wire text comes from `fhir::outcome`. A `Permit`
//! says what the gateway must still do: append narrowing parameters to a search, filter the
//! response, or check a write against the current version.

use super::criteria::CONTAINS_MODIFIER;
use crate::fhir::classify::RESULT_PARAMS;
use crate::fhir::request::{ANY_TYPE, FhirOp, FhirRequest, Interaction, QueryParam, Search};
use crate::fhir::search::search_required_access;
use crate::fhir::subset::Subset;
use crate::policy::EffectivePolicy;
use crate::policy::effective::SearchNarrowing;

/// Operations that only read, authorized as a read of their target and filtered like a search.
pub const READ_OPERATIONS: [&str; 3] = ["everything", "summary", "document"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deny {
    /// 403: the type or interaction is not allowed. The label says which rule.
    Forbidden(&'static str),
    /// 400 with a text.
    BadRequest(&'static str, String),
}

impl Deny {
    pub fn label(&self) -> &'static str {
        match self {
            Deny::Forbidden(l) | Deny::BadRequest(l, _) => l,
        }
    }
}

/// What the response needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseNeed {
    /// Stream it untouched.
    Untouched,
    /// A single resource: check it (failing → 404) and redact it.
    CheckResource,
    /// A Bundle (or anything with resources in it): drop what fails, redact the rest.
    FilterResources,
}

/// Write checks the gateway performs with the current version in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCheck {
    None,
    /// The new resource must satisfy a `create` entry; readonly fields are dropped.
    Create,
    /// The current version must satisfy `update`, readonly fields are restored, the result must
    /// satisfy `update`, and the write carries `If-Match`.
    Update,
    /// The current version must satisfy `delete`; the delete carries `If-Match`.
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Permit {
    pub narrowing: Vec<QueryParam>,
    pub response: ResponseNeed,
    pub write: WriteCheck,
    /// `Bundle.total` cannot be trusted (the upstream was not narrowed exactly).
    pub drop_total: bool,
    /// The instance the request names must be visible first (its current version is fetched
    /// and checked; invisible → 404), so an empty answer cannot reveal that it exists.
    pub guard_current: bool,
    /// The client asked for part of each resource, and the resources are checked: the
    /// upstream is asked for whole ones (`fhir::subset::strip_query`) and the gateway trims
    /// them after the checks.
    pub subset: Option<Subset>,
}

/// `params` names a `:contains` search, which some servers refuse (HAPI with
/// `allow_contains_searches` off: HAPI-1258).
pub fn has_contains(params: &[QueryParam]) -> bool {
    params.iter().any(|p| p.name.ends_with(CONTAINS_MODIFIER))
}

impl Permit {
    /// The permit for an upstream that cannot search with `:contains`: those narrowing
    /// parameters stay home. The upstream answers more than the criteria allow, which is safe
    /// because every resource of a search is checked here ([`ResponseNeed::FilterResources`]),
    /// and its `total` then counts what the caller may not see, so it is dropped.
    pub fn without_contains(mut self) -> Permit {
        if has_contains(&self.narrowing) {
            self.narrowing
                .retain(|p| !p.name.ends_with(CONTAINS_MODIFIER));
            self.drop_total = true;
        }
        self
    }

    fn untouched() -> Permit {
        Permit {
            narrowing: Vec::new(),
            response: ResponseNeed::Untouched,
            write: WriteCheck::None,
            drop_total: false,
            guard_current: false,
            subset: None,
        }
    }
    fn filtered() -> Permit {
        Permit {
            response: ResponseNeed::FilterResources,
            ..Permit::untouched()
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow(Permit),
    Deny(Deny),
}

fn need(policy: &EffectivePolicy, ty: &str, i: Interaction, super_admin: bool) -> Result<(), Deny> {
    if ty == "*" {
        // An untyped include, chain or system-level request: only an unrestricted wildcard covers it.
        if policy.wildcard_unrestricted(i) {
            return Ok(());
        }
        return Err(Deny::Forbidden("untyped_target"));
    }
    if policy.type_allows(ty, i, super_admin) {
        Ok(())
    } else {
        Err(Deny::Forbidden("type_interaction"))
    }
}

/// The narrowing for a search of `ty`, as parameters to append, or a denial.
fn narrowing(policy: &EffectivePolicy, ty: &str) -> Result<(Vec<QueryParam>, bool), Deny> {
    match policy.search_narrowing(ty) {
        SearchNarrowing::Unrestricted => Ok((Vec::new(), false)),
        SearchNarrowing::Denied => Err(Deny::Forbidden("type_interaction")),
        SearchNarrowing::AnyOf(list) => {
            if list.len() == 1 {
                return Ok((list[0].query_params().to_vec(), false));
            }
            // Several alternatives: an OR can be sent upstream only when every alternative is one
            // parameter with the same name (comma means OR); otherwise filter only.
            let names: Vec<&str> = list
                .iter()
                .filter_map(|c| match c.query_params() {
                    [p] => Some(p.name.as_str()),
                    _ => None,
                })
                .collect();
            if names.len() == list.len() && names.windows(2).all(|w| w[0] == w[1]) {
                let values: Vec<&str> = list
                    .iter()
                    .map(|c| c.query_params()[0].value.as_str())
                    .collect();
                return Ok((
                    vec![QueryParam {
                        name: names[0].to_string(),
                        value: values.join(","),
                    }],
                    false,
                ));
            }
            Ok((Vec::new(), true))
        }
    }
}

/// `_include` and `_revinclude` only add resources to the response, and every returned resource
/// is checked, so they need no permission of their own: what the caller may not see is dropped.
/// Everything that can change which primary resources match (`_has`, chains) needs search
/// permission on its target type.
pub fn is_include(name: &str) -> bool {
    let base = name.split(':').next().unwrap_or(name);
    base == "_include" || base == "_revinclude"
}

/// The `(type, interaction)` pairs [`decide`] checks for `op`; every one must be allowed. They
/// are the request's [`FhirOp::required_access`], except that a search's `_include` and
/// `_revinclude` need nothing (see [`is_include`]) and a read-like operation
/// ([`READ_OPERATIONS`]) needs a read of its instance or a search of its type (`*` at system
/// level). Other operations are granted by name, Bundles entry by entry: no pairs.
pub fn checked_access(op: &FhirOp) -> Vec<(String, Interaction)> {
    match op {
        FhirOp::Search(s) => search_required_access(s, |p| is_include(&p.name)),
        FhirOp::Operation {
            name,
            resource_type,
            id,
        } if READ_OPERATIONS.contains(&name.as_str()) => {
            let ty = resource_type.as_deref().unwrap_or(ANY_TYPE);
            let i = if id.is_some() {
                Interaction::Read
            } else {
                Interaction::Search
            };
            vec![(ty.to_string(), i)]
        }
        other => other.required_access(),
    }
}

/// Every pair of [`checked_access`] must be allowed.
fn need_all(policy: &EffectivePolicy, op: &FhirOp, super_admin: bool) -> Result<(), Deny> {
    for (ty, i) in checked_access(op) {
        need(policy, &ty, i, super_admin)?;
    }
    Ok(())
}

/// Stricter than Medplum: a search may not use another type as a filter (`_has`, chains,
/// `_list`, `_filter`, `_query`) unless every resource of that type is searchable and none of
/// its fields hidden, and may not filter or sort on a field hidden from the searched type.
/// Either would answer questions about what the caller cannot see.
fn search_reveals_nothing(policy: &EffectivePolicy, s: &Search) -> Result<(), Deny> {
    let selecting: Vec<QueryParam> = s
        .params
        .iter()
        .filter(|p| {
            // What selects primary results: not the result parameters (`_sort`'s codes are
            // checked below), nor `_type`, which names the searched types themselves.
            let base = p.name.split(':').next().unwrap_or("");
            !RESULT_PARAMS.contains(&base) && base != "_type"
        })
        .cloned()
        .collect();
    let targets = crate::fhir::search::referenced_types(&selecting)
        .map_err(|_| Deny::Forbidden("search_target_restricted"))?;
    if targets.iter().any(|t| !policy.search_target_open(t)) {
        return Err(Deny::Forbidden("search_target_restricted"));
    }
    let Some(ty) = &s.resource_type else {
        return Ok(());
    };
    let hidden = policy.hidden_search_elements(ty);
    if hidden.is_empty() {
        return Ok(());
    }
    let sort_codes = s
        .params
        .iter()
        .filter(|p| p.name == "_sort")
        .flat_map(|p| p.value.split(','))
        .map(|c| c.trim().trim_start_matches('-'));
    let codes = selecting
        .iter()
        .map(|p| p.name.split(['.', ':']).next().unwrap_or(""))
        .chain(sort_codes);
    for code in codes {
        if code.is_empty() {
            continue;
        }
        let touches_hidden = match crate::fhir::searchparam::lookup(ty, code) {
            // A parameter whose definition we cannot see through could read anything: refuse.
            None => true,
            // `_text`, `_content`: full-text search reads every element.
            Some(def) if def.expression.is_empty() => true,
            Some(def) => hidden
                .iter()
                .any(|field| expression_reads(&def.expression, ty, field)),
        };
        if touches_hidden {
            return Err(Deny::Forbidden("search_hidden_field"));
        }
    }
    Ok(())
}

/// Whether a search parameter's FHIRPath `expression` reads `field` of `ty` (textually: the
/// element after `ty.`, or after a `(` / `|` alternative; a choice element `value[x]` is written
/// `valueQuantity`, `value.as(…)`, so a prefix match counts too).
fn expression_reads(expression: &str, ty: &str, field: &str) -> bool {
    let prefix = format!("{ty}.");
    expression.split(['|', '(', ')', ' ']).any(|part| {
        part.trim().strip_prefix(&prefix).is_some_and(|rest| {
            let element = rest.split(['.', ' ', '[']).next().unwrap_or("");
            !element.is_empty() && (element.starts_with(field) || field.starts_with(element))
        })
    })
}

/// The permit of an allowed search: its narrowing, and whether `Bundle.total` can be trusted.
fn search_permit(policy: &EffectivePolicy, s: &Search) -> Result<Permit, Deny> {
    search_reveals_nothing(policy, s)?;
    let mut permit = Permit::filtered();
    if let Some(ty) = &s.resource_type {
        let (params, drop_total) = narrowing(policy, ty)?;
        permit.narrowing = params;
        permit.drop_total = drop_total;
    } else {
        permit.drop_total = true;
    }
    // The project's own resources only: narrowed upstream where FHIR search can say it, and
    // every returned resource is checked in any case.
    let isolation = policy.isolation();
    if isolation.is_active() {
        permit.narrowing.extend(isolation.narrowing());
        permit.drop_total |= !isolation.narrows_exactly();
    }
    Ok(permit)
}

/// The permit of a read of one resource: streamed untouched, or checked when `check`.
fn single_read(check: bool) -> Permit {
    Permit {
        response: if check {
            ResponseNeed::CheckResource
        } else {
            ResponseNeed::Untouched
        },
        ..Permit::untouched()
    }
}

/// The target types of conditional references (`"reference": "Patient?identifier=…"`) in a
/// body about to be written, including inside a JSON Patch or Parameters document. The
/// upstream resolves them with a search the caller's policy never narrows.
pub fn conditional_reference_targets(body: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map {
                    if k == "reference"
                        && let Some(r) = child.as_str()
                        && let Some((ty, _)) = r.split_once('?')
                    {
                        let ty = if ty.is_empty() { "*" } else { ty };
                        if !out.iter().any(|t| t == ty) {
                            out.push(ty.to_string());
                        }
                    }
                    walk(child, out);
                }
            }
            serde_json::Value::Array(list) => list.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(body, &mut out);
    out
}

/// A write whose body resolves conditional references needs every target searchable in full
/// (see [`search_reveals_nothing`]); otherwise it links to, and reveals, what the caller
/// cannot see.
fn check_conditional_references(policy: &EffectivePolicy, op: &FhirOp) -> Result<(), Deny> {
    let body = match op {
        FhirOp::Create { resource, .. }
        | FhirOp::Update { resource, .. }
        | FhirOp::ConditionalUpdate { resource, .. } => resource.as_ref(),
        FhirOp::Patch { patch, .. } | FhirOp::ConditionalPatch { patch, .. } => patch.as_ref(),
        _ => None,
    };
    let Some(body) = body else {
        return Ok(());
    };
    if conditional_reference_targets(body)
        .iter()
        .any(|t| !policy.search_target_open(t))
    {
        return Err(Deny::Forbidden("conditional_reference"));
    }
    Ok(())
}

/// Read, vread, update, patch and delete check their one pair directly (it is what
/// [`checked_access`] returns for them), without building a list on the request path.
fn decide_op(policy: &EffectivePolicy, op: &FhirOp, super_admin: bool) -> Result<Permit, Deny> {
    check_conditional_references(policy, op)?;
    match op {
        FhirOp::Capabilities => Ok(Permit::untouched()),
        FhirOp::Read { resource_type, id } => {
            need(policy, resource_type, Interaction::Read, super_admin)?;
            Ok(single_read(policy.read_needs_check(resource_type, id)))
        }
        FhirOp::Vread { resource_type, .. } => {
            let i = Interaction::Vread;
            need(policy, resource_type, i, super_admin)?;
            Ok(single_read(policy.instance_checks_needed(resource_type, i)))
        }
        FhirOp::Search(s) => {
            need_all(policy, op, super_admin)?;
            search_permit(policy, s)
        }
        FhirOp::History { resource_type, id } => {
            need_all(policy, op, super_admin)?;
            let guard_current = match (resource_type, id) {
                (Some(ty), Some(_)) => policy.instance_checks_needed(ty, Interaction::History),
                _ => false,
            };
            Ok(Permit {
                drop_total: true,
                guard_current,
                ..Permit::filtered()
            })
        }
        FhirOp::Create { .. } => {
            need_all(policy, op, super_admin)?;
            Ok(Permit {
                write: WriteCheck::Create,
                response: ResponseNeed::CheckResource,
                ..Permit::untouched()
            })
        }
        FhirOp::Update { resource_type, .. } | FhirOp::Patch { resource_type, .. } => {
            need(policy, resource_type, Interaction::Update, super_admin)?;
            Ok(Permit {
                write: WriteCheck::Update,
                response: ResponseNeed::CheckResource,
                ..Permit::untouched()
            })
        }
        FhirOp::Delete { resource_type, .. } => {
            need(policy, resource_type, Interaction::Delete, super_admin)?;
            Ok(Permit {
                write: WriteCheck::Delete,
                ..Permit::untouched()
            })
        }
        FhirOp::ConditionalUpdate { resource_type, .. }
        | FhirOp::ConditionalPatch { resource_type, .. }
        | FhirOp::ConditionalDelete { resource_type, .. } => {
            need_all(policy, op, super_admin)?;
            // The target is chosen by the upstream, so only a policy without instance conditions
            // for this type can allow it.
            let i = if matches!(op, FhirOp::ConditionalDelete { .. }) {
                Interaction::Delete
            } else {
                Interaction::Update
            };
            if policy.instance_checks_needed(resource_type, i)
                || policy.instance_checks_needed(resource_type, Interaction::Search)
            {
                return Err(Deny::Forbidden("conditional_write_with_criteria"));
            }
            Ok(Permit {
                response: ResponseNeed::CheckResource,
                ..Permit::untouched()
            })
        }
        FhirOp::Operation {
            name,
            resource_type,
            id,
        } => {
            if READ_OPERATIONS.contains(&name.as_str()) {
                need_all(policy, op, super_admin)?;
                // `Patient/p2/$everything` must not answer differently for an instance the
                // caller cannot read: the instance itself is checked first.
                let guard_current = match (resource_type, id) {
                    (Some(ty), Some(_)) => policy.instance_checks_needed(ty, Interaction::Read),
                    _ => false,
                };
                return Ok(Permit {
                    drop_total: true,
                    guard_current,
                    ..Permit::filtered()
                });
            }
            // An operation's effects on the upstream are not checked resource by resource, so
            // an isolated project cannot run one (it could reach another project's data).
            if policy.isolation().is_active() {
                return Err(Deny::Forbidden("operation_isolated"));
            }
            // Any other operation is granted by name: `CompiledPolicy::grants_operation`.
            if super_admin
                || policy
                    .compiled()
                    .grants_operation(name, resource_type.as_deref(), id.as_deref())
            {
                return Ok(Permit::filtered());
            }
            Err(Deny::Forbidden("operation_not_granted"))
        }
        // GraphQL answers stream through unchecked: never for an isolated project.
        FhirOp::GraphQl if policy.isolation().is_active() => {
            Err(Deny::Forbidden("graphql_isolated"))
        }
        FhirOp::GraphQl if super_admin || policy.compiled().allows_graphql() => {
            Ok(Permit::untouched())
        }
        FhirOp::GraphQl => Err(Deny::Forbidden("graphql")),
        FhirOp::Bundle { .. } => Err(Deny::Forbidden("nested_bundle")),
        // The gateway follows only handles it sealed for this caller (`fhir::page`); what the
        // page holds is checked resource by resource, and its total may count what the caller
        // may not see.
        FhirOp::Page { .. } => Ok(Permit {
            drop_total: true,
            ..Permit::filtered()
        }),
    }
}

fn decision(result: Result<Permit, Deny>) -> Decision {
    match result {
        Ok(p) => Decision::Allow(p),
        Err(d) => Decision::Deny(d),
    }
}

/// Decides a request. Bundles are decided entry by entry by `decide_bundle`.
pub fn decide(policy: &EffectivePolicy, req: &FhirRequest, super_admin: bool) -> Decision {
    if req.wants_non_json {
        return Decision::Deny(Deny::BadRequest(
            "non_json_format",
            "Only JSON is supported".into(),
        ));
    }
    match decision(decide_op(policy, &req.op, super_admin)) {
        Decision::Allow(mut permit)
            if req.subset.is_some()
                && permit.response != ResponseNeed::Untouched
                && subset_checked_here(policy, &req.op) =>
        {
            permit.subset.clone_from(&req.subset);
            Decision::Allow(permit)
        }
        other => other,
    }
}

/// Whether a subset must be taken by the gateway, after its checks, rather than by the
/// upstream: wherever a returned resource is checked against criteria or the project marker
/// (an `_include` brings other types, a system-wide search any type).
fn subset_checked_here(policy: &EffectivePolicy, op: &FhirOp) -> bool {
    match op {
        FhirOp::Read { resource_type, .. } | FhirOp::Vread { resource_type, .. } => {
            policy.instance_checks_needed(resource_type, Interaction::Read)
        }
        FhirOp::Search(s) => {
            let includes = s.params.iter().any(|p| {
                let base = p.name.split(':').next().unwrap_or("");
                base == "_include" || base == "_revinclude"
            });
            includes
                || s.resource_type
                    .as_deref()
                    .is_none_or(|ty| policy.instance_checks_needed(ty, Interaction::Search))
        }
        _ => true,
    }
}

/// Decides each entry of a batch or transaction.
pub fn decide_entries(policy: &EffectivePolicy, op: &FhirOp, super_admin: bool) -> Vec<Decision> {
    let FhirOp::Bundle { entries, .. } = op else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|e| match &e.op {
            Ok(FhirOp::Bundle { .. }) => Decision::Deny(Deny::Forbidden("nested_bundle")),
            Ok(op) => decision(decide_op(policy, op, super_admin)),
            Err(_) => Decision::Deny(Deny::BadRequest(
                "unclassifiable",
                "Invalid bundle entry".into(),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests;
