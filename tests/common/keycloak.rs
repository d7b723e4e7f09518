//! A real Keycloak as the SAML 2.0 identity provider of fhirgate's SAML sign-in:
//! `tests/keycloak/dist` (Keycloak's distribution from Maven Central, unpacked and built for dev
//! mode by `scripts/setup`), run with `kc.sh start-dev` on an in-memory H2 database, importing
//! the realm `hospital` of `tests/keycloak/realm.json` (its users, no clients). Started once by
//! `scripts/test` for every test binary (`FHIRGATE_TEST_KEYCLOAK=<port>`), or else once per test
//! binary, on a free loopback port.
//!
//! The SAML clients (fhirgate as a service provider, whose entity id and ACS URL hold a random
//! port) are created by the tests through the admin REST API:
//!
//! ```ignore
//! let kc = common::keycloak::keycloak();
//! kc.add_saml_client(&SamlClient::new(&sp_entity_id, &acs_url)).await;
//! // fhirgate is configured with kc.metadata_url() (or kc.metadata_xml().await), and its sign-in
//! // answers with a redirect to Keycloak (HTTP-Redirect binding):
//! let post = kc.sign_in(&redirect, MARY_EMAIL, MARY_PASSWORD).await;
//! // post.action is the ACS URL; the test posts post.form() there itself.
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// The realm of `tests/keycloak/realm.json`.
pub const REALM: &str = "hospital";
/// Keycloak's bootstrap admin (realm `master`); `scripts/test` starts it with the same.
pub const ADMIN_USERNAME: &str = "admin";
pub const ADMIN_PASSWORD: &str = "fhirgate-keycloak-admin";

/// The users of the realm (username = e-mail address).
pub const MARY_EMAIL: &str = "mary.seacole@stthomas.example";
pub const MARY_PASSWORD: &str = "Crimean-Lantern-1855-Kettle";
pub const FLORENCE_EMAIL: &str = "florence@stthomas.example";
pub const FLORENCE_PASSWORD: &str = "Scutari-Lamp-Statistics-1854";

/// Keycloak starts in 13–15 s on the 2-core machines once `scripts/setup` has built it for dev
/// mode (30–40 s when it has to build itself first); much longer while cargo compiles.
const START_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `kc.sh` (its arguments after the log file and the transaction-log directory) in a process
/// group of its own and stops that whole group (TERM, then KILL after 20 s) once its stdin
/// closes, i.e. once the test binary holding the pipe exits, however it exits. Keycloak does not
/// watch stdin itself, and kc.sh runs java as a child (or execs it after a rebuild). When
/// Keycloak exits by itself, so does this script, leaving the log behind for the caller.
/// `scripts/test` runs the same script.
const WATCHDOG: &str = r#"
log="$1"
tx="$2"
shift 2
set -m
"$@" </dev/null >"$log" 2>&1 &
kc=$!
set +m
while kill -0 "$kc" 2>/dev/null; do
  read -r -t 1 _
  status=$?
  if ((status > 0 && status <= 128)); then
    kill -TERM -- -"$kc" 2>/dev/null
    for _ in $(seq 1 80); do
      kill -0 -- -"$kc" 2>/dev/null || break
      sleep 0.25
    done
    kill -KILL -- -"$kc" 2>/dev/null
    rm -rf "$log" "$tx"
    exit 0
  fi
done
exit 1
"#;

/// The running Keycloak. Never dropped: the watchdog stops it when the test binary exits.
pub struct Keycloak {
    port: u16,
    /// `None` when the server was started by the test command for every binary
    /// (`FHIRGATE_TEST_KEYCLOAK`).
    _child: Option<(Mutex<Child>, Mutex<ChildStdin>)>,
}

/// A SAML client of the realm: one service provider as Keycloak knows it.
#[derive(Clone, Debug)]
pub struct SamlClient {
    /// The SP's entity id: Keycloak's `clientId`, the `Issuer` its AuthnRequests must carry and
    /// the `Audience` of the assertions it gets.
    pub entity_id: String,
    /// The SP's assertion consumer service (HTTP-POST binding); the only one Keycloak accepts.
    pub acs_url: String,
    /// `saml.assertion.signature`: the `Assertion` carries a signature.
    pub sign_assertions: bool,
    /// `saml.server.signature`: the `Response` (the document) carries a signature.
    pub sign_documents: bool,
    /// `saml.assertion.lifespan`; Keycloak's default (`None`) gives the `Conditions` a window of
    /// the realm's access code lifespan, 60 s.
    pub assertion_lifespan_secs: Option<u32>,
}

impl SamlClient {
    /// Both the response and the assertion signed, Keycloak's default lifespan.
    pub fn new(entity_id: &str, acs_url: &str) -> SamlClient {
        SamlClient {
            entity_id: entity_id.to_string(),
            acs_url: acs_url.to_string(),
            sign_assertions: true,
            sign_documents: true,
            assertion_lifespan_secs: None,
        }
    }

    /// The client representation of the admin REST API, with `extra` attributes on top.
    fn representation(&self, extra: &[(&str, &str)]) -> Value {
        let flag = |b: bool| if b { "true" } else { "false" };
        let mut attributes = serde_json::Map::new();
        let mut set = |k: &str, v: &str| {
            attributes.insert(k.to_string(), Value::String(v.to_string()));
        };
        set("saml_assertion_consumer_url_post", &self.acs_url);
        set("saml.assertion.signature", flag(self.sign_assertions));
        set("saml.server.signature", flag(self.sign_documents));
        // The SP does not sign its AuthnRequests (the realm's metadata still says
        // WantAuthnRequestsSigned="true": that is the realm's, this is per client).
        set("saml.client.signature", "false");
        set("saml.signature.algorithm", "RSA_SHA256");
        set(
            "saml_signature_canonicalization_method",
            "http://www.w3.org/2001/10/xml-exc-c14n#",
        );
        set("saml_force_name_id_format", "true");
        set("saml_name_id_format", "email");
        set("saml.encrypt", "false");
        set("saml.force.post.binding", "true");
        set("saml.authnstatement", "true");
        if let Some(secs) = self.assertion_lifespan_secs {
            set("saml.assertion.lifespan", &secs.to_string());
        }
        for (k, v) in extra {
            set(k, v);
        }
        json!({
            "clientId": self.entity_id,
            "name": self.entity_id,
            "protocol": "saml",
            "enabled": true,
            "frontchannelLogout": true,
            "redirectUris": [self.acs_url],
            "attributes": attributes,
            "protocolMappers": [
                user_property_mapper("email", "email", "email"),
                user_property_mapper("firstName", "firstName", "givenName"),
                user_property_mapper("lastName", "lastName", "surname"),
            ],
        })
    }
}

/// A mapper putting a user property (`email`, `firstName`, `lastName`, `username`) into the
/// assertion's AttributeStatement as attribute `name` (NameFormat basic) with this FriendlyName.
fn user_property_mapper(property: &str, name: &str, friendly_name: &str) -> Value {
    json!({
        "name": format!("{property} as {name}"),
        "protocol": "saml",
        "protocolMapper": "saml-user-property-mapper",
        "consentRequired": false,
        "config": {
            "user.attribute": property,
            "attribute.name": name,
            "friendly.name": friendly_name,
            "attribute.nameformat": "Basic",
        },
    })
}

/// Keycloak's answer to a sign-in: the auto-submitting HTTP-POST binding form it hands the
/// browser, not posted anywhere.
#[derive(Clone, Debug)]
pub struct SamlPost {
    /// The form's `action`: the ACS URL Keycloak answers to.
    pub action: String,
    /// `SAMLResponse`, base64 as Keycloak sent it (HTML entities undone).
    pub saml_response: String,
    pub relay_state: Option<String>,
}

impl SamlPost {
    /// The decoded `SAMLResponse` (the `samlp:Response` XML).
    pub fn xml(&self) -> String {
        let compact: String = self
            .saml_response
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let bytes = STANDARD
            .decode(compact.as_bytes())
            .expect("SAMLResponse is base64");
        String::from_utf8(bytes).expect("SAMLResponse is UTF-8")
    }

    /// The form fields a browser would post to `action`.
    pub fn form(&self) -> Vec<(String, String)> {
        let mut fields = vec![("SAMLResponse".to_string(), self.saml_response.clone())];
        if let Some(relay_state) = &self.relay_state {
            fields.push(("RelayState".to_string(), relay_state.clone()));
        }
        fields
    }

    /// The same fields with another (e.g. tampered) response XML, base64-encoded.
    pub fn form_with_xml(&self, xml: &str) -> Vec<(String, String)> {
        let mut fields = vec![("SAMLResponse".to_string(), STANDARD.encode(xml.as_bytes()))];
        if let Some(relay_state) = &self.relay_state {
            fields.push(("RelayState".to_string(), relay_state.clone()));
        }
        fields
    }
}

fn dist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keycloak/dist")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `--import-realm` reads `<dist>/data/import/*.json`; `scripts/setup` links the realm file
/// there. Linked again here when missing (a dist unpacked by hand).
fn ensure_realm_import(dist: &Path) {
    let import = dist.join("data/import");
    let link = import.join("hospital-realm.json");
    if link.exists() {
        return;
    }
    std::fs::create_dir_all(&import).expect("create <dist>/data/import");
    let _ = std::fs::remove_file(&link);
    if let Err(e) = std::os::unix::fs::symlink("../../../realm.json", &link) {
        // Another test binary may have linked it meanwhile.
        assert!(link.exists(), "cannot link {}: {e}", link.display());
    }
}

/// The last lines of Keycloak's log, for a failure message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn start() -> Keycloak {
    static ATTEMPT: AtomicU32 = AtomicU32::new(0);
    let dist = dist();
    let kc_sh = dist.join("bin/kc.sh");
    assert!(
        kc_sh.is_file(),
        "{} is missing: run scripts/setup (it unpacks Keycloak into tests/keycloak/dist)",
        kc_sh.display()
    );
    ensure_realm_import(&dist);
    let mut last_error = String::new();
    // The port is free when chosen but may be taken before Keycloak binds it: try again.
    for _ in 0..3 {
        let port = free_port();
        let n = ATTEMPT.fetch_add(1, Ordering::Relaxed);
        let tmp = std::env::temp_dir();
        let log = tmp.join(format!("fhirgate-keycloak-{}-{n}.log", std::process::id()));
        let tx = tmp.join(format!("fhirgate-keycloak-{}-{n}.tx", std::process::id()));
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("keycloak-watchdog")
            .arg(&log)
            .arg(&tx)
            .arg(&kc_sh)
            .arg("start-dev")
            // The one build option: the same as scripts/setup's build, or kc.sh rebuilds.
            .arg("--db=dev-mem")
            .arg("--http-host=127.0.0.1")
            .arg(format!("--http-port={port}"))
            // The issuer and every URL Keycloak writes name this origin, whatever Host a
            // request comes with.
            .arg(format!("--hostname=http://127.0.0.1:{port}"))
            .arg("--import-realm")
            // Narayana's object store, else <dist>/data/transaction-logs, shared by every
            // Keycloak of this dist.
            .arg(format!(
                "-Dquarkus.transaction-manager.object-store.directory={}",
                tx.display()
            ))
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USERNAME)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("JAVA_OPTS_KC_HEAP", "-Xms64m -Xmx512m")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run bash for {}: {e}", kc_sh.display()));
        let stdin = child.stdin.take().expect("stdin");
        match wait_started(port, &mut child, &log) {
            Ok(()) => {
                return Keycloak {
                    port,
                    _child: Some((Mutex::new(child), Mutex::new(stdin))),
                };
            }
            Err(e) => {
                // Closing the pipe stops Keycloak, if it still runs.
                drop(stdin);
                let _ = child.wait();
                let _ = std::fs::remove_file(&log);
                let _ = std::fs::remove_dir_all(&tx);
                let port_taken = e.contains("already in use") || e.contains("Address in use");
                last_error = e;
                if !port_taken {
                    break;
                }
            }
        }
    }
    panic!("Keycloak did not start: {last_error}");
}

/// Waits until the realm answers, or Keycloak exits, or the start timeout passes.
fn wait_started(port: u16, child: &mut Child, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if realm_answers(port) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "kc.sh exited ({status}); its log ends with:\n{}",
                log_tail(log)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no answer from http://127.0.0.1:{port}/realms/{REALM} within \
                 {START_TIMEOUT:?}; its log ends with:\n{}",
                log_tail(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether the realm's OpenID configuration answers 200 (the realm is imported once it does).
/// Blocking, without a runtime: the first test to need Keycloak may be inside one.
fn realm_answers(port: u16) -> bool {
    super::upstream::http_request(
        &format!("127.0.0.1:{port}"),
        "GET",
        &format!("/realms/{REALM}/.well-known/openid-configuration"),
        &[("Accept", "application/json")],
        None,
    )
    .is_ok_and(|r| r.status == 200)
}

/// The Keycloak `scripts/test` started for all test binaries (`FHIRGATE_TEST_KEYCLOAK=<port>`),
/// or one of this binary's own, started on first use (blocking, up to a few minutes). Tests
/// sharing it keep apart by their SAML clients' entity ids.
pub fn keycloak() -> &'static Keycloak {
    static KEYCLOAK: OnceLock<Keycloak> = OnceLock::new();
    KEYCLOAK.get_or_init(|| match std::env::var("FHIRGATE_TEST_KEYCLOAK") {
        Ok(port) => {
            let port: u16 = port
                .parse()
                .unwrap_or_else(|_| panic!("FHIRGATE_TEST_KEYCLOAK={port:?} is not a port"));
            let deadline = Instant::now() + START_TIMEOUT;
            while !realm_answers(port) {
                assert!(
                    Instant::now() < deadline,
                    "Keycloak (FHIRGATE_TEST_KEYCLOAK={port}) does not answer \
                     http://127.0.0.1:{port}/realms/{REALM}"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            Keycloak { port, _child: None }
        }
        Err(_) => start(),
    })
}

/// A client that follows no redirects (each hop is read, its cookies kept).
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a reqwest client")
}

impl Keycloak {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `{base}/realms/hospital`: also the IdP's entity id, the `Issuer` of its responses.
    pub fn realm_url(&self) -> String {
        format!("{}/realms/{REALM}", self.base_url())
    }

    /// The realm's SAML IdP metadata (an `md:EntityDescriptor`, unsigned).
    pub fn metadata_url(&self) -> String {
        format!("{}/protocol/saml/descriptor", self.realm_url())
    }

    /// The realm's SAML endpoint: single sign-on (every binding) and single logout.
    pub fn sso_url(&self) -> String {
        format!("{}/protocol/saml", self.realm_url())
    }

    pub async fn metadata_xml(&self) -> String {
        let resp = http()
            .get(self.metadata_url())
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.metadata_url()));
        let status = resp.status();
        let text = resp.text().await.expect("the metadata is read");
        assert!(
            status.is_success(),
            "GET {}: {status}: {text}",
            self.metadata_url()
        );
        text
    }

    /// An access token of the bootstrap admin for the admin REST API (lives 60 s).
    pub async fn admin_token(&self) -> String {
        let url = format!(
            "{}/realms/master/protocol/openid-connect/token",
            self.base_url()
        );
        let resp = http()
            .post(&url)
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", ADMIN_USERNAME),
                ("password", ADMIN_PASSWORD),
            ])
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status();
        let body: Value = resp.json().await.expect("the token response is JSON");
        assert!(status.is_success(), "POST {url}: {status}: {body}");
        body["access_token"]
            .as_str()
            .expect("an access_token")
            .to_string()
    }

    /// A request to the admin REST API of the realm: `path` is below
    /// `{base}/admin/realms/hospital` (e.g. `/clients`). Returns (status, body as JSON; a
    /// body that is not JSON as a JSON string, an empty one as `Null`).
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let token = self.admin_token().await;
        self.admin_with(&token, method, path, body).await
    }

    async fn admin_with(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}/admin/realms/{REALM}{path}", self.base_url());
        let mut req = http().request(method.clone(), &url).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("the admin answer is read");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Creates the SAML client `client` (replacing one of the same entity id): the assertion's
    /// NameID is the user's e-mail (format emailAddress), its AttributeStatement has `email`,
    /// `firstName` (FriendlyName givenName) and `lastName` (FriendlyName surname), NameFormat
    /// basic. Two clients may share an ACS URL (a second entity id answering fhirgate's ACS,
    /// for a response meant for another audience).
    pub async fn add_saml_client(&self, client: &SamlClient) {
        self.add_saml_client_with(client, &[]).await;
    }

    /// `add_saml_client` with more (or other) client attributes, e.g.
    /// `("saml_name_id_format", "persistent")`.
    pub async fn add_saml_client_with(&self, client: &SamlClient, extra: &[(&str, &str)]) {
        let token = self.admin_token().await;
        let representation = client.representation(extra);
        let mut last = String::new();
        // Another test may create the same entity id between the delete and the create.
        for _ in 0..3 {
            self.remove_saml_client_with(&token, &client.entity_id)
                .await;
            let (status, body) = self
                .admin_with(
                    &token,
                    reqwest::Method::POST,
                    "/clients",
                    Some(&representation),
                )
                .await;
            if status == 201 {
                return;
            }
            last = format!("{status}: {body}");
            if status != 409 {
                break;
            }
        }
        panic!(
            "creating the SAML client {} in Keycloak: {last}",
            client.entity_id
        );
    }

    /// Deletes the client of this entity id, when there is one.
    pub async fn remove_saml_client(&self, entity_id: &str) {
        let token = self.admin_token().await;
        self.remove_saml_client_with(&token, entity_id).await;
    }

    async fn remove_saml_client_with(&self, token: &str, entity_id: &str) {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("clientId", entity_id)
            .finish();
        let (status, found) = self
            .admin_with(
                token,
                reqwest::Method::GET,
                &format!("/clients?{query}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "listing Keycloak's clients: {found}");
        for c in found.as_array().into_iter().flatten() {
            // The query is an exact match; checked anyway, a wrong delete would be confusing.
            if c["clientId"].as_str() != Some(entity_id) {
                continue;
            }
            let id = c["id"].as_str().expect("a client id");
            let (status, body) = self
                .admin_with(
                    token,
                    reqwest::Method::DELETE,
                    &format!("/clients/{id}"),
                    None,
                )
                .await;
            assert!(
                status == 204 || status == 404,
                "deleting Keycloak's client {entity_id}: {status}: {body}"
            );
        }
    }

    /// An HTTP-Redirect binding URL to the realm's SSO endpoint with an unsigned AuthnRequest
    /// built here (not by fhirgate): `ID` = `request_id`, `Issuer` = `issuer` (a client's entity
    /// id), asking for a POST to `acs_url` and an emailAddress NameID. For responses fhirgate
    /// did not ask for (another SP's audience, an unknown InResponseTo).
    pub fn authn_request_url(
        &self,
        request_id: &str,
        issuer: &str,
        acs_url: &str,
        relay_state: Option<&str>,
    ) -> String {
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns is valid")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("a formatted instant");
        let xml = format!(
            concat!(
                r#"<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" "#,
                r#"xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="{id}" Version="2.0" "#,
                r#"IssueInstant="{now}" Destination="{destination}" "#,
                r#"AssertionConsumerServiceURL="{acs}" "#,
                r#"ProtocolBinding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST">"#,
                r#"<saml:Issuer>{issuer}</saml:Issuer>"#,
                r#"<samlp:NameIDPolicy Format="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress" AllowCreate="true"/>"#,
                r#"</samlp:AuthnRequest>"#
            ),
            id = xml_escape(request_id),
            now = now,
            destination = xml_escape(&self.sso_url()),
            acs = xml_escape(acs_url),
            issuer = xml_escape(issuer),
        );
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("SAMLRequest", &STANDARD.encode(deflate(xml.as_bytes())));
        if let Some(relay_state) = relay_state {
            query.append_pair("RelayState", relay_state);
        }
        format!("{}?{}", self.sso_url(), query.finish())
    }

    /// Signs in at Keycloak as a browser would: follows `redirect_url` (fhirgate's redirect to
    /// the SSO endpoint, `SAMLRequest` and `RelayState` in the query), fills the login form with
    /// `username` and `password`, and returns the HTTP-POST binding form Keycloak answers with,
    /// without posting it. A fresh cookie jar each time, so Keycloak always asks for the
    /// password. Panics with Keycloak's page text when the page is anything else (a wrong
    /// password, a request Keycloak refused).
    pub async fn sign_in(&self, redirect_url: &str, username: &str, password: &str) -> SamlPost {
        let mut browser = Browser::default();
        let page = browser.get(redirect_url).await;
        if let Some(post) = saml_post(&page.body) {
            // An SSO session would answer at once; a fresh jar has none.
            return post;
        }
        let form = find_tag_with(&page.body, "form", |tag| {
            attribute(tag, "id").as_deref() == Some("kc-form-login")
        })
        .unwrap_or_else(|| {
            panic!(
                "Keycloak shows no login form at {} ({}): {}",
                page.url,
                page.status,
                page_text(&page.body)
            )
        });
        let action = attribute(form, "action").expect("the login form's action");
        let action = resolve(&page.url, &action);
        let page = browser
            .post(
                &action,
                &[
                    ("username", username),
                    ("password", password),
                    ("credentialId", ""),
                ],
            )
            .await;
        saml_post(&page.body).unwrap_or_else(|| {
            panic!(
                "Keycloak did not answer the sign-in of {username} with a SAML response \
                 ({}, {}): {}",
                page.url,
                page.status,
                page_text(&page.body)
            )
        })
    }
}

/// A page as the browser ended on it (after redirects).
struct Page {
    url: String,
    status: u16,
    body: String,
}

/// Cookies by name, sent to Keycloak on every request; their attributes are ignored (Keycloak
/// marks them `Secure; SameSite=None` even over http, which a real cookie store would keep from
/// an http origin).
#[derive(Default)]
struct Browser {
    cookies: Vec<(String, String)>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep_cookies(&mut self, resp: &reqwest::Response) {
        for value in resp.headers().get_all(reqwest::header::SET_COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            let mut parts = value.split(';');
            let Some((name, val)) = parts.next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            let name = name.trim().to_string();
            let val = val.trim().to_string();
            let expired = parts.any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p == "max-age=0" || p.starts_with("max-age=-")
            });
            self.cookies.retain(|(k, _)| *k != name);
            if !expired && !val.is_empty() {
                self.cookies.push((name, val));
            }
        }
    }

    async fn get(&mut self, url: &str) -> Page {
        self.send(reqwest::Method::GET, url.to_string(), None).await
    }

    async fn post(&mut self, url: &str, fields: &[(&str, &str)]) -> Page {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(reqwest::Method::POST, url.to_string(), Some(body))
            .await
    }

    /// Sends the request and follows redirects (as GETs), keeping cookies on every hop.
    async fn send(&mut self, method: reqwest::Method, url: String, body: Option<String>) -> Page {
        let client = http();
        let (mut method, mut url, mut body) = (method, url, body);
        for _ in 0..10 {
            let mut req = client.request(method.clone(), &url);
            if !self.cookies.is_empty() {
                req = req.header(reqwest::header::COOKIE, self.cookie_header());
            }
            if let Some(body) = body.take() {
                req = req
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body);
            }
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            self.keep_cookies(&resp);
            let status = resp.status().as_u16();
            if (300..400).contains(&status)
                && let Some(location) = resp.headers().get(reqwest::header::LOCATION)
            {
                let location = location.to_str().expect("an ASCII Location").to_string();
                url = resolve(&url, &location);
                method = reqwest::Method::GET;
                continue;
            }
            let text = resp.text().await.expect("Keycloak's page is read");
            return Page {
                url,
                status,
                body: text,
            };
        }
        panic!("more than 10 redirects, the last to {url}");
    }
}

/// `reference` resolved against `base`.
fn resolve(base: &str, reference: &str) -> String {
    url::Url::parse(base)
        .and_then(|b| b.join(reference))
        .map(|u| u.to_string())
        .unwrap_or_else(|e| panic!("cannot resolve {reference:?} against {base}: {e}"))
}

/// The HTTP-POST binding form in `html`: `<form … action="…">` with hidden inputs
/// `SAMLResponse` and (optionally) `RelayState`.
fn saml_post(html: &str) -> Option<SamlPost> {
    let mut saml_response = None;
    let mut relay_state = None;
    for tag in tags(html, "input") {
        match attribute(tag, "name").as_deref() {
            Some("SAMLResponse") => {
                // Where the input starts in `html` (a tag is a slice of it).
                let at = tag.as_ptr() as usize - html.as_ptr() as usize;
                saml_response = Some((at, attribute(tag, "value")?));
            }
            Some("RelayState") => relay_state = attribute(tag, "value"),
            _ => {}
        }
    }
    let (at, saml_response) = saml_response?;
    // The form around the inputs: the last <form> before the SAMLResponse input.
    let form = tags(&html[..at], "form").into_iter().last()?;
    let action = attribute(form, "action")?;
    Some(SamlPost {
        action,
        saml_response,
        relay_state,
    })
}

/// The start tags `<name …>` of `html` (the text between `<` and `>`, quotes respected).
fn tags<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let bytes = html.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(offset) = html[i..].find('<') {
        let start = i + offset;
        let after = start + 1 + name.len();
        let is_tag = html
            .get(start + 1..after)
            .is_some_and(|n| n.eq_ignore_ascii_case(name))
            && bytes
                .get(after)
                .is_some_and(|b| b.is_ascii_whitespace() || *b == b'>' || *b == b'/');
        if !is_tag {
            i = start + 1;
            continue;
        }
        // The tag ends at the first '>' outside quotes.
        let mut quote: Option<u8> = None;
        let mut end = None;
        for (j, &b) in bytes.iter().enumerate().skip(after) {
            match quote {
                Some(q) if b == q => quote = None,
                Some(_) => {}
                None if b == b'"' || b == b'\'' => quote = Some(b),
                None if b == b'>' => {
                    end = Some(j);
                    break;
                }
                None => {}
            }
        }
        let Some(end) = end else { break };
        found.push(&html[start..=end]);
        i = end + 1;
    }
    found
}

/// The first start tag `<name …>` for which `pred` holds.
fn find_tag_with<'a>(html: &'a str, name: &str, pred: impl Fn(&str) -> bool) -> Option<&'a str> {
    tags(html, name).into_iter().find(|&t| pred(t))
}

/// The value of attribute `name` of a start tag (HTML entities undone); `Some("")` for an
/// attribute without a value.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let inner = tag
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim_end_matches('/');
    let bytes = inner.as_bytes();
    // Skip the element name.
    let mut i = bytes
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    while i < bytes.len() {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
            i += 1;
        }
        let name_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let attr_name = &inner[name_start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < bytes.len() && (bytes[i] == b'"' || bytes[i] == b'\'') {
                let q = bytes[i];
                let value_start = i + 1;
                let value_end = inner[value_start..]
                    .find(q as char)
                    .map_or(inner.len(), |e| value_start + e);
                value = html_unescape(&inner[value_start..value_end]);
                i = (value_end + 1).min(bytes.len());
            } else {
                let value_start = i;
                while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                value = html_unescape(&inner[value_start..i]);
            }
        }
        if !attr_name.is_empty() && attr_name.eq_ignore_ascii_case(name) {
            return Some(value);
        }
        if attr_name.is_empty() && i < bytes.len() {
            i += 1;
        }
    }
    None
}

/// HTML character references undone: `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&#NN;`,
/// `&#xHH;` (others are left as they are).
pub fn html_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').filter(|&semi| semi <= 10).and_then(|semi| {
            let entity = &rest[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let code = if let Some(hex) = entity
                        .strip_prefix("#x")
                        .or_else(|| entity.strip_prefix("#X"))
                    {
                        u32::from_str_radix(hex, 16).ok()
                    } else if let Some(dec) = entity.strip_prefix('#') {
                        dec.parse().ok()
                    } else {
                        None
                    };
                    code.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The visible text of a page (scripts and styles dropped, tags removed, entities undone,
/// whitespace collapsed), at most 2,000 characters: what a failure message shows.
fn page_text(html: &str) -> String {
    let mut text = String::new();
    let mut rest = html;
    loop {
        let lower = rest.to_ascii_lowercase();
        let next = ["<script", "<style"]
            .iter()
            .filter_map(|open| lower.find(open).map(|at| (at, *open)))
            .min();
        match next {
            Some((at, open)) => {
                text.push_str(&rest[..at]);
                let close = format!("</{}>", &open[1..]);
                match lower[at..].find(&close) {
                    Some(end) => rest = &rest[at + end + close.len()..],
                    None => break,
                }
            }
            None => {
                text.push_str(rest);
                break;
            }
        }
    }
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                plain.push(' ');
            }
            _ if !in_tag => plain.push(c),
            _ => {}
        }
    }
    let words: Vec<String> = html_unescape(&plain)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    words.join(" ").chars().take(2000).collect()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Raw DEFLATE (RFC 1951), as the HTTP-Redirect binding wants it.
fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("deflate into memory");
    encoder.finish().expect("deflate into memory")
}
