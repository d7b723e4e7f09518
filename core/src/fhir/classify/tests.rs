use super::super::request::Interaction;
use super::*;
use Unclassifiable::*;
use proptest::prelude::*;
use serde_json::json;

fn classify_raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<FhirRequest, Unclassifiable> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    classify(&RequestParts {
        method,
        path,
        query,
        headers,
        body,
    })
}

fn qp(name: &str, value: &str) -> QueryParam {
    QueryParam {
        name: name.to_string(),
        value: value.to_string(),
    }
}

fn qps(params: &[(&str, &str)]) -> Vec<QueryParam> {
    params.iter().map(|(n, v)| qp(n, v)).collect()
}

fn read(ty: &str, id: &str) -> FhirOp {
    FhirOp::Read {
        resource_type: ty.into(),
        id: id.into(),
    }
}

fn search(ty: &str, params: &[(&str, &str)]) -> FhirOp {
    FhirOp::Search(Search {
        resource_type: Some(ty.into()),
        compartment: None,
        params: qps(params),
        via_post: false,
    })
}

fn post_search(ty: Option<&str>, params: &[(&str, &str)]) -> FhirOp {
    FhirOp::Search(Search {
        resource_type: ty.map(str::to_string),
        compartment: None,
        params: qps(params),
        via_post: true,
    })
}

fn system_search(params: &[(&str, &str)]) -> FhirOp {
    FhirOp::Search(Search {
        resource_type: None,
        compartment: None,
        params: qps(params),
        via_post: false,
    })
}

fn compartment(owner: &str, id: &str, ty: &str, params: &[(&str, &str)]) -> FhirOp {
    FhirOp::Search(Search {
        resource_type: Some(ty.into()),
        compartment: Some((owner.into(), id.into())),
        params: qps(params),
        via_post: false,
    })
}

fn history(ty: Option<&str>, id: Option<&str>) -> FhirOp {
    FhirOp::History {
        resource_type: ty.map(str::to_string),
        id: id.map(str::to_string),
    }
}

fn op(name: &str, ty: Option<&str>, id: Option<&str>) -> FhirOp {
    FhirOp::Operation {
        name: name.into(),
        resource_type: ty.map(str::to_string),
        id: id.map(str::to_string),
    }
}

/// One row: method, URL (path after `/fhir/R4/` plus `?query`), headers, body, expected op.
type Row<'a> = (
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    Option<&'a str>,
    Result<FhirOp, Unclassifiable>,
);

type Headers<'a> = &'a [(&'a str, &'a str)];

/// Method, URL, headers, body, expected `wants_non_json`.
type FormatRow<'a> = (&'a str, &'a str, Headers<'a>, Option<&'a str>, bool);

/// `(transaction, entries)` or the Bundle-level error.
type BundleExpectation = Result<(bool, Vec<Result<FhirOp, Unclassifiable>>), Unclassifiable>;

fn check(row: Row) {
    let (method, url, headers, body, expected) = row;
    let got = classify_raw(method, url, headers, body.map(str::as_bytes)).map(|r| r.op);
    assert_eq!(
        got, expected,
        "{method} {url:?} headers={headers:?} body={body:?}"
    );
}

#[test]
fn routing_table() {
    let patient = r#"{"resourceType":"Patient","id":"p1","active":true}"#;
    let patient_json = json!({"resourceType":"Patient","id":"p1","active":true});
    let new_patient = json!({"resourceType":"Patient","active":true});
    let json_patch = r#"[{"op":"replace","path":"/active","value":false}]"#;
    let form: &[(&str, &str)] = &[("content-type", "application/x-www-form-urlencoded")];
    let table: Vec<Row> = vec![
        // Capabilities
        ("GET", "metadata", &[], None, Ok(FhirOp::Capabilities)),
        ("HEAD", "metadata", &[], None, Ok(FhirOp::Capabilities)),
        (
            "GET",
            "metadata?mode=full",
            &[],
            None,
            Ok(FhirOp::Capabilities),
        ),
        ("POST", "metadata", &[], None, Err(MethodNotAllowed)),
        ("DELETE", "metadata", &[], None, Err(MethodNotAllowed)),
        ("GET", "metadata/x", &[], None, Err(Unsupported)),
        // read / vread
        ("GET", "Patient/p1", &[], None, Ok(read("Patient", "p1"))),
        ("HEAD", "Patient/p1", &[], None, Ok(read("Patient", "p1"))),
        (
            "GET",
            "Patient/p1?_elements=name",
            &[],
            None,
            Ok(read("Patient", "p1")),
        ),
        (
            "GET",
            "Patient/a-b.c",
            &[],
            None,
            Ok(read("Patient", "a-b.c")),
        ),
        (
            "GET",
            "AccessPolicy/ap1",
            &[],
            None,
            Ok(read("AccessPolicy", "ap1")),
        ),
        (
            "GET",
            "Patient/p1/_history/3",
            &[],
            None,
            Ok(FhirOp::Vread {
                resource_type: "Patient".into(),
                id: "p1".into(),
                version: "3".into(),
            }),
        ),
        (
            "PUT",
            "Patient/p1/_history/3",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        (
            "DELETE",
            "Patient/p1/_history/3",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        ("GET", "Patient/p1/_history/3_", &[], None, Err(BadPath)),
        (
            "GET",
            "Patient/p1/_history/3/x",
            &[],
            None,
            Err(Unsupported),
        ),
        ("GET", "Patient/p_1", &[], None, Err(BadPath)),
        ("GET", "Patient/p@1", &[], None, Err(BadPath)),
        ("GET", "Patient/", &[], None, Err(BadPath)),
        ("POST", "Patient/p1", &[], None, Err(MethodNotAllowed)),
        // unknown types, letter case
        ("GET", "patient/p1", &[], None, Err(UnknownType)),
        ("GET", "PATIENT/p1", &[], None, Err(UnknownType)),
        ("GET", "Patients", &[], None, Err(UnknownType)),
        ("GET", "IdentityProvider/x", &[], None, Err(UnknownType)),
        ("GET", "Resource/x", &[], None, Err(UnknownType)),
        ("GET", "_foo", &[], None, Err(Unsupported)),
        // create
        (
            "POST",
            "Patient",
            &[],
            Some(patient),
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: Some(patient_json.clone()),
                if_none_exist: None,
            }),
        ),
        (
            "POST",
            "Patient",
            &[],
            None,
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: None,
            }),
        ),
        (
            "POST",
            "Patient",
            &[],
            Some("  "),
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: None,
            }),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "identifier=http://h.org/mrn|MRN-1001")],
            Some(r#"{"resourceType":"Patient","active":true}"#),
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: Some(new_patient.clone()),
                if_none_exist: Some(qps(&[("identifier", "http://h.org/mrn|MRN-1001")])),
            }),
        ),
        (
            "POST",
            "Patient",
            &[("If-None-Exist", "Patient?identifier=a%7Cb&active=true")],
            None,
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: Some(qps(&[("identifier", "a|b"), ("active", "true")])),
            }),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "?identifier=x")],
            None,
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: None,
                if_none_exist: Some(qps(&[("identifier", "x")])),
            }),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "Observation?code=x")],
            None,
            Err(BadQuery),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "")],
            None,
            Err(BadQuery),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "_format=json")],
            None,
            Err(BadQuery),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "a=%zz")],
            None,
            Err(BadQuery),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "_method=GET")],
            None,
            Err(MethodOverride),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "a=1"), ("if-none-exist", "b=2")],
            None,
            Err(BadQuery),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "_has:Nope:subject:code=x")],
            None,
            Err(UnknownType),
        ),
        ("POST", "Patient", &[], Some("{"), Err(BadBody)),
        ("POST", "Patient", &[], Some("<Patient/>"), Err(BadBody)),
        ("POST", "Patient", &[], Some("[]"), Err(BadBody)),
        (
            "POST",
            "Patient",
            &[],
            Some(r#"{"active":true}"#),
            Err(BadBody),
        ),
        (
            "POST",
            "Patient",
            &[],
            Some(r#"{"resourceType":"Observation"}"#),
            Err(BadBody),
        ),
        (
            "POST",
            "Patient",
            &[],
            Some(r#"{"resourceType":"AccessPolicy"}"#),
            Err(BadBody),
        ),
        (
            "POST",
            "Patient",
            &[],
            Some(r#"{"resourceType":"Patient","resourceType":"AccessPolicy"}"#),
            Err(BadBody),
        ),
        (
            "POST",
            "Patient",
            &[],
            Some(r#"{"resourceType":"Patient","meta":{"a":1,"a":2}}"#),
            Err(BadBody),
        ),
        ("POST", "Patient", form, Some(""), Err(BadBody)),
        ("POST", "Patient", form, Some("name=x"), Err(BadBody)),
        (
            "POST",
            "Patient",
            &[("content-type", "application/fhir+json")],
            Some(patient),
            Ok(FhirOp::Create {
                resource_type: "Patient".into(),
                resource: Some(patient_json.clone()),
                if_none_exist: None,
            }),
        ),
        // update
        (
            "PUT",
            "Patient/p1",
            &[],
            Some(patient),
            Ok(FhirOp::Update {
                resource_type: "Patient".into(),
                id: "p1".into(),
                resource: Some(patient_json.clone()),
            }),
        ),
        (
            "PUT",
            "Patient/p1",
            &[],
            Some(r#"{"resourceType":"Patient","active":true}"#),
            Ok(FhirOp::Update {
                resource_type: "Patient".into(),
                id: "p1".into(),
                resource: Some(new_patient.clone()),
            }),
        ),
        (
            "PUT",
            "Patient/p1",
            &[],
            None,
            Ok(FhirOp::Update {
                resource_type: "Patient".into(),
                id: "p1".into(),
                resource: None,
            }),
        ),
        ("PUT", "Patient/p2", &[], Some(patient), Err(BadBody)),
        (
            "PUT",
            "Patient/p1",
            &[],
            Some(r#"{"resourceType":"Patient","id":1}"#),
            Err(BadBody),
        ),
        ("PUT", "Observation/p1", &[], Some(patient), Err(BadBody)),
        ("PUT", "Patient/p1", &[], Some("not json"), Err(BadBody)),
        // conditional update
        (
            "PUT",
            "Patient?identifier=a%7Cb",
            &[],
            Some(patient),
            Ok(FhirOp::ConditionalUpdate {
                resource_type: "Patient".into(),
                criteria: qps(&[("identifier", "a|b")]),
                resource: Some(patient_json.clone()),
            }),
        ),
        ("PUT", "Patient", &[], Some(patient), Err(MethodNotAllowed)),
        (
            "PUT",
            "Patient?_format=json",
            &[],
            Some(patient),
            Err(MethodNotAllowed),
        ),
        (
            "PUT",
            "Patient?identifier=x",
            &[],
            Some(r#"{"resourceType":"Observation"}"#),
            Err(BadBody),
        ),
        (
            "PUT",
            "Patient?subject:Nope.name=x",
            &[],
            Some(patient),
            Err(UnknownType),
        ),
        // patch
        (
            "PATCH",
            "Patient/p1",
            &[("content-type", "application/json-patch+json")],
            Some(json_patch),
            Ok(FhirOp::Patch {
                resource_type: "Patient".into(),
                id: "p1".into(),
                patch: Some(json!([{"op":"replace","path":"/active","value":false}])),
            }),
        ),
        (
            "PATCH",
            "Patient/p1",
            &[],
            Some(r#"{"resourceType":"Parameters","parameter":[]}"#),
            Ok(FhirOp::Patch {
                resource_type: "Patient".into(),
                id: "p1".into(),
                patch: Some(json!({"resourceType":"Parameters","parameter":[]})),
            }),
        ),
        (
            "PATCH",
            "Patient/p1",
            &[],
            None,
            Ok(FhirOp::Patch {
                resource_type: "Patient".into(),
                id: "p1".into(),
                patch: None,
            }),
        ),
        (
            "PATCH",
            "Patient/p1",
            &[],
            Some(r#"[{"op":"explode","path":"/a"}]"#),
            Err(BadBody),
        ),
        (
            "PATCH",
            "Patient/p1",
            &[],
            Some(r#"[{"op":"add"}]"#),
            Err(BadBody),
        ),
        (
            "PATCH",
            "Patient/p1",
            &[],
            Some(r#"{"resourceType":"Patient"}"#),
            Err(BadBody),
        ),
        ("PATCH", "Patient/p1", &[], Some("[1]"), Err(BadBody)),
        ("PATCH", "Patient/p1", &[], Some("[{"), Err(BadBody)),
        (
            "PATCH",
            "Patient?identifier=x",
            &[],
            Some(json_patch),
            Ok(FhirOp::ConditionalPatch {
                resource_type: "Patient".into(),
                criteria: qps(&[("identifier", "x")]),
                patch: Some(json!([{"op":"replace","path":"/active","value":false}])),
            }),
        ),
        (
            "PATCH",
            "Patient",
            &[],
            Some(json_patch),
            Err(MethodNotAllowed),
        ),
        // delete
        (
            "DELETE",
            "Patient/p1",
            &[],
            None,
            Ok(FhirOp::Delete {
                resource_type: "Patient".into(),
                id: "p1".into(),
            }),
        ),
        (
            "DELETE",
            "Patient?identifier=x",
            &[],
            None,
            Ok(FhirOp::ConditionalDelete {
                resource_type: "Patient".into(),
                criteria: qps(&[("identifier", "x")]),
            }),
        ),
        ("DELETE", "Patient", &[], None, Err(MethodNotAllowed)),
        (
            "DELETE",
            "Patient?_count=1&_sort=name",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        (
            "DELETE",
            "Patient?_include:iterate=Patient:link:Patient",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        (
            "PATCH",
            "Patient?_total=accurate",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "_count=1")],
            None,
            Err(BadQuery),
        ),
        (
            "DELETE",
            "Patient?_pretty=true&_format=json",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        ("DELETE", "", &[], None, Err(MethodNotAllowed)),
        // search
        ("GET", "Patient", &[], None, Ok(search("Patient", &[]))),
        ("HEAD", "Patient", &[], None, Ok(search("Patient", &[]))),
        ("GET", "Patient?", &[], None, Ok(search("Patient", &[]))),
        (
            "GET",
            "Patient?name=Nguyen&_count=10",
            &[],
            None,
            Ok(search("Patient", &[("name", "Nguyen"), ("_count", "10")])),
        ),
        (
            "GET",
            "Patient?name=L%C3%A9a+T",
            &[],
            None,
            Ok(search("Patient", &[("name", "L\u{e9}a T")])),
        ),
        (
            "GET",
            "Patient?_has:Observation:subject:code=2345-7",
            &[],
            None,
            Ok(search(
                "Patient",
                &[("_has:Observation:subject:code", "2345-7")],
            )),
        ),
        (
            "GET",
            "Observation?subject:Patient.name=Nguyen",
            &[],
            None,
            Ok(search("Observation", &[("subject:Patient.name", "Nguyen")])),
        ),
        (
            "GET",
            "Observation?_include=Observation:subject:Patient",
            &[],
            None,
            Ok(search(
                "Observation",
                &[("_include", "Observation:subject:Patient")],
            )),
        ),
        (
            "GET",
            "Patient?_revinclude=Provenance:target",
            &[],
            None,
            Ok(search("Patient", &[("_revinclude", "Provenance:target")])),
        ),
        (
            "GET",
            "Observation?_include=Observation:subject:patient",
            &[],
            None,
            Err(UnknownType),
        ),
        ("GET", "Observation?_include=bad", &[], None, Err(BadQuery)),
        (
            "GET",
            "Patient?_has:Nope:subject:code=x",
            &[],
            None,
            Err(UnknownType),
        ),
        ("GET", "Patient?name=%zz", &[], None, Err(BadQuery)),
        ("GET", "Patient?name=%", &[], None, Err(BadQuery)),
        ("GET", "Patient?name=%C3", &[], None, Err(BadQuery)),
        ("GET", "Patient?=x", &[], None, Err(BadQuery)),
        ("GET", "Patient?name=a#b", &[], None, Err(BadQuery)),
        ("GET", "Patient/_search", &[], None, Err(MethodNotAllowed)),
        // POST _search: URL and form parameters merged, URL first
        (
            "POST",
            "Observation/_search",
            form,
            Some("code=http%3A%2F%2Floinc.org%7C8867-4"),
            Ok(post_search(
                Some("Observation"),
                &[("code", "http://loinc.org|8867-4")],
            )),
        ),
        (
            "POST",
            "Observation/_search?_count=5",
            form,
            Some("code=x&status=final"),
            Ok(post_search(
                Some("Observation"),
                &[("_count", "5"), ("code", "x"), ("status", "final")],
            )),
        ),
        (
            "POST",
            "Observation/_search",
            &[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            Some("code=x"),
            Ok(post_search(Some("Observation"), &[("code", "x")])),
        ),
        (
            "POST",
            "Observation/_search",
            &[],
            Some("code=x"),
            Ok(post_search(Some("Observation"), &[("code", "x")])),
        ),
        (
            "POST",
            "Observation/_search",
            &[],
            None,
            Ok(post_search(Some("Observation"), &[])),
        ),
        (
            "POST",
            "Observation/_search",
            &[("content-type", "application/json")],
            Some("{}"),
            Err(BadBody),
        ),
        (
            "POST",
            "Observation/_search",
            form,
            Some("code=%zz"),
            Err(BadBody),
        ),
        (
            "POST",
            "Observation/_search",
            form,
            Some("_method=DELETE"),
            Err(MethodOverride),
        ),
        (
            "POST",
            "Observation/_search",
            form,
            Some("subject:Nope.name=x"),
            Err(UnknownType),
        ),
        (
            "POST",
            "_search",
            form,
            Some("_type=Patient&name=x"),
            Ok(post_search(None, &[("_type", "Patient"), ("name", "x")])),
        ),
        ("POST", "_search", form, Some(""), Err(Unsupported)),
        ("GET", "_search", &[], None, Err(MethodNotAllowed)),
        // compartment search
        (
            "GET",
            "Patient/p1/Observation",
            &[],
            None,
            Ok(compartment("Patient", "p1", "Observation", &[])),
        ),
        (
            "GET",
            "Patient/p1/Observation?code=x",
            &[],
            None,
            Ok(compartment(
                "Patient",
                "p1",
                "Observation",
                &[("code", "x")],
            )),
        ),
        (
            "GET",
            "Encounter/e1/Observation",
            &[],
            None,
            Ok(compartment("Encounter", "e1", "Observation", &[])),
        ),
        ("GET", "Patient/p1/*", &[], None, Err(Unsupported)),
        ("GET", "Observation/o1/Patient", &[], None, Err(Unsupported)),
        ("GET", "Patient/p1/observation", &[], None, Err(UnknownType)),
        ("GET", "Patient/p1/_search", &[], None, Err(Unsupported)),
        (
            "POST",
            "Patient/p1/Observation",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        (
            "GET",
            "Patient/p1/Observation/_search",
            &[],
            None,
            Err(Unsupported),
        ),
        // system search
        (
            "GET",
            "?_type=Patient,Observation&name=x",
            &[],
            None,
            Ok(system_search(&[
                ("_type", "Patient,Observation"),
                ("name", "x"),
            ])),
        ),
        (
            "GET",
            "?_id=x",
            &[],
            None,
            Ok(system_search(&[("_id", "x")])),
        ),
        ("GET", "", &[], None, Err(Unsupported)),
        ("GET", "?", &[], None, Err(Unsupported)),
        ("GET", "?_type=patient", &[], None, Err(UnknownType)),
        ("GET", "?_type=", &[], None, Err(BadQuery)),
        // history
        (
            "GET",
            "Patient/p1/_history",
            &[],
            None,
            Ok(history(Some("Patient"), Some("p1"))),
        ),
        (
            "GET",
            "Observation/_history",
            &[],
            None,
            Ok(history(Some("Observation"), None)),
        ),
        ("GET", "_history", &[], None, Ok(history(None, None))),
        (
            "GET",
            "_history?_since=2024-01-01",
            &[],
            None,
            Ok(history(None, None)),
        ),
        ("POST", "_history", &[], None, Err(MethodNotAllowed)),
        (
            "DELETE",
            "Patient/_history",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        (
            "POST",
            "Patient/p1/_history",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        ("GET", "_history/1", &[], None, Err(Unsupported)),
        // operations
        (
            "GET",
            "Patient/p1/$everything",
            &[],
            None,
            Ok(op("everything", Some("Patient"), Some("p1"))),
        ),
        (
            "POST",
            "Patient/p1/$everything",
            &[],
            Some("{}"),
            Ok(op("everything", Some("Patient"), Some("p1"))),
        ),
        (
            "HEAD",
            "Patient/p1/$everything",
            &[],
            None,
            Ok(op("everything", Some("Patient"), Some("p1"))),
        ),
        (
            "GET",
            "ValueSet/$expand?url=x",
            &[],
            None,
            Ok(op("expand", Some("ValueSet"), None)),
        ),
        ("POST", "$export", &[], None, Ok(op("export", None, None))),
        (
            "GET",
            "CodeSystem/$validate-code",
            &[],
            None,
            Ok(op("validate-code", Some("CodeSystem"), None)),
        ),
        (
            "DELETE",
            "Patient/p1/$everything",
            &[],
            None,
            Err(MethodNotAllowed),
        ),
        ("PUT", "$export", &[], None, Err(MethodNotAllowed)),
        ("GET", "$", &[], None, Err(BadPath)),
        ("GET", "Patient/$1x", &[], None, Err(BadPath)),
        ("GET", "$export/x", &[], None, Err(Unsupported)),
        ("GET", "Nope/$export", &[], None, Err(UnknownType)),
        // GraphQL
        (
            "GET",
            "$graphql?query=%7BPatient(id:%22p1%22)%7Bid%7D%7D",
            &[],
            None,
            Ok(FhirOp::GraphQl),
        ),
        (
            "POST",
            "$graphql",
            &[("content-type", "application/json")],
            Some(r#"{"query":"{ PatientList { id } }"}"#),
            Ok(FhirOp::GraphQl),
        ),
        ("PUT", "$graphql", &[], None, Err(MethodNotAllowed)),
        (
            "GET",
            "Patient/$graphql",
            &[],
            None,
            Ok(op("graphql", Some("Patient"), None)),
        ),
        // methods
        ("OPTIONS", "Patient", &[], None, Err(MethodNotAllowed)),
        ("TRACE", "Patient/p1", &[], None, Err(MethodNotAllowed)),
        ("get", "Patient/p1", &[], None, Err(MethodNotAllowed)),
        ("", "Patient/p1", &[], None, Err(MethodNotAllowed)),
        // path tricks (cases 170, 171)
        ("GET", "Patient/../AccessPolicy", &[], None, Err(BadPath)),
        (
            "GET",
            "Observation%2F..%2FPatient%2Fp1",
            &[],
            None,
            Err(BadPath),
        ),
        ("GET", "Patient%2Fp1", &[], None, Err(BadPath)),
        ("GET", "Patient%2fp1", &[], None, Err(BadPath)),
        ("GET", "//Patient", &[], None, Err(BadPath)),
        ("GET", "Patient/p1/", &[], None, Err(BadPath)),
        ("GET", "Patient/./p1", &[], None, Err(BadPath)),
        (
            "GET",
            "Patient/%2e%2e/AccessPolicy",
            &[],
            None,
            Err(BadPath),
        ),
        ("GET", "Patient%5Cp1", &[], None, Err(BadPath)),
        ("GET", "Patient\\p1", &[], None, Err(BadPath)),
        ("GET", "Patient/p1%00", &[], None, Err(BadPath)),
        ("GET", "Patient/p1;x=y", &[], None, Err(BadPath)),
        (
            "DELETE",
            "Patient/../AccessPolicy/ap1",
            &[("x-http-method-override", "GET")],
            None,
            Err(BadPath),
        ),
        // method override (case 180)
        (
            "POST",
            "Observation/o1",
            &[("X-HTTP-Method-Override", "DELETE")],
            None,
            Err(MethodOverride),
        ),
        (
            "POST",
            "Observation/o1",
            &[("x-http-method-override", "DELETE")],
            None,
            Err(MethodOverride),
        ),
        (
            "GET",
            "Observation/o1",
            &[("x-http-method", "DELETE")],
            None,
            Err(MethodOverride),
        ),
        (
            "GET",
            "Observation/o1",
            &[("x-method-override", "GET")],
            None,
            Err(MethodOverride),
        ),
        (
            "POST",
            "Observation/o1?_method=DELETE",
            &[],
            None,
            Err(MethodOverride),
        ),
        (
            "GET",
            "Observation?_method=DELETE",
            &[],
            None,
            Err(MethodOverride),
        ),
        (
            "GET",
            "Observation?%5Fmethod=DELETE",
            &[],
            None,
            Err(MethodOverride),
        ),
    ];
    for row in table {
        check(row);
    }
}

fn check_format(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    expected: bool,
) {
    let got = classify_raw(method, url, headers, body.map(str::as_bytes))
        .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
    assert_eq!(
        got.wants_non_json, expected,
        "{method} {url:?} headers={headers:?}"
    );
}

#[test]
fn format_table() {
    let form: &[(&str, &str)] = &[("content-type", "application/x-www-form-urlencoded")];
    let table: Vec<FormatRow> = vec![
        ("GET", "Patient", &[], None, false),
        ("GET", "Patient?_format=json", &[], None, false),
        ("GET", "Patient?_format=JSON", &[], None, false),
        ("GET", "Patient?_format=application/json", &[], None, false),
        (
            "GET",
            "Patient?_format=application/fhir%2Bjson",
            &[],
            None,
            false,
        ),
        (
            "GET",
            "Patient?_format=application/fhir+json",
            &[],
            None,
            false,
        ),
        (
            "GET",
            "Patient?_format=application/json+fhir",
            &[],
            None,
            false,
        ),
        (
            "GET",
            "Patient?_format=application/fhir%2Bjson;fhirVersion=4.0",
            &[],
            None,
            false,
        ),
        ("GET", "Patient?_format=xml", &[], None, true),
        (
            "GET",
            "Patient?_format=application/fhir%2Bxml",
            &[],
            None,
            true,
        ),
        ("GET", "Patient?_format=text/turtle", &[], None, true),
        ("GET", "Patient?_format=ttl", &[], None, true),
        ("GET", "Patient?_format=html", &[], None, true),
        ("GET", "Patient?_format=", &[], None, true),
        ("GET", "Patient?_format=json&_format=xml", &[], None, true),
        ("GET", "Patient/p1?_format=xml", &[], None, true),
        ("GET", "metadata?_format=xml", &[], None, true),
        (
            "GET",
            "Patient",
            &[("accept", "application/fhir+json")],
            None,
            false,
        ),
        (
            "GET",
            "Patient",
            &[("accept", "application/json")],
            None,
            false,
        ),
        ("GET", "Patient", &[("accept", "*/*")], None, false),
        (
            "GET",
            "Patient",
            &[("accept", "application/fhir+json, */*;q=0.1")],
            None,
            false,
        ),
        (
            "GET",
            "Patient",
            &[("accept", "application/fhir+json;fhirVersion=4.0")],
            None,
            false,
        ),
        ("GET", "Patient", &[("accept", "")], None, false),
        (
            "GET",
            "Patient",
            &[("accept", "application/fhir+json, application/fhir+xml;q=0")],
            None,
            false,
        ),
        (
            "GET",
            "Patient",
            &[("accept", "application/fhir+xml")],
            None,
            true,
        ),
        (
            "GET",
            "Patient",
            &[("Accept", "application/fhir+xml")],
            None,
            true,
        ),
        (
            "GET",
            "Patient",
            &[("accept", "application/xml")],
            None,
            true,
        ),
        ("GET", "Patient", &[("accept", "text/turtle")], None, true),
        ("GET", "Patient", &[("accept", "application/*")], None, true),
        (
            "GET",
            "Patient",
            &[(
                "accept",
                "application/fhir+json, application/fhir+xml;q=0.5",
            )],
            None,
            true,
        ),
        (
            "GET",
            "Patient",
            &[("accept", "application/json"), ("accept", "text/html")],
            None,
            true,
        ),
        ("POST", "Patient/_search", form, Some("_format=xml"), true),
        ("POST", "Patient/_search", form, Some("_format=json"), false),
    ];
    for (method, url, headers, body, expected) in table {
        check_format(method, url, headers, body, expected);
    }
}

fn check_bundle(body: Value, expected: BundleExpectation) {
    let bytes = serde_json::to_vec(&body).expect("serialize");
    let got = classify_raw("POST", "", &[], Some(&bytes)).map(|r| r.op);
    let expected = expected.map(|(transaction, entries)| FhirOp::Bundle {
        transaction,
        entries: entries.into_iter().map(|op| BundleEntry { op }).collect(),
    });
    assert_eq!(got, expected, "bundle {body}");
}

fn entry(method: &str, url: &str) -> Value {
    json!({"request": {"method": method, "url": url}})
}

#[test]
fn bundle_table() {
    let obs =
        json!({"resourceType":"Observation","status":"final","subject":{"reference":"Patient/p1"}});
    let patient = json!({"resourceType":"Patient","id":"p1"});
    // base64 of [{"op":"replace","path":"/active","value":false}]
    let patch_b64 = "W3sib3AiOiJyZXBsYWNlIiwicGF0aCI6Ii9hY3RpdmUiLCJ2YWx1ZSI6ZmFsc2V9XQ==";
    let table: Vec<(Value, BundleExpectation)> = vec![
        // case 111
        (
            json!({"resourceType":"Bundle","type":"batch","entry":[entry("GET","Patient/p1"), entry("GET","Observation/o1")]}),
            Ok((
                false,
                vec![Ok(read("Patient", "p1")), Ok(read("Observation", "o1"))],
            )),
        ),
        // case 110
        (
            json!({"resourceType":"Bundle","type":"transaction","entry":[
                {"resource": patient, "request": {"method":"PUT","url":"Patient/p1"}},
                {"fullUrl":"urn:uuid:7c2e1d4f-9a8b-4c3d-8e2f-1a0b9c8d7e62","resource": obs, "request": {"method":"POST","url":"Observation"}},
            ]}),
            Ok((
                true,
                vec![
                    Ok(FhirOp::Update {
                        resource_type: "Patient".into(),
                        id: "p1".into(),
                        resource: Some(patient.clone()),
                    }),
                    Ok(FhirOp::Create {
                        resource_type: "Observation".into(),
                        resource: Some(obs.clone()),
                        if_none_exist: None,
                    }),
                ],
            )),
        ),
        (
            json!({"resourceType":"Bundle","type":"batch"}),
            Ok((false, vec![])),
        ),
        (
            json!({"resourceType":"Bundle","type":"batch","entry":[]}),
            Ok((false, vec![])),
        ),
        (
            json!({"resourceType":"Bundle","type":"batch","entry":[
                entry("GET", "Patient?name=x&_include=Patient:organization:Organization"),
                entry("GET", "Patient/p1/_history/2"),
                entry("DELETE", "Patient?identifier=a%7Cb"),
                entry("DELETE", "Patient/p1"),
                entry("GET", "Patient/p1/Observation"),
                entry("GET", "Patient/p1/$everything"),
                entry("POST", "Patient/_search?name=x"),
                entry("HEAD", "Patient/p1"),
                entry("GET", "_history"),
                entry("GET", "metadata"),
            ]}),
            Ok((
                false,
                vec![
                    Ok(search(
                        "Patient",
                        &[
                            ("name", "x"),
                            ("_include", "Patient:organization:Organization"),
                        ],
                    )),
                    Ok(FhirOp::Vread {
                        resource_type: "Patient".into(),
                        id: "p1".into(),
                        version: "2".into(),
                    }),
                    Ok(FhirOp::ConditionalDelete {
                        resource_type: "Patient".into(),
                        criteria: qps(&[("identifier", "a|b")]),
                    }),
                    Ok(FhirOp::Delete {
                        resource_type: "Patient".into(),
                        id: "p1".into(),
                    }),
                    Ok(compartment("Patient", "p1", "Observation", &[])),
                    Ok(op("everything", Some("Patient"), Some("p1"))),
                    Ok(post_search(Some("Patient"), &[("name", "x")])),
                    Ok(read("Patient", "p1")),
                    Ok(history(None, None)),
                    Ok(FhirOp::Capabilities),
                ],
            )),
        ),
        // conditional create in a transaction, and entry-level failures
        (
            json!({"resourceType":"Bundle","type":"transaction","entry":[
                {"resource": obs, "request": {"method":"POST","url":"Observation","ifNoneExist":"identifier=x"}},
                {"resource": obs, "request": {"method":"PUT","url":"Observation/o1","ifNoneExist":"identifier=x"}},
                {"resource": obs, "request": {"method":"POST","url":"Patient"}},
                {"resource": {"resourceType":"Bundle","type":"batch"}, "request": {"method":"POST","url":"Bundle"}},
                {"request": {"method":"POST","url":""}},
                entry("GET", "http://evil.example/fhir/Patient/p1"),
                entry("GET", "urn:uuid:1234"),
                entry("GET", "/Patient/p1"),
                entry("GET", "Patient/../AccessPolicy"),
                entry("GET", "Patient%2Fp1"),
                entry("GET", "patient/p1"),
                entry("GET", "Patient?_method=DELETE"),
                entry("GET", "Patient?name=%zz"),
                entry("GET", "Patient/p1#x"),
                entry("GET", ""),
                entry("OPTIONS", "Patient"),
                entry("get", "Patient/p1"),
                {"request": {"url": "Patient/p1"}},
                {"request": {"method": "GET"}},
                {"request": "GET Patient/p1"},
                "entry",
                {"resource": patient},
            ]}),
            Ok((
                true,
                vec![
                    Ok(FhirOp::Create {
                        resource_type: "Observation".into(),
                        resource: Some(obs.clone()),
                        if_none_exist: Some(qps(&[("identifier", "x")])),
                    }),
                    Err(BadBody),
                    Err(BadBody),
                    Err(Unsupported),
                    Err(Unsupported),
                    Err(Unsupported),
                    Err(Unsupported),
                    Err(BadPath),
                    Err(BadPath),
                    Err(BadPath),
                    Err(UnknownType),
                    Err(MethodOverride),
                    Err(BadQuery),
                    Err(BadPath),
                    Err(Unsupported),
                    Err(MethodNotAllowed),
                    Err(MethodNotAllowed),
                    Err(BadBody),
                    Err(BadBody),
                    Err(BadBody),
                    Err(BadBody),
                    Err(BadBody),
                ],
            )),
        ),
        // PATCH entries: Binary JSON Patch or Parameters
        (
            json!({"resourceType":"Bundle","type":"batch","entry":[
                {"resource": {"resourceType":"Binary","contentType":"application/json-patch+json","data":patch_b64}, "request": {"method":"PATCH","url":"Patient/p1"}},
                {"resource": {"resourceType":"Parameters","parameter":[]}, "request": {"method":"PATCH","url":"Patient/p1"}},
                {"resource": {"resourceType":"Binary","contentType":"text/plain","data":patch_b64}, "request": {"method":"PATCH","url":"Patient/p1"}},
                {"resource": {"resourceType":"Binary","contentType":"application/json-patch+json","data":"!!"}, "request": {"method":"PATCH","url":"Patient/p1"}},
                {"resource": {"resourceType":"Patient"}, "request": {"method":"PATCH","url":"Patient/p1"}},
                {"resource": {"resourceType":"Binary","contentType":"application/json-patch+json","data":"e30="}, "request": {"method":"PATCH","url":"Patient?identifier=x"}},
            ]}),
            Ok((
                false,
                vec![
                    Ok(FhirOp::Patch {
                        resource_type: "Patient".into(),
                        id: "p1".into(),
                        patch: Some(json!([{"op":"replace","path":"/active","value":false}])),
                    }),
                    Ok(FhirOp::Patch {
                        resource_type: "Patient".into(),
                        id: "p1".into(),
                        patch: Some(json!({"resourceType":"Parameters","parameter":[]})),
                    }),
                    Err(BadBody),
                    Err(BadBody),
                    Err(BadBody),
                    Err(BadBody),
                ],
            )),
        ),
        (
            json!({"resourceType":"Bundle","type":"searchset"}),
            Err(BadBody),
        ),
        (
            json!({"resourceType":"Bundle","type":"collection","entry":[]}),
            Err(BadBody),
        ),
        (json!({"resourceType":"Bundle"}), Err(BadBody)),
        (
            json!({"resourceType":"Bundle","type":"batch","entry":{}}),
            Err(BadBody),
        ),
        (
            json!({"resourceType":"Patient","type":"batch"}),
            Err(BadBody),
        ),
        (json!([]), Err(BadBody)),
        (json!("batch"), Err(BadBody)),
    ];
    for (body, expected) in table {
        check_bundle(body, expected);
    }
}

#[test]
fn bundle_body_errors() {
    let table: Vec<(Headers, Option<&[u8]>, Unclassifiable)> = vec![
        (&[], None, BadBody),
        (&[], Some(b""), BadBody),
        (&[], Some(b"{"), BadBody),
        (&[], Some(b"\xff\xfe"), BadBody),
        (
            &[],
            Some(br#"{"resourceType":"Bundle","type":"batch","type":"transaction"}"#),
            BadBody,
        ),
        (
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(br#"{"resourceType":"Bundle","type":"batch"}"#),
            BadBody,
        ),
        (
            &[("content-type", "a"), ("content-type", "b")],
            Some(b"{}"),
            BadBody,
        ),
    ];
    for (headers, body, expected) in table {
        assert_eq!(
            classify_raw("POST", "", headers, body).map(|r| r.op),
            Err(expected),
            "{body:?}"
        );
    }
}

#[test]
fn required_access_through_classify() {
    use Interaction::*;
    type Needs<'a> = Vec<(&'a str, Interaction)>;
    let table: Vec<(&str, &str, Headers, Needs)> = vec![
        ("GET", "Patient/p1", &[], vec![("Patient", Read)]),
        (
            "GET",
            "Patient?_has:Observation:subject:code=2345-7",
            &[],
            vec![("Patient", Search), ("Observation", Search)],
        ),
        (
            "GET",
            "Observation?subject:Patient.name=Nguyen",
            &[],
            vec![("Observation", Search), ("Patient", Search)],
        ),
        (
            "GET",
            "Observation?subject.name=Nguyen",
            &[],
            vec![("Observation", Search), ("*", Search)],
        ),
        (
            "GET",
            "Patient/p1/Observation",
            &[],
            vec![("Observation", Search), ("Patient", Read)],
        ),
        (
            "GET",
            "Observation/_history",
            &[],
            vec![("Observation", History)],
        ),
        ("GET", "_history", &[], vec![("*", History)]),
        (
            "POST",
            "Patient",
            &[("if-none-exist", "identifier=x")],
            vec![("Patient", Create), ("Patient", Search)],
        ),
        (
            "GET",
            "?_type=Patient,Observation",
            &[],
            vec![("Patient", Search), ("Observation", Search)],
        ),
        ("GET", "?name=x", &[], vec![("*", Search)]),
        ("GET", "Patient/p1/$everything", &[], vec![]),
    ];
    for (method, url, headers, expected) in table {
        let got = classify_raw(method, url, headers, None)
            .expect("classified")
            .op
            .required_access();
        let expected: Vec<_> = expected
            .into_iter()
            .map(|(t, i)| (t.to_string(), i))
            .collect();
        assert_eq!(got, expected, "{method} {url}");
    }
}

#[test]
fn base64_decoder() {
    let table: &[(&str, Option<&[u8]>)] = &[
        ("", Some(b"")),
        ("e30=", Some(b"{}")),
        ("e30", Some(b"{}")),
        ("aGVsbG8=", Some(b"hello")),
        ("aGVs\nbG8=", Some(b"hello")),
        ("aGVsbA==", Some(b"hell")),
        ("_-8=", Some(&[0xff, 0xef])),
        ("a", None),
        ("e30=x", None),
        ("e3*0", None),
        ("e30===", None),
    ];
    for &(input, expected) in table {
        assert_eq!(decode_base64(input).as_deref(), expected, "{input:?}");
    }
}

#[test]
fn strict_json() {
    assert_eq!(
        parse_json_strict(br#"{"a":[1,2.5,-3,true,null,"x"]}"#),
        Some(json!({"a":[1,2.5,-3,true,null,"x"]}))
    );
    assert_eq!(parse_json_strict(br#"{"a":1,"a":1}"#), None);
    assert_eq!(parse_json_strict(br#"[{"a":{"b":1,"b":2}}]"#), None);
    assert_eq!(parse_json_strict(b"{} x"), None);
    let deep = "[".repeat(100_000);
    assert_eq!(parse_json_strict(deep.as_bytes()), None);
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "X",
];

fn method() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&METHODS[..])
}

/// Path-like strings: FHIR-ish tokens joined with separators and escapes.
fn path_like() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "Patient",
        "Observation",
        "p1",
        "_history",
        "1",
        "$everything",
        "$graphql",
        "metadata",
        "_search",
        "*",
        "..",
        ".",
        "%2F",
        "%2f",
        "%2e",
        "%5C",
        "%00",
        "%",
        "%zz",
        "AccessPolicy",
        "patient",
        "",
        ";",
        "\\",
        "é",
        "%C3%A9",
        "%ff",
    ]);
    prop::collection::vec(token, 0..6).prop_map(|ts| ts.join("/"))
}

fn body_like() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
            Just(None),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
            Just(Some(br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient/p1"}}]}"#.to_vec())),
            Just(Some(br#"{"resourceType":"Patient","id":"p1"}"#.to_vec())),
            Just(Some(br#"[{"op":"add","path":"/a","value":1}]"#.to_vec())),
            "[a-z_=&%+0-9]{0,20}".prop_map(|s| Some(s.into_bytes())),
        ]
}

fn headers_like() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop::sample::select(vec![
        "accept",
        "content-type",
        "if-none-exist",
        "x-http-method-override",
        "x-other",
    ]);
    prop::collection::vec((name.prop_map(str::to_string), ".{0,20}"), 0..3)
}

fn run(
    method: &str,
    path: &str,
    query: &Option<String>,
    headers: &[(String, String)],
    body: &Option<Vec<u8>>,
) -> Result<FhirRequest, Unclassifiable> {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    classify(&RequestParts {
        method,
        path,
        query: query.as_deref(),
        headers: &headers,
        body: body.as_deref(),
    })
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_input(
        method in ".{0,8}",
        path in ".{0,40}",
        query in proptest::option::of(".{0,40}"),
        headers in headers_like(),
        body in proptest::option::of(prop::collection::vec(any::<u8>(), 0..128)),
    ) {
        let _ = run(&method, &path, &query, &headers, &body);
    }

    #[test]
    fn never_panics_on_fhir_like_input(
        method in method(),
        path in path_like(),
        query in proptest::option::of("[a-zA-Z_:.=&%+0-9|,*]{0,30}"),
        headers in headers_like(),
        body in body_like(),
    ) {
        let _ = run(method, &path, &query, &headers, &body);
    }

    #[test]
    fn dirty_paths_are_always_errors(
        method in method(),
        prefix in path_like(),
        bad in prop::sample::select(vec!["..", "%2F", "%2f", "//", "/../", "%2e%2e", ".%2e"]),
        suffix in path_like(),
        query in proptest::option::of("[a-z_=&]{0,10}"),
        body in body_like(),
    ) {
        let path = format!("{prefix}{bad}{suffix}");
        prop_assert!(run(method, &path, &query, &[], &body).is_err(), "path {:?}", path);
    }

    #[test]
    fn classification_is_deterministic(
        method in method(),
        path in path_like(),
        query in proptest::option::of("[a-zA-Z_:.=&%+0-9|,]{0,30}"),
        headers in headers_like(),
        body in body_like(),
    ) {
        let first = run(method, &path, &query, &headers, &body);
        let second = run(method, &path, &query, &headers, &body);
        prop_assert_eq!(first, second);
    }

    #[test]
    fn bundle_entries_never_panic(
        entries in prop::collection::vec((method(), path_like(), "[a-z_=&%.:0-9]{0,12}"), 0..5),
        transaction in any::<bool>(),
    ) {
        let entries: Vec<Value> = entries
            .into_iter()
            .map(|(m, p, q)| json!({"request": {"method": m, "url": format!("{p}?{q}")}}))
            .collect();
        let body = json!({"resourceType": "Bundle", "type": if transaction { "transaction" } else { "batch" }, "entry": entries});
        let bytes = serde_json::to_vec(&body).expect("serialize");
        let got = classify_raw("POST", "", &[], Some(&bytes));
        let is_bundle = matches!(got, Ok(FhirRequest { op: FhirOp::Bundle { .. }, .. }));
        prop_assert!(is_bundle);
    }
}

fn page(handle: &str, seal: Option<&str>) -> FhirOp {
    FhirOp::Page {
        handle: handle.into(),
        seal: seal.map(str::to_string),
    }
}

#[test]
fn page_requests_carry_their_handle_and_nothing_else() {
    let form: &[(&str, &str)] = &[("content-type", "application/x-www-form-urlencoded")];
    let table: Vec<Row> = vec![
        (
            "GET",
            "?_getpages=h1&_getpagesoffset=2&_count=2&_bundletype=searchset",
            &[],
            None,
            Ok(page("h1", None)),
        ),
        (
            "HEAD",
            "?_getpages=h1&_fhirgate_seal=s1&_pretty=true&_format=json",
            &[],
            None,
            Ok(page("h1", Some("s1"))),
        ),
        // Anything a server could read as more than "that page" is refused.
        ("GET", "?_getpages=h1&name=x", &[], None, Err(Unsupported)),
        (
            "GET",
            "?_getpages=h1&_getpages=h2",
            &[],
            None,
            Err(Unsupported),
        ),
        (
            "GET",
            "?_getpages=h1&_fhirgate_seal=a&_fhirgate_seal=b",
            &[],
            None,
            Err(Unsupported),
        ),
        ("GET", "?_getpages=", &[], None, Err(Unsupported)),
        (
            "GET",
            "?_getpages=h1&_elements=id",
            &[],
            None,
            Err(Unsupported),
        ),
        (
            "GET",
            "?_getpages=h1&_bundletype=batch-response",
            &[],
            None,
            Err(Unsupported),
        ),
        (
            "GET",
            "?_getpages=h1&_bundletype=history&_pageId=2&_include=Observation:subject",
            &[],
            None,
            Ok(page("h1", None)),
        ),
        // A handle anywhere else: a server may answer with the page and ignore the rest.
        (
            "GET",
            "Patient?_getpages=h1&gender=male",
            &[],
            None,
            Err(Unsupported),
        ),
        (
            "GET",
            "Patient/p1/Observation?_getpages=h1",
            &[],
            None,
            Err(Unsupported),
        ),
        (
            "GET",
            "Patient/_history?_getpages=h1",
            &[],
            None,
            Err(Unsupported),
        ),
        ("GET", "_history?_getpages=h1", &[], None, Err(Unsupported)),
        (
            "GET",
            "Patient/p1/$everything?_getpages=h1",
            &[],
            None,
            Err(Unsupported),
        ),
        (
            "POST",
            "$everything",
            form,
            Some("_method=DELETE"),
            Err(MethodOverride),
        ),
        (
            "POST",
            "$everything",
            &[(
                "content-type",
                "Application/X-WWW-Form-Urlencoded; charset=utf-8",
            )],
            Some("_getpages=h1"),
            Err(Unsupported),
        ),
    ];
    for row in table {
        check(row);
    }
    // In a form body too: HAPI reads one of any POST as parameters, page handles included.
    for path in [
        "Patient/_search",
        "_search",
        "$everything",
        "Patient/p1/$everything",
        "$graphql",
    ] {
        check(("POST", path, form, Some("_getpages=h1"), Err(Unsupported)));
    }
    // A subset in an operation's form body would have the server trim what the checks read.
    for body in ["_elements=id", "_summary=true", "_summary=bogus"] {
        check((
            "POST",
            "Patient/p1/$everything",
            form,
            Some(body),
            Err(Unsupported),
        ));
        check(("POST", "$everything", form, Some(body), Err(Unsupported)));
    }
    // A search's form body keeps its subset, taken by the gateway after the checks.
    let got = classify_raw("POST", "Patient/_search", form, Some(b"_elements=id")).unwrap();
    assert!(got.subset.is_some());
}

#[test]
fn a_batch_entry_cannot_follow_a_page_handle() {
    let bundle = json!({"resourceType":"Bundle","type":"batch","entry":[
        entry("GET", "?_getpages=h1"),
        entry("GET", "Patient?_getpages=h1"),
    ]});
    check_bundle(
        bundle,
        Ok((false, vec![Err(Unsupported), Err(Unsupported)])),
    );
}
