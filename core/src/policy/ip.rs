//! AccessPolicy IP rules (docs/medplum-compat.md §4.7, docs/contract.md §3): rules are walked in order, the first
//! matching rule decides, and no match allows. A rule value is `*`, an exact address, a CIDR
//! (IPv4 or IPv6) or Medplum's string-prefix form (`8.8.` matches `8.8.8.8`). Values are compiled
//! once, when the policy is loaded; an invalid value is refused at save time.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

use crate::policy::compiled::PolicyError;
use crate::policy::model::IpAccessRule;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpAction {
    Allow,
    Block,
}

impl IpAction {
    pub fn as_str(self) -> &'static str {
        match self {
            IpAction::Allow => "allow",
            IpAction::Block => "block",
        }
    }
}

/// The outcome of walking the rules for one address. `rule` is the index of the deciding rule in
/// the concatenated `ipAccessRule` list (for audit records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVerdict {
    /// A rule allowed the address, or (`rule: None`) no rule matched.
    Allow {
        rule: Option<usize>,
    },
    Block {
        rule: usize,
    },
}

impl IpVerdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, IpVerdict::Allow { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    Any,
    Exact(IpAddr),
    Net(IpNet),
    /// Medplum's `address.startsWith(value)`, against the canonical text of the address
    /// (dotted quad, or RFC 5952 lower-case IPv6). Stored lower-case. A dotted prefix only
    /// applies to IPv4 addresses and a colon prefix only to IPv6 ones.
    Prefix {
        text: String,
        v6: bool,
    },
}

/// One compiled `ipAccessRule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledIpRule {
    matcher: Matcher,
    action: IpAction,
    name: Option<String>,
}

// === impl CompiledIpRule ===

impl CompiledIpRule {
    /// Compiles a rule: `action` must be exactly `allow` or `block`; `value` must be `*`, an
    /// address, a CIDR or a prefix of a dotted-quad / IPv6 text.
    pub fn compile(rule: &IpAccessRule) -> Result<CompiledIpRule, PolicyError> {
        let action = match rule.action.as_str() {
            "allow" => IpAction::Allow,
            "block" => IpAction::Block,
            other => {
                return Err(PolicyError::IpAction {
                    action: other.to_string(),
                });
            }
        };
        let matcher = parse_value(&rule.value).ok_or_else(|| PolicyError::IpValue {
            value: rule.value.clone(),
        })?;
        Ok(CompiledIpRule {
            matcher,
            action,
            name: rule.name.clone(),
        })
    }

    /// The stand-in for a rule that does not compile at run time: it matches every address and
    /// blocks, so a broken rule can never open access (fail closed).
    pub fn block_all(name: Option<String>) -> CompiledIpRule {
        CompiledIpRule {
            matcher: Matcher::Any,
            action: IpAction::Block,
            name,
        }
    }

    pub fn action(&self) -> IpAction {
        self.action
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// True when this rule applies to `addr` (IPv4-mapped IPv6 addresses are taken as IPv4).
    pub fn matches(&self, addr: IpAddr) -> bool {
        self.matches_normalised(normalise(addr))
    }

    fn matches_normalised(&self, addr: IpAddr) -> bool {
        match &self.matcher {
            Matcher::Any => true,
            Matcher::Exact(a) => *a == addr,
            Matcher::Net(net) => net.contains(&addr),
            Matcher::Prefix { text, v6 } => {
                addr.is_ipv6() == *v6 && addr.to_string().starts_with(text.as_str())
            }
        }
    }
}

/// Walks `rules` in order: the first matching rule decides; no match allows.
pub fn check_ip(rules: &[CompiledIpRule], addr: IpAddr) -> IpVerdict {
    let addr = normalise(addr);
    for (index, rule) in rules.iter().enumerate() {
        if rule.matches_normalised(addr) {
            return match rule.action {
                IpAction::Allow => IpVerdict::Allow { rule: Some(index) },
                IpAction::Block => IpVerdict::Block { rule: index },
            };
        }
    }
    IpVerdict::Allow { rule: None }
}

/// `::ffff:a.b.c.d` is the IPv4 address `a.b.c.d` (dual-stack sockets report IPv4 peers so).
fn normalise(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn parse_value(value: &str) -> Option<Matcher> {
    let value = value.trim();
    if value == "*" {
        return Some(Matcher::Any);
    }
    if value.contains('/') {
        let net = IpNet::from_str(value).ok()?;
        return Some(Matcher::Net(normalise_net(net)));
    }
    if let Ok(addr) = IpAddr::from_str(value) {
        return Some(Matcher::Exact(normalise(addr)));
    }
    if is_ipv4_prefix(value) {
        return Some(Matcher::Prefix {
            text: value.to_string(),
            v6: false,
        });
    }
    if is_ipv6_prefix(value) {
        return Some(Matcher::Prefix {
            text: value.to_ascii_lowercase(),
            v6: true,
        });
    }
    None
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps, so that it
/// matches the normalised addresses.
fn normalise_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n);
    }
    net
}

/// A proper prefix of some dotted quad: up to four dot-separated octets, every complete octet a
/// canonical decimal ≤ 255, the last one possibly partial or empty (`10.`, `10.1`, `192.168.0.`).
fn is_ipv4_prefix(value: &str) -> bool {
    let parts: Vec<&str> = value.split('.').collect();
    if parts.len() > 4 || parts[0].is_empty() {
        return false;
    }
    let last = parts.len() - 1;
    parts.iter().enumerate().all(|(i, part)| {
        if part.is_empty() {
            return i == last;
        }
        part.len() <= 3
            && part.bytes().all(|b| b.is_ascii_digit())
            && !(part.len() > 1 && part.starts_with('0'))
            && part.parse::<u16>().is_ok_and(|n| n <= 255)
    }) && value.parse::<Ipv4Addr>().is_err()
}

/// A prefix of an IPv6 text: hex groups of at most four digits separated by `:`, at most one
/// `::`, and at least one `:` (so that a bare number is read as IPv4).
fn is_ipv6_prefix(value: &str) -> bool {
    value.contains(':')
        && value.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
        && !value.contains(":::")
        && value.matches("::").count() <= 1
        && value.split(':').count() <= 8
        && value.split(':').all(|g| g.len() <= 4)
}

#[cfg(test)]
mod tests;
