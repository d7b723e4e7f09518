use super::*;
use serde_json::json;

fn input(policy: Value, method: &str, path: &str) -> ExplainInput {
    ExplainInput {
        policies: vec![policy_from_value(policy).unwrap()],
        method: method.into(),
        path: path.into(),
        ..ExplainInput::default()
    }
}

#[test]
fn params_are_references_when_they_look_like_one() {
    let p = parse_param("patient=Patient/p1").unwrap();
    assert_eq!(
        p.value_reference.unwrap().reference.as_deref(),
        Some("Patient/p1")
    );
    let p = parse_param("org=Acme/Inc").unwrap();
    assert_eq!(p.value_string.as_deref(), Some("Acme/Inc"));
    let p = parse_param("x=a=b").unwrap();
    assert_eq!(p.value_string.as_deref(), Some("a=b"));
    assert!(parse_param("novalue").is_err());
    assert!(parse_param("=v").is_err());
}

#[test]
fn a_search_is_narrowed_and_a_hidden_field_reported() {
    let policy = json!({"resourceType": "AccessPolicy", "id": "a", "resource": [
        {"resourceType": "Patient", "criteria": "Patient?name=%who", "hiddenFields": ["telecom"]}
    ]});
    let mut i = input(policy, "get", "/fhir/R4/Patient?_count=5");
    i.parameters = vec![parse_param("who=Smith").unwrap()];
    let t = explain(&i).unwrap();
    assert!(t.contains("Decision: ALLOW"), "{t}");
    assert!(
        t.contains("(Patient, search): granted by resource[0]"),
        "{t}"
    );
    assert!(t.contains("criteria        Patient?name=Smith"), "{t}");
    assert!(
        t.contains("hiddenFields removed (per matching entry): telecom"),
        "{t}"
    );
}

#[test]
fn a_missing_type_names_no_entry() {
    let t = explain(&input(
            json!({"resourceType": "AccessPolicy", "id": "a", "resource": [{"resourceType": "Patient"}]}),
            "GET",
            "Observation/1",
        ))
        .unwrap();
    assert!(t.contains("Decision: DENY 403 (type_interaction)"), "{t}");
    assert!(
        t.contains("(Observation, read): not granted: no entry for Observation"),
        "{t}"
    );
}

#[test]
fn unclassifiable_requests_are_denied() {
    let t = explain(&input(
        json!({"resourceType": "AccessPolicy", "id": "a", "resource": [{"resourceType": "*"}]}),
        "GET",
        "Patient/../x",
    ))
    .unwrap();
    assert!(t.contains("Decision: DENY 400 (bad_path)"), "{t}");
}

#[test]
fn a_create_body_outside_the_criteria_is_denied() {
    let policy = json!({"resourceType": "AccessPolicy", "id": "a", "resource": [
        {"resourceType": "Observation", "interaction": ["create"], "criteria": "Observation?status=final"}
    ]});
    let mut i = input(policy, "POST", "Observation");
    i.body = Some(br#"{"resourceType":"Observation","status":"preliminary"}"#.to_vec());
    let t = explain(&i).unwrap();
    assert!(
        t.contains("Decision: DENY 403 (create_outside_criteria)"),
        "{t}"
    );
    i.body = Some(br#"{"resourceType":"Observation","status":"final"}"#.to_vec());
    let t = explain(&i).unwrap();
    assert!(t.contains("Decision: ALLOW"), "{t}");
    assert!(t.contains("the body satisfies resource[0]"), "{t}");
}

#[test]
fn transactions_are_all_or_nothing() {
    let policy = json!({"resourceType": "AccessPolicy", "id": "a", "resource": [{"resourceType": "Patient"}]});
    let mut i = input(policy, "POST", "");
    i.body = Some(
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
                {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}}
            ]})
            .to_string()
            .into_bytes(),
        );
    let t = explain(&i).unwrap();
    assert!(
        t.contains("Decision: DENY 403 (transaction_entry_denied)"),
        "{t}"
    );
    assert!(
        t.contains("entry[0] create of Patient (with a body): allow"),
        "{t}"
    );
    assert!(t.contains("(Observation, create): not granted"), "{t}");
}

#[test]
fn duplicate_policy_ids_and_bad_profiles_are_errors() {
    let p = policy_from_value(json!({"resourceType": "AccessPolicy", "id": "a"})).unwrap();
    let i = ExplainInput {
        policies: vec![p.clone(), p],
        method: "GET".into(),
        path: "Patient".into(),
        ..ExplainInput::default()
    };
    assert!(explain(&i).unwrap_err().contains("`a`"));
    let i = ExplainInput {
        policies: vec![],
        profile: Some("nope".into()),
        method: "GET".into(),
        path: "Patient".into(),
        ..ExplainInput::default()
    };
    assert!(explain(&i).is_err());
}

#[test]
fn a_create_that_claims_an_id_is_explained_as_the_gateway_decides_it() {
    let mut i = input(
        json!({"resourceType": "AccessPolicy", "id": "own", "resource": [
            {"resourceType": "Patient", "criteria": "Patient?_id=p1"}
        ]}),
        "POST",
        "Patient",
    );
    i.body = Some(br#"{"resourceType": "Patient", "id": "p1"}"#.to_vec());
    let trace = explain(&i).unwrap();
    assert!(trace.contains("its own `id`"), "{trace}");
    assert!(
        trace.lines().any(|l| l.starts_with("Decision: DENY 403")),
        "{trace}"
    );
}
