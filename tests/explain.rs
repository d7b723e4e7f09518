//! `fhirgate policy explain` and `fhirgate policy check` against the shipped example policies:
//! the trace function directly, and the real binary once each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use fhirgate::explain::{ExplainInput, explain, parse_param};
use fhirgate::policies_dir::read_policy_file;
use serde_json::json;

fn policy(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(name)
}

fn input(file: &str, params: &[&str], method: &str, path: &str) -> ExplainInput {
    ExplainInput {
        policies: vec![read_policy_file(&policy(file)).unwrap().policy],
        parameters: params.iter().map(|p| parse_param(p).unwrap()).collect(),
        method: method.into(),
        path: path.into(),
        ..ExplainInput::default()
    }
}

fn decision(trace: &str) -> &str {
    trace
        .lines()
        .find(|l| l.starts_with("Decision: "))
        .unwrap_or_else(|| panic!("no decision in:\n{trace}"))
}

#[test]
fn patient_compartment_search_is_allowed_and_narrowed_to_the_patient() {
    let t = explain(&input(
        "patient-compartment.json",
        &["patient=Patient/p1"],
        "GET",
        "Observation",
    ))
    .unwrap();
    assert_eq!(decision(&t), "Decision: ALLOW", "{t}");
    assert!(
        t.contains("narrowing: the gateway appends subject=Patient/p1 to the upstream query"),
        "{t}"
    );
    assert!(
        t.contains("criteria        Observation?subject=Patient/p1"),
        "{t}"
    );
    assert!(t.contains("criteria        Patient?_id=p1"), "{t}");
    assert!(t.contains("classified: search of Observation"), "{t}");
    assert!(t.contains("needs: (Observation, search)"), "{t}");
    assert!(
        t.contains("(Observation, search): granted by resource[1]"),
        "{t}"
    );
    assert!(t.contains("response: buffered and filtered"), "{t}");
    assert!(
        t.contains("AccessPolicy/patient-compartment with patient=Patient/p1 (reference)"),
        "{t}"
    );
}

#[test]
fn patient_compartment_create_of_an_observation_is_denied_as_readonly() {
    let t = explain(&input(
        "patient-compartment.json",
        &["patient=Patient/p1"],
        "POST",
        "Observation",
    ))
    .unwrap();
    assert_eq!(decision(&t), "Decision: DENY 403 (type_interaction)", "{t}");
    assert!(
        t.contains("(Observation, create): not granted: resource[1] (Observation) grants only read, vread, history, search (readonly)"),
        "{t}"
    );
}

#[test]
fn patient_compartment_readonly_fields_are_reported_on_update() {
    let t = explain(&input(
        "patient-compartment.json",
        &["patient=Patient/p1"],
        "PUT",
        "Patient/p1",
    ))
    .unwrap();
    assert_eq!(decision(&t), "Decision: ALLOW", "{t}");
    assert!(
        t.contains("readonlyFields  identifier, managingOrganization"),
        "{t}"
    );
    assert!(t.contains("write check: the current version"), "{t}");
}

#[test]
fn lab_analyzer_posts_from_the_lab_subnet_only() {
    let mut i = input("lab-analyzer.json", &[], "POST", "Observation");
    i.ip = Some("10.20.1.5".parse().unwrap());
    let t = explain(&i).unwrap();
    assert_eq!(decision(&t), "Decision: ALLOW", "{t}");
    assert!(
        t.contains("10.20.1.5: allowed by ipAccessRule[0] \"lab subnet\": 10.20.0.0/16 → allow"),
        "{t}"
    );
    assert!(
        t.contains("(Observation, create): granted by resource[0]"),
        "{t}"
    );

    i.ip = Some("8.8.8.8".parse().unwrap());
    let t = explain(&i).unwrap();
    assert_eq!(decision(&t), "Decision: DENY 403 (ip_blocked)", "{t}");
    assert!(
        t.contains("8.8.8.8: BLOCKED by ipAccessRule[2] \"everything else\": * → block"),
        "{t}"
    );
}

#[test]
fn lab_analyzer_body_must_match_the_criteria() {
    let mut i = input("lab-analyzer.json", &[], "POST", "Observation");
    i.ip = Some("10.20.1.5".parse().unwrap());
    i.body = Some(
        br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}]}"#
            .to_vec(),
    );
    let t = explain(&i).unwrap();
    assert_eq!(
        decision(&t),
        "Decision: DENY 403 (create_outside_criteria)",
        "{t}"
    );
}

#[test]
fn the_binary_prints_the_trace() {
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["policy", "explain", "--policy"])
        .arg(policy("patient-compartment.json"))
        .args([
            "--param",
            "patient=Patient/p1",
            "GET",
            "Observation?code=1234-5",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Decision: ALLOW"), "{text}");
    assert!(text.contains("subject=Patient/p1"), "{text}");

    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["policy", "explain", "--policy"])
        .arg(policy("lab-analyzer.json"))
        .args(["--ip", "8.8.8.8", "POST", "Observation"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Decision: DENY 403 (ip_blocked)"), "{text}");
}

#[test]
fn policy_check_passes_the_examples_and_fails_a_broken_file() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["policy", "check"])
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(": ok")).count(),
        files.len(),
        "{text}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.json");
    std::fs::write(
        &broken,
        r#"{"resourceType": "AccessPolicy", "resource": [{"resourceType": "Observation", "interaction": ["fly"]}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["policy", "check"])
        .args(&files)
        .arg(&broken)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("broken.json: resource[0]: unknown interaction `fly`"),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = format!("1 of {} policy files are invalid", files.len() + 1);
    assert!(stderr.contains(&summary), "{stderr}");

    let not_json = tmp.path().join("half.json");
    std::fs::write(&not_json, r#"{"resourceType": "AccessPolicy", "#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["policy", "check"])
        .arg(&not_json)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("half.json: invalid JSON"));
}

#[test]
fn the_binary_explains_a_stored_membership() {
    // A store as `fhirgate serve` leaves it: a project, a policy, a membership with parameters.
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", tmp.path().join("fhirgate.db").display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = fhirgate::store::Store::open(&url).await.unwrap();
        let policy = read_policy_file(&policy("patient-compartment.json")).unwrap().policy;
        for (content, project) in [
            (json!({"resourceType": "Project", "id": "clinic", "name": "Clinic"}), "clinic"),
            (serde_json::to_value(&policy).unwrap(), "clinic"),
            (
                json!({"resourceType": "ProjectMembership", "id": "m-pat",
                       "project": {"reference": "Project/clinic"},
                       "user": {"reference": "User/u1"},
                       "profile": {"reference": "Patient/p1"},
                       "access": [{"policy": {"reference": "AccessPolicy/patient-compartment"},
                                   "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/p1"}}]}]}),
                "clinic",
            ),
        ] {
            store.put(content, Some(project), &[], None, false).await.unwrap();
        }
    });
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
            .args(["policy", "explain", "--store", &url])
            .args(args)
            .env_remove("FHIRGATE_STORE")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, text, err) = run(&["--membership", "m-pat", "GET", "Observation?code=1234-5"]);
    assert!(ok, "{text}\n{err}");
    assert!(
        text.contains("Membership ProjectMembership/m-pat (from the store, project clinic)"),
        "{text}"
    );
    assert!(text.contains("profile   Patient/p1"), "{text}");
    assert!(text.contains("Decision: ALLOW"), "{text}");
    assert!(text.contains("subject=Patient/p1"), "{text}");
    let (ok, text, _) = run(&["--membership", "m-pat", "GET", "Practitioner"]);
    assert!(ok, "{text}");
    assert!(text.contains("Decision: DENY 403"), "{text}");
    // An unknown membership is a one-line error, not a trace.
    let (ok, text, err) = run(&["--membership", "nobody", "GET", "Patient"]);
    assert!(!ok && text.is_empty(), "{text}");
    assert!(
        err.contains("ProjectMembership/nobody is not in the store"),
        "{err}"
    );
}

/// The shipped roles (`policies/role-*.json`, README "Roles"): what each lets a member of one
/// organization do, decided by the gateway's own steps.
#[test]
fn the_shipped_roles_grant_what_their_names_say() {
    let org = "organization=Organization/org1";
    let vital = r#"{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"text":"pulse"}}"#;
    let lab = r#"{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],"code":{"text":"glucose"}}"#;
    let patient_of = |org: &str| {
        format!(
            r#"{{"resourceType":"Patient","managingOrganization":{{"reference":"Organization/{org}"}}}}"#
        )
    };
    let cases: Vec<(&str, &str, &str, Option<String>, &str)> = vec![
        // A physician: the organization's patients, clinical data read and written.
        ("role-physician.json", "GET", "Patient?name=smith", None, "Decision: ALLOW"),
        ("role-physician.json", "POST", "Patient", Some(patient_of("org1")), "Decision: ALLOW"),
        ("role-physician.json", "POST", "Patient", Some(patient_of("org2")), "Decision: DENY 403"),
        ("role-physician.json", "POST", "MedicationRequest", Some(r#"{"resourceType":"MedicationRequest","status":"active","intent":"order","subject":{"reference":"Patient/p1"}}"#.into()), "Decision: ALLOW"),
        ("role-physician.json", "POST", "Practitioner", Some(r#"{"resourceType":"Practitioner"}"#.into()), "Decision: DENY 403"),
        ("role-physician.json", "GET", "Organization/org1", None, "Decision: ALLOW"),
        ("role-physician.json", "GET", "AuditEvent", None, "Decision: DENY 403"),
        // A nurse: reads the chart, records vital signs and administrations, orders nothing.
        ("role-nurse.json", "GET", "Observation?subject=Patient/p1", None, "Decision: ALLOW"),
        ("role-nurse.json", "POST", "Observation", Some(vital.into()), "Decision: ALLOW"),
        ("role-nurse.json", "POST", "Observation", Some(lab.into()), "Decision: DENY 403"),
        ("role-nurse.json", "POST", "MedicationAdministration", Some(r#"{"resourceType":"MedicationAdministration","status":"completed","subject":{"reference":"Patient/p1"}}"#.into()), "Decision: ALLOW"),
        ("role-nurse.json", "POST", "MedicationRequest", Some(r#"{"resourceType":"MedicationRequest","status":"active","intent":"order","subject":{"reference":"Patient/p1"}}"#.into()), "Decision: DENY 403"),
        ("role-nurse.json", "POST", "Patient", Some(patient_of("org1")), "Decision: DENY 403"),
        ("role-nurse.json", "DELETE", "Observation/o1", None, "Decision: DENY 403"),
        // The front desk: registration and scheduling, no clinical data at all.
        ("role-front-desk.json", "POST", "Patient", Some(patient_of("org1")), "Decision: ALLOW"),
        ("role-front-desk.json", "POST", "Appointment", Some(r#"{"resourceType":"Appointment","status":"booked","participant":[{"status":"accepted"}]}"#.into()), "Decision: ALLOW"),
        ("role-front-desk.json", "GET", "Slot?schedule=Schedule/s1", None, "Decision: ALLOW"),
        ("role-front-desk.json", "POST", "Slot", Some(r#"{"resourceType":"Slot","status":"free"}"#.into()), "Decision: DENY 403"),
        ("role-front-desk.json", "GET", "Observation?subject=Patient/p1", None, "Decision: DENY 403"),
        ("role-front-desk.json", "GET", "Condition/c1", None, "Decision: DENY 403"),
    ];
    for (file, method, path, body, want) in cases {
        let mut given = input(file, &[org], method, path);
        given.body = body.map(String::into_bytes);
        let t = explain(&given).unwrap();
        assert!(
            decision(&t).starts_with(want),
            "{file} {method} {path}: want {want}\n{t}"
        );
    }
}
