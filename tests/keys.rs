//! Signing-key rotation (`fhirgate keys rotate`) under running instances. The new key is in every
//! instance's keyring (and so every JWKS) before any token is signed with it; tokens signed
//! before the rotation keep verifying everywhere until the old key retires; a token signed with
//! the new key verifies on an instance that never restarted; after retirement the old key's
//! tokens fail everywhere, cached or not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway, free_port};
use common::http::rt;
use common::people::jwt_header;
use common::upstream::FhirUpstream;
use fhirgate::cli::Cli;
use fhirgate::server::Planes;
use jsonwebtoken::Algorithm;
use serde_json::Value;

fn kid(token: &str) -> String {
    jwt_header(token)["kid"].as_str().unwrap().to_string()
}

/// `fhirgate <args…>` in-process, on a thread of its own (the CLI builds its own runtime).
fn fhirgate(args: &[&str]) -> Result<(), String> {
    let mut argv = vec!["fhirgate".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    std::thread::spawn(move || fhirgate::cli::run(cli))
        .join()
        .unwrap()
}

async fn status(url: &str, token: &str) -> u16 {
    TestGateway::client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn jwks_kids(gw: &TestGateway) -> Vec<String> {
    let jwks: Value = TestGateway::client()
        .get(format!("{}.well-known/jwks.json", gw.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The ES256 keys (access tokens); each rotation also replaces the RS256 key of ID tokens.
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kty"] == "EC")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `f` holds (10 s at most); returns how long it took.
async fn until(what: &str, f: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: not after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[test]
fn rotation_publishes_first_signs_later_and_retires_after_the_old_tokens() {
    let upstream = FhirUpstream::start();
    let store = common::pg::fresh_database();
    let a_port = free_port();
    let c_port = free_port();
    let issuer = format!("http://127.0.0.1:{a_port}/");
    let control = TestGateway::start_planes(
        &upstream.base_url,
        &store,
        Planes {
            gateway: false,
            control: true,
        },
        |f| {
            f.base_url = Some(issuer.clone());
            f.control_listen = Some(format!("127.0.0.1:{c_port}"));
        },
    );
    let proxy = |listen: Option<u16>| {
        TestGateway::start_planes(
            &upstream.base_url,
            &store,
            Planes {
                gateway: true,
                control: false,
            },
            |f| {
                if let Some(p) = listen {
                    f.listen = Some(format!("127.0.0.1:{p}"));
                }
                f.base_url = Some(issuer.clone());
                f.control_url = Some(format!("http://127.0.0.1:{c_port}"));
            },
        )
    };
    let a = proxy(Some(a_port));
    let b = proxy(None);
    let instances = [&a, &b, &control];
    rt().block_on(async {
        let old_token = a.token(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, None).await;
        let old_kid = kid(&old_token);
        let on_a = format!("{}Patient?_count=1", a.fhir);
        let on_b = format!("{}Patient?_count=1", b.fhir);
        // B verifies (and caches) the old token; A has never seen it.
        assert_eq!(status(&on_b, &old_token).await, 200);

        // Published at once, signing in 2 s; the old key retires 4 s after that.
        let rotated_at = Instant::now();
        fhirgate(&[
            "keys",
            "rotate",
            "--store",
            &store,
            "--key-encryption-key",
            common::gateway::SHARED_KEK,
            "--publish-delay",
            "2s",
            "--retire-after",
            "4s",
        ])
        .unwrap();
        let snapshots = || instances.map(|gw| gw.running().state.snapshot());
        let took = until("the new key in every keyring", || {
            snapshots()
                .iter()
                .all(|s| s.keyring.kids_of(Algorithm::ES256).len() == 2)
        })
        .await;
        println!(
            "new key in every instance's keyring after {} ms",
            took.as_millis()
        );
        assert!(took <= Duration::from_secs(1), "{took:?}");
        let new_kid = snapshots()[0]
            .keyring
            .kids_of(Algorithm::ES256)
            .iter()
            .find(|k| **k != old_kid)
            .unwrap()
            .clone();
        for s in snapshots() {
            // Published, not yet signing: the old key still comes first.
            assert_eq!(
                s.keyring.kids_of(Algorithm::ES256),
                vec![old_kid.clone(), new_kid.clone()]
            );
        }
        let mut published = jwks_kids(&a).await;
        published.sort();
        let mut expected = vec![old_kid.clone(), new_kid.clone()];
        expected.sort();
        assert_eq!(published, expected, "the JWKS lists both keys");
        let before = a.token(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, None).await;
        assert_eq!(
            kid(&before),
            old_kid,
            "the new key must not sign before its time"
        );

        // After the publish delay the new key signs; B (never restarted) verifies its tokens.
        until("the new key signing everywhere", || {
            snapshots()
                .iter()
                .all(|s| s.keyring.kids_of(Algorithm::ES256)[0] == new_kid)
        })
        .await;
        assert!(
            rotated_at.elapsed() >= Duration::from_secs(2),
            "signed too early"
        );
        println!(
            "new key signing after {} ms",
            rotated_at.elapsed().as_millis()
        );
        let new_token = a.token(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, None).await;
        assert_eq!(kid(&new_token), new_kid);
        assert_eq!(status(&on_b, &new_token).await, 200);
        assert_eq!(status(&on_a, &new_token).await, 200);
        // Tokens signed before keep verifying on every instance until the retirement.
        assert_eq!(status(&on_a, &old_token).await, 200, "first sight on A");
        assert_eq!(status(&on_b, &old_token).await, 200, "cached on B");
        assert_eq!(status(&on_b, &before).await, 200, "first sight on B");

        // Retired: out of every keyring and the JWKS, and its tokens fail, cached or not.
        until("the old key retired everywhere", || {
            snapshots()
                .iter()
                .all(|s| s.keyring.kids_of(Algorithm::ES256) == vec![new_kid.clone()])
        })
        .await;
        assert!(
            rotated_at.elapsed() >= Duration::from_secs(6),
            "retired too early"
        );
        assert_eq!(jwks_kids(&b).await, vec![new_kid.clone()]);
        for url in [&on_a, &on_b] {
            assert_eq!(status(url, &old_token).await, 401, "{url}");
            assert_eq!(status(url, &before).await, 401, "{url}");
            assert_eq!(status(url, &new_token).await, 200, "{url}");
        }
    });
    // `keys list` reads the same store; the retired key is marked inactive there for good.
    fhirgate(&["keys", "list", "--store", &store]).unwrap();
    let remaining = rt().block_on(async {
        let store = fhirgate::store::Store::open(&store).await.unwrap();
        store.active_keys().await.unwrap()
    });
    // The new ES256 key and the new RS256 key.
    assert_eq!(remaining.len(), 2);
    assert_eq!(remaining.iter().filter(|k| k.alg == "ES256").count(), 1);
}

#[test]
fn bad_rotation_arguments_are_refused() {
    let e = fhirgate(&[
        "keys",
        "rotate",
        "--store",
        "sqlite::memory:",
        "--publish-delay",
        "soon",
    ])
    .unwrap_err();
    assert!(e.contains("--publish-delay"), "{e}");
    let e = fhirgate(&[
        "keys",
        "rotate",
        "--store",
        "mysql://x",
        "--retire-after",
        "1h",
    ])
    .unwrap_err();
    assert!(e.contains("store"), "{e}");
}

#[test]
fn a_single_instance_follows_a_rotation_of_its_own_store() {
    // `fhirgate serve` on SQLite (or PostgreSQL under FHIRGATE_TEST_STORE=postgres): the change
    // feed's poll picks the new key up, and the default retirement keeps the old key verifying.
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let store = gw.running().state.config.store_url.clone();
    rt().block_on(async {
        let old_token = gw.admin_token().await;
        // The instance's own key-encryption key: the file its first start created.
        let data_dir = gw.data_dir.to_str().unwrap();
        fhirgate(&[
            "keys",
            "rotate",
            "--store",
            &store,
            "--data-dir",
            data_dir,
            "--publish-delay",
            "0s",
        ])
        .unwrap();
        let state = gw.running().state.clone();
        until("the new key signing", || {
            let s = state.snapshot();
            let es256 = s.keyring.kids_of(Algorithm::ES256);
            es256.len() == 2 && es256[0] != kid(&old_token)
        })
        .await;
        let new_token = gw.admin_token().await;
        assert_ne!(kid(&new_token), kid(&old_token));
        let url = format!("{}Patient?_count=1", gw.fhir);
        assert_eq!(status(&url, &new_token).await, 200);
        assert_eq!(status(&url, &old_token).await, 200);
        assert_eq!(jwks_kids(&gw).await.len(), 2);
    });
}
