//! SMART launch context (App Launch 2.2 §2.0.6): the patient, encounter and `fhirContext` a
//! Login's tokens carry. An EHR launch names a SmartAppLaunch (created by `$smart-launch` or
//! by an EHR through the FHIR API); a standalone launch asking for `launch/patient` gets the
//! patient picked on the sign-in page; a Patient signing in is always its own context. The
//! context is fixed when the code is redeemed and stored on the Login, so every token of the
//! Login (and the gateway, which limits `patient/` scopes to it) sees the same one.

use crate::state::State;
use crate::store::LoginRecord;
use serde_json::{Value, json};

use crate::control::login::state::LoginFlow;
use crate::control::login::state::keys;
use crate::control::web::error::ApiError;
use fhirgate_core::policy::scope::has_word;

/// What a Login's tokens say about their context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchContext {
    /// Patient id (not a reference), as SMART's `patient` parameter.
    pub patient: Option<String>,
    /// Encounter id.
    pub encounter: Option<String>,
    /// SMART 2.2 `fhirContext`: `[{reference}]`.
    pub fhir_context: Vec<Value>,
}

impl LaunchContext {
    /// The context stored on a Login (see [`keys::CONTEXT`]).
    pub fn of(login: &LoginRecord) -> LaunchContext {
        let stored = login.extra.get(keys::CONTEXT);
        let text = |k: &str| {
            stored
                .and_then(|c| c.get(k))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        LaunchContext {
            patient: text("patient"),
            encounter: text("encounter"),
            fhir_context: stored
                .and_then(|c| c.get("fhirContext"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// The stored form.
    pub fn to_value(&self) -> Value {
        let mut v = json!({});
        if let Some(p) = &self.patient {
            v["patient"] = json!(p);
        }
        if let Some(e) = &self.encounter {
            v["encounter"] = json!(e);
        }
        if !self.fhir_context.is_empty() {
            v["fhirContext"] = Value::Array(self.fhir_context.clone());
        }
        v
    }
}

/// The id of a `Type/id` reference of the expected type.
fn reference_id(v: Option<&Value>, ty: &str) -> Option<String> {
    v?.get("reference")?
        .as_str()?
        .strip_prefix(ty)?
        .strip_prefix('/')
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

/// The context of a Login about to be redeemed: its SmartAppLaunch (which must belong to the
/// Login's project), else what the sign-in page chose; a Patient profile is always its own
/// patient. An EHR launch that no longer exists, or another project's, is refused.
pub(crate) async fn resolve_context(
    state: &State,
    login: &LoginRecord,
    profile: &str,
) -> Result<LaunchContext, ApiError> {
    let mut context = match LoginFlow::of(login).ask.launch.as_deref() {
        Some(launch_id) => {
            let launch = state
                .store
                .read("SmartAppLaunch", launch_id)
                .await?
                .filter(|l| l.project_id.is_some() && l.project_id == login.project_id)
                .ok_or_else(|| ApiError::oauth_code("invalid_grant", "Invalid launch"))?;
            LaunchContext {
                patient: reference_id(launch.content.get("patient"), "Patient"),
                encounter: reference_id(launch.content.get("encounter"), "Encounter"),
                fhir_context: launch
                    .content
                    .get("fhirContext")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            }
        }
        None => LaunchContext::of(login),
    };
    if let Some(own) = profile.strip_prefix("Patient/") {
        context.patient = Some(own.to_string());
    }
    // A launch (EHR, or standalone asking for a patient) with `patient/` scopes but no patient
    // would leave those scopes without the patient they are about: refused, never widened.
    let launched =
        LoginFlow::of(login).ask.launch.is_some() || has_word(&login.scope, "launch/patient");
    let patient_scopes = login
        .scope
        .split_ascii_whitespace()
        .any(|w| w.starts_with("patient/"));
    if launched && patient_scopes && context.patient.is_none() {
        return Err(ApiError::oauth_code(
            "invalid_grant",
            "No patient in the launch context",
        ));
    }
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_context_round_trips() {
        let c = LaunchContext {
            patient: Some("p1".into()),
            encounter: Some("e1".into()),
            fhir_context: vec![json!({"reference": "DiagnosticReport/d1"})],
        };
        let login = LoginRecord {
            extra: json!({ keys::CONTEXT: c.to_value() }),
            ..Default::default()
        };
        assert_eq!(LaunchContext::of(&login), c);
        assert_eq!(
            LaunchContext::of(&LoginRecord::default()),
            LaunchContext::default()
        );
    }

    #[test]
    fn references_name_their_type() {
        let r = |s: &str| json!({"reference": s});
        assert_eq!(
            reference_id(Some(&r("Patient/p1")), "Patient").as_deref(),
            Some("p1")
        );
        assert_eq!(reference_id(Some(&r("Encounter/p1")), "Patient"), None);
        assert_eq!(reference_id(Some(&r("Patient/")), "Patient"), None);
        assert_eq!(reference_id(Some(&r("PatientX/p1")), "Patient"), None);
        assert_eq!(reference_id(None, "Patient"), None);
    }
}
