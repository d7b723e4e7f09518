//! `reference` parameters and `_compartment`: typed and bare references, the Patient
//! compartment, and `meta.account`.

use serde_json::Value;

use crate::fhir::searchparam;

/// `meta.account`: the compartment a resource was written in (the gateway stamps it on creates
/// under a policy with a `compartment`). Plain FHIR servers keep it but fill no
/// `meta.compartment`, so `_compartment` looks here too.
pub(super) fn meta_account(resource: &Value) -> Option<&str> {
    resource.pointer("/meta/account/reference")?.as_str()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RefValue {
    /// `Type/id`.
    Typed { rtype: String, id: String },
    /// A bare id.
    Id(String),
    /// Anything else (absolute URL, `urn:`, canonical): compared exactly.
    Other(String),
}

pub(super) fn strip_history(r: &str) -> &str {
    match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    }
}

impl RefValue {
    pub(super) fn parse(v: &str) -> RefValue {
        if !v.contains(['/', ':', '|']) {
            return RefValue::Id(v.to_string());
        }
        if let Some((rtype, id)) = searchparam::parse_reference(v)
            && v.len() == rtype.len() + 1 + id.len()
        {
            return RefValue::Typed {
                rtype: rtype.to_string(),
                id: id.to_string(),
            };
        }
        RefValue::Other(v.to_string())
    }

    pub(super) fn matches(&self, reference: &str) -> bool {
        let r = strip_history(reference);
        match self {
            RefValue::Typed { rtype, id } => {
                let Some(rest) = r
                    .strip_suffix(id.as_str())
                    .and_then(|s| s.strip_suffix('/'))
                else {
                    return false;
                };
                rest.strip_suffix(rtype.as_str())
                    .is_some_and(|before| before.is_empty() || before.ends_with('/'))
            }
            RefValue::Id(id) => r
                .strip_suffix(id.as_str())
                .is_some_and(|before| before.ends_with('/')),
            RefValue::Other(u) => {
                r == u
                    || reference == u
                    || (!u.contains('|')
                        && reference.split_once('|').is_some_and(|(url, _)| url == u))
            }
        }
    }

    /// The patient id this value designates for compartment membership.
    pub(super) fn patient_id(&self) -> Option<&str> {
        match self {
            RefValue::Typed { rtype, id } if rtype == "Patient" => Some(id),
            RefValue::Id(id) => Some(id),
            _ => None,
        }
    }
}

pub(super) fn in_patient_compartment(resource: &Value, rtype: &str, patient_id: &str) -> bool {
    if rtype == "Patient" && resource.get("id").and_then(Value::as_str) == Some(patient_id) {
        return true;
    }
    let Ok(paths) = searchparam::patient_compartment_paths(rtype) else {
        return false;
    };
    paths.iter().any(|p| {
        p.evaluate(resource)
            .iter()
            .filter_map(searchparam::reference_string)
            .filter_map(searchparam::parse_reference)
            .any(|(t, id)| t == "Patient" && id == patient_id)
    })
}
