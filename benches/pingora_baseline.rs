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

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::configuration::ServerConf;

struct PassThrough {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
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
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, PassThrough { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
