//! AccessPolicy criteria (`Type?param=value&…`): parsing, validation against the R4 search
//! parameter definitions, in-memory matching (medplum-auth.md §4.6) and the query parameters that
//! narrow an upstream search.
//!
//! Semantics of [`Criteria::matches`]:
//! - the resource type must equal the criteria type (a `*` criteria matches any type);
//! - every filter must hold (AND); a comma in a value means OR;
//! - `reference`: `Type/id` matches `Type/id`, `…/Type/id` (absolute) and `Type/id/_history/v`;
//!   a bare `id` matches any reference ending in `/id`; `:Type` turns a bare id into `Type/id`;
//!   other values (absolute URLs, canonicals) match exactly, a canonical also without `|version`;
//! - `string` / `uri`: case-insensitive *contains*; for strings every string leaf of a complex
//!   value counts (HumanName, Address; not `use`, `type`, `period`, `extension`); `:exact` is an
//!   exact, case-sensitive comparison;
//! - `token`: `code`, `system|code`, `|code` (no system), `system|` (any code), case-insensitive,
//!   against Coding, CodeableConcept (its codings), Identifier and ContactPoint (`system|value`),
//!   and code / string / boolean / number primitives; `_id` compares ids exactly (case-sensitive:
//!   ids are);
//! - `date`: FHIR range semantics with the prefixes `eq ne gt lt ge le sa eb` over partial dates,
//!   dateTimes, instants, Periods (open ends are unbounded) and Timings (their outer limits).
//!   Values without a timezone are taken as UTC; a search value with a time must carry a timezone;
//! - `:missing=true|false`, `:present=true|false`, `:not` (negation of the whole filter);
//! - `_compartment=<Type/id | id>` matches a `meta.compartment` or `meta.account` reference, and for a patient
//!   (`Patient/id`, or a bare id) also membership of the R4 Patient compartment: a `Patient` with
//!   that id, or a resource whose compartment parameters (Observation: `subject`, `performer`)
//!   reference that patient. Plain FHIR servers do not fill `meta.compartment`.
//!
//! Refused when parsed (fail closed, the policy is rejected): number, quantity, composite and
//! special parameters, parameters whose FHIRPath expression is outside the supported subset,
//! chained parameters, `_has`, `_filter`, result parameters (`_count`, `_sort`, …), unknown
//! parameters, unknown modifiers and modifiers that do not fit the parameter type (`:text`, `:in`,
//! `:below`, `:above`, `:of-type`, `:identifier`, …), empty values, the `ap` date prefix,
//! malformed dates and times without a timezone.

use serde_json::Value;

use crate::fhir::request::QueryParam;
use crate::fhir::searchparam::{self, FhirPath, Node, ParamType};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CriteriaError {
    #[error("criteria must start with `{0}?`")]
    WrongType(String),
    #[error("unknown search parameter `{0}`")]
    UnknownParameter(String),
    #[error("unsupported criteria: {0}")]
    Unsupported(String),
}

fn unsupported(msg: impl Into<String>) -> CriteriaError {
    CriteriaError::Unsupported(msg.into())
}

/// A parsed, validated criteria string.
#[derive(Debug, Clone, PartialEq)]
pub struct Criteria {
    resource_type: String,
    /// What to append to an upstream search.
    params: Vec<QueryParam>,
    /// Every filter appears in `params`.
    upstream_complete: bool,
    /// The filters as written, kept to instantiate a `*` criteria for a concrete type.
    raw: Vec<RawFilter>,
    /// The compiled filters. `None` only for a `*` criteria using parameters that exist on some
    /// types only: it is compiled per type by [`Criteria::for_type`].
    filters: Option<Vec<Filter>>,
}

impl Criteria {
    /// Parses `Type?a=b&c=d` for an entry whose `resourceType` is `entry_type` (`*` allowed:
    /// then the criteria must start with `*?`).
    pub fn parse(entry_type: &str, criteria: &str) -> Result<Criteria, CriteriaError> {
        let prefix = format!("{entry_type}?");
        let Some(query) = criteria.strip_prefix(&prefix) else {
            return Err(CriteriaError::WrongType(entry_type.to_string()));
        };
        let raw = parse_query(query)?;
        if entry_type == WILDCARD {
            let mut all_common = true;
            for r in &raw {
                match searchparam::lookup(BASE_TYPE, &r.code) {
                    Some(_) => {
                        compile_filter(BASE_TYPE, r)?;
                    }
                    None => {
                        check_deferred(r)?;
                        all_common = false;
                    }
                }
            }
            if all_common {
                return Criteria::compile(WILDCARD, BASE_TYPE, raw);
            }
            // Parameters of some types only: forward the common ones, compile per type later.
            let mut params = Vec::new();
            for r in &raw {
                if searchparam::lookup(BASE_TYPE, &r.code).is_some() {
                    let (_, upstream) = compile_filter(BASE_TYPE, r)?;
                    params.extend(upstream);
                }
            }
            return Ok(Criteria {
                resource_type: WILDCARD.to_string(),
                params,
                upstream_complete: false,
                raw,
                filters: None,
            });
        }
        if !searchparam::is_resource_type(entry_type) {
            return Err(unsupported(format!("unknown resource type `{entry_type}`")));
        }
        Criteria::compile(entry_type, entry_type, raw)
    }

    fn compile(
        resource_type: &str,
        eval_type: &str,
        raw: Vec<RawFilter>,
    ) -> Result<Criteria, CriteriaError> {
        let mut filters = Vec::with_capacity(raw.len());
        let mut params = Vec::new();
        let mut upstream_complete = true;
        for r in &raw {
            let (filter, upstream) = compile_filter(eval_type, r)?;
            filters.push(filter);
            match upstream {
                Some(p) => params.push(p),
                None => upstream_complete = false,
            }
        }
        Ok(Criteria {
            resource_type: resource_type.to_string(),
            params,
            upstream_complete,
            raw,
            filters: Some(filters),
        })
    }

    /// The criteria type: a resource type, or `*`.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// A `*?…` criteria, which applies to every resource type.
    pub fn is_wildcard(&self) -> bool {
        self.resource_type == WILDCARD
    }

    /// The criteria for a concrete type: a `*?…` criteria becomes `concrete_type?…`, with every
    /// parameter validated against that type (an error when one does not exist there or cannot be
    /// evaluated). A typed criteria is returned as is for its own type, and refused for others.
    pub fn for_type(&self, concrete_type: &str) -> Result<Criteria, CriteriaError> {
        if !self.is_wildcard() {
            if concrete_type == self.resource_type {
                return Ok(self.clone());
            }
            return Err(unsupported(format!(
                "criteria for {} cannot apply to {concrete_type}",
                self.resource_type
            )));
        }
        if !searchparam::is_resource_type(concrete_type) {
            return Err(unsupported(format!(
                "unknown resource type `{concrete_type}`"
            )));
        }
        Criteria::compile(concrete_type, concrete_type, self.raw.clone())
    }

    /// True when `resource` satisfies every filter. A `*` criteria matches resources of any type
    /// (when it names parameters that exist on some types only, it is instantiated for the
    /// resource's type on each call, and a type lacking them never matches: prefer
    /// [`Criteria::for_type`] once per type in loops).
    pub fn matches(&self, resource: &Value) -> bool {
        let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else {
            return false;
        };
        if !self.is_wildcard() && rtype != self.resource_type {
            return false;
        }
        match &self.filters {
            Some(filters) => filters.iter().all(|f| f.matches(resource, rtype)),
            None => self.for_type(rtype).is_ok_and(|c| c.matches(resource)),
        }
    }

    /// Search parameters to append to an upstream search of `resource_type` so that the upstream
    /// only returns what these criteria allow.
    ///
    /// Names and values are decoded: percent-encode them when building the URL. The upstream
    /// result may be wider than [`Criteria::matches`] (filters a plain FHIR server cannot express
    /// are left out, see [`Criteria::upstream_complete`]) and is meant never to be narrower:
    /// strings are sent as `:contains`, `:present` as `:missing`; `uri` filters (contains),
    /// `:not` on non-token parameters, `_compartment` and Medplum-only parameters are left out.
    /// The one gap is the upstream's own matching where it is stricter than Medplum's (a server
    /// comparing token codes case-sensitively). Every returned resource must still go through
    /// [`Criteria::matches`]. For a `*` criteria, call [`Criteria::for_type`] first.
    pub fn query_params(&self) -> &[QueryParam] {
        &self.params
    }

    /// True when these criteria are exactly `_id=<…>` (no modifier, no other filter) and one of
    /// the listed ids is `id`: then a resource read as `Type/<id>` satisfies them without being
    /// looked at, because the id is the one thing the upstream cannot answer differently.
    pub fn pins_id(&self, id: &str) -> bool {
        match self.raw.as_slice() {
            [only] => {
                only.code == "_id"
                    && only.modifier.is_none()
                    && !self.is_wildcard()
                    && only.value.split(',').any(|v| v == id)
            }
            _ => false,
        }
    }

    /// Whether [`Criteria::query_params`] carries every filter. When false, the upstream returns
    /// more than the criteria allow and only [`Criteria::matches`] narrows it.
    pub fn upstream_complete(&self) -> bool {
        self.upstream_complete
    }
}

const WILDCARD: &str = "*";
/// The pseudo type the common (`Resource`) parameters are compiled for.
const BASE_TYPE: &str = "Resource";

// ---- parsing ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct RawFilter {
    code: String,
    modifier: Option<String>,
    value: String,
}

impl RawFilter {
    fn name(&self) -> String {
        match &self.modifier {
            Some(m) => format!("{}:{m}", self.code),
            None => self.code.clone(),
        }
    }
}

fn parse_query(query: &str) -> Result<Vec<RawFilter>, CriteriaError> {
    let mut out = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name.as_ref(), None),
        };
        if code.is_empty() {
            return Err(unsupported("empty parameter name"));
        }
        if code == "_has" || code.starts_with("_has:") {
            return Err(unsupported("`_has` is not supported in criteria"));
        }
        if code == "_filter" {
            return Err(unsupported("`_filter` is not supported in criteria"));
        }
        if code.contains('.') || modifier.is_some_and(|m| m.contains(['.', ':'])) {
            return Err(unsupported(format!("chained parameter `{name}`")));
        }
        if modifier.is_some_and(str::is_empty) {
            return Err(unsupported(format!("empty modifier in `{name}`")));
        }
        if value.is_empty() {
            return Err(unsupported(format!("empty value for `{name}`")));
        }
        out.push(RawFilter {
            code: code.to_string(),
            modifier: modifier.map(str::to_string),
            value: value.into_owned(),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Modifier {
    None,
    Missing(bool),
    Not,
    Exact,
    Contains,
    Type(String),
}

fn parse_modifier(raw: &RawFilter) -> Result<Modifier, CriteriaError> {
    let bool_value = || match raw.value.as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(unsupported(format!("`{}` takes true or false", raw.name()))),
    };
    Ok(match raw.modifier.as_deref() {
        None => Modifier::None,
        Some("missing") => Modifier::Missing(bool_value()?),
        Some("present") => Modifier::Missing(!bool_value()?),
        Some("not") => Modifier::Not,
        Some("exact") => Modifier::Exact,
        Some("contains") => Modifier::Contains,
        Some(t) if searchparam::is_resource_type(t) => Modifier::Type(t.to_string()),
        Some(m) => return Err(unsupported(format!("modifier `:{m}` is not supported"))),
    })
}

/// Checks a `*` parameter that is not a common one: it must compile for at least one resource type
/// (else no instantiation could succeed, and the error of the first try is returned).
fn check_deferred(raw: &RawFilter) -> Result<(), CriteriaError> {
    if !searchparam::is_known_code(&raw.code) {
        return Err(CriteriaError::UnknownParameter(raw.code.clone()));
    }
    let mut first_error = None;
    let bases = searchparam::all_params()
        .iter()
        .filter(|d| d.code == raw.code)
        .flat_map(|d| d.base.iter());
    for base in bases {
        match compile_filter(base, raw) {
            Ok(_) => return Ok(()),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| CriteriaError::UnknownParameter(raw.code.clone())))
}

/// Splits on unescaped `sep`; escapes stay in the pieces.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// Removes the FHIR search escapes `\,` `\|` `\$` `\\`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The comma-separated alternatives of a value, escapes kept; none may be empty.
fn alternatives(raw: &RawFilter) -> Result<Vec<&str>, CriteriaError> {
    let parts = split_unescaped(&raw.value, ',');
    if parts.iter().any(|p| p.is_empty()) {
        return Err(unsupported(format!(
            "empty value in `{}={}`",
            raw.name(),
            raw.value
        )));
    }
    Ok(parts)
}

// ---- compiled filters --------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Filter {
    path: FhirPath,
    test: Test,
    negate: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    /// `true`: the parameter must have no value.
    Missing(bool),
    /// Lower-cased values unless `exact`.
    Str {
        values: Vec<String>,
        exact: bool,
    },
    Uri {
        values: Vec<String>,
        exact: bool,
    },
    Token(Vec<TokenValue>),
    /// `_id`: exact ids.
    Id(Vec<String>),
    Reference(Vec<RefValue>),
    Date(Vec<DateValue>),
    Compartment(Vec<RefValue>),
}

/// Compiles one filter for `eval_type` (`Resource` for the common parameters of a `*` criteria)
/// and gives the parameter to forward upstream, if any.
fn compile_filter(
    eval_type: &str,
    raw: &RawFilter,
) -> Result<(Filter, Option<QueryParam>), CriteriaError> {
    let def = searchparam::lookup(eval_type, &raw.code)
        .ok_or_else(|| CriteriaError::UnknownParameter(raw.code.clone()))?;
    let name = raw.name();
    match def.param_type {
        ParamType::String
        | ParamType::Token
        | ParamType::Reference
        | ParamType::Date
        | ParamType::Uri => {}
        other => {
            return Err(unsupported(format!(
                "`{}` is a {other} parameter, which criteria cannot use",
                raw.code
            )));
        }
    }
    let path = def
        .compile(eval_type)
        .map_err(|e| unsupported(format!("`{}`: {e}", raw.code)))?;
    let modifier = parse_modifier(raw)?;
    let bad_modifier = || {
        unsupported(format!(
            "`{name}`: modifier not allowed on a {} parameter",
            def.param_type
        ))
    };
    let forward = |name: String, value: String| Some(QueryParam { name, value });
    let as_is = || forward(name.clone(), raw.value.clone());

    if raw.code == "_compartment" {
        if modifier != Modifier::None {
            return Err(bad_modifier());
        }
        let refs = alternatives(raw)?
            .into_iter()
            .map(|v| RefValue::parse(&unescape(v)))
            .collect();
        return Ok((
            Filter {
                path,
                test: Test::Compartment(refs),
                negate: false,
            },
            None,
        ));
    }

    if let Modifier::Missing(missing) = modifier {
        let upstream = if def.medplum {
            None
        } else {
            forward(format!("{}:missing", raw.code), missing.to_string())
        };
        return Ok((
            Filter {
                path,
                test: Test::Missing(missing),
                negate: false,
            },
            upstream,
        ));
    }
    let negate = modifier == Modifier::Not;

    let (test, upstream) = match def.param_type {
        ParamType::String => {
            let exact = match modifier {
                Modifier::Exact => true,
                Modifier::None | Modifier::Contains | Modifier::Not => false,
                _ => return Err(bad_modifier()),
            };
            let values: Vec<String> = alternatives(raw)?
                .into_iter()
                .map(|v| {
                    if exact {
                        unescape(v)
                    } else {
                        unescape(v).to_lowercase()
                    }
                })
                .collect();
            let upstream = match modifier {
                Modifier::Exact => as_is(),
                Modifier::None | Modifier::Contains => {
                    forward(format!("{}:contains", raw.code), raw.value.clone())
                }
                _ => None,
            };
            (Test::Str { values, exact }, upstream)
        }
        ParamType::Uri => {
            let exact = match modifier {
                Modifier::Exact => true,
                Modifier::None | Modifier::Contains | Modifier::Not => false,
                _ => return Err(bad_modifier()),
            };
            let values: Vec<String> = alternatives(raw)?
                .into_iter()
                .map(|v| {
                    if exact {
                        unescape(v)
                    } else {
                        unescape(v).to_lowercase()
                    }
                })
                .collect();
            // A FHIR server compares URIs exactly, which is what `:exact` asks; the default
            // *contains* has no FHIR equivalent.
            let upstream = if exact {
                forward(raw.code.clone(), raw.value.clone())
            } else {
                None
            };
            (Test::Uri { values, exact }, upstream)
        }
        ParamType::Token => {
            if !matches!(modifier, Modifier::None | Modifier::Not) {
                return Err(bad_modifier());
            }
            if raw.code == "_id" {
                // Resource ids are case-sensitive: `_id=abc` must not reach resource `ABC`.
                let mut ids = Vec::new();
                for v in alternatives(raw)? {
                    let parts = split_unescaped(v, '|');
                    let id = match parts.as_slice() {
                        [id] | ["", id] if !id.is_empty() => unescape(id),
                        _ => return Err(unsupported(format!("`{name}={v}`: not a resource id"))),
                    };
                    ids.push(id);
                }
                (Test::Id(ids), as_is())
            } else {
                let values = alternatives(raw)?
                    .into_iter()
                    .map(TokenValue::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                (Test::Token(values), as_is())
            }
        }
        ParamType::Reference => {
            let type_modifier = match &modifier {
                Modifier::Type(t) => {
                    if !def.allows_target(t) {
                        return Err(unsupported(format!(
                            "`{name}`: {t} is not a target of `{}`",
                            raw.code
                        )));
                    }
                    Some(t.as_str())
                }
                Modifier::None | Modifier::Not => None,
                _ => return Err(bad_modifier()),
            };
            let mut values = Vec::new();
            for v in alternatives(raw)? {
                let mut r = RefValue::parse(&unescape(v));
                if let Some(t) = type_modifier {
                    r = match r {
                        RefValue::Id(id) => RefValue::Typed {
                            rtype: t.to_string(),
                            id,
                        },
                        RefValue::Typed { rtype, id } if rtype == t => {
                            RefValue::Typed { rtype, id }
                        }
                        _ => {
                            return Err(unsupported(format!(
                                "`{name}={v}`: the value does not fit the type"
                            )));
                        }
                    };
                }
                values.push(r);
            }
            let upstream = if negate { None } else { as_is() };
            (Test::Reference(values), upstream)
        }
        ParamType::Date => {
            if !matches!(modifier, Modifier::None | Modifier::Not) {
                return Err(bad_modifier());
            }
            let values = alternatives(raw)?
                .into_iter()
                .map(|v| DateValue::parse(&unescape(v)))
                .collect::<Result<Vec<_>, _>>()?;
            let upstream = if negate { None } else { as_is() };
            (Test::Date(values), upstream)
        }
        ParamType::Number | ParamType::Quantity | ParamType::Composite | ParamType::Special => {
            return Err(unsupported(format!(
                "`{}` cannot be used in criteria",
                raw.code
            )));
        }
    };
    let upstream = if def.medplum { None } else { upstream };
    Ok((Filter { path, test, negate }, upstream))
}

impl Filter {
    fn matches(&self, resource: &Value, rtype: &str) -> bool {
        let nodes = self.path.evaluate(resource);
        let positive = match &self.test {
            Test::Missing(missing) => nodes.is_empty() == *missing,
            Test::Str { values, exact } => nodes.iter().any(|n| {
                let mut leaves = Vec::new();
                string_leaves(n.value, &mut leaves);
                leaves
                    .iter()
                    .any(|leaf| string_matches(leaf, values, *exact))
            }),
            Test::Uri { values, exact } => nodes
                .iter()
                .filter_map(|n| n.value.as_str())
                .any(|s| string_matches(s, values, *exact)),
            Test::Id(ids) => nodes
                .iter()
                .filter_map(|n| n.value.as_str())
                .any(|id| ids.iter().any(|v| v == id)),
            Test::Token(values) => {
                let mut pairs = Vec::new();
                for n in &nodes {
                    token_pairs(n.value, &mut pairs);
                }
                values.iter().any(|v| v.matches(&pairs))
            }
            Test::Reference(values) => nodes
                .iter()
                .filter_map(searchparam::reference_string)
                .any(|r| values.iter().any(|v| v.matches(r))),
            Test::Date(values) => {
                let ranges: Vec<Range> = nodes.iter().filter_map(node_range).collect();
                values.iter().any(|v| ranges.iter().any(|r| v.matches(*r)))
            }
            Test::Compartment(values) => {
                nodes
                    .iter()
                    .filter_map(searchparam::reference_string)
                    .chain(meta_account(resource))
                    .any(|r| values.iter().any(|v| v.matches(r)))
                    || values
                        .iter()
                        .filter_map(RefValue::patient_id)
                        .any(|id| in_patient_compartment(resource, rtype, id))
            }
        };
        positive != self.negate
    }
}

/// `meta.account`: the compartment a resource was written in (the gateway stamps it on creates
/// under a policy with a `compartment`). Plain FHIR servers keep it but fill no
/// `meta.compartment`, so `_compartment` looks here too.
fn meta_account(resource: &Value) -> Option<&str> {
    resource.pointer("/meta/account/reference")?.as_str()
}

fn string_matches(s: &str, values: &[String], exact: bool) -> bool {
    if exact {
        values.iter().any(|v| v == s)
    } else {
        let lower = s.to_lowercase();
        values.iter().any(|v| lower.contains(v.as_str()))
    }
}

/// Keys of complex values that are not text a string search looks at.
const NON_TEXT_KEYS: [&str; 7] = [
    "use",
    "type",
    "period",
    "extension",
    "modifierExtension",
    "id",
    "system",
];

fn string_leaves<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| string_leaves(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                if !k.starts_with('_') && !NON_TEXT_KEYS.contains(&k.as_str()) {
                    string_leaves(v, out);
                }
            }
        }
        _ => {}
    }
}

// ---- tokens ------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum SystemMatch {
    /// `code`: any system.
    Any,
    /// `|code`: no system.
    Absent,
    /// `system|…`.
    Is(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenValue {
    system: SystemMatch,
    /// `None` for `system|` (any code). Lower-cased.
    code: Option<String>,
}

/// `(system, code)` of one coded value, lower-cased.
type TokenPair = (Option<String>, Option<String>);

impl TokenValue {
    fn parse(v: &str) -> Result<TokenValue, CriteriaError> {
        let parts = split_unescaped(v, '|');
        let lower = |s: &str| unescape(s).to_lowercase();
        match parts.as_slice() {
            [code] => Ok(TokenValue {
                system: SystemMatch::Any,
                code: Some(lower(code)),
            }),
            ["", ""] => Err(unsupported("token `|` has neither system nor code")),
            ["", code] => Ok(TokenValue {
                system: SystemMatch::Absent,
                code: Some(lower(code)),
            }),
            [system, ""] => Ok(TokenValue {
                system: SystemMatch::Is(lower(system)),
                code: None,
            }),
            [system, code] => Ok(TokenValue {
                system: SystemMatch::Is(lower(system)),
                code: Some(lower(code)),
            }),
            _ => Err(unsupported(format!("token `{v}` has more than one `|`"))),
        }
    }

    fn matches(&self, pairs: &[TokenPair]) -> bool {
        pairs.iter().any(|(system, code)| {
            let code_ok = match &self.code {
                None => true,
                Some(c) => code.as_ref() == Some(c),
            };
            let system_ok = match &self.system {
                SystemMatch::Any => true,
                SystemMatch::Absent => system.is_none(),
                SystemMatch::Is(s) => system.as_ref() == Some(s),
            };
            code_ok && system_ok
        })
    }
}

fn non_empty_lower(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase)
}

fn token_pairs(value: &Value, out: &mut Vec<TokenPair>) {
    match value {
        Value::String(s) => out.push((None, Some(s.to_lowercase()))),
        Value::Bool(b) => out.push((None, Some(b.to_string()))),
        Value::Number(n) => out.push((None, Some(n.to_string()))),
        Value::Object(map) => {
            if let Some(codings) = map.get("coding") {
                // CodeableConcept: its codings.
                let items = match codings {
                    Value::Array(items) => items.as_slice(),
                    other => std::slice::from_ref(other),
                };
                for c in items.iter().filter_map(Value::as_object) {
                    coding_pair(c.get("system"), c.get("code"), out);
                }
            } else if map.contains_key("value") {
                // Identifier, ContactPoint.
                coding_pair(map.get("system"), map.get("value"), out);
            } else if map.contains_key("code") || map.contains_key("system") {
                // Coding.
                coding_pair(map.get("system"), map.get("code"), out);
            }
        }
        _ => {}
    }
}

fn coding_pair(system: Option<&Value>, code: Option<&Value>, out: &mut Vec<TokenPair>) {
    let system = non_empty_lower(system);
    let code = non_empty_lower(code);
    if system.is_some() || code.is_some() {
        out.push((system, code));
    }
}

// ---- references --------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum RefValue {
    /// `Type/id`.
    Typed { rtype: String, id: String },
    /// A bare id.
    Id(String),
    /// Anything else (absolute URL, `urn:`, canonical): compared exactly.
    Other(String),
}

fn strip_history(r: &str) -> &str {
    match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    }
}

impl RefValue {
    fn parse(v: &str) -> RefValue {
        if !v.contains(['/', ':', '|']) {
            return RefValue::Id(v.to_string());
        }
        if let Some((rtype, id)) = searchparam::parse_reference(v)
            && v.len() == rtype.len() + 1 + id.len()
        {
            return RefValue::Typed {
                rtype: rtype.to_string(),
                id: id.to_string(),
            };
        }
        RefValue::Other(v.to_string())
    }

    fn matches(&self, reference: &str) -> bool {
        let r = strip_history(reference);
        match self {
            RefValue::Typed { rtype, id } => {
                let Some(rest) = r
                    .strip_suffix(id.as_str())
                    .and_then(|s| s.strip_suffix('/'))
                else {
                    return false;
                };
                rest.strip_suffix(rtype.as_str())
                    .is_some_and(|before| before.is_empty() || before.ends_with('/'))
            }
            RefValue::Id(id) => r
                .strip_suffix(id.as_str())
                .is_some_and(|before| before.ends_with('/')),
            RefValue::Other(u) => {
                r == u
                    || reference == u
                    || (!u.contains('|')
                        && reference.split_once('|').is_some_and(|(url, _)| url == u))
            }
        }
    }

    /// The patient id this value designates for compartment membership.
    fn patient_id(&self) -> Option<&str> {
        match self {
            RefValue::Typed { rtype, id } if rtype == "Patient" => Some(id),
            RefValue::Id(id) => Some(id),
            _ => None,
        }
    }
}

fn in_patient_compartment(resource: &Value, rtype: &str, patient_id: &str) -> bool {
    if rtype == "Patient" && resource.get("id").and_then(Value::as_str) == Some(patient_id) {
        return true;
    }
    let Ok(paths) = searchparam::patient_compartment_paths(rtype) else {
        return false;
    };
    paths.iter().any(|p| {
        p.evaluate(resource)
            .iter()
            .filter_map(searchparam::reference_string)
            .filter_map(searchparam::parse_reference)
            .any(|(t, id)| t == "Patient" && id == patient_id)
    })
}

// ---- dates -------------------------------------------------------------------------------------

/// `[start, end)` in milliseconds since the epoch, UTC.
type Range = (i64, i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DateValue {
    prefix: Prefix,
    range: Range,
}

impl DateValue {
    fn parse(v: &str) -> Result<DateValue, CriteriaError> {
        let starts_alpha = v.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        let (prefix, rest) = match v.get(..2) {
            Some(p) if starts_alpha => {
                let prefix = match p {
                    "eq" => Prefix::Eq,
                    "ne" => Prefix::Ne,
                    "gt" => Prefix::Gt,
                    "lt" => Prefix::Lt,
                    "ge" => Prefix::Ge,
                    "le" => Prefix::Le,
                    "sa" => Prefix::Sa,
                    "eb" => Prefix::Eb,
                    "ap" => return Err(unsupported("the `ap` date prefix is not supported")),
                    _ => return Err(unsupported(format!("unknown date prefix in `{v}`"))),
                };
                (prefix, &v[2..])
            }
            _ => (Prefix::Eq, v),
        };
        let range =
            parse_date(rest, true).ok_or_else(|| unsupported(format!("invalid date `{v}`")))?;
        Ok(DateValue { prefix, range })
    }

    fn matches(&self, (start, end): Range) -> bool {
        let (ps, pe) = self.range;
        let contained = ps <= start && end <= pe;
        match self.prefix {
            Prefix::Eq => contained,
            Prefix::Ne => !contained,
            Prefix::Gt => end > pe,
            Prefix::Lt => start < ps,
            Prefix::Ge => end > pe || contained,
            Prefix::Le => start < ps || contained,
            Prefix::Sa => start >= pe,
            Prefix::Eb => end <= ps,
        }
    }
}

/// The range a date-typed node covers.
fn node_range(node: &Node<'_>) -> Option<Range> {
    match node.value {
        Value::String(s) => parse_date(s, false),
        Value::Object(map) => {
            let is_timing = node.type_name == Some("Timing")
                || (node.type_name.is_none()
                    && (map.contains_key("event") || map.contains_key("repeat")));
            if is_timing {
                timing_range(map)
            } else if map.contains_key("start") || map.contains_key("end") {
                period_range(map)
            } else {
                None
            }
        }
        _ => None,
    }
}

fn period_range(map: &serde_json::Map<String, Value>) -> Option<Range> {
    let bound = |key: &str| match map.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => parse_date(s, false).map(Some),
        Some(_) => None,
    };
    let start = bound("start")?.map_or(i64::MIN, |r| r.0);
    let end = bound("end")?.map_or(i64::MAX, |r| r.1);
    Some((start, end))
}

/// A Timing's outer limits: its events and `repeat.boundsPeriod`.
fn timing_range(map: &serde_json::Map<String, Value>) -> Option<Range> {
    let mut hull: Option<Range> = None;
    let mut add = |r: Range| {
        hull = Some(match hull {
            Some((s, e)) => (s.min(r.0), e.max(r.1)),
            None => r,
        });
    };
    if let Some(events) = map.get("event") {
        let items = match events {
            Value::Array(items) => items.as_slice(),
            other => std::slice::from_ref(other),
        };
        for e in items.iter().filter_map(Value::as_str) {
            add(parse_date(e, false)?);
        }
    }
    if let Some(Value::Object(bounds)) = map.get("repeat").and_then(|r| r.get("boundsPeriod")) {
        add(period_range(bounds)?);
    }
    hull
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

const MS_PER_DAY: i64 = 86_400_000;

/// Parses a FHIR date / dateTime / instant (also minute precision) into the range it covers.
/// A time without a timezone is UTC unless `require_tz`, where it is refused.
fn parse_date(s: &str, require_tz: bool) -> Option<Range> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits
            .iter()
            .try_fold(0i64, |acc, d| Some(acc * 10 + i64::from(d - b'0')))
    };
    let year = num(0, 4)?;
    if b.len() == 4 {
        return Some((
            days_from_civil(year, 1, 1) * MS_PER_DAY,
            days_from_civil(year + 1, 1, 1) * MS_PER_DAY,
        ));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = num(5, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.len() == 7 {
        let (ny, nm) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        return Some((
            days_from_civil(year, month, 1) * MS_PER_DAY,
            days_from_civil(ny, nm, 1) * MS_PER_DAY,
        ));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = num(8, 2)?;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let day_start = days_from_civil(year, month, day) * MS_PER_DAY;
    if b.len() == 10 {
        return Some((day_start, day_start + MS_PER_DAY));
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let hour = num(11, 2)?;
    let minute = (b.get(13) == Some(&b':')).then(|| num(14, 2)).flatten()?;
    if hour > 23 || minute > 59 {
        return None;
    }
    let mut pos = 16;
    let mut ms = (hour * 3600 + minute * 60) * 1000;
    let mut width = 60_000;
    if b.get(pos) == Some(&b':') {
        let second = num(pos + 1, 2)?;
        if second > 60 {
            return None;
        }
        ms += second * 1000;
        width = 1000;
        pos += 3;
        if b.get(pos) == Some(&b'.') {
            let digits = b
                .get(pos + 1..)?
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if digits == 0 {
                return None;
            }
            let frac = num(pos + 1, digits.min(3))?;
            let scale = 10i64.pow(3 - digits.min(3) as u32);
            ms += frac * scale;
            width = scale;
            pos += 1 + digits;
        }
    }
    let offset_ms = match b.get(pos) {
        None if require_tz => return None,
        None => 0,
        Some(b'Z') if pos + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if b.len() == pos + 6 && b.get(pos + 3) == Some(&b':') => {
            let oh = num(pos + 1, 2)?;
            let om = num(pos + 4, 2)?;
            if oh > 14 || om > 59 {
                return None;
            }
            let off = (oh * 60 + om) * 60_000;
            if sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let start = day_start + ms - offset_ms;
    Some((start, start + width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(t: &str, c: &str) -> Criteria {
        Criteria::parse(t, c).unwrap_or_else(|e| panic!("{c}: {e}"))
    }

    /// Textual parameter substitution, as the effective policy does it (medplum-auth.md §4.2):
    /// `%name.id` first, then `%name`.
    fn substitute(criteria: &str, params: &[(&str, &str)]) -> String {
        let mut out = criteria.to_string();
        for (name, reference) in params {
            if let Some((_, id)) = reference.split_once('/') {
                out = out.replace(&format!("%{name}.id"), id);
            }
            out = out.replace(&format!("%{name}"), reference);
        }
        out
    }

    fn obs(id: &str, patient: &str, performer: &str, category: &str, code: &str) -> Value {
        json!({
            "resourceType": "Observation",
            "id": id,
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": category
            }]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": "x"},
            "subject": {"reference": patient},
            "effectiveDateTime": "2024-05-02T09:30:00Z",
            "issued": "2024-05-02T09:30:00Z",
            "performer": [{"reference": performer}],
            "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}
        })
    }

    /// Observations of cases 030/031/040/081/130/191.
    fn observations() -> Vec<Value> {
        vec![
            obs(
                "o1",
                "Patient/p1",
                "Practitioner/pr1",
                "vital-signs",
                "8867-4",
            ),
            obs(
                "o2",
                "Patient/p1",
                "Practitioner/pr2",
                "laboratory",
                "2345-7",
            ),
            obs(
                "o3",
                "Patient/p2",
                "Practitioner/pr1",
                "vital-signs",
                "8867-4",
            ),
            obs(
                "o4",
                "Patient/p2",
                "Practitioner/pr2",
                "laboratory",
                "718-7",
            ),
            obs(
                "o5",
                "Patient/p3",
                "Practitioner/pr1",
                "laboratory",
                "718-7",
            ),
        ]
    }

    fn patient(id: &str, gp: &str, org: &str) -> Value {
        json!({
            "resourceType": "Patient",
            "id": id,
            "identifier": [{
                "use": "usual",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                "system": "http://hospital.example.org/mrn",
                "value": format!("MRN-{id}")
            }],
            "active": true,
            "name": [{"use": "official", "family": "Nguyen", "given": ["Lan", "Thi"], "period": {"start": "2001-01-01"}}],
            "telecom": [
                {"system": "phone", "value": "+1-503-555-0199", "use": "mobile"},
                {"system": "email", "value": "lan.nguyen@example.com", "use": "home"}
            ],
            "gender": "female",
            "birthDate": "1984-03-12",
            "address": [{"use": "home", "line": ["1820 SE Division St"], "city": "Portland", "state": "OR", "postalCode": "97202"}],
            "generalPractitioner": [{"reference": gp}],
            "managingOrganization": {"reference": org}
        })
    }

    /// Patients of cases 032/051/160/210.
    fn patients() -> Vec<Value> {
        vec![
            patient("p1", "Practitioner/pr1", "Organization/org1"),
            patient("p2", "Practitioner/pr2", "Organization/org2"),
            patient("p3", "Practitioner/pr1", "Organization/org1"),
        ]
    }

    fn matching_ids(c: &Criteria, resources: &[Value]) -> Vec<String> {
        resources
            .iter()
            .filter(|r| c.matches(r))
            .filter_map(|r| r.get("id").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    #[test]
    fn case_criteria_against_fixtures() {
        let tasks: Vec<Value> = [
            ("t1", "accepted", "org1"),
            ("t2", "completed", "org2"),
            ("t3", "requested", "org1"),
        ]
        .iter()
        .map(|(id, status, org)| {
            json!({"resourceType": "Task", "id": id, "status": status, "intent": "order",
                       "owner": {"reference": format!("Organization/{org}")}})
        })
        .collect();
        let service_requests: Vec<Value> = [("sr1", "active", "p1"), ("sr2", "completed", "p2")]
            .iter()
            .map(|(id, status, p)| {
                json!({"resourceType": "ServiceRequest", "id": id, "status": status, "intent": "order",
                       "subject": {"reference": format!("Patient/{p}")}, "authoredOn": "2024-05-02"})
            })
            .collect();
        let p1 = [("patient", "Patient/p1")];
        let cases: Vec<(&str, String, Vec<Value>, Vec<&str>)> = vec![
            // 030, 031, 070, 130, 191: own observations.
            (
                "Observation",
                substitute("Observation?subject=%patient", &p1),
                observations(),
                vec!["o1", "o2"],
            ),
            // 032: %patient.id.
            (
                "Patient",
                substitute("Patient?_id=%patient.id", &[("patient", "Patient/p2")]),
                patients(),
                vec!["p2"],
            ),
            // 033: a string parameter.
            (
                "Task",
                "Task?status=accepted".to_string(),
                tasks,
                vec!["t1"],
            ),
            // 040, 081, 150: a token.
            (
                "Observation",
                "Observation?category=vital-signs".to_string(),
                observations(),
                vec!["o1", "o3"],
            ),
            (
                "Observation",
                substitute(
                    "Observation?performer=%practitioner",
                    &[("practitioner", "Practitioner/pr2")],
                ),
                observations(),
                vec!["o2", "o4"],
            ),
            // 051, 160.
            (
                "Patient",
                "Patient?organization=Organization/org1".to_string(),
                patients(),
                vec!["p1", "p3"],
            ),
            // 071, 072.
            (
                "ServiceRequest",
                "ServiceRequest?status=active".to_string(),
                service_requests.clone(),
                vec!["sr1"],
            ),
            (
                "ServiceRequest",
                "ServiceRequest?status=completed".to_string(),
                service_requests,
                vec!["sr2"],
            ),
            // 210: %profile.
            (
                "Patient",
                substitute(
                    "Patient?general-practitioner=%profile",
                    &[("profile", "Practitioner/pr1")],
                ),
                patients(),
                vec!["p1", "p3"],
            ),
            // 191: the SMART scope query appended to the criteria.
            (
                "Observation",
                substitute(
                    "Observation?subject=%patient&category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
                    &p1,
                ),
                observations(),
                vec!["o2"],
            ),
        ];
        for (t, criteria, resources, expected) in cases {
            let c = parse(t, &criteria);
            assert_eq!(matching_ids(&c, &resources), expected, "{criteria}");
        }
    }

    #[test]
    fn case_writes_checked_against_criteria() {
        let c = parse("Observation", "Observation?subject=Patient/p1");
        // 070: a new Observation for p2 is outside the criteria.
        assert!(!c.matches(&obs(
            "new",
            "Patient/p2",
            "Practitioner/pr1",
            "vital-signs",
            "8867-4"
        )));
        let sr = |status: &str| json!({"resourceType": "ServiceRequest", "id": "sr1", "status": status, "intent": "order"});
        let active = parse("ServiceRequest", "ServiceRequest?status=active");
        // 071 / 072: current and new versions.
        assert!(active.matches(&sr("active")));
        assert!(!active.matches(&sr("completed")));
    }

    #[test]
    fn query_params_of_case_criteria() {
        let qp = |t: &str, c: &str| -> Vec<(String, String)> {
            parse(t, c)
                .query_params()
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect()
        };
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        assert_eq!(
            qp("Observation", "Observation?subject=Patient/p1"),
            [pair("subject", "Patient/p1")]
        );
        assert_eq!(qp("Patient", "Patient?_id=p2"), [pair("_id", "p2")]);
        assert_eq!(
            qp(
                "Observation",
                "Observation?category=http%3A%2F%2Fx%7Cvital-signs&code:not=a,b"
            ),
            [
                pair("category", "http://x|vital-signs"),
                pair("code:not", "a,b")
            ]
        );
        assert_eq!(
            qp("Patient", "Patient?name=lan&family:exact=Nguyen"),
            [pair("name:contains", "lan"), pair("family:exact", "Nguyen")]
        );
        assert_eq!(
            qp("Patient", "Patient?name:contains=lan"),
            [pair("name:contains", "lan")]
        );
        assert_eq!(
            qp(
                "Patient",
                "Patient?birthdate=ge1980&_lastUpdated=lt2024-01-01T00:00:00Z"
            ),
            [
                pair("birthdate", "ge1980"),
                pair("_lastUpdated", "lt2024-01-01T00:00:00Z")
            ]
        );
        assert_eq!(
            qp("Patient", "Patient?email:present=true&phone:missing=true"),
            [
                pair("email:missing", "false"),
                pair("phone:missing", "true")
            ]
        );
        assert_eq!(
            qp("Observation", "Observation?subject:Patient=p1"),
            [pair("subject:Patient", "p1")]
        );
        assert_eq!(
            qp("ValueSet", "ValueSet?url:exact=http://x/vs"),
            [pair("url", "http://x/vs")]
        );
        let complete = |t: &str, c: &str| parse(t, c).upstream_complete();
        assert!(complete(
            "Observation",
            "Observation?subject=Patient/p1&category=vital-signs"
        ));
        assert!(!complete(
            "Observation",
            "Observation?_compartment=Patient/p1"
        ));
        assert!(!complete("ValueSet", "ValueSet?url=example"));
        assert!(!complete("Patient", "Patient?name:not=lan"));
        assert!(!complete("Patient", "Patient?birthdate:not=1984"));
        assert!(!complete(
            "Patient",
            "Patient?organization:not=Organization/org1"
        ));
        assert!(
            !complete("ServiceRequest", "ServiceRequest?reason-code=x"),
            "Medplum-only parameter"
        );
        assert!(
            parse("Observation", "Observation?_compartment=Patient/p1")
                .query_params()
                .is_empty()
        );
        assert!(parse("Patient", "Patient?").query_params().is_empty());
    }

    #[test]
    fn reference_parameters() {
        let o = |subject: &str| json!({"resourceType": "Observation", "subject": {"reference": subject}});
        let table = [
            ("subject=Patient/p1", "Patient/p1", true),
            ("subject=Patient/p1", "Patient/p10", false),
            ("subject=Patient/p1", "Patient/xp1", false),
            ("subject=Patient/p1", "Group/p1", false),
            (
                "subject=Patient/p1",
                "https://fhir.example.org/R4/Patient/p1",
                true,
            ),
            (
                "subject=Patient/p1",
                "https://fhir.example.org/R4/XPatient/p1",
                false,
            ),
            ("subject=Patient/p1", "Patient/p1/_history/3", true),
            ("subject=p1", "Patient/p1", true),
            ("subject=p1", "Group/p1", true),
            ("subject=p1", "Patient/xp1", false),
            ("subject=Patient/p1,Patient/p2", "Patient/p2", true),
            ("subject:Patient=p1", "Patient/p1", true),
            ("subject:Patient=p1", "Group/p1", false),
            ("subject:Patient=Patient/p1", "Patient/p1", true),
            ("subject=https://h/Patient/p1", "https://h/Patient/p1", true),
            ("subject=https://h/Patient/p1", "Patient/p1", false),
            ("subject=urn:uuid:1234", "urn:uuid:1234", true),
            ("subject:not=Patient/p1", "Patient/p1", false),
            ("subject:not=Patient/p1", "Patient/p2", true),
            ("patient=Patient/p1", "Patient/p1", true),
            ("patient=Patient/p1", "Group/x", false),
        ];
        for (q, subject, expected) in table {
            let c = parse("Observation", &format!("Observation?{q}"));
            assert_eq!(c.matches(&o(subject)), expected, "{q} vs {subject}");
        }
        let none = json!({"resourceType": "Observation"});
        assert!(!parse("Observation", "Observation?subject=Patient/p1").matches(&none));
        assert!(parse("Observation", "Observation?subject:not=Patient/p1").matches(&none));
        let display_only =
            json!({"resourceType": "Observation", "subject": {"display": "Patient/p1"}});
        assert!(!parse("Observation", "Observation?subject=Patient/p1").matches(&display_only));
        // Several references: any.
        let multi = json!({"resourceType": "Observation", "performer": [{"reference": "Practitioner/a"}, {"reference": "Organization/b"}]});
        assert!(parse("Observation", "Observation?performer=Organization/b").matches(&multi));
        // Canonical references (reference parameters over canonical elements).
        let plan = json!({"resourceType": "PlanDefinition", "relatedArtifact": [
            {"type": "derived-from", "resource": "http://x/PlanDefinition/base|2.0"},
            {"type": "depends-on", "resource": "http://x/Library/lib"}]});
        assert!(
            parse(
                "PlanDefinition",
                "PlanDefinition?derived-from=http://x/PlanDefinition/base"
            )
            .matches(&plan)
        );
        assert!(
            parse(
                "PlanDefinition",
                "PlanDefinition?derived-from=http://x/PlanDefinition/base%7C2.0"
            )
            .matches(&plan)
        );
        assert!(
            !parse(
                "PlanDefinition",
                "PlanDefinition?derived-from=http://x/PlanDefinition/base%7C1.0"
            )
            .matches(&plan)
        );
        assert!(
            !parse(
                "PlanDefinition",
                "PlanDefinition?derived-from=http://x/Library/lib"
            )
            .matches(&plan)
        );
        assert!(
            parse(
                "PlanDefinition",
                "PlanDefinition?depends-on=http://x/Library/lib"
            )
            .matches(&plan)
        );
    }

    #[test]
    fn string_and_uri_parameters() {
        let p = &patients()[0];
        let table = [
            ("name=lan", true),
            ("name=GUYE", true),
            ("name=thi", true),
            ("name=nguyen,smith", true),
            ("name=smith", false),
            ("name=official", false), // `use` is not text
            ("name=2001", false),     // nor is `period`
            ("family=nguy", true),
            ("family:exact=Nguyen", true),
            ("family:exact=nguyen", false),
            ("family:exact=Nguy", false),
            ("family:contains=UYE", true),
            ("given=lan", true),
            ("given:exact=Thi", true),
            ("address=division", true),
            ("address=home", false),
            ("address-city=portland", true),
            ("address-postalcode=9720", true),
            ("address-state=or", true),
            ("name:not=smith", true),
            ("name:not=lan", false),
            ("name:missing=false", true),
            ("name:missing=true", false),
            ("name:present=true", true),
            ("phonetic=lan", true),
            ("family=lan%5C,thi", false), // an escaped comma is part of the value
        ];
        for (q, expected) in table {
            let c = parse("Patient", &format!("Patient?{q}"));
            assert_eq!(c.matches(p), expected, "{q}");
        }
        let vs =
            json!({"resourceType": "ValueSet", "url": "http://example.org/fhir/ValueSet/Colors"});
        for (q, expected) in [
            ("url=example.org", true),
            ("url=valueset/colors", true),
            ("url=other", false),
            ("url:exact=http://example.org/fhir/ValueSet/Colors", true),
            ("url:exact=http://example.org/fhir/ValueSet/colors", false),
            ("url:missing=false", true),
            ("url:not=colors", false),
        ] {
            assert_eq!(
                parse("ValueSet", &format!("ValueSet?{q}")).matches(&vs),
                expected,
                "{q}"
            );
        }
        let tagged = json!({"resourceType": "Patient", "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"], "source": "urn:app"}});
        assert!(parse("Patient", "Patient?_profile=us-core-patient").matches(&tagged));
        assert!(parse("Patient", "Patient?_source=urn:app").matches(&tagged));
        assert!(!parse("Patient", "Patient?_source=other").matches(&tagged));
    }

    #[test]
    fn token_parameters() {
        let p = &patients()[0];
        let table = [
            ("gender=female", true),
            ("gender=FEMALE", true),
            ("gender=male", false),
            ("gender=male,female", true),
            ("gender=|female", true),
            ("gender=http://x|female", false),
            ("active=true", true),
            ("active=false", false),
            ("identifier=MRN-p1", true),
            ("identifier=mrn-P1", true),
            ("identifier=http://hospital.example.org/mrn|MRN-p1", true),
            ("identifier=http://hospital.example.org/mrn|", true),
            ("identifier=http://other|MRN-p1", false),
            ("identifier=|MRN-p1", false),
            ("identifier=MR", false),
            ("telecom=%2B1-503-555-0199", true),
            ("telecom=phone|%2B1-503-555-0199", true),
            ("telecom=email|%2B1-503-555-0199", false),
            ("telecom=+1-503-555-0199", false), // `+` is a space in a query string
            ("phone=%2B1-503-555-0199", true),
            ("phone=lan.nguyen@example.com", false),
            ("email=lan.nguyen@example.com", true),
            ("_id=p1", true),
            ("_id=P1", false), // ids are case-sensitive
            ("_id=|p1", true),
            ("_id=p2,p1", true),
            ("_id=p2", false),
            ("_id:not=p2", true),
            ("gender:not=female", false),
            ("gender:not=male,other", true),
            ("gender:missing=false", true),
            ("deceased:missing=true", false),
            ("_tag=x", false),
            ("_tag:missing=true", true),
        ];
        for (q, expected) in table {
            let c = match Criteria::parse("Patient", &format!("Patient?{q}")) {
                Ok(c) => c,
                Err(e) if q.starts_with("deceased") => {
                    // Patient.deceased uses FHIRPath beyond the subset: refused.
                    assert!(matches!(e, CriteriaError::Unsupported(_)));
                    continue;
                }
                Err(e) => panic!("{q}: {e}"),
            };
            assert_eq!(c.matches(p), expected, "{q}");
        }
        let o = &observations()[0];
        let table = [
            ("code=http://loinc.org|8867-4", true),
            ("code=HTTP://LOINC.ORG|8867-4", true),
            ("code=8867-4", true),
            ("code=http://snomed.info/sct|8867-4", false),
            ("code=http://loinc.org|", true),
            ("code=|8867-4", false),
            ("code=x", false), // `text` is not a code
            ("category=vital-signs", true),
            ("status=final", true),
            ("status=final,amended", true),
            ("status:not=final", false),
            ("value-concept=x", false),
        ];
        for (q, expected) in table {
            assert_eq!(
                parse("Observation", &format!("Observation?{q}")).matches(o),
                expected,
                "{q}"
            );
        }
        let coded = json!({"resourceType": "Observation", "valueCodeableConcept": {"coding": [{"code": "pos"}]},
                           "meta": {"tag": [{"system": "urn:t", "code": "a"}], "security": [{"code": "R"}]}});
        for (q, expected) in [
            ("value-concept=pos", true),
            ("value-concept=|pos", true),
            ("_tag=urn:t|a", true),
            ("_tag=a", true),
            ("_tag=urn:t|b", false),
            ("_security=r", true),
            ("_security=|R", true),
        ] {
            assert_eq!(
                parse("Observation", &format!("Observation?{q}")).matches(&coded),
                expected,
                "{q}"
            );
        }
        // Escaped separators are part of the code.
        let odd = json!({"resourceType": "Observation", "status": "a|b,c"});
        assert!(parse("Observation", "Observation?status=a%5C%7Cb%5C,c").matches(&odd));
    }

    #[test]
    fn date_parameters() {
        let o = |value: Value| {
            let mut r = json!({"resourceType": "Observation"});
            if let (Some(map), Value::Object(fields)) = (r.as_object_mut(), value) {
                map.extend(fields);
            }
            r
        };
        let instant = o(json!({"effectiveDateTime": "2024-05-02T09:30:00Z"}));
        let offset = o(json!({"effectiveDateTime": "2024-05-02T23:30:00-05:00"})); // 2024-05-03T04:30Z
        let day = o(json!({"effectiveDateTime": "2024-05-02"}));
        let month = o(json!({"effectiveDateTime": "2024-05"}));
        let period = o(json!({"effectivePeriod": {"start": "2024-05-01", "end": "2024-05-10"}}));
        let open = o(json!({"effectivePeriod": {"start": "2024-05-01"}}));
        let timing = o(
            json!({"effectiveTiming": {"event": ["2024-05-03T10:00:00Z", "2024-05-04T10:00:00Z"]}}),
        );
        let inst = o(json!({"effectiveInstant": "2024-05-02T09:30:00.250Z"}));
        let none = o(json!({}));
        let table: Vec<(&str, &Value, bool)> = vec![
            ("date=2024-05-02", &instant, true),
            ("date=2024-05", &instant, true),
            ("date=2024", &instant, true),
            ("date=2024-05-03", &instant, false),
            ("date=eq2024-05-02", &instant, true),
            ("date=ne2024-05-02", &instant, false),
            ("date=ne2024-05-03", &instant, true),
            ("date=gt2024-05-01", &instant, true),
            ("date=gt2024-05-02", &instant, false),
            ("date=ge2024-05-02", &instant, true),
            ("date=lt2024-05-03", &instant, true),
            ("date=lt2024-05-02", &instant, false),
            ("date=le2024-05-02", &instant, true),
            ("date=lt2024-05-02T09:30:00Z", &instant, false),
            ("date=lt2024-05-02T09:30:01Z", &instant, true),
            ("date=gt2024-05-02T09:29:59Z", &instant, true),
            ("date=gt2024-05-02T11:29:00%2B02:00", &instant, true),
            ("date=gt2024-05-02T11:31:00%2B02:00", &instant, false),
            ("date=eq2024-05-02T09:30Z", &instant, true),
            ("date=sa2024-05-01", &instant, true),
            ("date=sa2024-05-02", &instant, false),
            ("date=eb2024-05-03", &instant, true),
            ("date=eb2024-05-02", &instant, false),
            ("date=2024-05-03", &offset, true),
            ("date=2024-05-02", &offset, false),
            ("date=2024-05-02", &day, true),
            ("date=2024-05-02T00:00:00Z", &day, false),
            ("date=gt2024-05-02T12:00:00Z", &day, true),
            ("date=lt2024-05-02T12:00:00Z", &day, true),
            ("date=2024-05", &month, true),
            ("date=2024-05-02", &month, false),
            ("date=ge2024-05-02", &month, true),
            ("date=2024-05", &period, true),
            ("date=2024-05-05", &period, false),
            ("date=ne2024-05-05", &period, true),
            ("date=gt2024-05-05", &period, true),
            ("date=lt2024-05-05", &period, true),
            ("date=sa2024-04-30", &period, true),
            ("date=eb2024-05-11", &period, true),
            ("date=eb2024-05-10", &period, false),
            ("date=gt2030", &open, true),
            ("date=lt2024-05-01", &open, false),
            ("date=2024", &open, false),
            ("date=2024-05-03", &timing, false),
            ("date=ge2024-05-03", &timing, true),
            ("date=2024-05", &timing, true),
            ("date=2024-05-02T09:30:00Z", &inst, true),
            ("date=gt2024-05-02T09:30:00.250Z", &inst, false),
            ("date=2024,2023", &instant, true),
            ("date=2022,2023", &instant, false),
            ("date:not=2024", &instant, false),
            ("date:missing=true", &none, true),
            ("date=2024", &none, false),
            ("date=ne2024", &none, false),
            ("date:not=2024", &none, true),
        ];
        for (q, r, expected) in table {
            assert_eq!(
                parse("Observation", &format!("Observation?{q}")).matches(r),
                expected,
                "{q} vs {r}"
            );
        }
        let p = &patients()[0];
        assert!(parse("Patient", "Patient?birthdate=1984-03-12").matches(p));
        assert!(parse("Patient", "Patient?birthdate=lt1985").matches(p));
        assert!(!parse("Patient", "Patient?birthdate=gt1985").matches(p));
        let updated = json!({"resourceType": "Patient", "meta": {"lastUpdated": "2024-06-01T10:00:00.123+00:00"}});
        assert!(parse("Patient", "Patient?_lastUpdated=ge2024-06-01").matches(&updated));
        assert!(!parse("Patient", "Patient?_lastUpdated=lt2024-06-01T10:00:00Z").matches(&updated));
        // Unparseable resource dates match no value.
        let bad = o(json!({"effectiveDateTime": "yesterday"}));
        assert!(!parse("Observation", "Observation?date=ne2024").matches(&bad));
    }

    #[test]
    fn compartment_parameter() {
        let obs_p1 = obs("o1", "Patient/p1", "Practitioner/pr1", "vital-signs", "1");
        let performed_by_p1 = obs("o9", "Group/g", "Patient/p1", "vital-signs", "1");
        let obs_p2 = obs("o3", "Patient/p2", "Practitioner/pr1", "vital-signs", "1");
        let p1 = &patients()[0];
        let p2 = &patients()[1];
        let tagged = json!({"resourceType": "Organization", "id": "org9", "meta": {"compartment": [{"reference": "Patient/p1"}, {"reference": "Project/proj"}]}});
        let account_a = json!({"resourceType": "Patient", "id": "pa", "meta": {"account": {"reference": "Organization/A"}}});
        let org = json!({"resourceType": "Organization", "id": "org1"});
        let linked = json!({"resourceType": "Patient", "id": "p7", "link": [{"other": {"reference": "Patient/p1"}, "type": "seealso"}]});
        let table: Vec<(&str, &Value, bool)> = vec![
            ("_compartment=Patient/p1", &obs_p1, true),
            ("_compartment=Patient/p1", &performed_by_p1, true),
            ("_compartment=Patient/p1", &obs_p2, false),
            ("_compartment=p1", &obs_p1, true),
            ("_compartment=Patient/p1,Patient/p2", &obs_p2, true),
            ("_compartment=Patient/p1", p1, true),
            ("_compartment=Patient/p1", p2, false),
            ("_compartment=p1", p1, true),
            ("_compartment=Patient/p1", &linked, true),
            ("_compartment=Patient/p1", &tagged, true),
            ("_compartment=Project/proj", &tagged, true),
            ("_compartment=Organization/A", &account_a, true),
            ("_compartment=Organization/B", &account_a, false),
            ("_compartment=proj", &tagged, true),
            ("_compartment=Project/other", &tagged, false),
            ("_compartment=Patient/p1", &org, false),
            ("_compartment=Practitioner/pr1", &obs_p1, false),
        ];
        for (q, r, expected) in table {
            let rt = r.get("resourceType").and_then(Value::as_str).unwrap();
            let typed = parse(rt, &format!("{rt}?{q}"));
            assert_eq!(typed.matches(r), expected, "{rt}?{q} vs {r}");
            let wildcard = parse("*", &format!("*?{q}"));
            assert_eq!(wildcard.matches(r), expected, "*?{q} vs {r}");
            assert_eq!(
                wildcard.for_type(rt).unwrap().matches(r),
                expected,
                "*?{q} for {rt}"
            );
        }
    }

    #[test]
    fn wildcard_criteria() {
        let c = parse("*", "*?_compartment=Patient/p1");
        assert!(c.is_wildcard());
        assert_eq!(c.resource_type(), "*");
        let o = c.for_type("Observation").unwrap();
        assert_eq!(o.resource_type(), "Observation");
        assert!(!o.is_wildcard());
        assert!(
            !o.matches(&patients()[0]),
            "instantiated criteria keep their type"
        );
        assert!(c.for_type("Nope").is_err());

        // Common parameters are validated at parse time.
        assert!(matches!(
            Criteria::parse("*", "*?_id:exact=1"),
            Err(CriteriaError::Unsupported(_))
        ));
        assert!(matches!(
            Criteria::parse("*", "*?_lastUpdated=soon"),
            Err(CriteriaError::Unsupported(_))
        ));
        assert!(matches!(
            Criteria::parse("*", "*?nope=1"),
            Err(CriteriaError::UnknownParameter(_))
        ));
        assert!(matches!(
            Criteria::parse("*", "*?subject:text=1"),
            Err(CriteriaError::Unsupported(_))
        ));

        // Other parameters exist on some types only: checked per type.
        let c = parse("*", "*?patient=Patient/p1&_id=o1,o2");
        assert!(!c.upstream_complete());
        assert_eq!(
            c.query_params(),
            [QueryParam {
                name: "_id".into(),
                value: "o1,o2".into()
            }]
        );
        let o = c.for_type("Observation").unwrap();
        assert!(o.upstream_complete());
        assert_eq!(o.query_params().len(), 2);
        assert!(o.matches(&observations()[0]));
        assert!(!o.matches(&observations()[2]));
        assert!(
            c.matches(&observations()[0]),
            "a wildcard criteria compiles for the resource type"
        );
        assert!(!c.matches(&observations()[2]));
        assert!(matches!(
            c.for_type("Organization"),
            Err(CriteriaError::UnknownParameter(_))
        ));
        assert!(
            !c.matches(&json!({"resourceType": "Organization", "id": "o1"})),
            "fails closed"
        );

        let tagged = parse("*", "*?_tag=urn:t|a");
        assert!(tagged.upstream_complete());
        assert!(tagged.matches(
            &json!({"resourceType": "Basic", "meta": {"tag": [{"system": "urn:t", "code": "a"}]}})
        ));
        assert!(!tagged.matches(&json!({"resourceType": "Basic"})));
        assert!(tagged.for_type("Basic").unwrap().matches(
            &json!({"resourceType": "Basic", "meta": {"tag": [{"system": "urn:t", "code": "a"}]}})
        ));

        // Typed criteria only apply to their type.
        let typed = parse("Patient", "Patient?_id=p1");
        assert_eq!(typed.for_type("Patient").unwrap(), typed);
        assert!(typed.for_type("Observation").is_err());
    }

    #[test]
    fn type_must_match() {
        let c = parse("Patient", "Patient?_id=p1");
        assert!(c.matches(&json!({"resourceType": "Patient", "id": "p1"})));
        assert!(!c.matches(&json!({"resourceType": "Practitioner", "id": "p1"})));
        assert!(!c.matches(&json!({"id": "p1"})));
        assert!(!c.matches(&json!([{"resourceType": "Patient", "id": "p1"}])));
        assert!(!c.matches(&json!("Patient")));
        let all = parse("Patient", "Patient?");
        assert!(all.matches(&json!({"resourceType": "Patient"})));
        assert!(!all.matches(&json!({"resourceType": "Observation"})));
    }

    #[test]
    fn and_of_filters() {
        let o = observations();
        let c = parse(
            "Observation",
            "Observation?subject=Patient/p1&category=vital-signs",
        );
        assert_eq!(matching_ids(&c, &o), ["o1"]);
        let c = parse("Observation", "Observation?status=final&status=amended");
        assert!(
            matching_ids(&c, &o).is_empty(),
            "repeated parameters are ANDed"
        );
        let c = parse(
            "Observation",
            "Observation?category=laboratory&performer=Practitioner/pr2&subject=p2",
        );
        assert_eq!(matching_ids(&c, &o), ["o4"]);
    }

    #[test]
    fn refused_at_parse_time() {
        use CriteriaError::*;
        type Check = fn(&CriteriaError) -> bool;
        let table: Vec<(&str, &str, Check)> = vec![
            ("Observation", "Patient?_id=1", |e| {
                matches!(e, WrongType(_))
            }),
            ("Observation", "Observation", |e| matches!(e, WrongType(_))),
            ("*", "Observation?_id=1", |e| matches!(e, WrongType(_))),
            ("Nope", "Nope?_id=1", |e| matches!(e, Unsupported(_))),
            ("Observation", "Observation?nope=1", |e| {
                matches!(e, UnknownParameter(_))
            }),
            ("Observation", "Observation?birthdate=2020", |e| {
                matches!(e, UnknownParameter(_))
            }),
            ("Observation", "Observation?_count=10", |e| {
                matches!(e, UnknownParameter(_))
            }),
            ("Observation", "Observation?_sort=date", |e| {
                matches!(e, UnknownParameter(_))
            }),
            (
                "Observation",
                "Observation?_include=Observation:subject",
                |e| matches!(e, UnknownParameter(_)),
            ),
            ("Observation", "Observation?_type=Patient", |e| {
                matches!(e, UnknownParameter(_))
            }),
            ("Observation", "Observation?subject.name=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Observation", "Observation?subject:Patient.name=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_has:Observation:subject:code=1", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_filter=name eq x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_text=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_content=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_query=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Observation", "Observation?value-quantity=5", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Observation", "Observation?code-value-quantity=1$2", |e| {
                matches!(e, Unsupported(_))
            }),
            ("RiskAssessment", "RiskAssessment?probability=0.5", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Location", "Location?near=1|2", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?deceased=true", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name:text=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name:nope=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name:=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?gender:exact=male", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?gender:text=male", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?gender:in=http://vs", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?gender:below=m", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?identifier:of-type=a|b|c", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?organization:identifier=a|b", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?organization:Patient=1", |e| {
                matches!(e, Unsupported(_))
            }),
            (
                "Patient",
                "Patient?organization:Organization=Patient/1",
                |e| matches!(e, Unsupported(_)),
            ),
            ("Patient", "Patient?organization:contains=x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate:exact=2020", |e| {
                matches!(e, Unsupported(_))
            }),
            ("ValueSet", "ValueSet?url:below=http://x", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name:missing=yes", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name:present=1", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name=", |e| matches!(e, Unsupported(_))),
            ("Patient", "Patient?name", |e| matches!(e, Unsupported(_))),
            ("Patient", "Patient?name=a,,b", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?name=a,", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?gender=|", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?gender=a|b|c", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate=ap2020", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate=xx2020", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate=2020-13", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate=2021-02-29", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate=2020-01-01T10:00:00", |e| {
                matches!(e, Unsupported(_))
            }),
            (
                "Patient",
                "Patient?birthdate=2020-01-01T10:00:00+02:00",
                |e| matches!(e, Unsupported(_)),
            ),
            ("Patient", "Patient?birthdate=2020-01-01T25:00:00Z", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?birthdate=20", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_compartment:not=Patient/1", |e| {
                matches!(e, Unsupported(_))
            }),
            ("Patient", "Patient?_compartment:missing=true", |e| {
                matches!(e, Unsupported(_))
            }),
            (
                "ProjectMembership",
                "ProjectMembership?profile-type=Patient",
                |e| matches!(e, Unsupported(_)),
            ),
            ("*", "*?_id:text=1", |e| matches!(e, Unsupported(_))),
            ("*", "*?subject.name=x", |e| matches!(e, Unsupported(_))),
            ("*", "*?value-quantity=5", |e| matches!(e, Unsupported(_))),
            ("*", "*?patient:Organization=1", |e| {
                matches!(e, Unsupported(_))
            }),
            ("*", "*?patient=", |e| matches!(e, Unsupported(_))),
            ("*", "*?birthdate=soon", |e| matches!(e, Unsupported(_))),
        ];
        for (t, c, check) in table {
            match Criteria::parse(t, c) {
                Ok(parsed) => panic!("{c} was accepted: {parsed:?}"),
                Err(e) => assert!(check(&e), "{c}: unexpected {e:?}"),
            }
        }
    }

    #[test]
    fn dates_parse_to_ranges() {
        let day = |y, m, d| days_from_civil(y, m, d) * MS_PER_DAY;
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            parse_date("2024", true),
            Some((day(2024, 1, 1), day(2025, 1, 1)))
        );
        assert_eq!(
            parse_date("2024-12", true),
            Some((day(2024, 12, 1), day(2025, 1, 1)))
        );
        assert_eq!(
            parse_date("2024-02-29", true),
            Some((day(2024, 2, 29), day(2024, 3, 1)))
        );
        assert_eq!(parse_date("2023-02-29", true), None);
        let t = day(2024, 5, 2) + (9 * 3600 + 30 * 60) * 1000;
        assert_eq!(
            parse_date("2024-05-02T09:30:00Z", true),
            Some((t, t + 1000))
        );
        assert_eq!(parse_date("2024-05-02T09:30Z", true), Some((t, t + 60_000)));
        assert_eq!(
            parse_date("2024-05-02T11:30:00+02:00", true),
            Some((t, t + 1000))
        );
        assert_eq!(
            parse_date("2024-05-02T09:30:00.5Z", true),
            Some((t + 500, t + 600))
        );
        assert_eq!(
            parse_date("2024-05-02T09:30:00.123456Z", true),
            Some((t + 123, t + 124))
        );
        assert_eq!(
            parse_date("2024-05-02T09:30:00", false),
            Some((t, t + 1000))
        );
        assert_eq!(parse_date("2024-05-02T09:30:00", true), None);
        for bad in [
            "",
            "202",
            "2024-",
            "2024-1",
            "2024-05-02T",
            "2024-05-02T09",
            "2024-05-02T09:30:00.Z",
            "2024-05-02T09:30:00+0200",
            "2024-05-02T09:30:00Zx",
            "２０２４",
        ] {
            assert_eq!(parse_date(bad, false), None, "{bad}");
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("Patient/p1"),
                Just("2024-05-02T09:30:00Z"),
                Just("2024"),
                Just("Observation"),
                Just("Patient"),
                Just("p1"),
                Just("http://loinc.org"),
                Just("9999-12-31T23:59:59.999-14:00"),
            ]
            .prop_map(|s| Value::String(s.to_string())),
        ];
        let key = prop_oneof![
            Just("resourceType".to_string()),
            Just("id".to_string()),
            Just("subject".to_string()),
            Just("reference".to_string()),
            Just("code".to_string()),
            Just("coding".to_string()),
            Just("system".to_string()),
            Just("value".to_string()),
            Just("effectiveDateTime".to_string()),
            Just("effectivePeriod".to_string()),
            Just("start".to_string()),
            Just("end".to_string()),
            Just("event".to_string()),
            Just("meta".to_string()),
            Just("compartment".to_string()),
            Just("name".to_string()),
            Just("performer".to_string()),
            "[a-zA-Z_]{1,8}",
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6)
                    .prop_map(|kvs| Value::Object(kvs.into_iter().collect())),
            ]
        })
    }

    fn fuzz_criteria() -> Vec<Criteria> {
        [
            ("Observation", "Observation?subject=Patient/p1&code=http://loinc.org|1&date=ge2024&_compartment=p1"),
            ("Observation", "Observation?performer:missing=false&status:not=final&value-concept=x"),
            ("Patient", "Patient?name=a&address=b&_id=p1&birthdate=ne2024-05&telecom=phone|1"),
            ("*", "*?_compartment=Patient/p1&_lastUpdated=lt2024-01-01T00:00:00Z&_tag=a|b"),
            ("*", "*?patient=Patient/p1"),
        ]
        .iter()
        .map(|(t, c)| parse(t, c))
        .collect()
    }

    proptest! {
        #[test]
        fn parse_never_panics(
            s in ".{0,80}",
            t in prop_oneof![Just("Patient".to_string()), Just("*".to_string()), Just("Observation".to_string()), ".{0,6}"],
        ) {
            let t = t.as_str();
            let _ = Criteria::parse(t, &s);
            let _ = Criteria::parse(t, &format!("{t}?{s}"));
        }

        #[test]
        fn parse_never_panics_on_query_like_input(
            name in prop_oneof![
                Just("subject".to_string()),
                Just("_id".to_string()),
                Just("date".to_string()),
                Just("name".to_string()),
                Just("code".to_string()),
                Just("_compartment".to_string()),
                "[a-z_:.-]{0,12}",
            ],
            modifier in prop_oneof![
                Just(String::new()),
                Just(":not".to_string()),
                Just(":missing".to_string()),
                Just(":exact".to_string()),
                Just(":Patient".to_string()),
                ":[a-zA-Z-]{0,8}",
            ],
            value in "[a-zA-Z0-9|,:/%.+\\\\-]{0,24}",
        ) {
            let q = format!("Observation?{name}{modifier}={value}");
            if let Ok(c) = Criteria::parse("Observation", &q) {
                let _ = c.matches(&observations()[0]);
            }
            let _ = Criteria::parse("*", &format!("*?{name}{modifier}={value}"));
        }

        #[test]
        fn matches_never_panics(value in arb_json(), rt in prop_oneof![Just("Observation"), Just("Patient"), Just("Basic")]) {
            let mut resource = value.clone();
            if let Value::Object(map) = &mut resource {
                map.insert("resourceType".to_string(), Value::String(rt.to_string()));
            }
            for c in fuzz_criteria() {
                let _ = c.matches(&value);
                let _ = c.matches(&resource);
            }
        }
    }
}
