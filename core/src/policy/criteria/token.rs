//! `token` parameters: `code`, `system|code`, `|code`, `system|`, against codings,
//! identifiers, contact points and primitives.

use serde_json::Value;

use super::parse::{split_unescaped, unescape};
use super::{CriteriaError, unsupported};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SystemMatch {
    /// `code`: any system.
    Any,
    /// `|code`: no system.
    Absent,
    /// `system|…`.
    Is(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TokenValue {
    pub(super) system: SystemMatch,
    /// `None` for `system|` (any code). Lower-cased.
    pub(super) code: Option<String>,
}

/// `(system, code)` of one coded value, lower-cased.
pub(super) type TokenPair = (Option<String>, Option<String>);

impl TokenValue {
    pub(super) fn parse(v: &str) -> Result<TokenValue, CriteriaError> {
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

    pub(super) fn matches(&self, pairs: &[TokenPair]) -> bool {
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

pub(super) fn non_empty_lower(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase)
}

pub(super) fn token_pairs(value: &Value, out: &mut Vec<TokenPair>) {
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

pub(super) fn coding_pair(system: Option<&Value>, code: Option<&Value>, out: &mut Vec<TokenPair>) {
    let system = non_empty_lower(system);
    let code = non_empty_lower(code);
    if system.is_some() || code.is_some() {
        out.push((system, code));
    }
}
