//! The permission check (issue 17, README "Permission check"): `GET $check-permission` for one
//! interaction on a type or an instance, and `X-Fhirgate-Check: permission` on any request,
//! answered by the request path itself, criteria on the stored instance included, for the caller
//! or (for an admin) a named membership, through a real gateway in front of the real FHIR
//! upstream. A check never writes anything. (`tests/cases.rs` holds every case of the policy
//! corpus against the check too.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::TestGateway;
use common::http::rt;
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

/// The verdict of a check: allowed, status, reason.
fn verdict(body: &Value) -> (bool, u64, String) {
    let part = |name: &str| {
        body["parameter"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    assert_eq!(body["resourceType"], "Parameters", "{body}");
    (
        part("allowed")["valueBoolean"].as_bool().unwrap(),
        part("status")["valueInteger"].as_u64().unwrap(),
        part("reason")["valueCode"].as_str().unwrap().to_string(),
    )
}

struct Asker<'a> {
    gw: &'a TestGateway,
    token: String,
    on_behalf_of: Option<String>,
}

impl Asker<'_> {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = TestGateway::client()
            .request(method, format!("{}fhir/R4/{path}", self.gw.base))
            .bearer_auth(&self.token);
        if let Some(m) = &self.on_behalf_of {
            req = req.header("x-medplum-on-behalf-of", m);
        }
        req
    }

    /// `GET $check-permission?…`: (HTTP status, body).
    async fn ask(&self, query: &str) -> (u16, Value) {
        let resp = self
            .request(reqwest::Method::GET, &format!("$check-permission?{query}"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The verdict of `$check-permission?…`.
    async fn may(&self, query: &str) -> (bool, u64, String) {
        let (status, body) = self.ask(query).await;
        assert_eq!(status, 200, "{query}: {body}");
        verdict(&body)
    }

    /// The verdict of a whole request sent with `X-Fhirgate-Check: permission`.
    async fn check(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (bool, u64, String) {
        let mut req = self
            .request(method, path)
            .header("x-fhirgate-check", "permission");
        if let Some(b) = body {
            req = req.header("content-type", "application/fhir+json").json(&b);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        verdict(&resp.json().await.unwrap())
    }
}

fn patient(id: &str, org: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "managingOrganization": {"reference": format!("Organization/{org}")}})
}

fn observation(id: &str, category: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"text": "pulse"}, "subject": {"reference": "Patient/p1"}})
}

#[test]
fn a_ui_learns_what_a_member_may_do_and_nothing_changes() {
    let upstream = FhirUpstream::start();
    for r in [
        patient("p1", "north"),
        patient("p2", "south"),
        observation("o1", "vital-signs"),
        observation("o2", "laboratory"),
    ] {
        upstream.put_resource(&r);
    }
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let admin_token = gw.admin_token().await;
        let admin = Asker { gw: &gw, token: admin_token.clone(), on_behalf_of: None };
        // A nurse of the north clinic (the shipped role), as a client of the default project.
        let mut nurse_role: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/role-nurse.json")).unwrap(),
        )
        .unwrap();
        nurse_role["id"] = json!("nurse");
        let (status, body) = TestGateway::client()
            .put(format!("{}fhir/R4/AccessPolicy/nurse", gw.base))
            .bearer_auth(&admin_token)
            .json(&nurse_role)
            .send()
            .await
            .map(|r| (r.status().as_u16(), r))
            .unwrap();
        assert!(status == 201 || status == 200, "{:?}", body.text().await);
        let (client_id, secret) = gw.client_with_policy(&admin_token, None).await;
        let project = gw.project_of(&admin_token).await;
        let membership = gw
            .running()
            .state
            .store
            .search(
                "ProjectMembership",
                &[("profile".into(), vec![format!("ClientApplication/{client_id}")])],
                None,
                2,
            )
            .await
            .unwrap()
            .remove(0);
        let mut m = membership.content.clone();
        m["access"] = json!([{"policy": {"reference": "AccessPolicy/nurse"},
            "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/north"}}]}]);
        m.as_object_mut().unwrap().remove("accessPolicy");
        let resp = TestGateway::client()
            .post(format!("{}admin/projects/{project}/members/{}", gw.base, membership.id))
            .bearer_auth(&admin_token)
            .json(&m)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
        let nurse = Asker { gw: &gw, token: gw.token(&client_id, &secret, None).await, on_behalf_of: None };
        let sent_before = upstream.requests().len();

        // Reads: the stored instance decides.
        assert_eq!(nurse.may("interaction=read&resourceType=Patient&id=p1").await, (true, 200, "allow".into()));
        let (allowed, status, reason) = nurse.may("interaction=read&resourceType=Patient&id=p2").await;
        assert_eq!((allowed, status), (false, 404), "another clinic's patient is invisible: {reason}");
        assert!(nurse.may("interaction=search&resourceType=Patient").await.0);
        assert_eq!(nurse.may("interaction=read&resourceType=Appointment&id=a1").await, (false, 403, "type_interaction".into()));
        // Writes: decided at type level and on the current version, never performed.
        assert!(!nurse.may("interaction=update&resourceType=Patient&id=p1").await.0);
        assert!(nurse.may("interaction=create&resourceType=Observation").await.0);
        assert!(nurse.may("interaction=update&resourceType=Observation&id=o1").await.0, "a vital sign");
        let (allowed, status, _) = nurse.may("interaction=update&resourceType=Observation&id=o2").await;
        assert_eq!((allowed, status), (false, 403), "a lab result she may read but not change");
        assert!(!nurse.may("interaction=delete&resourceType=Observation&id=o1").await.0);
        assert_eq!(admin.may("interaction=delete&resourceType=Observation&id=o1").await, (true, 200, "allow".into()));
        // A whole request, with its body: the new version is checked too.
        assert!(nurse.check(reqwest::Method::POST, "Observation", Some(observation("n1", "vital-signs"))).await.0);
        let (allowed, status, _) = nurse.check(reqwest::Method::POST, "Observation", Some(observation("n2", "laboratory"))).await;
        assert_eq!((allowed, status), (false, 403));
        assert!(admin.check(reqwest::Method::DELETE, "Observation/o2", None).await.0);
        // Conditional writes are decided on the server's answer: a check never sends them.
        let mut renamed = patient("p1", "north");
        renamed["active"] = json!(false);
        assert!(admin.check(reqwest::Method::PUT, "Patient?_id=p1", Some(renamed)).await.0);
        assert!(admin.check(reqwest::Method::DELETE, "Observation?_id=o1", None).await.0);
        // HEAD has no body: the verdict is in the headers.
        let resp = nurse
            .request(reqwest::Method::HEAD, "Patient/p2")
            .header("x-fhirgate-check", "permission")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["x-fhirgate-allowed"], "false");
        assert_eq!(resp.headers()["x-fhirgate-status"], "404");

        // Nothing was written upstream: every request the checks made was a read.
        let sent: Vec<Value> = upstream.requests().into_iter().skip(sent_before).collect();
        assert!(!sent.is_empty(), "the instance checks read the stored versions");
        for r in &sent {
            assert_eq!(r["method"], "GET", "{r}");
        }
        assert_eq!(upstream.fhir("GET", "Observation/o1", None).status, 200);
        assert_eq!(upstream.fhir("GET", "Observation/o2", None).status, 200);
        assert_eq!(upstream.fhir("GET", "Observation/n1", None).status, 404);

        // An admin asks for a named membership (on-behalf-of); nobody else may.
        let for_nurse = Asker {
            gw: &gw,
            token: admin_token.clone(),
            on_behalf_of: Some(format!("ProjectMembership/{}", membership.id)),
        };
        assert!(!for_nurse.may("interaction=read&resourceType=Patient&id=p2").await.0);
        assert!(admin.may("interaction=read&resourceType=Patient&id=p2").await.0);
        let nurse_for_admin = Asker {
            gw: &gw,
            token: nurse.token.clone(),
            on_behalf_of: Some(format!("ProjectMembership/{}", membership.id)),
        };
        assert_eq!(
            nurse_for_admin.may("interaction=read&resourceType=Patient&id=p1").await,
            (false, 403, "on_behalf_of_not_admin".into())
        );

        // The identity types are the control API's: it checks them with its own rules.
        assert!(admin.may("interaction=delete&resourceType=AccessPolicy&id=nurse").await.0);
        assert!(!nurse.may("interaction=read&resourceType=AccessPolicy&id=nurse").await.0);
        assert!(admin.check(reqwest::Method::DELETE, "AccessPolicy/nurse", None).await.0);
        let mut changed = nurse_role.clone();
        changed["name"] = json!("renamed by a check");
        assert!(admin.check(reqwest::Method::PUT, "AccessPolicy/nurse", Some(changed)).await.0);
        let stored = gw.running().state.store.read("AccessPolicy", "nurse").await.unwrap().expect("still there");
        assert_eq!(stored.content["name"], nurse_role["name"], "not renamed");
        // An operation cannot be checked, and is not performed.
        let resp = admin
            .request(reqwest::Method::POST, &format!("ClientApplication/{client_id}/$rotate-secret"))
            .header("x-fhirgate-check", "permission")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        gw.token(&client_id, &secret, None).await;
    });
}

#[test]
fn a_malformed_or_unauthenticated_check_is_an_error_not_a_verdict() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let admin = Asker {
            gw: &gw,
            token: gw.admin_token().await,
            on_behalf_of: None,
        };
        for query in [
            "resourceType=Patient&id=p1",
            "interaction=read&resourceType=Patient",
            "interaction=read&resourceType=Nope&id=p1",
            "interaction=read&resourceType=Patient&id=a%2F..",
            "interaction=purge&resourceType=Patient&id=p1",
        ] {
            let (status, body) = admin.ask(query).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        }
        let resp = admin
            .request(
                reqwest::Method::POST,
                "$check-permission?interaction=read&resourceType=Patient&id=p1",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let resp = admin
            .request(reqwest::Method::GET, "Patient/p1")
            .header("x-fhirgate-check", "maybe")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let resp = TestGateway::client()
            .get(format!("{}auth/me", gw.base))
            .bearer_auth(&admin.token)
            .header("x-fhirgate-check", "permission")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            400,
            "only FHIR requests are checked"
        );
        // Without valid credentials there is nobody to check for.
        let nobody = Asker {
            gw: &gw,
            token: "not-a-token".into(),
            on_behalf_of: None,
        };
        let (status, body) = nobody
            .ask("interaction=read&resourceType=Patient&id=p1")
            .await;
        assert_eq!(status, 401, "{body}");
    });
}
