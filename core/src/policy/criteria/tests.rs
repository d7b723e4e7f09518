use super::date::{MS_PER_DAY, days_from_civil, parse_date};
use super::*;
use proptest::prelude::*;
use serde_json::json;

fn parse(t: &str, c: &str) -> Criteria {
    Criteria::parse(t, c).unwrap_or_else(|e| panic!("{c}: {e}"))
}

/// Textual parameter substitution, as the effective policy does it (docs/medplum-compat.md §4.2):
/// `%name.id` first, then `%name`.
fn substitute(criteria: &str, params: &[(&str, &str)]) -> String {
    let mut out = criteria.to_string();
    for (name, reference) in params {
        if let Some((_, id)) = reference.split_once('/') {
            out = out.replace(&format!("%{name}.id"), id);
        }
        out = out.replace(&format!("%{name}"), reference);
    }
    out
}

fn obs(id: &str, patient: &str, performer: &str, category: &str, code: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": category
        }]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": "x"},
        "subject": {"reference": patient},
        "effectiveDateTime": "2024-05-02T09:30:00Z",
        "issued": "2024-05-02T09:30:00Z",
        "performer": [{"reference": performer}],
        "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}
    })
}

/// Observations of cases 030/031/040/081/130/191.
fn observations() -> Vec<Value> {
    vec![
        obs(
            "o1",
            "Patient/p1",
            "Practitioner/pr1",
            "vital-signs",
            "8867-4",
        ),
        obs(
            "o2",
            "Patient/p1",
            "Practitioner/pr2",
            "laboratory",
            "2345-7",
        ),
        obs(
            "o3",
            "Patient/p2",
            "Practitioner/pr1",
            "vital-signs",
            "8867-4",
        ),
        obs(
            "o4",
            "Patient/p2",
            "Practitioner/pr2",
            "laboratory",
            "718-7",
        ),
        obs(
            "o5",
            "Patient/p3",
            "Practitioner/pr1",
            "laboratory",
            "718-7",
        ),
    ]
}

fn patient(id: &str, gp: &str, org: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": "http://hospital.example.org/mrn",
            "value": format!("MRN-{id}")
        }],
        "active": true,
        "name": [{"use": "official", "family": "Nguyen", "given": ["Lan", "Thi"], "period": {"start": "2001-01-01"}}],
        "telecom": [
            {"system": "phone", "value": "+1-503-555-0199", "use": "mobile"},
            {"system": "email", "value": "lan.nguyen@example.com", "use": "home"}
        ],
        "gender": "female",
        "birthDate": "1984-03-12",
        "address": [{"use": "home", "line": ["1820 SE Division St"], "city": "Portland", "state": "OR", "postalCode": "97202"}],
        "generalPractitioner": [{"reference": gp}],
        "managingOrganization": {"reference": org}
    })
}

/// Patients of cases 032/051/160/210.
fn patients() -> Vec<Value> {
    vec![
        patient("p1", "Practitioner/pr1", "Organization/org1"),
        patient("p2", "Practitioner/pr2", "Organization/org2"),
        patient("p3", "Practitioner/pr1", "Organization/org1"),
    ]
}

fn matching_ids(c: &Criteria, resources: &[Value]) -> Vec<String> {
    resources
        .iter()
        .filter(|r| c.matches(r))
        .filter_map(|r| r.get("id").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[test]
fn case_criteria_against_fixtures() {
    let tasks: Vec<Value> = [
        ("t1", "accepted", "org1"),
        ("t2", "completed", "org2"),
        ("t3", "requested", "org1"),
    ]
    .iter()
    .map(|(id, status, org)| {
        json!({"resourceType": "Task", "id": id, "status": status, "intent": "order",
                   "owner": {"reference": format!("Organization/{org}")}})
    })
    .collect();
    let service_requests: Vec<Value> = [("sr1", "active", "p1"), ("sr2", "completed", "p2")]
        .iter()
        .map(|(id, status, p)| {
            json!({"resourceType": "ServiceRequest", "id": id, "status": status, "intent": "order",
                   "subject": {"reference": format!("Patient/{p}")}, "authoredOn": "2024-05-02"})
        })
        .collect();
    let p1 = [("patient", "Patient/p1")];
    let cases: Vec<(&str, String, Vec<Value>, Vec<&str>)> = vec![
        // 030, 031, 070, 130, 191: own observations.
        (
            "Observation",
            substitute("Observation?subject=%patient", &p1),
            observations(),
            vec!["o1", "o2"],
        ),
        // 032: %patient.id.
        (
            "Patient",
            substitute("Patient?_id=%patient.id", &[("patient", "Patient/p2")]),
            patients(),
            vec!["p2"],
        ),
        // 033: a string parameter.
        (
            "Task",
            "Task?status=accepted".to_string(),
            tasks,
            vec!["t1"],
        ),
        // 040, 081, 150: a token.
        (
            "Observation",
            "Observation?category=vital-signs".to_string(),
            observations(),
            vec!["o1", "o3"],
        ),
        (
            "Observation",
            substitute(
                "Observation?performer=%practitioner",
                &[("practitioner", "Practitioner/pr2")],
            ),
            observations(),
            vec!["o2", "o4"],
        ),
        // 051, 160.
        (
            "Patient",
            "Patient?organization=Organization/org1".to_string(),
            patients(),
            vec!["p1", "p3"],
        ),
        // 071, 072.
        (
            "ServiceRequest",
            "ServiceRequest?status=active".to_string(),
            service_requests.clone(),
            vec!["sr1"],
        ),
        (
            "ServiceRequest",
            "ServiceRequest?status=completed".to_string(),
            service_requests,
            vec!["sr2"],
        ),
        // 210: %profile.
        (
            "Patient",
            substitute(
                "Patient?general-practitioner=%profile",
                &[("profile", "Practitioner/pr1")],
            ),
            patients(),
            vec!["p1", "p3"],
        ),
        // 191: the SMART scope query appended to the criteria.
        (
            "Observation",
            substitute(
                "Observation?subject=%patient&category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
                &p1,
            ),
            observations(),
            vec!["o2"],
        ),
    ];
    for (t, criteria, resources, expected) in cases {
        let c = parse(t, &criteria);
        assert_eq!(matching_ids(&c, &resources), expected, "{criteria}");
    }
}

#[test]
fn case_writes_checked_against_criteria() {
    let c = parse("Observation", "Observation?subject=Patient/p1");
    // 070: a new Observation for p2 is outside the criteria.
    assert!(!c.matches(&obs(
        "new",
        "Patient/p2",
        "Practitioner/pr1",
        "vital-signs",
        "8867-4"
    )));
    let sr = |status: &str| json!({"resourceType": "ServiceRequest", "id": "sr1", "status": status, "intent": "order"});
    let active = parse("ServiceRequest", "ServiceRequest?status=active");
    // 071 / 072: current and new versions.
    assert!(active.matches(&sr("active")));
    assert!(!active.matches(&sr("completed")));
}

#[test]
fn query_params_of_case_criteria() {
    let qp = |t: &str, c: &str| -> Vec<(String, String)> {
        parse(t, c)
            .query_params()
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect()
    };
    let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
    assert_eq!(
        qp("Observation", "Observation?subject=Patient/p1"),
        [pair("subject", "Patient/p1")]
    );
    assert_eq!(qp("Patient", "Patient?_id=p2"), [pair("_id", "p2")]);
    assert_eq!(
        qp(
            "Observation",
            "Observation?category=http%3A%2F%2Fx%7Cvital-signs&code:not=a,b"
        ),
        [
            pair("category", "http://x|vital-signs"),
            pair("code:not", "a,b")
        ]
    );
    assert_eq!(
        qp("Patient", "Patient?name=lan&family:exact=Nguyen"),
        [pair("name:contains", "lan"), pair("family:exact", "Nguyen")]
    );
    assert_eq!(
        qp("Patient", "Patient?name:contains=lan"),
        [pair("name:contains", "lan")]
    );
    assert_eq!(
        qp(
            "Patient",
            "Patient?birthdate=ge1980&_lastUpdated=lt2024-01-01T00:00:00Z"
        ),
        [
            pair("birthdate", "ge1980"),
            pair("_lastUpdated", "lt2024-01-01T00:00:00Z")
        ]
    );
    assert_eq!(
        qp("Patient", "Patient?email:present=true&phone:missing=true"),
        [
            pair("email:missing", "false"),
            pair("phone:missing", "true")
        ]
    );
    assert_eq!(
        qp("Observation", "Observation?subject:Patient=p1"),
        [pair("subject:Patient", "p1")]
    );
    assert_eq!(
        qp("ValueSet", "ValueSet?url:exact=http://x/vs"),
        [pair("url", "http://x/vs")]
    );
    let complete = |t: &str, c: &str| parse(t, c).upstream_complete();
    assert!(complete(
        "Observation",
        "Observation?subject=Patient/p1&category=vital-signs"
    ));
    assert!(!complete(
        "Observation",
        "Observation?_compartment=Patient/p1"
    ));
    assert!(!complete("ValueSet", "ValueSet?url=example"));
    assert!(!complete("Patient", "Patient?name:not=lan"));
    assert!(!complete("Patient", "Patient?birthdate:not=1984"));
    assert!(!complete(
        "Patient",
        "Patient?organization:not=Organization/org1"
    ));
    assert!(
        !complete("ServiceRequest", "ServiceRequest?reason-code=x"),
        "Medplum-only parameter"
    );
    assert!(
        parse("Observation", "Observation?_compartment=Patient/p1")
            .query_params()
            .is_empty()
    );
    assert!(parse("Patient", "Patient?").query_params().is_empty());
}

#[test]
fn reference_parameters() {
    let o =
        |subject: &str| json!({"resourceType": "Observation", "subject": {"reference": subject}});
    let table = [
        ("subject=Patient/p1", "Patient/p1", true),
        ("subject=Patient/p1", "Patient/p10", false),
        ("subject=Patient/p1", "Patient/xp1", false),
        ("subject=Patient/p1", "Group/p1", false),
        (
            "subject=Patient/p1",
            "https://fhir.example.org/R4/Patient/p1",
            true,
        ),
        (
            "subject=Patient/p1",
            "https://fhir.example.org/R4/XPatient/p1",
            false,
        ),
        ("subject=Patient/p1", "Patient/p1/_history/3", true),
        ("subject=p1", "Patient/p1", true),
        ("subject=p1", "Group/p1", true),
        ("subject=p1", "Patient/xp1", false),
        ("subject=Patient/p1,Patient/p2", "Patient/p2", true),
        ("subject:Patient=p1", "Patient/p1", true),
        ("subject:Patient=p1", "Group/p1", false),
        ("subject:Patient=Patient/p1", "Patient/p1", true),
        ("subject=https://h/Patient/p1", "https://h/Patient/p1", true),
        ("subject=https://h/Patient/p1", "Patient/p1", false),
        ("subject=urn:uuid:1234", "urn:uuid:1234", true),
        ("subject:not=Patient/p1", "Patient/p1", false),
        ("subject:not=Patient/p1", "Patient/p2", true),
        ("patient=Patient/p1", "Patient/p1", true),
        ("patient=Patient/p1", "Group/x", false),
    ];
    for (q, subject, expected) in table {
        let c = parse("Observation", &format!("Observation?{q}"));
        assert_eq!(c.matches(&o(subject)), expected, "{q} vs {subject}");
    }
    let none = json!({"resourceType": "Observation"});
    assert!(!parse("Observation", "Observation?subject=Patient/p1").matches(&none));
    assert!(parse("Observation", "Observation?subject:not=Patient/p1").matches(&none));
    let display_only = json!({"resourceType": "Observation", "subject": {"display": "Patient/p1"}});
    assert!(!parse("Observation", "Observation?subject=Patient/p1").matches(&display_only));
    // Several references: any.
    let multi = json!({"resourceType": "Observation", "performer": [{"reference": "Practitioner/a"}, {"reference": "Organization/b"}]});
    assert!(parse("Observation", "Observation?performer=Organization/b").matches(&multi));
    // Canonical references (reference parameters over canonical elements).
    let plan = json!({"resourceType": "PlanDefinition", "relatedArtifact": [
        {"type": "derived-from", "resource": "http://x/PlanDefinition/base|2.0"},
        {"type": "depends-on", "resource": "http://x/Library/lib"}]});
    assert!(
        parse(
            "PlanDefinition",
            "PlanDefinition?derived-from=http://x/PlanDefinition/base"
        )
        .matches(&plan)
    );
    assert!(
        parse(
            "PlanDefinition",
            "PlanDefinition?derived-from=http://x/PlanDefinition/base%7C2.0"
        )
        .matches(&plan)
    );
    assert!(
        !parse(
            "PlanDefinition",
            "PlanDefinition?derived-from=http://x/PlanDefinition/base%7C1.0"
        )
        .matches(&plan)
    );
    assert!(
        !parse(
            "PlanDefinition",
            "PlanDefinition?derived-from=http://x/Library/lib"
        )
        .matches(&plan)
    );
    assert!(
        parse(
            "PlanDefinition",
            "PlanDefinition?depends-on=http://x/Library/lib"
        )
        .matches(&plan)
    );
}

#[test]
fn string_and_uri_parameters() {
    let p = &patients()[0];
    let table = [
        ("name=lan", true),
        ("name=GUYE", true),
        ("name=thi", true),
        ("name=nguyen,smith", true),
        ("name=smith", false),
        ("name=official", false), // `use` is not text
        ("name=2001", false),     // nor is `period`
        ("family=nguy", true),
        ("family:exact=Nguyen", true),
        ("family:exact=nguyen", false),
        ("family:exact=Nguy", false),
        ("family:contains=UYE", true),
        ("given=lan", true),
        ("given:exact=Thi", true),
        ("address=division", true),
        ("address=home", false),
        ("address-city=portland", true),
        ("address-postalcode=9720", true),
        ("address-state=or", true),
        ("name:not=smith", true),
        ("name:not=lan", false),
        ("name:missing=false", true),
        ("name:missing=true", false),
        ("name:present=true", true),
        ("phonetic=lan", true),
        ("family=lan%5C,thi", false), // an escaped comma is part of the value
    ];
    for (q, expected) in table {
        let c = parse("Patient", &format!("Patient?{q}"));
        assert_eq!(c.matches(p), expected, "{q}");
    }
    let vs = json!({"resourceType": "ValueSet", "url": "http://example.org/fhir/ValueSet/Colors"});
    for (q, expected) in [
        ("url=example.org", true),
        ("url=valueset/colors", true),
        ("url=other", false),
        ("url:exact=http://example.org/fhir/ValueSet/Colors", true),
        ("url:exact=http://example.org/fhir/ValueSet/colors", false),
        ("url:missing=false", true),
        ("url:not=colors", false),
    ] {
        assert_eq!(
            parse("ValueSet", &format!("ValueSet?{q}")).matches(&vs),
            expected,
            "{q}"
        );
    }
    let tagged = json!({"resourceType": "Patient", "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"], "source": "urn:app"}});
    assert!(parse("Patient", "Patient?_profile=us-core-patient").matches(&tagged));
    assert!(parse("Patient", "Patient?_source=urn:app").matches(&tagged));
    assert!(!parse("Patient", "Patient?_source=other").matches(&tagged));
}

#[test]
fn token_parameters() {
    let p = &patients()[0];
    let table = [
        ("gender=female", true),
        ("gender=FEMALE", true),
        ("gender=male", false),
        ("gender=male,female", true),
        ("gender=|female", true),
        ("gender=http://x|female", false),
        ("active=true", true),
        ("active=false", false),
        ("identifier=MRN-p1", true),
        ("identifier=mrn-P1", true),
        ("identifier=http://hospital.example.org/mrn|MRN-p1", true),
        ("identifier=http://hospital.example.org/mrn|", true),
        ("identifier=http://other|MRN-p1", false),
        ("identifier=|MRN-p1", false),
        ("identifier=MR", false),
        ("telecom=%2B1-503-555-0199", true),
        ("telecom=phone|%2B1-503-555-0199", true),
        ("telecom=email|%2B1-503-555-0199", false),
        ("telecom=+1-503-555-0199", false), // `+` is a space in a query string
        ("phone=%2B1-503-555-0199", true),
        ("phone=lan.nguyen@example.com", false),
        ("email=lan.nguyen@example.com", true),
        ("_id=p1", true),
        ("_id=P1", false), // ids are case-sensitive
        ("_id=|p1", true),
        ("_id=p2,p1", true),
        ("_id=p2", false),
        ("_id:not=p2", true),
        ("gender:not=female", false),
        ("gender:not=male,other", true),
        ("gender:missing=false", true),
        ("deceased:missing=true", false),
        ("_tag=x", false),
        ("_tag:missing=true", true),
    ];
    for (q, expected) in table {
        let c = match Criteria::parse("Patient", &format!("Patient?{q}")) {
            Ok(c) => c,
            Err(e) if q.starts_with("deceased") => {
                // Patient.deceased uses FHIRPath beyond the subset: refused.
                assert!(matches!(e, CriteriaError::Unsupported(_)));
                continue;
            }
            Err(e) => panic!("{q}: {e}"),
        };
        assert_eq!(c.matches(p), expected, "{q}");
    }
    let o = &observations()[0];
    let table = [
        ("code=http://loinc.org|8867-4", true),
        ("code=HTTP://LOINC.ORG|8867-4", true),
        ("code=8867-4", true),
        ("code=http://snomed.info/sct|8867-4", false),
        ("code=http://loinc.org|", true),
        ("code=|8867-4", false),
        ("code=x", false), // `text` is not a code
        ("category=vital-signs", true),
        ("status=final", true),
        ("status=final,amended", true),
        ("status:not=final", false),
        ("value-concept=x", false),
    ];
    for (q, expected) in table {
        assert_eq!(
            parse("Observation", &format!("Observation?{q}")).matches(o),
            expected,
            "{q}"
        );
    }
    let coded = json!({"resourceType": "Observation", "valueCodeableConcept": {"coding": [{"code": "pos"}]},
                       "meta": {"tag": [{"system": "urn:t", "code": "a"}], "security": [{"code": "R"}]}});
    for (q, expected) in [
        ("value-concept=pos", true),
        ("value-concept=|pos", true),
        ("_tag=urn:t|a", true),
        ("_tag=a", true),
        ("_tag=urn:t|b", false),
        ("_security=r", true),
        ("_security=|R", true),
    ] {
        assert_eq!(
            parse("Observation", &format!("Observation?{q}")).matches(&coded),
            expected,
            "{q}"
        );
    }
    // Escaped separators are part of the code.
    let odd = json!({"resourceType": "Observation", "status": "a|b,c"});
    assert!(parse("Observation", "Observation?status=a%5C%7Cb%5C,c").matches(&odd));
}

#[test]
fn date_parameters() {
    let o = |value: Value| {
        let mut r = json!({"resourceType": "Observation"});
        if let (Some(map), Value::Object(fields)) = (r.as_object_mut(), value) {
            map.extend(fields);
        }
        r
    };
    let instant = o(json!({"effectiveDateTime": "2024-05-02T09:30:00Z"}));
    let offset = o(json!({"effectiveDateTime": "2024-05-02T23:30:00-05:00"})); // 2024-05-03T04:30Z
    let day = o(json!({"effectiveDateTime": "2024-05-02"}));
    let month = o(json!({"effectiveDateTime": "2024-05"}));
    let period = o(json!({"effectivePeriod": {"start": "2024-05-01", "end": "2024-05-10"}}));
    let open = o(json!({"effectivePeriod": {"start": "2024-05-01"}}));
    let timing =
        o(json!({"effectiveTiming": {"event": ["2024-05-03T10:00:00Z", "2024-05-04T10:00:00Z"]}}));
    let inst = o(json!({"effectiveInstant": "2024-05-02T09:30:00.250Z"}));
    let none = o(json!({}));
    let table: Vec<(&str, &Value, bool)> = vec![
        ("date=2024-05-02", &instant, true),
        ("date=2024-05", &instant, true),
        ("date=2024", &instant, true),
        ("date=2024-05-03", &instant, false),
        ("date=eq2024-05-02", &instant, true),
        ("date=ne2024-05-02", &instant, false),
        ("date=ne2024-05-03", &instant, true),
        ("date=gt2024-05-01", &instant, true),
        ("date=gt2024-05-02", &instant, false),
        ("date=ge2024-05-02", &instant, true),
        ("date=lt2024-05-03", &instant, true),
        ("date=lt2024-05-02", &instant, false),
        ("date=le2024-05-02", &instant, true),
        ("date=lt2024-05-02T09:30:00Z", &instant, false),
        ("date=lt2024-05-02T09:30:01Z", &instant, true),
        ("date=gt2024-05-02T09:29:59Z", &instant, true),
        ("date=gt2024-05-02T11:29:00%2B02:00", &instant, true),
        ("date=gt2024-05-02T11:31:00%2B02:00", &instant, false),
        ("date=eq2024-05-02T09:30Z", &instant, true),
        ("date=sa2024-05-01", &instant, true),
        ("date=sa2024-05-02", &instant, false),
        ("date=eb2024-05-03", &instant, true),
        ("date=eb2024-05-02", &instant, false),
        ("date=2024-05-03", &offset, true),
        ("date=2024-05-02", &offset, false),
        ("date=2024-05-02", &day, true),
        ("date=2024-05-02T00:00:00Z", &day, false),
        ("date=gt2024-05-02T12:00:00Z", &day, true),
        ("date=lt2024-05-02T12:00:00Z", &day, true),
        ("date=2024-05", &month, true),
        ("date=2024-05-02", &month, false),
        ("date=ge2024-05-02", &month, true),
        ("date=2024-05", &period, true),
        ("date=2024-05-05", &period, false),
        ("date=ne2024-05-05", &period, true),
        ("date=gt2024-05-05", &period, true),
        ("date=lt2024-05-05", &period, true),
        ("date=sa2024-04-30", &period, true),
        ("date=eb2024-05-11", &period, true),
        ("date=eb2024-05-10", &period, false),
        ("date=gt2030", &open, true),
        ("date=lt2024-05-01", &open, false),
        ("date=2024", &open, false),
        ("date=2024-05-03", &timing, false),
        ("date=ge2024-05-03", &timing, true),
        ("date=2024-05", &timing, true),
        ("date=2024-05-02T09:30:00Z", &inst, true),
        ("date=gt2024-05-02T09:30:00.250Z", &inst, false),
        ("date=2024,2023", &instant, true),
        ("date=2022,2023", &instant, false),
        ("date:not=2024", &instant, false),
        ("date:missing=true", &none, true),
        ("date=2024", &none, false),
        ("date=ne2024", &none, false),
        ("date:not=2024", &none, true),
    ];
    for (q, r, expected) in table {
        assert_eq!(
            parse("Observation", &format!("Observation?{q}")).matches(r),
            expected,
            "{q} vs {r}"
        );
    }
    let p = &patients()[0];
    assert!(parse("Patient", "Patient?birthdate=1984-03-12").matches(p));
    assert!(parse("Patient", "Patient?birthdate=lt1985").matches(p));
    assert!(!parse("Patient", "Patient?birthdate=gt1985").matches(p));
    let updated = json!({"resourceType": "Patient", "meta": {"lastUpdated": "2024-06-01T10:00:00.123+00:00"}});
    assert!(parse("Patient", "Patient?_lastUpdated=ge2024-06-01").matches(&updated));
    assert!(!parse("Patient", "Patient?_lastUpdated=lt2024-06-01T10:00:00Z").matches(&updated));
    // Unparseable resource dates match no value.
    let bad = o(json!({"effectiveDateTime": "yesterday"}));
    assert!(!parse("Observation", "Observation?date=ne2024").matches(&bad));
}

#[test]
fn compartment_parameter() {
    let obs_p1 = obs("o1", "Patient/p1", "Practitioner/pr1", "vital-signs", "1");
    let performed_by_p1 = obs("o9", "Group/g", "Patient/p1", "vital-signs", "1");
    let obs_p2 = obs("o3", "Patient/p2", "Practitioner/pr1", "vital-signs", "1");
    let p1 = &patients()[0];
    let p2 = &patients()[1];
    let tagged = json!({"resourceType": "Organization", "id": "org9", "meta": {"compartment": [{"reference": "Patient/p1"}, {"reference": "Project/proj"}]}});
    let account_a = json!({"resourceType": "Patient", "id": "pa", "meta": {"account": {"reference": "Organization/A"}}});
    let org = json!({"resourceType": "Organization", "id": "org1"});
    let linked = json!({"resourceType": "Patient", "id": "p7", "link": [{"other": {"reference": "Patient/p1"}, "type": "seealso"}]});
    let table: Vec<(&str, &Value, bool)> = vec![
        ("_compartment=Patient/p1", &obs_p1, true),
        ("_compartment=Patient/p1", &performed_by_p1, true),
        ("_compartment=Patient/p1", &obs_p2, false),
        ("_compartment=p1", &obs_p1, true),
        ("_compartment=Patient/p1,Patient/p2", &obs_p2, true),
        ("_compartment=Patient/p1", p1, true),
        ("_compartment=Patient/p1", p2, false),
        ("_compartment=p1", p1, true),
        ("_compartment=Patient/p1", &linked, true),
        ("_compartment=Patient/p1", &tagged, true),
        ("_compartment=Project/proj", &tagged, true),
        ("_compartment=Organization/A", &account_a, true),
        ("_compartment=Organization/B", &account_a, false),
        ("_compartment=proj", &tagged, true),
        ("_compartment=Project/other", &tagged, false),
        ("_compartment=Patient/p1", &org, false),
        ("_compartment=Practitioner/pr1", &obs_p1, false),
    ];
    for (q, r, expected) in table {
        let rt = r.get("resourceType").and_then(Value::as_str).unwrap();
        let typed = parse(rt, &format!("{rt}?{q}"));
        assert_eq!(typed.matches(r), expected, "{rt}?{q} vs {r}");
        let wildcard = parse("*", &format!("*?{q}"));
        assert_eq!(wildcard.matches(r), expected, "*?{q} vs {r}");
        assert_eq!(
            wildcard.for_type(rt).unwrap().matches(r),
            expected,
            "*?{q} for {rt}"
        );
    }
}

#[test]
fn wildcard_criteria() {
    let c = parse("*", "*?_compartment=Patient/p1");
    assert!(c.is_wildcard());
    assert_eq!(c.resource_type(), "*");
    let o = c.for_type("Observation").unwrap();
    assert_eq!(o.resource_type(), "Observation");
    assert!(!o.is_wildcard());
    assert!(
        !o.matches(&patients()[0]),
        "instantiated criteria keep their type"
    );
    assert!(c.for_type("Nope").is_err());

    // Common parameters are validated at parse time.
    assert!(matches!(
        Criteria::parse("*", "*?_id:exact=1"),
        Err(CriteriaError::Unsupported(_))
    ));
    assert!(matches!(
        Criteria::parse("*", "*?_lastUpdated=soon"),
        Err(CriteriaError::Unsupported(_))
    ));
    assert!(matches!(
        Criteria::parse("*", "*?nope=1"),
        Err(CriteriaError::UnknownParameter(_))
    ));
    assert!(matches!(
        Criteria::parse("*", "*?subject:text=1"),
        Err(CriteriaError::Unsupported(_))
    ));

    // Other parameters exist on some types only: checked per type.
    let c = parse("*", "*?patient=Patient/p1&_id=o1,o2");
    assert!(!c.upstream_complete());
    assert_eq!(
        c.query_params(),
        [QueryParam {
            name: "_id".into(),
            value: "o1,o2".into()
        }]
    );
    let o = c.for_type("Observation").unwrap();
    assert!(o.upstream_complete());
    assert_eq!(o.query_params().len(), 2);
    assert!(o.matches(&observations()[0]));
    assert!(!o.matches(&observations()[2]));
    assert!(
        c.matches(&observations()[0]),
        "a wildcard criteria compiles for the resource type"
    );
    assert!(!c.matches(&observations()[2]));
    assert!(matches!(
        c.for_type("Organization"),
        Err(CriteriaError::UnknownParameter(_))
    ));
    assert!(
        !c.matches(&json!({"resourceType": "Organization", "id": "o1"})),
        "fails closed"
    );

    let tagged = parse("*", "*?_tag=urn:t|a");
    assert!(tagged.upstream_complete());
    assert!(tagged.matches(
        &json!({"resourceType": "Basic", "meta": {"tag": [{"system": "urn:t", "code": "a"}]}})
    ));
    assert!(!tagged.matches(&json!({"resourceType": "Basic"})));
    assert!(tagged.for_type("Basic").unwrap().matches(
        &json!({"resourceType": "Basic", "meta": {"tag": [{"system": "urn:t", "code": "a"}]}})
    ));

    // Typed criteria only apply to their type.
    let typed = parse("Patient", "Patient?_id=p1");
    assert_eq!(typed.for_type("Patient").unwrap(), typed);
    assert!(typed.for_type("Observation").is_err());
}

#[test]
fn type_must_match() {
    let c = parse("Patient", "Patient?_id=p1");
    assert!(c.matches(&json!({"resourceType": "Patient", "id": "p1"})));
    assert!(!c.matches(&json!({"resourceType": "Practitioner", "id": "p1"})));
    assert!(!c.matches(&json!({"id": "p1"})));
    assert!(!c.matches(&json!([{"resourceType": "Patient", "id": "p1"}])));
    assert!(!c.matches(&json!("Patient")));
    let all = parse("Patient", "Patient?");
    assert!(all.matches(&json!({"resourceType": "Patient"})));
    assert!(!all.matches(&json!({"resourceType": "Observation"})));
}

#[test]
fn and_of_filters() {
    let o = observations();
    let c = parse(
        "Observation",
        "Observation?subject=Patient/p1&category=vital-signs",
    );
    assert_eq!(matching_ids(&c, &o), ["o1"]);
    let c = parse("Observation", "Observation?status=final&status=amended");
    assert!(
        matching_ids(&c, &o).is_empty(),
        "repeated parameters are ANDed"
    );
    let c = parse(
        "Observation",
        "Observation?category=laboratory&performer=Practitioner/pr2&subject=p2",
    );
    assert_eq!(matching_ids(&c, &o), ["o4"]);
}

#[test]
fn refused_at_parse_time() {
    use CriteriaError::*;
    type Check = fn(&CriteriaError) -> bool;
    let table: Vec<(&str, &str, Check)> = vec![
        ("Observation", "Patient?_id=1", |e| {
            matches!(e, WrongType(_))
        }),
        ("Observation", "Observation", |e| matches!(e, WrongType(_))),
        ("*", "Observation?_id=1", |e| matches!(e, WrongType(_))),
        ("Nope", "Nope?_id=1", |e| matches!(e, Unsupported(_))),
        ("Observation", "Observation?nope=1", |e| {
            matches!(e, UnknownParameter(_))
        }),
        ("Observation", "Observation?birthdate=2020", |e| {
            matches!(e, UnknownParameter(_))
        }),
        ("Observation", "Observation?_count=10", |e| {
            matches!(e, UnknownParameter(_))
        }),
        ("Observation", "Observation?_sort=date", |e| {
            matches!(e, UnknownParameter(_))
        }),
        (
            "Observation",
            "Observation?_include=Observation:subject",
            |e| matches!(e, UnknownParameter(_)),
        ),
        ("Observation", "Observation?_type=Patient", |e| {
            matches!(e, UnknownParameter(_))
        }),
        ("Observation", "Observation?subject.name=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Observation", "Observation?subject:Patient.name=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_has:Observation:subject:code=1", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_filter=name eq x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_text=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_content=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_query=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Observation", "Observation?value-quantity=5", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Observation", "Observation?code-value-quantity=1$2", |e| {
            matches!(e, Unsupported(_))
        }),
        ("RiskAssessment", "RiskAssessment?probability=0.5", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Location", "Location?near=1|2", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?deceased=true", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name:text=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name:nope=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name:=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?gender:exact=male", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?gender:text=male", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?gender:in=http://vs", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?gender:below=m", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?identifier:of-type=a|b|c", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?organization:identifier=a|b", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?organization:Patient=1", |e| {
            matches!(e, Unsupported(_))
        }),
        (
            "Patient",
            "Patient?organization:Organization=Patient/1",
            |e| matches!(e, Unsupported(_)),
        ),
        ("Patient", "Patient?organization:contains=x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate:exact=2020", |e| {
            matches!(e, Unsupported(_))
        }),
        ("ValueSet", "ValueSet?url:below=http://x", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name:missing=yes", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name:present=1", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name=", |e| matches!(e, Unsupported(_))),
        ("Patient", "Patient?name", |e| matches!(e, Unsupported(_))),
        ("Patient", "Patient?name=a,,b", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?name=a,", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?gender=|", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?gender=a|b|c", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate=ap2020", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate=xx2020", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate=2020-13", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate=2021-02-29", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate=2020-01-01T10:00:00", |e| {
            matches!(e, Unsupported(_))
        }),
        (
            "Patient",
            "Patient?birthdate=2020-01-01T10:00:00+02:00",
            |e| matches!(e, Unsupported(_)),
        ),
        ("Patient", "Patient?birthdate=2020-01-01T25:00:00Z", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?birthdate=20", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_compartment:not=Patient/1", |e| {
            matches!(e, Unsupported(_))
        }),
        ("Patient", "Patient?_compartment:missing=true", |e| {
            matches!(e, Unsupported(_))
        }),
        (
            "ProjectMembership",
            "ProjectMembership?profile-type=Patient",
            |e| matches!(e, Unsupported(_)),
        ),
        ("*", "*?_id:text=1", |e| matches!(e, Unsupported(_))),
        ("*", "*?subject.name=x", |e| matches!(e, Unsupported(_))),
        ("*", "*?value-quantity=5", |e| matches!(e, Unsupported(_))),
        ("*", "*?patient:Organization=1", |e| {
            matches!(e, Unsupported(_))
        }),
        ("*", "*?patient=", |e| matches!(e, Unsupported(_))),
        ("*", "*?birthdate=soon", |e| matches!(e, Unsupported(_))),
    ];
    for (t, c, check) in table {
        match Criteria::parse(t, c) {
            Ok(parsed) => panic!("{c} was accepted: {parsed:?}"),
            Err(e) => assert!(check(&e), "{c}: unexpected {e:?}"),
        }
    }
}

#[test]
fn dates_parse_to_ranges() {
    let day = |y, m, d| days_from_civil(y, m, d) * MS_PER_DAY;
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(
        parse_date("2024", true),
        Some((day(2024, 1, 1), day(2025, 1, 1)))
    );
    assert_eq!(
        parse_date("2024-12", true),
        Some((day(2024, 12, 1), day(2025, 1, 1)))
    );
    assert_eq!(
        parse_date("2024-02-29", true),
        Some((day(2024, 2, 29), day(2024, 3, 1)))
    );
    assert_eq!(parse_date("2023-02-29", true), None);
    let t = day(2024, 5, 2) + (9 * 3600 + 30 * 60) * 1000;
    assert_eq!(
        parse_date("2024-05-02T09:30:00Z", true),
        Some((t, t + 1000))
    );
    assert_eq!(parse_date("2024-05-02T09:30Z", true), Some((t, t + 60_000)));
    assert_eq!(
        parse_date("2024-05-02T11:30:00+02:00", true),
        Some((t, t + 1000))
    );
    assert_eq!(
        parse_date("2024-05-02T09:30:00.5Z", true),
        Some((t + 500, t + 600))
    );
    assert_eq!(
        parse_date("2024-05-02T09:30:00.123456Z", true),
        Some((t + 123, t + 124))
    );
    assert_eq!(
        parse_date("2024-05-02T09:30:00", false),
        Some((t, t + 1000))
    );
    assert_eq!(parse_date("2024-05-02T09:30:00", true), None);
    for bad in [
        "",
        "202",
        "2024-",
        "2024-1",
        "2024-05-02T",
        "2024-05-02T09",
        "2024-05-02T09:30:00.Z",
        "2024-05-02T09:30:00+0200",
        "2024-05-02T09:30:00Zx",
        "２０２４",
    ] {
        assert_eq!(parse_date(bad, false), None, "{bad}");
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("Patient/p1"),
            Just("2024-05-02T09:30:00Z"),
            Just("2024"),
            Just("Observation"),
            Just("Patient"),
            Just("p1"),
            Just("http://loinc.org"),
            Just("9999-12-31T23:59:59.999-14:00"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    let key = prop_oneof![
        Just("resourceType".to_string()),
        Just("id".to_string()),
        Just("subject".to_string()),
        Just("reference".to_string()),
        Just("code".to_string()),
        Just("coding".to_string()),
        Just("system".to_string()),
        Just("value".to_string()),
        Just("effectiveDateTime".to_string()),
        Just("effectivePeriod".to_string()),
        Just("start".to_string()),
        Just("end".to_string()),
        Just("event".to_string()),
        Just("meta".to_string()),
        Just("compartment".to_string()),
        Just("name".to_string()),
        Just("performer".to_string()),
        "[a-zA-Z_]{1,8}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kvs| Value::Object(kvs.into_iter().collect())),
        ]
    })
}

fn fuzz_criteria() -> Vec<Criteria> {
    [
        (
            "Observation",
            "Observation?subject=Patient/p1&code=http://loinc.org|1&date=ge2024&_compartment=p1",
        ),
        (
            "Observation",
            "Observation?performer:missing=false&status:not=final&value-concept=x",
        ),
        (
            "Patient",
            "Patient?name=a&address=b&_id=p1&birthdate=ne2024-05&telecom=phone|1",
        ),
        (
            "*",
            "*?_compartment=Patient/p1&_lastUpdated=lt2024-01-01T00:00:00Z&_tag=a|b",
        ),
        ("*", "*?patient=Patient/p1"),
    ]
    .iter()
    .map(|(t, c)| parse(t, c))
    .collect()
}

proptest! {
    #[test]
    fn parse_never_panics(
        s in ".{0,80}",
        t in prop_oneof![Just("Patient".to_string()), Just("*".to_string()), Just("Observation".to_string()), ".{0,6}"],
    ) {
        let t = t.as_str();
        let _ = Criteria::parse(t, &s);
        let _ = Criteria::parse(t, &format!("{t}?{s}"));
    }

    #[test]
    fn parse_never_panics_on_query_like_input(
        name in prop_oneof![
            Just("subject".to_string()),
            Just("_id".to_string()),
            Just("date".to_string()),
            Just("name".to_string()),
            Just("code".to_string()),
            Just("_compartment".to_string()),
            "[a-z_:.-]{0,12}",
        ],
        modifier in prop_oneof![
            Just(String::new()),
            Just(":not".to_string()),
            Just(":missing".to_string()),
            Just(":exact".to_string()),
            Just(":Patient".to_string()),
            ":[a-zA-Z-]{0,8}",
        ],
        value in "[a-zA-Z0-9|,:/%.+\\\\-]{0,24}",
    ) {
        let q = format!("Observation?{name}{modifier}={value}");
        if let Ok(c) = Criteria::parse("Observation", &q) {
            let _ = c.matches(&observations()[0]);
        }
        let _ = Criteria::parse("*", &format!("*?{name}{modifier}={value}"));
    }

    #[test]
    fn matches_never_panics(value in arb_json(), rt in prop_oneof![Just("Observation"), Just("Patient"), Just("Basic")]) {
        let mut resource = value.clone();
        if let Value::Object(map) = &mut resource {
            map.insert("resourceType".to_string(), Value::String(rt.to_string()));
        }
        for c in fuzz_criteria() {
            let _ = c.matches(&value);
            let _ = c.matches(&resource);
        }
    }
}
