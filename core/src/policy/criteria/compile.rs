//! Compiling a filter for a resource type by its parameter type, and matching it.

use serde_json::Value;

use super::date::{DateValue, Range, node_range};
use super::parse::{Modifier, RawFilter, alternatives, parse_modifier, split_unescaped, unescape};
use super::reference::{RefValue, in_patient_compartment, meta_account};
use super::string::{string_leaves, string_matches, text_values};
use super::token::{TokenValue, token_pairs};
use super::{CONTAINS_MODIFIER, CriteriaError, unsupported};
use crate::fhir::request::QueryParam;
use crate::fhir::searchparam::{self, FhirPath, ParamType};

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Filter {
    pub(super) path: FhirPath,
    pub(super) test: Test,
    pub(super) negate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Test {
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
pub(super) fn compile_filter(
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
            let Some((values, exact)) = text_values(raw, &modifier)? else {
                return Err(bad_modifier());
            };
            let upstream = match modifier {
                Modifier::Exact => as_is(),
                Modifier::None | Modifier::Contains => forward(
                    format!("{}{CONTAINS_MODIFIER}", raw.code),
                    raw.value.clone(),
                ),
                _ => None,
            };
            (Test::Str { values, exact }, upstream)
        }
        ParamType::Uri => {
            let Some((values, exact)) = text_values(raw, &modifier)? else {
                return Err(bad_modifier());
            };
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
    pub(super) fn matches(&self, resource: &Value, rtype: &str) -> bool {
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
