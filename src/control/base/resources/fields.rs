//! Reading fields of a JSON resource leniently: a value of the wrong type counts as absent.

use serde_json::Value;

/// The strings of a JSON array joined by spaces (given names, a client's `defaultScope`); other
/// values count as absent.
pub(crate) fn joined_strings(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub(crate) fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}
