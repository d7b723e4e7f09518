use serde_json::json;

use super::*;
use crate::fhir::classify::classify;
use crate::fhir::request::RequestParts;

fn policy(resources: serde_json::Value) -> EffectivePolicy {
    let ap = serde_json::from_value(json!({"resourceType": "AccessPolicy", "resource": resources}))
        .expect("policy");
    EffectivePolicy::from_access_policy(ap, false, false)
}

fn decide_get(policy: &EffectivePolicy, path_and_query: &str) -> Decision {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let parts = RequestParts {
        method: "GET",
        path,
        query,
        headers: &[],
        body: None,
    };
    decide(policy, &classify(&parts).expect("classifies"), false)
}

fn denied_with(d: Decision) -> &'static str {
    match d {
        Decision::Deny(d) => d.label(),
        Decision::Allow(p) => panic!("allowed: {p:?}"),
    }
}

#[test]
fn has_and_chains_need_an_open_target() {
    let narrowed = policy(json!([
        {"resourceType": "Patient"},
        {"resourceType": "Observation", "criteria": "Observation?subject=Patient/p1"},
    ]));
    // Which patients have an Observation with this code: only p1's Observations are visible.
    let has = "Patient?_has:Observation:subject:code=1234-5";
    assert_eq!(
        denied_with(decide_get(&narrowed, has)),
        "search_target_restricted"
    );
    let chain = "Observation?subject:Patient.name=Okafor";
    assert!(matches!(decide_get(&narrowed, chain), Decision::Allow(_)));
    let reverse = policy(json!([
        {"resourceType": "Patient", "criteria": "Patient?_id=p1"},
        {"resourceType": "Observation"},
    ]));
    assert_eq!(
        denied_with(decide_get(&reverse, chain)),
        "search_target_restricted"
    );
    // An untyped chain reaches a narrowed Patient through the wildcard.
    let wildcard = policy(json!([
        {"resourceType": "Patient", "criteria": "Patient?_id=p1"},
        {"resourceType": "*"},
    ]));
    let untyped = "Observation?subject.name=Okafor";
    assert_eq!(
        denied_with(decide_get(&wildcard, untyped)),
        "search_target_restricted"
    );
    assert_eq!(
        denied_with(decide_get(&reverse, "Observation?_list=l1")),
        "type_interaction"
    );
    let open = policy(json!([{"resourceType": "*"}]));
    assert!(matches!(decide_get(&open, has), Decision::Allow(_)));
    assert!(matches!(decide_get(&open, untyped), Decision::Allow(_)));
}

#[test]
fn hidden_fields_cannot_be_searched_or_sorted() {
    let masked = policy(json!([
        {"resourceType": "Patient", "hiddenFields": ["birthDate", "telecom"]},
    ]));
    for q in [
        "Patient?birthdate=1984-03-12",
        "Patient?birthdate=lt1990",
        "Patient?_sort=birthdate",
        "Patient?_sort=-birthdate",
        "Patient?email=a@example.org",
        "Patient?phone=555",
        "Patient?_content=1984",
    ] {
        assert_eq!(
            denied_with(decide_get(&masked, q)),
            "search_hidden_field",
            "{q}"
        );
    }
    for q in [
        "Patient?name=Nguyen",
        "Patient?_sort=family",
        "Patient?gender=female&_count=5",
    ] {
        assert!(matches!(decide_get(&masked, q), Decision::Allow(_)), "{q}");
    }
}

#[test]
fn instance_everything_checks_the_instance_first() {
    let narrowed = policy(json!([{"resourceType": "Patient", "criteria": "Patient?_id=p1"}]));
    match decide_get(&narrowed, "Patient/p2/$everything") {
        Decision::Allow(p) => assert!(p.guard_current),
        other => panic!("{other:?}"),
    }
    let open = policy(json!([{"resourceType": "Patient"}]));
    match decide_get(&open, "Patient/p2/$everything") {
        Decision::Allow(p) => assert!(!p.guard_current),
        other => panic!("{other:?}"),
    }
}

#[test]
fn conditional_references_need_an_open_target() {
    let body = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
        "subject":{"reference":"Patient?identifier=MRN-1002"}}"#;
    let parts = RequestParts {
        method: "POST",
        path: "Observation",
        query: None,
        headers: &[("content-type", "application/fhir+json")],
        body: Some(body),
    };
    let request = classify(&parts).expect("classifies");
    let narrowed = policy(json!([
        {"resourceType": "Observation"},
        {"resourceType": "Patient", "criteria": "Patient?_id=p1"},
    ]));
    assert_eq!(
        denied_with(decide(&narrowed, &request, false)),
        "conditional_reference"
    );
    let open = policy(json!([{"resourceType": "Observation"}, {"resourceType": "Patient"}]));
    assert!(matches!(decide(&open, &request, false), Decision::Allow(_)));
    assert_eq!(
        conditional_reference_targets(
            &json!({"a": [{"reference": "?x=1"}, {"reference": "Patient/p1"}]})
        ),
        vec!["*".to_string()]
    );
}

#[test]
fn an_isolated_project_is_narrowed_and_checked() {
    use crate::policy::isolation::Isolation;
    let open = |iso: Isolation| policy(json!([{"resourceType": "*"}])).with_isolation(iso);
    let a = open(Isolation::Tag {
        project: "a".into(),
    });
    match decide_get(&a, "Patient?name=x") {
        Decision::Allow(p) => {
            assert_eq!(p.narrowing.len(), 1);
            assert_eq!(p.narrowing[0].name, "_tag");
            assert!(!p.drop_total);
        }
        other => panic!("{other:?}"),
    }
    match decide_get(&a, "Patient/p1") {
        Decision::Allow(p) => assert_eq!(p.response, ResponseNeed::CheckResource),
        other => panic!("{other:?}"),
    }
    match decide_get(&a, "Patient/p1/_history") {
        Decision::Allow(p) => assert!(p.guard_current),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        denied_with(decide_get(&a, "Patient?_has:Observation:subject:code=x")),
        "search_target_restricted"
    );
    assert_eq!(
        denied_with(decide_get(&a, "Observation?subject:Patient.name=x")),
        "search_target_restricted"
    );
    assert_eq!(
        denied_with(decide_get(&a, "Patient/p1/$validate")),
        "operation_isolated"
    );
    let default = open(Isolation::Unmarked {
        project: "d".into(),
    });
    match decide_get(&default, "Patient?name=x") {
        Decision::Allow(p) => assert!(p.narrowing.is_empty() && p.drop_total),
        other => panic!("{other:?}"),
    }
    let whole = open(Isolation::None);
    match decide_get(&whole, "Patient/p1") {
        Decision::Allow(p) => assert_eq!(p.response, ResponseNeed::Untouched),
        other => panic!("{other:?}"),
    }
    let b = json!({"resourceType": "Patient", "id": "p1",
        "meta": {"tag": [{"system": crate::policy::isolation::PROJECT_TAG_SYSTEM, "code": "b"}]}});
    assert!(a.satisfied(&b, Interaction::Read).is_none());
    assert!(default.satisfied(&b, Interaction::Read).is_none());
    assert!(whole.satisfied(&b, Interaction::Read).is_some());
    // Identity resources live in fhirgate's store: isolation does not apply to them.
    let admin =
        policy(json!([{"resourceType": "ClientApplication"}])).with_isolation(Isolation::Tag {
            project: "a".into(),
        });
    assert!(
        admin
            .satisfied(
                &json!({"resourceType": "ClientApplication", "id": "c"}),
                Interaction::Read
            )
            .is_some()
    );
}

#[test]
fn an_isolated_write_is_stamped_and_cannot_take_another_projects_resource() {
    use crate::policy::isolation::{Isolation, PROJECT_TAG_SYSTEM};
    let a = policy(json!([{"resourceType": "*"}])).with_isolation(Isolation::Tag {
        project: "a".into(),
    });
    let mut new = json!({"resourceType": "Patient",
        "meta": {"tag": [{"system": PROJECT_TAG_SYSTEM, "code": "b"}]}});
    assert_eq!(a.check_create(&mut new), Ok(()));
    assert_eq!(
        new["meta"]["tag"],
        json!([{"system": PROJECT_TAG_SYSTEM, "code": "a"}])
    );
    let theirs = json!({"resourceType": "Patient", "id": "p1",
        "meta": {"tag": [{"system": PROJECT_TAG_SYSTEM, "code": "b"}]}});
    let mut update = json!({"resourceType": "Patient", "id": "p1"});
    assert!(a.check_write(&mut update, Some(&theirs)).is_err());
    let ours = json!({"resourceType": "Patient", "id": "p1",
        "meta": {"tag": [{"system": PROJECT_TAG_SYSTEM, "code": "a"}]}});
    let mut untag = json!({"resourceType": "Patient", "id": "p1", "meta": {"tag": []}});
    assert_eq!(a.check_write(&mut untag, Some(&ours)), Ok(()));
    assert_eq!(
        untag["meta"]["tag"],
        json!([{"system": PROJECT_TAG_SYSTEM, "code": "a"}])
    );
}

#[test]
fn a_page_of_an_earlier_search_is_checked_resource_by_resource() {
    // The seal was checked by the gateway; the page itself is never trusted: every resource is
    // filtered, nothing is added upstream and the total is dropped.
    let narrowed = policy(json!([{"resourceType": "Patient", "criteria": "Patient?gender=male"}]));
    match decide_get(
        &narrowed,
        "?_getpages=h1&_getpagesoffset=2&_fhirgate_seal=s",
    ) {
        Decision::Allow(p) => {
            assert_eq!(p.response, ResponseNeed::FilterResources);
            assert!(p.drop_total);
            assert!(p.narrowing.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_upstream_without_contains_gets_no_contains_and_every_resource_is_checked() {
    let narrowed =
        policy(json!([{"resourceType": "Patient", "criteria": "Patient?name=ann&gender=female"}]));
    let Decision::Allow(permit) = decide_get(&narrowed, "Patient?_count=5") else {
        panic!("allowed")
    };
    assert!(has_contains(&permit.narrowing), "{:?}", permit.narrowing);
    let plain = permit.clone().without_contains();
    assert!(!has_contains(&plain.narrowing));
    assert!(
        plain.narrowing.iter().any(|p| p.name == "gender"),
        "{:?}",
        plain.narrowing
    );
    assert!(plain.drop_total);
    assert_eq!(plain.response, ResponseNeed::FilterResources);
    // Nothing to take away: the permit is unchanged.
    let exact = policy(json!([{"resourceType": "Patient", "criteria": "Patient?gender=female"}]));
    let Decision::Allow(permit) = decide_get(&exact, "Patient") else {
        panic!("allowed")
    };
    assert_eq!(permit.clone().without_contains(), permit);
}
