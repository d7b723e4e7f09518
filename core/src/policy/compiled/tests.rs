use serde_json::{Value, json};

use super::*;
use crate::fhir::request::Interaction::{self, *};

fn policy(v: Value) -> AccessPolicy {
    serde_json::from_value(v).expect("AccessPolicy JSON")
}

/// Compiles `resources` (the `resource` array) and expects no error.
fn compile(resources: Value) -> CompiledPolicy {
    let (compiled, errors) = CompiledPolicy::compile(
        &policy(json!({"resourceType": "AccessPolicy", "resource": resources})),
        false,
    );
    assert!(errors.is_empty(), "{errors:?}");
    compiled
}

/// Type-level table: `(type, interaction, allowed)` for a non-super-admin.
fn check_types(compiled: &CompiledPolicy, table: &[(&str, Interaction, bool)]) {
    for &(ty, i, want) in table {
        assert_eq!(compiled.type_allows(ty, i, false), want, "{ty} {i:?}");
    }
}

const ALL_I: [Interaction; 7] = Interaction::ALL;

// === InteractionSet ===

#[test]
fn interaction_set_basics() {
    let s = InteractionSet::of(&[Read, Search]);
    assert!(s.contains(Read) && s.contains(Search) && !s.contains(Update));
    assert_eq!(s.codes(), vec!["read", "search"]);
    assert_eq!(InteractionSet::ALL.iter().count(), 7);
    assert!(InteractionSet::EMPTY.is_empty());
    assert_eq!(
        InteractionSet::READ_ONLY,
        InteractionSet::of(&[Read, Vread, History, Search])
    );
    assert_eq!(
        InteractionSet::ALL.intersection(InteractionSet::of(&[Create])),
        InteractionSet::of(&[Create])
    );
    let (set, unknown) = InteractionSet::from_codes(&["create", "patch", "read", "READ"]);
    assert_eq!(set, InteractionSet::of(&[Create, Read]));
    assert_eq!(unknown, vec!["patch", "READ"]);
}

#[test]
fn resource_type_lists() {
    assert!(
        crate::fhir::types::R4_RESOURCE_TYPES
            .windows(2)
            .all(|w| w[0] < w[1]),
        "sorted for binary_search"
    );
    for ty in [
        "Patient",
        "Binary",
        "VisionPrescription",
        "Project",
        "AccessPolicy",
        "Login",
    ] {
        assert!(is_known_resource_type(ty), "{ty}");
    }
    for ty in ["patient", "Patients", "", "*", "Resource", "DomainResource"] {
        assert!(!is_known_resource_type(ty), "{ty}");
    }
}

// === type-level (§4.3) ===

#[test]
fn case_58_empty_policy_forbids_everything() {
    let c = compile(json!([]));
    check_types(&c, &[("Patient", Read, false), ("Patient", Search, false)]);
    assert!(matches!(
        c.search_narrowing("Patient"),
        SearchNarrowing::Denied
    ));
}

#[test]
fn case_59_readonly_entry() {
    let c = compile(json!([{"resourceType": "Patient", "readonly": true}]));
    check_types(
        &c,
        &[
            ("Patient", Read, true),
            ("Patient", Vread, true),
            ("Patient", History, true),
            ("Patient", Search, true),
            ("Patient", Update, false),
            ("Patient", Delete, false),
            ("Patient", Create, false),
            ("Observation", Read, false),
        ],
    );
}

#[test]
fn case_66_interaction_list() {
    let c = compile(json!([{"resourceType": "Condition", "interaction": ["create", "read"]}]));
    check_types(
        &c,
        &[
            ("Condition", Create, true),
            ("Condition", Read, true),
            ("Condition", Search, false),
            ("Condition", History, false),
            ("Condition", Vread, false),
            ("Condition", Update, false),
            ("Condition", Delete, false),
        ],
    );
    // An explicit interaction list wins over readonly.
    let c = compile(json!([{"resourceType": "Task", "readonly": true, "interaction": ["update"]}]));
    check_types(&c, &[("Task", Update, true), ("Task", Read, false)]);
}

#[test]
fn wildcard_never_grants_admin_types_and_protected_need_super_admin() {
    let c = compile(json!([{"resourceType": "*"}]));
    for i in ALL_I {
        check_types(
            &c,
            &[
                ("Patient", i, true),
                ("Observation", i, true),
                ("AccessPolicy", i, false),
                ("ClientApplication", i, false),
                ("IdentityProvider", i, false),
                ("Project", i, false),
                ("ProjectMembership", i, false),
                ("User", i, false),
                ("UserSecurityRequest", i, false),
                ("Login", i, false),
                ("JsonWebKey", i, false),
                ("DomainConfiguration", i, false),
            ],
        );
        assert!(!c.type_allows("Login", i, true));
    }
    // Explicit entries do grant admin types; protected types stay refused without super admin.
    let c = compile(json!([{"resourceType": "User"}, {"resourceType": "Login"}]));
    check_types(&c, &[("User", Read, true), ("Login", Read, false)]);
    assert!(c.type_allows("Login", Read, true));
    assert_eq!(c.entries_for("Login", Read).count(), 0);
    let (sa, _) = CompiledPolicy::compile(
        &policy(json!({"resource": [{"resourceType": "Login"}]})),
        true,
    );
    assert_eq!(sa.entries_for("Login", Read).count(), 1);
    assert!(
        sa.satisfied(&json!({"resourceType": "Login", "id": "l"}), Read)
            .is_some()
    );
}

// === instance-level (§4.4) ===

#[test]
fn satisfied_is_first_shallow_match() {
    let c = compile(json!([
        {"resourceType": "Patient", "readonly": true, "hiddenFields": ["birthDate"]},
        {"resourceType": "Patient", "hiddenFields": ["name"]},
        {"resourceType": "*", "hiddenFields": ["text"]},
    ]));
    let p = json!({"resourceType": "Patient", "id": "p1"});
    let index = |i| c.satisfied(&p, i).map(|e| e.index);
    assert_eq!(index(Read), Some(0));
    assert_eq!(index(Search), Some(0));
    assert_eq!(index(Update), Some(1));
    assert_eq!(index(Create), Some(1));
    let o = json!({"resourceType": "Observation", "id": "o1"});
    assert_eq!(c.satisfied(&o, Delete).map(|e| e.index), Some(2));
    assert!(
        c.satisfied(&json!({"resourceType": "Project"}), Read)
            .is_none()
    );
    assert!(c.satisfied(&json!({"id": "x"}), Read).is_none());
    assert!(c.satisfied(&json!("Patient"), Read).is_none());
}

#[test]
fn deprecated_entry_compartment_needs_meta_compartment() {
    let c = compile(json!([
        {"resourceType": "Patient", "compartment": {"reference": "Organization/A"}},
    ]));
    let inside = json!({"resourceType": "Patient", "id": "p1",
        "meta": {"compartment": [{"reference": "Project/x"}, {"reference": "Organization/A"}]}});
    let outside = json!({"resourceType": "Patient", "id": "p2",
        "meta": {"compartment": [{"reference": "Organization/B"}]}});
    assert!(c.satisfied(&inside, Read).is_some());
    assert!(c.satisfied(&outside, Read).is_none());
    assert!(
        c.satisfied(&json!({"resourceType": "Patient"}), Read)
            .is_none()
    );
    // It narrows searches too (fail closed rather than unrestricted).
    match c.search_narrowing("Patient") {
        SearchNarrowing::AnyOf(list) => {
            assert_eq!(list.len(), 1);
            assert!(list[0].matches(&inside));
            assert!(!list[0].matches(&outside));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn binary_is_checked_like_any_resource() {
    // Medplum exempts Binary from criteria and compartments; a patient-compartment policy could
    // then read every Binary by id. Here it must satisfy the entry itself.
    let c = compile(json!([
        {"resourceType": "Binary", "compartment": {"reference": "Organization/A"}},
    ]));
    let bare = json!({"resourceType": "Binary", "id": "b1", "contentType": "text/plain"});
    assert!(c.satisfied(&bare, Read).is_none());
    let stamped = json!({"resourceType": "Binary", "id": "b2", "contentType": "text/plain",
        "meta": {"compartment": [{"reference": "Organization/A"}]}});
    assert!(c.satisfied(&stamped, Read).is_some());
    let open = compile(json!([{"resourceType": "Binary"}]));
    assert!(open.satisfied(&bare, Read).is_some());
}

#[test]
fn wildcard_never_grants_credential_types() {
    let c = compile(json!([{"resourceType": "*"}]));
    for ty in [
        "ClientApplication",
        "AccessPolicy",
        "IdentityProvider",
        "Project",
        "ProjectMembership",
        "User",
        "UserSecurityRequest",
        "Login",
        "JsonWebKey",
        "DomainConfiguration",
    ] {
        for i in [
            Read,
            Interaction::Search,
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ] {
            assert!(!c.type_allows(ty, i, true), "{ty} {i:?} granted by *");
        }
    }
    assert!(c.type_allows("Patient", Interaction::Update, false));
    let named = compile(json!([{"resourceType": "ClientApplication", "readonly": true}]));
    assert!(named.type_allows("ClientApplication", Read, false));
    assert!(!named.type_allows("ClientApplication", Interaction::Update, false));
}

// === search narrowing ===

#[test]
fn search_narrowing_union() {
    let c = compile(json!([
        {"resourceType": "Patient", "criteria": "Patient?_id=p1"},
        {"resourceType": "Patient", "criteria": "Patient?_id=p2", "readonly": true},
        {"resourceType": "Patient", "criteria": "Patient?_id=p3", "interaction": ["read"]},
        {"resourceType": "Observation", "criteria": "Observation?status=final"},
        {"resourceType": "Observation"},
        {"resourceType": "Task", "interaction": ["create"]},
        {"resourceType": "*", "criteria": "*?_compartment=Patient/p9"},
    ]));
    match c.search_narrowing("Patient") {
        SearchNarrowing::AnyOf(list) => {
            // p3's entry does not grant search; the `*` entry comes last, instantiated.
            assert_eq!(list.len(), 3);
            let ids: Vec<&str> = list[..2]
                .iter()
                .map(|c| c.query_params()[0].value.as_str())
                .collect();
            assert_eq!(ids, vec!["p1", "p2"]);
            assert_eq!(list[2].resource_type(), "Patient");
            assert!(list[2].matches(&json!({"resourceType": "Patient", "id": "p9"})));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.search_narrowing("Observation"),
        SearchNarrowing::Unrestricted
    ));
    match c.search_narrowing("Task") {
        // Only the `*` entry grants search on Task, instantiated for Task.
        SearchNarrowing::AnyOf(list) => {
            assert_eq!(list.len(), 1);
            assert_eq!(list[0].resource_type(), "Task");
            let task = |p: &str| json!({"resourceType": "Task", "meta": {"compartment": [{"reference": p}]}});
            assert!(list[0].matches(&task("Patient/p9")));
            assert!(!list[0].matches(&task("Patient/p8")));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.search_narrowing("Project"),
        SearchNarrowing::Denied
    ));
}

#[test]
fn wildcard_unrestricted_and_instance_checks() {
    let c = compile(json!([
        {"resourceType": "Patient", "criteria": "Patient?_id=p1"},
        {"resourceType": "Observation", "hiddenFields": ["note"]},
        {"resourceType": "Encounter", "readonlyFields": ["status"]},
        {"resourceType": "Goal", "writeConstraint": [
            {"language": "text/fhirpath", "expression": "status.exists()"}]},
        {"resourceType": "*", "readonly": true},
    ]));
    assert!(c.wildcard_unrestricted(Read));
    assert!(c.wildcard_unrestricted(Search));
    assert!(!c.wildcard_unrestricted(Create));
    for (ty, i, want) in [
        ("Patient", Read, true),
        ("Observation", Read, true),
        ("Encounter", Update, true),
        ("Goal", Create, true),
        ("Condition", Read, false),
        ("Condition", Update, true),
        ("Project", Read, true),
    ] {
        assert_eq!(c.instance_checks_needed(ty, i), want, "{ty} {i:?}");
    }
    let c = compile(json!([{"resourceType": "*", "criteria": "*?_compartment=Patient/p1"}]));
    assert!(!c.wildcard_unrestricted(Read));
}

// === fail closed ===

#[test]
fn broken_entry_grants_nothing_and_stops_the_walk() {
    let (c, errors) = CompiledPolicy::compile(
        &policy(json!({"resource": [
            {"resourceType": "Patient", "readonly": true},
            {"resourceType": "Patient", "criteria": "Observation?status=final",
             "hiddenFields": ["birthDate"]},
            {"resourceType": "Patient"},
            {"resourceType": "Observation", "criteria": "Observation?subject.name=x"},
            {"resourceType": "Observation"},
            {"resourceType": "Encounter", "hiddenFields": ["bad path"]},
            {"resourceType": "Goal", "writeConstraint": [{"expression": "true"}]},
            {"resourceType": "Task", "compartment": {"display": "no reference"}},
            {"resourceType": "Flag", "modifierExtension": [{"url": "x"}]},
        ]})),
        false,
    );
    assert_eq!(errors.len(), 6, "{errors:?}");
    assert!(matches!(
        errors[0],
        PolicyError::CriteriaPrefix { index: 1, .. }
    ));
    assert!(matches!(
        errors[1],
        PolicyError::ChainedParameter { index: 3, .. }
    ));
    assert!(matches!(errors[2], PolicyError::FieldPath { index: 5, .. }));
    assert!(matches!(
        errors[3],
        PolicyError::WriteConstraint {
            index: 6,
            constraint: 0
        }
    ));
    assert!(matches!(errors[4], PolicyError::Compartment { index: 7 }));
    assert!(matches!(
        errors[5],
        PolicyError::UnsupportedEntryElement { index: 8, .. }
    ));
    let broken: Vec<usize> = c
        .entries()
        .iter()
        .filter(|e| e.is_broken())
        .map(|e| e.index)
        .collect();
    assert_eq!(broken, vec![1, 3, 5, 6, 7, 8]);
    // Reads of Patient still come from entry 0, before the broken one.
    check_types(
        &c,
        &[
            ("Patient", Read, true),
            ("Patient", Update, false),
            ("Patient", Create, false),
            ("Observation", Read, false),
            ("Observation", Search, false),
            ("Encounter", Read, false),
            ("Goal", Create, false),
            ("Task", Read, false),
            ("Flag", Read, false),
        ],
    );
    let p = json!({"resourceType": "Patient", "id": "p1"});
    assert_eq!(c.satisfied(&p, Read).map(|e| e.index), Some(0));
    assert!(c.satisfied(&p, Update).is_none());
    assert!(matches!(
        c.search_narrowing("Patient"),
        SearchNarrowing::Unrestricted
    ));
    assert!(matches!(
        c.search_narrowing("Observation"),
        SearchNarrowing::Denied
    ));
    assert_eq!(c.entries_for("Patient", Update).count(), 0);
}

#[test]
fn broken_wildcard_entry_blocks_later_entries_of_every_type() {
    let (c, errors) = CompiledPolicy::compile(
        &policy(json!({"resource": [
            {"resourceType": "Patient", "readonly": true},
            {"resourceType": "*", "criteria": "Patient?_id=x"},
            {"resourceType": "Observation"},
        ]})),
        false,
    );
    assert_eq!(errors.len(), 1);
    check_types(
        &c,
        &[
            ("Patient", Read, true),
            ("Patient", Update, false),
            ("Observation", Read, false),
        ],
    );
    assert!(!c.wildcard_unrestricted(Read));
    // Admin types are not covered by `*`, so a broken `*` entry does not stop their walk.
    let (c, _) = CompiledPolicy::compile(
        &policy(json!({"resource": [
            {"resourceType": "*", "criteria": "oops"},
            {"resourceType": "User"},
        ]})),
        false,
    );
    check_types(&c, &[("User", Read, true), ("Patient", Read, false)]);
}

#[test]
fn unknown_interaction_codes_grant_nothing_extra() {
    let (c, errors) = CompiledPolicy::compile(
        &policy(
            json!({"resource": [{"resourceType": "Patient", "interaction": ["read", "patch"]}]}),
        ),
        false,
    );
    assert_eq!(
        errors,
        vec![PolicyError::UnknownInteraction {
            index: 0,
            code: "patch".into()
        }]
    );
    check_types(&c, &[("Patient", Read, true), ("Patient", Update, false)]);
}

#[test]
fn invalid_ip_rule_compiles_to_block_all() {
    let (c, errors) = CompiledPolicy::compile(
        &policy(
            json!({"resource": [{"resourceType": "*"}], "ipAccessRule": [
                {"value": "10.0.0.0/8", "action": "allow"},
                {"value": "not-an-ip", "action": "block"},
                {"value": "*", "action": "allow"},
            ]}),
        ),
        false,
    );
    assert_eq!(errors.len(), 1);
    assert!(matches!(&errors[0], PolicyError::IpRule { index: 1, .. }));
    assert!(c.check_ip("10.1.1.1".parse().expect("ip")).is_allowed());
    assert_eq!(
        c.check_ip("192.0.2.1".parse().expect("ip")),
        IpVerdict::Block { rule: 1 }
    );
}

// === hiddenFields ===

/// `(hidden paths, resource before, resource after)`.
fn check_redact(paths: &[&str], before: Value, after: Value) {
    let c = compile(json!([{"resourceType": "*", "hiddenFields": paths}]));
    let mut r = before;
    let entry = c.satisfied(&r, Read).expect("entry").clone();
    c.redact(&mut r, &entry);
    assert_eq!(r, after, "{paths:?}");
}

#[test]
fn hidden_fields_go_through_arrays() {
    check_redact(
        &["name.given", "identifier", "meta.tag"],
        json!({"resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "1", "tag": [{"code": "vip"}]},
            "identifier": [{"value": "MRN-1"}],
            "name": [{"family": "Nguyen", "given": ["Lan", "Thi"]}, {"given": ["L"], "use": "nickname"}]}),
        json!({"resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "1"},
            "name": [{"family": "Nguyen"}, {"use": "nickname"}]}),
    );
    // Deeper arrays, absent paths and non-object values are fine.
    check_redact(
        &[
            "contact.name.family",
            "address.line",
            "missing.path",
            "gender.x",
        ],
        json!({"resourceType": "Patient", "gender": "female",
            "contact": [{"name": {"family": "A", "given": ["B"]}}, {"name": {"family": "C"}}],
            "address": [{"line": ["1 Main"], "city": "X"}]}),
        json!({"resourceType": "Patient", "gender": "female",
            "contact": [{"name": {"given": ["B"]}}, {"name": {}}],
            "address": [{"city": "X"}]}),
    );
}

#[test]
fn hidden_fields_take_primitive_siblings_and_choice_types() {
    check_redact(
        &["birthDate", "deceased[x]"],
        json!({"resourceType": "Patient", "birthDate": "1984-03-12",
            "_birthDate": {"extension": [{"url": "x"}]},
            "deceasedBoolean": false, "deceasedish": 1, "active": true}),
        json!({"resourceType": "Patient", "deceasedish": 1, "active": true}),
    );
    check_redact(
        &["value[x]"],
        json!({"resourceType": "Observation", "valueQuantity": {"value": 1},
            "component": [{"valueString": "x"}], "valueSet": "also a value[x] key", "values": 1}),
        json!({"resourceType": "Observation", "component": [{"valueString": "x"}], "values": 1}),
    );
}

#[test]
fn field_paths_parse() {
    for ok in [
        "name",
        "name.given",
        "meta.tag",
        "value[x]",
        "_birthDate",
        "a1.b_2",
    ] {
        assert!(FieldPath::parse(ok).is_some(), "{ok}");
    }
    for bad in [
        "",
        ".",
        "name.",
        ".name",
        "name..given",
        "na me",
        "1abc",
        "a[x][x]",
        "a/b",
        "[x]",
    ] {
        assert!(FieldPath::parse(bad).is_none(), "{bad:?}");
    }
    let p = FieldPath::parse("component.value[x]").expect("path");
    assert_eq!(p.segments(), vec!["component", "value[x]"]);
    assert_eq!(p.as_str(), "component.value[x]");
}

// === readonlyFields ===

/// `(readonly paths, old (None = create), new, expected new)`.
fn check_restore(paths: &[&str], old: Option<Value>, new: Value, want: Value) {
    let c = compile(json!([{"resourceType": "*", "readonlyFields": paths}]));
    let mut r = new;
    let entry = c.satisfied(&r, Update).expect("entry").clone();
    c.restore_readonly(&mut r, old.as_ref(), &entry);
    assert_eq!(r, want, "{paths:?}");
}

#[test]
fn readonly_fields_are_restored_from_the_old_version() {
    // Case 64: a changed name is saved with the old name; other changes are kept.
    check_restore(
        &["name"],
        Some(
            json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Old"}], "gender": "male"}),
        ),
        json!({"resourceType": "Patient", "id": "p", "name": [{"family": "New"}], "gender": "female"}),
        json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Old"}], "gender": "female"}),
    );
    // Adding a readonly field in an update: dropped. Removing one: put back.
    check_restore(
        &["identifier", "birthDate"],
        Some(
            json!({"resourceType": "Patient", "birthDate": "1980-01-01", "_birthDate": {"id": "b"}}),
        ),
        json!({"resourceType": "Patient", "identifier": [{"value": "x"}], "_birthDate": {"id": "c"}}),
        json!({"resourceType": "Patient", "_birthDate": {"id": "b"}, "birthDate": "1980-01-01"}),
    );
}

#[test]
fn readonly_fields_are_removed_on_create() {
    check_restore(
        &["identifier", "meta.tag", "name.given"],
        None,
        json!({"resourceType": "Patient", "identifier": [{"value": "x"}],
            "meta": {"tag": [{"code": "t"}], "profile": ["p"]},
            "name": [{"family": "F", "given": ["G"]}]}),
        json!({"resourceType": "Patient", "meta": {"profile": ["p"]}, "name": [{"family": "F"}]}),
    );
}

#[test]
fn readonly_nested_paths() {
    // Through objects: only the leaf is restored.
    check_restore(
        &["meta.security"],
        Some(
            json!({"resourceType": "Patient", "meta": {"security": [{"code": "R"}], "tag": [{"code": "a"}]}}),
        ),
        json!({"resourceType": "Patient", "meta": {"security": [], "tag": [{"code": "b"}]}}),
        json!({"resourceType": "Patient", "meta": {"security": [{"code": "R"}], "tag": [{"code": "b"}]}}),
    );
    // A missing intermediate object is recreated with only the restored leaf.
    check_restore(
        &["meta.security"],
        Some(
            json!({"resourceType": "Patient", "meta": {"security": [{"code": "R"}], "tag": [{"code": "a"}]}}),
        ),
        json!({"resourceType": "Patient"}),
        json!({"resourceType": "Patient", "meta": {"security": [{"code": "R"}]}}),
    );
    // Through an array: the whole array comes back from the old version.
    check_restore(
        &["name.given"],
        Some(json!({"resourceType": "Patient", "name": [{"family": "A", "given": ["G"]}]})),
        json!({"resourceType": "Patient", "name": [{"family": "B", "given": ["H"]}, {"family": "C"}]}),
        json!({"resourceType": "Patient", "name": [{"family": "A", "given": ["G"]}]}),
    );
    // The old version lacks the subtree: nothing under the path may be written.
    check_restore(
        &["name.given"],
        Some(json!({"resourceType": "Patient"})),
        json!({"resourceType": "Patient", "name": [{"family": "B", "given": ["H"]}]}),
        json!({"resourceType": "Patient", "name": [{"family": "B"}]}),
    );
    // Choice elements are restored wholesale.
    check_restore(
        &["value[x]"],
        Some(json!({"resourceType": "Observation", "valueQuantity": {"value": 1}})),
        json!({"resourceType": "Observation", "valueString": "x", "status": "final"}),
        json!({"resourceType": "Observation", "status": "final", "valueQuantity": {"value": 1}}),
    );
}

#[test]
fn case_69_project_admin_hidden_and_readonly_fields() {
    let c = compile(json!([{
        "resourceType": "Project",
        "readonlyFields": ["features", "link", "systemSetting"],
        "hiddenFields": ["superAdmin", "systemSecret", "strictMode"],
    }]));
    let mut read = json!({"resourceType": "Project", "id": "pr", "name": "P",
        "superAdmin": false, "strictMode": true, "systemSecret": [{"name": "k"}]});
    let entry = c.satisfied(&read, Read).expect("entry").clone();
    c.redact(&mut read, &entry);
    assert_eq!(
        read,
        json!({"resourceType": "Project", "id": "pr", "name": "P"})
    );
    let old = json!({"resourceType": "Project", "id": "pr", "name": "P", "features": ["bots"]});
    let mut new = json!({"resourceType": "Project", "id": "pr", "name": "Q",
        "features": ["bots", "cron"], "link": [{"project": {"reference": "Project/x"}}]});
    c.restore_readonly(&mut new, Some(&old), &entry);
    assert_eq!(
        new,
        json!({"resourceType": "Project", "id": "pr", "name": "Q", "features": ["bots"]})
    );
}

// === save-time validation ===

fn validate(v: Value) -> Vec<PolicyError> {
    validate_policy(&policy(v)).err().unwrap_or_default()
}

#[test]
fn valid_policies_pass() {
    for v in [
        json!({"resourceType": "AccessPolicy"}),
        json!({"resourceType": "AccessPolicy", "id": "a", "name": "n", "meta": {"versionId": "1"},
        "resource": [
            {"resourceType": "Patient", "criteria": "Patient?_id=%patient.id"},
            {"resourceType": "Observation", "criteria": "Observation?subject=%patient&status=final"},
            {"resourceType": "Task", "criteria": "Task?status=%status", "readonly": true},
            {"resourceType": "*", "criteria": "*?_compartment=%organization"},
            {"resourceType": "Condition", "interaction": ["create", "read"],
             "hiddenFields": ["note", "meta.tag"], "readonlyFields": ["value[x]"],
             "writeConstraint": [{"language": "text/fhirpath", "expression": "status.exists()"}]},
            {"resourceType": "Binary", "compartment": {"reference": "Organization/A"}},
            {"resourceType": "Project"},
            {"resourceType": "Bundle", "interaction": ["create"], "fhirgateOperation": ["process-message"]},
            {"resourceType": "Bot", "interaction": ["create"], "fhirgateOperation": ["execute", "my_op-2"]},
        ],
        "ipAccessRule": [
            {"name": "lan", "value": "10.0.0.0/8", "action": "allow"},
            {"value": "8.8.", "action": "allow"},
            {"value": "*", "action": "block"},
        ]}),
    ] {
        assert_eq!(validate(v.clone()), vec![], "{v}");
    }
}

#[test]
fn invalid_policies_are_refused_with_every_reason() {
    let errors = validate(json!({"resourceType": "Patient", "bogus": 1, "resource": [
        {"resourceType": "Patinet"},
        {"resourceType": "Patient", "interaction": ["read", "write"]},
        {"resourceType": "Patient", "criteria": "Observation?status=final"},
        {"resourceType": "Patient", "criteria": "general-practitioner=x"},
        {"resourceType": "*", "criteria": "Patient?_id=1"},
        {"resourceType": "Patient", "criteria": "Patient?general-practitioner.name=x"},
        {"resourceType": "Patient", "criteria": "Patient?_has:Observation:subject:code=x"},
        {"resourceType": "Patient", "criteria": "Patient?%name=x"},
        {"resourceType": "Patient", "writeConstraint": [{"expression": "true"}]},
        {"resourceType": "Patient", "writeConstraint": [{"language": "text/cql", "expression": "true"}]},
        {"resourceType": "Patient", "writeConstraint": [{"language": "text/fhirpath"}]},
        {"resourceType": "Patient", "hiddenFields": ["name..given"]},
        {"resourceType": "Patient", "readonlyFields": [""]},
        {"resourceType": "Patient", "compartment": {}},
        {"resourceType": "Patient", "unknownThing": true},
        {"resourceType": "Bundle", "fhirgateOperation": "process-message"},
        {"resourceType": "Bundle", "fhirgateOperation": ["$process-message"]},
        {"resourceType": "Bundle", "fhirgateOperation": []},
        {"resourceType": "Bundle", "fhirgateOperation": ["ok", 7]},
    ], "ipAccessRule": [
        {"value": "10.0.0.0/40", "action": "allow"},
        {"value": "*", "action": "deny"},
    ]}));
    let want: Vec<&str> = vec![
        "NotAccessPolicy",
        "UnsupportedPolicyElement",
        "UnknownResourceType 0",
        "UnknownInteraction 1",
        "CriteriaPrefix 2",
        "CriteriaPrefix 3",
        "CriteriaPrefix 4",
        "ChainedParameter 5",
        "ChainedParameter 6",
        "ParameterName 7",
        "WriteConstraint 8",
        "WriteConstraint 9",
        "WriteConstraint 10",
        "FieldPath 11",
        "FieldPath 12",
        "Compartment 13",
        "UnsupportedEntryElement 14",
        "OperationGrant 15",
        "OperationGrant 16",
        "OperationGrant 17",
        "OperationGrant 18",
        "IpRule 0 IpValue",
        "IpRule 1 IpAction",
    ];
    let got: Vec<String> = errors.iter().map(label).collect();
    assert_eq!(got, want);
    // Messages name the rule for people.
    assert!(errors[4].to_string().contains("axp-3"));
    assert!(errors[10].to_string().contains("axp-1"));
}

fn label(e: &PolicyError) -> String {
    match e {
        PolicyError::NotAccessPolicy => "NotAccessPolicy".into(),
        PolicyError::UnsupportedPolicyElement { .. } => "UnsupportedPolicyElement".into(),
        PolicyError::UnknownResourceType { index, .. } => format!("UnknownResourceType {index}"),
        PolicyError::UnsupportedEntryElement { index, .. } => {
            format!("UnsupportedEntryElement {index}")
        }
        PolicyError::UnknownInteraction { index, .. } => format!("UnknownInteraction {index}"),
        PolicyError::CriteriaPrefix { index, .. } => format!("CriteriaPrefix {index}"),
        PolicyError::ChainedParameter { index, .. } => format!("ChainedParameter {index}"),
        PolicyError::ParameterName { index, .. } => format!("ParameterName {index}"),
        PolicyError::Criteria { index, .. } => format!("Criteria {index}"),
        PolicyError::FieldPath { index, .. } => format!("FieldPath {index}"),
        PolicyError::WriteConstraint { index, .. } => format!("WriteConstraint {index}"),
        PolicyError::Compartment { index } => format!("Compartment {index}"),
        PolicyError::OperationGrant { index } => format!("OperationGrant {index}"),
        PolicyError::IpValue { .. } => "IpValue".into(),
        PolicyError::IpAction { .. } => "IpAction".into(),
        PolicyError::IpRule { index, source } => format!("IpRule {index} {}", label(source)),
    }
}

#[test]
fn validation_checks_parameter_names_behind_placeholders() {
    let bad = |criteria: &str| {
        let rt = criteria.split('?').next().unwrap_or_default();
        validate(json!({"resource": [{"resourceType": rt, "criteria": criteria}]}))
    };
    // Unknown parameters are refused whether or not the value is a placeholder.
    for criteria in [
        "Patient?nonsense=x",
        "Patient?nonsense=%patient",
        "*?nonsense=%x",
    ] {
        let errors = bad(criteria);
        assert!(
            matches!(errors.as_slice(), [PolicyError::Criteria { index: 0, .. }]),
            "{criteria}: {errors:?}"
        );
    }
    // Known parameters with placeholder values pass, alone or next to plain ones.
    for criteria in [
        "Patient?_id=%patient.id",
        "Observation?subject=%patient&status=final",
        "Observation?date=ge%start",
        "Patient?general-practitioner=%profile",
        "Task?owner=%profile&status=%status",
    ] {
        assert_eq!(bad(criteria), vec![], "{criteria}");
    }
    // A plain value is still checked next to a placeholder one.
    let errors = bad("Observation?subject=%patient&nonsense=1");
    assert!(
        matches!(errors.as_slice(), [PolicyError::Criteria { .. }]),
        "{errors:?}"
    );
}

// === direct reads that can stream ===

#[test]
fn read_needs_check_only_when_the_body_could_change_the_answer() {
    let c = compile(json!([
        {"resourceType": "Patient", "criteria": "Patient?_id=p1,p2", "readonlyFields": ["identifier"]},
        {"resourceType": "Observation", "criteria": "Observation?subject=Patient/p1"},
        {"resourceType": "Encounter", "hiddenFields": ["note"]},
        {"resourceType": "Encounter", "criteria": "Encounter?_id=e1"},
        {"resourceType": "Condition", "criteria": "Condition?_id=c1&clinical-status=active"},
        {"resourceType": "Goal", "criteria": "Goal?_id:not=g1"},
        {"resourceType": "Goal", "criteria": "Goal?_id=g2"},
        {"resourceType": "CarePlan", "criteria": "CarePlan?subject=Patient/p1"},
        {"resourceType": "CarePlan", "criteria": "CarePlan?_id=cp1"},
        {"resourceType": "Device"},
        {"resourceType": "*", "criteria": "*?_id=x1"},
    ]));
    for (ty, id, want) in [
        // pinned by `_id`, readonlyFields do not matter for a read
        ("Patient", "p1", false),
        ("Patient", "p2", false),
        // not in the list: only the body can tell (it will be refused, 404)
        ("Patient", "p3", true),
        ("Patient", "P1", true),
        ("Observation", "o1", true),
        // hiddenFields on the first entry: redaction needs the body
        ("Encounter", "e1", true),
        // `_id` with another filter, or with a modifier
        ("Condition", "c1", true),
        ("Goal", "g1", true),
        // a later pinning entry after one that may or may not match, neither hiding anything
        ("Goal", "g2", false),
        ("CarePlan", "cp1", false),
        ("CarePlan", "cp2", true),
        // no criteria at all
        ("Device", "d1", false),
        // `*?_id=` is not trusted to pin
        ("Medication", "x1", true),
    ] {
        assert_eq!(c.read_needs_check(ty, id), want, "{ty}/{id}");
    }
}

#[test]
fn read_needs_check_when_a_broken_entry_stops_the_walk() {
    let (c, errors) = CompiledPolicy::compile(
        &policy(json!({"resourceType": "AccessPolicy", "resource": [
            {"resourceType": "Patient", "criteria": "Patient?no-such-param=1"},
            {"resourceType": "Patient", "criteria": "Patient?_id=p1"},
        ]})),
        false,
    );
    assert!(!errors.is_empty());
    assert!(c.read_needs_check("Patient", "p1"));
}

#[test]
fn graphql_needs_a_name_an_unrestricted_wildcard_and_nothing_hidden() {
    let graphql = |resources: Value| compile(resources).allows_graphql();
    assert!(graphql(
        json!([{"resourceType": "*", "fhirgateOperation": ["graphql"]}])
    ));
    assert!(graphql(json!([
        {"resourceType": "Patient", "interaction": ["read"], "fhirgateOperation": ["graphql"]},
        {"resourceType": "*"}
    ])));
    // Not named; named but the wildcard has criteria or is read-only without search; a hidden field.
    assert!(!graphql(json!([{"resourceType": "*"}])));
    assert!(!graphql(
        json!([{"resourceType": "*", "criteria": "*?_compartment=Patient/p1", "fhirgateOperation": ["graphql"]}])
    ));
    assert!(!graphql(
        json!([{"resourceType": "*", "interaction": ["read"], "fhirgateOperation": ["graphql"]}])
    ));
    assert!(!graphql(json!([
        {"resourceType": "Patient", "hiddenFields": ["birthDate"]},
        {"resourceType": "*", "fhirgateOperation": ["graphql"]}
    ])));
    assert!(!graphql(
        json!([{"resourceType": "Patient", "fhirgateOperation": ["graphql"]}])
    ));
}
