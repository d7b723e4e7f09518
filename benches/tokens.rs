//! Criterion benchmarks of credentials on the request path (docs/contract.md §5: a cold ES256 verification
//! costs no more than the signature check, ~90 µs here; a cached one ≤ 2 µs; issuance ≥ 2,000/s).
//!
//! - `keyring/*`: `Keyring::sign` and `Keyring::verify` on their own (the cold path's crypto).
//! - `state/*`: a real `State` over a temp-dir SQLite store, bootstrapped, with a token issued by
//!   the control API's `/oauth2/token` (client credentials). `authenticate` with a warm token
//!   cache (moka lookup + live checks against the snapshot), Basic auth (keyed hash + snapshot),
//!   the effective-policy cache, the request path's pure CPU between them, and the cold path's
//!   pieces (the Login read from SQLite).
//! - `issue/*`: one whole client-credentials request through the control router in process
//!   (form parsing, secret check, Login insert into SQLite, two ES256 signatures, JSON).
//! - `signin/*`: a user's tokens. `argon2id verify` is the password check alone (slow on
//!   purpose: it dominates a password sign-in); `password sign-in` is `/auth/login` (argon2,
//!   user and membership lookups, Login insert, code) plus the PKCE code exchange (atomic
//!   redemption, User read, three ES256 signatures); `refresh_token` is one rotation (JWT
//!   verification, Login read, compare-and-swap of the refresh secret, three signatures).
//!
//! Run: `CARGO_TARGET_DIR=/work/target-bench cargo bench --bench tokens`
//! (quick pass: append `-- --warm-up-time 1 --measurement-time 3`). These measure; they never
//! assert a timing.
//!
//! The cache-hit path never awaits, so it is polled once with a no-op waker instead of going
//! through a runtime: what is measured is `authenticate` itself, not `block_on`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use criterion::{Criterion, criterion_group, criterion_main};
use fhirgate::config::{Config, ConfigFile};
use fhirgate::control::bootstrap::bootstrap;
use fhirgate::state::{Identity, State};
use fhirgate::store::{Store, now_unix};
use fhirgate::tokens::{Claims, Keyring, SigningKey};
use fhirgate_core::fhir::classify::classify;
use fhirgate_core::fhir::request::RequestParts;
use fhirgate_core::policy::decide::{Decision, decide};
use http_body_util::BodyExt;
use tower::ServiceExt;

const ISSUER: &str = "http://localhost:8080/";
const CLIENT_ID: &str = "bench-client";
const CLIENT_SECRET: &str = "bench-secret-0123456789abcdef0123456789abcdef";

/// Polls a future that is expected to finish without waiting (a cache hit).
fn poll_now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("expected a cache hit that does not await"),
    }
}

fn access_claims() -> Claims {
    let now = now_unix();
    Claims {
        iss: ISSUER.into(),
        iat: now,
        exp: now + 3600,
        aud: Some(CLIENT_ID.into()),
        client_id: Some(CLIENT_ID.into()),
        login_id: Some("5d0c7f6e-3a7b-4e52-9a51-2b8e1f0c9d11".into()),
        sub: Some(CLIENT_ID.into()),
        username: Some(CLIENT_ID.into()),
        scope: Some("openid".into()),
        profile: Some(format!("ClientApplication/{CLIENT_ID}")),
        ..Default::default()
    }
}

fn bench_keyring(c: &mut Criterion) {
    let (key, _) = SigningKey::generate("k1".into()).unwrap();
    let ring = Keyring::new(ISSUER.into(), vec![key]);
    let claims = access_claims();
    let token = ring.sign(&claims).unwrap();
    assert_eq!(ring.verify(&token).unwrap(), claims);
    eprintln!("keyring: access token is {} bytes", token.len());

    let mut g = c.benchmark_group("keyring");
    g.bench_function("sign ES256 (access token)", |b| {
        b.iter(|| ring.sign(black_box(&claims)).unwrap())
    });
    g.bench_function("verify ES256 (cold, full check)", |b| {
        b.iter(|| ring.verify(black_box(&token)).unwrap())
    });
    g.bench_function("decode_header only", |b| {
        b.iter(|| jsonwebtoken::decode_header(black_box(&token)).unwrap())
    });
    g.finish();

    // The cache on its own: moka::sync::Cache<String, Arc<Identity>>, as State holds it.
    let cache: moka::sync::Cache<String, Arc<Identity>> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(Duration::from_secs(24 * 3600))
        .build();
    let identity = Arc::new(Identity {
        login_id: Some("l1".into()),
        membership_id: "m1".into(),
        project_id: "p1".into(),
        profile: "ClientApplication/c1".into(),
        user_ref: "ClientApplication/c1".into(),
        client_id: Some("c1".into()),
        scope: Some("openid".into()),
        patient: None,
        expires_at: i64::MAX,
    });
    for i in 0..10_000 {
        cache.insert(format!("{token}{i}"), identity.clone());
    }
    cache.insert(token.clone(), identity);
    let mut g = c.benchmark_group("moka");
    g.bench_function("sync::Cache::get hit (10k entries, key = token)", |b| {
        b.iter(|| cache.get(black_box(token.as_str())).unwrap())
    });
    g.bench_function("sync::Cache::get miss", |b| {
        b.iter(|| cache.get(black_box("not-a-token")))
    });
    g.finish();
}

struct Env {
    rt: tokio::runtime::Runtime,
    state: Arc<State>,
    app: Router,
    _dir: tempfile::TempDir,
}

fn env() -> Env {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let file = ConfigFile {
        base_url: Some(ISSUER.into()),
        data_dir: Some(dir.path().to_path_buf()),
        admin_client_id: Some(CLIENT_ID.into()),
        admin_client_secret: Some(CLIENT_SECRET.into()),
        ..Default::default()
    };
    let config = Config::from_file(file).unwrap();
    let state = rt.block_on(async {
        let store = Store::open(&url).await.unwrap();
        let state = State::new(
            config,
            store,
            std::sync::Arc::new(fhirgate::sealed::KeyEncryptionKey::from_bytes(&[9; 32]).unwrap()),
            b"bench-secret-hash-key".to_vec(),
        )
        .await
        .unwrap();
        bootstrap(&state).await.unwrap();
        state
    });
    let app = fhirgate::control::router(state.clone());
    Env {
        rt,
        state,
        app,
        _dir: dir,
    }
}

fn token_request() -> Request<Body> {
    let form = format!(
        "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
    );
    Request::builder()
        .method("POST")
        .uri("/oauth2/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .unwrap()
}

async fn issue(app: &Router) -> String {
    let resp = app.clone().oneshot(token_request()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status.is_success(),
        "token: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

fn bench_state(c: &mut Criterion) {
    let env = env();
    let state = &env.state;
    let token = env.rt.block_on(issue(&env.app));
    let bearer = format!("Bearer {token}");
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );

    // First sight: verify + Login read + cache insert. Then every call is a hit.
    let (first, _) = env.rt.block_on(state.authenticate(Some(&bearer)));
    let identity = first.expect("token authenticates");
    let (hit, cache) = poll_now(state.authenticate(Some(&bearer)));
    assert!(hit.is_ok());
    assert_eq!(cache, fhirgate::state::CacheUse::Hit);
    // Basic reads its client and membership once, then from the caches.
    assert!(env.rt.block_on(state.authenticate(Some(&basic))).0.is_ok());
    assert!(poll_now(state.authenticate(Some(&basic))).0.is_ok());
    let login_id = identity.login_id.clone().unwrap();

    let mut g = c.benchmark_group("state");
    g.bench_function("authenticate Bearer (cache hit + live checks)", |b| {
        b.iter(|| poll_now(state.authenticate(black_box(Some(bearer.as_str())))))
    });
    g.bench_function("authenticate Basic (keyed hash + caches)", |b| {
        b.iter(|| poll_now(state.authenticate(black_box(Some(basic.as_str())))))
    });
    g.bench_function("authenticate garbage Bearer (cache miss, malformed)", |b| {
        b.iter(|| poll_now(state.authenticate(black_box(Some("Bearer not.a.jwt")))))
    });
    g.bench_function("snapshot() (ArcSwap load_full)", |b| {
        b.iter(|| state.snapshot())
    });
    let snap = state.snapshot();
    // The first call reads the membership and its policies from the store.
    let policy = env
        .rt
        .block_on(state.effective_policy(&snap, &identity.membership_id, identity.scope.as_deref()))
        .unwrap()
        .unwrap();
    g.bench_function("effective_policy (cache hit)", |b| {
        b.iter(|| {
            poll_now(state.effective_policy(
                &snap,
                black_box(&identity.membership_id),
                identity.scope.as_deref(),
            ))
        })
    });
    g.bench_function("store.login (SQLite read, the cold path's I/O)", |b| {
        b.iter(|| {
            env.rt
                .block_on(state.store.login(black_box(&login_id)))
                .unwrap()
        })
    });

    // The gateway's pure CPU for `GET /fhir/R4/Patient/p1` with a cached Bearer, as
    // `gateway::authorize` strings it together (no pingora, no I/O): authenticate, snapshot,
    // effective policy, IP rules, classify, decide.
    let headers: Vec<(&str, &str)> = vec![
        ("host", "127.0.0.1:8080"),
        ("authorization", bearer.as_str()),
        ("accept", "application/fhir+json"),
    ];
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    g.bench_function("request path CPU: read with cached Bearer", |b| {
        b.iter(|| {
            let (id, _) = poll_now(state.authenticate(Some(bearer.as_str())));
            let id = id.unwrap();
            let snap = state.snapshot();
            let policy =
                poll_now(state.effective_policy(&snap, &id.membership_id, id.scope.as_deref()))
                    .unwrap()
                    .unwrap();
            assert!(policy.check_ip(ip).is_allowed());
            let req = classify(&RequestParts {
                method: "GET",
                path: "Patient/p1",
                query: None,
                headers: &headers,
                body: None,
            })
            .unwrap();
            matches!(decide(&policy, &req, false), Decision::Allow(_))
        })
    });
    drop(policy);
    g.finish();

    // Issuance: one client-credentials request through the control router, in process.
    let mut g = c.benchmark_group("issue");
    g.sample_size(30);
    g.bench_function("client_credentials via control router (in process)", |b| {
        b.iter(|| env.rt.block_on(issue(&env.app)))
    });
    g.finish();
}

const USER_EMAIL: &str = "bench-user@example.com";
const USER_PASSWORD: &str = "bench password 123";
/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

/// A server-scoped user with one Practitioner membership in the default project.
async fn seed_user(state: &State, project: &str) {
    use fhirgate::control::index::index_rows;
    use serde_json::json;
    let user = json!({
        "resourceType": "User", "id": "bench-user", "firstName": "Bench", "lastName": "User",
        "email": USER_EMAIL,
        "passwordHash": fhirgate::control::bootstrap::hash_password(USER_PASSWORD).unwrap(),
    });
    state
        .store
        .put(user.clone(), None, &index_rows(&user), None, true)
        .await
        .unwrap();
    let m = json!({
        "resourceType": "ProjectMembership", "id": "bench-membership",
        "project": {"reference": format!("Project/{project}")},
        "user": {"reference": "User/bench-user"},
        "profile": {"reference": "Practitioner/bench-practitioner"},
    });
    state
        .store
        .put(m.clone(), Some(project), &index_rows(&m), None, true)
        .await
        .unwrap();
    state.refresh().await.unwrap();
}

async fn call(app: &Router, req: Request<Body>) -> serde_json::Value {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status.is_success(),
        "{status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap()
}

fn form_post(uri: &str, form: String) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .unwrap()
}

/// `/auth/login` with an S256 challenge, then the code exchange; returns the token response.
async fn password_sign_in(app: &Router, scope: &str) -> serde_json::Value {
    let login = serde_json::json!({
        "email": USER_EMAIL, "password": USER_PASSWORD, "scope": scope,
        "codeChallenge": CHALLENGE, "codeChallengeMethod": "S256",
    });
    let req = Request::builder()
        .method("POST")
        .uri("/auth/login")
        .header("content-type", "application/json")
        .body(Body::from(login.to_string()))
        .unwrap();
    let login = call(app, req).await;
    let code = login["code"].as_str().expect("a code");
    call(
        app,
        form_post(
            "/oauth2/token",
            format!("grant_type=authorization_code&code={code}&code_verifier={VERIFIER}"),
        ),
    )
    .await
}

fn bench_signin(c: &mut Criterion) {
    let env = env();
    let project = env
        .rt
        .block_on(env.state.store.list("Project"))
        .unwrap()
        .into_iter()
        .find(|p| p.content.get("superAdmin").is_none())
        .unwrap()
        .id;
    env.rt.block_on(seed_user(&env.state, &project));

    let hash = fhirgate::control::bootstrap::hash_password(USER_PASSWORD).unwrap();
    let parsed = argon2::PasswordHash::new(&hash).unwrap();
    let mut g = c.benchmark_group("signin");
    g.sample_size(20);
    g.bench_function("argon2id verify (default params)", |b| {
        use argon2::PasswordVerifier;
        b.iter(|| {
            argon2::Argon2::default()
                .verify_password(black_box(USER_PASSWORD.as_bytes()), &parsed)
                .unwrap()
        })
    });
    g.bench_function("password sign-in (/auth/login + code exchange)", |b| {
        b.iter(|| env.rt.block_on(password_sign_in(&env.app, "openid")))
    });
    let first = env
        .rt
        .block_on(password_sign_in(&env.app, "openid offline"));
    let refresh = std::cell::RefCell::new(first["refresh_token"].as_str().unwrap().to_string());
    g.bench_function(
        "refresh_token rotation via control router (in process)",
        |b| {
            b.iter(|| {
                let current = refresh.borrow().clone();
                let next = env.rt.block_on(call(
                    &env.app,
                    form_post(
                        "/oauth2/token",
                        format!("grant_type=refresh_token&refresh_token={current}"),
                    ),
                ));
                *refresh.borrow_mut() = next["refresh_token"].as_str().unwrap().to_string();
            })
        },
    );
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench_keyring, bench_state, bench_signin
}
criterion_main!(benches);
