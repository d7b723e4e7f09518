use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::fhir::request::Interaction;
use crate::policy::compiled::{CompiledPolicy, PolicyError, validate_policy};
use crate::policy::model::AccessPolicy;

fn after() -> Value {
    json!({
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "active": true,
        "flags": [true, true],
        "code": {"coding": [
            {"system": "x", "code": "a"},
            {"system": "y", "code": "b"},
        ]},
        "subject": {"reference": "Patient/p1", "display": "P"},
        "valueInteger": 7,
        "effectiveDateTime": "2021-03-04T10:00:00Z",
        "amount": 1.5,
        "big": 12_345_678_901_234_567_890_u64,
        "note": [{"text": "it's \"q\"\n\u{e9}\u{1F600}"}],
        "name": [
            {"given": ["Ann", "Bo"], "family": "X"},
            {"given": ["Cy"], "family": "Y"},
        ],
        "nothing": null,
    })
}

fn before() -> Value {
    json!({
        "resourceType": "Observation",
        "id": "o1",
        "status": "preliminary",
        "subject": {"display": "P", "reference": "Patient/p1"},
    })
}

fn render(result: Result<Vec<Item<'_>>, EvalError>) -> String {
    let items = match result {
        Ok(items) => items,
        Err(_) => return "error".into(),
    };
    let items: Vec<String> = items
        .iter()
        .map(|item| match item {
            Item::Str(s) => format!("'{s}'"),
            Item::Num(n) => n.to_string(),
            Item::Bool(b) => b.to_string(),
            Item::Node(_) => "{…}".into(),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn run(source: &str, after: &Value, before: Option<&Value>) -> String {
    let expr = Expression::parse(source).unwrap_or_else(|e| panic!("{source}: {e}"));
    render(expr.evaluate(after, before))
}

fn check(table: &[(&str, &str)], after: &Value, before: Option<&Value>) {
    for &(source, want) in table {
        assert_eq!(run(source, after, before), want, "{source}");
    }
}

// === docs/medplum-compat.md §12 case 65 ===

#[test]
fn case_65_final_resources_are_frozen_and_need_a_subject() {
    let constraints = vec![
        "%before.exists() implies %before.status != 'final'".to_string(),
        "status = 'final' implies subject.exists()".to_string(),
    ];
    let obs = |status: &str, subject: bool| {
        let mut r = json!({"resourceType": "Observation", "status": status,
                "code": {"text": "x"}});
        if subject {
            r["subject"] = json!({"reference": "Patient/p1"});
        }
        r
    };
    let table: [(&str, Value, Option<Value>, bool); 7] = [
        (
            "create as preliminary",
            obs("preliminary", false),
            None,
            true,
        ),
        (
            "set final without a subject",
            obs("final", false),
            Some(obs("preliminary", false)),
            false,
        ),
        (
            "set final with a subject",
            obs("final", true),
            Some(obs("preliminary", false)),
            true,
        ),
        (
            "change a final resource to cancelled",
            obs("cancelled", true),
            Some(obs("final", true)),
            false,
        ),
        (
            "create as final with a subject",
            obs("final", true),
            None,
            true,
        ),
        (
            "create as final without a subject",
            obs("final", false),
            None,
            false,
        ),
        (
            "update a preliminary one, no status change",
            obs("preliminary", false),
            Some(obs("preliminary", false)),
            true,
        ),
    ];
    for (name, new, current, want) in table {
        assert_eq!(
            write_constraints_hold(&constraints, &new, current.as_ref()),
            want,
            "{name}"
        );
    }
}

#[test]
fn no_constraints_hold_and_unparsable_ones_never_do() {
    assert!(write_constraints_hold(&[], &json!({}), None));
    assert!(write_constraints_hold(
        &["status = 'final'".into()],
        &json!({"status": "final"}),
        None
    ));
    for bad in ["resolve().exists()", "", "status = "] {
        assert!(
            !write_constraints_hold(&[bad.into()], &json!({"status": "final"}), None),
            "{bad}"
        );
    }
    // One failing constraint is enough.
    assert!(!write_constraints_hold(
        &["true".into(), "false".into()],
        &json!({}),
        None
    ));
}

// === semantics ===

#[test]
fn literals_and_paths() {
    check(
        &[
            ("true", "[true]"),
            ("false", "[false]"),
            ("{}", "[]"),
            ("'it\\'s'", "['it's']"),
            ("'\\\\ \\/ \\` \\\" \\t'", "['\\ / ` \" \t']"),
            ("1.50", "[1.5]"),
            ("-2", "[-2]"),
            ("- 2.250", "[-2.25]"),
            ("007", "[7]"),
            ("0.000", "[0]"),
            ("0.0012", "[0.0012]"),
            ("1200", "[1200]"),
            ("status", "['final']"),
            ("`status`", "['final']"),
            ("code.coding.code", "['a', 'b']"),
            ("name.given", "['Ann', 'Bo', 'Cy']"),
            ("name.family", "['X', 'Y']"),
            ("nothing", "[]"),
            ("missing.field", "[]"),
            ("status.length", "[]"),
            ("subject.reference", "['Patient/p1']"),
            ("subject", "[{…}]"),
            ("Observation.status", "['final']"),
            ("Patient.status", "[]"),
            ("value", "[7]"),
            ("effective", "['2021-03-04T10:00:00Z']"),
            ("$this.status", "['final']"),
            ("%resource.id", "['o1']"),
            ("%after.id", "['o1']"),
            ("%before.status", "['preliminary']"),
            ("(status)", "['final']"),
            ("((1))", "[1]"),
            (
                "note.text = 'it\\'s \\\"q\\\"\\n\\u00e9\\uD83D\\uDE00'",
                "[true]",
            ),
        ],
        &after(),
        Some(&before()),
    );
}

#[test]
fn functions() {
    check(
        &[
            ("status.exists()", "[true]"),
            ("exists()", "[true]"),
            ("nothing.exists()", "[false]"),
            ("{}.exists()", "[false]"),
            ("1.exists()", "[true]"),
            ("{}.empty()", "[true]"),
            ("status.empty()", "[false]"),
            ("code.coding.count()", "[2]"),
            ("{}.count()", "[0]"),
            ("name.given.count() = 3", "[true]"),
            ("name.given.first()", "['Ann']"),
            ("{}.first()", "[]"),
            ("code.coding.where(system = 'y').code", "['b']"),
            ("code.coding.where($this.code = 'a').system", "['x']"),
            ("name.given.where($this = 'Bo')", "['Bo']"),
            ("name.where(given contains 'Cy').family", "['Y']"),
            ("code.coding.where(missing = 'z')", "[]"),
            ("code.coding.where(code)", "error"),
            ("name.where(given = 'Cy').family", "['Y']"),
            ("status.where(%before.status = 'preliminary')", "['final']"),
            ("code.coding.exists(code = 'b')", "[true]"),
            ("code.coding.exists(code = 'z')", "[false]"),
            ("status.hasValue()", "[true]"),
            ("subject.hasValue()", "[true]"),
            ("missing.hasValue()", "[false]"),
            ("true.not()", "[false]"),
            ("false.not()", "[true]"),
            ("{}.not()", "[]"),
            ("status.not()", "error"),
            ("flags.not()", "error"),
            ("active.not()", "[false]"),
            ("(status = 'final').not()", "[false]"),
        ],
        &after(),
        Some(&before()),
    );
}

#[test]
fn equality_and_comparison() {
    check(
        &[
            ("status = 'final'", "[true]"),
            ("status != 'final'", "[false]"),
            ("status = 'FINAL'", "[false]"),
            ("missing = 'final'", "[]"),
            ("missing != 'final'", "[]"),
            ("{} = {}", "[]"),
            ("code.coding.code = 'a'", "[false]"),
            ("code.coding.code != 'a'", "[true]"),
            ("code.coding.code = code.coding.code", "[true]"),
            ("name.given = name.given.first()", "[false]"),
            ("1 = 1.0", "[true]"),
            ("1.50 = 1.5", "[true]"),
            ("value = 7.0", "[true]"),
            ("amount = 1.50", "[true]"),
            ("big = 12345678901234567890", "[true]"),
            ("big = 12345678901234567891", "[false]"),
            ("big > 12345678901234567889", "[true]"),
            ("status = 1", "[false]"),
            ("status != 1", "[true]"),
            ("active = true", "[true]"),
            ("active = 'true'", "[false]"),
            ("subject = %before.subject", "[true]"),
            ("subject = code", "[false]"),
            ("'a' < 'b'", "[true]"),
            ("'b' <= 'a'", "[false]"),
            ("'abc' > 'ab'", "[true]"),
            ("'a' >= 'a'", "[true]"),
            ("1.0 < 1.05", "[true]"),
            ("-1 < 0", "[true]"),
            ("-0 = 0", "[true]"),
            ("100 > 99.999", "[true]"),
            ("-2.5 < -2.4", "[true]"),
            ("2 >= 2.0", "[true]"),
            ("0.001 > 0.0009", "[true]"),
            ("value > 5", "[true]"),
            ("value <= 6", "[false]"),
            ("code.coding.count() > 1", "[true]"),
            ("effective >= '2021'", "[true]"),
            ("effective < '2021-03-04T10:00:01Z'", "[true]"),
            ("missing < 1", "[]"),
            ("{} > 1", "[]"),
            ("status < 1", "error"),
            ("active < true", "error"),
            ("subject < subject", "error"),
            ("code.coding.code < 'z'", "error"),
        ],
        &after(),
        Some(&before()),
    );
}

#[test]
fn membership() {
    check(
        &[
            ("'b' in code.coding.code", "[true]"),
            ("'z' in code.coding.code", "[false]"),
            ("'x' in {}", "[false]"),
            ("{} in code.coding.code", "[]"),
            ("code.coding.code in 'a'", "error"),
            ("7 in value", "[true]"),
            ("7.0 in value", "[true]"),
            ("code.coding.code contains 'a'", "[true]"),
            ("code.coding.code contains 'c'", "[false]"),
            ("code.coding.code contains {}", "[]"),
            ("{} contains 'a'", "[false]"),
            ("'a' contains code.coding.code", "error"),
            ("code.contains", "[]"),
        ],
        &after(),
        Some(&before()),
    );
}

#[test]
fn three_valued_logic() {
    let values = ["true", "false", "{}"];
    // Rows: left operand, columns: right operand, in the order of `values`.
    let tables: [(&str, [[&str; 3]; 3]); 4] = [
        (
            "and",
            [
                ["[true]", "[false]", "[]"],
                ["[false]", "[false]", "[false]"],
                ["[]", "[false]", "[]"],
            ],
        ),
        (
            "or",
            [
                ["[true]", "[true]", "[true]"],
                ["[true]", "[false]", "[]"],
                ["[true]", "[]", "[]"],
            ],
        ),
        (
            "xor",
            [
                ["[false]", "[true]", "[]"],
                ["[true]", "[false]", "[]"],
                ["[]", "[]", "[]"],
            ],
        ),
        (
            "implies",
            [
                ["[true]", "[false]", "[]"],
                ["[true]", "[true]", "[true]"],
                ["[true]", "[]", "[]"],
            ],
        ),
    ];
    for (op, table) in tables {
        for (l, row) in values.iter().zip(table) {
            for (r, want) in values.iter().zip(row) {
                let source = format!("{l} {op} {r}");
                assert_eq!(run(&source, &after(), None), want, "{source}");
            }
        }
    }
    // Operands must be empty or a single boolean.
    check(
        &[
            ("status and true", "error"),
            ("true or status", "error"),
            ("flags and true", "error"),
            ("true implies status", "error"),
            ("status xor false", "error"),
            ("active and active", "[true]"),
        ],
        &after(),
        None,
    );
}

#[test]
fn precedence_and_associativity() {
    check(
        &[
            ("true or false and false", "[true]"),
            ("(true or false) and false", "[false]"),
            ("true and false or true", "[true]"),
            // `xor` and `or` bind equally, left to right.
            ("true xor true or true", "[true]"),
            // `implies` is left-associative and binds loosest.
            ("false implies true implies false", "[false]"),
            ("false implies true = false", "[true]"),
            ("1 < 2 = true", "[true]"),
            ("'a' in code.coding.code = true", "[false]"),
            ("'a' in code.coding.code and status = 'final'", "[true]"),
            ("status = 'final' and subject.exists()", "[true]"),
        ],
        &after(),
        None,
    );
}

#[test]
fn before_is_empty_on_create() {
    check(
        &[
            ("%before", "[]"),
            ("%before.exists()", "[false]"),
            ("%before.status = 'final'", "[]"),
            ("%before.status != 'final'", "[]"),
            (
                "%before.exists() implies %before.status != 'final'",
                "[true]",
            ),
            ("%after.exists()", "[true]"),
        ],
        &after(),
        None,
    );
    check(
        &[("%before", "[]"), ("%before.exists()", "[false]")],
        &after(),
        Some(&Value::Null),
    );
}

#[test]
fn holds_only_on_exactly_one_true() {
    let r = after();
    for (source, want) in [
        ("true", true),
        ("active", true),
        ("status = 'final'", true),
        ("false", false),
        ("{}", false),
        ("status", false),
        ("flags", false),
        ("1", false),
        ("status < 1", false),
        ("code.coding.code = 'a'", false),
        ("missing = 'x'", false),
    ] {
        let expr = Expression::parse(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(expr.holds(&r, None), want, "{source}");
    }
}

// === refusals ===

#[test]
fn unsupported_syntax_is_refused_when_parsed() {
    for source in [
        "",
        "   ",
        "resolve().exists()",
        "subject.resolve()",
        "ofType(Patient)",
        "value.ofType(Quantity)",
        "value as Quantity",
        "value is Quantity",
        "value.as(Quantity)",
        "value.is(Quantity)",
        "iif(true, true, false)",
        "1 + 1",
        "1 - 1",
        "2 * 3",
        "6 / 3",
        "5 div 2",
        "5 mod 2",
        "+1",
        "-status",
        "--1",
        "'a' & 'b'",
        "status.startsWith('f')",
        "status.length() > 1",
        "status.substring(1)",
        "status.matches('f.*')",
        "name[0]",
        "status | id",
        "status ~ 'final'",
        "status !~ 'final'",
        "!status",
        "%context",
        "%patient",
        "%patient.id = id",
        "%'vs'",
        "%",
        "$index",
        "$total",
        "$",
        "@2020-01-01",
        "status > @2020",
        "5 'mg'",
        "4 days",
        "today()",
        "now()",
        "trace('x')",
        "extension('http://x')",
        "all(true)",
        "select(id)",
        "distinct()",
        "children()",
        "'unterminated",
        "`unterminated",
        "``",
        "'bad \\q escape'",
        "'\\u12'",
        "'\\uD800'",
        "'\\uDC00'",
        "'\\uD800\\u0041'",
        "exists(",
        "exists(true, false)",
        "where()",
        "where(true, false)",
        "count(1)",
        "not(true)",
        "()",
        "(true",
        "true)",
        "{1}",
        "{",
        "status =",
        "= 'final'",
        "and",
        "true and",
        "status.",
        "status..id",
        "status.'x'",
        "status.and",
        "status.true",
        "status 'final'",
        "true false",
        "// comment",
        "status = 'final' // trailing",
        "#",
        "é",
        "status = 'final';",
    ] {
        assert!(
            Expression::parse(source).is_err(),
            "{source:?} should be refused"
        );
    }
}

#[test]
fn errors_point_at_the_problem() {
    let e = Expression::parse("status.exists() and subject.resolve().exists()")
        .err()
        .map(|e| (e.offset, e.message));
    assert_eq!(
        e,
        Some((28, "function `resolve()` is not supported".to_string()))
    );
    let e = Expression::parse("value is Quantity").err();
    assert_eq!(
        e.map(|e| e.message),
        Some("operator `is` is not supported".to_string())
    );
}

#[test]
fn nesting_is_bounded_without_overflowing_the_stack() {
    let deep = |n: usize| format!("{}true{}", "(".repeat(n), ")".repeat(n));
    assert!(Expression::parse(&deep(20)).is_ok());
    assert!(Expression::parse(&deep(100_000)).is_err());
    let chain = |n: usize| vec!["true"; n].join(" and ");
    assert!(Expression::parse(&chain(20)).is_ok());
    assert!(Expression::parse(&chain(100_000)).is_err());
    let path = |n: usize| vec!["a"; n].join(".");
    assert!(Expression::parse(&path(20)).is_ok());
    assert!(Expression::parse(&path(100_000)).is_err());
    let wheres = |n: usize| format!("{}true{}", "where(".repeat(n), ")".repeat(n));
    assert!(Expression::parse(&wheres(10)).is_ok());
    assert!(Expression::parse(&wheres(100_000)).is_err());
}

// === save time and compile time ===

fn policy_with(expression: &str) -> AccessPolicy {
    serde_json::from_value(json!({"resourceType": "AccessPolicy", "resource": [
        {"resourceType": "Observation", "writeConstraint": [
            {"language": "text/fhirpath", "expression": "status.exists()"},
            {"language": "text/fhirpath", "expression": expression},
        ]},
    ]}))
    .expect("AccessPolicy JSON")
}

#[test]
fn unsupported_expressions_fail_validation_and_break_the_entry() {
    for expression in [
        "resolve().exists()",
        "subject.resolve().exists()",
        "value.ofType(Quantity).exists()",
        "iif(status = 'final', true, false)",
        "status.length() > 1",
        "subject.reference = %patient",
    ] {
        let errors = validate_policy(&policy_with(expression))
            .err()
            .unwrap_or_default();
        assert!(
            matches!(
                errors.as_slice(),
                [PolicyError::WriteConstraint {
                    index: 0,
                    constraint: 1
                }]
            ),
            "{expression}: {errors:?}"
        );
        let (compiled, errors) = CompiledPolicy::compile(&policy_with(expression), false);
        assert_eq!(errors.len(), 1, "{expression}");
        assert!(compiled.entries()[0].is_broken(), "{expression}");
        assert!(!compiled.type_allows("Observation", Interaction::Create, false));
    }
}

#[test]
fn supported_expressions_pass_validation() {
    for expression in [
        "%before.exists() implies %before.status != 'final'",
        "status = 'final' implies subject.exists()",
        "subject.reference = '%patient'",
        "code.coding.where(system = 'http://loinc.org').code in %before.code.coding.code",
    ] {
        assert_eq!(
            validate_policy(&policy_with(expression)),
            Ok(()),
            "{expression}"
        );
        let (compiled, errors) = CompiledPolicy::compile(&policy_with(expression), false);
        assert!(errors.is_empty(), "{expression}: {errors:?}");
        assert!(!compiled.entries()[0].is_broken(), "{expression}");
        assert_eq!(compiled.entries()[0].write_constraints.len(), 2);
    }
}

// === robustness ===

const FRAGMENTS: &[&str] = &[
    "status",
    "subject",
    "code",
    "coding",
    "given",
    ".",
    "(",
    ")",
    "{",
    "}",
    "{}",
    ",",
    "'final'",
    "'a\\'b'",
    "'",
    "\\",
    "`x`",
    "`",
    "1",
    "2.5",
    "0.",
    "-",
    "=",
    "!=",
    "!",
    "<",
    "<=",
    ">",
    ">=",
    "and",
    "or",
    "xor",
    "implies",
    "in",
    "contains",
    "is",
    "as",
    "true",
    "false",
    "exists()",
    "exists(",
    "empty()",
    "not()",
    "count()",
    "first()",
    "where(",
    "hasValue()",
    "resolve()",
    "$this",
    "$",
    "%before",
    "%after",
    "%resource",
    "%",
    "@",
    "[",
    "]",
    "|",
    "\u{e9}",
    "\\u0041",
];

proptest! {
    #[test]
    fn parse_never_panics(source in "\\PC{0,64}") {
        let _ = Expression::parse(&source);
    }

    #[test]
    fn token_soup_never_panics(
        parts in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..24),
        separator in prop::sample::select(&["", " "][..]),
    ) {
        let source = parts.join(separator);
        if let Ok(expr) = Expression::parse(&source) {
            let (after, before) = (after(), before());
            let _ = expr.holds(&after, Some(&before));
            let _ = expr.holds(&after, None);
        }
    }

    #[test]
    fn numbers_compare_like_their_values(a in -1_000_000i64..1_000_000, b in -1_000_000i64..1_000_000, scale in 0u32..4) {
        // a / 10^scale vs b / 10^scale, written as decimals.
        let text = |n: i64| {
            let d = 10i64.pow(scale);
            let sign = if n < 0 { "-" } else { "" };
            let n = n.abs();
            if scale == 0 { format!("{sign}{n}") } else { format!("{sign}{}.{:0w$}", n / d, n % d, w = scale as usize) }
        };
        let source = format!("{} < {}", text(a), text(b));
        prop_assert_eq!(run(&source, &json!({}), None), format!("[{}]", a < b), "{}", source);
        let source = format!("{} = {}", text(a), text(b));
        prop_assert_eq!(run(&source, &json!({}), None), format!("[{}]", a == b), "{}", source);
    }
}
