//! A plain pingora pass-through proxy: the "pingora plain pass-through" baseline of docs/contract.md §5
//! (full path ≥ 0.9× its throughput), with the same pingora version, features, profile and
//! allocator as fhirgate, and nothing of fhirgate's own (no routing, auth, policy, metrics,
//! logging or body rewriting). `benches/load.sh` builds and starts it; it is not a Criterion
//! benchmark.
//!
//! Under `cargo bench` (no `PINGORA_BASELINE_LISTEN` in the environment) it prints a line and
//! exits. Started by load.sh:
//!   PINGORA_BASELINE_LISTEN=127.0.0.1:18185 PINGORA_BASELINE_UPSTREAM=127.0.0.1:18180 \
//!   PINGORA_BASELINE_THREADS=2 target/release/deps/pingora_baseline-…
//! It forwards every request unchanged (upstream connections kept alive by pingora's pool).
//!
//! Knobs, to measure pingora's own configuration on this workload (each off by default, so the
//! baseline stays plain):
//! - `PINGORA_BASELINE_TIMEOUTS=1`: the upstream connect, read, write and idle timeouts fhirgate
//!   sets on its peers (a read that waits registers one of pingora's timers);
//! - `PINGORA_BASELINE_WORK_STEALING=0`: one runtime per thread instead of a work-stealing one;
//! - `PINGORA_BASELINE_POOL=<n>`: `upstream_keepalive_pool_size`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::configuration::ServerConf;
use std::time::Duration;

struct PassThrough {
    upstream: String,
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = Box::new(HttpPeer::new(self.upstream.as_str(), false, String::new()));
        if self.timeouts {
            let (connect, read) = (Duration::from_secs(1), Duration::from_secs(30));
            peer.options.connection_timeout = Some(connect);
            peer.options.total_connection_timeout = Some(connect);
            peer.options.read_timeout = Some(read);
            peer.options.write_timeout = Some(read);
            peer.options.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(peer)
    }
}

fn main() {
    let Ok(listen) = std::env::var("PINGORA_BASELINE_LISTEN") else {
        println!(
            "pingora_baseline: not a Criterion benchmark; benches/load.sh runs it (set PINGORA_BASELINE_LISTEN)"
        );
        return;
    };
    let upstream =
        std::env::var("PINGORA_BASELINE_UPSTREAM").expect("PINGORA_BASELINE_UPSTREAM=host:port");
    let threads = std::env::var("PINGORA_BASELINE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let knob = |name: &str| std::env::var(name).ok();
    let defaults = ServerConf::default();
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        work_stealing: knob("PINGORA_BASELINE_WORK_STEALING").as_deref() != Some("0"),
        upstream_keepalive_pool_size: knob("PINGORA_BASELINE_POOL")
            .and_then(|n| n.parse().ok())
            .unwrap_or(defaults.upstream_keepalive_pool_size),
        ..defaults
    };
    let timeouts = knob("PINGORA_BASELINE_TIMEOUTS").as_deref() == Some("1");
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, PassThrough { upstream, timeouts });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
