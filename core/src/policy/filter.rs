//! Response filtering: every resource returned is checked against the policy's read access and
//! redacted (hiddenFields); Bundle entries that fail are removed. Pure.

use serde_json::Value;

use crate::fhir::request::Interaction;
use crate::policy::EffectivePolicy;

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
            if is_outcome(resource) {
                return true;
            }
            let keep = if resource.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                filter_value(policy, resource, true);
                true
            } else {
                check_resource(policy, resource, Interaction::Read)
            };
            if !keep {
                dropped = true;
            }
            keep
        });
    }
    if let (true, Some(obj)) = (dropped || drop_total, value.as_object_mut()) {
        obj.remove("total");
    }
    true
}

/// Filters a whole response the gateway could not narrow exactly.
pub fn filter_response(policy: &EffectivePolicy, value: &mut Value) {
    filter_value(policy, value, false);
}
