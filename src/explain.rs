//! `fhirgate policy explain`: the decision trace of one request under a membership built in
//! memory from AccessPolicy files, or a membership read from the store (the CLI reads it; this
//! module gets it as data). It runs the same pure steps as the gateway (effective policy, IP
//! rules, classification, decision, and the write check of a created resource) and says, at
//! each step, which entry or rule decided. Pure: no store, no network, no clock.

use std::fmt::Write as _;
use std::net::IpAddr;

use fhirgate_core::fhir::classify::classify;
use fhirgate_core::fhir::path::is_valid_id;
use fhirgate_core::fhir::request::{FhirOp, FhirRequest, Interaction, QueryParam, RequestParts};
use fhirgate_core::fhir::types::is_control_type;
use fhirgate_core::policy::EffectivePolicy;
use fhirgate_core::policy::compiled::{
    InteractionSet, is_known_resource_type, is_project_admin_type, is_protected_type,
    wildcard_reaches,
};
use fhirgate_core::policy::decide::{
    Decision, Deny, Permit, ResponseNeed, WriteCheck, checked_access, decide, decide_entries,
    is_include,
};
use fhirgate_core::policy::effective::{EffectiveInputs, SearchNarrowing, effective};
use fhirgate_core::policy::ip::IpVerdict;
use fhirgate_core::policy::model::{
    AccessParameter, AccessPolicy, MembershipAccess, ProjectMembership, Reference,
};
use fhirgate_core::policy::write::WriteRefusal;
use serde_json::Value;

/// Project id of the in-memory membership (it appears in a project admin's entries).
pub const PROJECT_ID: &str = "explain";

/// A membership as the store has it, with what its effective policy is built from.
#[derive(Debug, Clone)]
pub struct StoredMembership {
    pub membership: ProjectMembership,
    pub project_id: String,
    /// The project is the super-admin project.
    pub super_admin: bool,
    /// The project's upstream binding and what it sees of it.
    pub upstream: String,
    pub isolation: fhirgate_core::policy::isolation::Isolation,
}

/// Everything `explain` needs; the CLI fills it from flags and files (or the store).
#[derive(Debug, Clone, Default)]
pub struct ExplainInput {
    /// The membership's policies, in order; each must have an id. With `stored`: every policy
    /// the membership may reference.
    pub policies: Vec<AccessPolicy>,
    /// A stored membership: used as it is instead of one built from `policies`, `parameters`,
    /// `profile` and `admin`.
    pub stored: Option<StoredMembership>,
    /// Parameters given to every policy (`ProjectMembership.access[].parameter`).
    pub parameters: Vec<AccessParameter>,
    /// `Type/id`; default `ClientApplication/explain`.
    pub profile: Option<String>,
    pub admin: bool,
    /// The token's SMART scope; `None` as for Basic auth (no narrowing).
    pub scope: Option<String>,
    pub ip: Option<IpAddr>,
    pub method: String,
    /// Relative to `/fhir/R4/`, with the query (`Observation?code=x`).
    pub path: String,
    /// Extra request headers (`if-none-exist`, `accept`, …).
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// `name=value` → a parameter: a value shaped like `Type/id` (a known resource type) is a
/// `valueReference`, anything else a `valueString`.
pub fn parse_param(text: &str) -> Result<AccessParameter, String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("parameter `{text}` must be name=value"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("parameter `{text}` has no name"));
    }
    let is_reference = value
        .split_once('/')
        .is_some_and(|(ty, id)| is_known_resource_type(ty) && is_valid_id(id));
    Ok(if is_reference {
        AccessParameter {
            name: name.to_string(),
            value_string: None,
            value_reference: Some(Reference::to(value)),
        }
    } else {
        AccessParameter {
            name: name.to_string(),
            value_string: Some(value.to_string()),
            value_reference: None,
        }
    })
}

/// `name: value` → a lower-cased header pair.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header `{text}` must be `name: value`"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("header `{text}` has no name"));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_string()))
}

fn param_text(p: &AccessParameter) -> String {
    match (&p.value_string, &p.value_reference) {
        (Some(s), _) => format!("{}={s} (string)", p.name),
        (None, Some(r)) => format!(
            "{}={} (reference)",
            p.name,
            r.reference.as_deref().unwrap_or("")
        ),
        (None, None) => format!("{}=(empty)", p.name),
    }
}

fn query_text(params: &[QueryParam]) -> String {
    params
        .iter()
        .map(|p| format!("{}={}", p.name, p.value))
        .collect::<Vec<_>>()
        .join("&")
}

fn codes(set: InteractionSet) -> String {
    let c = set.codes();
    if c.is_empty() {
        "nothing".into()
    } else {
        c.join(", ")
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// The membership `explain` runs as.
fn membership(input: &ExplainInput) -> Result<ProjectMembership, String> {
    let profile = input
        .profile
        .clone()
        .unwrap_or_else(|| "ClientApplication/explain".into());
    let profile_ref = Reference::to(profile.clone());
    let Some((profile_type, _)) = profile_ref.type_and_id() else {
        return Err(format!("profile `{profile}` must be Type/id"));
    };
    let user = if matches!(profile_type, "ClientApplication" | "Bot") {
        profile_ref.clone()
    } else {
        Reference::to("User/explain")
    };
    let mut access = Vec::new();
    let mut ids: Vec<&str> = Vec::new();
    for p in &input.policies {
        let id =
            p.id.as_deref()
                .ok_or_else(|| "every policy needs an id".to_string())?;
        if ids.contains(&id) {
            return Err(format!("two policies have the id `{id}`"));
        }
        ids.push(id);
        access.push(MembershipAccess {
            policy: Reference::to(format!("AccessPolicy/{id}")),
            parameter: input.parameters.clone(),
        });
    }
    Ok(ProjectMembership {
        id: Some("explain".into()),
        project: Reference::to(format!("Project/{PROJECT_ID}")),
        user,
        profile: profile_ref,
        access,
        admin: input.admin.then_some(true),
        ..ProjectMembership::default()
    })
}

/// The decision trace of `input`, or why it cannot be built (bad profile, duplicate ids).
pub fn explain(input: &ExplainInput) -> Result<String, String> {
    let (m, project_id, super_admin) = match &input.stored {
        Some(s) => (s.membership.clone(), s.project_id.as_str(), s.super_admin),
        None => (membership(input)?, PROJECT_ID, false),
    };
    let policy = effective(&EffectiveInputs {
        membership: &m,
        policies: &input.policies,
        project_id,
        project_super_admin: super_admin,
        linked_projects: &[],
        scope: input.scope.as_deref(),
        patient_in_context: None,
    });
    let policy = match &input.stored {
        Some(s) => policy.with_isolation(s.isolation.clone()),
        None => policy,
    };
    let mut out = String::new();
    membership_section(&mut out, input, &m);
    policy_section(&mut out, &policy);
    let ip_block = ip_section(&mut out, &policy, input.ip);
    request_section(&mut out, input, &policy, ip_block);
    Ok(out)
}

fn membership_section(out: &mut String, input: &ExplainInput, m: &ProjectMembership) {
    match &input.stored {
        Some(s) => {
            let _ = writeln!(
                out,
                "Membership ProjectMembership/{} (from the store, project {}{})",
                m.id.as_deref().unwrap_or(""),
                s.project_id,
                if s.super_admin { ", super admin" } else { "" }
            );
            let _ = writeln!(
                out,
                "  upstream  {} (isolation {}{})",
                s.upstream,
                s.isolation.label(),
                match &s.isolation {
                    fhirgate_core::policy::isolation::Isolation::Tag { .. } =>
                        ": searches narrowed by _tag, every resource checked for the project's marker",
                    fhirgate_core::policy::isolation::Isolation::Unmarked { .. } =>
                        ": resources marked for another project are dropped",
                    fhirgate_core::policy::isolation::Isolation::None => "",
                }
            );
        }
        None => {
            let _ = writeln!(out, "Membership (in memory)");
        }
    }
    let _ = writeln!(out, "  profile   {}", m.profile_ref().unwrap_or(""));
    let _ = writeln!(
        out,
        "  admin     {}",
        if m.admin == Some(true) {
            "yes (project admin)"
        } else {
            "no"
        }
    );
    match &input.scope {
        Some(s) => {
            let _ = writeln!(out, "  scope     {s}");
        }
        None => {
            let _ = writeln!(
                out,
                "  scope     none (as with Basic auth: no SMART narrowing)"
            );
        }
    }
    for a in &m.access {
        let params = if a.parameter.is_empty() {
            "no parameters".to_string()
        } else {
            a.parameter
                .iter()
                .map(param_text)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "  access    {} with {params}",
            a.policy.reference.as_deref().unwrap_or("")
        );
    }
    if m.access.is_empty() {
        let _ = writeln!(
            out,
            "  access    none (legacy: full access to the non-admin types)"
        );
    }
    let _ = writeln!(out);
}

fn policy_section(out: &mut String, policy: &EffectivePolicy) {
    let _ = writeln!(out, "Effective policy");
    if let Some(f) = policy.failure() {
        let _ = writeln!(
            out,
            "  could not be built: {f}; the gateway grants nothing to this membership"
        );
    }
    let wire = policy.access_policy();
    let compiled = policy.compiled().entries();
    for (i, e) in wire.resource.iter().enumerate() {
        let set = InteractionSet::of_entry(e);
        let readonly = if e.readonly == Some(true) {
            " (readonly)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  resource[{i}] {}: {}{readonly}",
            e.resource_type,
            codes(set)
        );
        if let Some(c) = &e.criteria {
            let _ = writeln!(out, "      criteria        {c}");
        }
        if let Some(c) = e.compartment.as_ref().and_then(|c| c.reference.as_deref()) {
            let _ = writeln!(out, "      compartment     {c}");
        }
        if !e.hidden_fields.is_empty() {
            let _ = writeln!(out, "      hiddenFields    {}", e.hidden_fields.join(", "));
        }
        if !e.readonly_fields.is_empty() {
            let _ = writeln!(
                out,
                "      readonlyFields  {}",
                e.readonly_fields.join(", ")
            );
        }
        for w in &e.write_constraint {
            let _ = writeln!(
                out,
                "      writeConstraint {}",
                w.expression.as_deref().unwrap_or("")
            );
        }
        if compiled.get(i).is_some_and(|c| c.is_broken()) {
            let _ = writeln!(
                out,
                "      BROKEN: could not be compiled; grants nothing and stops the first-match walk"
            );
        }
    }
    if wire.resource.is_empty() {
        let _ = writeln!(out, "  no entries: nothing is granted");
    }
    if wire.ip_access_rule.is_empty() {
        let _ = writeln!(out, "  ipAccessRule    none");
    }
    for i in 0..wire.ip_access_rule.len() {
        let _ = writeln!(out, "  {}", ip_rule_text(policy, i));
    }
    for e in policy.compile_errors() {
        let _ = writeln!(out, "  compile error: {e} (fails closed)");
    }
    let _ = writeln!(out);
}

fn ip_rule_text(policy: &EffectivePolicy, index: usize) -> String {
    match policy.access_policy().ip_access_rule.get(index) {
        Some(r) => format!(
            "ipAccessRule[{index}] {}{} → {}",
            r.name
                .as_deref()
                .map(|n| format!("\"{n}\": "))
                .unwrap_or_default(),
            r.value,
            r.action
        ),
        None => format!("ipAccessRule[{index}]"),
    }
}

/// Prints the IP step; returns the deciding rule when the address is blocked.
fn ip_section(out: &mut String, policy: &EffectivePolicy, ip: Option<IpAddr>) -> Option<usize> {
    let _ = writeln!(out, "IP rules");
    let rules = policy.access_policy().ip_access_rule.len();
    let Some(addr) = ip else {
        if rules == 0 {
            let _ = writeln!(out, "  no rules: every address is allowed (no --ip given)");
        } else {
            let _ = writeln!(
                out,
                "  not checked: no --ip given ({rules} {} in the policy; the first matching rule decides, no match allows)",
                plural(rules, "rule", "rules")
            );
        }
        let _ = writeln!(out);
        return None;
    };
    let verdict = policy.check_ip(addr);
    let blocked = match verdict {
        IpVerdict::Allow { rule: Some(i) } => {
            let _ = writeln!(out, "  {addr}: allowed by {}", ip_rule_text(policy, i));
            None
        }
        IpVerdict::Allow { rule: None } if rules == 0 => {
            let _ = writeln!(out, "  {addr}: allowed (the policy has no IP rules)");
            None
        }
        IpVerdict::Allow { rule: None } => {
            let _ = writeln!(out, "  {addr}: allowed (no rule matches; no match allows)");
            None
        }
        IpVerdict::Block { rule } => {
            let _ = writeln!(out, "  {addr}: BLOCKED by {}", ip_rule_text(policy, rule));
            Some(rule)
        }
    };
    let _ = writeln!(out);
    blocked
}

fn content_type(method: &str, path: &str, body: &[u8]) -> &'static str {
    if path.ends_with("_search") {
        "application/x-www-form-urlencoded"
    } else if method == "PATCH" && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        "application/json-patch+json"
    } else {
        "application/fhir+json"
    }
}

fn request_section(
    out: &mut String,
    input: &ExplainInput,
    policy: &EffectivePolicy,
    ip_block: Option<usize>,
) {
    let method = input.method.to_ascii_uppercase();
    let raw = input.path.trim();
    let raw = raw
        .strip_prefix("/fhir/R4/")
        .or_else(|| raw.strip_prefix("fhir/R4/"))
        .or_else(|| raw.strip_prefix('/'))
        .unwrap_or(raw);
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let _ = writeln!(out, "Request");
    let _ = writeln!(out, "  {method} /fhir/R4/{raw}");

    if let Some(rule) = ip_block {
        let _ = writeln!(out);
        let _ = writeln!(out, "Decision: DENY 403 (ip_blocked)");
        let _ = writeln!(
            out,
            "  the client address is refused at the IP check, by {}; the request itself is not looked at",
            ip_rule_text(policy, rule)
        );
        return;
    }
    let first = path.split('/').next().unwrap_or("");
    if is_control_type(first) {
        let _ = writeln!(
            out,
            "  note: {first} is an identity resource: the gateway hands it to the control API, which applies this policy with its own checks"
        );
    }

    let mut headers = input.headers.clone();
    if let Some(b) = &input.body
        && !headers.iter().any(|(n, _)| n == "content-type")
    {
        headers.push(("content-type".into(), content_type(&method, path, b).into()));
    }
    let header_refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let parts = RequestParts {
        method: &method,
        path,
        query,
        headers: &header_refs,
        body: input.body.as_deref(),
    };
    let request = match classify(&parts) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "  classified: unclassifiable ({e})");
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "Decision: DENY {} ({})",
                e.outcome().status(),
                e.label()
            );
            let _ = writeln!(
                out,
                "  a request the gateway cannot classify exactly is always refused"
            );
            return;
        }
    };
    let _ = writeln!(out, "  classified: {}", describe(&request.op));
    if request.wants_non_json {
        let _ = writeln!(out, "  asks for a non-JSON representation");
    }

    if let FhirOp::Bundle { .. } = &request.op {
        bundle_section(out, policy, &request.op);
        return;
    }
    let needs = checked_access(&request.op);
    let includes = includes(&request.op);
    if needs.is_empty() {
        let _ = writeln!(out, "  needs: no (type, interaction) pair");
    } else {
        let list = needs
            .iter()
            .map(|(t, i)| format!("({t}, {})", i.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "  needs: {list}");
    }
    if !includes.is_empty() {
        let _ = writeln!(
            out,
            "  {}: need no permission of their own; included resources the caller may not see are dropped",
            includes.join(", ")
        );
    }
    let _ = writeln!(out);
    decision_section(out, policy, &request, &needs);
}

/// The include parameters `decide` leaves out of a search's needs (see [`is_include`]).
fn includes(op: &FhirOp) -> Vec<String> {
    match op {
        FhirOp::Search(s) => s
            .params
            .iter()
            .filter(|p| is_include(&p.name))
            .map(|p| format!("{}={}", p.name, p.value))
            .collect(),
        _ => Vec::new(),
    }
}

fn describe(op: &FhirOp) -> String {
    let with = |params: &[QueryParam]| {
        if params.is_empty() {
            String::new()
        } else {
            format!(" where {}", query_text(params))
        }
    };
    match op {
        FhirOp::Capabilities => "capabilities (metadata)".into(),
        FhirOp::Read { resource_type, id } => format!("read of {resource_type}/{id}"),
        FhirOp::Vread {
            resource_type,
            id,
            version,
        } => format!("vread of {resource_type}/{id} version {version}"),
        FhirOp::Create {
            resource_type,
            resource,
            if_none_exist,
        } => format!(
            "create of {resource_type}{}{}",
            if resource.is_some() {
                " (with a body)"
            } else {
                " (no body given)"
            },
            if_none_exist
                .as_ref()
                .map(|p| format!(", If-None-Exist {}", query_text(p)))
                .unwrap_or_default()
        ),
        FhirOp::Update {
            resource_type, id, ..
        } => format!("update of {resource_type}/{id}"),
        FhirOp::ConditionalUpdate {
            resource_type,
            criteria,
            ..
        } => format!("conditional update of {resource_type}{}", with(criteria)),
        FhirOp::Patch {
            resource_type, id, ..
        } => format!("patch of {resource_type}/{id}"),
        FhirOp::ConditionalPatch {
            resource_type,
            criteria,
            ..
        } => format!("conditional patch of {resource_type}{}", with(criteria)),
        FhirOp::Delete { resource_type, id } => format!("delete of {resource_type}/{id}"),
        FhirOp::ConditionalDelete {
            resource_type,
            criteria,
        } => format!("conditional delete of {resource_type}{}", with(criteria)),
        FhirOp::Search(s) => {
            let target = match (&s.resource_type, &s.compartment) {
                (Some(t), Some((ct, cid))) => format!("{t} in the compartment of {ct}/{cid}"),
                (Some(t), None) => t.clone(),
                (None, _) => "all types (system level)".into(),
            };
            format!(
                "search of {target}{}{}",
                with(&s.params),
                if s.via_post { " (POST _search)" } else { "" }
            )
        }
        FhirOp::History { resource_type, id } => match (resource_type, id) {
            (Some(t), Some(i)) => format!("history of {t}/{i}"),
            (Some(t), None) => format!("history of type {t}"),
            _ => "system history".into(),
        },
        FhirOp::Operation {
            name,
            resource_type,
            id,
        } => match (resource_type, id) {
            (Some(t), Some(i)) => format!("operation ${name} on {t}/{i}"),
            (Some(t), None) => format!("operation ${name} on type {t}"),
            _ => format!("operation ${name} at system level"),
        },
        FhirOp::Bundle {
            transaction,
            entries,
        } => format!(
            "{} Bundle with {} {}",
            if *transaction { "transaction" } else { "batch" },
            entries.len(),
            plural(entries.len(), "entry", "entries")
        ),
        FhirOp::GraphQl => "GraphQL".into(),
        FhirOp::Page { .. } => "further page of an earlier search".into(),
    }
}

/// Why `(ty, i)` is or is not granted, naming the entry that decided.
fn pair_text(policy: &EffectivePolicy, ty: &str, i: Interaction) -> (bool, String) {
    let pair = format!("({ty}, {})", i.as_str());
    if ty == "*" {
        return if policy.wildcard_unrestricted(i) {
            (
                true,
                format!("{pair}: granted by a `*` entry without criteria"),
            )
        } else {
            (
                false,
                format!(
                    "{pair}: not granted: the request can reach resources of any type, which only a `*` entry granting {} without criteria covers",
                    i.as_str()
                ),
            )
        };
    }
    if is_protected_type(ty) && !policy.is_super_admin() {
        return (
            false,
            format!("{pair}: not granted: {ty} is reserved to super admins"),
        );
    }
    let entries = policy.compiled().entries();
    let wire = &policy.access_policy().resource;
    let criteria_of = |index: usize| {
        wire.get(index)
            .and_then(|e| e.criteria.as_deref())
            .map(|c| format!(", criteria {c}"))
            .unwrap_or_default()
    };
    if let Some(e) = entries.iter().find(|e| e.shallow_matches(ty, i)) {
        if e.is_broken() {
            return (
                false,
                format!(
                    "{pair}: not granted: resource[{}] ({}) matches first but could not be compiled (fails closed)",
                    e.index, e.resource_type
                ),
            );
        }
        return (
            true,
            format!(
                "{pair}: granted by resource[{}] ({}{})",
                e.index,
                e.resource_type,
                criteria_of(e.index)
            ),
        );
    }
    let same_type: Vec<String> = entries
        .iter()
        .filter(|e| e.resource_type == ty || (e.is_wildcard() && wildcard_reaches(ty)))
        .map(|e| {
            let readonly = wire.get(e.index).is_some_and(|w| w.readonly == Some(true));
            format!(
                "resource[{}] ({}) grants only {}{}",
                e.index,
                e.resource_type,
                codes(e.interactions),
                if readonly { " (readonly)" } else { "" }
            )
        })
        .collect();
    if same_type.is_empty() {
        let admin_note = if is_project_admin_type(ty) {
            " (`*` never covers the project admin types)"
        } else {
            ""
        };
        (
            false,
            format!("{pair}: not granted: no entry for {ty}{admin_note}"),
        )
    } else {
        (
            false,
            format!("{pair}: not granted: {}", same_type.join("; ")),
        )
    }
}

fn deny_reason(label: &str, op: &FhirOp) -> String {
    match label {
        "untyped_target" => "the request can reach resources of any type (system search without _type, system history, a chain or include without a type); only a `*` entry without criteria covers it".into(),
        "conditional_write_with_criteria" => format!(
            "a conditional write lets the upstream choose its target: allowed only when no criteria, compartment, hidden or readonly fields apply to {}",
            op.resource_type().unwrap_or("the type")
        ),
        "operation_not_granted" => match op {
            FhirOp::Operation { name, resource_type, .. } => format!(
                "operation ${name} must be granted by name: an entry of {} (or `*`) with interaction create and \"fhirgateOperation\": [\"{name}\"], without criteria or, on an instance, with criteria `_id=<that id>`",
                resource_type.as_deref().unwrap_or("`*`")
            ),
            _ => "the operation is not granted by name".into(),
        },
        "graphql" => "GraphQL is refused: its results cannot be checked resource by resource. It is allowed only to a policy with an unrestricted `*` entry (read and search), no hidden fields, and an entry naming it: \"fhirgateOperation\": [\"graphql\"]".into(),
        "nested_bundle" => "a Bundle inside a Bundle is refused".into(),
        "non_json_format" => "only JSON can be checked and filtered; the request asks for another format".into(),
        other => format!("refused ({other})"),
    }
}

fn deny_header(d: &Deny) -> String {
    match d {
        Deny::Forbidden(l) => format!("DENY 403 ({l})"),
        Deny::BadRequest(l, t) => format!("DENY 400 ({l}): {t}"),
    }
}

fn decision_section(
    out: &mut String,
    policy: &EffectivePolicy,
    request: &FhirRequest,
    needs: &[(String, Interaction)],
) {
    let super_admin = policy.is_super_admin();
    let decision = decide(policy, request, super_admin);
    let pairs: Vec<(bool, String)> = needs
        .iter()
        .map(|(t, i)| pair_text(policy, t, *i))
        .collect();
    match decision {
        Decision::Deny(d) => {
            let _ = writeln!(out, "Decision: {}", deny_header(&d));
            let failing: Vec<&String> =
                pairs.iter().filter(|(ok, _)| !ok).map(|(_, t)| t).collect();
            if d.label() == "type_interaction" && !failing.is_empty() {
                for t in failing {
                    let _ = writeln!(out, "  {t}");
                }
            } else if d.label() == "type_interaction" {
                let _ = writeln!(
                    out,
                    "  no entry granting search on {} can narrow it",
                    request.op.resource_type().unwrap_or("the type")
                );
            } else {
                let _ = writeln!(out, "  {}", deny_reason(d.label(), &request.op));
            }
        }
        Decision::Allow(permit) => {
            let body_deny = create_body_check(policy, &request.op, &permit);
            match &body_deny {
                Some(_) => {
                    let _ = writeln!(out, "Decision: DENY 403 (create_outside_criteria)");
                }
                None => {
                    let _ = writeln!(out, "Decision: ALLOW");
                }
            }
            for (_, t) in &pairs {
                let _ = writeln!(out, "  {t}");
            }
            if let Some(text) = body_deny {
                let _ = writeln!(out, "  {text}");
                return;
            }
            permit_lines(out, policy, &request.op, &permit);
        }
    }
}

/// For a create with a body, the gateway's check: the resource must satisfy an entry granting
/// create, also after that entry's readonlyFields are removed. `Some(reason)` when it fails.
fn create_body_check(policy: &EffectivePolicy, op: &FhirOp, permit: &Permit) -> Option<String> {
    let FhirOp::Create {
        resource: Some(resource),
        ..
    } = op
    else {
        return None;
    };
    if permit.write != WriteCheck::Create {
        return None;
    }
    // The gateway's own check, on a copy: id dropped, compartment stamped, readonly fields
    // removed, criteria and writeConstraint.
    let refusal = policy.check_create(&mut resource.clone()).err()?;
    Some(match refusal {
        WriteRefusal::WriteConstraint => {
            "the body does not satisfy the writeConstraint of the entry that grants create".into()
        }
        _ => {
            let mut without_id = resource.clone();
            if let Some(obj) = without_id.as_object_mut() {
                obj.remove("id");
            }
            let as_sent = policy.satisfied(resource, Interaction::Create).is_some();
            if as_sent && policy.satisfied(&without_id, Interaction::Create).is_none() {
                "the body satisfies an entry only with its own `id`, which the upstream replaces on create".into()
            } else if as_sent {
                "the body satisfies an entry only with its readonlyFields (removed on create) or another compartment (meta.account is stamped with the policy's)".into()
            } else {
                "the body satisfies no entry granting create (criteria or compartment)".into()
            }
        }
    })
}

fn permit_lines(out: &mut String, policy: &EffectivePolicy, op: &FhirOp, permit: &Permit) {
    if let FhirOp::Search(s) = op
        && let Some(ty) = &s.resource_type
    {
        if !permit.narrowing.is_empty() {
            let _ = writeln!(
                out,
                "  narrowing: the gateway appends {} to the upstream query",
                query_text(&permit.narrowing)
            );
        } else {
            match policy.search_narrowing(ty) {
                SearchNarrowing::Unrestricted => {
                    let _ = writeln!(
                        out,
                        "  narrowing: none (an entry granting search on {ty} has no criteria)"
                    );
                }
                SearchNarrowing::AnyOf(list) if list.len() > 1 => {
                    let _ = writeln!(
                        out,
                        "  narrowing: none upstream ({} entries' criteria cannot be sent as one query); every returned resource is checked",
                        list.len()
                    );
                }
                _ => {
                    let _ = writeln!(
                        out,
                        "  narrowing: none upstream (the criteria have no upstream form); every returned resource is checked"
                    );
                }
            }
        }
    }
    let ty = op.resource_type();
    let interaction = match op {
        FhirOp::Read { .. } => Some(Interaction::Read),
        FhirOp::Vread { .. } => Some(Interaction::Vread),
        FhirOp::Search(_) => Some(Interaction::Search),
        FhirOp::History { .. } => Some(Interaction::History),
        FhirOp::Create { .. } => Some(Interaction::Create),
        FhirOp::Update { .. }
        | FhirOp::Patch { .. }
        | FhirOp::ConditionalUpdate { .. }
        | FhirOp::ConditionalPatch { .. } => Some(Interaction::Update),
        _ => None,
    };
    let hidden: Vec<String> = match (ty, interaction) {
        (Some(t), Some(i)) => {
            let mut h: Vec<String> = Vec::new();
            for e in policy.entries_for(t, i) {
                for f in &e.hidden_fields {
                    if !h.iter().any(|x| x == f.as_str()) {
                        h.push(f.as_str().to_string());
                    }
                }
            }
            h
        }
        _ => Vec::new(),
    };
    let hidden_text = if hidden.is_empty() {
        String::new()
    } else {
        format!(
            "; hiddenFields removed (per matching entry): {}",
            hidden.join(", ")
        )
    };
    let response = match permit.response {
        ResponseNeed::Untouched => {
            "streamed untouched (nothing in the policy needs to look at it)".to_string()
        }
        ResponseNeed::CheckResource => format!(
            "the returned resource is checked against the policy (failing → 404){hidden_text}"
        ),
        ResponseNeed::FilterResources => format!(
            "buffered and filtered: every returned resource must satisfy an entry (failing ones are dropped, _include/_revinclude too){hidden_text}"
        ),
    };
    let _ = writeln!(out, "  response: {response}");
    if permit.drop_total {
        let _ = writeln!(
            out,
            "  Bundle.total is removed (it could count resources the caller may not see)"
        );
    }
    match permit.write {
        WriteCheck::None => {}
        WriteCheck::Create => {
            let body = match op {
                FhirOp::Create {
                    resource: Some(r), ..
                } => match policy.satisfied(r, Interaction::Create) {
                    Some(e) => format!(
                        "; the body satisfies resource[{}]{}",
                        e.index,
                        if e.readonly_fields.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ", whose readonlyFields are removed: {}",
                                e.readonly_fields
                                    .iter()
                                    .map(|f| f.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    ),
                    None => String::new(),
                },
                _ => "; give --body FILE to check a resource".into(),
            };
            let _ = writeln!(
                out,
                "  write check: the new resource must satisfy an entry granting create (criteria, compartment); readonlyFields are removed{body}"
            );
        }
        WriteCheck::Update => {
            let _ = writeln!(
                out,
                "  write check: the current version (fetched from the upstream) must satisfy an entry granting update; readonlyFields are restored from it; the result must satisfy update; written with If-Match"
            );
        }
        WriteCheck::Delete => {
            let _ = writeln!(
                out,
                "  write check: the current version (fetched from the upstream) must satisfy an entry granting delete; deleted with If-Match"
            );
        }
    }
}

fn bundle_section(out: &mut String, policy: &EffectivePolicy, op: &FhirOp) {
    let FhirOp::Bundle {
        transaction,
        entries,
    } = op
    else {
        return;
    };
    let transaction = *transaction;
    let decisions = decide_entries(policy, op, policy.is_super_admin());
    let _ = writeln!(out);
    let denied = decisions
        .iter()
        .filter(|d| matches!(d, Decision::Deny(_)))
        .count();
    if transaction && denied > 0 {
        let _ = writeln!(out, "Decision: DENY 403 (transaction_entry_denied)");
        let _ = writeln!(
            out,
            "  a transaction is all-or-nothing: {denied} {} refused",
            plural(denied, "entry is", "entries are")
        );
    } else if denied == decisions.len() && !decisions.is_empty() {
        let _ = writeln!(out, "Decision: ALLOW (every entry is answered with 403)");
    } else {
        let _ = writeln!(
            out,
            "Decision: ALLOW ({} of {} {} forwarded; each is then checked like a single request)",
            decisions.len() - denied,
            decisions.len(),
            plural(decisions.len(), "entry", "entries")
        );
    }
    for (n, (entry, decision)) in entries.iter().zip(&decisions).enumerate() {
        let what = match &entry.op {
            Ok(op) => describe(op),
            Err(e) => format!("unclassifiable ({e})"),
        };
        match decision {
            Decision::Allow(_) => {
                let _ = writeln!(out, "  entry[{n}] {what}: allow");
            }
            Decision::Deny(d) => {
                let reasons: Vec<String> = match &entry.op {
                    Ok(op) if d.label() == "type_interaction" => checked_access(op)
                        .iter()
                        .map(|(t, i)| pair_text(policy, t, *i))
                        .filter(|(ok, _)| !ok)
                        .map(|(_, t)| t)
                        .collect(),
                    Ok(op) => vec![deny_reason(d.label(), op)],
                    Err(_) => Vec::new(),
                };
                let _ = writeln!(out, "  entry[{n}] {what}: {}", deny_header(d));
                for r in reasons {
                    let _ = writeln!(out, "      {r}");
                }
            }
        }
    }
}

/// Parses a policy JSON value for `explain` tests and tools that hold policies in memory.
pub fn policy_from_value(v: Value) -> Result<AccessPolicy, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
