//! A SAML identity provider's settings (the sign-in is `login::saml`'s): `identityProvider.saml` of a DomainConfiguration or a
//! ClientApplication, given field by field (`entityId`, `ssoUrl`, `certificate`) or as the IdP's
//! metadata XML (`metadata`), fields winning over what the metadata says.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use crate::control::web::error::ApiError;
use crate::state::ClientInfo;

/// SAML's metadata namespace (`md:`).
pub const NS_METADATA: &str = "urn:oasis:names:tc:SAML:2.0:metadata";
/// XML-Signature's namespace (`ds:`).
pub const NS_DSIG: &str = "http://www.w3.org/2000/09/xmldsig#";
pub const BINDING_REDIRECT: &str = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect";

/// Why an IdP's settings cannot be used. The texts are the configuration's answer (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdpConfigError {
    #[error("SAML identity provider must be an object")]
    NotAnObject,
    #[error("SAML identity provider metadata is not valid XML: {0}")]
    MetadataXml(String),
    #[error("SAML identity provider metadata has no IDPSSODescriptor")]
    NoIdpDescriptor,
    #[error("SAML identity provider metadata describes several identity providers; give entityId")]
    Ambiguous,
    #[error("SAML identity provider needs entityId")]
    NoEntityId,
    #[error("SAML identity provider needs an ssoUrl (an HTTP-Redirect single sign-on service)")]
    NoSsoUrl,
    #[error("SAML identity provider ssoUrl must be an http(s) URL")]
    BadSsoUrl,
    #[error("SAML identity provider needs a signing certificate")]
    NoCertificate,
    #[error("SAML identity provider certificate is not a base64 X.509 certificate")]
    BadCertificate,
}

/// An IdP fhirgate trusts for SAML sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamlIdp {
    pub entity_id: String,
    /// Its single sign-on service, HTTP-Redirect binding.
    pub sso_url: String,
    /// Its signing certificates (several during a key rollover), PEM.
    pub certificates: Vec<String>,
    /// Shown on the sign-in page ("Sign in with …").
    pub name: String,
    /// Find the user by the NameID (a membership's `externalId`) instead of the e-mail address.
    pub use_subject: bool,
    /// The attribute holding the e-mail address, when the NameID is not one.
    pub email_attribute: Option<String>,
}

/// What metadata XML says of an IdP.
#[derive(Debug, Default)]
struct FromMetadata {
    entity_id: Option<String>,
    sso_url: Option<String>,
    certificates: Vec<String>,
}

impl SamlIdp {
    /// The `saml` object of an `identityProvider`, checked whole.
    pub fn from_value(v: &Value) -> Result<SamlIdp, IdpConfigError> {
        let obj = v.as_object().ok_or(IdpConfigError::NotAnObject)?;
        let s = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let wanted_entity = s("entityId");
        let meta = match s("metadata") {
            Some(xml) => read_metadata(&xml, wanted_entity.as_deref())?,
            None => FromMetadata::default(),
        };
        let entity_id = wanted_entity
            .or(meta.entity_id)
            .ok_or(IdpConfigError::NoEntityId)?;
        let sso_url = s("ssoUrl")
            .or(meta.sso_url)
            .ok_or(IdpConfigError::NoSsoUrl)?;
        match url::Url::parse(&sso_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return Err(IdpConfigError::BadSsoUrl),
        }
        let mut certificates = Vec::new();
        match obj.get("certificate") {
            Some(Value::String(c)) => certificates.push(pem_of(c)?),
            Some(Value::Array(list)) => {
                for c in list {
                    certificates.push(pem_of(c.as_str().ok_or(IdpConfigError::BadCertificate)?)?);
                }
            }
            Some(_) => return Err(IdpConfigError::BadCertificate),
            None => {
                for c in &meta.certificates {
                    certificates.push(pem_of(c)?);
                }
            }
        }
        if certificates.is_empty() {
            return Err(IdpConfigError::NoCertificate);
        }
        Ok(SamlIdp {
            name: s("name").unwrap_or_else(|| host_name(&sso_url)),
            entity_id,
            sso_url,
            certificates,
            use_subject: obj
                .get("useSubject")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            email_attribute: s("emailAttribute"),
        })
    }

    /// The SAML IdP of an `identityProvider` object, if it is one.
    pub fn of_identity_provider(idp: &Value) -> Option<Result<SamlIdp, IdpConfigError>> {
        idp.get("saml").map(SamlIdp::from_value)
    }
}

fn host_name(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "your organization".to_string())
}

/// A certificate given as PEM or as the base64 of its DER (as metadata carries it), as PEM.
fn pem_of(text: &str) -> Result<String, IdpConfigError> {
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = STANDARD
        .decode(&body)
        .map_err(|_| IdpConfigError::BadCertificate)?;
    // An X.509 certificate is a DER SEQUENCE of some length; anything else is not one.
    if der.len() < 64 || der[0] != 0x30 {
        return Err(IdpConfigError::BadCertificate);
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in STANDARD.encode(&der).as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    Ok(pem)
}

/// The IdP of metadata XML: an `EntityDescriptor`, or an `EntitiesDescriptor` holding it.
fn read_metadata(xml: &str, wanted: Option<&str>) -> Result<FromMetadata, IdpConfigError> {
    let doc =
        roxmltree::Document::parse(xml).map_err(|e| IdpConfigError::MetadataXml(e.to_string()))?;
    let is = |n: &roxmltree::Node, ns: &str, name: &str| {
        n.is_element() && n.tag_name().namespace() == Some(ns) && n.tag_name().name() == name
    };
    let entities: Vec<roxmltree::Node> = doc
        .descendants()
        .filter(|n| is(n, NS_METADATA, "EntityDescriptor"))
        .filter(|n| {
            n.children()
                .any(|c| is(&c, NS_METADATA, "IDPSSODescriptor"))
        })
        .filter(|n| wanted.is_none_or(|w| n.attribute("entityID") == Some(w)))
        .collect();
    let entity = match entities.as_slice() {
        [] => return Err(IdpConfigError::NoIdpDescriptor),
        [one] => *one,
        _ => return Err(IdpConfigError::Ambiguous),
    };
    let Some(descriptor) = entity
        .children()
        .find(|c| is(c, NS_METADATA, "IDPSSODescriptor"))
    else {
        return Err(IdpConfigError::NoIdpDescriptor);
    };
    let sso_url = descriptor
        .children()
        .filter(|c| is(c, NS_METADATA, "SingleSignOnService"))
        .find(|c| c.attribute("Binding") == Some(BINDING_REDIRECT))
        .and_then(|c| c.attribute("Location"))
        .map(str::to_string);
    let certificates = descriptor
        .children()
        .filter(|c| is(c, NS_METADATA, "KeyDescriptor"))
        .filter(|c| c.attribute("use").is_none_or(|u| u == "signing"))
        .flat_map(|k| k.descendants())
        .filter(|n| is(n, NS_DSIG, "X509Certificate"))
        .filter_map(|n| n.text().map(str::to_string))
        .collect();
    Ok(FromMetadata {
        entity_id: entity.attribute("entityID").map(str::to_string),
        sso_url,
        certificates,
    })
}

/// A SAML IdP (`identityProvider.saml`) is stored only when it can be used: a signing
/// certificate, an entity id, an http(s) single sign-on URL.
pub fn check_saml_idp(resource: &Value, field: &str) -> Result<(), ApiError> {
    match resource
        .get("identityProvider")
        .and_then(SamlIdp::of_identity_provider)
    {
        Some(Err(e)) => Err(ApiError::invalid(field, e.to_string())),
        _ => Ok(()),
    }
}

/// The SAML IdP of a client (`identityProvider.saml`), when it has a usable one.
pub fn client_saml_idp(client: &ClientInfo) -> Option<SamlIdp> {
    let idp = client.content.get("identityProvider")?;
    match SamlIdp::of_identity_provider(idp)? {
        Ok(idp) => Some(idp),
        Err(e) => {
            tracing::error!(client = %client.id, error = %e, "the SAML identity provider of a client is not usable");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A self-signed certificate's DER, base64 (any DER SEQUENCE of this shape passes `pem_of`;
    /// xmlsec1 is what tells a real certificate from a fake one).
    fn cert_b64() -> String {
        let mut der = vec![0x30, 0x82, 0x01, 0x00];
        der.extend(std::iter::repeat_n(7u8, 256));
        STANDARD.encode(der)
    }

    fn metadata(cert: &str, extra_idp: bool) -> String {
        let idp = |id: &str| {
            format!(
                r#"<md:EntityDescriptor entityID="{id}"><md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"><md:KeyDescriptor use="encryption"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>AAAA</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor><md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>
{cert}
</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor><md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" Location="https://idp.example/post"/><md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" Location="https://idp.example/sso"/></md:IDPSSODescriptor></md:EntityDescriptor>"#
            )
        };
        let body = if extra_idp {
            format!(
                "{}{}",
                idp("https://idp.example/a"),
                idp("https://idp.example/b")
            )
        } else {
            idp("https://idp.example/a")
        };
        format!(
            r#"<md:EntitiesDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" xmlns:ds="http://www.w3.org/2000/09/xmldsig#">{body}</md:EntitiesDescriptor>"#
        )
    }

    #[test]
    fn metadata_gives_the_entity_the_redirect_service_and_the_signing_certificate() {
        let idp = SamlIdp::from_value(&json!({"metadata": metadata(&cert_b64(), false)})).unwrap();
        assert_eq!(idp.entity_id, "https://idp.example/a");
        assert_eq!(idp.sso_url, "https://idp.example/sso");
        assert_eq!(
            idp.certificates.len(),
            1,
            "the encryption key is not a signing key"
        );
        assert!(idp.certificates[0].starts_with("-----BEGIN CERTIFICATE-----\nMIIB"));
        assert_eq!(idp.name, "idp.example");
    }

    #[test]
    fn several_idps_in_one_metadata_need_an_entity_id() {
        let xml = metadata(&cert_b64(), true);
        assert_eq!(
            SamlIdp::from_value(&json!({"metadata": xml})),
            Err(IdpConfigError::Ambiguous)
        );
        let idp =
            SamlIdp::from_value(&json!({"metadata": xml, "entityId": "https://idp.example/b"}))
                .unwrap();
        assert_eq!(idp.entity_id, "https://idp.example/b");
    }

    #[test]
    fn an_idp_without_a_signing_certificate_is_refused() {
        let xml = metadata(&cert_b64(), false).replace(&cert_b64(), "");
        assert_eq!(
            SamlIdp::from_value(&json!({"metadata": xml})),
            Err(IdpConfigError::BadCertificate)
        );
        assert_eq!(
            SamlIdp::from_value(&json!({"entityId": "x", "ssoUrl": "https://idp.example/sso"})),
            Err(IdpConfigError::NoCertificate)
        );
        assert_eq!(
            SamlIdp::from_value(
                &json!({"entityId": "x", "ssoUrl": "https://idp.example/sso", "certificate": "bm90IGEgY2VydA=="})
            ),
            Err(IdpConfigError::BadCertificate)
        );
    }

    #[test]
    fn fields_are_checked() {
        let cert = cert_b64();
        assert_eq!(
            SamlIdp::from_value(
                &json!({"entityId": "x", "ssoUrl": "javascript:alert(1)", "certificate": cert})
            ),
            Err(IdpConfigError::BadSsoUrl)
        );
        assert_eq!(
            SamlIdp::from_value(&json!({"ssoUrl": "https://idp.example/sso", "certificate": cert})),
            Err(IdpConfigError::NoEntityId)
        );
        assert!(matches!(
            SamlIdp::from_value(&json!({"metadata": "<not xml"})),
            Err(IdpConfigError::MetadataXml(_))
        ));
        assert!(matches!(
            SamlIdp::from_value(&json!({"metadata": "<!DOCTYPE x [<!ENTITY a \"b\">]><x>&a;</x>"})),
            Err(IdpConfigError::MetadataXml(_))
        ));
        let idp = SamlIdp::from_value(&json!({"entityId": "x", "ssoUrl": "https://idp.example/sso",
            "certificate": [cert.clone(), format!("-----BEGIN CERTIFICATE-----\n{cert}\n-----END CERTIFICATE-----")],
            "name": "St Thomas", "useSubject": true}))
        .unwrap();
        assert_eq!(idp.certificates.len(), 2);
        assert_eq!(idp.certificates[0], idp.certificates[1]);
        assert_eq!(idp.name, "St Thomas");
        assert!(idp.use_subject);
    }
}
