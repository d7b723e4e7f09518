//! `_elements` and `_summary`: the client asks for part of each resource. An upstream that trims
//! resources before the gateway sees them would have criteria (`:missing`, `:not`, a compartment
//! reference) and the project marker checked on what is left, so wherever returned resources are
//! checked the gateway asks for whole resources and trims them itself, after the checks.
//! Pure.

use serde_json::{Map, Value};

use crate::fhir::request::QueryParam;

/// The parameters that ask for a subset.
pub const SUBSET_PARAMS: [&str; 2] = ["_elements", "_summary"];

/// The tag of a resource that is not whole (R4 §3.1.1.5.7).
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub const SUBSETTED_CODE: &str = "SUBSETTED";

/// A requested subset the gateway can apply to a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subset {
    /// `_elements=a,b`: those top-level elements (choice elements by their stem: `value` keeps
    /// `valueQuantity`), with `resourceType`, `id` and `meta`.
    Elements(Vec<String>),
    /// `_summary=data`: everything but the narrative.
    Data,
    /// `_summary=text`: the narrative, `id` and `meta`.
    Text,
    /// `_summary=true`: the summary elements. The gateway does not hold the element
    /// definitions that mark them, so it returns whole resources (FHIR allows more than asked).
    Summary,
}

/// The subset the parameters ask for, if any. `_summary=count` and `_summary=false` are not
/// subsets of resources (the first asks for none). An unknown `_summary` value is an error.
pub fn requested(params: &[QueryParam]) -> Result<Option<Subset>, String> {
    let mut subset = None;
    for p in params {
        let name = p.name.split(':').next().unwrap_or("");
        match name {
            "_summary" => {
                let s = match p.value.as_str() {
                    "true" => Some(Subset::Summary),
                    "text" => Some(Subset::Text),
                    "data" => Some(Subset::Data),
                    "count" | "false" => None,
                    other => return Err(format!("Unknown _summary value: {other}")),
                };
                if s.is_some() {
                    subset = s;
                }
            }
            "_elements" => {
                let elements: Vec<String> = p
                    .value
                    .split(',')
                    .map(|e| e.trim())
                    // R4 names base elements only; a path's first step is its element.
                    .map(|e| e.split('.').next().unwrap_or("").to_string())
                    .filter(|e| !e.is_empty())
                    .collect();
                if !elements.is_empty() {
                    subset = Some(Subset::Elements(elements));
                }
            }
            _ => {}
        }
    }
    Ok(subset)
}

/// Whether `key` is the element `wanted`, or a choice form of `wanted[x]` (`value` keeps
/// `valueQuantity`, `status` does not keep `statusReason`).
fn element_is(key: &str, wanted: &str) -> bool {
    key == wanted
        || key
            .strip_prefix(wanted)
            .is_some_and(|rest| crate::fhir::types::CHOICE_TYPES.contains(&rest))
}

fn tag_subsetted(resource: &mut Map<String, Value>) {
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta
        .entry("tag")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(tags) = tags.as_array_mut()
        && !tags.iter().any(|t| {
            t.get("system").and_then(Value::as_str) == Some(SUBSETTED_SYSTEM)
                && t.get("code").and_then(Value::as_str) == Some(SUBSETTED_CODE)
        })
    {
        tags.push(serde_json::json!({"system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE}));
    }
}

impl Subset {
    /// Trims one resource. OperationOutcomes and Bundles stay whole.
    pub fn apply(&self, resource: &mut Value) {
        let Some(obj) = resource.as_object_mut() else {
            return;
        };
        if matches!(
            obj.get("resourceType").and_then(Value::as_str),
            Some("OperationOutcome" | "Bundle") | None
        ) {
            return;
        }
        let keep = |key: &str| -> bool {
            match self {
                Subset::Summary => true,
                Subset::Data => key != "text",
                Subset::Text => matches!(key, "resourceType" | "id" | "meta" | "text"),
                Subset::Elements(wanted) => {
                    matches!(key, "resourceType" | "id" | "meta")
                        || wanted.iter().any(|w| element_is(key, w))
                }
            }
        };
        if matches!(self, Subset::Summary) {
            return;
        }
        obj.retain(|k, _| keep(k));
        tag_subsetted(obj);
    }

    /// Trims the primary results of a response: a single resource, or the entries of a
    /// searchset or history Bundle (`_include`d resources, `search.mode = include`, stay whole,
    /// as FHIR applies `_elements` to matches).
    pub fn apply_to_response(&self, value: &mut Value) {
        if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            self.apply(value);
            return;
        }
        for entry in value
            .get_mut("entry")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let included = entry
                .pointer("/search/mode")
                .and_then(Value::as_str)
                .is_some_and(|m| m != "match");
            if included {
                continue;
            }
            if let Some(resource) = entry.get_mut("resource") {
                self.apply(resource);
            }
        }
    }
}

/// A query string (or form body) without `_elements` and without `_summary` values that subset
/// resources (`_summary=count`/`false` stay). Other pairs keep their order and are re-encoded.
pub fn strip_query(query: &str) -> String {
    super::search::retain_pairs(query, |name, value| {
        let base = name.split(':').next().unwrap_or("");
        !(base == "_elements" || (base == "_summary" && value != "count" && value != "false"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qp(name: &str, value: &str) -> QueryParam {
        QueryParam {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn what_each_parameter_asks_for() {
        assert_eq!(requested(&[qp("name", "x")]), Ok(None));
        assert_eq!(requested(&[qp("_summary", "count")]), Ok(None));
        assert_eq!(requested(&[qp("_summary", "false")]), Ok(None));
        assert_eq!(requested(&[qp("_summary", "data")]), Ok(Some(Subset::Data)));
        assert_eq!(requested(&[qp("_summary", "text")]), Ok(Some(Subset::Text)));
        assert_eq!(
            requested(&[qp("_summary", "true")]),
            Ok(Some(Subset::Summary))
        );
        assert!(requested(&[qp("_summary", "maybe")]).is_err());
        assert_eq!(
            requested(&[qp("_elements", "name, birthDate,identifier.value")]),
            Ok(Some(Subset::Elements(vec![
                "name".into(),
                "birthDate".into(),
                "identifier".into()
            ])))
        );
        assert_eq!(requested(&[qp("_elements", ",")]), Ok(None));
    }

    #[test]
    fn elements_keep_what_was_asked_and_say_so() {
        let mut obs = json!({
            "resourceType": "Observation", "id": "o", "meta": {"versionId": "1"},
            "status": "final", "subject": {"reference": "Patient/p"},
            "valueQuantity": {"value": 1}, "text": {"div": "<div/>"}
        });
        Subset::Elements(vec!["value".into(), "status".into()]).apply(&mut obs);
        assert_eq!(
            obs,
            json!({
                "resourceType": "Observation", "id": "o",
                "meta": {"versionId": "1", "tag": [{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]},
                "status": "final", "valueQuantity": {"value": 1}
            })
        );
        // `val` is not the stem of `valueQuantity`; `statusReason` is not `status` either.
        let mut obs =
            json!({"resourceType": "Observation", "valueQuantity": {}, "statusReason": {}});
        Subset::Elements(vec!["val".into(), "status".into()]).apply(&mut obs);
        assert!(obs.get("valueQuantity").is_none());
        assert!(obs.get("statusReason").is_none());
    }

    #[test]
    fn summaries_and_bundles() {
        let patient = json!({"resourceType": "Patient", "id": "p", "text": {"div": "x"}, "name": [{"family": "F"}]});
        let mut data = patient.clone();
        Subset::Data.apply(&mut data);
        assert!(data.get("text").is_none() && data.get("name").is_some());
        let mut text = patient.clone();
        Subset::Text.apply(&mut text);
        assert!(text.get("text").is_some() && text.get("name").is_none());
        let mut whole = patient.clone();
        Subset::Summary.apply(&mut whole);
        assert_eq!(whole, patient);

        let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": patient.clone(), "search": {"mode": "match"}},
            {"resource": {"resourceType": "Organization", "name": "O"}, "search": {"mode": "include"}},
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}}
        ]});
        Subset::Elements(vec!["id".into()]).apply_to_response(&mut bundle);
        assert!(bundle.pointer("/entry/0/resource/name").is_none());
        assert_eq!(bundle.pointer("/entry/1/resource/name"), Some(&json!("O")));
        assert!(bundle.pointer("/entry/2/resource/meta").is_none());
    }

    #[test]
    fn stripping_keeps_the_rest_of_the_query() {
        assert_eq!(
            strip_query("name=a%20b&_elements=name&_summary=true&_count=2&_summary=count"),
            "name=a+b&_count=2&_summary=count"
        );
        assert_eq!(strip_query("_elements=x"), "");
    }
}
