//! Scale-out as an operator runs it: the `fhirgate` binary started as separate OS processes —
//! two `fhirgate proxy` and two `fhirgate control`, configured only by `FHIRGATE_*` variables —
//! sharing one PostgreSQL database, in front of the real FHIR upstream. Nothing is shared between
//! them but the database: no process-wide cache can make a test pass that a deployment would
//! fail. Proxy A sends its control traffic to control 1, proxy B to control 2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::assertion::{assertion, assertion_key, serve_jwks};
use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway, free_port};
use common::http::{rt, send};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

/// A running fhirgate process, killed when dropped. Its log is `<data_dir>/log`.
struct Process {
    child: Child,
    _data: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `fhirgate <plane>` with `vars` (and the settings every instance shares) and waits
/// until its `/readyz` answers 200.
fn start(plane: &str, shared: &[(&str, String)], vars: &[(&str, String)]) -> Process {
    let data = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let log = std::fs::File::create(data.path().join("log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhirgate"));
    cmd.arg(plane)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // Only what this test sets: nothing from the environment the tests run in.
    for (key, _) in std::env::vars() {
        if key.starts_with("FHIRGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("FHIRGATE_DATA_DIR", data.path())
        .env(
            "FHIRGATE_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        )
        .envs(shared.iter().map(|(k, v)| (*k, v.as_str())))
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
    let child = cmd.spawn().expect("start the fhirgate binary");
    let mut process = Process { child, _data: data };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            panic!(
                "fhirgate {plane} exited with {status}: {}",
                log_of(&process)
            );
        }
        let ready = common::upstream::http_request(
            &format!("127.0.0.1:{metrics_port}"),
            "GET",
            "/readyz",
            &[],
            None,
        );
        if ready.map(|r| r.status == 200).unwrap_or(false) {
            return process;
        }
        assert!(
            Instant::now() < deadline,
            "fhirgate {plane} not ready: {}",
            log_of(&process)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_of(p: &Process) -> String {
    std::fs::read_to_string(p._data.path().join("log")).unwrap_or_default()
}

fn data_dir(p: &Process) -> &Path {
    p._data.path()
}

struct Deployment {
    a: String,
    b: String,
    procs: Vec<Process>,
}

/// Control 1 and 2, then proxy A (→ control 1) and proxy B (→ control 2), on `store`.
fn deploy(store: &str, upstream: &str) -> Deployment {
    let (a_port, b_port) = (free_port(), free_port());
    // One public base URL (the load balancer's): the issuer every instance signs and checks.
    let public = format!("http://127.0.0.1:{a_port}/");
    let shared = [
        ("FHIRGATE_STORE", store.to_string()),
        ("FHIRGATE_STORE_MAX_CONNECTIONS", "4".to_string()),
        ("FHIRGATE_BASE_URL", public),
        ("FHIRGATE_UPSTREAM", upstream.to_string()),
        ("FHIRGATE_ADMIN_CLIENT_ID", ADMIN_CLIENT_ID.to_string()),
        (
            "FHIRGATE_ADMIN_CLIENT_SECRET",
            ADMIN_CLIENT_SECRET.to_string(),
        ),
        (
            "FHIRGATE_ADMIN_PASSWORD",
            "admin-password-for-tests".to_string(),
        ),
        ("FHIRGATE_THREADS", "1".to_string()),
        ("FHIRGATE_GRACE_PERIOD_SECONDS", "0".to_string()),
        ("FHIRGATE_AUTH_RATE_LIMIT", "0".to_string()),
        ("FHIRGATE_OUTBOUND_ALLOW", "127.0.0.0/8".to_string()),
        ("FHIRGATE_LOG_FORMAT", "text".to_string()),
        // Instances sharing a store share its key-encryption key.
        (
            "FHIRGATE_KEY_ENCRYPTION_KEY",
            common::gateway::SHARED_KEK.to_string(),
        ),
    ];
    let mut procs = Vec::new();
    let mut controls = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        procs.push(start(
            "control",
            &shared,
            &[("FHIRGATE_CONTROL_LISTEN", format!("127.0.0.1:{port}"))],
        ));
        controls.push(format!("http://127.0.0.1:{port}"));
    }
    for (port, control) in [(a_port, &controls[0]), (b_port, &controls[1])] {
        procs.push(start(
            "proxy",
            &shared,
            &[
                ("FHIRGATE_LISTEN", format!("127.0.0.1:{port}")),
                ("FHIRGATE_CONTROL_URL", control.clone()),
            ],
        ));
    }
    Deployment {
        a: format!("http://127.0.0.1:{a_port}/"),
        b: format!("http://127.0.0.1:{b_port}/"),
        procs,
    }
}

fn client() -> reqwest::Client {
    TestGateway::client()
}

async fn token_request(base: &str, form: &[(&str, &str)]) -> (u16, Value) {
    send(client().post(format!("{base}oauth2/token")).form(form)).await
}

/// A client_credentials token of the admin client, through the gateway at `base`.
async fn admin_token(base: &str) -> String {
    let (status, body) = token_request(
        base,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", ADMIN_CLIENT_ID),
            ("client_secret", ADMIN_CLIENT_SECRET),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

async fn get_status(url: &str, token: &str) -> u16 {
    client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn separate_processes_share_tokens_revocation_and_one_time_assertions() {
    let upstream = FhirUpstream::start();
    let store = common::pg::fresh_database();
    let d = deploy(&store, &upstream.base_url);
    rt().block_on(async {
        // A token issued through A (control 1) works on B.
        let admin = admin_token(&d.a).await;
        let on_b = format!("{}fhir/R4/Patient?_count=1", d.b);
        assert_eq!(get_status(&on_b, &admin).await, 200);

        // Revoking its Login through A is enforced by B within 1 s.
        let since = Instant::now();
        let r = client()
            .post(format!("{}oauth2/logout", d.a))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let took = loop {
            if get_status(&on_b, &admin).await == 401 {
                break since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "B still accepts a revoked token"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        println!("propagation (logout, separate processes): {took:?}");
        assert!(took <= Duration::from_secs(1), "took {took:?}");

        // A private_key_jwt assertion accepted by control 1 is refused by control 2.
        let admin = admin_token(&d.a).await;
        let key = assertion_key();
        let jwks_uri = serve_jwks(key.jwks.clone()).await;
        let (_, me) = send(client().get(format!("{}auth/me", d.a)).bearer_auth(&admin)).await;
        let project = me["project"]["id"].as_str().unwrap().to_string();
        let (status, created) = send(
            client()
                .post(format!("{}admin/projects/{project}/client", d.a))
                .bearer_auth(&admin)
                .json(&json!({"name": "signed-assertions"})),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        let app_url = format!("{}fhir/R4/ClientApplication/{id}", d.a);
        let (_, mut app) = send(client().get(&app_url).bearer_auth(&admin)).await;
        app["jwksUri"] = json!(jwks_uri);
        let (status, put) = send(
            client()
                .put(&app_url)
                .bearer_auth(&admin)
                .header("content-type", "application/fhir+json")
                .json(&app),
        )
        .await;
        assert_eq!(status, 200, "{put}");
        let now = fhirgate::store::now_unix();
        let signed = assertion(
            &key,
            &json!({"iss": id, "sub": id, "aud": format!("{}oauth2/token", d.a),
                    "iat": now, "exp": now + 300, "jti": uuid::Uuid::new_v4().to_string()}),
        );
        let form = [
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", signed.as_str()),
        ];
        let first = token_request(&d.a, &form).await;
        assert_eq!(first.0, 200, "{}", first.1);
        // Control 2 learns the client's new `jwksUri` within the 1 s budget; only then is its
        // answer about the replay and not about a client it has not caught up with.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (status, body) = token_request(&d.b, &form).await;
        assert_eq!(
            (status, body),
            (
                401,
                json!({"error": "invalid_client", "error_description": "Invalid client assertion"})
            ),
            "the replay reached another control process"
        );
    });
    // Proxy B, which served the FHIR requests, wrote their audit records (its log writer
    // batches, so give it a moment); no process wrote the admin secret it was configured with,
    // or a token.
    let deadline = Instant::now() + Duration::from_secs(3);
    let b = &d.procs[3];
    while log_of(b).matches("fhirgate::audit").count() < 2 {
        assert!(Instant::now() < deadline, "no audit records: {}", log_of(b));
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &d.procs {
        let log = log_of(p);
        assert!(
            !log.contains(ADMIN_CLIENT_SECRET),
            "secret in {:?}",
            data_dir(p)
        );
        assert!(!log.contains("eyJ"), "a token in {:?}", data_dir(p));
    }
}
