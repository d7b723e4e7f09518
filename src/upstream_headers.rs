//! The headers fhirgate adds to a request it sends an upstream FHIR server: the upstream's own
//! credentials and who the request is made for. Both planes build them here (the gateway's
//! forwarded and mediated requests, the control API's profile writes, the AuditEvent writer), so
//! the upstream sees one contract whichever part of fhirgate calls it.

/// The profile (`Patient/…`, `Practitioner/…`) of the caller a request is made for.
pub const PROFILE: &str = "x-fhirgate-profile";
/// The id of the caller's project.
pub const PROJECT: &str = "x-fhirgate-project";
/// The profile a request is made on behalf of (Medplum's `X-Medplum-On-Behalf-Of`, resolved).
pub const ON_BEHALF_OF: &str = "x-fhirgate-on-behalf-of";

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
    /// The headers to send, names in lower case.
    pub fn headers(self) -> impl Iterator<Item = (&'static str, &'a str)> {
        let (profile, project) = self.caller.unzip();
        [
            ("authorization", self.authorization),
            (PROFILE, profile),
            (PROJECT, project),
            (ON_BEHALF_OF, self.on_behalf_of),
        ]
        .into_iter()
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
