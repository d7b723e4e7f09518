//! A real fhirgate for end-to-end tests: `server::start` (pingora `Server::run` on a thread,
//! axum control API, metrics) on free loopback ports, with a temp data dir and known bootstrap
//! credentials. Dropping it shuts everything down. The store is SQLite in the data dir, or with
//! `FHIRGATE_TEST_STORE=postgres` a fresh PostgreSQL database of the test cluster (`pg.rs`).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fhirgate::config::{Config, ConfigFile};
use fhirgate::server::{Planes, Running, start};
use serde_json::Value;

pub const ADMIN_CLIENT_ID: &str = "test-admin-client";
pub const ADMIN_CLIENT_SECRET: &str = "test-admin-secret-0123456789abcdef";
/// The key-encryption key of the instances of one scaled-out deployment (each instance has a
/// data dir of its own, so a generated one would differ): 32 bytes, base64.
pub const SHARED_KEK: &str = "ZmhpcmdhdGUtdGVzdHMtc2hhcmVkLWtlay0zMmJ5dGU=";

/// A port nothing listens on, for a listener the test starts next. It is taken below the
/// kernel's ephemeral range (32768 and up on Linux), where no `bind(0)` — a test upstream, the
/// SMTP sink, a client's outgoing connection — can be handed the same port between this check
/// and the listener's own bind, and never twice in one test binary.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another; spread them anyway, by process id.
    let offset = (std::process::id() % 100) * 120;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(20_000 + (offset + n) % 12_000).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range")
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One gateway in front of one upstream for the whole test binary, started on first use (tests
/// that share it give their people and clients names of their own).
pub fn shared() -> &'static TestGateway {
    struct Shared {
        _upstream: super::upstream::FhirUpstream,
        gw: TestGateway,
    }
    static SHARED: OnceLock<Shared> = OnceLock::new();
    &SHARED
        .get_or_init(|| {
            let upstream = super::upstream::FhirUpstream::start();
            let gw = TestGateway::start(&upstream.base_url);
            Shared {
                _upstream: upstream,
                gw,
            }
        })
        .gw
}

/// The configuration every test fhirgate starts from: free loopback ports, `upstream`,
/// `data_dir`, the known admin credentials, loopback as trusted proxy, short upstream timeouts.
fn test_config(upstream: &str, data_dir: &std::path::Path) -> ConfigFile {
    let (gp, cp, mp) = (free_port(), free_port(), free_port());
    ConfigFile {
        listen: Some(format!("127.0.0.1:{gp}")),
        control_listen: Some(format!("127.0.0.1:{cp}")),
        metrics_listen: Some(format!("127.0.0.1:{mp}")),
        base_url: Some(format!("http://127.0.0.1:{gp}/")),
        upstream: Some(upstream.to_string()),
        data_dir: Some(data_dir.to_path_buf()),
        trusted_proxies: vec!["127.0.0.0/8".into()],
        admin_client_id: Some(ADMIN_CLIENT_ID.into()),
        admin_client_secret: Some(ADMIN_CLIENT_SECRET.into()),
        admin_password: Some("admin-password-for-tests".into()),
        threads: Some(2),
        // Suites sign in far more than 160 times a minute from one address; the limiter
        // still runs (and answers RateLimit headers) with this budget.
        auth_rate_limit: Some(1_000_000),
        credential_failure_limit: Some(1_000_000),
        // The test identity providers and JWK Sets listen on loopback.
        outbound_allow: vec!["127.0.0.0/8".into()],
        grace_period_seconds: Some(0),
        log_format: Some("text".into()),
        upstream_connect_timeout_ms: Some(500),
        upstream_read_timeout_ms: Some(5000),
        ..Default::default()
    }
}

pub struct TestGateway {
    /// `http://127.0.0.1:PORT/` (trailing slash).
    pub base: String,
    pub fhir: String,
    pub control: String,
    pub metrics: String,
    pub data_dir: std::path::PathBuf,
    running: Option<Running>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// Starts fhirgate in front of `upstream` (a FHIR base URL) with a fresh data dir.
    pub fn start(upstream: &str) -> TestGateway {
        Self::start_with(upstream, |_| {})
    }

    pub fn start_with(upstream: &str, tweak: impl FnOnce(&mut ConfigFile)) -> TestGateway {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut g = Self::start_in(upstream, &dir, tweak);
        g._tmp = Some(tmp);
        g
    }

    /// Starts on an existing data dir (to test restarts).
    pub fn start_in(
        upstream: &str,
        data_dir: &std::path::Path,
        tweak: impl FnOnce(&mut ConfigFile),
    ) -> TestGateway {
        Self::try_start_in(upstream, data_dir, tweak).expect("fhirgate starts")
    }

    /// [`Self::start_in`], or why fhirgate refused to start.
    pub fn try_start_in(
        upstream: &str,
        data_dir: &std::path::Path,
        tweak: impl FnOnce(&mut ConfigFile),
    ) -> Result<TestGateway, String> {
        let mut file = test_config(upstream, data_dir);
        let test_store = super::pg::store_for(data_dir);
        file.store.clone_from(&test_store);
        tweak(&mut file);
        // A PostgreSQL run must really run on PostgreSQL (unless a test chose its own store).
        let expect_postgres = test_store.is_some() && file.store == test_store;
        let config = Config::from_file(file).expect("valid test config");
        let listen = config.listen;
        let control = config.control_listen;
        let metrics = config.metrics_listen;
        // pingora must not be started from inside a tokio runtime.
        let running = std::thread::spawn(move || start(config, Planes::BOTH))
            .join()
            .expect("start thread")
            .map_err(|e| e.to_string())?;
        if expect_postgres {
            assert_eq!(
                running.state.store.dialect(),
                fhirgate::store::Dialect::Postgres
            );
        }
        wait_listening(listen);
        wait_listening(control);
        wait_listening(metrics);
        Ok(TestGateway {
            base: format!("http://127.0.0.1:{}/", listen.port()),
            fhir: format!("http://127.0.0.1:{}/fhir/R4/", listen.port()),
            control: format!("http://127.0.0.1:{}/", control.port()),
            metrics: format!("http://127.0.0.1:{}/", metrics.port()),
            data_dir: data_dir.to_path_buf(),
            running: Some(running),
            _tmp: None,
        })
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// Stops the server but keeps the data dir.
    pub fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(r) = self.running.take() {
            std::thread::spawn(move || r.shutdown())
                .join()
                .expect("shutdown");
        }
        self._tmp.take()
    }

    pub fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client")
    }

    /// A client-credentials access token.
    pub async fn token(&self, client_id: &str, secret: &str, scope: Option<&str>) -> String {
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        let resp = Self::client()
            .post(format!("{}oauth2/token", self.base))
            .form(&form)
            .send()
            .await
            .expect("token request");
        let status = resp.status();
        let body: Value = resp.json().await.expect("token JSON");
        assert_eq!(status, 200, "token request failed: {body}");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    pub async fn admin_token(&self) -> String {
        self.token(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, None).await
    }

    /// The project of the caller behind `token` (from `/auth/me`).
    pub async fn project_of(&self, token: &str) -> String {
        let me: Value = Self::client()
            .get(format!("{}auth/me", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("auth/me")
            .json()
            .await
            .expect("auth/me JSON");
        me["project"]["id"]
            .as_str()
            .expect("project id")
            .to_string()
    }

    /// Creates a client through the admin API whose membership references
    /// `AccessPolicy/<policy_id>` (or no policy); returns (id, secret).
    pub async fn client_with_policy(
        &self,
        admin: &str,
        policy_id: Option<&str>,
    ) -> (String, String) {
        let project = self.project_of(admin).await;
        let mut body = serde_json::json!({"name": "test client"});
        if let Some(id) = policy_id {
            body["accessPolicy"] = serde_json::json!({"reference": format!("AccessPolicy/{id}")});
        }
        let resp = Self::client()
            .post(format!("{}admin/projects/{project}/client", self.base))
            .bearer_auth(admin)
            .json(&body)
            .send()
            .await
            .expect("create client");
        let status = resp.status();
        let client: Value = resp.json().await.expect("client JSON");
        assert_eq!(status, 201, "{client}");
        (
            client["id"].as_str().expect("id").to_string(),
            client["secret"].as_str().expect("secret").to_string(),
        )
    }
}

impl TestGateway {
    /// One instance of a scaled-out fhirgate: only `planes`, on `store` (shared with the other
    /// instances), with a temp data dir. `tweak` sets what instances share (`base_url`, the
    /// issuer; `control_url` of a proxy) and may pin ports. `base` is the gateway when this
    /// instance runs one, else the control API; `control` is where its control traffic goes.
    pub fn start_planes(
        upstream: &str,
        store: &str,
        planes: Planes,
        tweak: impl FnOnce(&mut ConfigFile),
    ) -> TestGateway {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut file = ConfigFile {
            store: Some(store.to_string()),
            store_max_connections: Some(4),
            key_encryption_key: Some(SHARED_KEK.to_string()),
            threads: Some(1),
            ..test_config(upstream, tmp.path())
        };
        tweak(&mut file);
        let config = Config::from_file(file).expect("valid test config");
        let (listen, control, metrics) =
            (config.listen, config.control_listen, config.metrics_listen);
        let control_url = format!("{}/", config.control_url.url);
        let running = std::thread::spawn(move || start(config, planes))
            .join()
            .expect("start thread")
            .expect("fhirgate starts");
        if planes.gateway {
            wait_listening(listen);
        }
        if planes.control {
            wait_listening(control);
        }
        wait_listening(metrics);
        let control_base = format!("http://127.0.0.1:{}/", control.port());
        let base = if planes.gateway {
            format!("http://127.0.0.1:{}/", listen.port())
        } else {
            control_base.clone()
        };
        TestGateway {
            fhir: format!("{base}fhir/R4/"),
            base,
            control: if planes.control {
                control_base
            } else {
                control_url
            },
            metrics: format!("http://127.0.0.1:{}/", metrics.port()),
            data_dir: tmp.path().to_path_buf(),
            running: Some(running),
            _tmp: Some(tmp),
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = std::thread::spawn(move || r.shutdown()).join();
        }
    }
}
