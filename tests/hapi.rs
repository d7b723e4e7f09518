//! fhirgate in front of a real HAPI FHIR server (`tests/common/hapi.rs`, a partition of its own
//! per test): what differs from Medplum's router — numeric server ids, `Location` with
//! `_history`, and paging links that are opaque cached-search handles on the server base
//! (`?_getpages=<id>&_getpagesoffset=…`) — through the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::gateway::TestGateway;
use common::http::{rt, send};
use serde_json::{Value, json};

/// Creates an AccessPolicy through the gateway as `admin`; returns its id.
async fn policy(gw: &TestGateway, admin: &str, resource: Value) -> String {
    let (s, p) = send(
        TestGateway::client()
            .post(format!("{}AccessPolicy", gw.fhir))
            .bearer_auth(admin)
            .json(
                &json!({"resourceType": "AccessPolicy", "name": "hapi test", "resource": resource}),
            ),
    )
    .await;
    assert_eq!(s, 201, "{p}");
    p["id"].as_str().unwrap().to_string()
}

#[test]
fn writes_reads_and_narrowed_searches_through_hapi() {
    let upstream = common::hapi::partition();
    let gw = TestGateway::start(&upstream);
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let mut female = HashSet::new();
        for gender in ["female", "male", "female"] {
            let r = TestGateway::client()
                .post(format!("{}Patient", gw.fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "Patient", "gender": gender}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            // HAPI answers with its own base and a versioned URL: the gateway's base replaces it.
            let location = r.headers()["location"].to_str().unwrap().to_string();
            let p: Value = r.json().await.unwrap();
            let id = p["id"].as_str().unwrap().to_string();
            assert_eq!(
                location,
                format!("{}Patient/{id}/_history/1", gw.fhir),
                "Location"
            );
            if gender == "female" {
                female.insert(id);
            }
        }
        let id = female.iter().next().unwrap().clone();
        let (s, read) = send(
            TestGateway::client()
                .get(format!("{}Patient/{id}", gw.fhir))
                .bearer_auth(&admin),
        )
        .await;
        assert_eq!((s, read["id"].as_str()), (200, Some(id.as_str())));

        // A caller whose policy allows female Patients only: its search is narrowed upstream.
        let narrow = policy(
            &gw,
            &admin,
            json!([{"resourceType": "Patient", "criteria": "Patient?gender=female"}]),
        )
        .await;
        let (a_id, a_secret) = gw.client_with_policy(&admin, Some(&narrow)).await;
        let a = gw.token(&a_id, &a_secret, None).await;
        let (s, bundle) = send(
            TestGateway::client()
                .get(format!("{}Patient", gw.fhir))
                .bearer_auth(&a),
        )
        .await;
        assert_eq!(s, 200, "{bundle}");
        let ids: HashSet<String> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, female);
        let self_link = bundle["link"][0]["url"].as_str().unwrap();
        assert!(self_link.starts_with(&gw.fhir), "{self_link}");
    });
}
