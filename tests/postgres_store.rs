//! fhirgate on PostgreSQL, whatever `FHIRGATE_TEST_STORE` says: a real gateway on a fresh
//! database of the throwaway test cluster, in front of the real FHIR upstream. Everything fhirgate
//! keeps (admin client, signing key, policies, clients and their secrets, Logins and their
//! revocation) lives in the database, so a restart on the same database with an empty data dir
//! serves the same identities, and a stop never loses an acknowledged write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::{ADMIN_CLIENT_ID, TestGateway};
use common::http::{rt, status};
use common::upstream::FhirUpstream;
use fhirgate::config::ConfigFile;
use fhirgate::store::{Dialect, Store};
use serde_json::{Value, json};

/// Pins the store to `url` and the issuer across restarts (ports change, tokens must not).
fn on(url: &str) -> impl Fn(&mut ConfigFile) + '_ {
    move |f: &mut ConfigFile| {
        f.store = Some(url.to_string());
        f.store_max_connections = Some(4);
        f.base_url = Some("http://fhirgate.test/".into());
    }
}

#[test]
fn a_gateway_on_postgres_keeps_its_identities_across_a_restart() {
    let upstream = FhirUpstream::start();
    let url = common::pg::fresh_database();
    let first_dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(&upstream.base_url, first_dir.path(), on(&url));
    assert_eq!(gw.running().state.store.dialect(), Dialect::Postgres);
    assert!(
        !gw.running().bootstrap.created.is_empty(),
        "the first start bootstraps the empty database"
    );
    assert!(
        !first_dir.path().join("fhirgate.db").exists(),
        "no SQLite file may be created when the store is PostgreSQL"
    );

    let c = TestGateway::client();
    let (admin, client_id, secret, patient_id, client_token, revoked_token, jwks) =
        rt().block_on(async {
            let admin = gw.admin_token().await;
            // An identity resource (in the store) and a client bound to it.
            let policy: Value = c
                .post(format!("{}AccessPolicy", gw.fhir))
                .bearer_auth(&admin)
                .json(&json!({
                    "resourceType": "AccessPolicy",
                    "name": "patients read-only",
                    "resource": [{"resourceType": "Patient", "readonly": true}]
                }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let policy_id = policy["id"].as_str().expect("policy id").to_string();
            let (client_id, secret) = gw.client_with_policy(&admin, Some(&policy_id)).await;

            // Data in the upstream, read through the gateway with the new client's token.
            let created = c
                .post(format!("{}Patient", gw.fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "Patient", "name": [{"family": "Postgres"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
            let patient: Value = created.json().await.unwrap();
            let patient_id = patient["id"].as_str().unwrap().to_string();
            let client_token = gw.token(&client_id, &secret, None).await;
            let read = c
                .get(format!("{}Patient/{patient_id}", gw.fhir))
                .bearer_auth(&client_token)
                .send()
                .await
                .unwrap();
            assert_eq!(read.status(), 200);
            let read: Value = read.json().await.unwrap();
            assert_eq!(read["name"][0]["family"], "Postgres");
            assert_eq!(
                status(
                    c.post(format!("{}Patient", gw.fhir))
                        .bearer_auth(&client_token)
                        .json(&json!({"resourceType": "Patient"}))
                )
                .await,
                403,
                "the policy is read-only"
            );

            // A Login revoked before the restart stays revoked after it.
            let revoked_token = gw.token(&client_id, &secret, None).await;
            assert_eq!(
                status(
                    c.post(format!("{}oauth2/logout", gw.base))
                        .bearer_auth(&revoked_token)
                )
                .await,
                200
            );
            assert_eq!(
                status(
                    c.get(format!("{}Patient/{patient_id}", gw.fhir))
                        .bearer_auth(&revoked_token)
                )
                .await,
                401
            );
            let jwks: Value = c
                .get(format!("{}.well-known/jwks.json", gw.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (
                admin,
                client_id,
                secret,
                patient_id,
                client_token,
                revoked_token,
                jwks,
            )
        });

    // The data is in PostgreSQL, seen from outside fhirgate.
    rt().block_on(async {
        let store = Store::open(&url).await.unwrap();
        let client = store.read("ClientApplication", &client_id).await.unwrap();
        assert!(client.is_some(), "the client must be stored in PostgreSQL");
        assert!(
            store
                .read("ClientApplication", ADMIN_CLIENT_ID)
                .await
                .unwrap()
                .is_some()
        );
        assert!(!store.revoked_logins(0).await.unwrap().is_empty());
    });
    gw.stop();

    // A new process on the same database, with an empty data dir of its own and the
    // key-encryption key the first one created (an operator carries it over with the database).
    let second_dir = tempfile::tempdir().unwrap();
    let kek_file = first_dir.path().join("key-encryption-key");
    let gw2 = TestGateway::start_in(&upstream.base_url, second_dir.path(), |f| {
        on(&url)(f);
        f.key_encryption_key_file = Some(kek_file.clone());
    });
    assert_eq!(
        gw2.running().bootstrap.created,
        Vec::<&str>::new(),
        "a restart on the same database creates nothing"
    );
    rt().block_on(async {
        let jwks2: Value = c
            .get(format!("{}.well-known/jwks.json", gw2.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(jwks, jwks2, "the signing key is kept");
        // Tokens issued before the restart: same key, same Logins.
        for token in [&admin, &client_token] {
            assert_eq!(
                status(
                    c.get(format!("{}Patient/{patient_id}", gw2.fhir))
                        .bearer_auth(token)
                )
                .await,
                200
            );
        }
        assert_eq!(
            status(
                c.get(format!("{}Patient/{patient_id}", gw2.fhir))
                    .bearer_auth(&revoked_token)
            )
            .await,
            401,
            "a revocation survives the restart"
        );
        // The client's secret (a keyed hash in the store) and its policy still hold.
        let fresh = gw2.token(&client_id, &secret, None).await;
        assert_eq!(
            status(
                c.get(format!("{}Patient/{patient_id}", gw2.fhir))
                    .bearer_auth(&fresh)
            )
            .await,
            200
        );
        assert_eq!(
            status(
                c.post(format!("{}Patient", gw2.fhir))
                    .bearer_auth(&fresh)
                    .json(&json!({"resourceType": "Patient"}))
            )
            .await,
            403
        );
        let wrong = c
            .post(format!("{}oauth2/token", gw2.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("client_secret", "not-the-secret"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");
        assert_eq!(body["error_description"], "Invalid secret");
    });
}

#[test]
fn an_unreachable_database_stops_the_start() {
    // Nothing listens on the port of a listener just closed: the start must fail, not serve.
    let port = common::gateway::free_port();
    let mut file = ConfigFile {
        listen: Some(format!("127.0.0.1:{}", common::gateway::free_port())),
        control_listen: Some(format!("127.0.0.1:{}", common::gateway::free_port())),
        metrics_listen: Some(format!("127.0.0.1:{}", common::gateway::free_port())),
        store_max_connections: Some(2),
        ..Default::default()
    };
    file.store = Some(format!("postgres://postgres@127.0.0.1:{port}/nothing"));
    let config = fhirgate::config::Config::from_file(file).unwrap();
    let started =
        std::thread::spawn(move || fhirgate::server::start(config, fhirgate::server::Planes::BOTH))
            .join()
            .unwrap();
    let err = match started {
        Ok(_) => panic!("fhirgate started without its database"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot open store"), "{err}");
    // Which store, and the driver's reason, not only "pool timed out".
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
}

#[test]
fn a_zero_pool_is_refused() {
    let file = ConfigFile {
        store: Some("postgres://postgres@127.0.0.1:5432/x".into()),
        store_max_connections: Some(0),
        ..Default::default()
    };
    let err = fhirgate::config::Config::from_file(file).unwrap_err();
    assert!(err.to_string().contains("store_max_connections"), "{err}");
}
