//! Header names the data plane looks up on every request. A name given as a string is parsed
//! (and a custom one validated) on every lookup; these are parsed once.

use http::HeaderName;
pub use http::header::{AUTHORIZATION, UPGRADE};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_MEDPLUM_ON_BEHALF_OF: HeaderName = HeaderName::from_static("x-medplum-on-behalf-of");
pub static X_FHIRGATE_EXPLAIN: HeaderName = HeaderName::from_static("x-fhirgate-explain");
pub static X_FHIRGATE_CHECK: HeaderName = HeaderName::from_static("x-fhirgate-check");

/// `fhir::classify::METHOD_OVERRIDE_HEADERS`, as names (the classifier's list is the one list).
pub static METHOD_OVERRIDE: std::sync::LazyLock<[HeaderName; 3]> = std::sync::LazyLock::new(|| {
    fhirgate_core::fhir::classify::METHOD_OVERRIDE_HEADERS.map(HeaderName::from_static)
});

/// Which of the headers the data plane asks about a request carries, found in one pass over
/// the request's few headers: each lookup by name hashes the name and probes the map, and a
/// request was asked about eight of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Present(u8);

impl Present {
    pub const UPGRADE: u8 = 1;
    /// Any of [`METHOD_OVERRIDE`].
    pub const METHOD_OVERRIDE: u8 = 1 << 1;
    pub const ON_BEHALF_OF: u8 = 1 << 2;
    pub const EXPLAIN: u8 = 1 << 3;
    pub const CHECK: u8 = 1 << 4;
    pub const ORIGIN: u8 = 1 << 5;

    pub fn of(headers: &http::HeaderMap) -> Present {
        let mut seen = 0;
        for name in headers.keys() {
            seen |= if name == UPGRADE {
                Self::UPGRADE
            } else if name == http::header::ORIGIN {
                Self::ORIGIN
            } else if *name == X_MEDPLUM_ON_BEHALF_OF {
                Self::ON_BEHALF_OF
            } else if *name == X_FHIRGATE_EXPLAIN {
                Self::EXPLAIN
            } else if *name == X_FHIRGATE_CHECK {
                Self::CHECK
            } else if METHOD_OVERRIDE.contains(name) {
                Self::METHOD_OVERRIDE
            } else {
                0
            };
        }
        Present(seen)
    }

    pub fn has(self, header: u8) -> bool {
        self.0 & header != 0
    }
}

#[cfg(test)]
mod tests {
    use super::Present;

    #[test]
    fn one_pass_finds_what_lookups_would() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Present::of(&h), Present::default());
        h.insert("Upgrade", "websocket".parse().unwrap());
        h.insert("x-http-method-override", "DELETE".parse().unwrap());
        h.insert("X-Medplum-On-Behalf-Of", "x".parse().unwrap());
        h.insert("x-fhirgate-explain", "1".parse().unwrap());
        h.insert("x-fhirgate-check", "permission".parse().unwrap());
        h.insert("origin", "https://a.example".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let p = Present::of(&h);
        for flag in [
            Present::UPGRADE,
            Present::METHOD_OVERRIDE,
            Present::ON_BEHALF_OF,
            Present::EXPLAIN,
            Present::CHECK,
            Present::ORIGIN,
        ] {
            assert!(p.has(flag), "{flag}");
        }
        for name in super::METHOD_OVERRIDE.iter() {
            let mut only = http::HeaderMap::new();
            only.insert(name.clone(), "GET".parse().unwrap());
            assert_eq!(
                Present::of(&only),
                Present(Present::METHOD_OVERRIDE),
                "{name}"
            );
        }
    }

    #[test]
    fn the_method_override_names_are_the_classifiers() {
        let names: Vec<&str> = super::METHOD_OVERRIDE.iter().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            fhirgate_core::fhir::classify::METHOD_OVERRIDE_HEADERS
        );
    }
}
