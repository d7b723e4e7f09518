//! SAML 2.0 sign-in, fhirgate as the service provider (SP): the identity provider's settings
//! (`base::saml_idp`, from a DomainConfiguration or a ClientApplication, or from the IdP's
//! metadata XML), the SP's own metadata and the AuthnRequest it sends (`request`), and the checks of the
//! Response the browser posts back (`response`: structure first, so that what is verified is
//! what is read; then the signatures, by libxmlsec1's `xmlsec1` program (`xmlsec`); then the
//! issuer, audience, recipient, `InResponseTo` and time window).
//!
//! The sign-in itself is `login::external`'s, like any IdP's; the routes are `auth::saml`'s.

pub mod request;
pub mod response;
pub mod xmlsec;

pub use crate::control::base::saml_idp::{NS_DSIG, SamlIdp};

/// SAML's protocol namespace (`samlp:`).
pub const NS_PROTOCOL: &str = "urn:oasis:names:tc:SAML:2.0:protocol";
/// SAML's assertion namespace (`saml:`).
pub const NS_ASSERTION: &str = "urn:oasis:names:tc:SAML:2.0:assertion";
pub const BINDING_POST: &str = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST";
pub const NAMEID_EMAIL: &str = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress";

/// The SP's endpoints under the control API's base URL.
pub struct SpEndpoints {
    /// The SP's entity id: the URL of its metadata.
    pub entity_id: String,
    /// The assertion consumer service (HTTP-POST binding).
    pub acs_url: String,
}

impl SpEndpoints {
    pub fn of(base_url: &str) -> SpEndpoints {
        SpEndpoints {
            entity_id: format!("{base_url}auth/saml/metadata"),
            acs_url: format!("{base_url}auth/saml/acs"),
        }
    }
}

/// XML text escaping for attribute values and text written into a message.
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}
