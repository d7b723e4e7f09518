//! The headers fhirgate adds to a request it sends an upstream FHIR server: the upstream's own
//! credentials and who the request is made for. Both planes build them here (the gateway's
//! forwarded and mediated requests, the control API's profile writes, the AuditEvent writer), so
//! the upstream sees one contract whichever part of fhirgate calls it.

use http::HeaderName;

/// The profile (`Patient/…`, `Practitioner/…`) of the caller a request is made for.
pub const PROFILE: &str = "x-fhirgate-profile";
/// The id of the caller's project.
pub const PROJECT: &str = "x-fhirgate-project";
/// The profile a request is made on behalf of (Medplum's `X-Medplum-On-Behalf-Of`, resolved).
pub const ON_BEHALF_OF: &str = "x-fhirgate-on-behalf-of";

/// The names above, parsed once: a name given as a string is parsed (and a custom one copied)
/// every time it is set.
static NAMES: [HeaderName; 4] = [
    http::header::AUTHORIZATION,
    HeaderName::from_static(PROFILE),
    HeaderName::from_static(PROJECT),
    HeaderName::from_static(ON_BEHALF_OF),
];

/// Who a request to the upstream is made for; `None` fields send no header.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamIdentity<'a> {
    /// The upstream's credentials (`upstream_authorization`), never the client's.
    pub authorization: Option<&'a str>,
    /// The caller's profile and project id.
    pub caller: Option<(&'a str, &'a str)>,
    pub on_behalf_of: Option<&'a str>,
}

impl<'a> UpstreamIdentity<'a> {
    /// The headers to send.
    pub fn headers(self) -> impl Iterator<Item = (&'static HeaderName, &'a str)> {
        let (profile, project) = self.caller.unzip();
        NAMES
            .iter()
            .zip([self.authorization, profile, project, self.on_behalf_of])
            .filter_map(|(name, value)| value.map(|v| (name, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_known_is_sent() {
        let none: Vec<_> = UpstreamIdentity::default().headers().collect();
        assert!(none.is_empty());
        let all: Vec<_> = UpstreamIdentity {
            authorization: Some("Basic x"),
            caller: Some(("Patient/p", "proj")),
            on_behalf_of: Some("Practitioner/d"),
        }
        .headers()
        .map(|(name, value)| (name.as_str(), value))
        .collect();
        assert_eq!(
            all,
            [
                ("authorization", "Basic x"),
                (PROFILE, "Patient/p"),
                (PROJECT, "proj"),
                (ON_BEHALF_OF, "Practitioner/d"),
            ]
        );
    }
}
