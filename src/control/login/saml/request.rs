//! What the SP sends: its metadata, and the AuthnRequest of a sign-in on the HTTP-Redirect
//! binding (DEFLATE, base64, a query parameter; unsigned, as the metadata says).

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flate2::Compression;
use flate2::write::DeflateEncoder;

use super::{BINDING_POST, NAMEID_EMAIL, SamlIdp, SpEndpoints, xml_escape};

/// A fresh request id: an XML NCName (it must not start with a digit), 128 random bits.
pub fn new_request_id() -> String {
    format!("_{}", uuid::Uuid::new_v4().simple())
}

/// The AuthnRequest XML.
pub fn authn_request(idp: &SamlIdp, sp: &SpEndpoints, request_id: &str, now: i64) -> String {
    format!(
        concat!(
            r#"<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" "#,
            r#"xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="{id}" Version="2.0" "#,
            r#"IssueInstant="{instant}" Destination="{destination}" "#,
            r#"AssertionConsumerServiceURL="{acs}" ProtocolBinding="{binding}">"#,
            r#"<saml:Issuer>{issuer}</saml:Issuer>"#,
            r#"<samlp:NameIDPolicy AllowCreate="true"/>"#,
            r#"</samlp:AuthnRequest>"#
        ),
        id = xml_escape(request_id),
        instant = crate::store::unix_rfc3339(now),
        destination = xml_escape(&idp.sso_url),
        acs = xml_escape(&sp.acs_url),
        binding = BINDING_POST,
        issuer = xml_escape(&sp.entity_id),
    )
}

/// The URL the browser is sent to: the IdP's SSO service with `SAMLRequest` and `RelayState`.
pub fn redirect_url(idp: &SamlIdp, xml: &str, relay_state: &str) -> Option<String> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(xml.as_bytes()).ok()?;
    let deflated = encoder.finish().ok()?;
    let mut url = url::Url::parse(&idp.sso_url).ok()?;
    url.query_pairs_mut()
        .append_pair("SAMLRequest", &STANDARD.encode(deflated))
        .append_pair("RelayState", relay_state);
    Some(url.to_string())
}

/// The SP's metadata: who it is, where assertions go, and that it wants them signed.
pub fn sp_metadata(sp: &SpEndpoints) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "\n",
            r#"<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="{entity}">"#,
            r#"<md:SPSSODescriptor AuthnRequestsSigned="false" WantAssertionsSigned="true" "#,
            r#"protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">"#,
            r#"<md:NameIDFormat>{email}</md:NameIDFormat>"#,
            r#"<md:AssertionConsumerService Binding="{binding}" Location="{acs}" index="0" isDefault="true"/>"#,
            r#"</md:SPSSODescriptor></md:EntityDescriptor>"#,
            "\n"
        ),
        entity = xml_escape(&sp.entity_id),
        email = NAMEID_EMAIL,
        binding = BINDING_POST,
        acs = xml_escape(&sp.acs_url),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::DeflateDecoder;
    use std::io::Read;

    fn idp() -> SamlIdp {
        SamlIdp {
            entity_id: "https://idp.example/a".into(),
            sso_url: "https://idp.example/sso?tenant=x".into(),
            certificates: vec![],
            name: "IdP".into(),
            use_subject: false,
            email_attribute: None,
        }
    }

    #[test]
    fn the_redirect_carries_the_deflated_request_and_the_relay_state() {
        let sp = SpEndpoints::of("https://gw.example/");
        let id = new_request_id();
        assert!(id.starts_with('_') && id.len() == 33);
        let xml = authn_request(&idp(), &sp, &id, 1_800_000_000);
        let url = url::Url::parse(&redirect_url(&idp(), &xml, "relay").unwrap()).unwrap();
        let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            q[0],
            ("tenant".into(), "x".into()),
            "the IdP's own query stays"
        );
        assert_eq!(q[2], ("RelayState".into(), "relay".into()));
        let mut back = String::new();
        DeflateDecoder::new(&STANDARD.decode(&q[1].1).unwrap()[..])
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, xml);
        let doc = roxmltree::Document::parse(&back).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("ID"), Some(id.as_str()));
        assert_eq!(root.attribute("IssueInstant"), Some("2027-01-15T08:00:00Z"));
        assert_eq!(
            root.attribute("AssertionConsumerServiceURL"),
            Some("https://gw.example/auth/saml/acs")
        );
        assert_eq!(
            root.attribute("Destination"),
            Some("https://idp.example/sso?tenant=x")
        );
    }

    #[test]
    fn sp_metadata_is_well_formed_and_escaped() {
        let sp = SpEndpoints::of("https://gw.example/a&b/");
        let xml = sp_metadata(&sp);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(
            doc.root_element().attribute("entityID"),
            Some("https://gw.example/a&b/auth/saml/metadata")
        );
    }
}
