#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The per-address budget on /auth/* and /oauth2/* (docs/medplum-compat.md §0.2), through the gateway.

mod common;

use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway};
use serde_json::Value;

async fn token_request(
    gw: &TestGateway,
    path: &str,
    from: &str,
    secret: &str,
) -> reqwest::Response {
    TestGateway::client()
        .post(format!("{}{path}", gw.base))
        .header("x-forwarded-for", from)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", ADMIN_CLIENT_ID),
            ("client_secret", secret),
        ])
        .send()
        .await
        .expect("token request")
}

fn remaining(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("ratelimit")
        .expect("RateLimit header")
        .to_str()
        .expect("ascii")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_paths_get_a_budget_per_client_address() {
    // Nothing is forwarded upstream here.
    let gw = TestGateway::start_with("http://127.0.0.1:9/fhir/R4", |c| {
        c.auth_rate_limit = Some(4);
    });
    let attacker = "203.0.113.7";

    // The budget counts every attempt, failed or not, on both mount points.
    let mut seen = Vec::new();
    for path in [
        "oauth2/token",
        "api/oauth2/token",
        "oauth2/token",
        "oauth2/token",
    ] {
        let resp = token_request(&gw, path, attacker, "wrong-secret").await;
        assert_eq!(resp.status(), 401, "invalid_client");
        seen.push(remaining(&resp));
    }
    let left: Vec<&str> = seen
        .iter()
        .map(|h| h.split(';').find_map(|p| p.strip_prefix("r=")).expect("r="))
        .collect();
    assert_eq!(left, ["3", "2", "1", "0"], "{seen:?}");
    assert!(seen[0].starts_with("\"requests\";r=3;t="), "{}", seen[0]);

    // Beyond it: 429 before the handler runs, so even the right secret gets no token.
    let resp = token_request(&gw, "oauth2/token", attacker, ADMIN_CLIENT_SECRET).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["code"], "throttled");
    assert!(body.get("access_token").is_none());
    let login = TestGateway::client()
        .post(format!("{}auth/login", gw.base))
        .header("x-forwarded-for", attacker)
        .json(&serde_json::json!({"email": "admin@example.com", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 429, "every /auth/* path shares the budget");

    // Another address has its own budget; /auth/me and FHIR paths are not counted.
    let other = token_request(&gw, "oauth2/token", "198.51.100.9", ADMIN_CLIENT_SECRET).await;
    assert_eq!(other.status(), 200);
    let token: Value = other.json().await.unwrap();
    let token = token["access_token"].as_str().unwrap();
    let me = TestGateway::client()
        .get(format!("{}auth/me", gw.base))
        .header("x-forwarded-for", attacker)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    assert!(me.headers().get("ratelimit").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_turns_the_limit_off() {
    let gw = TestGateway::start_with("http://127.0.0.1:9/fhir/R4", |c| {
        c.auth_rate_limit = Some(0);
    });
    for _ in 0..5 {
        let resp = token_request(&gw, "oauth2/token", "203.0.113.8", "wrong").await;
        assert_eq!(resp.status(), 401, "invalid_client");
        assert!(resp.headers().get("ratelimit").is_none());
    }
}

async fn basic_fhir(gw: &TestGateway, from: &str, client: &str, secret: &str) -> reqwest::Response {
    TestGateway::client()
        .get(format!("{}fhir/R4/Patient", gw.base))
        .header("x-forwarded-for", from)
        .header("authorization", common::http::basic(client, secret))
        .send()
        .await
        .expect("FHIR request")
}

/// Issue 10: guessing a Basic secret on FHIR paths was unlimited, and every IPv6 address had a
/// budget of its own. Failed credentials now count per address (IPv6 by /64) and per client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_credentials_on_fhir_paths_are_limited() {
    let gw = TestGateway::start_with("http://127.0.0.1:9/fhir/R4", |c| {
        c.credential_failure_limit = Some(3);
    });
    for _ in 0..3 {
        let resp = basic_fhir(&gw, "2001:db8:7:7::1", "guess-target", "wrong").await;
        assert_eq!(resp.status(), 401);
    }
    // The fourth failure crosses the budget; then a neighbour in the same /64 is refused too,
    // before any credential is looked at.
    let _ = basic_fhir(&gw, "2001:db8:7:7::1", "guess-target", "wrong").await;
    let resp = basic_fhir(&gw, "2001:db8:7:7:ffff::2", "someone-else", "wrong").await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    // The client id is over budget from any address; an unrelated client elsewhere is not.
    let resp = basic_fhir(&gw, "198.51.100.9", "guess-target", ADMIN_CLIENT_SECRET).await;
    assert_eq!(resp.status(), 429);
    let resp = basic_fhir(&gw, "198.51.100.10", ADMIN_CLIENT_ID, "wrong").await;
    assert_eq!(resp.status(), 401);
}
