//! The byte path (`fast.rs`) against the `Value` path (`filter_value`): same JSON out, member
//! order included, for every policy and body here, and the byte path really taken where it is
//! meant to be.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;
use crate::policy::model::AccessPolicy;

// === policies ===

fn policy(resource: Value) -> EffectivePolicy {
    let ap: AccessPolicy = serde_json::from_value(json!({
        "resourceType": "AccessPolicy",
        "id": "p",
        "resource": resource,
    }))
    .expect("AccessPolicy");
    let e = EffectivePolicy::from_access_policy(ap, false, false);
    assert!(e.compile_errors().is_empty(), "{:?}", e.compile_errors());
    e
}

/// Every policy shape the byte path has to get right, by name.
fn policies() -> Vec<(&'static str, EffectivePolicy)> {
    vec![
        (
            "patient-compartment",
            policy(json!([
                {"resourceType": "Patient", "criteria": "Patient?_id=p1", "readonly": true},
                {"resourceType": "Observation", "criteria": "Observation?subject=Patient/p1", "readonly": true},
                {"resourceType": "Condition", "criteria": "Condition?subject=Patient/p1", "readonly": true}
            ])),
        ),
        (
            "auditor (leaf hiddenFields on *)",
            policy(json!([
                {"resourceType": "*", "readonly": true, "hiddenFields": ["identifier", "performer"]}
            ])),
        ),
        (
            "deep and choice hiddenFields",
            policy(json!([
                {"resourceType": "Observation", "readonly": true,
                 "hiddenFields": ["component.value[x]", "meta.tag", "value[x]", "note.text", "status"]},
                {"resourceType": "Patient", "readonly": true,
                 "hiddenFields": ["name.given", "birthDate", "telecom", "identifier.value"]}
            ])),
        ),
        (
            "criteria and hiddenFields, first match wins",
            policy(json!([
                {"resourceType": "Observation", "criteria": "Observation?subject=Patient/p1",
                 "readonly": true, "hiddenFields": ["performer"]},
                {"resourceType": "Observation", "criteria": "Observation?status=final",
                 "readonly": true, "hiddenFields": ["subject", "identifier.system"]},
                {"resourceType": "Patient", "readonly": true, "hiddenFields": ["name"]}
            ])),
        ),
        (
            "*?_compartment",
            policy(json!([
                {"resourceType": "*", "criteria": "*?_compartment=Patient/p1", "readonly": true}
            ])),
        ),
        (
            "entry compartment (meta.compartment)",
            policy(json!([
                {"resourceType": "Observation", "compartment": {"reference": "Patient/p1"}, "readonly": true}
            ])),
        ),
        (
            ":missing, :not, string, token, date (choice element)",
            policy(json!([
                {"resourceType": "Observation", "criteria": "Observation?performer:missing=true&status:not=cancelled", "readonly": true},
                {"resourceType": "Observation", "criteria": "Observation?code=http://loinc.org|85354-9&date=ge2024-01-01", "readonly": true, "hiddenFields": ["identifier"]},
                {"resourceType": "Patient", "criteria": "Patient?name=smi", "readonly": true},
                {"resourceType": "Patient", "criteria": "Patient?birthdate=lt2000", "readonly": true, "hiddenFields": ["name.family"]}
            ])),
        ),
        (
            "*?_lastUpdated and Binary",
            policy(json!([
                {"resourceType": "*", "criteria": "*?_lastUpdated=ge2024-01-01", "readonly": true, "hiddenFields": ["meta.source"]},
                {"resourceType": "Binary", "readonly": true}
            ])),
        ),
        ("nothing granted", policy(json!([]))),
    ]
}

// === bodies ===

fn obs(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000Z",
                 "tag": [{"code": "t"}], "source": "lab", "compartment": [{"reference": patient}]},
        "identifier": [{"system": "urn:lab", "value": format!("L-{id}")}],
        "status": "final",
        "_status": {"extension": [{"url": "urn:x", "valueString": "y"}]},
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "BP"},
        "subject": {"reference": patient},
        "effectiveDateTime": "2024-04-30T09:30:00+02:00",
        "performer": [{"reference": "Practitioner/pr1", "display": "Dr. \"Quote\" \u{e9}"}],
        "valueQuantity": {"value": 1.50, "unit": "mmHg"},
        "note": [{"text": "line\nbreak", "authorString": "x"}],
        "component": [
            {"code": {"text": "sys"}, "valueQuantity": {"value": 120}},
            {"code": {"text": "dia"}, "valueString": "80"}
        ]
    })
}

fn patient(id: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "urn:mrn", "value": "123"}],
        "name": [{"family": "Smith", "given": ["Ann", "B"], "_given": [null, {"id": "g"}]}],
        "telecom": [{"system": "phone", "value": "555"}],
        "birthDate": "1990-01-01",
        "_birthDate": {"extension": [{"url": "urn:t", "valueTime": "10:00:00"}]}
    })
}

fn outcome() -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "informational", "diagnostics": "x"}]})
}

fn searchset(entries: Vec<Value>) -> Value {
    json!({
        "resourceType": "Bundle",
        "id": "s",
        "type": "searchset",
        "total": entries.len(),
        "link": [{"relation": "self", "url": "http://up/fhir/Observation?_count=10"},
                 {"relation": "next", "url": "http://up/fhir/Observation?_count=10&_offset=10"}],
        "entry": entries
    })
}

fn entry(resource: Value) -> Value {
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("x")
        .to_string();
    json!({"fullUrl": format!("http://up/fhir/X/{id}"), "resource": resource, "search": {"mode": "match"}})
}

fn varied() -> Value {
    searchset(vec![
        entry(obs("o1", "Patient/p1")),
        entry(obs("o2", "Patient/p2")),
        entry(patient("p1")),
        entry(patient("p2")),
        json!({"fullUrl": "urn:uuid:1", "resource": patient("p1"), "search": {"mode": "include"}}),
        json!({"fullUrl": "urn:uuid:2", "resource": obs("o3", "http://up/fhir/Patient/p1"), "search": {"mode": "include"}}),
        json!({"resource": outcome(), "search": {"mode": "outcome"}}),
        json!({"fullUrl": "http://up/fhir/Observation/gone", "search": {"mode": "match"}}),
        entry(
            json!({"resourceType": "Binary", "id": "b1", "contentType": "text/plain", "data": "aGk="}),
        ),
        entry(
            json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}, "identifier": [{"value": "c"}]}),
        ),
        entry(
            json!({"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p2"}}),
        ),
        entry(json!({"id": "no-type", "subject": {"reference": "Patient/p1"}})),
        entry(json!({"resourceType": 7, "id": "bad-type"})),
        entry(
            json!({"resourceType": "Observation", "id": "o4", "status": "cancelled", "subject": {"reference": "Patient/p1"}}),
        ),
        entry(searchset(vec![
            entry(obs("n1", "Patient/p1")),
            entry(obs("n2", "Patient/p2")),
        ])),
    ])
}

// === comparison ===

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("output is JSON")
}

/// Same JSON and same member order (serde_json's Map equality ignores order).
fn assert_same_json(a: &[u8], b: &[u8], what: &str) {
    let (va, vb) = (json_of(a), json_of(b));
    assert_eq!(va, vb, "{what}");
    assert_eq!(va.to_string(), vb.to_string(), "member order: {what}");
}

/// The byte path must be taken and agree with the Value path.
fn assert_fast_same(policy: &EffectivePolicy, body: &[u8], drop_total: bool, what: &str) {
    assert_fast_same_rw(policy, body, drop_total, None, what);
}

fn assert_fast_same_rw(
    policy: &EffectivePolicy,
    body: &[u8],
    drop_total: bool,
    rewrite: Option<UrlRewrite<'_>>,
    what: &str,
) {
    let text = std::str::from_utf8(body).expect("utf-8");
    let fast = fast::filter(policy, text, drop_total, rewrite)
        .unwrap_or_else(|_| panic!("the byte path should apply: {what}"));
    let Ok(Filtered::Visible(slow)) = filter_bytes_value(policy, body, drop_total, rewrite) else {
        panic!("the Value path filters a Bundle to something visible: {what}");
    };
    assert_same_json(&fast, &slow, what);
    assert_eq!(
        filter_bytes(policy, body, drop_total, rewrite).ok(),
        Some(Filtered::Visible(fast)),
        "{what}"
    );
}

/// Whatever path is taken, `filter_bytes` agrees with the Value path.
fn assert_same(policy: &EffectivePolicy, body: &[u8], drop_total: bool, what: &str) {
    assert_same_rw(policy, body, drop_total, None, what);
}

fn assert_same_rw(
    policy: &EffectivePolicy,
    body: &[u8],
    drop_total: bool,
    rewrite: Option<UrlRewrite<'_>>,
    what: &str,
) {
    let slow = filter_bytes_value(policy, body, drop_total, rewrite);
    let bytes = filter_bytes(policy, body, drop_total, rewrite);
    match (&slow, &bytes) {
        (Ok(Filtered::Visible(a)), Ok(Filtered::Visible(b))) => assert_same_json(a, b, what),
        (Ok(Filtered::Hidden), Ok(Filtered::Hidden)) | (Err(_), Err(_)) => {}
        _ => panic!("{what}: Value path {slow:?}, byte path {bytes:?}"),
    }
}

fn gives_up(policy: &EffectivePolicy, body: &[u8], rewrite: Option<UrlRewrite<'_>>) -> bool {
    std::str::from_utf8(body).map_or(true, |t| fast::filter(policy, t, false, rewrite).is_err())
}

// === tests ===

#[test]
fn varied_bundle_every_policy_both_total_modes() {
    let compact = serde_json::to_vec(&varied()).expect("json");
    let pretty = serde_json::to_vec_pretty(&varied()).expect("json");
    for (name, p) in policies() {
        for drop_total in [false, true] {
            assert_fast_same(&p, &compact, drop_total, name);
            assert_fast_same(&p, &pretty, drop_total, name);
        }
    }
}

#[test]
fn what_the_patient_policy_leaves() {
    let p = &policies()[0].1;
    let body = serde_json::to_vec(&varied()).expect("json");
    let Ok(Filtered::Visible(out)) = filter_bytes(p, &body, false, None) else {
        panic!("visible");
    };
    let out = json_of(&out);
    let ids: Vec<&str> = out["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap_or("-"))
        .collect();
    // o3's subject is absolute; the outcome, the resource-less entry and the nested Bundle stay.
    assert_eq!(ids, ["o1", "p1", "p1", "o3", "-", "-", "c1", "o4", "s"]);
    assert!(
        out.get("total").is_none(),
        "entries were dropped: total goes"
    );
    assert_eq!(out["link"], varied()["link"]);
    let nested = &out["entry"][8]["resource"];
    assert!(
        nested.get("total").is_none(),
        "a nested Bundle never keeps total"
    );
    assert_eq!(nested["entry"].as_array().map(Vec::len), Some(1));
}

#[test]
fn total_stays_only_when_nothing_was_dropped_and_it_may() {
    let p = &policies()[0].1;
    let body = serde_json::to_vec(&searchset(vec![
        entry(obs("o1", "Patient/p1")),
        entry(obs("o2", "Patient/p1")),
    ]))
    .expect("json");
    for (drop_total, kept) in [(false, true), (true, false)] {
        let Ok(Filtered::Visible(out)) = filter_bytes(p, &body, drop_total, None) else {
            panic!("visible");
        };
        assert_eq!(json_of(&out).get("total").is_some(), kept);
        assert_fast_same(p, &body, drop_total, "all kept");
    }
    // Unchanged entries are the upstream's bytes.
    let Ok(Filtered::Visible(out)) = filter_bytes(p, &body, false, None) else {
        panic!("visible");
    };
    assert_eq!(out, body);
    let no_total = br#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#;
    assert_fast_same(p, no_total, true, "no total, no entries");
    let no_entry = br#"{"resourceType":"Bundle","type":"searchset","total":0}"#;
    assert_fast_same(p, no_entry, false, "no entry member");
}

#[test]
fn total_goes_back_where_it_was() {
    let p = &policies()[0].1;
    let kept =
        r#"{"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p1"}}}"#;
    let gone =
        r#"{"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p2"}}}"#;
    let rt = r#""resourceType":"Bundle""#;
    for entries in [
        format!("[{kept}]"),
        format!("[{kept},{gone}]"),
        "[]".to_string(),
    ] {
        let e = format!(r#""entry":{entries}"#);
        for members in [
            [r#""total":1"#, rt, r#""type":"searchset""#, &e],
            [rt, r#""total":1"#, r#""type":"searchset""#, &e],
            [rt, r#""type":"searchset""#, &e, r#""total":1"#],
            [r#""tot\u0061l" : 1"#, rt, &e, r#""type":"searchset""#],
            [&e, r#""total":1"#, rt, r#""type":"searchset""#],
            [rt, &e, r#""type":"searchset""#, r#""link":[]"#],
        ] {
            let body = format!("{{{}}}", members.join(","));
            for drop_total in [false, true] {
                assert_fast_same(p, body.as_bytes(), drop_total, &body);
            }
        }
    }
}

#[test]
fn hidden_fields_in_arrays_choices_and_primitive_siblings() {
    let p = &policies()[2].1;
    let body = serde_json::to_vec(&searchset(vec![
        entry(obs("o1", "Patient/p1")),
        entry(patient("p1")),
    ]))
    .expect("json");
    assert_fast_same(p, &body, false, "deep hidden");
    let Ok(Filtered::Visible(out)) = filter_bytes(p, &body, false, None) else {
        panic!("visible");
    };
    let out = json_of(&out);
    let o = &out["entry"][0]["resource"];
    assert!(
        o.get("valueQuantity").is_none() && o.get("status").is_none() && o.get("_status").is_none()
    );
    assert!(o["meta"].get("tag").is_none() && o["meta"]["versionId"] == "1");
    assert!(
        o["component"][0].get("valueQuantity").is_none()
            && o["component"][1].get("valueString").is_none()
    );
    assert_eq!(o["note"][0], json!({"authorString": "x"}));
    let pt = &out["entry"][1]["resource"];
    assert!(
        pt.get("birthDate").is_none()
            && pt.get("_birthDate").is_none()
            && pt.get("telecom").is_none()
    );
    assert_eq!(pt["name"][0], json!({"family": "Smith"}));
    assert_eq!(pt["identifier"][0], json!({"system": "urn:mrn"}));
}

#[test]
fn entry_before_resource_type_escaped_names_and_whitespace() {
    let p = &policies()[0].1;
    let body = br#"  {"entry" : [ {"res\u006furce": {"subject": {"reference": "Patient/p1"}, "resourceType": "Observation"}},
        {"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p9"}}} ],
      "total": 2, "resource\u0054ype": "Bundle", "type": "searchset", "x\"y": "\u00e9\n\"" }  "#;
    assert_fast_same(p, body, false, "odd but valid spelling");
}

#[test]
fn duplicate_members() {
    let p = &policies()[0].1;
    // In a resource: collapsed as serde_json does (last value, first position), byte path kept.
    let dup_resource = br#"{"resourceType":"Bundle","type":"searchset","entry":[
        {"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p1"},"subject":{"reference":"Patient/p2"}}},
        {"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p2"},"subject":{"reference":"Patient/p1"},"id":"a","id":"b"}}]}"#;
    assert_fast_same(p, dup_resource, false, "duplicates in a resource");
    // In an entry or the Bundle: the Value path decides.
    let dup_entry = br#"{"resourceType":"Bundle","type":"searchset","entry":[
        {"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p1"}},"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p2"}}}]}"#;
    let dup_bundle = br#"{"resourceType":"Bundle","type":"searchset","entry":[
        {"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p1"}}}],"entry":[
        {"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p2"}}}]}"#;
    for body in [&dup_entry[..], &dup_bundle[..]] {
        assert!(gives_up(p, body, None));
        assert_same(p, body, false, "duplicates in an entry or the Bundle");
        let Ok(Filtered::Visible(out)) = filter_bytes(p, body, false, None) else {
            panic!("visible");
        };
        assert_eq!(json_of(&out)["entry"].as_array().map(Vec::len), Some(0));
    }
}

#[test]
fn what_the_byte_path_leaves_to_the_value_path() {
    let p = &policies()[0].1;
    let cases: [&[u8]; 12] = [
        br#"{"resourceType":"Bundle","type":"batch-response","entry":[{"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p2"}}}]}"#,
        br#"{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":{"status":"201"}}]}"#,
        br#"{"resourceType":"Bundle","type":"searchset","entry":[5, null, "x", [], {"resource":{"resourceType":"Patient","id":"p1"}}]}"#,
        br#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":null},{"resource":[1]},{"resource":"Patient"}]}"#,
        br#"{"resourceType":"Bundle","type":"searchset","entry":{"resource":{"resourceType":"Patient","id":"p2"}},"total":3}"#,
        br#"{"resourceType":"Patient","id":"p1"}"#,
        br#"{"resourceType":"Patient","id":"p2"}"#,
        br#"{"resourceType":"OperationOutcome","issue":[]}"#,
        br#"[{"resourceType":"Bundle"}]"#,
        br#""Bundle""#,
        br#"null"#,
        br#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p1\ud800"}}}]}"#,
    ];
    for body in cases {
        assert_same(p, body, false, &String::from_utf8_lossy(body));
        assert_same(p, body, true, &String::from_utf8_lossy(body));
    }
    assert_eq!(
        filter_bytes(p, cases[6], false, None).ok(),
        Some(Filtered::Hidden)
    );
}

#[test]
fn malformed_bodies_are_errors_never_panics() {
    let p = &policies()[0].1;
    let cases: [&[u8]; 10] = [
        b"",
        b"   ",
        b"not json",
        br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation"}}"#,
        br#"{"resourceType":"Bundle","entry":[]} trailing"#,
        br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation",}}]}"#,
        b"{\"resourceType\":\"Bundle\",\"entry\":[{\"resource\":{\"resourceType\":\"Observation\",\"x\":\"\xff\"}}]}",
        br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation","x":"\q"}}]}"#,
        br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation","x":01}}]}"#,
        br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Observation","x":"a	b"}}]}"#,
    ];
    for body in cases {
        assert!(
            matches!(
                filter_bytes(p, body, false, None),
                Err(FilterError::Malformed(_))
            ),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn copied_members_keep_the_upstream_spelling() {
    // Documented difference: what is copied is not decoded, so a number beyond f64 or a lone
    // surrogate escape in a member the policy never reads passes as written.
    let p = &policies()[0].1;
    let body = br#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation","subject":{"reference":"Patient/p1"},"valueDecimal":1.50,"note":[{"text":"\ud800"}],"x":1e999}}]}"#;
    assert!(filter_bytes_value(p, body, false, None).is_err());
    assert_eq!(
        filter_bytes(p, body, false, None).ok(),
        Some(Filtered::Visible(body.to_vec()))
    );
}

// === upstream URLs ===

const UP: UrlRewrite<'static> = UrlRewrite {
    from: "http://up/fhir",
    to: "https://gw.example/fhir/R4",
};

/// Checks an absolute reference exactly: it only matches once the URL has been rewritten.
fn gateway_url_policy() -> EffectivePolicy {
    policy(json!([
        {"resourceType": "Observation", "criteria": "Observation?subject=https://gw.example/fhir/R4/Patient/p1", "readonly": true},
        {"resourceType": "Patient", "readonly": true, "hiddenFields": ["link.other"]}
    ]))
}

#[test]
fn urls_are_rewritten_as_the_value_path_does() {
    let mut all = policies();
    all.push(("gateway URL in criteria", gateway_url_policy()));
    let compact = serde_json::to_vec(&varied()).expect("json");
    for (name, p) in &all {
        for drop_total in [false, true] {
            assert_fast_same_rw(p, &compact, drop_total, Some(UP), name);
        }
    }
    let p = gateway_url_policy();
    let body = serde_json::to_vec(&searchset(vec![
        entry(obs("o1", "http://up/fhir/Patient/p1")),
        entry(obs("o2", "Patient/p1")),
        entry(json!({"resourceType": "Patient", "id": "p1",
                     "link": [{"other": {"reference": "http://up/fhir/Patient/p2"}, "type": "seealso"}]})),
    ]))
    .expect("json");
    let Ok(Filtered::Visible(out)) = filter_bytes(&p, &body, false, Some(UP)) else {
        panic!("visible");
    };
    let out = json_of(&out);
    let entries = out["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "the criteria saw the rewritten reference");
    assert_eq!(entries[0]["fullUrl"], "https://gw.example/fhir/R4/X/o1");
    assert_eq!(
        entries[0]["resource"]["subject"]["reference"],
        "https://gw.example/fhir/R4/Patient/p1"
    );
    assert_eq!(
        entries[1]["resource"]["link"][0],
        json!({"type": "seealso"})
    );
    assert_eq!(
        out["link"][1]["url"],
        "https://gw.example/fhir/R4/Observation?_count=10&_offset=10"
    );
    assert!(
        !String::from_utf8_lossy(&serde_json::to_vec(&out).expect("json")).contains("http://up/")
    );
}

#[test]
fn only_string_values_that_start_with_the_base_are_rewritten() {
    let p = &policies()[1].1;
    let body = br#"{"resourceType":"Bundle","type":"searchset","link":[{"url":"http://up/fhir/x"}],"entry":[
        {"fullUrl":"http://up/fhirplus/X/1","resource":{"resourceType":"Basic","id":"1",
         "http://up/fhir/as-a-name":"http://up/fhir/value","text":"see \"http://up/fhir/x\" and http://up/fhir/y",
         "deep":{"http://up/fhir/k" : ["http://up/fhir/a", "xhttp://up/fhir/b", "\\", "http://up/fhir"]}}}]}"#;
    assert_fast_same_rw(p, body, false, Some(UP), "names, quotes, middles");
    let Ok(Filtered::Visible(out)) = filter_bytes(p, body, false, Some(UP)) else {
        panic!("visible");
    };
    let out = json_of(&out);
    let r = &out["entry"][0]["resource"];
    assert_eq!(
        out["entry"][0]["fullUrl"],
        "https://gw.example/fhir/R4plus/X/1"
    );
    assert_eq!(
        r["http://up/fhir/as-a-name"],
        "https://gw.example/fhir/R4/value"
    );
    assert_eq!(r["text"], "see \"http://up/fhir/x\" and http://up/fhir/y");
    assert_eq!(
        r["deep"]["http://up/fhir/k"],
        json!([
            "https://gw.example/fhir/R4/a",
            "xhttp://up/fhir/b",
            "\\",
            "https://gw.example/fhir/R4"
        ])
    );
}

#[test]
fn escapes_that_could_spell_the_base_leave_it_to_the_value_path() {
    let p = &policies()[1].1;
    for body in [
        &br#"{"resourceType":"Bundle","type":"searchset","entry":[{"fullUrl":"http:\/\/up\/fhir\/X\/1"}]}"#[..],
        br#"{"resourceType":"Bundle","type":"searchset","entry":[{"fullUrl":"\u0068ttp://up/fhir/X/1"}]}"#,
    ] {
        assert!(gives_up(p, body, Some(UP)));
        assert!(!gives_up(p, body, None));
        assert_same_rw(p, body, false, Some(UP), "escaped base");
        let Ok(Filtered::Visible(out)) = filter_bytes(p, body, false, Some(UP)) else {
            panic!("visible");
        };
        assert_eq!(json_of(&out)["entry"][0]["fullUrl"], "https://gw.example/fhir/R4/X/1");
    }
    // A base that escapes could hide in, or that could close a string, is never matched raw.
    for from in ["", "/fhir", "http://a\"b"] {
        let r = UrlRewrite { from, to: "x" };
        assert!(gives_up(
            p,
            br#"{"resourceType":"Bundle","entry":[]}"#,
            Some(r)
        ));
    }
}

// === generated bundles ===

fn arb_reference() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"reference": "Patient/p1"})),
        Just(json!({"reference": "Patient/p2"})),
        Just(json!({"reference": "http://up/fhir/Patient/p1/_history/2"})),
        Just(json!({"reference": "http://up/fhir/Patient/p1"})),
        Just(json!("http://up/fhir/Patient/p2")),
        Just(json!({"reference": "Practitioner/pr1"})),
        Just(json!({"display": "no reference"})),
        Just(json!("Patient/p1")),
        Just(json!(null)),
    ]
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("final")),
        Just(json!("cancelled")),
        Just(json!("Smith")),
        Just(json!("2024-04-30T09:30:00Z")),
        Just(json!("1999-12-31")),
        Just(json!(1.5)),
        Just(json!(-3)),
        Just(json!(true)),
        Just(json!(null)),
        Just(json!("a \"quoted\" \\ line\nbreak \u{e9}\u{1F600}")),
        arb_reference(),
        Just(json!([{"system": "http://loinc.org", "code": "85354-9"}])),
        Just(json!({"coding": [{"system": "http://loinc.org", "code": "85354-9"}]})),
        Just(json!([{"system": "urn:lab", "value": "v"}])),
        Just(json!({"start": "2023-01-01", "end": "2025-01-01"})),
        Just(json!([{"given": ["Ann"], "family": "Smith"}])),
        Just(
            json!({"tag": [{"code": "t"}], "compartment": [{"reference": "Patient/p1"}], "lastUpdated": "2024-05-01T00:00:00Z", "source": "s"})
        ),
    ]
}

const KEYS: [&str; 24] = [
    "id",
    "meta",
    "status",
    "_status",
    "subject",
    "patient",
    "performer",
    "identifier",
    "code",
    "effectiveDateTime",
    "effectivePeriod",
    "valueQuantity",
    "valueString",
    "_valueString",
    "name",
    "birthDate",
    "_birthDate",
    "telecom",
    "note",
    "component",
    "text",
    "contained",
    "extension",
    "custom",
];

fn arb_resource() -> impl Strategy<Value = Value> {
    let rtype = prop_oneof![
        4 => Just(json!("Observation")),
        3 => Just(json!("Patient")),
        1 => Just(json!("Condition")),
        1 => Just(json!("OperationOutcome")),
        1 => Just(json!("Binary")),
        1 => Just(json!("Practitioner")),
        1 => Just(json!("Nope")),
        1 => Just(json!(3)),
    ];
    (
        proptest::option::weighted(0.95, rtype),
        0usize..4,
        proptest::collection::vec((proptest::sample::select(&KEYS[..]), arb_leaf()), 0..10),
        any::<bool>(),
    )
        .prop_map(|(rtype, at, members, component)| {
            let mut members: Vec<(String, Value)> = members
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            if component {
                let inner = members.iter().take(3).cloned().collect::<Map<_, _>>();
                members.push(("component".into(), json!([inner, {"valueString": "x"}])));
            }
            if let Some(t) = rtype {
                members.insert(at.min(members.len()), ("resourceType".into(), t));
            }
            Value::Object(members.into_iter().collect())
        })
}

fn arb_entry() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => arb_resource().prop_map(entry),
        1 => Just(json!({"fullUrl": "urn:uuid:x", "search": {"mode": "outcome"}})),
        1 => arb_resource().prop_map(|r| json!({"search": {"mode": "include"}, "resource": r})),
        1 => proptest::collection::vec(arb_resource().prop_map(entry), 0..3)
            .prop_map(|entries| entry(searchset(entries))),
    ]
}

fn arb_bundle() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(arb_entry(), 0..8),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just("searchset"),
            Just("collection"),
            Just("history"),
            Just("batch-response")
        ],
    )
        .prop_map(|(entries, total, entry_first, ty)| {
            let mut m = Map::new();
            if entry_first {
                m.insert("entry".into(), Value::Array(entries.clone()));
            }
            m.insert("resourceType".into(), json!("Bundle"));
            m.insert("type".into(), json!(ty));
            if total {
                m.insert("total".into(), json!(entries.len()));
            }
            m.insert(
                "link".into(),
                json!([{"relation": "self", "url": "http://up/fhir/x"}]),
            );
            if !entry_first {
                m.insert("entry".into(), Value::Array(entries));
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn byte_path_equals_value_path(bundle in arb_bundle(), drop_total in any::<bool>(), pretty in any::<bool>(), rewrite in any::<bool>()) {
        let body = if pretty {
            serde_json::to_vec_pretty(&bundle)
        } else {
            serde_json::to_vec(&bundle)
        }
        .expect("json");
        let searchset = bundle["type"] != "batch-response";
        let rewrite = rewrite.then_some(UP);
        for (name, p) in policies().into_iter().chain([("gateway URL in criteria", gateway_url_policy())]) {
            if searchset {
                assert_fast_same_rw(&p, &body, drop_total, rewrite, name);
            } else {
                assert_same_rw(&p, &body, drop_total, rewrite, name);
            }
        }
    }

    #[test]
    fn never_panics_on_mangled_bodies(bundle in arb_bundle(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut body = serde_json::to_vec(&bundle).expect("json");
        let i = cut.index(body.len().max(1));
        if let Some(b) = body.get_mut(i) {
            *b = byte;
        }
        for (name, p) in policies() {
            assert_same(&p, &body, false, name);
            assert_same(&p, &body[..i], false, name);
        }
    }
}
