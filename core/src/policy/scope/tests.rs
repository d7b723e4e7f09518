use super::*;

/// Expected (context, type, letters, criteria) of a parsed scope.
type Parsed<'a> = (ScopeContext, &'a str, &'a str, Option<&'a str>);

/// `(scope word, expected)`; `None` = not a SMART scope.
fn check(term: &str, expected: Option<Parsed<'_>>) {
    let got = SmartScope::parse(term);
    let got = got.as_ref().map(|s| {
        (
            s.context,
            s.resource_type.as_str(),
            s.letters(),
            s.criteria.as_deref(),
        )
    });
    let expected = expected.map(|(c, t, l, q)| (c, t, l.to_string(), q));
    assert_eq!(got, expected, "scope {term:?}");
}

#[test]
fn parses_v1_and_v2_scopes() {
    use ScopeContext::*;
    let cases: &[(&str, Option<Parsed<'_>>)] = &[
        (
            "patient/Observation.rs",
            Some((Patient, "Observation", "rs", None)),
        ),
        ("patient/Patient.r", Some((Patient, "Patient", "r", None))),
        (
            "patient/Observation.c",
            Some((Patient, "Observation", "c", None)),
        ),
        ("patient/*.cruds", Some((Patient, "*", "cruds", None))),
        (
            "user/Appointment.cruds",
            Some((User, "Appointment", "cruds", None)),
        ),
        (
            "system/Encounter.cud",
            Some((System, "Encounter", "cud", None)),
        ),
        ("system/*.rs", Some((System, "*", "rs", None))),
        ("patient/*.read", Some((Patient, "*", "rs", None))),
        ("user/Patient.write", Some((User, "Patient", "cud", None))),
        ("system/Patient.*", Some((System, "Patient", "cruds", None))),
        (
            "patient/Practitioner.rus",
            Some((Patient, "Practitioner", "rus", None)),
        ),
        (
            "patient/Custom_Type1.s",
            Some((Patient, "Custom_Type1", "s", None)),
        ),
    ];
    for (term, expected) in cases {
        check(term, *expected);
    }
}

#[test]
fn refuses_malformed_letters_and_non_resource_words() {
    for term in [
        "openid",
        "profile",
        "email",
        "fhirUser",
        "launch",
        "launch/patient",
        "offline_access",
        "online_access",
        "fhircast/Patient-open.read",
        "x/y.z",
        "patient/Patient.",
        "patient/Patient.sdurc",
        "patient/Patient.chum",
        "patient/Patient.c*",
        "patient/Patient.*c",
        "patient/Patient.rr",
        "patient/Patient.sr",
        "patient/Patient.READ",
        "Patient/Patient.rs",
        "admin/Patient.rs",
        "patient/.rs",
        "patient/Pat-ient.rs",
        "patient/Patient",
        "patient/Patient.rs.rs",
        "",
    ] {
        check(term, None);
    }
}

#[test]
fn granular_queries_are_normalised() {
    use ScopeContext::*;
    let system = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let lab = format!("patient/Observation.rs?category={system}");
    let want = format!("category={system}");
    check(
        &lab,
        Some((Patient, "Observation", "rs", Some(want.as_str()))),
    );
    check(
        "patient/Condition.rs?category=health-concern",
        Some((Patient, "Condition", "rs", Some("category=health-concern"))),
    );
    check(
        "user/Goal.rs?a=1&&b=2&a=3",
        Some((User, "Goal", "rs", Some("a=1&a=3&b=2"))),
    );
    check(
        "user/Goal.rs?flag",
        Some((User, "Goal", "rs", Some("flag="))),
    );
    check(
        "user/Goal.rs?x=a+b",
        Some((User, "Goal", "rs", Some("x=a%20b"))),
    );
    check(
        "user/Goal.rs?x=a%7Cb",
        Some((User, "Goal", "rs", Some("x=a%7Cb"))),
    );
    check("user/Goal.rs?", Some((User, "Goal", "rs", None)));
    check("user/Goal.rs?&", Some((User, "Goal", "rs", None)));
    check("user/Goal.rsx?a=1", None);
}

#[test]
fn scope_string_keeps_resource_scopes_in_order() {
    let scopes =
        parse_scopes("openid profile  patient/Patient.rs offline_access\tuser/*.cud launch");
    let got: Vec<(String, String)> = scopes
        .iter()
        .map(|s| (s.resource_type.clone(), s.letters()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("Patient".to_string(), "rs".to_string()),
            ("*".to_string(), "cud".to_string())
        ]
    );
    assert!(parse_scopes("").is_empty());
    assert!(parse_scopes("openid offline").is_empty());
}

#[test]
fn letters_map_to_interactions() {
    use Interaction::*;
    let cases: &[(&str, &[Interaction])] = &[
        ("patient/Observation.c", &[Create]),
        ("patient/Observation.r", &[Read, Vread, History]),
        ("patient/Observation.u", &[Update]),
        ("patient/Observation.d", &[Delete]),
        ("patient/Observation.s", &[Search]),
        ("patient/Observation.rs", &[Read, Vread, History, Search]),
        ("patient/Observation.read", &[Read, Vread, History, Search]),
        ("patient/Observation.write", &[Create, Update, Delete]),
        (
            "patient/Observation.*",
            &[Read, Vread, Update, Delete, History, Create, Search],
        ),
    ];
    for (term, want) in cases {
        let scope = SmartScope::parse(term).expect(term);
        let got: Vec<Interaction> = scope.interactions().iter().collect();
        let mut want = want.to_vec();
        want.sort_by_key(|i| Interaction::ALL.iter().position(|a| a == i));
        assert_eq!(got, want, "{term}");
    }
}

#[test]
fn read_only_means_only_r_and_s() {
    for (term, ro) in [
        ("patient/Patient.rs", true),
        ("patient/Patient.r", true),
        ("patient/Patient.s", true),
        ("patient/Patient.read", true),
        ("patient/Patient.rus", false),
        ("patient/Patient.c", false),
        ("patient/Patient.*", false),
    ] {
        assert_eq!(
            SmartScope::parse(term).expect(term).is_read_only(),
            ro,
            "{term}"
        );
    }
}

#[test]
fn consent_subset() {
    let s = |t: &str| SmartScope::parse(t).expect(t);
    let cases = [
        ("patient/Condition.read", "patient/Condition.crs", true),
        (
            "patient/Condition.rs?category=x",
            "patient/Condition.rs",
            true,
        ),
        (
            "patient/Condition.rs?category=x",
            "patient/Condition.rs?encounter=y",
            false,
        ),
        (
            "patient/Condition.rs",
            "patient/Condition.rs?category=x",
            false,
        ),
        ("patient/Condition.rds", "patient/Condition.rs", false),
        ("user/Condition.rs", "patient/Condition.rs", false),
        ("patient/Observation.rs", "patient/Condition.rs", false),
    ];
    for (sub, sup, want) in cases {
        assert_eq!(s(sub).is_subset_of(&s(sup)), want, "{sub} ⊆ {sup}");
    }
}
