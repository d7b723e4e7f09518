//! JSON Patch (RFC 6902) applied to a resource, so a patched result can be checked before it is
//! written. The patch semantics are the `json-patch` crate's.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("not a JSON Patch document")]
    NotJsonPatch,
    #[error("patch failed: {0}")]
    Failed(String),
}

/// Applies `patch` (a JSON Patch array) to a copy of `doc`.
pub fn apply_json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|_| PatchError::NotJsonPatch)?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &patch).map_err(|e| PatchError::Failed(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn applies_and_refuses() {
        let doc = json!({"resourceType": "Patient", "active": true});
        let out = apply_json_patch(
            &doc,
            &json!([{"op": "replace", "path": "/active", "value": false}]),
        )
        .unwrap();
        assert_eq!(out["active"], false);
        assert_eq!(
            apply_json_patch(&doc, &json!({"resourceType": "Parameters"})),
            Err(PatchError::NotJsonPatch)
        );
        assert!(matches!(
            apply_json_patch(
                &doc,
                &json!([{"op": "test", "path": "/active", "value": false}])
            ),
            Err(PatchError::Failed(_))
        ));
    }
}
