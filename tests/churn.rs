//! Correctness under churn (issue 15): two instances on one store — A, the control API that
//! takes the writes, and B, a second instance that only learns of them through the change feed
//! — while a random stream of invites, policy edits, membership deactivations, clients turned
//! off and logouts goes through A and B authenticates every credential over and over.
//!
//! Two properties, on SQLite and on PostgreSQL:
//! - every change is enforced by B within the 1 s budget (each one is polled until it shows);
//! - no request B decides more than 1 s after a credential died gets through (the hammer's
//!   record is checked afterwards, so a stale cache entry that outlived its change — the race
//!   the identity caches' fence closes — fails the test).
//!
//! B decides as its gateway does: with each Bearer token's kept standing (`state::standing`),
//! which skips the live checks and the policy lookups while nothing changed, so a standing kept
//! past a change fails the test too.
//!
//! The stream is random but reproducible: the seed is printed, and `FHIRGATE_CHURN_SEED` replays
//! one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::Engine;
use common::http::basic;
use common::inprocess::{InProcess, PEER, request};
use fhirgate::config::{Config, ConfigFile};
use fhirgate::state::{AuthError, State};
use fhirgate::store::Store;
use serde_json::{Value, json};

/// docs/contract.md §2: every instance enforces a change within this.
const BOUND: Duration = Duration::from_secs(1);
/// Credentials created before the stream starts.
const CLIENTS: usize = 12;
/// Changes in one stream.
const STEPS: usize = 36;

/// A small deterministic generator (xorshift64*): the stream is replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One client of the default project, its Basic header and a Bearer token of it.
#[derive(Clone)]
struct Credential {
    client_id: String,
    membership: Value,
    basic: String,
    bearer: String,
    login_id: String,
    /// When a change that kills its Bearer token was committed (a logout, or one of the
    /// changes below).
    bearer_dead_since: Option<Instant>,
    /// When a change that kills the client's Basic credentials too was committed (membership
    /// deactivated, client turned off).
    dead_since: Option<Instant>,
}

/// What the hammer saw: which credential, when the decision started, whether it got through.
struct Seen {
    credential: usize,
    bearer: bool,
    started: Instant,
    admitted: bool,
}

async fn call(a: &InProcess, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let auth = basic(&a.boot.client_id, a.boot.client_secret.as_deref().unwrap());
    let mut headers = vec![("authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/fhir+json"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let r = a.send(request(method, uri, &headers, body, PEER)).await;
    let v = serde_json::from_str(&r.text).unwrap_or(Value::Null);
    (r.status, v)
}

/// A new client through A's admin API, with its membership bound to `policy`, and a token.
async fn new_credential(a: &InProcess, policy: &str) -> Credential {
    let project = &a.boot.default_project_id;
    let (status, client) = call(
        a,
        "POST",
        &format!("/admin/projects/{project}/client"),
        Some(json!({"name": "churn"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{client}");
    let id = client["id"].as_str().unwrap().to_string();
    let secret = client["secret"].as_str().unwrap().to_string();
    let (status, found) = call(
        a,
        "GET",
        &format!("/fhir/R4/ProjectMembership?profile=ClientApplication/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let mut membership = found["entry"][0]["resource"].clone();
    membership["accessPolicy"] = json!({"reference": format!("AccessPolicy/{policy}")});
    let membership = put(a, membership).await;
    let form = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    let r = a
        .send(request(
            "POST",
            "/oauth2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
            PEER,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let token = r.json()["access_token"].as_str().unwrap().to_string();
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    Credential {
        client_id: id.clone(),
        membership,
        basic: basic(&id, &secret),
        bearer: format!("Bearer {token}"),
        login_id: claims["login_id"].as_str().unwrap().to_string(),
        bearer_dead_since: None,
        dead_since: None,
    }
}

/// `PUT` of a resource through A's FHIR API (a local write: A catches up before answering).
async fn put(a: &InProcess, resource: Value) -> Value {
    let uri = format!(
        "/fhir/R4/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let (status, stored) = call(a, "PUT", &uri, Some(resource)).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    stored
}

/// A second instance on A's store: its own caches, fed only by the change feed.
async fn second_instance(a: &InProcess, dir: &Path) -> Arc<State> {
    let store = Store::open(&a.state.config.store_url).await.unwrap();
    let config = Config::from_file(ConfigFile {
        base_url: Some(common::inprocess::BASE.into()),
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let kek = fhirgate::sealed::KeyEncryptionKey::from_bytes(&[5; 32]).unwrap();
    State::new(
        config,
        store,
        Arc::new(kek),
        b"test-secret-hash-key".to_vec(),
    )
    .await
    .unwrap()
}

/// Polls `check` until it holds; the time from `since` it took, at most 10 s.
async fn until(what: &str, since: Instant, mut check: impl AsyncFnMut() -> bool) -> Duration {
    loop {
        if check().await {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{what}: not enforced after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How B's data plane decides `header`: authenticated with the token's kept standing (the
/// live checks are skipped while nothing changed since they passed), and the standing derived
/// and kept as the gateway does, so the hammer keeps every Bearer token's standing warm and a
/// standing that outlived its change is caught here.
async fn denied(b: &State, header: &str) -> Option<AuthError> {
    match b.authenticate_with_standing(Some(header)).await.0 {
        Err(e) => Some(e),
        Ok((identity, slot)) => {
            b.standing(&identity, &slot)
                .await
                .expect("an authenticated caller has a standing");
            None
        }
    }
}

/// Whether the policy in the standing of B's data plane for `header` grants `resource_type`.
async fn standing_grants(b: &State, header: &str, resource_type: &str) -> bool {
    let (identity, slot) = b
        .authenticate_with_standing(Some(header))
        .await
        .0
        .expect("a live credential");
    let standing = b.standing(&identity, &slot).await.unwrap();
    standing
        .policy
        .access_policy()
        .resource
        .iter()
        .any(|r| r.resource_type == resource_type)
}

/// Whether B's effective policy of `membership` grants `resource_type`.
async fn grants(b: &State, membership: &str, resource_type: &str) -> bool {
    let snap = b.snapshot();
    let policy = b
        .effective_policy(&snap, membership, None)
        .await
        .unwrap()
        .unwrap();
    policy
        .access_policy()
        .resource
        .iter()
        .any(|r| r.resource_type == resource_type)
}

async fn churn(store: impl FnOnce(&Path) -> Option<String>) {
    let seed = std::env::var("FHIRGATE_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("churn seed {seed} (FHIRGATE_CHURN_SEED replays it)");
    let mut rng = Rng(seed);

    let a = InProcess::start(store, |_| {}).await;
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_instance(&a, b_dir.path()).await;
    let (stop_feed, feed_stopped) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(fhirgate::feed::run(b.clone(), feed_stopped));

    let mut policy = json!({
        "resourceType": "AccessPolicy",
        "name": "churn",
        "resource": [{"resourceType": "Patient"}],
    });
    let (status, stored) = call(&a, "POST", "/fhir/R4/AccessPolicy", Some(policy.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    policy = stored;
    let policy_id = policy["id"].as_str().unwrap().to_string();

    let mut credentials = Vec::new();
    for _ in 0..CLIENTS {
        credentials.push(new_credential(&a, &policy_id).await);
    }
    let shared: Arc<Mutex<Vec<Credential>>> = Arc::new(Mutex::new(credentials.clone()));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));

    // The hammer: B decides every credential, Basic and Bearer, again and again.
    let (stop_hammer, mut hammer_stopped) = tokio::sync::watch::channel(false);
    let hammer = {
        let (b, shared, seen) = (b.clone(), shared.clone(), seen.clone());
        tokio::spawn(async move {
            while !*hammer_stopped.borrow_and_update() {
                let all = shared.lock().unwrap().clone();
                for (i, c) in all.iter().enumerate() {
                    for (header, bearer) in [(&c.basic, false), (&c.bearer, true)] {
                        let started = Instant::now();
                        let admitted = denied(&b, header).await.is_none();
                        seen.lock().unwrap().push(Seen {
                            credential: i,
                            bearer,
                            started,
                            admitted,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let mut slowest = Duration::ZERO;
    let mut observation = false;
    for step in 0..STEPS {
        let live: Vec<usize> = credentials
            .iter()
            .enumerate()
            .filter(|(_, c)| c.bearer_dead_since.is_none())
            .map(|(i, _)| i)
            .collect();
        let op = if live.len() < 3 { 0 } else { rng.below(5) };
        let pick = live.get(rng.below(live.len().max(1))).copied();
        let took = match (op, pick) {
            // Invite: a new identity must be admitted by B.
            (0, _) | (_, None) => {
                let c = new_credential(&a, &policy_id).await;
                let since = Instant::now();
                let took = until("invite", since, async || {
                    let (basic, bearer) = (denied(&b, &c.basic).await, denied(&b, &c.bearer).await);
                    if since.elapsed() > Duration::from_secs(9) {
                        eprintln!("invite still refused: Basic {basic:?}, Bearer {bearer:?}");
                    }
                    basic.is_none() && bearer.is_none()
                })
                .await;
                credentials.push(c);
                took
            }
            // Logout: the Login is revoked.
            (1, Some(i)) => {
                a.state
                    .store
                    .revoke_login(&credentials[i].login_id)
                    .await
                    .unwrap();
                a.state.refresh().await.unwrap();
                let since = Instant::now();
                credentials[i].bearer_dead_since = Some(since);
                let bearer = credentials[i].bearer.clone();
                until("logout", since, async || {
                    denied(&b, &bearer).await == Some(AuthError::LoginRevoked)
                })
                .await
            }
            // The membership deactivated.
            (2, Some(i)) => {
                let mut m = credentials[i].membership.clone();
                m["active"] = json!(false);
                credentials[i].membership = put(&a, m).await;
                let since = Instant::now();
                credentials[i].dead_since = Some(since);
                credentials[i].bearer_dead_since = Some(since);
                let (basic, bearer) = (credentials[i].basic.clone(), credentials[i].bearer.clone());
                until("deactivation", since, async || {
                    denied(&b, &basic).await == Some(AuthError::MembershipInactive)
                        && denied(&b, &bearer).await == Some(AuthError::MembershipInactive)
                })
                .await
            }
            // The client turned off.
            (3, Some(i)) => {
                let (status, mut client) = call(
                    &a,
                    "GET",
                    &format!("/fhir/R4/ClientApplication/{}", credentials[i].client_id),
                    None,
                )
                .await;
                assert_eq!(status, StatusCode::OK, "{client}");
                client["status"] = json!("off");
                put(&a, client).await;
                let since = Instant::now();
                credentials[i].dead_since = Some(since);
                credentials[i].bearer_dead_since = Some(since);
                let (basic, bearer) = (credentials[i].basic.clone(), credentials[i].bearer.clone());
                until("client off", since, async || {
                    denied(&b, &basic).await == Some(AuthError::ClientInactive)
                        && denied(&b, &bearer).await == Some(AuthError::ClientInactive)
                })
                .await
            }
            // The shared policy edited: Observation granted, or taken back.
            (_, Some(i)) => {
                observation = !observation;
                let mut resources = vec![json!({"resourceType": "Patient"})];
                if observation {
                    resources.push(json!({"resourceType": "Observation"}));
                }
                policy["resource"] = Value::Array(resources);
                policy = put(&a, policy.clone()).await;
                let since = Instant::now();
                let membership = credentials[i].membership["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let want = observation;
                let bearer = credentials[i].bearer.clone();
                until("policy edit", since, async || {
                    grants(&b, &membership, "Observation").await == want
                        && standing_grants(&b, &bearer, "Observation").await == want
                })
                .await
            }
        };
        println!(
            "step {step}: op {op} enforced by B after {} ms",
            took.as_millis()
        );
        slowest = slowest.max(took);
        *shared.lock().unwrap() = credentials.clone();
    }

    stop_hammer.send(true).unwrap();
    hammer.await.unwrap();
    stop_feed.send(true).unwrap();
    feed.await.unwrap();

    assert!(
        slowest <= BOUND,
        "a change took {} ms to reach B (seed {seed})",
        slowest.as_millis()
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() > 100,
        "the hammer decided too little to mean anything: {}",
        seen.len()
    );
    for s in seen.iter() {
        let c = &credentials[s.credential];
        let died = if s.bearer {
            c.bearer_dead_since
        } else {
            c.dead_since
        };
        if let Some(dead) = died {
            assert!(
                !(s.admitted && s.started > dead + BOUND),
                "credential {} ({}) admitted {} ms after it died (seed {seed})",
                s.credential,
                if s.bearer { "Bearer" } else { "Basic" },
                (s.started - dead).as_millis()
            );
        }
    }
    println!(
        "churn: {} changes, {} decisions by B, slowest propagation {} ms",
        STEPS,
        seen.len(),
        slowest.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_enforces_every_change_of_a_random_stream_on_sqlite() {
    churn(|_| None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_enforces_every_change_of_a_random_stream_on_postgres() {
    churn(|_| Some(common::pg::fresh_database())).await;
}

/// Housekeeping never holds up the feed: while B's pruning pass is stuck (here behind a lock
/// another session holds on the Login table, as a first pass over a large backlog can take
/// seconds), a change made through A is still enforced on B within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_pruning_pass_does_not_delay_changes_on_postgres() {
    use sqlx::Connection;
    let a = InProcess::start(|_| Some(common::pg::fresh_database()), |_| {}).await;
    let policy = a
        .state
        .store
        .put(
            json!({"resourceType": "AccessPolicy", "id": "stuck-prune", "resource": [{"resourceType": "Patient"}]}),
            Some(&a.boot.default_project_id),
            &[],
            None,
            false,
        )
        .await
        .unwrap();
    let credential = new_credential(&a, &policy.id).await;

    let mut blocker = sqlx::PgConnection::connect(&a.state.config.store_url)
        .await
        .unwrap();
    let mut held = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE logins IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *held)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let b = second_instance(&a, dir.path()).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The feed's first pruning pass starts at once, and waits for the lock.
    let feed = tokio::spawn(fhirgate::feed::run(b.clone(), stopped));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(denied(&b, &credential.basic).await, None);

    let mut membership = credential.membership.clone();
    membership["active"] = json!(false);
    put(&a, membership).await;
    let since = Instant::now();
    let took = until("deactivation while pruning is stuck", since, async || {
        denied(&b, &credential.basic).await.is_some()
    })
    .await;
    assert!(
        took <= Duration::from_secs(1),
        "B enforced the change after {took:?}: the feed waited for housekeeping"
    );

    held.rollback().await.unwrap();
    stop.send(true).unwrap();
    feed.await.unwrap();
}

/// A Bearer token's standing (`state::standing`) is kept only while nothing changed: the next
/// request reuses it, and after any change is applied — an unrelated new client, then an edit
/// of the caller's own policy — the next request derives it again and sees the edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_standing_lasts_only_until_the_next_change() {
    let a = InProcess::start(|_| None, |_| {}).await;
    let state = a.state.clone();
    let (status, mut policy) = call(
        &a,
        "POST",
        "/fhir/R4/AccessPolicy",
        Some(json!({"resourceType": "AccessPolicy", "name": "kept", "resource": [{"resourceType": "Patient"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{policy}");
    let policy_id = policy["id"].as_str().unwrap().to_string();
    let caller = new_credential(&a, &policy_id).await;
    let request = async || {
        let (identity, slot) = state
            .authenticate_with_standing(Some(&caller.bearer))
            .await
            .0
            .expect("a live token");
        let kept = slot.current();
        let standing = state.standing(&identity, &slot).await.unwrap();
        (kept, standing)
    };
    let observation = |s: &fhirgate::state::standing::Standing| {
        s.policy
            .access_policy()
            .resource
            .iter()
            .any(|r| r.resource_type == "Observation")
    };

    let (kept, first) = request().await;
    assert!(kept.is_none(), "nothing is kept before the first request");
    let (kept, second) = request().await;
    assert!(
        kept.is_some_and(|k| Arc::ptr_eq(&k, &first)) && Arc::ptr_eq(&second, &first),
        "the next request reuses the standing"
    );

    // Any change applied drops it, even one that does not concern the caller.
    new_credential(&a, &policy_id).await;
    let (kept, third) = request().await;
    assert!(kept.is_none(), "a standing outlived a change");
    assert!(!Arc::ptr_eq(&third, &first));
    assert!(!observation(&third));

    policy["resource"] = json!([{"resourceType": "Patient"}, {"resourceType": "Observation"}]);
    put(&a, policy).await;
    let (kept, fourth) = request().await;
    assert!(
        kept.is_none(),
        "a standing outlived the edit of its own policy"
    );
    assert!(observation(&fourth), "the edit is in the next standing");
    let (kept, _) = request().await;
    assert!(kept.is_some(), "and that one is kept again");

    // A kept standing never answers for a revoked Login: the very next request is refused.
    a.state.store.revoke_login(&caller.login_id).await.unwrap();
    a.state.refresh().await.unwrap();
    let refused = state
        .authenticate_with_standing(Some(&caller.bearer))
        .await
        .0
        .err();
    assert_eq!(refused, Some(AuthError::LoginRevoked));
    // Nor does the control plane's authentication, which never skips the live checks.
    assert_eq!(
        state.authenticate(Some(&caller.bearer)).await.0.err(),
        Some(AuthError::LoginRevoked)
    );
}
