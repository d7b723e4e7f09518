//! Where the gateway forwards control traffic: `control_url`'s host resolved to addresses. A
//! host name (a compose service, a Kubernetes Service) is looked up again every few seconds by
//! the change feed's companion task, so a control instance that moves is followed without a
//! restart; the request path only reads the last good answer. Of several addresses, those that
//! accept connections are used in turn.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::config::ControlUrl;

pub struct ControlTarget {
    url: ControlUrl,
    addrs: ArcSwap<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlTarget")
            .field("url", &self.url.url)
            .field("addrs", &self.addrs.load())
            .finish()
    }
}

impl ControlTarget {
    pub fn new(url: ControlUrl) -> ControlTarget {
        let addrs = match url.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, url.port)],
            Err(_) => Vec::new(),
        };
        ControlTarget {
            url,
            addrs: ArcSwap::from_pointee(addrs),
            next: AtomicUsize::new(0),
        }
    }

    pub fn url(&self) -> &ControlUrl {
        &self.url
    }

    /// The host is a name that must be looked up (not an IP address).
    pub fn needs_resolution(&self) -> bool {
        self.url.host.parse::<IpAddr>().is_err()
    }

    /// One of the addresses, in turn; `None` until a lookup has succeeded.
    pub fn pick(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.load();
        match addrs.len() {
            0 => None,
            // One address, the common case: the turn counter is shared by every proxy thread,
            // and each increment takes its cache line from the others.
            1 => Some(addrs[0]),
            n => Some(addrs[self.next.fetch_add(1, Ordering::Relaxed) % n]),
        }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.load().as_ref().clone()
    }

    /// Looks the host up (asynchronously, off the request path). On failure or an empty answer
    /// the previous addresses stay: a DNS hiccup must not cut the control plane off.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        if !self.needs_resolution() {
            return Ok(self.addrs.load().len());
        }
        let mut found: Vec<SocketAddr> =
            tokio::net::lookup_host((self.url.host.as_str(), self.url.port))
                .await?
                .collect();
        found.sort();
        found.dedup();
        if found.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ));
        }
        if found.len() > 1 {
            // A name with several addresses (IPv4 and IPv6 for `localhost`, or a scaled service):
            // keep those that accept connections, so no request is sent to one that cannot.
            let mut reachable = Vec::new();
            for a in &found {
                let probe = tokio::time::timeout(
                    std::time::Duration::from_millis(500),
                    tokio::net::TcpStream::connect(a),
                );
                if matches!(probe.await, Ok(Ok(_))) {
                    reachable.push(*a);
                }
            }
            if !reachable.is_empty() {
                found = reachable;
            }
        }
        let n = found.len();
        if **self.addrs.load() != found {
            tracing::info!(control_url = %self.url.url, addrs = ?found, "control API addresses");
            self.addrs.store(std::sync::Arc::new(found));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_need_no_lookup_and_names_are_resolved() {
        let t = ControlTarget::new(ControlUrl::parse("http://127.0.0.1:8081").unwrap());
        assert!(!t.needs_resolution());
        assert_eq!(t.pick(), Some("127.0.0.1:8081".parse().unwrap()));
        let t = ControlTarget::new(ControlUrl::parse("http://localhost:8081").unwrap());
        assert!(t.needs_resolution());
        assert_eq!(t.pick(), None);
        assert!(t.resolve().await.unwrap() >= 1);
        let a = t.pick().unwrap();
        assert!(a.ip().is_loopback() && a.port() == 8081, "{a}");
        // A failed lookup keeps the last good answer.
        let bad = ControlTarget::new(ControlUrl::parse("http://no-such-host.invalid:1").unwrap());
        assert!(bad.resolve().await.is_err());
        assert_eq!(bad.pick(), None);
    }
}
