#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Issue 10, end to end through the real gateway in front of the real test upstream (SQLite, and
//! PostgreSQL under `FHIRGATE_TEST_STORE=postgres`):
//! - signing keys and the client-secret hash key are sealed with a key-encryption key kept
//!   outside the store (a 0600 file by default); an instance with another key refuses to start;
//!   secrets an earlier version stored in clear are sealed at the next start;
//! - `_elements` / `_summary` never make the gateway check a trimmed resource: the upstream is
//!   asked for whole resources, the gateway trims after its checks;
//! - the security trail reaches the project's upstream as AuditEvents its admins read and
//!   nobody else does, without a secret or token in it;
//! - a client's JWK Set is used no longer than its `Cache-Control` allows.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::assertion::{assertion, assertion_key};
use common::gateway::TestGateway;
use common::http::rt;
use common::people::{seed_admin_client, seed_client, seed_policy, seed_project, token_request};
use common::upstream::FhirUpstream;
use fhirgate::sealed::is_sealed;
use fhirgate::store::{Store, StoredKey};
use fhirgate_core::fhir::subset::SUBSETTED_CODE;
use fhirgate_core::policy::isolation::PROJECT_TAG_SYSTEM;
use serde_json::{Value, json};

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

async fn sealed_state(store_url: &str) -> (Vec<(String, String)>, Option<String>, Option<String>) {
    let store = Store::open(store_url).await.unwrap();
    (
        store.key_secrets().await.unwrap(),
        store.setting("secret_hash_key").await.unwrap(),
        store.setting("secret_hash_key_sealed").await.unwrap(),
    )
}

#[test]
fn signing_keys_and_the_hash_key_are_sealed_with_a_key_outside_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = FhirUpstream::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let gw = TestGateway::start_in(&upstream.base_url, &dir, |_| {});
    let store_url = gw.running().state.config.store_url.clone();
    let token = rt().block_on(gw.admin_token());

    let kek_file = dir.join("key-encryption-key");
    let mode = std::fs::metadata(&kek_file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the key-encryption key file is private"
    );
    let (keys, clear_hash_key, sealed_hash_key) = rt().block_on(sealed_state(&store_url));
    assert!(!keys.is_empty());
    for (kid, stored) in &keys {
        assert!(is_sealed(stored), "signing key {kid} is stored in clear");
    }
    assert_eq!(clear_hash_key, None, "the hash key is stored in clear");
    assert!(is_sealed(&sealed_hash_key.expect("a sealed hash key")));
    let _ = gw.stop();

    // Another key-encryption key cannot use this store: no start, and the reason says which
    // setting to fix.
    let other = STANDARD.encode([3u8; 32]);
    let refused = TestGateway::try_start_in(&upstream.base_url, &dir, |c| {
        c.key_encryption_key = Some(other)
    })
    .err()
    .expect("a start with another key-encryption key fails");
    assert!(
        refused.contains("another key-encryption key")
            && refused.contains("FHIRGATE_KEY_ENCRYPTION_KEY"),
        "{refused}"
    );
    // A malformed one is refused too, before the store is touched.
    let refused = TestGateway::try_start_in(&upstream.base_url, &dir, |c| {
        c.key_encryption_key = Some("short".into())
    })
    .err()
    .expect("a malformed key-encryption key fails");
    assert!(refused.contains("32 bytes"), "{refused}");

    // The same key (its file): the instance starts, signs with the key it sealed, and the
    // admin client's secret (hashed with the sealed hash key) still authenticates.
    let gw = TestGateway::start_in(&upstream.base_url, &dir, |_| {});
    let again = rt().block_on(gw.admin_token());
    assert_eq!(kid_of(&again), kid_of(&token));
    rt().block_on(async {
        let (s, _) = gw.get("fhir/R4/Patient?_count=1", Some(&again)).await;
        assert_eq!(s, 200);
    });
}

#[test]
fn secrets_an_earlier_version_stored_in_clear_are_sealed_at_the_next_start() {
    let upstream = FhirUpstream::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let url = common::pg::store_for(&dir)
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("fhirgate.db").display()));
    let kid = uuid::Uuid::new_v4().to_string();
    rt().block_on(async {
        // The store as a version before sealing left it.
        let store = Store::open(&url).await.unwrap();
        let (_, der) = fhirgate::tokens::SigningKey::generate(kid.clone()).unwrap();
        store
            .insert_key(&StoredKey {
                id: kid.clone(),
                alg: "ES256".into(),
                private_der: STANDARD.encode(der),
                active: true,
                created_at: fhirgate::store::now_unix(),
            })
            .await
            .unwrap();
        store
            .setting_init("secret_hash_key", &fhirgate::tokens::random_hex(32))
            .await
            .unwrap();
    });
    let gw = TestGateway::start_in(&upstream.base_url, &dir, |_| {});
    // The old key still signs and the admin client's secret (hashed with the old hash key)
    // still authenticates.
    let token = rt().block_on(gw.admin_token());
    assert_eq!(kid_of(&token), kid);
    let (keys, clear_hash_key, sealed_hash_key) = rt().block_on(sealed_state(&url));
    // The old ES256 key, and the RS256 key a store from before RS256 gets at its next start.
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|k| is_sealed(&k.1)),
        "a key is still in clear"
    );
    assert_eq!(clear_hash_key, None);
    assert!(sealed_hash_key.is_some());
    let _ = gw.stop();
    // And it keeps working after another restart, from the sealed values alone.
    let gw = TestGateway::start_in(&upstream.base_url, &dir, |_| {});
    let again = rt().block_on(gw.admin_token());
    assert_eq!(kid_of(&again), kid);
}

fn has_subsetted_tag(resource: &Value) -> bool {
    resource["meta"]["tag"]
        .as_array()
        .is_some_and(|tags| tags.iter().any(|t| t["code"] == SUBSETTED_CODE))
}

#[test]
fn subsets_are_taken_after_the_checks_on_whole_resources() {
    let upstream = FhirUpstream::start();
    let narrative = json!({"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Hb</div>"});
    upstream.put_resource(&json!({"resourceType": "Observation", "id": "final-1",
        "status": "final", "code": {"text": "Hb"}, "text": narrative}));
    upstream.put_resource(&json!({"resourceType": "Observation", "id": "prelim-1",
        "status": "preliminary", "code": {"text": "Hb"}}));
    let gw = TestGateway::start(&upstream.base_url);
    // Finished results only: the criterion reads `status`, which `_elements=code` would trim.
    let policy = seed_policy(
        &gw,
        None,
        json!({"resource": [{"resourceType": "Observation", "criteria": "Observation?status:not=preliminary"}]}),
    );
    let (id, secret) = seed_client(&gw, None, json!({}), Some(&policy));
    rt().block_on(async {
        let token = gw.token(&id, &secret, None).await;
        for q in [
            "_elements=code",
            "_elements=code,id",
            "_summary=true",
            "_summary=text",
            "_summary=data",
        ] {
            let (s, body) = gw
                .get(&format!("fhir/R4/Observation/prelim-1?{q}"), Some(&token))
                .await;
            assert_eq!(s, 404, "{q}: {body}");
        }

        let (s, o) = gw
            .get("fhir/R4/Observation/final-1?_elements=code", Some(&token))
            .await;
        assert_eq!(s, 200, "{o}");
        assert_eq!(o["code"]["text"], "Hb");
        assert!(o.get("status").is_none() && o.get("text").is_none(), "{o}");
        assert!(has_subsetted_tag(&o), "{o}");
        let (s, o) = gw
            .get("fhir/R4/Observation/final-1?_summary=data", Some(&token))
            .await;
        assert_eq!(s, 200);
        assert!(o.get("text").is_none() && o["status"] == "final", "{o}");
        assert!(has_subsetted_tag(&o));

        let (s, bundle) = gw
            .get("fhir/R4/Observation?_elements=code", Some(&token))
            .await;
        assert_eq!(s, 200, "{bundle}");
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        assert_eq!(entries.len(), 1, "{bundle}");
        assert_eq!(entries[0]["resource"]["id"], "final-1");
        assert!(entries[0]["resource"].get("status").is_none());
        assert!(has_subsetted_tag(&entries[0]["resource"]));
        // The same search as a POST form.
        let (s, bundle) = common::http::send(
            TestGateway::client()
                .post(format!("{}fhir/R4/Observation/_search", gw.base))
                .bearer_auth(&token)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("_elements=code"),
        )
        .await;
        assert_eq!(s, 200, "{bundle}");
        assert_eq!(
            bundle["entry"].as_array().map(Vec::len),
            Some(1),
            "{bundle}"
        );
        assert!(bundle["entry"][0]["resource"].get("status").is_none());

        // A batch entry that asks for a subset gets its resource whole, checked.
        let (s, batch) = gw
            .post(
                "fhir/R4",
                Some(&token),
                json!({"resourceType": "Bundle", "type": "batch", "entry": [
                    {"request": {"method": "GET", "url": "Observation/prelim-1?_elements=code"}},
                    {"request": {"method": "GET", "url": "Observation/final-1?_elements=code"}}
                ]}),
            )
            .await;
        assert_eq!(s, 200, "{batch}");
        assert!(
            batch["entry"][0]["response"]["status"]
                .as_str()
                .unwrap_or("")
                .starts_with("404"),
            "{batch}"
        );
        assert_eq!(batch["entry"][1]["resource"]["status"], "final", "{batch}");

        // An unknown `_summary` is refused, not passed on.
        let (s, _) = gw
            .get("fhir/R4/Observation/final-1?_summary=most", Some(&token))
            .await;
        assert_eq!(s, 400);

        // Whatever the form, the upstream was never asked for part of a resource.
        for r in upstream.requests() {
            let url = r["url"].as_str().unwrap_or("");
            let body = r["body"].as_str().unwrap_or("");
            for asked in [url, body] {
                assert!(
                    !asked.contains("_elements") && !asked.contains("_summary"),
                    "the upstream was asked for a subset: {r}"
                );
            }
        }
    });
}

/// The AuditEvents the upstream holds (straight from it, past the gateway).
fn trail(upstream: &FhirUpstream) -> Vec<Value> {
    let r = upstream.fhir("GET", "AuditEvent?_count=1000", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
        .unwrap_or_default()
}

fn event_code(e: &Value) -> &str {
    e["subtype"][0]["code"].as_str().unwrap_or("")
}

fn marker(e: &Value) -> Vec<&str> {
    e["meta"]["tag"]
        .as_array()
        .map(|tags| {
            tags.iter()
                .filter(|t| t["system"] == PROJECT_TAG_SYSTEM)
                .filter_map(|t| t["code"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_security_trail_reaches_the_project_admins_as_audit_events() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start_with(&upstream.base_url, |c| c.audit_events = Some(true));
    // Two clinics on the shared upstream.
    let clinic = seed_project(&gw, json!({"name": "Clinic A"}));
    let other = seed_project(&gw, json!({"name": "Clinic B"}));
    let (admin_id, admin_secret) = seed_admin_client(&gw, &clinic);
    let (other_admin_id, other_admin_secret) = seed_admin_client(&gw, &other);
    let patients_only = seed_policy(
        &gw,
        Some(&clinic),
        json!({"resource": [{"resourceType": "Patient"}]}),
    );
    let (reader_id, reader_secret) =
        seed_client(&gw, Some(&clinic), json!({}), Some(&patients_only));
    let (member_id, member_secret) = seed_client(&gw, Some(&clinic), json!({}), None);
    rt().block_on(async {
        let admin = gw.token(&admin_id, &admin_secret, None).await;
        let reader = gw.token(&reader_id, &reader_secret, None).await;
        let member = gw.token(&member_id, &member_secret, None).await;
        let other_admin = gw.token(&other_admin_id, &other_admin_secret, None).await;
        // A refused request, a failed client authentication, a change of a policy.
        let (s, _) = gw.get("fhir/R4/Observation", Some(&reader)).await;
        assert_eq!(s, 403);
        let (s, _) = token_request(
            &gw,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &reader_id),
                ("client_secret", "not-the-secret"),
            ],
        )
        .await;
        assert!(s == 400 || s == 401, "{s}");
        let (s, created) = gw
            .post(
                "fhir/R4/AccessPolicy",
                Some(&admin),
                json!({"resourceType": "AccessPolicy", "name": "nurses", "resource": [{"resourceType": "Patient"}]}),
            )
            .await;
        assert_eq!(s, 201, "{created}");
        let policy_ref = format!("AccessPolicy/{}", created["id"].as_str().unwrap());

        // Written in batches, within a second or so.
        let deadline = Instant::now() + Duration::from_secs(10);
        let events = loop {
            let events = trail(&upstream);
            let has = |code: &str| events.iter().any(|e| event_code(e) == code);
            if has("request_denied") && has("resource_created") && has("token_issued") {
                break events;
            }
            assert!(Instant::now() < deadline, "the trail so far: {events:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let denied = events
            .iter()
            .find(|e| event_code(e) == "request_denied")
            .unwrap();
        assert_eq!(denied["type"]["code"], "110113");
        assert_eq!(
            denied["agent"][0]["who"]["identifier"]["value"],
            format!("ClientApplication/{reader_id}")
        );
        assert_eq!(denied["agent"][0]["network"]["address"], "127.0.0.1");
        assert_eq!(marker(denied), vec![clinic.as_str()], "{denied}");
        let created_event = events
            .iter()
            .find(|e| event_code(e) == "resource_created")
            .unwrap();
        assert_eq!(created_event["action"], "C");
        assert_eq!(
            created_event["entity"][0]["what"]["identifier"]["value"],
            policy_ref
        );
        let issued: Vec<&Value> = events
            .iter()
            .filter(|e| event_code(e) == "token_issued")
            .collect();
        assert!(
            issued.iter().any(|e| e["agent"][0]["who"]["identifier"]["value"] == admin_id.as_str()
                && marker(e) == vec![clinic.as_str()]),
            "{issued:#?}"
        );
        // No secret, no token, no hash anywhere in the trail.
        let all = serde_json::to_string(&events).unwrap();
        for secret in [&admin_secret, &reader_secret, &member_secret, &admin, &reader] {
            assert!(!all.contains(secret.as_str()), "a secret or token in the trail");
        }

        // The clinic's admin reads its trail through the gateway…
        let (s, bundle) = gw
            .get("fhir/R4/AuditEvent?_count=1000", Some(&admin))
            .await;
        assert_eq!(s, 200, "{bundle}");
        let seen: Vec<&Value> = bundle["entry"]
            .as_array()
            .map(|e| e.iter().map(|x| &x["resource"]).collect())
            .unwrap_or_default();
        assert!(seen.iter().any(|e| event_code(e) == "request_denied"));
        assert!(seen.iter().all(|e| marker(e) == vec![clinic.as_str()]), "{bundle}");
        // …but cannot rewrite it.
        let (s, _) = gw
            .post(
                "fhir/R4/AuditEvent",
                Some(&admin),
                json!({"resourceType": "AuditEvent"}),
            )
            .await;
        assert_eq!(s, 403);
        // A member whose policy is `*` neither reads nor forges it.
        let (s, _) = gw.get("fhir/R4/AuditEvent", Some(&member)).await;
        assert_eq!(s, 403);
        let (s, _) = gw
            .post(
                "fhir/R4/AuditEvent",
                Some(&member),
                json!({"resourceType": "AuditEvent"}),
            )
            .await;
        assert_eq!(s, 403);
        // The other clinic's admin sees none of the first clinic's trail.
        let (s, bundle) = gw
            .get("fhir/R4/AuditEvent?_count=1000", Some(&other_admin))
            .await;
        assert_eq!(s, 200, "{bundle}");
        for e in bundle["entry"].as_array().into_iter().flatten() {
            assert_eq!(marker(&e["resource"]), vec![other.as_str()], "{e}");
        }
    });
}

#[test]
fn a_key_a_client_withdraws_stops_working_when_its_jwk_set_expires() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let key = assertion_key();
    let served = Arc::new(Mutex::new(key.jwks.clone()));
    rt().block_on(async {
        let set = served.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let set = set.lock().unwrap().clone();
                async move { ([("cache-control", "public, max-age=10")], axum::Json(set)) }
            }),
        );
        let port = common::http::serve(app).await;
        let jwks_uri = format!("http://127.0.0.1:{port}/jwks.json");
        let (client, _) = seed_client(&gw, None, json!({"jwksUri": jwks_uri}), None);
        let token_url = format!("{}oauth2/token", gw.base);
        let signed = || {
            let now = fhirgate::store::now_unix();
            assertion(
                &key,
                &json!({"iss": client, "sub": client, "aud": token_url, "iat": now,
                        "exp": now + 300, "jti": uuid::Uuid::new_v4().to_string()}),
            )
        };
        let grant = |a: String| {
            let gw = &gw;
            async move {
                token_request(
                    gw,
                    &[
                        ("grant_type", "client_credentials"),
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", &a),
                    ],
                )
                .await
                .0
            }
        };
        assert_eq!(grant(signed()).await, 200);
        // The client withdraws its key (it leaked). Within the set's max-age fhirgate may
        // still use what it fetched; after it, never.
        *served.lock().unwrap() = json!({"keys": []});
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(grant(signed()).await, 401, "invalid_client");
    });
}

#[test]
fn a_patients_patient_scopes_reach_only_that_patient() {
    // SMART App Launch: `patient/` scopes are about the patient in context. Medplum lets a
    // Patient's `patient/*.rs` token read every patient its policy reaches; fhirgate does not.
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let email = format!("patient-{}@example.com", uuid::Uuid::new_v4().simple());
    let mut s = common::people::UserSeed::new(&email, "a long patient password");
    s.profile_type = "Patient".into();
    // No policy: Medplum's legacy `*`, every non-admin type.
    let seeded = common::people::seed(&gw, &s);
    let own = seeded.profile.strip_prefix("Patient/").unwrap().to_string();
    upstream.put_resource(&json!({"resourceType": "Patient", "id": "someone-else"}));
    upstream.put_resource(
        &json!({"resourceType": "Observation", "id": "own-obs", "status": "final",
        "code": {"text": "Hb"}, "subject": {"reference": format!("Patient/{own}")}}),
    );
    upstream.put_resource(
        &json!({"resourceType": "Observation", "id": "other-obs", "status": "final",
        "code": {"text": "Hb"}, "subject": {"reference": "Patient/someone-else"}}),
    );
    rt().block_on(async {
        let patient_scoped = common::people::sign_in(
            &gw,
            &email,
            "a long patient password",
            None,
            "openid patient/*.rs",
        )
        .await;
        assert_eq!(patient_scoped.body["patient"], own.as_str());
        let t = patient_scoped.access_token.as_str();
        let (s, _) = gw.get(&format!("fhir/R4/Patient/{own}"), Some(t)).await;
        assert_eq!(s, 200);
        let (s, _) = gw.get("fhir/R4/Patient/someone-else", Some(t)).await;
        assert_eq!(s, 404);
        let (s, _) = gw.get("fhir/R4/Observation/other-obs", Some(t)).await;
        assert_eq!(s, 404);
        let (s, bundle) = gw.get("fhir/R4/Observation", Some(t)).await;
        assert_eq!(s, 200, "{bundle}");
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"]["id"].as_str())
            .collect();
        assert_eq!(ids, vec!["own-obs"], "{bundle}");
        let (s, bundle) = gw.get("fhir/R4/Patient", Some(t)).await;
        assert_eq!(s, 200);
        assert_eq!(
            bundle["entry"].as_array().map(Vec::len),
            Some(1),
            "{bundle}"
        );
        // The same person with `user/` scopes keeps what the policy gives.
        let user_scoped = common::people::sign_in(
            &gw,
            &email,
            "a long patient password",
            None,
            "openid user/*.rs",
        )
        .await;
        let (s, _) = gw
            .get(
                "fhir/R4/Patient/someone-else",
                Some(&user_scoped.access_token),
            )
            .await;
        assert_eq!(s, 200);
    });
}
