//! The FHIR test upstream (tests/upstream/server.mjs, or HAPI FHIR behind hapi-proxy.mjs on the
//! second pass) starts, stores and serves a resource, and records and forgets the requests it
//! receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::upstream::FhirUpstream;
use serde_json::json;

#[test]
fn the_upstream_is_the_server_this_pass_names() {
    // The second pass must really run against HAPI, and the first against Medplum's router.
    let upstream = FhirUpstream::start();
    let metadata = upstream.fhir("GET", "metadata", None);
    assert_eq!(metadata.status, 200, "{}", metadata.text());
    let software = metadata.json()["software"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let expected = if common::upstream::on_hapi() {
        "hapi fhir"
    } else {
        "@medplum/fhir-router"
    };
    assert!(software.contains(expected), "software.name = {software:?}");
}

#[test]
fn upstream_round_trips_a_patient_and_records_requests() {
    let upstream = FhirUpstream::start();
    assert_eq!(
        upstream.base_url,
        format!("http://127.0.0.1:{}/fhir/R4", upstream.port)
    );

    let patient = json!({
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Smith", "given": ["Ann"]}],
    });
    let put = upstream.fhir("PUT", "Patient/p1", Some(&patient));
    assert!(
        put.status == 200 || put.status == 201,
        "PUT Patient/p1: {} {}",
        put.status,
        put.text()
    );
    let version = put.json()["meta"]["versionId"]
        .as_str()
        .expect("stored resource has meta.versionId")
        .to_string();
    assert_eq!(
        put.header("etag"),
        Some(format!("W/\"{version}\"").as_str())
    );

    let get = upstream.fhir("GET", "Patient/p1", None);
    assert_eq!(get.status, 200, "GET Patient/p1: {}", get.text());
    assert!(
        get.header("content-type")
            .is_some_and(|t| t.starts_with("application/fhir+json")),
        "content-type: {:?}",
        get.header("content-type")
    );
    let body = get.json();
    assert_eq!(body["resourceType"], "Patient");
    assert_eq!(body["id"], "p1");
    assert_eq!(body["name"], patient["name"]);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "recorded: {requests:#?}");
    assert_eq!(requests[0]["method"], "PUT");
    assert_eq!(requests[0]["url"], "/fhir/R4/Patient/p1");
    assert_eq!(
        requests[0]["headers"]["content-type"],
        "application/fhir+json"
    );
    assert_eq!(requests[1]["method"], "GET");
    assert_eq!(requests[1]["url"], "/fhir/R4/Patient/p1");

    upstream.reset();
    assert!(
        upstream.requests().is_empty(),
        "reset clears the recorded requests"
    );
    let gone = upstream.fhir("GET", "Patient/p1", None);
    assert_eq!(
        gone.status,
        404,
        "reset empties the repository: {}",
        gone.text()
    );
    assert_eq!(gone.json()["resourceType"], "OperationOutcome");
}
