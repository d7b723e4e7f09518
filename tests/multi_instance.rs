//! Many instances on one PostgreSQL database: two gateways (`proxy` plane) and a control API
//! (`control` plane), each a real fhirgate (`server::start`, pingora and axum on their own
//! threads) in front of the real FHIR upstream, on a fresh database of the throwaway test
//! cluster. A change made through one instance must be enforced by the others within 1 s: each
//! test measures that time (printed as `propagation …`) and asserts the bound. Two control
//! instances must never both redeem one authorization code or one refresh token. A database
//! stopped under running instances: what was verified keeps working, what cannot be verified
//! gets 503, readiness goes red, and everything recovers when it returns, without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway, free_port};
use common::http::{basic, json_of, rt};
use common::people::{self, UserSeed, jwt_header};
use common::pg::DedicatedCluster;
use common::upstream::FhirUpstream;
use fhirgate::config::ConfigFile;
use fhirgate::server::Planes;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const PROXY: Planes = Planes {
    gateway: true,
    control: false,
};
const CONTROL: Planes = Planes {
    gateway: false,
    control: true,
};
/// docs/contract.md §2: every instance enforces a change within this.
const BOUND: Duration = Duration::from_secs(1);

/// The bound is about wall time: the scenarios run one at a time, not against each other for
/// the machine's two cores.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One FHIR upstream for the whole binary (it holds no fhirgate state).
fn upstream() -> &'static FhirUpstream {
    static UPSTREAM: OnceLock<FhirUpstream> = OnceLock::new();
    UPSTREAM.get_or_init(FhirUpstream::start)
}

/// One control instance and two proxies on `store`. All three share the issuer (`base_url`, A's
/// address). A reaches the control API by IP address, B by host name (`localhost`).
struct Deployment {
    control: TestGateway,
    a: TestGateway,
    b: TestGateway,
}

impl Deployment {
    fn start(store: &str) -> Deployment {
        Self::start_with(store, |_| {}, |_| {})
    }

    fn start_with(
        store: &str,
        tweak_a: impl FnOnce(&mut ConfigFile),
        tweak_b: impl FnOnce(&mut ConfigFile),
    ) -> Deployment {
        let up = &upstream().base_url;
        let a_port = free_port();
        let c_port = free_port();
        let base_url = format!("http://127.0.0.1:{a_port}/");
        // The control instance first: it bootstraps the empty database.
        let control = TestGateway::start_planes(up, store, CONTROL, |f| {
            f.base_url = Some(base_url.clone());
            f.control_listen = Some(format!("127.0.0.1:{c_port}"));
        });
        let a = TestGateway::start_planes(up, store, PROXY, |f| {
            f.listen = Some(format!("127.0.0.1:{a_port}"));
            f.base_url = Some(base_url.clone());
            f.control_url = Some(format!("http://127.0.0.1:{c_port}"));
            tweak_a(f);
        });
        let b = TestGateway::start_planes(up, store, PROXY, |f| {
            f.base_url = Some(base_url.clone());
            f.control_url = Some(format!("http://localhost:{c_port}"));
            tweak_b(f);
        });
        Deployment { control, a, b }
    }
}

/// The status of `GET url`, with `authorization` unless it is empty.
async fn get_status(url: &str, authorization: &str) -> u16 {
    let mut req = TestGateway::client().get(url);
    if !authorization.is_empty() {
        req = req.header("authorization", authorization);
    }
    req.send().await.unwrap().status().as_u16()
}

/// Polls `url` (with `authorization`) until it answers `want`; returns the time since `since`
/// and prints it. Fails after 10 s.
async fn until_status(
    what: &str,
    since: Instant,
    url: &str,
    authorization: &str,
    want: u16,
) -> Duration {
    loop {
        let got = get_status(url, authorization).await;
        if got == want {
            let took = since.elapsed();
            println!("propagation {what}: {} ms", took.as_millis());
            return took;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{what}: still {got} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_within_bound(what: &str, took: Duration) {
    assert!(took <= BOUND, "{what} took {took:?}, more than {BOUND:?}");
}

#[test]
fn a_token_issued_through_one_proxy_works_on_the_other() {
    let _serial = serial();
    let store = common::pg::fresh_database();
    let d = Deployment::start(&store);
    let user = UserSeed::new("ada@example.com", "correct horse battery");
    people::seed(&d.control, &user);
    rt().block_on(async {
        // Client credentials and a user sign-in (code + PKCE), both through A.
        let admin = d.a.admin_token().await;
        let signed_in = people::sign_in(&d.a, &user.email, &user.password, None, "openid").await;
        for (who, token) in [("client", &admin), ("user", &signed_in.access_token)] {
            for gw in [&d.a, &d.b] {
                let r = TestGateway::client()
                    .get(format!("{}Patient?_count=1", gw.fhir))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{who} token on {}", gw.base);
                let (status, me) = json_of(
                    TestGateway::client()
                        .get(format!("{}auth/me", gw.base))
                        .bearer_auth(token)
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(status, 200, "{who}: /auth/me through {}: {me}", gw.base);
            }
        }
        // B forwarded its control traffic to the control API by host name.
        let b_control = d.b.running().state.control.addrs();
        assert!(
            !b_control.is_empty() && b_control.iter().all(|a| a.ip().is_loopback()),
            "{b_control:?}"
        );
        // Every instance serves the same keys, and the JWKS names the signer.
        let jwks: Value = TestGateway::client()
            .get(format!("{}.well-known/jwks.json", d.b.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let kid = jwt_header(&admin)["kid"].as_str().unwrap().to_string();
        assert!(
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kid"] == kid.as_str())
        );
        for gw in [&d.a, &d.b, &d.control] {
            assert_eq!(
                gw.running()
                    .state
                    .snapshot()
                    .keyring
                    .kids_of(Algorithm::ES256),
                vec![kid.clone()]
            );
        }
    });
}

#[test]
fn every_write_notifies_listeners_at_commit() {
    let _serial = serial();
    let store = common::pg::fresh_database();
    let d = Deployment::start(&store);
    rt().block_on(async {
        let mut listener = fhirgate::store::Store::change_listener(&store).await.unwrap();
        let admin = d.a.admin_token().await;
        let started = Instant::now();
        let (status, body) = json_of(
            TestGateway::client()
                .post(format!("{}AccessPolicy", d.a.fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "AccessPolicy", "name": "notified", "resource": [{"resourceType": "Patient"}]}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let woke = tokio::time::timeout(BOUND, listener.next()).await;
        assert!(
            matches!(woke, Ok(Ok(true))),
            "no notification within 1 s: {woke:?}"
        );
        println!("notification after a write: {} ms", started.elapsed().as_millis());
    });
}

#[test]
fn logout_on_a_is_enforced_by_b_within_one_second() {
    let _serial = serial();
    let store = common::pg::fresh_database();
    let d = Deployment::start(&store);
    let user = UserSeed::new("grace@example.com", "correct horse battery");
    people::seed(&d.control, &user);
    rt().block_on(async {
        let tokens = people::sign_in(&d.a, &user.email, &user.password, None, "openid").await;
        let bearer = format!("Bearer {}", tokens.access_token);
        let on_b = format!("{}Patient?_count=1", d.b.fhir);
        // B has verified (and cached) the token.
        assert_eq!(get_status(&on_b, &bearer).await, 200);
        let since = Instant::now();
        let r = TestGateway::client()
            .post(format!("{}oauth2/logout", d.a.base))
            .bearer_auth(&tokens.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let took = until_status("logout on A → 401 on B", since, &on_b, &bearer, 401).await;
        assert_within_bound("logout", took);
        let (status, body) = json_of(
            TestGateway::client()
                .get(&on_b)
                .header("authorization", &bearer)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(
            get_status(&format!("{}Patient?_count=1", d.a.fhir), &bearer).await,
            401
        );
    });
}

#[test]
fn membership_client_secret_and_policy_changes_reach_b_within_one_second() {
    let _serial = serial();
    let store = common::pg::fresh_database();
    let d = Deployment::start(&store);
    rt().block_on(async {
        let c = TestGateway::client();
        let admin = d.a.admin_token().await;
        let project = d.a.project_of(&admin).await;

        // A deactivated membership.
        let (id, secret) = d.a.client_with_policy(&admin, None).await;
        let token = format!("Bearer {}", d.a.token(&id, &secret, None).await);
        let on_b = format!("{}Patient?_count=1", d.b.fhir);
        assert_eq!(get_status(&on_b, &token).await, 200);
        let (_, found) = json_of(
            c.get(format!("{}ProjectMembership?profile=ClientApplication/{id}", d.a.fhir))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let mut membership = found["entry"][0]["resource"].clone();
        let mid = membership["id"].as_str().unwrap().to_string();
        membership["active"] = json!(false);
        let since = Instant::now();
        let r = c
            .post(format!("{}admin/projects/{project}/members/{mid}", d.a.base))
            .bearer_auth(&admin)
            .json(&membership)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let took = until_status("membership deactivated on A → 401 on B", since, &on_b, &token, 401).await;
        assert_within_bound("membership", took);

        // A client turned off: its Bearer token and its Basic credentials.
        let since = Instant::now();
        let (id, secret) = d.a.client_with_policy(&admin, None).await;
        let basic_auth = basic(&id, &secret);
        // A new client is a change too: B learns of it through the feed.
        let took = until_status("new client on A → its Basic credentials work on B", since, &on_b, &basic_auth, 200).await;
        assert_within_bound("new client", took);
        let token = format!("Bearer {}", d.a.token(&id, &secret, None).await);
        assert_eq!(get_status(&on_b, &token).await, 200);
        let (_, mut client) = json_of(
            c.get(format!("{}ClientApplication/{id}", d.a.fhir))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
        )
        .await;
        client["status"] = json!("off");
        let since = Instant::now();
        let r = c
            .put(format!("{}ClientApplication/{id}", d.a.fhir))
            .bearer_auth(&admin)
            .json(&client)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let took = until_status("client off on A → 401 on B (Bearer)", since, &on_b, &token, 401).await;
        assert_within_bound("client off", took);
        assert_eq!(get_status(&on_b, &basic_auth).await, 401);

        // A rotated secret: the old one stops working on B.
        let since = Instant::now();
        let (id, secret) = d.a.client_with_policy(&admin, None).await;
        let old = basic(&id, &secret);
        until_status("new client on A → Basic on B", since, &on_b, &old, 200).await;
        let since = Instant::now();
        let (status, rotated) = json_of(
            c.post(format!("{}ClientApplication/{id}/$rotate-secret", d.a.fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "Parameters", "parameter": [{"name": "secret", "valueString": secret}]}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{rotated}");
        let took = until_status("secret rotated on A → 401 on B (Basic)", since, &on_b, &old, 401).await;
        assert_within_bound("secret rotation", took);
        let new_secret = rotated["secret"].as_str().unwrap();
        assert_eq!(get_status(&on_b, &basic(&id, new_secret)).await, 200, "the new secret came with the same change");

        // A changed AccessPolicy: Patient allowed, then only Observation.
        let (status, policy) = json_of(
            c.post(format!("{}AccessPolicy", d.a.fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "AccessPolicy", "name": "patients", "resource": [{"resourceType": "Patient"}]}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{policy}");
        let policy_id = policy["id"].as_str().unwrap().to_string();
        let (id, secret) = d.a.client_with_policy(&admin, Some(&policy_id)).await;
        let token = format!("Bearer {}", d.a.token(&id, &secret, None).await);
        assert_eq!(get_status(&on_b, &token).await, 200);
        let mut changed = policy.clone();
        changed["resource"] = json!([{"resourceType": "Observation"}]);
        let since = Instant::now();
        let r = c
            .put(format!("{}AccessPolicy/{policy_id}", d.a.fhir))
            .bearer_auth(&admin)
            .json(&changed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let took = until_status("AccessPolicy changed on A → 403 on B", since, &on_b, &token, 403).await;
        assert_within_bound("policy change", took);
        assert_eq!(
            get_status(&format!("{}Observation?_count=1", d.b.fhir), &token).await,
            200
        );
    });
}

/// Two control instances on one database, nothing else.
fn two_controls(store: &str) -> (TestGateway, TestGateway) {
    let up = &upstream().base_url;
    let issuer = format!("http://127.0.0.1:{}/", free_port());
    let one = TestGateway::start_planes(up, store, CONTROL, |f| {
        f.base_url = Some(issuer.clone());
        f.threads = Some(2);
    });
    let two = TestGateway::start_planes(up, store, CONTROL, |f| {
        f.base_url = Some(issuer.clone());
        f.threads = Some(2);
    });
    (one, two)
}

/// Sends `form` to `/oauth2/token` of `one` and `two` alternately, `n` times at once; returns
/// every (status, body).
async fn race(
    one: &TestGateway,
    two: &TestGateway,
    form: Vec<(String, String)>,
    n: usize,
) -> Vec<(u16, Value)> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = format!(
            "{}oauth2/token",
            if i % 2 == 0 { &one.base } else { &two.base }
        );
        let form = form.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let client = TestGateway::client();
            barrier.wait().await;
            json_of(client.post(url).form(&form).send().await.unwrap()).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[test]
fn one_authorization_code_is_redeemed_once_across_two_control_instances() {
    let _serial = serial();
    let store = common::pg::fresh_database();
    let (one, two) = two_controls(&store);
    let user = UserSeed::new("linus@example.com", "correct horse battery");
    people::seed(&one, &user);
    rt().block_on(async {
        for round in 0..3 {
            let (verifier, challenge) = people::pkce_pair();
            let (status, login) = people::auth_login(
                &one,
                &json!({"email": user.email, "password": user.password, "scope": "openid",
                        "codeChallenge": challenge, "codeChallengeMethod": "S256"}),
            )
            .await;
            assert_eq!(status, 200, "{login}");
            let code = login["code"].as_str().unwrap().to_string();
            let form = vec![
                ("grant_type".to_string(), "authorization_code".to_string()),
                ("code".to_string(), code),
                ("code_verifier".to_string(), verifier),
            ];
            let results = race(&one, &two, form, 16).await;
            let winners = results.iter().filter(|(s, _)| *s == 200).count();
            assert_eq!(winners, 1, "round {round}: {results:?}");
            for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
                assert_eq!(*status, 400, "{body}");
                assert_eq!(body["error"], "invalid_grant", "{body}");
            }
        }
    });
}

#[test]
fn one_refresh_token_is_redeemed_once_across_two_control_instances_and_reuse_ends_it() {
    let _serial = serial();
    let store = common::pg::fresh_database();
    let (one, two) = two_controls(&store);
    let user = UserSeed::new("margaret@example.com", "correct horse battery");
    people::seed(&one, &user);
    rt().block_on(async {
        let tokens =
            people::sign_in(&one, &user.email, &user.password, None, "openid offline").await;
        let refresh = tokens.refresh_token.clone().expect("a refresh token");
        let form = vec![
            ("grant_type".to_string(), "refresh_token".to_string()),
            ("refresh_token".to_string(), refresh),
        ];
        let results = race(&one, &two, form, 16).await;
        let winners: Vec<&Value> = results
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
            assert_eq!(*status, 400, "{body}");
        }
        // The same refresh token presented again (here, by the losers of the race) is reuse:
        // the whole family ends, the winner's new tokens included, on both instances.
        let winner = people::TokenResponse::from_body(winners[0].clone());
        let next = winner
            .refresh_token
            .clone()
            .expect("a rotated refresh token");
        for gw in [&one, &two] {
            let (status, body) = people::token_request(
                gw,
                &[("grant_type", "refresh_token"), ("refresh_token", &next)],
            )
            .await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error_description"], "Token revoked", "{body}");
        }
    });
}

#[test]
fn a_database_outage_keeps_verified_credentials_refuses_the_rest_and_recovers() {
    let _serial = serial();
    let cluster = DedicatedCluster::start();
    let store = cluster.create_database("fhirgate_outage");
    // B gives up on its verified credentials after 2 s without the store; A keeps them (10 min).
    let d = Deployment::start_with(&store, |_| {}, |f| f.store_outage_ttl = Some("2s".into()));
    rt().block_on(async {
        let c = TestGateway::client();
        let seen = d.a.admin_token().await;
        let unseen = d.a.admin_token().await;
        let seen_bearer = format!("Bearer {seen}");
        let unseen_bearer = format!("Bearer {unseen}");
        let admin_basic = basic(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET);
        let patients_a = format!("{}Patient?_count=1", d.a.fhir);
        let patients_b = format!("{}Patient?_count=1", d.b.fhir);
        // Verified before the stop, on both proxies: the Bearer token, and the admin client's
        // Basic credentials (an instance holds what it has looked up, not the whole store).
        for url in [&patients_a, &patients_b] {
            assert_eq!(get_status(url, &seen_bearer).await, 200);
            assert_eq!(get_status(url, &admin_basic).await, 200);
        }
        for gw in [&d.a, &d.b, &d.control] {
            assert_eq!(get_status(&format!("{}readyz", gw.metrics), "").await, 200);
        }

        let stopping = Instant::now();
        cluster.stop();
        let stopped = Instant::now();
        for gw in [&d.a, &d.b, &d.control] {
            until_status("readiness red after the stop", stopped, &format!("{}readyz", gw.metrics), "", 503).await;
            assert_eq!(get_status(&format!("{}healthz", gw.metrics), "").await, 200);
            while gw.running().state.store_up() {
                assert!(stopped.elapsed() < Duration::from_secs(10), "the outage went unnoticed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        println!("outage noticed by every instance after {} ms", stopped.elapsed().as_millis());
        // Verified before the stop: still served, Bearer and Basic (from the caches).
        assert_eq!(get_status(&patients_a, &seen_bearer).await, 200);
        assert_eq!(get_status(&patients_a, &admin_basic).await, 200);
        // Never seen: cannot be verified without its Login, so 503, never 401 or 500.
        let (status, body) = json_of(c.get(&patients_a).header("authorization", &unseen_bearer).send().await.unwrap()).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(body["issue"][0]["details"]["text"], "Credential store unavailable");
        // The control API: 503, and nothing written.
        let (status, body) = json_of(
            c.post(format!("{}oauth2/token", d.a.base))
                .form(&[("grant_type", "client_credentials"), ("client_id", ADMIN_CLIENT_ID), ("client_secret", ADMIN_CLIENT_SECRET)])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        let (status, body) = json_of(
            c.post(format!("{}AccessPolicy", d.a.fhir))
                .header("authorization", &admin_basic)
                .json(&json!({"resourceType": "AccessPolicy", "name": "written during the outage", "resource": [{"resourceType": "Patient"}]}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        // Past B's store_outage_ttl, B refuses even what it had verified (fail closed).
        until_status("B refuses cached credentials past store_outage_ttl", stopped, &patients_b, &seen_bearer, 503).await;
        // The TTL counts from the last successful round trip, about one poll (250 ms) before
        // the stop began at most.
        assert!(
            stopping.elapsed() >= Duration::from_millis(1500),
            "B gave up after {:?}",
            stopping.elapsed()
        );
        assert_eq!(get_status(&patients_a, &seen_bearer).await, 200, "A's TTL is 10 min");

        cluster.restart();
        let restarted = Instant::now();
        for gw in [&d.a, &d.b, &d.control] {
            until_status("readiness green after the restart", restarted, &format!("{}readyz", gw.metrics), "", 200).await;
        }
        let took = until_status("unseen token verified after the restart", restarted, &patients_a, &unseen_bearer, 200).await;
        println!("recovery after the database restart: {} ms", took.as_millis());
        until_status("B serves again after the restart", restarted, &patients_b, &seen_bearer, 200).await;
        let fresh = d.b.admin_token().await;
        assert_eq!(get_status(&patients_b, &format!("Bearer {fresh}")).await, 200);
        // The refused write left nothing behind.
        let (status, found) = json_of(
            c.get(format!("{}AccessPolicy?name=written during the outage", d.a.fhir))
                .bearer_auth(&fresh)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["entry"].as_array().map_or(0, Vec::len), 0, "{found}");
        // The change feed is back (its listener reconnected): a logout on A reaches B in time.
        let since = Instant::now();
        let r = c.post(format!("{}oauth2/logout", d.a.base)).bearer_auth(&seen).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let took = until_status("logout after the restart → 401 on B", since, &patients_b, &seen_bearer, 401).await;
        assert_within_bound("logout after recovery", took);
    });
}
