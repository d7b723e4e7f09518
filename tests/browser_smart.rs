//! Browser apps in a real browser: Debian's chromium (JavaScript on), driven by
//! `tests/browser/smart.mjs`, runs a small app served on its own origin against a real fhirgate
//! in front of the real FHIR upstream. Every call the app makes to the gateway is cross-origin.
//!
//! - SMART's own library, `fhirclient` (npm), does a standalone launch with
//!   `launch/patient openid fhirUser patient/*.rs` as a public client (PKCE S256, no secret):
//!   the person signs in on fhirgate's page, consents, picks the patient, and the app reads that
//!   patient through the gateway; another patient stays out of reach;
//! - the same as a confidential client (its secret, sent by fhirclient as Basic);
//! - an EHR launch: the EHR's `$smart-launch` sends the browser to the app's launch URI with
//!   `iss` and `launch`; the patient in context comes from the EHR, no picker;
//! - the unmodified Medplum SDK (`@medplum/core`) signs in and searches.
//!
//! Needs `/usr/bin/chromium` and `tests/browser/node_modules` (both installed by
//! `scripts/setup`). Screenshots go to `target/test-output/browser-smart-*/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::{TestGateway, free_port};
use common::http::send;
use common::people::{UserSeed, jwt_header, seed, seed_client, unique_email};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

const PASSWORD: &str = "a long browser password";

/// Runs `tests/browser/smart.mjs` with `input` and returns what the app page reported, which
/// must not be an error.
fn run_app(name: &str, input: Value) -> Value {
    let packages = ["playwright-core", "fhirclient", "@medplum/core"];
    let shots = format!("browser-smart-{name}");
    let run = common::browser::run_script("smart.mjs", &shots, &packages, input);
    let out = run.output;
    assert!(
        out.get("failure").is_none(),
        "{name}: the browser flow failed: {}\npages: {}\nconsole: {}\n{}",
        out["failure"],
        out["pages"],
        out["console"],
        run.stderr
    );
    assert!(run.success, "{out}\n{}", run.stderr);
    let result = out["result"].clone();
    assert!(
        result.get("error").is_none(),
        "{name}: the app reported {}\nconsole: {}",
        result["error"],
        out["console"]
    );
    result
}

/// A gateway, a Practitioner who signs in, two patients, and the app's origin.
struct Setup {
    _upstream: FhirUpstream,
    gw: TestGateway,
    email: String,
    app_port: u16,
    family: String,
    patients: Vec<String>,
}

impl Setup {
    fn new() -> Setup {
        let upstream = FhirUpstream::start();
        let gw = TestGateway::start(&upstream.base_url);
        let email = unique_email("browser-smart");
        seed(&gw, &UserSeed::new(&email, PASSWORD));
        let family = format!("Smart{}", uuid::Uuid::new_v4().simple());
        let rt = common::http::rt();
        let patients = rt.block_on(async {
            let admin = gw.admin_token().await;
            let mut ids = Vec::new();
            for given in ["Ada", "Bo"] {
                let (s, p) = send(
                    TestGateway::client()
                        .post(format!("{}Patient", gw.fhir))
                        .bearer_auth(&admin)
                        .json(&json!({"resourceType": "Patient",
                                      "name": [{"family": family, "given": [given]}]})),
                )
                .await;
                assert_eq!(s, 201, "{p}");
                ids.push(p["id"].as_str().unwrap().to_string());
            }
            ids
        });
        Setup {
            _upstream: upstream,
            gw,
            email,
            app_port: free_port(),
            family,
            patients,
        }
    }

    fn app(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.app_port)
    }

    /// A SMART app registration: the app's redirect and launch URIs (whose origin CORS then
    /// admits by default); with `secret`, a confidential client, else a public one.
    fn register(&self, confidential: bool) -> (String, Option<String>) {
        let fields = json!({
            "name": "Browser SMART app",
            "redirectUris": [self.app("/index.html")],
            "launchUri": self.app("/launch.html"),
        });
        let (id, secret) = seed_client(&self.gw, None, fields, None);
        if confidential {
            return (id, Some(secret));
        }
        let c = id.clone();
        common::people::on_gateway(&self.gw, move |state| async move {
            state.store.set_client_secret(&c, None, None).await.unwrap();
            state.refresh().await.unwrap();
        });
        (id, None)
    }

    /// The app's launch page URL for a standalone launch.
    fn standalone(&self, client: &str, secret: Option<&str>, scope: &str) -> String {
        let mut u = url::Url::parse(&self.app("/launch.html")).unwrap();
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("iss", self.gw.fhir.trim_end_matches('/'));
            q.append_pair("client", client);
            q.append_pair("scope", scope);
            q.append_pair("other", &self.patients[0]);
            if let Some(s) = secret {
                q.append_pair("secret", s);
            }
        }
        u.to_string()
    }

    /// A standalone launch of the app in the browser: the person signs in, consents, and picks
    /// `patients[1]` after searching the family name; returns what the app reported.
    fn standalone_launch(
        &self,
        name: &str,
        client: &str,
        secret: Option<&str>,
        scope: &str,
    ) -> Value {
        run_app(
            name,
            json!({
                "appPort": self.app_port,
                "openUrl": self.standalone(client, secret, scope),
                "email": self.email,
                "password": PASSWORD,
                "patient": self.patients[1],
                "patientSearch": self.family,
            }),
        )
    }

    /// Checks what a SMART app reported: the patient in context (`patients[1]`) read through
    /// the gateway, the other patient refused, and the token response.
    fn check_smart_result(&self, result: &Value, client: &str) {
        let chosen = &self.patients[1];
        assert_eq!(result["patientId"], chosen.as_str(), "{result}");
        assert_eq!(
            result["patient"],
            json!({"resourceType": "Patient", "id": chosen})
        );
        // `patient/*.rs` reaches the patient in context only.
        let other = result["otherPatient"].as_str().unwrap();
        assert!(other.starts_with("refused"), "{result}");
        let t = &result["tokenResponse"];
        assert_eq!(t["patient"], chosen.as_str());
        assert_eq!(t["need_patient_banner"], true);
        // SMART `sso-openid-connect`: the ID token is RS256.
        assert_eq!(jwt_header(t["id_token"].as_str().unwrap())["alg"], "RS256");
        let access = t["access_token"].as_str().unwrap();
        let claims = common::people::jwt_claims(access);
        assert_eq!(claims["client_id"], client);
    }
}

#[test]
fn fhirclient_standalone_launch_as_a_public_client_picks_the_patient() {
    let s = Setup::new();
    let (client, _) = s.register(false);
    let scope = "launch/patient openid fhirUser patient/*.rs";
    let result = s.standalone_launch("public", &client, None, scope);
    s.check_smart_result(&result, &client);
    assert_eq!(
        result["tokenResponse"]["scope"],
        "launch/patient openid fhirUser patient/*.rs"
    );
}

#[test]
fn fhirclient_standalone_launch_as_a_confidential_client() {
    let s = Setup::new();
    let (client, secret) = s.register(true);
    let scope = "launch/patient openid fhirUser patient/*.rs offline_access";
    let result = s.standalone_launch("confidential", &client, secret.as_deref(), scope);
    s.check_smart_result(&result, &client);
}

#[test]
fn fhirclient_ehr_launch_gets_the_ehrs_patient() {
    let s = Setup::new();
    let (client, _) = s.register(false);
    let chosen = s.patients[1].clone();
    // The EHR (the admin here) launches the app for a patient: fhirgate answers with a 302 to
    // the app's launch URI carrying `iss` and `launch`.
    let location = common::http::rt().block_on(async {
        let admin = s.gw.admin_token().await;
        let r = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .get(format!(
                "{}ClientApplication/{client}/$smart-launch?patient={chosen}",
                s.gw.fhir
            ))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        r.headers()["location"].to_str().unwrap().to_string()
    });
    let mut open = url::Url::parse(&location).unwrap();
    open.query_pairs_mut()
        .append_pair("client", &client)
        .append_pair("scope", "launch openid fhirUser patient/*.rs")
        .append_pair("other", &s.patients[0]);
    let result = run_app(
        "ehr",
        json!({
            "appPort": s.app_port,
            "openUrl": open.to_string(),
            "email": s.email,
            "password": PASSWORD,
        }),
    );
    s.check_smart_result(&result, &client);
}

#[test]
fn the_medplum_sdk_signs_in_and_searches_from_another_origin() {
    let s = Setup::new();
    let (client, _) = s.register(true);
    let mut open = url::Url::parse(&s.app("/medplum.html")).unwrap();
    open.query_pairs_mut()
        .append_pair("base", &s.gw.base)
        .append_pair("client", &client)
        .append_pair("email", &s.email)
        .append_pair("password", PASSWORD);
    let result = run_app(
        "medplum-sdk",
        json!({
            "appPort": s.app_port,
            "openUrl": open.to_string(),
            "email": s.email,
            "password": PASSWORD,
        }),
    );
    assert!(
        result["profile"]
            .as_str()
            .unwrap()
            .starts_with("Practitioner/"),
        "{result}"
    );
    assert_eq!(result["search"], "Bundle");
    let claims = common::people::jwt_claims(result["accessToken"].as_str().unwrap());
    assert_eq!(claims["client_id"], client.as_str());
}
