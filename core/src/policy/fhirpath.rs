//! `writeConstraint` evaluation (medplum-auth.md §4.5): every expression must yield exactly one
//! `true` for the new version, with `%before` (the current version, absent on create) and
//! `%after` bound.
//!
//! Until the FHIRPath subset is implemented, no constraint is considered satisfied: writes under
//! an entry with writeConstraints are refused (fail closed), never let through unchecked.

use serde_json::Value;

/// True when every constraint holds for `after` (with `before` the current version).
pub fn write_constraints_hold(
    constraints: &[String],
    _after: &Value,
    _before: Option<&Value>,
) -> bool {
    constraints.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn no_constraints_hold_trivially_and_unknown_ones_fail_closed() {
        assert!(write_constraints_hold(&[], &json!({}), None));
        assert!(!write_constraints_hold(
            &["status = 'final'".into()],
            &json!({"status": "final"}),
            None
        ));
    }
}
