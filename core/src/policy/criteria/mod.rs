//! AccessPolicy criteria (`Type?param=value&…`): parsing, validation against the R4 search
//! parameter definitions, in-memory matching (docs/medplum-compat.md §4.6) and the query parameters that
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

mod compile;
mod date;
mod parse;
mod reference;
mod string;
#[cfg(test)]
mod tests;
mod token;

use serde_json::Value;

use crate::fhir::request::QueryParam;
use crate::fhir::searchparam;
use compile::{Filter, compile_filter};
use parse::{RawFilter, check_deferred, parse_query};

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

/// The modifier string criteria are sent upstream with (Medplum's *contains* semantics); some
/// servers refuse it (HAPI with `allow_contains_searches` off: HAPI-1258).
pub const CONTAINS_MODIFIER: &str = ":contains";

const WILDCARD: &str = "*";
/// The pseudo type the common (`Resource`) parameters are compiled for.
const BASE_TYPE: &str = "Resource";
