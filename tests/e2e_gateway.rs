//! End to end through a real fhirgate (pingora + control API + SQLite) in front of a real FHIR
//! server (Medplum's fhir-router, in memory, over HTTP): authentication on FHIR routes,
//! forwarding, header hygiene, type-level authorization, revocation and upstream failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway};
use common::http::{basic, rt, status};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

/// Creates a client whose membership references a new AccessPolicy (or none); returns (id, secret).
async fn new_client(gw: &TestGateway, admin: &str, policy: Option<Value>) -> (String, String) {
    let policy_id = match policy {
        Some(p) => {
            let (_, created) = gw.post("fhir/R4/AccessPolicy", Some(admin), &p).await;
            Some(created["id"].as_str().unwrap().to_string())
        }
        None => None,
    };
    gw.client_with_policy(admin, policy_id.as_deref()).await
}

#[test]
fn create_and_read_a_patient_with_bearer_and_basic() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let c = TestGateway::client();
        let token = gw.admin_token().await;
        let created = c
            .post(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .json(&json!({"resourceType": "Patient", "name": [{"family": "Smith", "given": ["Ann"]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let location = created.headers().get("location").map(|v| v.to_str().unwrap().to_string());
        let body: Value = created.json().await.unwrap();
        let id = body["id"].as_str().unwrap().to_string();
        if let Some(loc) = location {
            assert!(loc.starts_with(&gw.fhir), "Location {loc} must point at the gateway");
        }

        let read = c.get(format!("{}Patient/{id}", gw.fhir)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(read.status(), 200);
        let p: Value = read.json().await.unwrap();
        assert_eq!(p["name"][0]["family"], "Smith");

        let via_basic = c.get(format!("{}Patient/{id}", gw.fhir)).header("authorization", basic(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET)).send().await.unwrap();
        assert_eq!(via_basic.status(), 200);

        let search: Value = c.get(format!("{}Patient?family=Smith", gw.fhir)).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        assert_eq!(search["resourceType"], "Bundle");
        let text = search.to_string();
        assert!(!text.contains(&upstream.base_url), "upstream address leaked: {text}");
        assert!(search["entry"].as_array().unwrap().iter().any(|e| e["resource"]["id"] == id.as_str()));
    });
}

#[test]
fn every_malformed_or_unknown_credential_is_401() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let c = TestGateway::client();
        let cases = vec![
            "foo".to_string(),
            "foo foo".to_string(),
            "Bearer foo".to_string(),
            "Basic ".to_string(),
            "Basic foo".to_string(),
            basic("", "secret"),
            basic(ADMIN_CLIENT_ID, ""),
            basic("unknown-client", "secret"),
            basic(ADMIN_CLIENT_ID, "wrong"),
            "Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IngifQ.eyJleHAiOjk5OTk5OTk5OTl9.c2ln".to_string(),
        ];
        let before = upstream.requests().len();
        for auth in cases {
            let r = c
                .get(format!("{}Patient", gw.fhir))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{auth}");
            assert_eq!(
                r.headers().get("content-type").unwrap(),
                "application/fhir+json"
            );
            let body: Value = r.json().await.unwrap();
            assert_eq!(
                body["issue"][0]["details"]["text"], "Unauthorized",
                "{auth}"
            );
        }
        let none = c.get(format!("{}Patient", gw.fhir)).send().await.unwrap();
        assert_eq!(none.status(), 401);
        assert!(none.headers().get("www-authenticate").is_none());
        let prompt = c
            .get(format!("{}Patient?_medplum-prompt-basic-auth=1", gw.fhir))
            .send()
            .await
            .unwrap();
        assert_eq!(prompt.status(), 401);
        assert_eq!(
            prompt
                .headers()
                .get("www-authenticate")
                .unwrap()
                .to_str()
                .unwrap(),
            format!("Basic realm=\"{}\"", gw.base)
        );
        assert_eq!(
            upstream.requests().len(),
            before,
            "no unauthenticated request may reach the upstream"
        );
    });
}

#[test]
fn upstream_never_sees_client_credentials_or_spoofed_identity_headers() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let token = gw.admin_token().await;
        upstream.reset();
        let r = TestGateway::client()
            .get(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .header("x-fhirgate-profile", "Practitioner/spoofed")
            .header("x-fhirgate-project", "spoofed")
            // A server behind a proxy may build its URLs from these.
            .header("x-forwarded-prefix", "/elsewhere")
            .header("x-forwarded-port", "1")
            .header("forwarded", "host=elsewhere.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen = upstream.requests();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let headers = &seen[0]["headers"];
        assert!(
            headers.get("authorization").is_none(),
            "client Authorization reached upstream: {headers}"
        );
        assert_eq!(
            headers["x-fhirgate-profile"],
            format!("ClientApplication/{ADMIN_CLIENT_ID}")
        );
        assert_ne!(headers["x-fhirgate-project"], "spoofed");
        for name in ["x-forwarded-prefix", "x-forwarded-port", "forwarded"] {
            assert!(
                headers.get(name).is_none(),
                "{name} reached upstream: {headers}"
            );
        }
        assert!(
            headers["x-forwarded-for"]
                .as_str()
                .unwrap()
                .contains("127.0.0.1")
        );
    });
}

#[test]
fn type_level_policy_gives_403_and_nothing_reaches_upstream() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let policy = json!({"resourceType": "AccessPolicy", "name": "observations only", "resource": [{"resourceType": "Observation"}]});
        let (id, secret) = new_client(&gw, &admin, Some(policy)).await;
        let token = gw.token(&id, &secret, None).await;
        let c = TestGateway::client();
        upstream.reset();
        let r = c.get(format!("{}Patient", gw.fhir)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["issue"][0]["code"], "forbidden");
        assert!(upstream.requests().is_empty());
        let ok = c.get(format!("{}Observation", gw.fhir)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(ok.status(), 200);
    });
}

#[test]
fn revocation_takes_effect_on_the_next_request() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let c = TestGateway::client();
        let admin = gw.admin_token().await;
        let me: Value = c.get(format!("{}auth/me", gw.base)).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
        let project = me["project"]["id"].as_str().unwrap().to_string();

        // Client turned off: Bearer and Basic both stop at once.
        let (id, secret) = new_client(&gw, &admin, None).await;
        let token = gw.token(&id, &secret, None).await;
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).bearer_auth(&token)).await, 200);
        let mut client: Value = c.get(format!("{}ClientApplication/{id}", gw.fhir)).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
        client["status"] = json!("off");
        let put = c.put(format!("{}ClientApplication/{id}", gw.fhir)).bearer_auth(&admin).json(&client).send().await.unwrap();
        assert_eq!(put.status(), 200);
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).bearer_auth(&token)).await, 401);
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).header("authorization", basic(&id, &secret))).await, 401);

        // Membership deactivated.
        let (id2, secret2) = new_client(&gw, &admin, None).await;
        let token2 = gw.token(&id2, &secret2, None).await;
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).bearer_auth(&token2)).await, 200);
        let found: Value = c
            .get(format!("{}ProjectMembership?profile=ClientApplication/{id2}", gw.fhir))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut membership = found["entry"][0]["resource"].clone();
        let mid = membership["id"].as_str().unwrap().to_string();
        membership["active"] = json!(false);
        let post = c.post(format!("{}admin/projects/{project}/members/{mid}", gw.base)).bearer_auth(&admin).json(&membership).send().await.unwrap();
        assert_eq!(post.status(), 200);
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).bearer_auth(&token2)).await, 401);

        // Secret rotated: the old secret fails on the very next Basic request.
        let (id3, secret3) = new_client(&gw, &admin, None).await;
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).header("authorization", basic(&id3, &secret3))).await, 200);
        let rotate = json!({"resourceType": "Parameters", "parameter": [{"name": "secret", "valueString": secret3}]});
        let rotated = c.post(format!("{}ClientApplication/{id3}/$rotate-secret", gw.fhir)).bearer_auth(&admin).json(&rotate).send().await.unwrap();
        assert_eq!(rotated.status(), 200);
        let rotated: Value = rotated.json().await.unwrap();
        let new_secret = rotated["secret"].as_str().unwrap().to_string();
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).header("authorization", basic(&id3, &secret3))).await, 401);
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).header("authorization", basic(&id3, &new_secret))).await, 200);
    });
}

#[test]
fn upstream_down_answers_502_promptly() {
    let dead = format!("http://127.0.0.1:{}/fhir/R4", common::gateway::free_port());
    let gw = TestGateway::start(&dead);
    rt().block_on(async {
        let token = gw.admin_token().await;
        let started = Instant::now();
        let r = TestGateway::client()
            .get(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(
            !body.to_string().contains("127.0.0.1"),
            "upstream address leaked: {body}"
        );
        let w = TestGateway::client()
            .post(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .json(&json!({"resourceType": "Patient"}))
            .send()
            .await
            .unwrap();
        assert_eq!(w.status(), 502);
    });
}

#[test]
fn bootstrap_then_restart_keeps_keys_and_clients() {
    let upstream = FhirUpstream::start();
    let tmp = tempfile::tempdir().unwrap();
    // The issuer is the public base URL: keep it across the restart (ports change).
    let pin =
        |f: &mut fhirgate::config::ConfigFile| f.base_url = Some("http://fhirgate.test/".into());
    let gw = TestGateway::start_in(&upstream.base_url, tmp.path(), pin);
    assert_eq!(gw.running().bootstrap.client_id, ADMIN_CLIENT_ID);
    let token = rt().block_on(gw.admin_token());
    let jwks1: Value = rt().block_on(async {
        TestGateway::client()
            .get(format!("{}.well-known/jwks.json", gw.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    gw.stop();
    let gw2 = TestGateway::start_in(&upstream.base_url, tmp.path(), pin);
    assert!(
        gw2.running().bootstrap.client_secret.is_none(),
        "restart must not create a new admin client"
    );
    rt().block_on(async {
        let jwks2: Value = TestGateway::client()
            .get(format!("{}.well-known/jwks.json", gw2.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(jwks1, jwks2);
        // The token issued before the restart still works: same key, same Login.
        let r = TestGateway::client()
            .get(format!("{}Patient", gw2.fhir))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let fresh = gw2.admin_token().await;
        assert!(!fresh.is_empty());
    });
}

#[test]
fn metadata_is_public_and_advertises_oauth() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let r = TestGateway::client()
            .get(format!("{}metadata", gw.fhir))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cs: Value = r.json().await.unwrap();
        assert_eq!(cs["resourceType"], "CapabilityStatement");
        let text = cs.to_string();
        assert!(text.contains(&format!("{}oauth2/token", gw.base)), "{text}");
        let health = TestGateway::client()
            .get(format!("{}readyz", gw.metrics))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let metrics = TestGateway::client()
            .get(format!("{}metrics", gw.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("fhirgate_requests_total"), "{metrics}");
    });
}

#[test]
fn metadata_is_rendered_once_and_served_from_memory() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let get = |query: &'static str| {
            let url = format!("{}metadata{query}", gw.fhir);
            async move {
                let r = TestGateway::client().get(url).send().await.unwrap();
                let status = r.status().as_u16();
                let etag = r
                    .headers()
                    .get("etag")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, etag, r.bytes().await.unwrap())
            }
        };
        let metadata_requests = || {
            upstream
                .requests()
                .iter()
                .filter(|r| r["url"].as_str().unwrap_or("").contains("/metadata"))
                .count()
        };
        // fhirgate asks once at start, to warn about an upstream that does not answer.
        let before = metadata_requests();
        let (status, etag, first) = get("").await;
        assert_eq!(status, 200);
        let cs: Value = serde_json::from_slice(&first).unwrap();
        assert!(cs.to_string().contains(&format!("{}oauth2/token", gw.base)));
        for _ in 0..5 {
            let (status, again_etag, again) = get("").await;
            assert_eq!((status, &again_etag), (200, &etag));
            assert_eq!(again, first, "the same rendering");
        }
        assert_eq!(
            metadata_requests(),
            before + 1,
            "answered from memory after the first"
        );
        // Another form of the request goes upstream, and is rendered as always.
        let (status, _, other) = get("?_format=json").await;
        assert_eq!(status, 200);
        assert_eq!(metadata_requests(), before + 2);
        let other: Value = serde_json::from_slice(&other).unwrap();
        assert!(
            other
                .to_string()
                .contains(&format!("{}oauth2/token", gw.base))
        );
        if let Some(etag) = etag {
            let r = TestGateway::client()
                .get(format!("{}metadata", gw.fhir))
                .header("if-none-match", etag)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 304);
            assert_eq!(metadata_requests(), before + 2);
        }
    });
}

#[test]
fn a_client_if_match_is_checked_against_the_version_the_gateway_checked() {
    // The gateway pins every update, patch and delete to the version it checked, so it answers
    // the client's own If-Match itself: servers differ on one they cannot parse (HAPI: 500) and
    // on DELETE (HAPI ignores it).
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    upstream.put_resource(&json!({"resourceType": "Patient", "id": "im1", "active": true}));
    rt().block_on(async {
        let token = gw.admin_token().await;
        let put = |id: &'static str, if_match: &'static str| {
            let (gw, token) = (&gw, &token);
            async move {
                TestGateway::client()
                    .put(format!("{}Patient/{id}", gw.fhir))
                    .bearer_auth(token)
                    .header("if-match", if_match)
                    .json(&json!({"resourceType": "Patient", "id": id, "active": false}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        let writes = || {
            upstream
                .requests()
                .iter()
                .filter(|r| r["method"] == "PUT" || r["method"] == "DELETE")
                .count()
        };
        let before = writes();
        // Not there: no version can match; nothing is created.
        assert_eq!(put("im-missing", "W/\"1\"").await, 412);
        // There, but another version (and one no server could parse).
        assert_eq!(put("im1", "W/\"0f1e2d3c-stale\"").await, 412);
        let del = TestGateway::client()
            .delete(format!("{}Patient/im1", gw.fhir))
            .bearer_auth(&token)
            .header("if-match", "W/\"99\"")
            .send()
            .await
            .unwrap();
        assert_eq!(del.status().as_u16(), 412);
        assert_eq!(writes(), before, "nothing written upstream");
        assert_eq!(upstream.fhir("GET", "Patient/im-missing", None).status, 404);
        // `*` matches the version that is there.
        assert_eq!(put("im1", "*").await, 200);
    });
}

#[test]
fn string_criteria_are_checked_at_home_for_an_upstream_without_contains() {
    // A HAPI server with `allow_contains_searches` off refuses `name:contains=…` (HAPI-1258):
    // with `upstream_contains_search = false` the gateway never sends it. The upstream then
    // answers more, and the gateway keeps exactly what the criteria allow (Medplum's
    // case-insensitive *contains*), without a total.
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start_with(&upstream.base_url, |c| {
        c.upstream_contains_search = Some(false);
    });
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let mut allowed = std::collections::HashSet::new();
        for (family, gender, visible) in [
            ("Annsley", "female", true),
            ("Joanne", "female", true),
            ("Annsley", "male", false),
            ("Bob", "female", false),
        ] {
            let r = TestGateway::client()
                .post(format!("{}Patient", gw.fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "Patient", "gender": gender,
                              "name": [{"family": family}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            let p: Value = r.json().await.unwrap();
            if visible {
                allowed.insert(p["id"].as_str().unwrap().to_string());
            }
        }
        let policy = json!({"resourceType": "AccessPolicy", "name": "ann",
            "resource": [{"resourceType": "Patient", "criteria": "Patient?name=ann&gender=female"}]});
        let (id, secret) = new_client(&gw, &admin, Some(policy)).await;
        let token = gw.token(&id, &secret, None).await;
        let before = upstream.requests().len();
        let r = TestGateway::client()
            .get(format!("{}Patient?_count=50", gw.fhir))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let bundle: Value = r.json().await.unwrap();
        let ids: std::collections::HashSet<String> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
            .collect();
        assert_eq!(ids, allowed, "{bundle}");
        assert!(bundle.get("total").is_none(), "{bundle}");
        let sent: Vec<String> = upstream
            .requests()
            .iter()
            .skip(before)
            .filter(|r| r["method"] == "GET")
            .filter_map(|r| r["url"].as_str().map(str::to_string))
            .collect();
        assert!(!sent.is_empty());
        for url in &sent {
            assert!(!url.contains("contains"), "{url}");
        }
        assert!(sent.iter().any(|u| u.contains("gender=female")), "{sent:?}");
        // A conditional create probe could not be narrowed exactly: refused.
        let r = TestGateway::client()
            .post(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .header("if-none-exist", "identifier=urn:x|1")
            .json(&json!({"resourceType": "Patient", "gender": "female",
                          "name": [{"family": "Annsley"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    });
}

#[test]
fn logout_revokes_the_login_on_the_next_request() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let c = TestGateway::client();
        let token = gw.admin_token().await;
        let other = gw.admin_token().await;
        let patients = format!("{}Patient", gw.fhir);
        let logout = format!("{}oauth2/logout", gw.base);
        assert_eq!(status(c.get(&patients).bearer_auth(&token)).await, 200);
        assert_eq!(status(c.post(&logout).bearer_auth(&token)).await, 200);
        assert_eq!(
            status(c.get(&patients).bearer_auth(&token)).await,
            401,
            "a revoked Login's token must fail at once"
        );
        assert_eq!(
            status(c.get(format!("{}auth/me", gw.base)).bearer_auth(&token)).await,
            401
        );
        // Another Login of the same client is unaffected.
        assert_eq!(status(c.get(&patients).bearer_auth(&other)).await, 200);
        // Logging out again with the dead token is unauthenticated.
        assert_eq!(status(c.post(&logout).bearer_auth(&token)).await, 401);
    });
}

#[test]
fn an_id_token_is_not_an_access_token() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let c = TestGateway::client();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", ADMIN_CLIENT_ID),
            ("client_secret", ADMIN_CLIENT_SECRET),
        ];
        let body: Value = c
            .post(format!("{}oauth2/token", gw.base))
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id_token = body["id_token"].as_str().unwrap();
        let r = c
            .get(format!("{}Patient", gw.fhir))
            .bearer_auth(id_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    });
}

#[test]
fn lab_analyzer_with_shipped_policy_posts_observations_and_nothing_else() {
    let upstream = FhirUpstream::start();
    let policies = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let gw = TestGateway::start_with(&upstream.base_url, |f| f.policies_dir = Some(policies));
    rt().block_on(async {
        let c = TestGateway::client();
        let admin = gw.admin_token().await;
        let me: Value = c.get(format!("{}auth/me", gw.base)).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
        let project = me["project"]["id"].as_str().unwrap().to_string();
        let body = json!({"name": "analyzer", "accessPolicy": {"reference": "AccessPolicy/lab-analyzer"}});
        let created: Value = c
            .post(format!("{}admin/projects/{project}/client", gw.base))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (id, secret) = (created["id"].as_str().unwrap(), created["secret"].as_str().unwrap());
        let auth = basic(id, secret);
        let lab = json!({"resourceType": "Observation", "status": "final", "category": [{"coding": [{"code": "laboratory"}]}], "code": {"text": "Glucose"}});
        let r = c.post(format!("{}Observation", gw.fhir)).header("authorization", &auth).json(&lab).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let vitals = json!({"resourceType": "Observation", "status": "final", "category": [{"coding": [{"code": "vital-signs"}]}], "code": {"text": "Pulse"}});
        let r = c.post(format!("{}Observation", gw.fhir)).header("authorization", &auth).json(&vitals).send().await.unwrap();
        assert_eq!(r.status(), 403, "outside the policy's criteria");
        assert_eq!(status(c.get(format!("{}Patient", gw.fhir)).header("authorization", &auth)).await, 403);
        assert_eq!(status(c.get(format!("{}Observation", gw.fhir)).header("authorization", &auth)).await, 403);
        // The same client from outside the lab subnet (through a trusted proxy) is refused.
        let r = c
            .post(format!("{}Observation", gw.fhir))
            .header("authorization", &auth)
            .header("x-forwarded-for", "8.8.8.8")
            .json(&lab)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    });
}

#[test]
fn admins_get_the_decision_trace_and_others_cannot() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let c = TestGateway::client();
        let admin = gw.admin_token().await;
        upstream.reset();
        let r = c.get(format!("{}Patient?name=x", gw.fhir)).bearer_auth(&admin).header("x-fhirgate-explain", "1").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let trace: Value = r.json().await.unwrap();
        assert_eq!(trace["decision"]["allow"], true, "{trace}");
        assert_eq!(trace["needs"][0]["resourceType"], "Patient");
        assert_eq!(trace["needs"][0]["interaction"], "search");
        assert!(upstream.requests().is_empty(), "an explained request is not forwarded");

        // A non-admin's header is ignored (and never forwarded): the request runs normally.
        let policy = json!({"resourceType": "AccessPolicy", "name": "observations", "resource": [{"resourceType": "Observation"}]});
        let (id, secret) = new_client(&gw, &admin, Some(policy)).await;
        let token = gw.token(&id, &secret, None).await;
        let r = c.get(format!("{}Patient", gw.fhir)).bearer_auth(&token).header("x-fhirgate-explain", "1").send().await.unwrap();
        assert_eq!(r.status(), 403);
        let r = c.get(format!("{}Observation", gw.fhir)).bearer_auth(&token).header("x-fhirgate-explain", "1").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["resourceType"], "Bundle");
        let seen = upstream.requests();
        assert!(seen.iter().all(|s| s["headers"].get("x-fhirgate-explain").is_none()));
    });
}

#[test]
fn upstream_by_host_name_is_resolved_off_the_request_path() {
    // A name (as in compose or Kubernetes), not an address: it must be looked up by the
    // resolver, never on the request path, and an unresolvable one must answer 502, not panic.
    let upstream = FhirUpstream::start();
    let by_name = upstream.base_url.replace("127.0.0.1", "localhost");
    assert_ne!(by_name, upstream.base_url);
    let gw = TestGateway::start(&by_name);
    let nowhere = TestGateway::start("http://no-such-host.invalid:8080/fhir/R4");
    rt().block_on(async {
        let token = gw.admin_token().await;
        let created = TestGateway::client()
            .post(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .json(&json!({"resourceType": "Patient", "name": [{"family": "Named"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let read = TestGateway::client()
            .get(format!("{}Patient/{id}", gw.fhir))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200);

        let token = nowhere.admin_token().await;
        for _ in 0..3 {
            let r = TestGateway::client()
                .get(format!("{}Patient", nowhere.fhir))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 502);
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["resourceType"], "OperationOutcome");
        }
    });
}

#[test]
fn unfiltered_responses_stream_untouched_and_filtered_ones_are_bounded() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start_with(&upstream.base_url, |f| {
        f.max_response_buffer = Some(4096);
    });
    rt().block_on(async {
        let c = TestGateway::client();
        let admin = gw.admin_token().await;
        // Stored directly upstream: a create through the gateway is mediated, and its answer
        // would meet the bound too.
        let id = "big-patient";
        let big =
            json!({"resourceType": "Patient", "id": id, "name": [{"family": "L".repeat(20_000)}]});

        // A read with nothing to check streams: byte for byte what the upstream sends, past the
        // buffer bound, with the client's Accept-Encoding passed on.
        upstream.reset();
        upstream.put_resource(&big);
        let before = upstream.requests().len();
        let read = c
            .get(format!("{}Patient/{id}", gw.fhir))
            .bearer_auth(&admin)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200);
        let through_gateway = read.bytes().await.unwrap();
        let seen = upstream.requests();
        assert_eq!(
            seen[before]["headers"]["accept-encoding"], "gzip",
            "{seen:?}"
        );
        let direct = upstream.fhir("GET", &format!("Patient/{id}"), None);
        assert!(through_gateway.len() > 4096);
        assert_eq!(through_gateway.as_ref(), direct.body.as_slice());

        // A search is buffered to be filtered: past the bound it is a 502 OperationOutcome,
        // never part of the Bundle, and the upstream was asked for a plain body.
        let before = upstream.requests().len();
        let search = c
            .get(format!("{}Patient?_id={id}", gw.fhir))
            .bearer_auth(&admin)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(search.status(), 502);
        let body: Value = search.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(
            body["issue"][0]["details"]["text"],
            "Upstream response too large to filter"
        );
        assert!(
            !body.to_string().contains(&"L".repeat(100)),
            "partial data sent"
        );
        let seen = upstream.requests();
        assert!(
            seen[before]["headers"].get("accept-encoding").is_none(),
            "{seen:?}"
        );

        // Under the bound, the same search is answered in full.
        let (status, small) = gw
            .post(
                "fhir/R4/Patient",
                Some(&admin),
                &json!({"resourceType": "Patient", "name": [{"family": "Short"}]}),
            )
            .await;
        assert_eq!(status, 201);
        let small_id = small["id"].as_str().unwrap();
        let found: Value = c
            .get(format!("{}Patient?_id={small_id}", gw.fhir))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(found["entry"][0]["resource"]["id"], small_id);
    });
}
