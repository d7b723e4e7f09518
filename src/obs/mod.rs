//! Observability: Prometheus metrics, JSON logs and the audit record. Labels come only from
//! enum `as_str()` values, never from ids, paths or headers; nothing here ever sees a secret.

pub mod audit_log;
pub mod security;
pub mod trail;

use std::sync::{LazyLock, OnceLock};

use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub gateway_seconds: HistogramVec,
    pub upstream_seconds: HistogramVec,
    pub token_cache: IntCounterVec,
    pub tokens_issued: IntCounterVec,
    pub security_events: IntCounterVec,
    pub audit_events: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    Metrics {
        requests: counter(
            &registry,
            "fhirgate_requests_total",
            "Requests by route class and decision",
            &["route", "decision"],
        ),
        gateway_seconds: histogram(
            &registry,
            "fhirgate_gateway_added_seconds",
            "Time spent in the gateway itself, excluding upstream time",
            &["route"],
        ),
        upstream_seconds: histogram(
            &registry,
            "fhirgate_upstream_seconds",
            "Time waiting for the upstream",
            &["route"],
        ),
        token_cache: counter(
            &registry,
            "fhirgate_token_cache_total",
            "Verified-token cache lookups",
            &["result"],
        ),
        tokens_issued: counter(
            &registry,
            "fhirgate_tokens_issued_total",
            "Access tokens issued by grant type",
            &["grant"],
        ),
        security_events: counter(
            &registry,
            "fhirgate_security_events_total",
            "Security events of the control plane by event and outcome",
            &["event", "outcome"],
        ),
        audit_events: counter(
            &registry,
            "fhirgate_audit_events_total",
            "AuditEvents of the security trail written upstream, or dropped",
            &["outcome"],
        ),
        registry,
    }
});

/// The children of a labelled metric for a fixed list of label values, each looked up on first
/// use and then kept. On the request path this replaces `with_label_values`, which hashes the
/// labels and takes the vector's lock on every call, by one `OnceLock` read. A series still
/// appears in the exposition only once it is first used.
pub struct Children<M, const N: usize> {
    labels: [&'static str; N],
    slots: [OnceLock<M>; N],
}

impl<M: Clone, const N: usize> Children<M, N> {
    pub const fn new(labels: [&'static str; N]) -> Self {
        Children {
            labels,
            slots: [const { OnceLock::new() }; N],
        }
    }

    /// The child of `vec` for `self.labels[i]` (a one-label metric).
    pub fn get<T: MetricVecBuilder<M = M>>(&self, vec: &MetricVec<T>, i: usize) -> &M {
        self.slots[i].get_or_init(|| vec.with_label_values(&[self.labels[i]]))
    }
}

/// Counts a request in `fhirgate_requests_total`. The series of the commonest outcomes are
/// resolved once; any other through `with_label_values`.
pub fn count_request(route: &'static str, decision: &'static str) {
    const COMMON: [(&str, &str); 4] = [
        ("fhir", "allow"),
        ("metadata", "public"),
        ("control", "pass"),
        ("fhir", "allow_bundle"),
    ];
    static SERIES: [OnceLock<IntCounter>; 4] = [const { OnceLock::new() }; 4];
    match COMMON.iter().position(|c| *c == (route, decision)) {
        Some(i) => SERIES[i]
            .get_or_init(|| METRICS.requests.with_label_values(&[route, decision]))
            .inc(),
        None => METRICS.requests.with_label_values(&[route, decision]).inc(),
    }
}

/// Counts one verified-token cache lookup (`hit` or not).
pub fn count_token_cache(hit: bool) {
    static RESULTS: Children<IntCounter, 2> = Children::new(["hit", "miss"]);
    RESULTS
        .get(&METRICS.token_cache, if hit { 0 } else { 1 })
        .inc();
}

/// The Prometheus text exposition of every fhirgate metric.
pub fn encode() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One request being served by this process (gateway or control API), from its start until
/// the guard is dropped.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many requests this process is serving.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global tracing subscriber (JSON or text). Safe to call more than once.
/// Sets up logging to stdout. Lines are handed to a writer thread that writes them in batches
/// (a buffer flushed whenever no more lines are waiting), so the request path does no write
/// syscall; when the queue is full, callers wait rather than drop audit records. Keep the
/// returned guard alive while the process runs: dropping it writes out what is queued.
pub fn init_logging(format: crate::config::LogFormat) -> LogGuards {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let terminal = std::io::stdout().is_terminal();
    let json = format.json(terminal);
    let filter = EnvFilter::try_from_env("FHIRGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("fhirgate-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    // JSON audit records have a writer of their own (`audit_log`); text ones go through tracing.
    let audit = if json {
        audit_log::start(std::io::stdout())
    } else {
        None
    };
    let _ = if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .with_writer(writer)
            .try_init()
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(terminal)
            .with_writer(writer)
            .try_init()
    };
    LogGuards {
        _audit: audit,
        _tracing: guard,
    }
}

/// Keep alive while the process runs: dropping it writes out the queued log lines and audit
/// records.
pub struct LogGuards {
    _audit: Option<audit_log::Guard>,
    _tracing: tracing_appender::non_blocking::WorkerGuard,
}

/// fhirgate's own lines from `info`; pingora's internals (startup chatter with source paths)
/// only from `warn`. `FHIRGATE_LOG` replaces it.
pub const DEFAULT_LOG_FILTER: &str = "info,pingora=warn,pingora_core=warn,pingora_proxy=warn,pingora_pool=warn,pingora_runtime=warn,pingora_http=warn,pingora_error=warn,pingora_timeout=warn";

/// A request's id in the audit record: unique per process run, a random prefix chosen once and
/// then a counter (a UUID per request cost a `getrandom` syscall on the hot path). Spelled out
/// only when a record is written.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(u64);

impl RequestId {
    pub fn next() -> RequestId {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        RequestId(COUNTER.fetch_add(1, Ordering::Relaxed))
    }

    /// Appends the id: this process's random prefix, then the counter in at least 12 hex
    /// digits (written by hand: the formatter's padding was a tenth of an audit record's cost).
    pub fn push_to(&self, out: &mut String) {
        static PREFIX: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| crate::tokens::random_hex(8));
        out.push_str(&PREFIX);
        let digits = (16 - self.0.leading_zeros() as usize / 4).max(12);
        for place in (0..digits).rev() {
            let nibble = (self.0 >> (place * 4)) & 0xf;
            out.push(char::from_digit(nibble as u32, 16).unwrap_or('0'));
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = String::with_capacity(32);
        self.push_to(&mut text);
        f.write_str(&text)
    }
}

/// Whether audit records are written: the log filter lets `fhirgate::audit` through. Asked
/// before a record is built.
pub fn audit_enabled() -> bool {
    tracing::enabled!(target: "fhirgate::audit", tracing::Level::INFO)
}

/// Writes one audit record (a decision), built from typed fields only, so no header, token or
/// secret can reach it: handed to the audit writer (JSON logs), or else through tracing.
pub fn audit(record: audit_log::Record) {
    let Some(r) = audit_log::submit(record) else {
        return;
    };
    tracing::info!(
        target: "fhirgate::audit",
        request_id = %r.request_id,
        route = r.route,
        method = r.method.as_str(),
        resource_type = r.resource_type.as_deref(),
        profile = r.identity.as_ref().map(|i| i.profile.as_str()),
        on_behalf_of = r.on_behalf_of.as_deref(),
        client_ip = r.client_ip.map(|i| i.to_string()),
        decision = r.decision,
        status = r.status,
        "decision"
    );
}
