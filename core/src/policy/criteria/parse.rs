//! Parsing the query of a criteria string: filters, modifiers, escapes and alternatives.

use super::compile::compile_filter;
use super::{CriteriaError, unsupported};
use crate::fhir::searchparam;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawFilter {
    pub(super) code: String,
    pub(super) modifier: Option<String>,
    pub(super) value: String,
}

impl RawFilter {
    pub(super) fn name(&self) -> String {
        match &self.modifier {
            Some(m) => format!("{}:{m}", self.code),
            None => self.code.clone(),
        }
    }
}

pub(super) fn parse_query(query: &str) -> Result<Vec<RawFilter>, CriteriaError> {
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
pub(super) enum Modifier {
    None,
    Missing(bool),
    Not,
    Exact,
    Contains,
    Type(String),
}

pub(super) fn parse_modifier(raw: &RawFilter) -> Result<Modifier, CriteriaError> {
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
pub(super) fn check_deferred(raw: &RawFilter) -> Result<(), CriteriaError> {
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
pub(super) fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
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
pub(super) fn unescape(s: &str) -> String {
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
pub(super) fn alternatives(raw: &RawFilter) -> Result<Vec<&str>, CriteriaError> {
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
