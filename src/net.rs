//! Network facts shared by both planes. The client's address: the socket peer, or — only when the peer is a trusted proxy — the
//! right-most untrusted hop of `X-Forwarded-For`. An unparsable header fails closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Where this host reaches its own listener on `listen`: the same address, or loopback when it
/// listens on every address (0.0.0.0, ::).
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed X-Forwarded-For")]
pub struct BadForwardedFor;

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|n| n.contains(&ip))
}

/// `xff` holds every `X-Forwarded-For` header value in order.
pub fn resolve(peer: IpAddr, xff: &[&str], proxies: &[IpNet]) -> Result<IpAddr, BadForwardedFor> {
    let peer = canonical(peer);
    if xff.is_empty() || !trusted(peer, proxies) {
        return Ok(peer);
    }
    let mut hops = Vec::new();
    for value in xff {
        for hop in value.split(',') {
            let hop = hop.trim();
            let ip: IpAddr = hop.parse().map_err(|_| BadForwardedFor)?;
            hops.push(canonical(ip));
        }
    }
    let mut leftmost = peer;
    for ip in hops.iter().rev() {
        if !trusted(*ip, proxies) {
            return Ok(*ip);
        }
        leftmost = *ip;
    }
    Ok(leftmost)
}

/// Appends `ip` as text: an IPv4 address digit by digit (the formatter's padding machinery cost
/// more than the rest of `X-Forwarded-For` on every request), any other through `Display`.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write;
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let cases = [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.1.20",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ];
        for case in cases {
            let ip: IpAddr = case.parse().unwrap();
            let mut out = String::from("prior, ");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("prior, {ip}"));
        }
        for octet in 0..=255u8 {
            let ip = IpAddr::from([octet, 0, octet, 1]);
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let ip = resolve(
            "203.0.113.9".parse().unwrap(),
            &["1.2.3.4"],
            &nets(&["127.0.0.0/8"]),
        )
        .unwrap();
        assert_eq!(ip.to_string(), "203.0.113.9");
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_hop() {
        let p = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        let ip = resolve(
            "127.0.0.1".parse().unwrap(),
            &["6.6.6.6, 5.5.5.5, 10.1.1.1"],
            &p,
        )
        .unwrap();
        assert_eq!(ip.to_string(), "5.5.5.5");
        let ip = resolve("127.0.0.1".parse().unwrap(), &["6.6.6.6", "5.5.5.5"], &p).unwrap();
        assert_eq!(ip.to_string(), "5.5.5.5");
    }

    #[test]
    fn garbage_fails_closed() {
        let p = nets(&["127.0.0.0/8"]);
        assert!(resolve("127.0.0.1".parse().unwrap(), &["a"], &p).is_err());
        assert!(resolve("127.0.0.1".parse().unwrap(), &["1.2.3.4, "], &p).is_err());
        assert!(resolve("127.0.0.1".parse().unwrap(), &["1.2.3.4:80"], &p).is_err());
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        let ip = resolve(
            "::ffff:127.0.0.1".parse().unwrap(),
            &["2001:db8::1"],
            &nets(&["127.0.0.0/8"]),
        )
        .unwrap();
        assert_eq!(ip.to_string(), "2001:db8::1");
    }
}
