//! THE assembly point: opens the store, bootstraps, builds the shared `State`, and runs the
//! pingora `Server` with the gateway, the control API (axum as a background service), the
//! metrics/health listener and the change feed. `start` returns a handle whose `shutdown` stops
//! everything; tests and `fhirgate serve` use the same path (`Server::run`, never
//! `run_forever`).

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};

use crate::config::Config;
use crate::control::bootstrap::{BootstrapReport, bootstrap};
use crate::gateway::Gateway;
use crate::state::State;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("policies_dir: {0}")]
    Policies(#[from] crate::policies_dir::PoliciesDirError),
    #[error("cannot start: {0}")]
    Runtime(String),
    #[error("secrets at rest: {0}")]
    Secrets(String),
    #[error("{0}")]
    Listen(String),
}

/// Which planes this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planes {
    pub gateway: bool,
    pub control: bool,
}

impl Planes {
    pub const BOTH: Planes = Planes {
        gateway: true,
        control: true,
    };
}

struct ChannelShutdown(tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<ShutdownSignal>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.0.lock().await.take();
        match rx {
            Some(rx) => rx.await.unwrap_or(ShutdownSignal::FastShutdown),
            None => std::future::pending().await,
        }
    }
}

/// A running fhirgate.
pub struct Running {
    pub state: Arc<State>,
    pub bootstrap: BootstrapReport,
    tx: Option<tokio::sync::oneshot::Sender<ShutdownSignal>>,
    join: Option<std::thread::JoinHandle<()>>,
    /// Runtime that owns the store's connections and the startup work; lives as long as we do.
    runtime: Option<tokio::runtime::Runtime>,
    /// How long a stop waits for requests in flight.
    grace: std::time::Duration,
}

impl Running {
    /// Stops all listeners and waits for the server thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Drain: the requests in flight finish (up to the grace period), then everything
        // stops at once; an idle instance stops immediately.
        let until = std::time::Instant::now() + self.grace;
        while self.tx.is_some() && crate::obs::in_flight() > 0 && std::time::Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(ShutdownSignal::GracefulTerminate);
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Blocks on the startup runtime (used by the CLI to wait for signals).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        self.runtime.as_ref().map(|rt| rt.block_on(f))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An axum app on a listener bound by `start` before anything else happened.
struct AxumService {
    name: &'static str,
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    router: axum::Router,
}

/// Binds `addr` for `what`, or says in one line why not.
fn bind(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener, StartError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "the address is in use by another program".to_string(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges)".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => "no such address on this machine".to_string(),
            _ => e.to_string(),
        };
        StartError::Listen(format!("cannot listen on {addr} ({what}): {why}"))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Listen(format!("{addr} ({what}): {e}")))?;
    Ok(listener)
}

/// Counts control API requests as in flight (see `obs::InFlight`).
async fn count_in_flight(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let _guard = crate::obs::InFlight::start();
    next.run(req).await
}

#[async_trait]
impl BackgroundService for AxumService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(std_listener) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = self.name, error = %e, "cannot listen");
                return;
            }
        };
        let app = self
            .router
            .clone()
            .into_make_service_with_connect_info::<SocketAddr>();
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(service = self.name, error = %e, "listener failed");
        }
    }
}

/// See `feed`.
struct ChangeFeed(Arc<State>);

#[async_trait]
impl BackgroundService for ChangeFeed {
    async fn start(&self, shutdown: ShutdownWatch) {
        crate::feed::run(self.0.clone(), shutdown).await;
    }
}

/// Keeps `control_url`'s addresses current (see `feed::resolve_control`).
struct ControlResolver(Arc<State>);

#[async_trait]
impl BackgroundService for ControlResolver {
    async fn start(&self, shutdown: ShutdownWatch) {
        crate::feed::resolve_control(self.0.clone(), shutdown).await;
    }
}

/// Writes the security trail upstream as AuditEvents (`obs::trail`).
type TrailStart = (crate::obs::trail::Subscription, reqwest::Client);
struct TrailWriter(std::sync::Mutex<Option<TrailStart>>, Arc<State>);

#[async_trait]
impl BackgroundService for TrailWriter {
    async fn start(&self, shutdown: ShutdownWatch) {
        use crate::obs::trail::{Destination, Resolver, run_writer};
        let Some((sub, client)) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let state = self.1.clone();
        // An event without a project (a sign-in attempt for an unknown address, a refused
        // client) belongs to no project's admins: it stays in the log only.
        let resolve: Resolver = Arc::new(move |project: Option<&str>| {
            let snap = state.snapshot();
            let p = snap.projects.get(project?)?;
            let binding = state.upstreams.get(&p.upstream)?.clone();
            let isolation = p.isolation.clone();
            Some(Destination {
                base_url: binding.upstream.base_url.clone(),
                authorization: binding.upstream.authorization.clone(),
                isolation,
            })
        });
        run_writer(sub, resolve, client, shutdown).await;
    }
}

/// `/readyz` answers within this, database or not (probes time out after a few seconds).
const READY_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `policies_dir` applied (see `policies_dir`).
struct PolicyReload(Arc<crate::policies_dir::PolicyWatcher>, Arc<State>);

#[async_trait]
impl BackgroundService for PolicyReload {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.clone().run(self.1.clone(), shutdown).await;
    }
}

/// Whether the gateway's socket accepts connections yet. pingora binds it when its service
/// starts, which may come after the metrics service (`start` waits for it in
/// `wait_for_gateway`, but `/readyz` answers meanwhile): until then `/readyz` must not say
/// ready, or a load balancer sends traffic to a port nobody listens on. Checked by connecting
/// to it (over loopback when it listens on every address) until that works once.
struct GatewayListening {
    addr: Option<std::net::SocketAddr>,
    seen: std::sync::atomic::AtomicBool,
}

impl GatewayListening {
    fn new(listen: Option<std::net::SocketAddr>) -> GatewayListening {
        GatewayListening {
            addr: listen.map(crate::net::local_address),
            seen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    async fn check(&self) -> bool {
        use std::sync::atomic::Ordering;
        let Some(addr) = self.addr else {
            return true;
        };
        if self.seen.load(Ordering::Relaxed) {
            return true;
        }
        let connected = matches!(
            tokio::time::timeout(READY_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        if connected {
            self.seen.store(true, Ordering::Relaxed);
        }
        connected
    }
}

fn health_router(state: Arc<State>, gateway: Option<std::net::SocketAddr>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready_state = state.clone();
    let gateway = Arc::new(GatewayListening::new(gateway));
    axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    crate::obs::encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let state = ready_state.clone();
                let gateway = gateway.clone();
                async move {
                    // Red as soon as the change feed has lost the store, and until a fresh
                    // round trip succeeds; never waits longer than a probe allows.
                    let store_ok = state.store_up()
                        && matches!(
                            tokio::time::timeout(READY_PROBE_TIMEOUT, state.store.ping()).await,
                            Ok(Ok(()))
                        );
                    let keys_ok = !state.keyring().is_empty();
                    if store_ok && keys_ok && gateway.check().await {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
}

/// Opens the store, bootstraps, and starts the planes on a background thread.
pub fn start(config: Config, planes: Planes) -> Result<Running, StartError> {
    // Every address first: a start that cannot listen says so in one line before anything is
    // printed or written (no store, no data dir, no key file). The gateway's own socket is
    // bound by pingora; it is tried here and then released.
    let control_listener = if planes.control {
        Some(bind(config.control_listen, "control API")?)
    } else {
        None
    };
    let metrics_listener = bind(config.metrics_listen, "metrics")?;
    if planes.gateway {
        drop(bind(config.listen, "gateway")?);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fhirgate-store")
        .enable_all()
        .build()
        .map_err(|e| StartError::Runtime(e.to_string()))?;
    let (state, report, watcher) = runtime.block_on(async {
        let store = Store::open_with(&config.store_url, config.store_max_connections).await?;
        // Secrets at rest: the key-encryption key lives outside the store (environment or
        // a 0600 file); an instance holding another one than the store's refuses to start.
        let kek = crate::sealed::KeyEncryptionKey::load(&config.key_encryption_key)
            .map_err(|e| StartError::Secrets(e.to_string()))?;
        let hash_key = crate::state::keys::open_store_secrets(&store, &kek)
            .await
            .map_err(|e| StartError::Secrets(e.to_string()))?;
        let state = State::new(config.clone(), store, Arc::new(kek), hash_key).await?;
        let report = bootstrap(&state)
            .await
            .map_err(|e| StartError::Bootstrap(e.to_string()))?;
        // Policies as files: all valid or no start (fail closed), then watched.
        let watcher = match &config.policies_dir {
            Some(dir) => Some(
                crate::policies_dir::load_at_start(&state, dir, &report.default_project_id)
                    .await?,
            ),
            None => None,
        };
        // `bootstrap` has just refreshed: read again only what the policy files wrote.
        state.refresh_if_changed().await?;
        if planes.gateway {
            // Not fatal: the control instance or the upstream may start later; the resolver
            // keeps trying, and requests get 502 until then.
            let upstreams = state.upstreams.targets();
            let targets =
                std::iter::once(&state.control).chain(upstreams.iter().map(|t| t.as_ref()));
            for target in targets {
                if let Err(e) = target.resolve().await {
                    tracing::warn!(url = %target.url().url, error = %e, "cannot resolve a host name yet");
                }
            }
        }
        Ok::<_, StartError>((state, report, watcher))
    })?;

    if planes.gateway {
        // A word at start, not a refusal: the upstream may come up later.
        let upstreams: Vec<(String, crate::config::Upstream)> = std::iter::once((
            crate::config::DEFAULT_UPSTREAM.to_string(),
            config.upstream.clone(),
        ))
        .chain(config.named_upstreams.clone())
        .collect();
        runtime.spawn(check_upstreams(upstreams));
    }
    let conf = ServerConf {
        threads: config.threads,
        // `Running::stop` drains itself: it waits for the requests in flight (at most
        // `grace_period_seconds`), so pingora need not sleep the whole period.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    if planes.gateway {
        let gateway = Gateway::try_new(state.clone())
            .map_err(|e| StartError::Runtime(format!("the gateway's HTTP client: {e}")))?;
        let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, gateway);
        proxy.add_tcp(&config.listen.to_string());
        server.add_service(proxy);
    }
    if planes.control {
        let mut svc = background_service(
            "control api",
            AxumService {
                name: "control",
                listener: std::sync::Mutex::new(control_listener),
                router: crate::control::try_router(state.clone())
                    .map_err(|e| {
                        StartError::Runtime(format!("the control API's HTTP clients: {e}"))
                    })?
                    .layer(axum::middleware::from_fn(count_in_flight)),
            },
        );
        svc.threads = Some(config.threads.max(1));
        server.add_service(svc);
    }
    server.add_service(background_service(
        "metrics",
        AxumService {
            name: "metrics",
            listener: std::sync::Mutex::new(Some(metrics_listener)),
            router: health_router(state.clone(), planes.gateway.then_some(config.listen)),
        },
    ));
    server.add_service(background_service("change feed", ChangeFeed(state.clone())));
    if config.audit_events {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| {
                StartError::Runtime(format!("the AuditEvent writer's HTTP client: {e}"))
            })?;
        server.add_service(background_service(
            "audit trail",
            TrailWriter(
                std::sync::Mutex::new(Some((crate::obs::trail::subscribe(), client))),
                state.clone(),
            ),
        ));
    }
    if planes.gateway
        && (state.control.needs_resolution()
            || state
                .upstreams
                .targets()
                .iter()
                .any(|t| t.needs_resolution()))
    {
        server.add_service(background_service(
            "control resolver",
            ControlResolver(state.clone()),
        ));
    }
    if let Some(w) = watcher {
        server.add_service(background_service(
            "policies dir",
            PolicyReload(Arc::new(w), state.clone()),
        ));
    }

    let (tx, rx) = tokio::sync::oneshot::channel();
    let join = std::thread::Builder::new()
        .name("fhirgate-server".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(ChannelShutdown(tokio::sync::Mutex::new(Some(rx)))),
            });
        })
        .map_err(|e| StartError::Runtime(e.to_string()))?;
    let mut running = Running {
        state,
        bootstrap: report,
        tx: Some(tx),
        join: Some(join),
        runtime: Some(runtime),
        grace: std::time::Duration::from_secs(config.grace_period_seconds),
    };
    if planes.gateway {
        wait_for_gateway(&mut running, config.listen)?;
    }
    Ok(running)
}

/// Waits until the gateway accepts connections, so that whoever prints "running" next says the
/// truth; fails when pingora gave up listening.
fn wait_for_gateway(running: &mut Running, listen: SocketAddr) -> Result<(), StartError> {
    let probe = crate::net::local_address(listen);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        if std::net::TcpStream::connect_timeout(&probe, std::time::Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        let server_gone = running.join.as_ref().is_none_or(|j| j.is_finished());
        if server_gone || std::time::Instant::now() > deadline {
            running.stop();
            return Err(StartError::Listen(format!(
                "cannot listen on {listen} (gateway): the server did not start listening"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Warns about every upstream whose `metadata` does not answer at start.
async fn check_upstreams(upstreams: Vec<(String, crate::config::Upstream)>) {
    let Ok(client) = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(5))
        .build()
    else {
        return;
    };
    for (name, up) in upstreams {
        let mut req = client
            .get(format!("{}/metadata", up.base_url))
            .header("accept", "application/fhir+json");
        if let Some(auth) = &up.authorization {
            req = req.header("authorization", auth.as_str());
        }
        let problem = match req.send().await {
            Ok(r) if r.status().is_success() => continue,
            Ok(r) => format!("its metadata answered {}", r.status().as_u16()),
            Err(e) if e.is_connect() => "nothing answers there".to_string(),
            Err(e) if e.is_timeout() => "it did not answer within 5 s".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            upstream = %name,
            url = %up.base_url,
            "the upstream FHIR server is not reachable yet ({problem}); FHIR requests get 502 until it is"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/readyz` stays red until the gateway's socket accepts connections, which it reaches
    /// over loopback when the gateway listens on every address.
    #[tokio::test]
    async fn readiness_waits_for_the_gateway_socket() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let every_address = std::net::SocketAddr::from(([0, 0, 0, 0], free.port()));
        let gateway = GatewayListening::new(Some(every_address));
        assert!(!gateway.check().await, "nothing listens yet");
        let listener = tokio::net::TcpListener::bind(free).await.unwrap();
        assert!(gateway.check().await);
        drop(listener);
        assert!(
            gateway.check().await,
            "once seen listening, not probed again"
        );
    }

    #[tokio::test]
    async fn without_a_gateway_plane_readiness_waits_for_no_socket() {
        assert!(GatewayListening::new(None).check().await);
    }
}
