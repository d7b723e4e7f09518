//! Response filtering: every resource returned is checked against the policy's read access and
//! redacted (hiddenFields); Bundle entries that fail are removed. Pure.

use serde_json::Value;

use crate::fhir::request::Interaction;
use crate::policy::EffectivePolicy;

mod fast;
#[cfg(test)]
mod tests;

/// Checks one resource for `interaction` and redacts it. False: the caller may not see it.
pub fn check_resource(
    policy: &EffectivePolicy,
    resource: &mut Value,
    interaction: Interaction,
) -> bool {
    let Some(entry) = policy.satisfied(resource, interaction) else {
        return false;
    };
    policy.redact(resource, entry);
    true
}

fn not_found_entry() -> Value {
    serde_json::json!({"response": {"status": "404 Not Found", "outcome": crate::fhir::outcome::Outcome::NotFound.to_json()}})
}

fn is_outcome(v: &Value) -> bool {
    v.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
}

/// Filters a response body in place: a Bundle (entries checked, nested Bundles recursed,
/// `total` removed when anything was dropped or `drop_total`), or a single resource (replaced by
/// nothing visible: the caller decides the status). Returns false when a single resource failed.
pub fn filter_value(policy: &EffectivePolicy, value: &mut Value, drop_total: bool) -> bool {
    if is_outcome(value) {
        return true;
    }
    if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return check_resource(policy, value, Interaction::Read);
    }
    let mut dropped = false;
    // In a batch or transaction response every entry answers one request entry: an invisible
    // result becomes a 404 entry instead of disappearing, so positions still line up.
    let per_request = matches!(
        value.get("type").and_then(Value::as_str),
        Some("batch-response" | "transaction-response")
    );
    if per_request {
        for entry in value
            .get_mut("entry")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let Some(resource) = entry.get_mut("resource") else {
                continue;
            };
            if is_outcome(resource) {
                continue;
            }
            if resource.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                filter_value(policy, resource, true);
            } else if !check_resource(policy, resource, Interaction::Read) {
                *entry = not_found_entry();
            }
        }
        return true;
    }
    if let Some(entries) = value.get_mut("entry").and_then(Value::as_array_mut) {
        entries.retain_mut(|entry| {
            let Some(resource) = entry.get_mut("resource") else {
                return true;
            };
            let keep = keep_entry_resource(policy, resource);
            if !keep {
                dropped = true;
            }
            keep
        });
    }
    if let (true, Some(obj)) = (dropped || drop_total, value.as_object_mut()) {
        // `remove` would be a swap_remove (preserve_order): keep the upstream's member order.
        obj.shift_remove("total");
    }
    true
}

/// What a searchset entry's resource becomes: kept (redacted; a nested Bundle filtered, its
/// `total` dropped), or false when the entry must go. OperationOutcomes stay as they are.
fn keep_entry_resource(policy: &EffectivePolicy, resource: &mut Value) -> bool {
    if is_outcome(resource) {
        return true;
    }
    if resource.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        filter_value(policy, resource, true);
        return true;
    }
    check_resource(policy, resource, Interaction::Read)
}

/// A filtered response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filtered {
    /// What the caller may see, as JSON.
    Visible(Vec<u8>),
    /// A single resource the caller may not see: the caller answers without it.
    Hidden,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("response body is not valid JSON")]
    Malformed(#[source] serde_json::Error),
}

/// Upstream URLs to point elsewhere: every JSON string value (not member name) that starts with
/// `from` gets `to` in place of that prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlRewrite<'a> {
    pub from: &'a str,
    pub to: &'a str,
}

/// Applies `rewrite` to every string in `value`.
pub fn rewrite_urls(value: &mut Value, rewrite: &UrlRewrite<'_>) {
    match value {
        Value::String(s) => {
            if let Some(rest) = s.strip_prefix(rewrite.from) {
                *s = format!("{}{rest}", rewrite.to);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_urls(v, rewrite)),
        Value::Object(map) => map.values_mut().for_each(|v| rewrite_urls(v, rewrite)),
        _ => {}
    }
}

/// [`filter_value`] on a JSON body, bytes in, bytes out, upstream URLs rewritten first (as the
/// gateway does) when `rewrite` is given.
///
/// Bundles that are not batch or transaction responses take a byte-level path
/// (`filter/fast.rs`): entries and members the policy does not change are copied as received,
/// so the output is the same JSON as `filter_value`'s, member order included, but not always the
/// same bytes (insignificant whitespace, string escapes and number spellings such as `1.50` stay
/// as the upstream wrote them). Everything else, and any body that path finds unusual, goes
/// through [`filter_bytes_value`].
///
/// The byte path checks the JSON grammar of what it copies (RFC 8259) but does not decode it:
/// inside copied members it lets through three things `serde_json::Value` refuses — `\u`
/// escapes of lone surrogates, numbers beyond the range of `f64`, nesting deeper than 128 — where
/// the `Value` path reports the whole body malformed. Duplicate member names inside copied
/// members are copied too (the `Value` path keeps the last); at the Bundle, entry and resource
/// level they send the body (or the resource) through the `Value` path.
pub fn filter_bytes(
    policy: &EffectivePolicy,
    body: &[u8],
    drop_total: bool,
    rewrite: Option<UrlRewrite<'_>>,
) -> Result<Filtered, FilterError> {
    if let Ok(text) = std::str::from_utf8(body)
        && let Ok(out) = fast::filter(policy, text, drop_total, rewrite)
    {
        return Ok(Filtered::Visible(out));
    }
    filter_bytes_value(policy, body, drop_total, rewrite)
}

/// The reference path of [`filter_bytes`]: parse, [`rewrite_urls`], [`filter_value`], serialise.
pub fn filter_bytes_value(
    policy: &EffectivePolicy,
    body: &[u8],
    drop_total: bool,
    rewrite: Option<UrlRewrite<'_>>,
) -> Result<Filtered, FilterError> {
    let mut value: Value = serde_json::from_slice(body).map_err(FilterError::Malformed)?;
    if let Some(rewrite) = &rewrite {
        rewrite_urls(&mut value, rewrite);
    }
    if !filter_value(policy, &mut value, drop_total) {
        return Ok(Filtered::Hidden);
    }
    serde_json::to_vec(&value)
        .map(Filtered::Visible)
        .map_err(FilterError::Malformed)
}

/// Filters a whole response the gateway could not narrow exactly.
pub fn filter_response(policy: &EffectivePolicy, value: &mut Value) {
    filter_value(policy, value, false);
}
