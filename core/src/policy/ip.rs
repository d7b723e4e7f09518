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
mod tests {
    use super::*;

    fn rule(value: &str, action: &str) -> IpAccessRule {
        IpAccessRule {
            name: None,
            value: value.to_string(),
            action: action.to_string(),
        }
    }

    fn compile(rules: &[(&str, &str)]) -> Vec<CompiledIpRule> {
        rules
            .iter()
            .map(|(v, a)| CompiledIpRule::compile(&rule(v, a)).expect(v))
            .collect()
    }

    /// `(rules, address, expected verdict)`.
    fn check(rules: &[(&str, &str)], addr: &str, expected: IpVerdict) {
        let compiled = compile(rules);
        let addr: IpAddr = addr.parse().expect(addr);
        assert_eq!(check_ip(&compiled, addr), expected, "{rules:?} {addr}");
    }

    const ALLOW_NONE: IpVerdict = IpVerdict::Allow { rule: None };
    const fn allow(i: usize) -> IpVerdict {
        IpVerdict::Allow { rule: Some(i) }
    }
    const fn block(i: usize) -> IpVerdict {
        IpVerdict::Block { rule: i }
    }

    #[test]
    fn no_rules_or_no_match_allows() {
        check(&[], "203.0.113.7", ALLOW_NONE);
        check(&[("10.0.0.1", "block")], "10.0.0.2", ALLOW_NONE);
        check(&[("10.0.0.0/8", "allow")], "11.0.0.1", ALLOW_NONE);
    }

    #[test]
    fn ipv4_exact_wildcard_and_cidr() {
        let rules = [("6.6.6.6", "block"), ("*", "allow")];
        check(&rules, "6.6.6.6", block(0));
        check(&rules, "5.5.5.5", allow(1));
        // An exact address is exact: no accidental prefix match on 6.6.6.60.
        check(&rules, "6.6.6.60", allow(1));
        let lan = [("10.20.0.0/16", "allow"), ("*", "block")];
        check(&lan, "10.20.5.17", allow(0));
        check(&lan, "10.21.0.1", block(1));
        check(&[("10.20.5.0/16", "allow")], "10.20.99.1", allow(0));
        check(&[("192.168.1.7/32", "block")], "192.168.1.7", block(0));
        check(&[("0.0.0.0/0", "block")], "1.2.3.4", block(0));
    }

    #[test]
    fn first_match_wins_block_before_allow() {
        let rules = [
            ("10.0.0.66", "block"),
            ("10.0.0.0/8", "allow"),
            ("*", "block"),
        ];
        check(&rules, "10.0.0.66", block(0));
        check(&rules, "10.0.0.67", allow(1));
        check(&rules, "192.0.2.1", block(2));
        let reversed = [("10.0.0.0/8", "allow"), ("10.0.0.66", "block")];
        check(&reversed, "10.0.0.66", allow(0));
    }

    #[test]
    fn medplum_prefix_form() {
        let rules = [("8.8.", "allow"), ("*", "block")];
        check(&rules, "8.8.8.8", allow(0));
        check(&rules, "8.7.8.8", block(1));
        let vpn = [("10.1.", "allow"), ("*", "block")];
        check(&vpn, "10.1.4.4", allow(0));
        check(&vpn, "10.10.1.5", block(1));
        // Without the trailing dot the prefix is plain text, as in Medplum.
        check(&[("10.1", "allow"), ("*", "block")], "10.10.1.5", allow(0));
        check(&[("192.168.0.", "block")], "192.168.0.254", block(0));
        // An IPv4 prefix never matches an IPv6 address (Medplum's plain text would).
        check(&[("20", "block")], "2001:db8::1", ALLOW_NONE);
        check(&[("20", "block")], "20.1.1.1", block(0));
    }

    #[test]
    fn ipv6_exact_cidr_and_prefix() {
        let rules = [("2001:db8::/32", "allow"), ("*", "block")];
        check(&rules, "2001:db8:1:2::5", allow(0));
        check(&rules, "2001:db9::1", block(1));
        check(&[("2001:DB8::1", "block")], "2001:db8:0:0::1", block(0));
        check(&[("fe80::/10", "block")], "fe80::1234", block(0));
        check(
            &[("2001:db8:", "allow"), ("*", "block")],
            "2001:db8:aa::1",
            allow(0),
        );
        check(
            &[("2001:DB8:", "allow"), ("*", "block")],
            "2001:db9::1",
            block(1),
        );
        check(&[("::1", "block")], "::1", block(0));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        let rules = [("10.0.0.0/8", "allow"), ("*", "block")];
        check(&rules, "::ffff:10.1.2.3", allow(0));
        check(&rules, "::ffff:11.1.2.3", block(1));
        check(&[("10.1.", "block")], "::ffff:10.1.2.3", block(0));
        check(&[("6.6.6.6", "block")], "::ffff:6.6.6.6", block(0));
        check(&[("::ffff:6.6.6.6", "block")], "6.6.6.6", block(0));
        check(&[("::ffff:10.0.0.0/104", "block")], "10.9.9.9", block(0));
    }

    #[test]
    fn invalid_values_and_actions_are_refused() {
        for value in [
            "",
            "   ",
            "abc",
            "10.0.0.0/33",
            "10.0.0.256",
            "300.",
            "10..1",
            ".10",
            "10.0.0.1.",
            "10.0.0.1.2",
            "010.",
            "1.2.3.4.5",
            "2001:db8:::1",
            "1::2::3",
            "12345::",
            "10.0.0.0/8/8",
            "**",
            "localhost",
        ] {
            let got = CompiledIpRule::compile(&rule(value, "block"));
            assert!(
                matches!(got, Err(PolicyError::IpValue { .. })),
                "{value:?} → {got:?}"
            );
        }
        for action in ["", "deny", "Allow", "BLOCK", "allow "] {
            let got = CompiledIpRule::compile(&rule("*", action));
            assert!(
                matches!(got, Err(PolicyError::IpAction { .. })),
                "{action:?} → {got:?}"
            );
        }
        for value in [
            "*",
            "8.8.",
            "8",
            "10.1",
            "192.168.0.",
            "::1",
            "2001:db8:",
            "10.0.0.0/8",
        ] {
            assert!(
                CompiledIpRule::compile(&rule(value, "allow")).is_ok(),
                "{value}"
            );
        }
    }

    #[test]
    fn block_all_stand_in_blocks_everything() {
        let rules = [
            CompiledIpRule::block_all(None),
            compile(&[("*", "allow")]).remove(0),
        ];
        assert_eq!(check_ip(&rules, "1.2.3.4".parse().expect("ip")), block(0));
        assert!(!check_ip(&rules, "::1".parse().expect("ip")).is_allowed());
    }
}
