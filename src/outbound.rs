//! Outbound calls to addresses a client record chose, shared by whoever makes them (the control
//! API today): the address rule and a client that enforces it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Calls to addresses a client record chose (a client's `jwksUri`, an identity provider's
/// endpoints): never to loopback, link-local, private or other internal addresses — the control
/// API itself, the upstream, a cloud metadata service — unless the operator allows them
/// (`outbound_allow`). Names are checked by the client's resolver when it connects, so the
/// address checked is the address used (no second lookup to rebind); literal addresses are
/// checked before the request is built.
pub struct Guarded {
    client: reqwest::Client,
    allow: Arc<[IpNet]>,
}

impl Guarded {
    pub fn new(allow: &[IpNet]) -> Result<Guarded, reqwest::Error> {
        let allow: Arc<[IpNet]> = allow.into();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                allow: allow.clone(),
            }))
            .build()?;
        Ok(Guarded { client, allow })
    }

    /// A request to `url`, or `None` when it is not an http(s) URL or names an address that
    /// may not be reached.
    pub fn request(&self, method: reqwest::Method, url: &str) -> Option<reqwest::RequestBuilder> {
        let parsed = url::Url::parse(url).ok()?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return None;
        }
        let literal = match parsed.host()? {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(_) => None,
        };
        if let Some(ip) = literal
            && !address_allowed(ip, &self.allow)
        {
            tracing::warn!(%ip, "refused an outbound call to an internal address");
            return None;
        }
        Some(self.client.request(method, parsed))
    }
}

struct GuardedResolver {
    allow: Arc<[IpNet]>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| address_allowed(a.ip(), &allow))
                .collect();
            if found.is_empty() {
                tracing::warn!(
                    host,
                    "refused an outbound call: the name has no address that may be reached"
                );
                return Err("no address that may be reached".into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether a fetch chosen by a client record may reach `ip`: an address the operator allows, or
/// one that is none of loopback, private, link-local, shared (CGNAT), unspecified, multicast,
/// broadcast or reserved.
pub fn address_allowed(ip: IpAddr, allow: &[IpNet]) -> bool {
    if allow.iter().any(|n| n.contains(&ip)) {
        return true;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(!address_allowed(bad.parse().unwrap(), &[]), "{bad}");
        }
        for good in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(address_allowed(good.parse().unwrap(), &[]), "{good}");
        }
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(address_allowed("127.0.0.1".parse().unwrap(), &allow));
        assert!(!address_allowed("10.0.0.1".parse().unwrap(), &allow));
    }

    #[test]
    fn literal_urls_are_checked_before_any_request() {
        let guarded = Guarded::new(&[]).unwrap();
        for url in [
            "http://127.0.0.1:8081/admin",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/x",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert!(
                guarded.request(reqwest::Method::GET, url).is_none(),
                "{url}"
            );
        }
        assert!(
            guarded
                .request(reqwest::Method::GET, "https://idp.example.com/userinfo")
                .is_some()
        );
    }
}
