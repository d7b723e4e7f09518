//! Per-address rate limit on the sign-in surface (docs/medplum-compat.md §0.2): `/auth/*` and
//! `/oauth2/*` (also under `/api/`, which Medplum forgets), except `/auth/me`, which apps poll.
//! Password guessing and code or token brute force all go through these paths, so they get a
//! budget per client address and minute (`auth_rate_limit`, default 160 as in Medplum).
//!
//! Every answer on a limited path carries `RateLimit: "requests";r=<remaining>;t=<seconds>`;
//! beyond the budget the answer is 429 with `Retry-After`, and the request never reaches its
//! handler, so nothing it would have changed changes.

use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use serde_json::json;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::control::web::client_addr::client_ip;
use crate::state::State;

pub(crate) type Keyed =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// How many checks between sweeps of addresses whose budget is full again.
const SWEEP_EVERY: u64 = 4096;

pub struct AuthRateLimit {
    limiter: Keyed,
    per_minute: u32,
    checks: AtomicU64,
}

impl std::fmt::Debug for AuthRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRateLimit")
            .field("per_minute", &self.per_minute)
            .finish_non_exhaustive()
    }
}

/// Whether `path` is on the limited surface.
fn limited(path: &str) -> bool {
    let path = path.strip_prefix("/api").unwrap_or(path);
    (path.starts_with("/auth/") || path.starts_with("/oauth2/"))
        && path != "/auth/me"
        && path != "/auth/me/"
}

enum Verdict {
    Allowed { remaining: u32, reset_secs: u64 },
    Refused { retry_secs: u64 },
}

impl AuthRateLimit {
    /// `None` when limiting is off (`per_minute == 0`).
    pub fn new(per_minute: u32) -> Option<Arc<AuthRateLimit>> {
        let n = NonZeroU32::new(per_minute)?;
        Some(Arc::new(AuthRateLimit {
            limiter: RateLimiter::keyed(Quota::per_minute(n))
                .with_middleware::<StateInformationMiddleware>(),
            per_minute,
            checks: AtomicU64::new(0),
        }))
    }

    fn check(&self, addr: IpAddr) -> Verdict {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        match self.limiter.check_key(&budget_key(addr)) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // One unit comes back every 60/per_minute seconds.
                let used = u64::from(self.per_minute.saturating_sub(remaining));
                let reset_secs = (used * 60).div_ceil(u64::from(self.per_minute));
                Verdict::Allowed {
                    remaining,
                    reset_secs,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Verdict::Refused {
                    retry_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                }
            }
        }
    }
}

/// The key an address is counted under: an IPv4 address whole, an IPv6 address by its /64
/// (one host usually owns the whole prefix, so per-address budgets would be endless).
fn budget_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

fn rate_limit_header(remaining: u32, reset_secs: u64) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("\"requests\";r={remaining};t={reset_secs}")).ok()
}

/// The middleware's state.
#[derive(Clone)]
pub struct Limiting {
    pub state: Arc<State>,
    pub limit: Arc<AuthRateLimit>,
}

/// axum middleware: counts the request against its client address when the path is limited.
pub async fn enforce(
    AxumState(Limiting { state, limit }): AxumState<Limiting>,
    req: Request,
    next: Next,
) -> Response {
    if !limited(req.uri().path()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    // An unparsable X-Forwarded-For is answered by the handler (400); it must not buy a fresh
    // budget, so such requests are counted against the TCP peer.
    let addr = match client_ip(&state, &parts) {
        Ok(Some(ip)) => Some(ip),
        _ => parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip()),
    };
    let Some(addr) = addr else {
        // In-process callers without a TCP peer (tests driving the router directly).
        return next.run(Request::from_parts(parts, body)).await;
    };
    match limit.check(addr) {
        Verdict::Allowed {
            remaining,
            reset_secs,
        } => {
            let mut resp = next.run(Request::from_parts(parts, body)).await;
            if let Some(v) = rate_limit_header(remaining, reset_secs) {
                resp.headers_mut().insert("ratelimit", v);
            }
            resp
        }
        Verdict::Refused { retry_secs } => {
            // Not the path: some carry a one-time secret (set-password links).
            tracing::warn!(client = %addr, "auth rate limit exceeded");
            let outcome = json!({
                "resourceType": "OperationOutcome",
                "issue": [{
                    "severity": "error",
                    "code": "throttled",
                    "details": {"text": "Too Many Requests"},
                    "diagnostics": json!({
                        "limit": limit.per_minute,
                        "remaining": 0,
                        "retryAfterSeconds": retry_secs,
                    }).to_string(),
                }],
            });
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/fhir+json")],
                outcome.to_string(),
            )
                .into_response();
            if let Some(v) = rate_limit_header(0, retry_secs) {
                resp.headers_mut().insert("ratelimit", v);
            }
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_paths() {
        for p in [
            "/auth/login",
            "/oauth2/token",
            "/api/auth/login",
            "/api/oauth2/authorize",
            "/auth/mfa/verify",
        ] {
            assert!(limited(p), "{p}");
        }
        for p in [
            "/auth/me",
            "/api/auth/me",
            "/fhir/R4/Patient",
            "/admin/projects/x",
            "/authx",
            "/.well-known/jwks.json",
        ] {
            assert!(!limited(p), "{p}");
        }
    }

    #[test]
    fn budget_runs_out_per_address_and_reports_what_is_left() {
        let limit = AuthRateLimit::new(3).expect("limit on");
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "2001:db8::1".parse().expect("ip");
        let mut remaining = Vec::new();
        for _ in 0..3 {
            match limit.check(a) {
                Verdict::Allowed { remaining: r, .. } => remaining.push(r),
                Verdict::Refused { .. } => panic!("refused within the budget"),
            }
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        match limit.check(a) {
            Verdict::Refused { retry_secs } => assert!((1..=20).contains(&retry_secs)),
            Verdict::Allowed { .. } => panic!("allowed beyond the budget"),
        }
        // Another address has its own budget.
        assert!(matches!(
            limit.check(b),
            Verdict::Allowed { remaining: 2, .. }
        ));
    }

    #[test]
    fn an_ipv6_prefix_shares_one_budget() {
        // Issue 10: every address of a /64 had a fresh budget of its own.
        let limit = AuthRateLimit::new(2).expect("limit on");
        for host in ["2001:db8:5:5::1", "2001:db8:5:5::2"] {
            assert!(matches!(
                limit.check(host.parse().expect("ip")),
                Verdict::Allowed { .. }
            ));
        }
        assert!(matches!(
            limit.check("2001:db8:5:5:ffff::3".parse().expect("ip")),
            Verdict::Refused { .. }
        ));
        assert!(matches!(
            limit.check("2001:db8:5:6::1".parse().expect("ip")),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn zero_turns_limiting_off() {
        assert!(AuthRateLimit::new(0).is_none());
    }
}
