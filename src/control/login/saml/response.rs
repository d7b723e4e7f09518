//! The checks of a SAML Response the browser posts to the assertion consumer service, as plain
//! functions over its text, in three passes:
//!
//! 1. [`signed_parts`]: the shape. One Response holding exactly one Assertion; every `ID`
//!    unique; no `xml:id`, DTD, comment or processing instruction; every Signature the child of
//!    the Response or the Assertion, with one Reference naming its own parent, and only the
//!    algorithms and transforms a SAML signature needs. What is read later is then exactly what
//!    a verified signature covers (no signature wrapping), and a NameID cannot be split by a
//!    comment that canonicalization drops.
//! 2. The signatures those parts carry, verified by `xmlsec` (not here: it runs a program).
//! 3. [`read_identity`]: the issuer, destination, `InResponseTo`, status, subject
//!    confirmation (bearer, recipient, time window), conditions (time window, audience) and
//!    the person the assertion is about.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use roxmltree::{Document, Node};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{NAMEID_EMAIL, NS_ASSERTION, NS_DSIG, NS_PROTOCOL, SamlIdp, SpEndpoints};

/// The largest Response accepted (decoded). Real ones are a few kilobytes.
pub const MAX_RESPONSE_BYTES: usize = 128 * 1024;

const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
const STATUS_SUCCESS: &str = "urn:oasis:names:tc:SAML:2.0:status:Success";
const BEARER: &str = "urn:oasis:names:tc:SAML:2.0:cm:bearer";
const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";
/// Signature algorithms accepted: RSA and ECDSA with SHA-2 (no SHA-1, no HMAC).
const SIGNATURE_METHODS: [&str; 6] = [
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384",
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
];
const DIGEST_METHODS: [&str; 3] = [
    "http://www.w3.org/2001/04/xmlenc#sha256",
    "http://www.w3.org/2001/04/xmldsig-more#sha384",
    "http://www.w3.org/2001/04/xmlenc#sha512",
];
/// Attributes that carry an e-mail address at common IdPs (eduPerson/LDAP `mail`, ADFS and
/// Entra ID's claim, Keycloak's and Okta's `email`).
const EMAIL_ATTRIBUTES: [&str; 5] = [
    "email",
    "mail",
    "emailaddress",
    "urn:oid:0.9.2342.19200300.100.1.3",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
];

/// Why a SAML Response is refused. The texts are shown to the person signing in; none echoes
/// what the response says, except a status code's last word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamlError {
    #[error("The SAML response is not valid: {0}")]
    Malformed(&'static str),
    #[error("The SAML response is not signed")]
    Unsigned,
    #[error("The SAML response is not signed the way a SAML response must be: {0}")]
    Wrapped(&'static str),
    #[error("The SAML response's signature does not verify")]
    BadSignature,
    /// The IdP's status code is logged, never shown (when only the assertion is signed, the
    /// status is not, and a page must not show what an attacker wrote).
    #[error("The identity provider did not sign you in")]
    Status(String),
    #[error("The SAML response was issued by another identity provider")]
    WrongIssuer,
    #[error("The SAML response was meant for another service provider")]
    WrongAudience,
    #[error("The SAML response was meant for another address")]
    WrongRecipient,
    #[error("The SAML response has expired")]
    Expired,
    #[error("The SAML response is not valid yet")]
    NotYetValid,
    #[error("The SAML response does not answer a sign-in started here")]
    Unsolicited,
    #[error("The SAML response was used before")]
    Replayed,
    #[error("The SAML response does not say who you are")]
    NoIdentity,
    #[error("SAML sign-in is not available on this server: {0}")]
    Unavailable(&'static str),
}

/// A part of the Response that carries a signature of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedPart {
    Response,
    Assertion,
}

impl SignedPart {
    /// The XPath of its Signature element (names and namespaces both fixed).
    pub fn signature_xpath(self) -> &'static str {
        match self {
            SignedPart::Response => concat!(
                "/*[local-name()='Response' and namespace-uri()='urn:oasis:names:tc:SAML:2.0:protocol']",
                "/*[local-name()='Signature' and namespace-uri()='http://www.w3.org/2000/09/xmldsig#']"
            ),
            SignedPart::Assertion => concat!(
                "/*[local-name()='Response' and namespace-uri()='urn:oasis:names:tc:SAML:2.0:protocol']",
                "/*[local-name()='Assertion' and namespace-uri()='urn:oasis:names:tc:SAML:2.0:assertion']",
                "/*[local-name()='Signature' and namespace-uri()='http://www.w3.org/2000/09/xmldsig#']"
            ),
        }
    }
}

/// The `SAMLResponse` form field: base64 (line breaks allowed), at most
/// [`MAX_RESPONSE_BYTES`], UTF-8.
pub fn decode(field: &str) -> Result<String, SamlError> {
    let compact: String = field.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.len() > MAX_RESPONSE_BYTES * 4 / 3 + 4 {
        return Err(SamlError::Malformed("it is too large"));
    }
    let bytes = STANDARD
        .decode(compact)
        .map_err(|_| SamlError::Malformed("it is not base64"))?;
    let text =
        String::from_utf8(bytes).map_err(|_| SamlError::Malformed("it is not UTF-8 text"))?;
    without_declaration(&text).map(str::to_string)
}

/// The document without its XML declaration (and a byte-order mark), after checking that the
/// declaration says nothing but UTF-8. This parser reads the text as UTF-8 whatever it
/// declares, while libxml2 (in xmlsec1) would honour another encoding: in UTF-7, markup hidden
/// from one parser is seen by the other, so the two would read different documents.
fn without_declaration(text: &str) -> Result<&str, SamlError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Some(rest) = text.strip_prefix("<?xml") else {
        return Ok(text);
    };
    let bad = SamlError::Malformed("its XML declaration is not accepted");
    let end = rest.find("?>").ok_or(bad.clone())?;
    let mut declaration = rest[..end].trim();
    let mut seen = Vec::new();
    while !declaration.is_empty() {
        let (name, after) = declaration.split_once('=').ok_or(bad.clone())?;
        let after = after.trim_start();
        let quote = after
            .chars()
            .next()
            .filter(|q| *q == '"' || *q == '\'')
            .ok_or(bad.clone())?;
        let close = after[1..].find(quote).ok_or(bad.clone())? + 1;
        let (name, value) = (name.trim(), &after[1..close]);
        let fine = match name {
            "version" => seen.is_empty() && value == "1.0",
            "encoding" => value.eq_ignore_ascii_case("UTF-8"),
            "standalone" => value == "yes" || value == "no",
            _ => false,
        };
        if !fine || seen.contains(&name) {
            return Err(bad);
        }
        seen.push(name);
        declaration = after[close + 1..].trim_start();
    }
    if seen.first() != Some(&"version") {
        return Err(bad);
    }
    Ok(rest[end + 2..].trim_start())
}

/// An ID xmlsec1 can name safely: it builds an XPath `id('…')` from the reference, so quotes,
/// brackets or spaces in an ID would become XPath.
fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && id.len() <= 256
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse(xml: &str) -> Result<Document<'_>, SamlError> {
    // roxmltree refuses a DTD (and so entity expansion) by default.
    Document::parse(xml)
        .map_err(|_| SamlError::Malformed("it is not well-formed XML without a DTD"))
}

fn is(n: &Node, ns: &str, name: &str) -> bool {
    n.is_element() && n.tag_name().namespace() == Some(ns) && n.tag_name().name() == name
}

fn child<'a, 'i>(n: Node<'a, 'i>, ns: &str, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| is(c, ns, name))
}

fn children<'a, 'i>(
    n: Node<'a, 'i>,
    ns: &'static str,
    name: &'static str,
) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(move |c| is(c, ns, name))
}

/// An element's whole text, trimmed: `None` when it holds an element.
fn text_of(n: Node) -> Option<String> {
    if n.children().any(|c| !c.is_text()) {
        return None;
    }
    let text: String = n.children().filter_map(|c| c.text()).collect();
    Some(text.trim().to_string())
}

/// The InResponseTo of the Response, read before it is verified only to find the sign-in it
/// claims to answer (which the verified values must then match).
pub fn claimed_request(xml: &str) -> Option<String> {
    let doc = Document::parse(xml).ok()?;
    let root = doc.root_element();
    if !is(&root, NS_PROTOCOL, "Response") {
        return None;
    }
    root.attribute("InResponseTo").map(str::to_string)
}

/// Pass 1: the shape of the Response, and the parts whose signatures must verify.
pub fn signed_parts(xml: &str) -> Result<Vec<SignedPart>, SamlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    if !is(&root, NS_PROTOCOL, "Response") {
        return Err(SamlError::Malformed("it is not a SAML Response"));
    }
    let mut ids = std::collections::HashSet::new();
    for n in doc.descendants() {
        if n.is_comment() || n.is_pi() {
            return Err(SamlError::Wrapped(
                "comments and processing instructions are not accepted",
            ));
        }
        if !n.is_element() {
            continue;
        }
        if n.tag_name().namespace().is_none_or(str::is_empty) {
            return Err(SamlError::Wrapped(
                "elements without a namespace are not accepted",
            ));
        }
        // xmlsec1 takes an ID from any attribute named so in any namespace (and `Id` inside a
        // signature): only the Response's and the Assertion's own `ID` may be one.
        let may_have_id = (n == root) || is(&n, NS_ASSERTION, "Assertion");
        for a in n.attributes() {
            if a.namespace() == Some(XML_NS) && a.name() == "id" {
                return Err(SamlError::Wrapped("xml:id attributes are not accepted"));
            }
            if !a.name().eq_ignore_ascii_case("id") {
                continue;
            }
            if !(may_have_id && a.namespace().is_none() && a.name() == "ID") {
                return Err(SamlError::Wrapped("an ID attribute is where none belongs"));
            }
            if !valid_id(a.value()) {
                return Err(SamlError::Wrapped(
                    "an ID has characters an ID may not have",
                ));
            }
            if !ids.insert(a.value()) {
                return Err(SamlError::Wrapped("an ID is used twice"));
            }
        }
        if is(&n, NS_ASSERTION, "EncryptedAssertion") {
            return Err(SamlError::Malformed(
                "encrypted assertions are not supported",
            ));
        }
    }
    let assertions: Vec<Node> = doc
        .descendants()
        .filter(|n| is(n, NS_ASSERTION, "Assertion"))
        .collect();
    let assertion = match assertions.as_slice() {
        [a] if a.parent() == Some(root) => *a,
        [_] => return Err(SamlError::Wrapped("the assertion is not where it belongs")),
        [] => return Err(SamlError::Malformed("it holds no assertion")),
        _ => return Err(SamlError::Wrapped("it holds more than one assertion")),
    };

    let mut parts = Vec::new();
    for sig in doc.descendants().filter(|n| is(n, NS_DSIG, "Signature")) {
        let parent = sig.parent().filter(Node::is_element);
        let part = match parent {
            Some(p) if p == root => SignedPart::Response,
            Some(p) if p == assertion => SignedPart::Assertion,
            _ => return Err(SamlError::Wrapped("a signature is where none belongs")),
        };
        if parts.contains(&part) {
            return Err(SamlError::Wrapped("a part is signed twice"));
        }
        let signed_id = parent.and_then(|p| p.attribute("ID")).unwrap_or_default();
        check_signature(sig, signed_id)?;
        parts.push(part);
    }
    if parts.is_empty() {
        return Err(SamlError::Unsigned);
    }
    Ok(parts)
}

/// One Signature: it signs its parent (by ID) and nothing else, with accepted algorithms.
fn algorithm<'a>(n: Option<Node<'a, '_>>) -> Option<&'a str> {
    n.and_then(|n| n.attribute("Algorithm"))
}

fn check_signature(sig: Node, signed_id: &str) -> Result<(), SamlError> {
    let bad = SamlError::Wrapped;
    if signed_id.is_empty() {
        return Err(bad("the signed element has no ID"));
    }
    if child(sig, NS_DSIG, "Object").is_some() {
        return Err(bad("signature objects are not accepted"));
    }
    // The key is the configured certificate's: a KeyInfo may name it or carry it, no more.
    if let Some(info) = child(sig, NS_DSIG, "KeyInfo") {
        let allowed = |n: &Node, names: &[&str]| {
            n.tag_name().namespace() == Some(NS_DSIG) && names.contains(&n.tag_name().name())
        };
        for c in info.children().filter(Node::is_element) {
            if !allowed(&c, &["KeyName", "X509Data"])
                || c.children()
                    .filter(Node::is_element)
                    .any(|x| !allowed(&x, &["X509Certificate"]))
            {
                return Err(bad("a key is given in a way that is not accepted"));
            }
        }
    }
    let info = child(sig, NS_DSIG, "SignedInfo").ok_or(bad("a signature has no SignedInfo"))?;
    if algorithm(child(info, NS_DSIG, "CanonicalizationMethod")) != Some(EXC_C14N) {
        return Err(bad("only exclusive canonicalization is accepted"));
    }
    if !algorithm(child(info, NS_DSIG, "SignatureMethod"))
        .is_some_and(|a| SIGNATURE_METHODS.contains(&a))
    {
        return Err(bad("the signature algorithm is not accepted"));
    }
    let references: Vec<Node> = children(info, NS_DSIG, "Reference").collect();
    let [reference] = references.as_slice() else {
        return Err(bad("a signature must have exactly one reference"));
    };
    if reference.attribute("URI") != Some(&format!("#{signed_id}")) {
        return Err(bad("a signature signs something other than its parent"));
    }
    if !algorithm(child(*reference, NS_DSIG, "DigestMethod"))
        .is_some_and(|a| DIGEST_METHODS.contains(&a))
    {
        return Err(bad("the digest algorithm is not accepted"));
    }
    if let Some(transforms) = child(*reference, NS_DSIG, "Transforms") {
        for t in transforms.children().filter(Node::is_element) {
            if !is(&t, NS_DSIG, "Transform")
                || !matches!(t.attribute("Algorithm"), Some(ENVELOPED | EXC_C14N))
                || t.children()
                    .any(|c| c.is_element() && !is(&c, EXC_C14N, "InclusiveNamespaces"))
            {
                return Err(bad("a transform is not accepted"));
            }
        }
    }
    Ok(())
}

/// What a sign-in expects of the Response.
pub struct Expected<'a> {
    pub idp: &'a SamlIdp,
    pub sp: &'a SpEndpoints,
    /// The ID of the AuthnRequest this sign-in sent.
    pub request_id: &'a str,
    pub now: i64,
    /// How far the IdP's clock may be from ours, in seconds (`saml_clock_skew`).
    pub skew: i64,
}

/// The person a verified Response vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub assertion_id: String,
    pub name_id: String,
    pub email: Option<String>,
    /// When the assertion stops being usable: it is remembered as used until then.
    pub valid_until: i64,
}

fn instant(s: Option<&str>) -> Result<Option<i64>, SamlError> {
    match s {
        None => Ok(None),
        Some(s) => OffsetDateTime::parse(s.trim(), &Rfc3339)
            .map(|t| Some(t.unix_timestamp()))
            .map_err(|_| SamlError::Malformed("a time is not an xs:dateTime")),
    }
}

/// A time window `[not_before, not_on_or_after)` around `e.now`, with the clock skew allowed.
fn in_window(
    e: &Expected,
    not_before: Option<i64>,
    not_on_or_after: Option<i64>,
) -> Result<(), SamlError> {
    if not_before.is_some_and(|t| e.now + e.skew < t) {
        return Err(SamlError::NotYetValid);
    }
    if not_on_or_after.is_some_and(|t| e.now - e.skew >= t) {
        return Err(SamlError::Expired);
    }
    Ok(())
}

/// Pass 3, on a Response whose signed parts verified.
pub fn read_identity(xml: &str, expected: &Expected) -> Result<Identity, SamlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let assertion = child(root, NS_ASSERTION, "Assertion")
        .ok_or(SamlError::Malformed("it holds no assertion"))?;
    if root.attribute("Version") != Some("2.0") || assertion.attribute("Version") != Some("2.0") {
        return Err(SamlError::Malformed("it is not SAML 2.0"));
    }
    if root.attribute("InResponseTo") != Some(expected.request_id) {
        return Err(SamlError::Unsolicited);
    }
    if root
        .attribute("Destination")
        .is_some_and(|d| d != expected.sp.acs_url)
    {
        return Err(SamlError::WrongRecipient);
    }
    let status = child(root, NS_PROTOCOL, "Status")
        .and_then(|s| child(s, NS_PROTOCOL, "StatusCode"))
        .and_then(|c| c.attribute("Value"))
        .ok_or(SamlError::Malformed("it has no status"))?;
    if status != STATUS_SUCCESS {
        let word: String = status
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(64)
            .collect();
        return Err(SamlError::Status(word));
    }
    let issuer_of = |n: Node| child(n, NS_ASSERTION, "Issuer").and_then(text_of);
    if issuer_of(root).is_some_and(|i| i != expected.idp.entity_id)
        || issuer_of(assertion).as_deref() != Some(expected.idp.entity_id.as_str())
    {
        return Err(SamlError::WrongIssuer);
    }
    let assertion_id = assertion
        .attribute("ID")
        .ok_or(SamlError::Malformed("the assertion has no ID"))?
        .to_string();

    // The subject, and a bearer confirmation for this ACS, this request and now.
    let subject = child(assertion, NS_ASSERTION, "Subject").ok_or(SamlError::NoIdentity)?;
    let name_id_node = child(subject, NS_ASSERTION, "NameID").ok_or(SamlError::NoIdentity)?;
    let name_id = text_of(name_id_node)
        .filter(|s| !s.is_empty())
        .ok_or(SamlError::NoIdentity)?;
    let mut confirmation: Result<i64, SamlError> = Err(SamlError::Malformed(
        "it has no bearer subject confirmation",
    ));
    for sc in children(subject, NS_ASSERTION, "SubjectConfirmation") {
        if sc.attribute("Method") != Some(BEARER) {
            continue;
        }
        let checked = (|| {
            let data = child(sc, NS_ASSERTION, "SubjectConfirmationData")
                .ok_or(SamlError::Malformed("a confirmation has no data"))?;
            if data.attribute("Recipient") != Some(expected.sp.acs_url.as_str()) {
                return Err(SamlError::WrongRecipient);
            }
            // Signed even when only the assertion is: it binds the assertion to this request.
            if data.attribute("InResponseTo") != Some(expected.request_id) {
                return Err(SamlError::Unsolicited);
            }
            let until = instant(data.attribute("NotOnOrAfter"))?
                .ok_or(SamlError::Malformed("a confirmation has no NotOnOrAfter"))?;
            in_window(expected, instant(data.attribute("NotBefore"))?, Some(until))?;
            Ok(until)
        })();
        if checked.is_ok() || confirmation.is_err() {
            confirmation = checked;
        }
        if confirmation.is_ok() {
            break;
        }
    }
    let mut valid_until = confirmation?;

    let conditions = child(assertion, NS_ASSERTION, "Conditions")
        .ok_or(SamlError::Malformed("the assertion has no conditions"))?;
    let not_on_or_after = instant(conditions.attribute("NotOnOrAfter"))?;
    in_window(
        expected,
        instant(conditions.attribute("NotBefore"))?,
        not_on_or_after,
    )?;
    if let Some(t) = not_on_or_after {
        valid_until = valid_until.min(t);
    }
    let restrictions: Vec<Node> =
        children(conditions, NS_ASSERTION, "AudienceRestriction").collect();
    if restrictions.is_empty()
        || !restrictions.iter().all(|r| {
            children(*r, NS_ASSERTION, "Audience")
                .any(|a| text_of(a).as_deref() == Some(expected.sp.entity_id.as_str()))
        })
    {
        return Err(SamlError::WrongAudience);
    }
    let authn = child(assertion, NS_ASSERTION, "AuthnStatement").ok_or(SamlError::Malformed(
        "the assertion has no authentication statement",
    ))?;
    in_window(
        expected,
        None,
        instant(authn.attribute("SessionNotOnOrAfter"))?,
    )?;

    let email = email_of(assertion, name_id_node, &name_id, expected.idp);
    Ok(Identity {
        assertion_id,
        name_id,
        email,
        valid_until: valid_until + expected.skew,
    })
}

/// The e-mail address: the configured attribute; else an e-mail NameID; else a common e-mail
/// attribute. Lower-case; `None` when none looks like an address.
fn email_of(assertion: Node, name_id_node: Node, name_id: &str, idp: &SamlIdp) -> Option<String> {
    let values = |wanted: &dyn Fn(&str) -> bool| -> Option<String> {
        children(assertion, NS_ASSERTION, "AttributeStatement")
            .flat_map(|s| children(s, NS_ASSERTION, "Attribute"))
            .filter(|a| {
                a.attribute("Name").is_some_and(wanted)
                    || a.attribute("FriendlyName").is_some_and(wanted)
            })
            .flat_map(|a| children(a, NS_ASSERTION, "AttributeValue"))
            .find_map(text_of)
    };
    let found = match &idp.email_attribute {
        Some(name) => values(&|n| n == name),
        None if name_id_node.attribute("Format") == Some(NAMEID_EMAIL) => Some(name_id.to_string()),
        None => values(&|n| EMAIL_ATTRIBUTES.iter().any(|e| n.eq_ignore_ascii_case(e))),
    };
    found
        .map(|e| e.trim().to_lowercase())
        .filter(|e| e.contains('@'))
}

#[cfg(test)]
mod tests;
