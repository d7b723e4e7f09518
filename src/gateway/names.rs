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

#[cfg(test)]
mod tests {
    #[test]
    fn the_method_override_names_are_the_classifiers() {
        let names: Vec<&str> = super::METHOD_OVERRIDE.iter().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            fhirgate_core::fhir::classify::METHOD_OVERRIDE_HEADERS
        );
    }
}
