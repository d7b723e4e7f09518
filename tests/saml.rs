//! SAML 2.0 sign-in against a real identity provider: Keycloak 26 (its distribution from Maven
//! Central, `tests/common/keycloak.rs`), in front of a real fhirgate and the real FHIR
//! upstream.
//!
//! - In chromium (`tests/browser/saml.mjs`): fhirgate's sign-in page, its single sign-on form
//!   (the IdP of the e-mail domain, imported from Keycloak's metadata XML) and its "Sign in with
//!   <IdP>" button (the client's own IdP, given field by field), Keycloak's own login page,
//!   Keycloak's POST back to fhirgate's assertion consumer service, consent, the code, and
//!   tokens that read through the gateway.
//! - Over HTTP, each attack on the assertion consumer service with a response Keycloak really
//!   signed: tampered, unsigned, wrapped, replayed, meant for another service provider, expired;
//!   and a person the IdP knows but fhirgate does not. Each is refused with its reason and no
//!   sign-in follows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::{TestGateway, free_port};
use common::http::rt;
use common::keycloak::{SamlClient, SamlPost, keycloak};
use common::page::{Browser, Page, unescape};
use common::people::{Seeded, UserSeed, seed, seed_client, super_admin_token, token_request};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

const DOMAIN: &str = "stthomas.example";
const MARY: &str = "mary.seacole@stthomas.example";
const MARY_PASSWORD: &str = "Crimean-Lantern-1855-Kettle";
const FLORENCE: &str = "florence@stthomas.example";
const FLORENCE_PASSWORD: &str = "Scutari-Lamp-Statistics-1854";

struct Env {
    _upstream: FhirUpstream,
    gw: TestGateway,
    /// The app's client id and redirect URI (a local port the browser script listens on).
    client: String,
    redirect_uri: String,
    port: u16,
    mary: Seeded,
}

fn sp_entity_id(gw: &TestGateway) -> String {
    format!("{}auth/saml/metadata", gw.base)
}

fn acs_url(gw: &TestGateway) -> String {
    format!("{}auth/saml/acs", gw.base)
}

/// A fhirgate whose domain `stthomas.example` signs in through Keycloak (the IdP's metadata
/// XML imported as it is), Keycloak knowing this fhirgate as a SAML client, Mary a member of
/// the default project, and an app of that project.
fn env(clock_skew: &str) -> Env {
    let upstream = FhirUpstream::start();
    let skew = clock_skew.to_string();
    let gw = TestGateway::start_with(&upstream.base_url, move |f| {
        f.saml_clock_skew = Some(skew);
    });
    let kc = keycloak();
    let mut mary = UserSeed::new(MARY, "an unused local password 4711");
    mary.first_name = "Mary".into();
    mary.last_name = "Seacole".into();
    let mary = seed(&gw, &mary);
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let (client, _) = seed_client(
        &gw,
        Some(&mary.project_id),
        json!({"name": "Ward App", "redirectUris": [redirect_uri]}),
        None,
    );
    rt().block_on(async {
        kc.add_saml_client(&SamlClient::new(&sp_entity_id(&gw), &acs_url(&gw)))
            .await;
        let sa = super_admin_token(&gw).await;
        let (status, body) = post_domain(
            &gw,
            &sa,
            &json!({
                "resourceType": "DomainConfiguration",
                "domain": DOMAIN,
                "identityProvider": {"saml": {
                    "metadata": kc.metadata_xml().await,
                    "name": "St Thomas' Hospital",
                }},
            }),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    });
    Env {
        _upstream: upstream,
        gw,
        client,
        redirect_uri,
        port,
        mary,
    }
}

/// `POST DomainConfiguration` through the gateway, as a super admin.
async fn post_domain(gw: &TestGateway, token: &str, body: &Value) -> (u16, Value) {
    let resp = TestGateway::client()
        .post(format!("{}DomainConfiguration", gw.fhir))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// An authorization request of `client` with a fresh PKCE pair; returns (URL, verifier).
fn authorize_url(gw: &TestGateway, client: &str, redirect_uri: &str) -> (String, String) {
    common::people::authorize_url(gw, client, redirect_uri, "openid profile", "saml")
}

/// The code for tokens, and the tokens at work: `/auth/me` and a read of the profile through
/// the gateway.
async fn tokens_work(env: &Env, client: &str, code: &str, verifier: &str, profile: &str) {
    let (status, tokens) = token_request(
        &env.gw,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("client_id", client),
            ("redirect_uri", &env.redirect_uri),
        ],
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["profile"]["reference"], profile, "{tokens}");
    let token = tokens["access_token"].as_str().unwrap();
    let c = TestGateway::client();
    let me: Value = c
        .get(format!("{}auth/me", env.gw.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["membership"]["profile"]["reference"], profile, "{me}");
    let read = c
        .get(format!("{}{profile}", env.gw.fhir))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let body: Value = read.json().await.unwrap();
    assert_eq!(
        format!("Practitioner/{}", body["id"].as_str().unwrap()),
        profile
    );
}

fn run_browser(name: &str, input: Value) -> Value {
    let run = common::browser::run_script("saml.mjs", name, &["playwright-core"], input);
    let result = run.output;
    assert!(
        result.get("failure").is_none(),
        "the browser flow failed: {}\npages: {}\n{}",
        result["failure"],
        result["pages"],
        run.stderr
    );
    assert!(run.success, "{result}\n{}", run.stderr);
    result
}

#[test]
fn people_sign_in_through_keycloak_in_chromium() {
    let env = env("1m");
    let kc = keycloak();

    // The e-mail domain's IdP, through the page's single sign-on form.
    let (url, verifier) = authorize_url(&env.gw, &env.client, &env.redirect_uri);
    let result = run_browser(
        "browser-saml-domain",
        json!({"authorizeUrl": url, "email": MARY, "username": MARY,
               "password": MARY_PASSWORD, "callbackPort": env.port}),
    );
    assert_eq!(
        result["pages"],
        json!(["Sign in", "Allow access"]),
        "{result}"
    );
    let idp_url = result["idpUrl"].as_str().unwrap();
    assert!(idp_url.starts_with(&kc.realm_url()), "{idp_url}");
    assert_eq!(result["callback"]["state"], "saml-state");
    let code = result["callback"]["code"].as_str().unwrap();
    rt().block_on(tokens_work(
        &env,
        &env.client,
        code,
        &verifier,
        &env.mary.profile,
    ));

    // An app with an IdP of its own, given field by field (the certificate as the metadata
    // carries it): the page's "Sign in with <IdP>" button. Florence is that app's user.
    let metadata = rt().block_on(kc.metadata_xml());
    let cert = metadata
        .split("X509Certificate>")
        .nth(1)
        .unwrap()
        .trim_end_matches("</ds:")
        .trim_end_matches("</dsig:")
        .trim_end_matches('<')
        .to_string();
    let mut florence = UserSeed::new(FLORENCE, "an unused local password 1820");
    florence.first_name = "Florence".into();
    florence.last_name = "Nightingale".into();
    let florence = seed(&env.gw, &florence);
    let (lab_client, _) = seed_client(
        &env.gw,
        Some(&florence.project_id),
        json!({"name": "Lamp App", "redirectUris": [env.redirect_uri],
               "identityProvider": {"saml": {
                   "entityId": kc.realm_url(), "ssoUrl": kc.sso_url(), "certificate": cert,
                   "name": "St Thomas Lamp"}}}),
        None,
    );
    let (url, verifier) = authorize_url(&env.gw, &lab_client, &env.redirect_uri);
    let result = run_browser(
        "browser-saml-client",
        json!({"authorizeUrl": url, "idpButton": "Sign in with St Thomas Lamp",
               "username": FLORENCE, "password": FLORENCE_PASSWORD, "callbackPort": env.port}),
    );
    assert_eq!(
        result["pages"],
        json!(["Sign in", "Allow access"]),
        "{result}"
    );
    let code = result["callback"]["code"].as_str().unwrap();
    rt().block_on(tokens_work(
        &env,
        &lab_client,
        code,
        &verifier,
        &florence.profile,
    ));
}

/// A sign-in started on the page over HTTP, up to the IdP: the browser (its CSRF cookie) and
/// the URL fhirgate sends it to.
async fn start_sso(env: &Env, email: &str) -> (Browser, String) {
    let (url, _) = authorize_url(&env.gw, &env.client, &env.redirect_uri);
    let mut browser = Browser::new(&env.gw.base, &env.redirect_uri);
    let page = browser.get(&url).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let mut fields = page.form("sso-form");
    fields.push(("email".into(), email.into()));
    let next = browser.post(&fields).await;
    assert_eq!(next.status, 200, "{}", next.body);
    let href = next
        .body
        .split(r#"id="continue" href=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no way to the IdP in {}", next.body));
    (browser, unescape(href))
}

/// The RelayState of fhirgate's redirect to the IdP: the id of its AuthnRequest.
fn request_id_of(idp_url: &str) -> String {
    url::Url::parse(idp_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "RelayState")
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

/// Posts a Response to the ACS as the IdP's page would (no cookies: a cross-site post).
async fn post_to_acs(env: &Env, fields: &[(String, String)]) -> (u16, Option<String>, String) {
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(acs_url(&env.gw))
        .form(fields)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (status, location, resp.text().await.unwrap())
}

/// A refusal page: 403 and this reason, and nothing to carry on with.
fn assert_refused(answer: &(u16, Option<String>, String), reason: &str) {
    let (status, location, body) = answer;
    assert_eq!(*status, 403, "{body}");
    assert!(location.is_none(), "{location:?}");
    assert!(
        unescape(body).contains(reason),
        "wanted {reason:?} in {body}"
    );
}

/// The byte ranges of every XML-Signature element of `xml`.
fn signature_ranges(xml: &str) -> Vec<std::ops::Range<usize>> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    doc.descendants()
        .filter(|n| {
            n.tag_name().name() == "Signature"
                && n.tag_name().namespace() == Some("http://www.w3.org/2000/09/xmldsig#")
        })
        .map(|n| n.range())
        .collect()
}

/// The byte range of the Assertion element of `xml`.
fn assertion_range(xml: &str) -> std::ops::Range<usize> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    doc.descendants()
        .find(|n| n.tag_name().name() == "Assertion")
        .unwrap()
        .range()
}

/// Mary's genuine Response to a fresh sign-in of `browser`'s.
async fn genuine(env: &Env) -> (Browser, SamlPost) {
    let (browser, idp_url) = start_sso(env, MARY).await;
    let post = keycloak().sign_in(&idp_url, MARY, MARY_PASSWORD).await;
    assert_eq!(post.action, acs_url(&env.gw));
    assert_eq!(
        post.relay_state.as_deref(),
        Some(request_id_of(&idp_url).as_str())
    );
    (browser, post)
}

/// The sign-in goes on, in the browser that started it, to the consent page.
async fn signed_in(browser: &mut Browser, answer: &(u16, Option<String>, String)) -> Page {
    assert_eq!(answer.0, 303, "{}", answer.2);
    let next = answer.1.as_deref().unwrap();
    assert!(next.contains("step=saml"), "{next}");
    let page = browser.get(next).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.title(), "Allow access");
    page
}

#[test]
fn attacks_on_the_assertion_consumer_service_are_refused() {
    // A clock skew of 1 s, so that a response can expire within the test.
    let env = env("1s");
    let kc = keycloak();
    rt().block_on(async {
        // Genuine, for comparison: accepted once, and then never again.
        let (mut browser, post) = genuine(&env).await;
        let xml = post.xml();
        assert_eq!(signature_ranges(&xml).len(), 2, "Keycloak signs the response and the assertion: {xml}");
        let first = post_to_acs(&env, &post.form()).await;
        signed_in(&mut browser, &first).await;
        let replayed = post_to_acs(&env, &post.form()).await;
        assert_refused(&replayed, "does not answer a sign-in started here");

        // Another browser cannot carry on with the Login the first one started.
        let mut stranger = Browser::new(&env.gw.base, &env.redirect_uri);
        let (url, _) = authorize_url(&env.gw, &env.client, &env.redirect_uri);
        stranger.get(&url).await;
        let stolen = stranger.get(first.1.as_deref().unwrap()).await;
        assert_eq!(stolen.status, 403, "{}", stolen.body);

        // Tampered: Mary's signed response made to name Florence.
        let (_, post) = genuine(&env).await;
        let tampered = post.xml().replace(MARY, FLORENCE);
        assert_ne!(tampered, post.xml());
        let answer = post_to_acs(&env, &post.form_with_xml(&tampered)).await;
        assert_refused(&answer, "signature does not verify");

        // Declared in UTF-7, where libxml2 (in xmlsec1) would see markup this parser does not.
        let (_, post) = genuine(&env).await;
        let utf7 = format!("<?xml version=\"1.0\" encoding=\"UTF-7\"?>{}", post.xml());
        let answer = post_to_acs(&env, &post.form_with_xml(&utf7)).await;
        assert_refused(&answer, "XML declaration is not accepted");

        // Unsigned: every signature taken out.
        let (_, post) = genuine(&env).await;
        let mut unsigned = post.xml();
        for r in signature_ranges(&unsigned).into_iter().rev() {
            unsigned.replace_range(r, "");
        }
        let answer = post_to_acs(&env, &post.form_with_xml(&unsigned)).await;
        assert_refused(&answer, "is not signed");

        // Signature wrapping: the signed assertion hidden in Extensions, a forged one in its
        // place (so a reader that takes the first assertion would see Florence).
        let (_, post) = genuine(&env).await;
        let xml = post.xml();
        let range = assertion_range(&xml);
        let original = xml[range.clone()].to_string();
        let forged = {
            // The assertion without its signature (whose range lies inside the assertion's).
            let mut f = original.clone();
            for r in signature_ranges(&xml).into_iter().rev() {
                if r.start >= range.start && r.end <= range.end {
                    f.replace_range(r.start - range.start..r.end - range.start, "");
                }
            }
            f.replace(MARY, FLORENCE).replacen(" ID=\"", " ID=\"forged", 1)
        };
        let mut wrapped = xml.clone();
        wrapped.replace_range(
            range,
            &format!("{forged}<samlp:Extensions xmlns:samlp=\"urn:oasis:names:tc:SAML:2.0:protocol\">{original}</samlp:Extensions>"),
        );
        let answer = post_to_acs(&env, &post.form_with_xml(&wrapped)).await;
        assert_refused(&answer, "more than one assertion");

        // Meant for another service provider of the same IdP: Keycloak signs an assertion
        // for `urn:fhirgate-test:other-sp` answering fhirgate's own request id.
        let other = format!("urn:fhirgate-test:other-sp:{}", env.gw.base);
        kc.add_saml_client(&SamlClient::new(&other, &acs_url(&env.gw))).await;
        let (_, idp_url) = start_sso(&env, MARY).await;
        let request_id = request_id_of(&idp_url);
        let foreign_url = kc.authn_request_url(&request_id, &other, &acs_url(&env.gw), Some(&request_id));
        let post = kc.sign_in(&foreign_url, MARY, MARY_PASSWORD).await;
        assert!(post.xml().contains(&other), "{}", post.xml());
        let answer = post_to_acs(&env, &post.form()).await;
        assert_refused(&answer, "meant for another service provider");

        // A person Keycloak knows and fhirgate does not.
        let (_, idp_url) = start_sso(&env, FLORENCE).await;
        let post = kc.sign_in(&idp_url, FLORENCE, FLORENCE_PASSWORD).await;
        let answer = post_to_acs(&env, &post.form()).await;
        assert_refused(&answer, "no account of this application is yours");

        // Florence, once she has a membership and an authenticator: after the IdP, her own
        // second factor is asked for, as after a password.
        let mut florence = UserSeed::new(FLORENCE, "an unused local password 1820");
        florence.mfa_secret = Some("KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU".into());
        seed(&env.gw, &florence);
        let (mut browser, idp_url) = start_sso(&env, FLORENCE).await;
        let post = kc.sign_in(&idp_url, FLORENCE, FLORENCE_PASSWORD).await;
        let answer = post_to_acs(&env, &post.form()).await;
        assert_eq!(answer.0, 303, "{}", answer.2);
        let page = browser.get(answer.1.as_deref().unwrap()).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.title(), "Two-step verification");

        // Expired: assertions valid for 1 s, posted 3 s later.
        let mut short = SamlClient::new(&sp_entity_id(&env.gw), &acs_url(&env.gw));
        short.assertion_lifespan_secs = Some(1);
        kc.add_saml_client(&short).await;
        let (_, post) = genuine(&env).await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let answer = post_to_acs(&env, &post.form()).await;
        assert_refused(&answer, "has expired");

        // An SDK front end asking how this address signs in learns it is single sign-on
        // (and is sent nowhere it could not come back from).
        let (status, method) = env.gw.post("auth/method", None, &json!({"email": MARY})).await;
        assert_eq!(status, 200, "{method}");
        assert_eq!(method, json!({"domain": DOMAIN, "singleSignOn": "saml"}));

        // Bad input changes nothing and never fails the server.
        for junk in ["", "not base64!", "PHg+", "PD94bWwgdmVyc2lvbj0iMS4wIj8+PCFET0NUWVBFIHg+PHg+PC94Pg=="] {
            let answer = post_to_acs(&env, &[("SAMLResponse".into(), junk.into()), ("RelayState".into(), "x".into())]).await;
            assert_eq!(answer.0, 403, "{junk}: {}", answer.2);
        }
    });
}

#[test]
fn the_sp_publishes_its_metadata_and_idp_settings_are_checked() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let resp = TestGateway::client()
            .get(format!("{}auth/saml/metadata", gw.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/samlmetadata+xml");
        let xml = resp.text().await.unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("entityID"), Some(sp_entity_id(&gw).as_str()));
        let acs = doc
            .descendants()
            .find(|n| n.tag_name().name() == "AssertionConsumerService")
            .unwrap();
        assert_eq!(acs.attribute("Location"), Some(acs_url(&gw).as_str()));
        let sp = doc
            .descendants()
            .find(|n| n.tag_name().name() == "SPSSODescriptor")
            .unwrap();
        assert_eq!(sp.attribute("WantAssertionsSigned"), Some("true"));

        let sa = super_admin_token(&gw).await;
        let config = |saml: Value| {
            json!({"resourceType": "DomainConfiguration", "domain": "bad.example",
                   "identityProvider": {"saml": saml}})
        };
        for (saml, reason) in [
            (
                json!({"entityId": "https://idp.example", "ssoUrl": "https://idp.example/sso"}),
                "needs a signing certificate",
            ),
            (
                json!({"metadata": "<md:EntityDescriptor xmlns:md=\"urn:oasis:names:tc:SAML:2.0:metadata\" entityID=\"x\"/>"}),
                "no IDPSSODescriptor",
            ),
            (json!({"metadata": "<oops"}), "not valid XML"),
            (
                json!({"entityId": "x", "ssoUrl": "ftp://idp.example", "certificate": "AAAA"}),
                "http(s) URL",
            ),
        ] {
            let (status, body) = post_domain(&gw, &sa, &config(saml.clone())).await;
            assert_eq!(status, 400, "{body}");
            assert!(body.to_string().contains(reason), "{reason}: {body}");
            // The same settings on an app of a project are refused by its admin API too.
            let admin = gw.admin_token().await;
            let project = gw.running().bootstrap.default_project_id.clone();
            let (status, body) = gw
                .post(
                    &format!("admin/projects/{project}/client"),
                    Some(&admin),
                    &json!({"name": "App", "identityProvider": {"saml": saml}}),
                )
                .await;
            assert_eq!(status, 400, "{body}");
            assert!(body.to_string().contains(reason), "{reason}: {body}");
        }
    });
}
