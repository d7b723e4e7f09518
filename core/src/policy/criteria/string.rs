//! `string` and `uri` parameters: case-insensitive contains, `:exact`, and the text leaves
//! of complex values.

use serde_json::Value;

use super::CriteriaError;
use super::parse::{Modifier, RawFilter, alternatives, unescape};

pub(super) fn string_matches(s: &str, values: &[String], exact: bool) -> bool {
    if exact {
        values.iter().any(|v| v == s)
    } else {
        let lower = s.to_lowercase();
        values.iter().any(|v| lower.contains(v.as_str()))
    }
}

/// Keys of complex values that are not text a string search looks at.
pub(super) const NON_TEXT_KEYS: [&str; 7] = [
    "use",
    "type",
    "period",
    "extension",
    "modifierExtension",
    "id",
    "system",
];

pub(super) fn string_leaves<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
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

/// The values of a `string` or `uri` filter (lower-cased unless `:exact`) and whether it is
/// `:exact`; `None` for a modifier these types do not take.
pub(super) fn text_values(
    raw: &RawFilter,
    modifier: &Modifier,
) -> Result<Option<(Vec<String>, bool)>, CriteriaError> {
    let exact = match modifier {
        Modifier::Exact => true,
        Modifier::None | Modifier::Contains | Modifier::Not => false,
        _ => return Ok(None),
    };
    let values = alternatives(raw)?
        .into_iter()
        .map(|v| {
            if exact {
                unescape(v)
            } else {
                unescape(v).to_lowercase()
            }
        })
        .collect();
    Ok(Some((values, exact)))
}
