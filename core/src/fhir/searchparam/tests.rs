use super::*;
use serde_json::json;

fn eval(expr: &str, rt: &str, resource: &Value) -> Vec<Value> {
    FhirPath::compile(expr, rt)
        .unwrap()
        .evaluate(resource)
        .into_iter()
        .map(|n| n.value.clone())
        .collect()
}

#[test]
fn data_loads_with_version() {
    assert_eq!(definitions_version(), "5.2.13");
    assert_eq!(fhir_version(), "4.0.1");
    assert!(all_params().len() > 1400);
    assert!(is_resource_type("Observation"));
    assert!(is_resource_type("Project"));
    assert!(!is_resource_type("Nope"));
}

#[test]
fn lookup_type_and_common_params() {
    let subject = lookup("Observation", "subject").unwrap();
    assert_eq!(subject.param_type, ParamType::Reference);
    assert!(subject.allows_target("Patient"));
    assert!(!subject.allows_target("Observation"));
    let id = lookup("Observation", "_id").unwrap();
    assert_eq!(id.param_type, ParamType::Token);
    assert!(id.is_common());
    assert_eq!(lookup("Resource", "_id"), Some(id));
    assert_eq!(
        lookup("Patient", "_compartment").unwrap().expression,
        "Resource.meta.compartment"
    );
    for code in [
        "_id",
        "_lastUpdated",
        "_tag",
        "_profile",
        "_security",
        "_source",
        "_compartment",
    ] {
        assert!(lookup("Resource", code).is_some(), "{code}");
    }
    assert_eq!(
        lookup("Patient", "general-practitioner")
            .unwrap()
            .targets
            .len(),
        3
    );
    assert!(lookup("Observation", "birthdate").is_none());
    assert!(lookup("Observation", "nope").is_none());
    assert!(is_known_code("birthdate"));
    assert!(!is_known_code("nope"));
    assert!(lookup("Task", "focus").unwrap().allows_target("Anything"));
    assert!(!lookup("Bot", "name").unwrap().is_common());
    assert!(lookup("Bot", "name").unwrap().medplum);
    assert!(!lookup("Patient", "name").unwrap().medplum);
    let codes: Vec<_> = params_for_type("Patient")
        .iter()
        .map(|d| d.code.as_str())
        .collect();
    assert!(codes.contains(&"birthdate") && codes.contains(&"_id") && !codes.contains(&"subject"));
}

#[test]
fn multi_base_expression_selects_own_branch() {
    let def = lookup("Observation", "patient").unwrap();
    assert!(def.base.len() > 10);
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}});
    let p = def.compile("Observation").unwrap();
    assert_eq!(p.evaluate(&obs).len(), 1);
    let cond = json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}});
    // The Observation-compiled path has no Condition branch.
    assert!(
        p.evaluate(&cond)
            .iter()
            .all(|n| n.value == &json!({"reference": "Patient/p1"}))
    );
    assert!(def.compile("Bot").is_err());
}

#[test]
fn choice_elements_and_of_type() {
    let obs = json!({"resourceType": "Observation", "valueQuantity": {"value": 1}, "effectivePeriod": {"start": "2020"}});
    assert_eq!(
        eval("Observation.value", "Observation", &obs),
        vec![json!({"value": 1})]
    );
    assert_eq!(
        eval("Observation.value.ofType(Quantity)", "Observation", &obs).len(),
        1
    );
    assert!(
        eval(
            "Observation.value.ofType(CodeableConcept)",
            "Observation",
            &obs
        )
        .is_empty()
    );
    assert_eq!(
        eval("(Observation.value as Quantity)", "Observation", &obs).len(),
        1
    );
    assert_eq!(
        eval("Observation.value.as(Quantity)", "Observation", &obs).len(),
        1
    );
    assert_eq!(eval("Observation.value[x]", "Observation", &obs).len(), 1);
    let nodes = FhirPath::compile("Observation.effective", "Observation")
        .unwrap()
        .evaluate(&obs);
    assert_eq!(nodes[0].type_name, Some("Period"));
    let cond = json!({"resourceType": "Condition", "onsetDateTime": "2020-01-01"});
    assert_eq!(
        eval("Condition.onset.ofType(dateTime)", "Condition", &cond),
        vec![json!("2020-01-01")]
    );
    assert_eq!(
        eval(
            "(Condition.onset.ofType(FHIR.dateTime))",
            "Condition",
            &cond
        )
        .len(),
        1
    );
    // Not a choice: ofType cannot be decided from the JSON.
    assert!(FhirPath::compile("Observation.status.ofType(code)", "Observation").is_err());
    assert!(FhirPath::compile("Observation.value.ofType(Foo)", "Observation").is_err());
    assert!(FhirPath::compile("Observation.status[x]", "Observation").is_err());
}

#[test]
fn where_filters_and_indexers() {
    let pat = json!({"resourceType": "Patient", "telecom": [
            {"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}],
            "generalPractitioner": [{"reference": "Practitioner/1"}, {"reference": "http://x/fhir/Organization/2/_history/3"}]});
    assert_eq!(
        eval("Patient.telecom.where(system='phone')", "Patient", &pat),
        vec![json!({"system": "phone", "value": "1"})]
    );
    assert_eq!(
        eval(
            "Patient.telecom.where(system = 'email').value",
            "Patient",
            &pat
        ),
        vec![json!("a@b")]
    );
    assert_eq!(
        eval(
            "Patient.generalPractitioner.where(resolve() is Organization)",
            "Patient",
            &pat
        )
        .len(),
        1
    );
    assert_eq!(
        eval("Patient.telecom[1].value", "Patient", &pat),
        vec![json!("a@b")]
    );
    assert_eq!(eval("telecom.value | id", "Patient", &pat).len(), 2);
    assert_eq!(
        eval("Patient.telecom.first().value", "Patient", &pat),
        vec![json!("1")]
    );
    assert_eq!(
        eval("Patient.telecom.value | Patient.id", "Patient", &pat).len(),
        2
    );
    assert_eq!(eval("Resource.telecom.value", "Resource", &pat).len(), 2);
    let union = eval(
        "(Patient.telecom | Patient.generalPractitioner).where(resolve() is Practitioner)",
        "Patient",
        &pat,
    );
    assert_eq!(union.len(), 1);
}

#[test]
fn unsupported_expressions_are_reported() {
    for e in [
        "Patient.deceased.exists() and Patient.deceased != false",
        "iif(priority = 'stat', 50, 10)",
        "ProjectMembership.profile.resolve().resourceType",
        "Patient.name.given.count()",
        "Patient.name.where(given.exists())",
        "Patient.name + 1",
        "Patient.name.given.where(resolve())",
        "Patient.name.ofType(System.String)",
        "(Patient.name",
        "Patient.name'",
        "",
        "Observation.subject",
    ] {
        assert!(FhirPath::compile(e, "Patient").is_err(), "{e}");
    }
}

#[test]
fn references_parse() {
    assert_eq!(parse_reference("Patient/1"), Some(("Patient", "1")));
    assert_eq!(
        parse_reference("https://h/fhir/R4/Patient/1"),
        Some(("Patient", "1"))
    );
    assert_eq!(
        parse_reference("Patient/1/_history/2"),
        Some(("Patient", "1"))
    );
    assert_eq!(parse_reference("urn:uuid:123"), None);
    assert_eq!(parse_reference("#c1"), None);
    assert_eq!(parse_reference("1"), None);
    assert_eq!(parse_reference("patient/1"), None);
    assert_eq!(parse_reference("http://x/Questionnaire/q|1.0"), None);
}

#[test]
fn every_patient_compartment_param_compiles() {
    let reg = registry();
    assert!(reg.patient_compartment.len() > 60);
    for rt in reg.patient_compartment.keys() {
        let paths = patient_compartment_paths(rt).unwrap_or_else(|e| panic!("{rt}: {e}"));
        assert_eq!(paths.len(), patient_compartment_params(rt).len());
    }
    assert_eq!(
        patient_compartment_params("Observation"),
        ["subject", "performer"]
    );
    assert!(
        patient_compartment_paths("Organization")
            .unwrap()
            .is_empty()
    );
}

/// Every definition of a type the criteria support compiles, apart from a known few that
/// use FHIRPath beyond the subset.
#[test]
fn almost_every_supported_type_definition_compiles() {
    let mut failures = Vec::new();
    let mut ok = 0;
    for def in all_params() {
        if !matches!(
            def.param_type,
            ParamType::String
                | ParamType::Token
                | ParamType::Reference
                | ParamType::Date
                | ParamType::Uri
        ) || def.expression.is_empty()
        {
            continue;
        }
        for b in &def.base {
            match def.compile(b) {
                Ok(_) => ok += 1,
                Err(_) => failures.push(format!("{b}.{}", def.code)),
            }
        }
    }
    failures.sort();
    assert_eq!(
        failures,
        ["Patient.deceased", "ProjectMembership.profile-type"]
    );
    assert!(ok > 1700, "{ok}");
}
