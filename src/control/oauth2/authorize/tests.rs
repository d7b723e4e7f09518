use axum::http::{HeaderMap, HeaderValue, header};

use super::render::describe_scope;
use super::request::is_fhir_base;
use super::session::cookie_value;
use super::session::{csrf_cookie_name, csrf_in};
use super::*;

#[test]
fn params_keep_every_value() {
    assert!(!Params::parse(b"grant=a&grant=b&scope=a+b").has_duplicates());
    let p = Params::parse(b"a=1&b=&c=x&c=y");
    assert_eq!(p.one("a"), Some("1"));
    assert_eq!(p.one("b"), None);
    assert_eq!(p.one("c"), None);
    assert_eq!(p.count("c"), 2);
    assert!(p.has_duplicates());
    assert_eq!(p.all("c").collect::<Vec<_>>(), ["x", "y"]);
}

#[test]
fn audience_must_be_this_servers_fhir_base() {
    let base = "http://127.0.0.1:8080/";
    assert!(is_fhir_base("http://127.0.0.1:8080/fhir/R4", base));
    assert!(is_fhir_base("http://127.0.0.1:8080/fhir/R4/", base));
    assert!(!is_fhir_base("http://127.0.0.1:8080/", base));
    assert!(!is_fhir_base("http://127.0.0.1:8080/fhir/R4//", base));
    assert!(!is_fhir_base("http://127.0.0.1:8080/fhir/R4/Patient", base));
    assert!(!is_fhir_base("http://127.0.0.1:9999/fhir/R4", base));
    assert!(!is_fhir_base("https://127.0.0.1:8080/fhir/R4", base));
    assert!(!is_fhir_base("not a url", base));
}

#[test]
fn scopes_are_described() {
    assert_eq!(describe_scope("openid"), "Confirm who you are");
    assert_eq!(
        describe_scope("patient/Observation.rs"),
        "Read and search Observation records of the patient"
    );
    assert_eq!(
        describe_scope("user/*.cruds"),
        "Read, search, create, update and delete all kinds of records you can access"
    );
    assert_eq!(
        describe_scope("patient/Condition.rs?category=health-concern"),
        "Read and search Condition records of the patient (only where category=health-concern)"
    );
    assert_eq!(describe_scope("custom"), "Use the permission “custom”");
}

#[test]
fn cookies_are_found_by_name() {
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_static("a=1; medplum-c1=l.s; fhirgate-csrf=abc"),
    );
    assert_eq!(cookie_value(&h, "medplum-c1").as_deref(), Some("l.s"));
    assert_eq!(cookie_value(&h, "fhirgate-csrf").as_deref(), Some("abc"));
    assert_eq!(cookie_value(&h, "nope"), None);
}

/// Over https the CSRF token is read only from the `__Host-` cookie, which a sibling subdomain
/// cannot set; a plain `fhirgate-csrf` cookie (which it can) is ignored.
#[test]
fn over_https_only_a_host_only_csrf_cookie_counts() {
    let token = "ab".repeat(32);
    let mut planted = HeaderMap::new();
    planted.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("fhirgate-csrf={token}")).unwrap(),
    );
    assert_eq!(
        csrf_in(&planted, "http://127.0.0.1:8080/"),
        Some(token.clone())
    );
    assert_eq!(csrf_in(&planted, "https://gw.example/"), None);
    let mut host_only = HeaderMap::new();
    host_only.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("__Host-fhirgate-csrf={token}")).unwrap(),
    );
    assert_eq!(csrf_in(&host_only, "https://gw.example/"), Some(token));
    assert_eq!(
        csrf_cookie_name("https://gw.example/"),
        "__Host-fhirgate-csrf"
    );
    assert_eq!(csrf_cookie_name("http://localhost:8080/"), "fhirgate-csrf");
}
