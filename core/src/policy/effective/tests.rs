use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::fhir::request::Interaction::{self, *};
use crate::policy::ip::IpVerdict;

// === helpers ===

fn policies(list: Value) -> Vec<AccessPolicy> {
    serde_json::from_value(list).expect("AccessPolicy list")
}

/// A membership of `ClientApplication/c1` in `Project/proj` with the given extra fields.
fn membership(extra: Value) -> ProjectMembership {
    let mut m = json!({
        "resourceType": "ProjectMembership",
        "id": "m1",
        "project": {"reference": "Project/proj"},
        "user": {"reference": "ClientApplication/c1"},
        "profile": {"reference": "ClientApplication/c1"},
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(m).expect("ProjectMembership")
}

/// Knobs of [`EffectiveInputs`] beyond the membership and the policies.
#[derive(Default)]
struct Opts<'a> {
    super_admin: bool,
    linked: &'a [String],
    scope: Option<&'a str>,
}

fn inputs<'a>(
    m: &'a ProjectMembership,
    store: &'a dyn PolicySource,
    opts: &Opts<'a>,
) -> EffectiveInputs<'a> {
    EffectiveInputs {
        membership: m,
        policies: store,
        project_id: "proj",
        project_super_admin: opts.super_admin,
        linked_projects: opts.linked,
        scope: opts.scope,
        patient_in_context: None,
    }
}

fn eff(m: &ProjectMembership, store: &dyn PolicySource, opts: &Opts<'_>) -> EffectivePolicy {
    let e = try_effective(&inputs(m, store, opts)).expect("effective policy");
    assert!(e.compile_errors().is_empty(), "{:?}", e.compile_errors());
    e
}

/// One line per entry: `Type`, then ` ro` when readonly, ` ?criteria`, ` [interactions]`.
fn summary(p: &AccessPolicy) -> Vec<String> {
    p.resource
        .iter()
        .map(|e| {
            let mut s = e.resource_type.clone();
            if e.readonly == Some(true) {
                s.push_str(" ro");
            }
            if let Some(c) = &e.criteria {
                s.push_str(&format!(" {c}"));
            }
            if let Some(i) = &e.interaction {
                s.push_str(&format!(" [{}]", i.join(",")));
            }
            s
        })
        .collect()
}

/// `(membership, stored policies, opts) → expected entry summary`.
fn check(m: &ProjectMembership, store: &dyn PolicySource, opts: &Opts<'_>, want: &[&str]) {
    let e = eff(m, store, opts);
    assert_eq!(summary(e.access_policy()), want);
}

/// Type-level table for a non-super-admin.
fn check_types(e: &EffectivePolicy, table: &[(&str, Interaction, bool)]) {
    for &(ty, i, want) in table {
        assert_eq!(e.type_allows(ty, i, e.is_super_admin()), want, "{ty} {i:?}");
    }
}

const RO: &str = "[search,read,history,vread]";

fn ap(id: &str) -> Value {
    json!({"reference": format!("AccessPolicy/{id}")})
}

// === steps 1–5 ===

#[test]
fn legacy_wildcard_when_no_policy() {
    let opts = Opts::default();
    let want = ["*", "SearchParameter ro", "StructureDefinition ro"];
    let none: Vec<AccessPolicy> = Vec::new();
    check(&membership(json!({})), &none, &opts, &want);
    // Case 68: `access: []` and no accessPolicy also gets `*`.
    check(&membership(json!({"access": []})), &none, &opts, &want);
    let e = eff(&membership(json!({})), &none, &opts);
    check_types(
        &e,
        &[
            ("Patient", Delete, true),
            ("SearchParameter", Search, true),
            // `*` comes first and covers SearchParameter too (the default entry is read-only,
            // but the first shallow match wins).
            ("SearchParameter", Update, true),
            ("ProjectMembership", Read, false),
        ],
    );
}

#[test]
fn case_58_and_68_empty_policies() {
    let store = policies(json!([
        {"resourceType": "AccessPolicy", "id": "empty"},
        {"resourceType": "AccessPolicy", "id": "none", "resource": []},
    ]));
    for id in ["empty", "none"] {
        let m = membership(json!({"accessPolicy": ap(id)}));
        let e = eff(&m, &store, &Opts::default());
        assert_eq!(
            summary(e.access_policy()),
            ["SearchParameter ro", "StructureDefinition ro"]
        );
        check_types(
            &e,
            &[
                ("Patient", Read, false),
                ("Patient", Search, false),
                ("StructureDefinition", Search, true),
                ("StructureDefinition", Read, true),
                ("StructureDefinition", Update, false),
                ("StructureDefinition", Delete, false),
            ],
        );
    }
}

#[test]
fn case_59_readonly_gets_interactions_and_defaults_respect_existing_entries() {
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "Patient", "readonly": true},
        {"resourceType": "StructureDefinition"},
        {"resourceType": "Task", "readonly": true, "interaction": ["read"]},
    ]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    check(
        &m,
        &store,
        &Opts::default(),
        &[
            &format!("Patient ro {RO}"),
            "StructureDefinition",
            "Task ro [read]",
            "SearchParameter ro",
        ],
    );
    let e = eff(&m, &store, &Opts::default());
    check_types(
        &e,
        &[
            ("Patient", Read, true),
            ("Patient", Update, false),
            ("Patient", Delete, false),
            ("StructureDefinition", Update, true),
            ("Task", Read, true),
            ("Task", Search, false),
        ],
    );
}

#[test]
fn sources_concatenate_in_order_with_based_on_compartment_and_ip_rules() {
    let store = policies(json!([
        {"id": "a", "compartment": {"reference": "Organization/A"},
         "resource": [{"resourceType": "Patient"}],
         "ipAccessRule": [{"value": "10.0.0.66", "action": "block"}]},
        {"id": "b", "resource": [{"resourceType": "Observation"}],
         "ipAccessRule": [{"value": "10.0.0.0/8", "action": "allow"}, {"value": "*", "action": "block"}]},
        {"id": "c", "compartment": {"reference": "Organization/C"},
         "resource": [{"resourceType": "Encounter"}]},
    ]));
    let m = membership(json!({
        "accessPolicy": ap("a"),
        "access": [{"policy": ap("b")}, {"policy": ap("c")}],
    }));
    let e = eff(&m, &store, &Opts::default());
    let p = e.access_policy();
    assert_eq!(p.resource_type, "AccessPolicy");
    assert_eq!(
        summary(p),
        [
            "Patient",
            "Observation",
            "Encounter",
            "SearchParameter ro",
            "StructureDefinition ro"
        ]
    );
    let based_on: Vec<&str> = p
        .based_on
        .iter()
        .filter_map(|r| r.reference.as_deref())
        .collect();
    assert_eq!(
        based_on,
        ["AccessPolicy/a", "AccessPolicy/b", "AccessPolicy/c"]
    );
    assert_eq!(
        e.compartment().and_then(|r| r.reference.as_deref()),
        Some("Organization/C")
    );
    // Creates are stamped with that compartment, whatever the client sent.
    for sent in [
        json!({"resourceType": "Encounter"}),
        json!({"resourceType": "Encounter", "meta": {"account": {"reference": "Organization/A"}, "tag": [{"code": "t"}]}}),
        json!({"resourceType": "Encounter", "meta": "garbage"}),
    ] {
        let mut stamped = sent.clone();
        e.stamp_account(&mut stamped);
        assert_eq!(
            stamped["meta"]["account"],
            json!({"reference": "Organization/C"}),
            "{sent}"
        );
        if sent["meta"]["tag"].is_array() {
            assert_eq!(
                stamped["meta"]["tag"], sent["meta"]["tag"],
                "other meta is kept"
            );
        }
    }
    let without = eff(
        &membership(json!({"access": [{"policy": ap("b")}]})),
        &store,
        &Opts::default(),
    );
    let mut untouched = json!({"resourceType": "Observation", "meta": {"account": {"reference": "Organization/X"}}});
    without.stamp_account(&mut untouched);
    assert_eq!(untouched["meta"]["account"]["reference"], "Organization/X");
    let ip = |s: &str| e.check_ip(s.parse().expect("ip"));
    assert_eq!(ip("10.0.0.66"), IpVerdict::Block { rule: 0 });
    assert_eq!(ip("10.1.2.3"), IpVerdict::Allow { rule: Some(1) });
    assert_eq!(ip("192.0.2.1"), IpVerdict::Block { rule: 2 });
    // The wire value serialises as /auth/me shows it.
    let wire = serde_json::to_value(p).expect("json");
    assert_eq!(wire["basedOn"][0]["reference"], "AccessPolicy/a");
    assert_eq!(wire["ipAccessRule"].as_array().map(Vec::len), Some(3));
}

#[test]
fn missing_or_malformed_policy_reference_fails_closed() {
    let store = policies(json!([{"id": "a", "resource": [{"resourceType": "*"}]}]));
    let opts = Opts::default();
    for (m, err) in [
        (
            membership(json!({"access": [{"policy": ap("a")}, {"policy": ap("gone")}]})),
            EffectiveError::PolicyNotFound("AccessPolicy/gone".into()),
        ),
        (
            membership(json!({"accessPolicy": {"reference": "Patient/a"}})),
            EffectiveError::BadPolicyReference("Patient/a".into()),
        ),
        (
            membership(json!({"accessPolicy": {"display": "no reference"}})),
            EffectiveError::BadPolicyReference(String::new()),
        ),
    ] {
        assert_eq!(
            try_effective(&inputs(&m, &store, &opts)).err(),
            Some(err.clone())
        );
        let e = effective(&inputs(&m, &store, &opts));
        assert_eq!(e.failure(), Some(&err));
        assert_eq!(e.access_policy().resource_type, "AccessPolicy");
        check_types(
            &e,
            &[
                ("Patient", Read, false),
                ("StructureDefinition", Read, false),
            ],
        );
        assert!(e.check_ip("10.0.0.1".parse().expect("ip")).is_allowed());
    }
}

#[test]
fn policy_sources_hashmap_and_slice() {
    let list = policies(json!([{"id": "a", "resource": [{"resourceType": "Patient"}]}]));
    let map: HashMap<String, Arc<AccessPolicy>> = list
        .iter()
        .map(|p| (p.id.clone().unwrap_or_default(), Arc::new(p.clone())))
        .collect();
    let plain: HashMap<String, AccessPolicy> = list
        .iter()
        .map(|p| (p.id.clone().unwrap_or_default(), p.clone()))
        .collect();
    let m = membership(json!({"accessPolicy": ap("a")}));
    for source in [&map as &dyn PolicySource, &plain, &list] {
        let e = effective(&EffectiveInputs {
            membership: &m,
            policies: source,
            project_id: "proj",
            project_super_admin: false,
            linked_projects: &[],
            scope: None,
            patient_in_context: None,
        });
        assert!(e.failure().is_none());
        check_types(&e, &[("Patient", Read, true)]);
    }
}

// === step 2: parameters ===

fn criteria_after(policy: Value, parameters: Value, profile: &str) -> Vec<String> {
    let policy: AccessPolicy = serde_json::from_value(policy).expect("policy");
    let parameters: Vec<AccessParameter> = serde_json::from_value(parameters).expect("params");
    let replaced =
        substitute_parameters(&policy, &parameters, &Reference::to(profile)).expect("substitution");
    replaced
        .resource
        .iter()
        .map(|e| e.criteria.clone().unwrap_or_default())
        .collect()
}

fn crit_policy(criteria: &[&str]) -> Value {
    let resource: Vec<Value> = criteria
        .iter()
        .map(|c| json!({"resourceType": c.split('?').next().unwrap_or("*"), "criteria": c}))
        .collect();
    json!({"resourceType": "AccessPolicy", "id": "p", "resource": resource})
}

#[test]
fn parameter_substitution() {
    let cases: &[(&[&str], Value, &str, &[&str])] = &[
        // valueString replaces %name.
        (
            &["Task?status=%status"],
            json!([{"name": "status", "valueString": "accepted"}]),
            "Practitioner/u1",
            &["Task?status=accepted"],
        ),
        // valueReference: %name.id → id, %name → reference.
        (
            &["Patient?_id=%patient.id", "Observation?subject=%patient"],
            json!([{"name": "patient", "valueReference": {"reference": "Patient/p1"}}]),
            "Practitioner/u1",
            &["Patient?_id=p1", "Observation?subject=Patient/p1"],
        ),
        // Built-ins: profile, and patient = profile when no patient parameter is given.
        (
            &[
                "Patient?general-practitioner=%profile",
                "Patient?_id=%patient.id",
                "Patient?x=%profile.id",
            ],
            json!([]),
            "Practitioner/pr1",
            &[
                "Patient?general-practitioner=Practitioner/pr1",
                "Patient?_id=pr1",
                "Patient?x=pr1",
            ],
        ),
        // An entry parameter named profile wins over the built-in.
        (
            &["Patient?general-practitioner=%profile"],
            json!([{"name": "profile", "valueReference": {"reference": "Practitioner/other"}}]),
            "Practitioner/pr1",
            &["Patient?general-practitioner=Practitioner/other"],
        ),
        // Longer names first: %patientX is not clobbered by %patient.
        (
            &["Patient?link=%patientX&_id=%patient.id"],
            json!([{"name": "patientX", "valueString": "Patient/x"},
                {"name": "patient", "valueReference": {"reference": "Patient/p1"}}]),
            "Practitioner/u1",
            &["Patient?link=Patient/x&_id=p1"],
        ),
        // Otherwise plain text: %patient also matches inside %patientX when patientX is unknown.
        (
            &["Patient?link=%patientX"],
            json!([]),
            "Patient/p1",
            &["Patient?link=Patient/p1X"],
        ),
        // Other names are not built-ins: left as they are.
        (
            &["Patient?organization=%organization"],
            json!([]),
            "Practitioner/u1",
            &["Patient?organization=%organization"],
        ),
        // An empty valueString falls through to the valueReference (Medplum: falsy string).
        (
            &["Task?owner=%who"],
            json!([{"name": "who", "valueString": "", "valueReference": {"reference": "Practitioner/w"}}]),
            "Practitioner/u1",
            &["Task?owner=Practitioner/w"],
        ),
        // A parameter without any value substitutes nothing, but still counts as given.
        (
            &["Patient?_id=%patient.id"],
            json!([{"name": "patient"}]),
            "Patient/me",
            &["Patient?_id=%patient.id"],
        ),
        // A reference without an id part: Medplum's resolveId gives "undefined".
        (
            &["Patient?_id=%patient.id"],
            json!([{"name": "patient", "valueReference": {"display": "none"}}]),
            "Practitioner/u1",
            &["Patient?_id=undefined"],
        ),
    ];
    for (criteria, params, profile, want) in cases {
        assert_eq!(
            criteria_after(crit_policy(criteria), params.clone(), profile),
            *want,
            "{criteria:?} {params}"
        );
    }
}

#[test]
fn parameter_values_cannot_change_the_policy_structure() {
    let p = json!({"resourceType": "AccessPolicy", "id": "p",
        "resource": [{"resourceType": "Task", "criteria": "Task?status=%status"}]});
    let got = criteria_after(
        p,
        json!([{"name": "status", "valueString": "x\",\"resourceType\":\"*"}]),
        "Practitioner/u1",
    );
    assert_eq!(got, ["Task?status=x\",\"resourceType\":\"*"]);
}

#[test]
fn case_63_parameterized_policy_granted_twice() {
    let store = policies(json!([
        {"id": "own", "resource": [{"resourceType": "Patient", "criteria": "Patient?_id=%patient.id"}]},
        {"id": "tasks", "resource": [{"resourceType": "Task", "criteria": "Task?status=%status"}]},
    ]));
    let patient = |id: &str| json!([{"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}]);
    let m = membership(json!({"access": [
        {"policy": ap("own"), "parameter": patient("p1")},
        {"policy": ap("own"), "parameter": patient("p2")},
        {"policy": ap("tasks"), "parameter": [{"name": "status", "valueString": "accepted"}]},
    ]}));
    let e = eff(&m, &store, &Opts::default());
    assert_eq!(
        summary(e.access_policy()),
        [
            "Patient Patient?_id=p1",
            "Patient Patient?_id=p2",
            "Task Task?status=accepted",
            "SearchParameter ro",
            "StructureDefinition ro",
        ]
    );
    let read = |r: Value| e.satisfied(&r, Read).map(|entry| entry.index);
    assert_eq!(
        read(json!({"resourceType": "Patient", "id": "p1"})),
        Some(0)
    );
    assert_eq!(
        read(json!({"resourceType": "Patient", "id": "p2"})),
        Some(1)
    );
    assert_eq!(read(json!({"resourceType": "Patient", "id": "p3"})), None);
    assert_eq!(
        read(json!({"resourceType": "Task", "id": "t1", "status": "accepted"})),
        Some(2)
    );
    assert_eq!(
        read(json!({"resourceType": "Task", "id": "t2", "status": "completed"})),
        None
    );
    match e.search_narrowing("Patient") {
        SearchNarrowing::AnyOf(list) => {
            let ids: Vec<&str> = list
                .iter()
                .map(|c| c.query_params()[0].value.as_str())
                .collect();
            assert_eq!(ids, ["p1", "p2"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn case_210_target_policy_uses_its_own_profile() {
    let store = policies(json!([{"id": "gp", "resource": [
        {"resourceType": "Patient", "criteria": "Patient?general-practitioner=%profile"}]}]));
    let mut m = membership(json!({"access": [{"policy": ap("gp")}]}));
    m.profile = Reference::to("Practitioner/pr1");
    let e = eff(&m, &store, &Opts::default());
    assert_eq!(
        summary(e.access_policy())[0],
        "Patient Patient?general-practitioner=Practitioner/pr1"
    );
    let p =
        |gp: &str| json!({"resourceType": "Patient", "generalPractitioner": [{"reference": gp}]});
    assert!(e.satisfied(&p("Practitioner/pr1"), Read).is_some());
    assert!(e.satisfied(&p("Practitioner/pr2"), Read).is_none());
}

// === step 6: SMART scopes ===

#[test]
fn smart_example_from_the_reference() {
    // §5: [SD readonly, SP readonly, *] ∩ `patient/Patient.rs patient/StructureDefinition.*
    // patient/Practitioner.rus` = [SD readonly, Patient readonly, SD, Practitioner].
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "StructureDefinition", "readonly": true},
        {"resourceType": "SearchParameter", "readonly": true},
        {"resourceType": "*"},
    ]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    let scope = "openid patient/Patient.rs patient/StructureDefinition.* patient/Practitioner.rus";
    let opts = Opts {
        scope: Some(scope),
        ..Opts::default()
    };
    check(
        &m,
        &store,
        &opts,
        &[
            &format!("StructureDefinition ro {RO}"),
            "Patient ro",
            "StructureDefinition",
            // Letters enforced: `rus` has no c or d.
            "Practitioner [read,vread,update,history,search]",
        ],
    );
    let e = eff(&m, &store, &opts);
    check_types(
        &e,
        &[
            ("Patient", Read, true),
            ("Patient", Search, true),
            ("Patient", Update, false),
            ("StructureDefinition", Update, true),
            ("SearchParameter", Read, false),
            ("Practitioner", Update, true),
            ("Practitioner", Create, false),
            ("Practitioner", Delete, false),
            ("Observation", Read, false),
        ],
    );
}

#[test]
fn smart_intersections_from_medplum_tests() {
    let opts = |scope| Opts {
        scope: Some(scope),
        ..Opts::default()
    };
    let three = policies(json!([{"id": "a", "resource": [
        {"resourceType": "Observation"}, {"resourceType": "Patient"}, {"resourceType": "VisionPrescription"},
    ]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    // No SMART resource scope: unchanged.
    check(
        &m,
        &three,
        &opts("openid profile offline_access"),
        &[
            "Observation",
            "Patient",
            "VisionPrescription",
            "SearchParameter ro",
            "StructureDefinition ro",
        ],
    );
    // Intersection keeps only covered types (defaults included).
    check(
        &m,
        &three,
        &opts("patient/Patient.cruds patient/ServiceRequest.cruds"),
        &["Patient"],
    );
    // A `*` entry becomes one entry per scope.
    let all = policies(json!([{"id": "a", "resource": [{"resourceType": "*"}]}]));
    check(
        &m,
        &all,
        &opts("patient/Patient.cruds patient/ServiceRequest.cruds"),
        &["Patient", "ServiceRequest"],
    );
    // A `*` scope covers every entry; exact scopes win over it.
    check(
        &m,
        &three,
        &opts("patient/*.rs patient/Patient.*"),
        &[
            "Observation ro",
            "Patient",
            "VisionPrescription ro",
            "SearchParameter ro",
            "StructureDefinition ro",
        ],
    );
    // `*` entry with a `*` scope stays `*`.
    check(
        &m,
        &all,
        &opts("system/*.rs"),
        &["* ro", "SearchParameter ro", "StructureDefinition ro"],
    );
    // Basic auth / no scope: no narrowing.
    check(
        &m,
        &all,
        &Opts::default(),
        &["*", "SearchParameter ro", "StructureDefinition ro"],
    );
}

#[test]
fn case_70_granular_criteria_are_appended() {
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "*", "criteria": "*?_compartment=Patient/X"},
        {"resourceType": "Condition", "criteria": "Condition?clinical-status=active"},
        {"resourceType": "Encounter", "criteria": "Encounter?"},
        {"resourceType": "Task", "criteria": "Task?status=ready&"},
        {"resourceType": "CarePlan"},
    ]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    let scope = "patient/Goal.rs?category=nursing patient/Condition.rs?category=problem-list-item \
                 patient/Encounter.rs?class=AMB patient/Task.rs?owner=Practitioner/1 \
                 patient/CarePlan.rs?intent=plan";
    let opts = Opts {
        scope: Some(scope),
        ..Opts::default()
    };
    check(
        &m,
        &store,
        &opts,
        &[
            // The `*` entry expands per scope, with `*` replaced by the scope's type.
            "Goal ro Goal?_compartment=Patient/X&category=nursing",
            "Condition ro Condition?_compartment=Patient/X&category=problem-list-item",
            "Encounter ro Encounter?_compartment=Patient/X&class=AMB",
            "Task ro Task?_compartment=Patient/X&owner=Practitioner/1",
            "CarePlan ro CarePlan?_compartment=Patient/X&intent=plan",
            "Condition ro Condition?clinical-status=active&category=problem-list-item",
            "Encounter ro Encounter?class=AMB",
            "Task ro Task?status=ready&owner=Practitioner/1",
            "CarePlan ro CarePlan?intent=plan",
        ],
    );
}

#[test]
fn case_191_scope_criteria_and_policy_criteria_combine() {
    let store = policies(json!([{"id": "obs", "resource": [
        {"resourceType": "Observation", "criteria": "Observation?subject=%patient"}]}]));
    let m = membership(json!({"access": [{"policy": ap("obs"), "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}}]}]}));
    let lab = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let scope = format!("openid patient/Observation.rs?category={lab}");
    let opts = Opts {
        scope: Some(&scope),
        ..Opts::default()
    };
    let want = format!("Observation ro Observation?subject=Patient/p1&category={lab}");
    check(&m, &store, &opts, &[&want]);
    let e = eff(&m, &store, &opts);
    let obs = |subject: &str, category: &str| {
        json!({"resourceType": "Observation", "status": "final",
            "subject": {"reference": subject},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}]})
    };
    assert!(
        e.satisfied(&obs("Patient/p1", "laboratory"), Search)
            .is_some()
    );
    assert!(
        e.satisfied(&obs("Patient/p1", "vital-signs"), Search)
            .is_none()
    );
    assert!(
        e.satisfied(&obs("Patient/p2", "laboratory"), Search)
            .is_none()
    );
    assert!(
        e.satisfied(&obs("Patient/p1", "laboratory"), Create)
            .is_none()
    );
}

#[test]
fn smart_letters_are_enforced() {
    let all = policies(json!([{"id": "a", "resource": [{"resourceType": "*"}]}]));
    let clinical = policies(json!([{"id": "a", "resource": [
        {"resourceType": "Patient"}, {"resourceType": "Observation"},
        {"resourceType": "Condition", "interaction": ["create"]},
    ]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    type TypeTable<'a> = &'a [(&'a str, Interaction, bool)];
    let cases: &[(&Vec<AccessPolicy>, &str, TypeTable<'_>)] = &[
        (
            &all,
            "patient/Observation.c",
            &[
                ("Observation", Create, true),
                ("Observation", Read, false),
                ("Observation", Search, false),
                ("Observation", Update, false),
            ],
        ),
        (
            &all,
            "patient/Observation.rs",
            &[
                ("Observation", Create, false),
                ("Observation", Read, true),
                ("Observation", Vread, true),
                ("Observation", History, true),
                ("Observation", Search, true),
            ],
        ),
        // Case 192: `.crs` grants create but not update.
        (
            &all,
            "openid system/Observation.crs",
            &[
                ("Observation", Update, false),
                ("Observation", Create, true),
                ("Observation", Read, true),
                ("Observation", Delete, false),
                ("Patient", Read, false),
            ],
        ),
        // Case 190: `patient/*.read` makes a writable policy read-only.
        (
            &clinical,
            "openid patient/*.read",
            &[
                ("Observation", Create, false),
                ("Observation", Read, true),
                ("Patient", Update, false),
                ("Patient", Search, true),
                // A create-only entry ∩ read letters grants nothing: dropped.
                ("Condition", Create, false),
                ("Condition", Read, false),
                ("StructureDefinition", Read, true),
            ],
        ),
        (
            &all,
            "user/Patient.r",
            &[("Patient", Read, true), ("Patient", Search, false)],
        ),
        (
            &all,
            "system/Patient.ud",
            &[
                ("Patient", Update, true),
                ("Patient", Delete, true),
                ("Patient", Read, false),
                ("Patient", Create, false),
            ],
        ),
        (
            &all,
            "user/*.cruds",
            &[
                ("Patient", Delete, true),
                ("Observation", Create, true),
                ("Project", Read, false),
            ],
        ),
    ];
    for (store, scope, table) in cases {
        let e = eff(
            &m,
            *store,
            &Opts {
                scope: Some(scope),
                ..Opts::default()
            },
        );
        for &(ty, i, want) in *table {
            assert_eq!(e.type_allows(ty, i, false), want, "{scope}: {ty} {i:?}");
        }
    }
    // The wire entries say what is enforced.
    check(
        &m,
        &all,
        &Opts {
            scope: Some("patient/Observation.c patient/Patient.r"),
            ..Opts::default()
        },
        &["Observation [create]", "Patient ro [read,vread,history]"],
    );
    check(
        &m,
        &clinical,
        &Opts {
            scope: Some("patient/*.read"),
            ..Opts::default()
        },
        &[
            "Patient ro",
            "Observation ro",
            "SearchParameter ro",
            "StructureDefinition ro",
        ],
    );
}

// === step 7: admins ===

#[test]
fn non_admins_never_get_admin_types() {
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "User"}, {"resourceType": "Project"}, {"resourceType": "*"},
        {"resourceType": "ProjectMembership"}, {"resourceType": "UserSecurityRequest"},
    ]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    check(
        &m,
        &store,
        &Opts::default(),
        &["*", "SearchParameter ro", "StructureDefinition ro"],
    );
    let e = eff(&m, &store, &Opts::default());
    for ty in [
        "User",
        "Project",
        "ProjectMembership",
        "UserSecurityRequest",
    ] {
        assert!(!e.type_allows(ty, Read, false), "{ty}");
    }
    assert!(!e.is_project_admin() && !e.is_super_admin());
}

#[test]
fn case_69_project_admin_entries() {
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "Patient"}, {"resourceType": "User"}]}]));
    let m = membership(json!({"accessPolicy": ap("a"), "admin": true}));
    let e = eff(&m, &store, &Opts::default());
    assert!(e.is_project_admin());
    assert_eq!(
        summary(e.access_policy()),
        [
            "Patient",
            "SearchParameter ro",
            "StructureDefinition ro",
            "Project Project?_id=proj",
            "ProjectMembership",
            "UserSecurityRequest ro",
            "User",
            "ClientApplication",
            "AccessPolicy",
            "AuditEvent ro",
        ]
    );
    let p = e.access_policy();
    assert_eq!(
        p.resource[3].readonly_fields,
        ["features", "link", "systemSetting"]
    );
    assert_eq!(
        p.resource[3].hidden_fields,
        ["superAdmin", "systemSecret", "strictMode"]
    );
    assert_eq!(p.resource[4].readonly_fields, ["project", "user"]);
    assert_eq!(p.resource[6].hidden_fields, ["passwordHash", "mfaSecret"]);
    assert_eq!(
        p.resource[6].readonly_fields,
        ["email", "emailVerified", "mfaEnrolled", "project"]
    );
    check_types(
        &e,
        &[
            ("Patient", Read, true),
            ("Project", Read, true),
            ("ProjectMembership", Read, true),
            ("ProjectMembership", Update, true),
            ("User", Search, true),
            ("UserSecurityRequest", Read, true),
            ("UserSecurityRequest", Update, false),
            ("Task", Read, false),
        ],
    );
    // Own project only; another project's id is outside the criteria (so creating one fails).
    let own = json!({"resourceType": "Project", "id": "proj", "superAdmin": false, "name": "P"});
    let other = json!({"resourceType": "Project", "id": "new-project", "name": "Q"});
    let entry = e.satisfied(&own, Read).expect("own project").clone();
    assert!(e.satisfied(&other, Create).is_none());
    let mut shown = own.clone();
    e.redact(&mut shown, &entry);
    assert_eq!(
        shown,
        json!({"resourceType": "Project", "id": "proj", "name": "P"})
    );
    // Setting Project.link is silently dropped.
    let mut update = json!({"resourceType": "Project", "id": "proj", "name": "P2",
        "link": [{"project": {"reference": "Project/x"}}]});
    e.restore_readonly(&mut update, Some(&own), &entry);
    assert_eq!(
        update,
        json!({"resourceType": "Project", "id": "proj", "name": "P2"})
    );
}

#[test]
fn project_admin_with_links_and_scopes() {
    let store = policies(json!([{"id": "a", "resource": [{"resourceType": "Patient"}]}]));
    let m = membership(json!({"accessPolicy": ap("a"), "admin": true}));
    let linked = ["l1".to_string(), "l2".to_string()];
    let e = eff(
        &m,
        &store,
        &Opts {
            linked: &linked,
            scope: Some("openid patient/Patient.rs"),
            ..Opts::default()
        },
    );
    // Scopes narrowed the policy, but never the admin entries added after them.
    assert_eq!(
        summary(e.access_policy()),
        [
            "Patient ro",
            "Project Project?_id=proj",
            "Project ro Project?_id=l1,l2",
            "ProjectMembership",
            "UserSecurityRequest ro",
            "User",
            "ClientApplication",
            "AccessPolicy",
            "AuditEvent ro",
        ]
    );
    assert_eq!(
        e.access_policy().resource[2].hidden_fields,
        [
            "superAdmin",
            "setting",
            "systemSetting",
            "secret",
            "systemSecret",
            "strictMode"
        ]
    );
    check_types(
        &e,
        &[
            ("Patient", Update, false),
            ("ProjectMembership", Update, true),
            ("User", Create, true),
        ],
    );
}

#[test]
fn super_admin_project_gets_admin_types() {
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "*"}, {"resourceType": "User", "readonly": true}]}]));
    let m = membership(json!({"accessPolicy": ap("a")}));
    let opts = Opts {
        super_admin: true,
        ..Opts::default()
    };
    check(
        &m,
        &store,
        &opts,
        &[
            "*",
            &format!("User ro {RO}"),
            "SearchParameter ro",
            "StructureDefinition ro",
            "UserSecurityRequest",
            "Project",
            "ProjectMembership",
            "ClientApplication",
            "AccessPolicy",
            "IdentityProvider",
            "DomainConfiguration",
            "JsonWebKey",
            "Login",
            "AuditEvent",
        ],
    );
    let e = eff(&m, &store, &opts);
    assert!(e.is_super_admin());
    check_types(
        &e,
        &[
            ("Project", Delete, true),
            ("User", Read, true),
            ("User", Update, false),
            ("Login", Read, true),
            ("JsonWebKey", Read, true),
        ],
    );
    assert!(
        e.satisfied(&json!({"resourceType": "Login", "id": "l"}), Read)
            .is_some()
    );
    // The same policy for a non-super-admin refuses protected types at instance level too.
    let plain = eff(&m, &store, &Opts::default());
    assert!(
        plain
            .satisfied(&json!({"resourceType": "Login", "id": "l"}), Read)
            .is_none()
    );
    assert!(!plain.type_allows("Login", Read, false));
}

// === IP rules through the effective policy (cases 200–202) ===

#[test]
fn cases_200_to_202_ip_rules() {
    let store = policies(json!([
        {"id": "clinic", "resource": [{"resourceType": "Patient"}], "ipAccessRule": [
            {"name": "Clinic LAN", "value": "10.20.0.0/16", "action": "allow"},
            {"name": "Everything else", "value": "*", "action": "block"}]},
        {"id": "vpn", "resource": [{"resourceType": "Patient"}], "ipAccessRule": [
            {"value": "10.1.", "action": "allow"}, {"value": "*", "action": "block"}]},
        {"id": "lan", "resource": [{"resourceType": "Patient"}], "ipAccessRule": [
            {"value": "10.0.0.66", "action": "block"}, {"value": "10.0.0.0/8", "action": "allow"},
            {"value": "*", "action": "block"}]},
    ]));
    for (policy, ip, allowed) in [
        ("clinic", "10.20.5.17", true),
        ("clinic", "10.21.5.17", false),
        ("vpn", "10.10.1.5", false),
        ("vpn", "10.1.1.5", true),
        ("lan", "10.0.0.66", false),
        ("lan", "10.0.0.67", true),
        ("lan", "::ffff:10.0.0.66", false),
    ] {
        let m = membership(json!({"access": [{"policy": ap(policy)}]}));
        let e = eff(&m, &store, &Opts::default());
        assert_eq!(
            e.check_ip(ip.parse().expect("ip")).is_allowed(),
            allowed,
            "{policy} {ip}"
        );
    }
}

#[test]
fn patient_scopes_reach_only_the_patient_in_context() {
    // Stricter than Medplum (SMART App Launch): a Patient's `patient/` scopes reach that patient
    // and its compartment, whatever the policy would allow.
    let store = policies(json!([{"id": "a", "resource": [
        {"resourceType": "*"},
        {"resourceType": "Observation", "criteria": "Observation?status=final"},
    ]}]));
    let patient = membership(json!({
        "accessPolicy": ap("a"),
        "user": {"reference": "User/u1"},
        "profile": {"reference": "Patient/p1"},
    }));
    let opts = |scope| Opts {
        scope: Some(scope),
        ..Opts::default()
    };
    check(
        &patient,
        &store,
        &opts("openid patient/*.rs"),
        &[
            "* ro *?_compartment=Patient/p1",
            "Observation ro Observation?status=final&_compartment=Patient/p1",
            "SearchParameter ro",
            "StructureDefinition ro",
        ],
    );
    check(
        &patient,
        &store,
        &opts("openid patient/Patient.rs patient/Observation.rs"),
        &[
            "Patient ro Patient?_id=p1",
            "Observation ro Observation?_compartment=Patient/p1",
            "Observation ro Observation?status=final&_compartment=Patient/p1",
        ],
    );
    let e = eff(&patient, &store, &opts("openid patient/*.rs"));
    let own = json!({"resourceType": "Patient", "id": "p1"});
    let other = json!({"resourceType": "Patient", "id": "p2"});
    let own_obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "subject": {"reference": "Patient/p1"}});
    let other_obs = json!({"resourceType": "Observation", "id": "o2", "status": "final",
        "subject": {"reference": "Patient/p2"}});
    assert!(e.satisfied(&own, Read).is_some());
    assert!(e.satisfied(&other, Read).is_none());
    assert!(e.satisfied(&own_obs, Read).is_some());
    assert!(e.satisfied(&other_obs, Read).is_none());
    // `user/` scopes, and callers that are not Patients, keep the policy's reach.
    let e = eff(&patient, &store, &opts("openid user/*.rs"));
    assert!(e.satisfied(&other, Read).is_some());
    let client = membership(json!({"accessPolicy": ap("a")}));
    let e = eff(&client, &store, &opts("openid patient/*.rs"));
    assert!(e.satisfied(&other, Read).is_some());
}
