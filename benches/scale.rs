//! Identity scale (issue 15): how fhirgate behaves as the number of identities in its store
//! grows. For each N, a generator loads N clients with their memberships, N/100 AccessPolicies
//! and N Logins straight into a fresh store; then, through the real control router and a second
//! instance (`State`) fed by the real change feed:
//!
//! - `invites/s`: new clients (client + membership + secret, as `POST /admin/projects/…/client`
//!   does), 4 at a time, sustained over 2,000 (400 under `cargo test`);
//! - `tokens/s`: client-credentials issuance, 4 at a time;
//! - `revocation`: a Login revoked through the first instance until the second refuses its
//!   token (max of 10);
//! - `request µs`: the second instance's request path per request (authenticate a cached
//!   Bearer, live checks, effective policy) over 400 identities, one thread;
//! - `start ms`: a new instance's `State::new` (what it loads at start);
//! - `gateway req/s`, `proxy CPU µs/req`, `proxy RSS / peak MiB`: the full path through the
//!   real binary, `fhirgate proxy` as its own process on the same store in front of a stand-in
//!   upstream (16 concurrent requests, the tokens in turn, 5 s); CPU and memory are that
//!   process's own (`/proc`), so they show what one proxy needs whatever N is;
//! - `entries`: what the second instance's identity caches hold.
//!
//! Run: `cargo bench --bench scale` (SQLite, N = 10k and 100k);
//! `FHIRGATE_SCALE_SIZES=10000,100000,1000000` picks sizes; `FHIRGATE_SCALE_STORE=postgres` runs
//! on a throwaway PostgreSQL cluster (scripts/pg-cluster). It measures; it asserts no timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/pg.rs"]
mod pg;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use base64::Engine;
use fhirgate::config::{Config, ConfigFile};
use fhirgate::control::bootstrap::{BootstrapReport, bootstrap};
use fhirgate::state::{AuthError, State};
use fhirgate::store::{BatchWrite, LoginRecord, Store, now_unix};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const BASE: &str = "http://localhost:8080/";
const KEK: [u8; 32] = [7; 32];
const BATCH: usize = 1000;

fn config(dir: &std::path::Path, store_url: &str) -> Config {
    Config::from_file(ConfigFile {
        base_url: Some(BASE.into()),
        data_dir: Some(dir.to_path_buf()),
        store: Some(store_url.to_string()),
        admin_client_secret: Some("scale-admin-secret-0123456789abcdef".into()),
        auth_rate_limit: Some(0),
        ..Default::default()
    })
    .unwrap()
}

async fn instance(dir: &std::path::Path, store_url: &str) -> Arc<State> {
    let store = Store::open(store_url).await.unwrap();
    let kek = fhirgate::sealed::KeyEncryptionKey::from_bytes(&KEK).unwrap();
    // The store's own client-secret key, as `fhirgate serve` opens it: the gateway started
    // below on the same store must verify what this instance hashed.
    let hash_key = fhirgate::state::keys::open_store_secrets(&store, &kek)
        .await
        .unwrap();
    State::new(config(dir, store_url), store, Arc::new(kek), hash_key)
        .await
        .unwrap()
}

/// A stand-in FHIR server: every `GET` answers one small Patient (fhirgate's work is what is
/// measured, not the upstream's).
async fn upstream() -> String {
    let app = Router::new().fallback(|| async {
        (
            [("content-type", "application/fhir+json")],
            r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Scale"}]}"#,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/fhir/R4")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU time (user + system) of process `pid`, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// A `VmRSS`-style line (`VmRSS`, `VmHWM`) of process `pid`, in MiB.
fn memory_mib(pid: u32, line: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(line))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A `fhirgate proxy` process, killed when dropped.
struct Proxy(std::process::Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the full path measured in the proxy process.
struct FullPath {
    requests_per_sec: f64,
    cpu_us_per_request: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// The full request path through the real binary: `fhirgate proxy` as its own process on the
/// store, in front of a stand-in upstream, 16 concurrent `GET Patient/p1` with `bearers` in
/// turn for 5 s. CPU and memory are the proxy process's own.
async fn full_path(store_url: &str, dir: &std::path::Path, bearers: &[String]) -> FullPath {
    let upstream = upstream().await;
    let (port, metrics) = (free_port(), free_port());
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fhirgate"));
    for (key, _) in std::env::vars() {
        if key.starts_with("FHIRGATE_") {
            cmd.env_remove(key);
        }
    }
    let kek = base64::engine::general_purpose::STANDARD.encode(KEK);
    cmd.arg("proxy")
        .env("FHIRGATE_BASE_URL", BASE)
        .env("FHIRGATE_DATA_DIR", dir)
        .env("FHIRGATE_STORE", store_url)
        .env("FHIRGATE_KEY_ENCRYPTION_KEY", kek)
        .env("FHIRGATE_UPSTREAM", upstream)
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
        .env(
            "FHIRGATE_CONTROL_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("FHIRGATE_THREADS", "2")
        .env("FHIRGATE_GRACE_PERIOD_SECONDS", "0")
        .env("FHIRGATE_LOG_FORMAT", "text")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut proxy = Proxy(cmd.spawn().expect("start fhirgate proxy"));
    let client = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{metrics}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            panic!(
                "fhirgate proxy exited with {status}: {}",
                std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
            );
        }
        if client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "fhirgate proxy never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = proxy.0.id();
    let url = format!("http://127.0.0.1:{port}/fhir/R4/Patient/p1");
    let bearers = Arc::new(bearers.to_vec());
    // Warm: every token seen once.
    for b in bearers.iter() {
        let r = client
            .get(&url)
            .header("authorization", b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
    let secs = 5;
    let until = Instant::now() + Duration::from_secs(secs);
    let cpu = cpu_time(pid);
    let mut lanes = Vec::new();
    for lane in 0..16usize {
        let (client, url, bearers) = (client.clone(), url.clone(), bearers.clone());
        lanes.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = lane;
            while Instant::now() < until {
                let r = client
                    .get(&url)
                    .header("authorization", &bearers[i % bearers.len()])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
                done += 1;
                i += 16;
            }
            done
        }));
    }
    let mut total = 0u64;
    for l in lanes {
        total += l.await.unwrap();
    }
    let cpu = cpu_time(pid).saturating_sub(cpu);
    FullPath {
        requests_per_sec: total as f64 / secs as f64,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / total.max(1) as f64,
        rss_mib: memory_mib(pid, "VmRSS:"),
        peak_rss_mib: memory_mib(pid, "VmHWM:"),
    }
}

/// Loads `n` clients, memberships and Logins, and `n / 100` policies, in batches of
/// [`BATCH`], `lanes` batches at a time (PostgreSQL takes concurrent writers; SQLite does not).
async fn generate(state: &State, project: &str, n: usize, lanes: usize) {
    let store = &state.store;
    let policies = (n / 100).max(1);
    let batch: Vec<BatchWrite> = (0..policies)
        .map(|p| {
            put(
                json!({
                    "resourceType": "AccessPolicy",
                    "id": format!("gen-policy-{p}"),
                    "name": format!("generated {p}"),
                    "resource": [{"resourceType": "Patient"}, {"resourceType": "Observation"}],
                }),
                project,
            )
        })
        .collect();
    for chunk in batch.chunks(BATCH) {
        store.write_batch(chunk.to_vec()).await.unwrap();
    }
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (store, project) = (store.clone(), project.to_string());
        tasks.push(tokio::spawn(async move {
            generate_lane(&store, &project, n, policies, lane, lanes).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The identities `i` with `i % lanes == lane`.
async fn generate_lane(
    store: &Store,
    project: &str,
    n: usize,
    policies: usize,
    lane: usize,
    lanes: usize,
) {
    let now = now_unix();
    let mut batch = Vec::new();
    let mut logins = Vec::new();
    for i in (lane..n).step_by(lanes) {
        let id = format!("gen-client-{i}");
        let client_ref = format!("ClientApplication/{id}");
        batch.push(put(
            json!({"resourceType": "ClientApplication", "id": id, "name": format!("generated {i}"),
                   "redirectUris": [format!("https://app{}.example.org/cb", i % 1000)]}),
            project,
        ));
        batch.push(put(
            json!({"resourceType": "ProjectMembership", "id": format!("gen-member-{i}"),
                   "project": {"reference": format!("Project/{project}")},
                   "user": {"reference": client_ref}, "profile": {"reference": client_ref},
                   "accessPolicy": {"reference": format!("AccessPolicy/gen-policy-{}", i % policies)}}),
            project,
        ));
        logins.push(LoginRecord {
            id: format!("gen-login-{i}"),
            user_ref: client_ref.clone(),
            client_id: Some(id.clone()),
            membership_id: Some(format!("gen-member-{i}")),
            project_id: Some(project.to_string()),
            scope: "openid".into(),
            auth_method: "client".into(),
            auth_time: now,
            expires_at: now + 3600,
            // One in ten revoked: the set a revocation check must not hold in memory.
            revoked: i % 10 == 0,
            remote_address: None,
            code: None,
            refresh_secret: None,
            extra: json!({"granted": true}),
        });
        if batch.len() >= BATCH {
            store.write_batch(std::mem::take(&mut batch)).await.unwrap();
            store
                .insert_logins(&std::mem::take(&mut logins))
                .await
                .unwrap();
        }
    }
    if !batch.is_empty() {
        store.write_batch(batch).await.unwrap();
    }
    store.insert_logins(&logins).await.unwrap();
}

fn put(content: Value, project: &str) -> BatchWrite {
    BatchWrite::Put {
        index: fhirgate::control::index::index_rows(&content),
        content,
        project_id: Some(project.to_string()),
        expected_version: None,
        create_only: true,
    }
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)], body: String) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(Body::from(body)).unwrap();
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

async fn send(app: &Router, req: Request<Body>) -> (u16, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn admin_basic(boot: &BootstrapReport, secret: &str) -> String {
    let raw = format!("{}:{secret}", boot.client_id);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// `count` operations, `parallel` at a time; operations per second.
async fn rate<F, Fut, T>(count: usize, parallel: usize, op: F) -> (f64, Vec<T>)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send,
    T: Send + 'static,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..parallel {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = lane;
            while i < count {
                out.push(op(i).await);
                i += parallel;
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (count as f64 / started.elapsed().as_secs_f64(), all)
}

async fn run(n: usize, postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let url = if postgres {
        pg::fresh_database()
    } else {
        format!("sqlite://{}", dir.path().join("scale.db").display())
    };
    let a = instance(&dir.path().join("a"), &url).await;
    let boot = bootstrap(&a).await.unwrap();
    let project = boot.default_project_id.clone();
    let started = Instant::now();
    generate(&a, &project, n, if postgres { 4 } else { 1 }).await;
    let generated = started.elapsed();
    a.refresh().await.unwrap();
    // The generator's own changes are history by now, as they would be in a store that grew
    // over months: prune them as the feed's housekeeping does.
    a.store.prune(now_unix() + 3600, 0, 7200).await.unwrap();
    a.refresh().await.unwrap();

    let started = Instant::now();
    let b = instance(&dir.path().join("b"), &url).await;
    let start_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(fhirgate::feed::run(b.clone(), stopped));

    let app = fhirgate::control::router(a.clone());
    let admin = admin_basic(&boot, "scale-admin-secret-0123456789abcdef");
    let uri = format!("/admin/projects/{project}/client");
    let invite_count = if benching() { 2000 } else { 400 };
    let (invites, created) = {
        let (app, admin, uri) = (app.clone(), admin.clone(), uri.clone());
        rate(invite_count, 4, move |i| {
            let (app, admin, uri) = (app.clone(), admin.clone(), uri.clone());
            async move {
                let body = json!({"name": format!("invite {i}")}).to_string();
                let headers = [
                    ("authorization", admin.as_str()),
                    ("content-type", "application/json"),
                ];
                let (status, v) = send(&app, request("POST", &uri, &headers, body)).await;
                assert_eq!(status, 201, "{v}");
                (
                    v["id"].as_str().unwrap().to_string(),
                    v["secret"].as_str().unwrap().to_string(),
                )
            }
        })
        .await
    };
    let (tokens, bearers) = {
        let (app, created) = (app.clone(), Arc::new(created));
        rate(400, 4, move |i| {
            let (app, created) = (app.clone(), created.clone());
            async move {
                let (id, secret) = &created[i];
                let form =
                    format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
                let headers = [("content-type", "application/x-www-form-urlencoded")];
                let (status, v) =
                    send(&app, request("POST", "/oauth2/token", &headers, form)).await;
                assert_eq!(status, 200, "{v}");
                format!("Bearer {}", v["access_token"].as_str().unwrap())
            }
        })
        .await
    };

    // The request path on the second instance, warm: every identity seen once first.
    let snap = b.snapshot();
    for bearer in &bearers {
        let id = b.authenticate(Some(bearer)).await.0.unwrap();
        b.effective_policy(&snap, &id.membership_id, id.scope.as_deref())
            .await
            .unwrap()
            .unwrap();
    }
    let rounds = 250;
    let started = Instant::now();
    for _ in 0..rounds {
        for bearer in &bearers {
            let id = b.authenticate(Some(bearer)).await.0.unwrap();
            let p = b
                .effective_policy(&snap, &id.membership_id, id.scope.as_deref())
                .await
                .unwrap()
                .unwrap();
            std::hint::black_box(p);
        }
    }
    let request_us = started.elapsed().as_secs_f64() * 1e6 / (rounds * bearers.len()) as f64;

    let mut slowest = Duration::ZERO;
    for bearer in bearers.iter().take(10) {
        let id = b.authenticate(Some(bearer)).await.0.unwrap();
        let login = id.login_id.clone().unwrap();
        a.store.revoke_login(&login).await.unwrap();
        a.refresh().await.unwrap();
        let since = Instant::now();
        while b.authenticate(Some(bearer)).await.0.err() != Some(AuthError::LoginRevoked) {
            assert!(since.elapsed() < Duration::from_secs(10), "never revoked");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        slowest = slowest.max(since.elapsed());
    }
    let entries = b.identities.entries();
    stop.send(true).unwrap();
    feed.await.unwrap();
    // The first ten were revoked above.
    let gateway = full_path(&url, &dir.path().join("gw"), &bearers[10..]).await;
    println!(
        "| {} | {:>9} | {:>6.0} s | {:>9.0} | {:>8.0} | {:>8} ms | {:>10.1} | {:>7.0} | {:>8.0} | {:>8.0} | {:>7} | {:>5.0} / {:.0} |",
        if postgres { "PostgreSQL" } else { "SQLite" },
        n,
        generated.as_secs_f64(),
        invites,
        tokens,
        slowest.as_millis(),
        request_us,
        gateway.requests_per_sec,
        gateway.cpu_us_per_request,
        start_ms,
        entries,
        gateway.rss_mib,
        gateway.peak_rss_mib,
    );
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn main() {
    // Under `cargo test`, one small size only: a smoke test that the benchmark still works.
    let default_sizes = if benching() { "10000,100000" } else { "300" };
    let sizes: Vec<usize> = std::env::var("FHIRGATE_SCALE_SIZES")
        .unwrap_or_else(|_| default_sizes.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let postgres = std::env::var("FHIRGATE_SCALE_STORE").is_ok_and(|s| s == "postgres");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| store | N | generate | invites/s | tokens/s | revocation | request µs | gateway req/s | proxy CPU µs/req | start ms | entries | proxy RSS / peak MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        rt.block_on(run(n, postgres));
    }
}
