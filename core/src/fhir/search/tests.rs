use super::*;

fn qp(name: &str, value: &str) -> QueryParam {
    QueryParam {
        name: name.to_string(),
        value: value.to_string(),
    }
}

fn check_query(raw: &str, expected: Result<&[(&str, &str)], Unclassifiable>) {
    let expected = expected.map(|ps| ps.iter().map(|(n, v)| qp(n, v)).collect::<Vec<_>>());
    assert_eq!(parse_query(raw), expected, "query {raw:?}");
}

#[test]
fn query_table() {
    use Unclassifiable::BadQuery;
    type Row<'a> = (&'a str, Result<&'a [(&'a str, &'a str)], Unclassifiable>);
    let table: Vec<Row> = vec![
        ("", Ok(&[])),
        ("a=1", Ok(&[("a", "1")])),
        ("a=1&b=2", Ok(&[("a", "1"), ("b", "2")])),
        ("a=1&&b=2&", Ok(&[("a", "1"), ("b", "2")])),
        ("a", Ok(&[("a", "")])),
        ("a=", Ok(&[("a", "")])),
        ("a=b=c", Ok(&[("a", "b=c")])),
        ("a=x+y", Ok(&[("a", "x y")])),
        ("a=x%2By", Ok(&[("a", "x+y")])),
        (
            "code=http%3A%2F%2Floinc.org%7C8867-4",
            Ok(&[("code", "http://loinc.org|8867-4")]),
        ),
        (
            "identifier=http://h.org/mrn|MRN-1",
            Ok(&[("identifier", "http://h.org/mrn|MRN-1")]),
        ),
        ("%5Fmethod=DELETE", Ok(&[("_method", "DELETE")])),
        ("name=%C3%A9", Ok(&[("name", "\u{e9}")])),
        ("name=\u{e9}", Ok(&[("name", "\u{e9}")])),
        ("a=1&a=2", Ok(&[("a", "1"), ("a", "2")])),
        ("=x", Err(BadQuery)),
        ("a=%", Err(BadQuery)),
        ("a=%4", Err(BadQuery)),
        ("a=%zz", Err(BadQuery)),
        ("a%=1", Err(BadQuery)),
        ("a=%ff", Err(BadQuery)),
        ("a=%00", Err(BadQuery)),
        ("a=%0A", Err(BadQuery)),
        ("a=x\0", Err(BadQuery)),
        ("a=x y", Err(BadQuery)),
        ("a=x#frag", Err(BadQuery)),
        ("a=x\ty", Err(BadQuery)),
    ];
    for (raw, expected) in table {
        check_query(raw, expected);
    }
}

#[test]
fn form_body_errors_are_bad_body() {
    assert_eq!(parse_form_body(b"a=%zz"), Err(Unclassifiable::BadBody));
    assert_eq!(parse_form_body(b"a=\xff"), Err(Unclassifiable::BadBody));
    assert_eq!(parse_form_body(b"a=1"), Ok(vec![qp("a", "1")]));
}

fn check_refs(params: &[(&str, &str)], expected: Result<&[&str], Unclassifiable>) {
    let params: Vec<QueryParam> = params.iter().map(|(n, v)| qp(n, v)).collect();
    let expected = expected.map(|ts| ts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
    assert_eq!(referenced_types(&params), expected, "params {params:?}");
}

#[test]
fn referenced_types_table() {
    use Unclassifiable::{BadQuery, UnknownType};
    type Row<'a> = (
        &'a [(&'a str, &'a str)],
        Result<&'a [&'a str], Unclassifiable>,
    );
    let table: Vec<Row> = vec![
        (&[("name", "x")], Ok(&[])),
        (&[("name:exact", "x")], Ok(&[])),
        (&[("_count", "10"), ("_sort", "-date")], Ok(&[])),
        (
            &[("_include", "Observation:subject:Patient")],
            Ok(&["Patient"]),
        ),
        (&[("_include", "Observation:subject")], Ok(&["*"])),
        (&[("_include", "Observation:*")], Ok(&["*"])),
        (&[("_include", "*")], Ok(&["*"])),
        (&[("_include", "Observation:*:Patient")], Ok(&["Patient"])),
        (
            &[(
                "_include:iterate",
                "Patient:general-practitioner:Practitioner",
            )],
            Ok(&["Practitioner"]),
        ),
        (
            &[("_include:recurse", "Patient:link:Patient")],
            Ok(&["Patient"]),
        ),
        (
            &[("_include:foo", "Observation:subject:Patient")],
            Err(BadQuery),
        ),
        (&[("_include", "Observation")], Err(BadQuery)),
        (
            &[("_include", "Observation:subject:Patient:x")],
            Err(BadQuery),
        ),
        (&[("_include", "Observation::Patient")], Err(BadQuery)),
        (&[("_include", "observation:subject")], Err(UnknownType)),
        (
            &[("_include", "Observation:subject:patient")],
            Err(UnknownType),
        ),
        (&[("_revinclude", "Provenance:target")], Ok(&["Provenance"])),
        (
            &[("_revinclude", "Provenance:target:Patient")],
            Ok(&["Provenance"]),
        ),
        (
            &[("_revinclude:iterate", "Observation:subject")],
            Ok(&["Observation"]),
        ),
        (&[("_revinclude", "*:subject")], Ok(&["*"])),
        (&[("_revinclude", "Nope:target")], Err(UnknownType)),
        (
            &[("_has:Observation:subject:code", "x")],
            Ok(&["Observation"]),
        ),
        (
            &[("_has:Observation:subject:_has:AuditEvent:entity:type", "x")],
            Ok(&["Observation", "AuditEvent"]),
        ),
        (
            &[("_has:Observation:subject:performer:Practitioner.name", "x")],
            Ok(&["Observation", "Practitioner"]),
        ),
        (
            &[("_has:Observation:subject:subject:Patient.name", "x")],
            Ok(&["Observation", "Patient"]),
        ),
        (
            &[("_has:Observation:subject:focus.name", "x")],
            Ok(&["Observation", "*"]),
        ),
        (&[("_has:observation:subject:code", "x")], Err(UnknownType)),
        (&[("_has:Observation:subject", "x")], Err(BadQuery)),
        (&[("_has:Observation", "x")], Err(BadQuery)),
        (&[("_has", "x")], Err(BadQuery)),
        (&[("_has:Observation::code", "x")], Err(BadQuery)),
        (&[("subject:Patient.name", "Nguyen")], Ok(&["Patient"])),
        (&[("subject.name", "Nguyen")], Ok(&["*"])),
        (
            &[("subject:Patient.organization:Organization.name", "x")],
            Ok(&["Patient", "Organization"]),
        ),
        (
            &[("subject:Patient.organization.name", "x")],
            Ok(&["Patient", "*"]),
        ),
        (
            &[("subject:Patient._has:Observation:subject:code", "x")],
            Ok(&["Patient", "Observation"]),
        ),
        (&[("subject:Patient.name:exact", "x")], Ok(&["Patient"])),
        (&[("subject:patient.name", "x")], Ok(&["*"])),
        (&[("subject:Nope.name", "x")], Err(UnknownType)),
        (&[("subject.", "x")], Err(BadQuery)),
        (&[(".name", "x")], Err(BadQuery)),
        (
            &[("_type", "Patient,Observation")],
            Ok(&["Patient", "Observation"]),
        ),
        (&[("_type", "Patient,,Observation")], Err(BadQuery)),
        (&[("_type", "")], Err(BadQuery)),
        (&[("_type", "patient")], Err(UnknownType)),
        (&[("_list", "l1")], Ok(&["List"])),
        (&[("_filter", "name eq x")], Ok(&["*"])),
        (&[("_query", "q")], Ok(&["*"])),
        (
            &[
                ("_include", "Observation:subject:Patient"),
                ("_revinclude", "Provenance:target"),
                ("_include", "Observation:performer:Patient"),
            ],
            Ok(&["Patient", "Provenance"]),
        ),
    ];
    for (params, expected) in table {
        check_refs(params, expected);
    }
}

fn search(ty: Option<&str>, compartment: Option<(&str, &str)>, params: &[(&str, &str)]) -> Search {
    Search {
        resource_type: ty.map(str::to_string),
        compartment: compartment.map(|(t, i)| (t.to_string(), i.to_string())),
        params: params.iter().map(|(n, v)| qp(n, v)).collect(),
        via_post: false,
    }
}

fn check_access(op: FhirOp, expected: &[(&str, Interaction)]) {
    let expected: Vec<(String, Interaction)> =
        expected.iter().map(|(t, i)| (t.to_string(), *i)).collect();
    assert_eq!(op.required_access(), expected, "op {op:?}");
}

#[test]
fn required_access_table() {
    use Interaction::*;
    let s = |t: &str| Some(t.to_string());
    let crit = |ps: &[(&str, &str)]| ps.iter().map(|(n, v)| qp(n, v)).collect::<Vec<_>>();
    let table: Vec<(FhirOp, Vec<(&str, Interaction)>)> = vec![
        (FhirOp::Capabilities, vec![]),
        (FhirOp::GraphQl, vec![]),
        (
            FhirOp::Read {
                resource_type: "Patient".into(),
                id: "p1".into(),
            },
            vec![("Patient", Read)],
        ),
        (
            FhirOp::Vread {
                resource_type: "Patient".into(),
                id: "p1".into(),
                version: "2".into(),
            },
            vec![("Patient", Vread)],
        ),
        (
            FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: None,
            },
            vec![("Patient", Create)],
        ),
        (
            FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: Some(crit(&[("identifier", "a|b")])),
            },
            vec![("Patient", Create), ("Patient", Search)],
        ),
        (
            FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: Some(crit(&[("_has:Observation:subject:code", "x")])),
            },
            vec![
                ("Patient", Create),
                ("Patient", Search),
                ("Observation", Search),
            ],
        ),
        (
            FhirOp::Update {
                resource_type: "Patient".into(),
                id: "p1".into(),
                resource: None,
            },
            vec![("Patient", Update)],
        ),
        (
            FhirOp::Patch {
                resource_type: "Patient".into(),
                id: "p1".into(),
                patch: None,
            },
            vec![("Patient", Update)],
        ),
        (
            FhirOp::ConditionalUpdate {
                resource_type: "Patient".into(),
                criteria: crit(&[("identifier", "a|b")]),
                resource: None,
            },
            vec![("Patient", Update), ("Patient", Search)],
        ),
        (
            FhirOp::ConditionalPatch {
                resource_type: "Patient".into(),
                criteria: crit(&[("general-practitioner:Practitioner.name", "x")]),
                patch: None,
            },
            vec![
                ("Patient", Update),
                ("Patient", Search),
                ("Practitioner", Search),
            ],
        ),
        (
            FhirOp::Delete {
                resource_type: "Patient".into(),
                id: "p1".into(),
            },
            vec![("Patient", Delete)],
        ),
        (
            FhirOp::ConditionalDelete {
                resource_type: "Patient".into(),
                criteria: crit(&[("name", "x")]),
            },
            vec![("Patient", Delete), ("Patient", Search)],
        ),
        (
            FhirOp::Search(search(Some("Patient"), None, &[])),
            vec![("Patient", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Observation"),
                None,
                &[("_include", "Observation:subject:Patient")],
            )),
            vec![("Observation", Search), ("Patient", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Observation"),
                None,
                &[("_include", "Observation:subject")],
            )),
            vec![("Observation", Search), ("*", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Patient"),
                None,
                &[("_revinclude", "Provenance:target")],
            )),
            vec![("Patient", Search), ("Provenance", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Patient"),
                None,
                &[("_has:Observation:subject:code", "2345-7")],
            )),
            vec![("Patient", Search), ("Observation", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Observation"),
                None,
                &[("subject:Patient.name", "Nguyen")],
            )),
            vec![("Observation", Search), ("Patient", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Observation"),
                None,
                &[("subject.name", "Nguyen")],
            )),
            vec![("Observation", Search), ("*", Search)],
        ),
        (
            FhirOp::Search(search(
                Some("Patient"),
                None,
                &[("_include", "Patient:link:Patient")],
            )),
            vec![("Patient", Search)],
        ),
        (
            FhirOp::Search(search(Some("Observation"), Some(("Patient", "p1")), &[])),
            vec![("Observation", Search), ("Patient", Read)],
        ),
        (
            FhirOp::Search(search(None, None, &[("_type", "Patient,Observation")])),
            vec![("Patient", Search), ("Observation", Search)],
        ),
        (
            FhirOp::Search(search(None, None, &[("_id", "x")])),
            vec![("*", Search)],
        ),
        (
            FhirOp::Search(search(Some("Patient"), None, &[("_include", "garbage")])),
            vec![("Patient", Search), ("*", Search)],
        ),
        (
            FhirOp::History {
                resource_type: s("Patient"),
                id: s("p1"),
            },
            vec![("Patient", History)],
        ),
        (
            FhirOp::History {
                resource_type: s("Observation"),
                id: None,
            },
            vec![("Observation", History)],
        ),
        (
            FhirOp::History {
                resource_type: None,
                id: None,
            },
            vec![("*", History)],
        ),
        (
            FhirOp::Operation {
                name: "everything".into(),
                resource_type: s("Patient"),
                id: s("p1"),
            },
            vec![],
        ),
        (
            FhirOp::Bundle {
                transaction: true,
                entries: vec![],
            },
            vec![],
        ),
    ];
    for (op, expected) in table {
        check_access(op, &expected);
    }
}
