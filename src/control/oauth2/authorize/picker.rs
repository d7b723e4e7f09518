//! The patient picker of a standalone SMART launch (App Launch 2.2 `context-standalone-patient`):
//! an app that asks for `launch/patient` without an EHR launch gets the patient the signed-in
//! person picks here, among the Patients their own AccessPolicy lets them read (a Patient signing
//! in is its own context and never sees this page). The choice is checked again when it comes
//! back, and kept on the Login; the code exchange then puts it in the token response, and the
//! gateway limits `patient/` scopes to it.

use axum::http::StatusCode;
use axum::response::Response;
use fhirgate_core::fhir::request::Interaction;
use serde::Serialize;
use serde_json::Value;

use crate::control::base::upstream::ProjectUpstream;
use crate::control::base::upstream::upstream_read;
use crate::control::base::upstream::upstream_search;
use crate::control::login::launch::LaunchContext;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::keys;
use crate::control::login::state::save_pending;
use crate::control::login::state::set_extra;
use crate::control::oauth2::authorize::request::client_name;
use crate::control::oauth2::authorize::request::login_client;
use crate::control::web::ControlState;
use crate::control::web::error::ApiError;
use crate::control::web::pages;
use crate::control::web::pages::Choice;
use crate::control::web::pages::Frame;
use crate::control::web::pages::Hidden;
use crate::store::LoginRecord;
use fhirgate_core::fhir::path::is_valid_id;
use fhirgate_core::policy::EffectivePolicy;
use fhirgate_core::policy::scope::has_word;
use std::sync::Arc;

/// How many patients the page lists at once.
const PAGE_SIZE: usize = 20;

/// Does this Login still need a patient picked? Only for `launch/patient` without an EHR
/// launch, when the profile is not a Patient and nothing was picked yet.
pub(super) async fn needs_patient(
    state: &ControlState,
    login: &LoginRecord,
) -> Result<bool, ApiError> {
    if !has_word(&login.scope, "launch/patient")
        || LoginFlow::of(login).ask.launch.is_some()
        || LaunchContext::of(login).patient.is_some()
    {
        return Ok(false);
    }
    let Some(membership_id) = login.membership_id.as_deref() else {
        return Ok(false);
    };
    let membership = state.identities.membership(membership_id).await?;
    let is_patient = membership
        .as_ref()
        .and_then(|m| m.profile_ref())
        .is_some_and(|r| r.starts_with("Patient/"));
    Ok(!is_patient)
}

/// The signed-in person's own policy (their membership, the Login's scope), which decides the
/// patients they may pick.
async fn pickers_policy(
    state: &ControlState,
    login: &LoginRecord,
) -> Result<(Arc<EffectivePolicy>, ProjectUpstream), ApiError> {
    let membership_id = login
        .membership_id
        .as_deref()
        .ok_or_else(ApiError::forbidden)?;
    let project_id = login
        .project_id
        .as_deref()
        .ok_or_else(ApiError::forbidden)?;
    let snap = state.snapshot();
    let policy = state
        .effective_policy(&snap, membership_id, Some(&login.scope))
        .await?
        .ok_or_else(ApiError::forbidden)?;
    Ok((policy, ProjectUpstream::of(state, project_id)?))
}

/// `Family, Given · 1980-01-01` of a Patient.
fn describe(patient: &Value) -> (String, String) {
    let name = patient
        .get("name")
        .and_then(Value::as_array)
        .and_then(|n| n.first());
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let family = text(name.and_then(|n| n.get("family")));
    let given = name
        .and_then(|n| n.get("given"))
        .and_then(Value::as_array)
        .map(|g| {
            g.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let label = match (family.is_empty(), given.is_empty()) {
        (false, false) => format!("{family}, {given}"),
        (false, true) => family,
        (true, false) => given,
        (true, true) => "(no name)".to_string(),
    };
    let id = text(patient.get("id"));
    let detail = match patient.get("birthDate").and_then(Value::as_str) {
        Some(born) => format!("Patient/{id} · {born}"),
        None => format!("Patient/{id}"),
    };
    (label, detail)
}

/// The picker page: Patients matching `query` (by name) that the person may read.
pub(super) async fn patient_page(
    state: &ControlState,
    login: &LoginRecord,
    csrf: &str,
    query: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let (policy, upstream) = pickers_policy(state, login).await?;
    let params: Vec<(&str, &str)> = if query.trim().is_empty() {
        Vec::new()
    } else {
        vec![("name", query.trim())]
    };
    let found = upstream_search(state, &upstream, "Patient", &params, PAGE_SIZE).await?;
    #[derive(Serialize)]
    struct Picker {
        query: String,
        patients: Vec<Choice>,
    }
    let patients = found
        .iter()
        .filter_map(|p| {
            // What the person may read of it: hidden fields stay hidden here too.
            let entry = policy.satisfied(p, Interaction::Read)?;
            let mut p = p.clone();
            policy.redact(&mut p, entry);
            let id = p.get("id")?.as_str().filter(|id| is_valid_id(id))?;
            let (label, detail) = describe(&p);
            Some(Choice {
                id: id.to_string(),
                label,
                detail,
            })
        })
        .collect();
    let client = login_client(state, login).await;
    let frame = Frame {
        title: "Choose a patient",
        client_name: client.as_ref().and_then(client_name),
        error,
        action: "authorize",
        hidden: vec![
            Hidden::new("step", "patient"),
            Hidden::new("login", login.id.clone()),
            Hidden::new("csrf", csrf),
        ],
    };
    let html = pages::render(
        "patient.html",
        &frame,
        &Picker {
            query: query.to_string(),
            patients,
        },
    )?;
    let redirect_uri = LoginFlow::of(login).ask.redirect_uri;
    let csp = pages::content_security_policy(redirect_uri.as_deref());
    Ok(pages::html_response(status, html, &csp, &[]))
}

/// What the picker form asked for.
pub(super) enum Picked {
    /// Search again with this text.
    Search(String),
    /// The Login, with the patient it now carries.
    Chosen(Box<LoginRecord>),
    /// The choice was refused; the page again with this message.
    Refused(&'static str),
}

/// `step=patient`: a search, or a choice, checked again (the person must still be allowed to
/// read that Patient) before it is kept.
pub(super) async fn pick_patient(
    state: &ControlState,
    login: &LoginRecord,
    decision: Option<&str>,
    query: Option<&str>,
    chosen: Option<&str>,
) -> Result<Picked, ApiError> {
    if decision == Some("search") {
        return Ok(Picked::Search(query.unwrap_or_default().to_string()));
    }
    let Some(id) = chosen.filter(|id| is_valid_id(id)) else {
        return Ok(Picked::Refused("Choose a patient."));
    };
    let (policy, upstream) = pickers_policy(state, login).await?;
    let readable = upstream_read(state, &upstream, "Patient", id)
        .await?
        .is_some_and(|p| policy.satisfied(&p, Interaction::Read).is_some());
    if !readable {
        return Ok(Picked::Refused("That patient cannot be chosen."));
    }
    let mut updated = login.clone();
    let context = LaunchContext {
        patient: Some(id.to_string()),
        ..LaunchContext::of(login)
    };
    set_extra(&mut updated, keys::CONTEXT, context.to_value());
    save_pending(state, &updated).await?;
    Ok(Picked::Chosen(Box::new(updated)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patients_are_described_by_name_id_and_birth_date() {
        let p = json!({"resourceType": "Patient", "id": "p1", "birthDate": "1980-02-03",
                       "name": [{"family": "Lopez", "given": ["Ana", "Maria"]}]});
        assert_eq!(
            describe(&p),
            ("Lopez, Ana Maria".into(), "Patient/p1 · 1980-02-03".into())
        );
        let bare = json!({"resourceType": "Patient", "id": "p2"});
        assert_eq!(describe(&bare), ("(no name)".into(), "Patient/p2".into()));
    }
}
