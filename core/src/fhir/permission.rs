//! The answer of a permission check (`X-Fhirgate-Check: permission`, `$check-permission`): a FHIR
//! `Parameters` with `allowed`, the `status` the request would get, a `reason` (the decision's
//! label) and, for a refusal, its `text`; for a batch or transaction one `entry` per entry. The
//! gateway and the control API both answer with it.

use serde_json::{Value, json};

use super::outcome::Outcome;
use crate::policy::decide::Deny;

/// The one value of `X-Fhirgate-Check`.
pub const PERMISSION: &str = "permission";

/// A verdict about one request (or one entry of a Bundle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub status: u16,
    pub reason: String,
    pub text: Option<String>,
    pub entries: Vec<Verdict>,
}

impl Verdict {
    /// The request would be served; `entries`: a Bundle's entries, `None` for each one sent.
    pub fn allowed(entries: &[Option<Deny>]) -> Verdict {
        Verdict {
            allowed: true,
            status: 200,
            reason: "allow".into(),
            text: None,
            entries: entries.iter().map(Verdict::of_entry).collect(),
        }
    }

    /// The request would be refused with `outcome`, for the reason `label`.
    pub fn denied(outcome: &Outcome, label: &str) -> Verdict {
        Verdict {
            allowed: false,
            status: outcome.status(),
            reason: label.into(),
            text: Some(outcome.text().to_string()),
            entries: Vec::new(),
        }
    }

    /// The gateway lets the request through and the server answers `status` (a checked read of
    /// an instance that is not there: the server's 404).
    pub fn passed_on(status: u16) -> Verdict {
        Verdict {
            allowed: true,
            status,
            reason: "upstream_status".into(),
            text: None,
            entries: Vec::new(),
        }
    }

    /// The request would be refused with `status` (the control API's refusals).
    pub fn refused_with(status: u16, reason: &str, text: Option<String>) -> Verdict {
        Verdict {
            allowed: false,
            status,
            reason: reason.into(),
            text,
            entries: Vec::new(),
        }
    }

    fn of_entry(entry: &Option<Deny>) -> Verdict {
        match entry {
            None => Verdict::allowed(&[]),
            Some(Deny::Forbidden(label)) => Verdict::denied(&Outcome::Forbidden, label),
            Some(Deny::BadRequest(label, text)) => {
                Verdict::denied(&Outcome::BadRequest(text.clone()), label)
            }
        }
    }

    fn parts(&self) -> Vec<Value> {
        let mut parts = vec![
            json!({"name": "allowed", "valueBoolean": self.allowed}),
            json!({"name": "status", "valueInteger": self.status}),
            json!({"name": "reason", "valueCode": self.reason}),
        ];
        if let Some(text) = &self.text {
            parts.push(json!({"name": "text", "valueString": text}));
        }
        for entry in &self.entries {
            parts.push(json!({"name": "entry", "part": entry.parts()}));
        }
        parts
    }

    pub fn to_json(&self) -> Value {
        json!({"resourceType": "Parameters", "parameter": self.parts()})
    }

    /// The verdict as response headers too, for a `HEAD` (whose answer has no body).
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            ("x-fhirgate-allowed", self.allowed.to_string()),
            ("x-fhirgate-status", self.status.to_string()),
            ("x-fhirgate-reason", self.reason.clone()),
        ]
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }
}

/// A refusal of the checked request is the check's answer; these statuses are errors of the
/// check itself (no valid credentials, rate limits, the store or the upstream unreachable).
pub fn is_verdict(status: u16) -> bool {
    !(status == 401 || status == 429 || status >= 500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_is_a_parameters_resource() {
        let v = Verdict::denied(&Outcome::Forbidden, "type_interaction").to_json();
        assert_eq!(v["resourceType"], "Parameters");
        assert_eq!(
            v["parameter"][0],
            json!({"name": "allowed", "valueBoolean": false})
        );
        assert_eq!(
            v["parameter"][1],
            json!({"name": "status", "valueInteger": 403})
        );
        assert_eq!(
            v["parameter"][2],
            json!({"name": "reason", "valueCode": "type_interaction"})
        );
        assert_eq!(
            v["parameter"][3],
            json!({"name": "text", "valueString": "Forbidden"})
        );
        let v = Verdict::allowed(&[None, Some(Deny::Forbidden("x"))]).to_json();
        assert_eq!(v["parameter"][0]["valueBoolean"], true);
        assert_eq!(v["parameter"][3]["name"], "entry");
        assert_eq!(v["parameter"][3]["part"][0]["valueBoolean"], true);
        assert_eq!(v["parameter"][4]["part"][0]["valueBoolean"], false);
        assert_eq!(v["parameter"][4]["part"][1]["valueInteger"], 403);
        assert_eq!(v["parameter"][4]["part"][2]["valueCode"], "x");
    }

    #[test]
    fn errors_of_the_check_are_not_verdicts() {
        for status in [400, 403, 404, 405, 409, 412, 422] {
            assert!(is_verdict(status), "{status}");
        }
        for status in [401, 429, 500, 502, 503, 504] {
            assert!(!is_verdict(status), "{status}");
        }
    }
}
