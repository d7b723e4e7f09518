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
