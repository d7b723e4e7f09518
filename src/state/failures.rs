//! The failed-credential budget of the data plane: Basic-auth secrets and Bearer tokens that do
//! not verify, counted per client address (an IPv6 client by its /64, which one host usually
//! owns whole) and per presented client id. Beyond `credential_failure_limit` a minute, that
//! address or client id gets 429 with `Retry-After` before any credential is checked, so a
//! secret cannot be guessed at line rate on the FHIR paths. Successful requests cost nothing.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

pub struct CredentialFailures {
    limiter: Keyed,
    /// Keys over budget, with the instant they may try again.
    blocked: moka::sync::Cache<String, Instant>,
    /// Some key was ever over budget: until then a request costs one atomic load here.
    any_blocked: AtomicBool,
}

impl std::fmt::Debug for CredentialFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialFailures").finish_non_exhaustive()
    }
}

/// The key of a client address: IPv4 whole, IPv6 by its /64 prefix.
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

fn keys(ip: Option<IpAddr>, client_id: Option<&str>) -> impl Iterator<Item = String> {
    ip.map(address_key)
        .into_iter()
        .chain(client_id.map(|c| format!("client:{}", &c[..c.len().min(128)])))
}

impl CredentialFailures {
    /// `None` when the budget is off (`per_minute == 0`).
    pub fn new(per_minute: u32) -> Option<CredentialFailures> {
        let n = NonZeroU32::new(per_minute)?;
        Some(CredentialFailures {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            blocked: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(120))
                .build(),
            any_blocked: AtomicBool::new(false),
        })
    }

    /// How long the address, or the client id of a Basic `authorization` header, must wait,
    /// when either is over budget. Nothing is decoded until some key was ever over budget.
    pub fn retry_after(&self, ip: Option<IpAddr>, authorization: Option<&str>) -> Option<Duration> {
        if !self.any_blocked.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        let client_id = basic_client_id(authorization);
        keys(ip, client_id.as_deref())
            .filter_map(|k| self.blocked.get(&k))
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max()
    }

    /// Counts one failed credential against the address and, for Basic, the client id.
    pub fn record(&self, ip: Option<IpAddr>, authorization: Option<&str>) {
        let client_id = basic_client_id(authorization);
        for key in keys(ip, client_id.as_deref()) {
            if let Err(not_until) = self.limiter.check_key(&key) {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                self.blocked
                    .insert(key, Instant::now() + wait.max(Duration::from_secs(1)));
                self.any_blocked.store(true, Ordering::Release);
            }
        }
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
    }
}

/// The client id of a Basic `Authorization` header, when there is one (bounded, never the
/// secret).
fn basic_client_id(header: Option<&str>) -> Option<String> {
    use base64::Engine;
    let value = header?.strip_prefix("Basic ")?.trim();
    if value.len() > 4096 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, _) = text.split_once(':')?;
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_neighbours_share_a_budget() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(mapped), "ip:192.0.2.1");
    }

    #[test]
    fn over_budget_keys_wait() {
        let f = CredentialFailures::new(3).expect("on");
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let neighbour: IpAddr = "2001:db8::2".parse().unwrap();
        let c1 = Some("Basic YzE6d3Jvbmc="); // c1:wrong
        let c2 = Some("Basic YzI6d3Jvbmc="); // c2:wrong
        for _ in 0..3 {
            assert!(f.retry_after(Some(ip), c1).is_none());
            f.record(Some(ip), c1);
        }
        f.record(Some(ip), c1);
        assert!(f.retry_after(Some(neighbour), None).is_some(), "same /64");
        assert!(
            f.retry_after(Some("198.51.100.1".parse().unwrap()), c1)
                .is_some(),
            "same client id"
        );
        assert!(
            f.retry_after(Some("198.51.100.1".parse().unwrap()), c2)
                .is_none()
        );
        assert!(CredentialFailures::new(0).is_none());
    }

    #[test]
    fn basic_client_ids() {
        assert_eq!(
            basic_client_id(Some("Basic YWJjOnNlY3JldA==")).as_deref(),
            Some("abc")
        );
        assert_eq!(basic_client_id(Some("Bearer x")), None);
        assert_eq!(basic_client_id(Some("Basic !!")), None);
        assert_eq!(basic_client_id(None), None);
    }
}
