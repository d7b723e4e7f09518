//! The sign-in page in a real browser: Debian's chromium, driven by `tests/browser/signin.mjs`
//! (playwright-core, page JavaScript disabled), signs an MFA-enrolled user in through a real
//! fhirgate in front of the real FHIR upstream — keyboard focus order, a wrong password shown
//! inline, the TOTP code, the scope consent with one scope unticked — and lands on the client's
//! redirect URI with a code. This test then redeems the code and uses the tokens at the gateway.
//! Screenshots of every page go to `target/test-output/browser-signin/`.
//!
//! Needs `/usr/bin/chromium` and `tests/browser/node_modules` (both installed by
//! `scripts/setup`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::gateway::{TestGateway, free_port};
use common::people::{UserSeed, jwt_claims, pkce_pair, seed, seed_client, token_request};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

const PASSWORD: &str = "a long browser password";
const SECRET: &str = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU";

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[test]
fn a_person_signs_in_with_mfa_in_chromium() {
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .is_file(),
        "tests/browser/node_modules is missing: run scripts/setup (npm ci in tests/browser)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file(),
        "/usr/bin/chromium is missing: run scripts/setup (Debian package chromium)"
    );

    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let email = format!("browser-{}@example.com", uuid::Uuid::new_v4().simple());
    let mut person = UserSeed::new(&email, PASSWORD);
    person.first_name = "Brenda".into();
    person.last_name = "Browser".into();
    person.mfa_secret = Some(SECRET.into());
    let seeded = seed(&gw, &person);

    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let (client, _) = seed_client(
        &gw,
        None,
        json!({"name": "Browser Test App", "redirectUris": [redirect_uri]}),
        None,
    );
    let (verifier, challenge) = pkce_pair();
    let scope = "openid profile user/Patient.rs offline_access";
    let mut url = url::Url::parse(&format!("{}oauth2/authorize", gw.base)).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &client)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", scope)
        .append_pair("state", "browser-state")
        .append_pair("nonce", "browser-nonce")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");

    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-output/browser-signin");
    let _ = std::fs::remove_dir_all(&shots);
    let input = json!({
        "authorizeUrl": url.to_string(),
        "email": email,
        "password": PASSWORD,
        "wrongPassword": "not the password",
        "totpSecret": SECRET,
        "callbackPort": port,
        "screenshotDir": shots,
        "untick": ["offline_access"],
    });
    let node = std::env::var("FHIRGATE_TEST_NODE").unwrap_or_else(|_| "node".into());
    let out = Command::new(node)
        .arg("signin.mjs")
        .arg(input.to_string())
        .current_dir(&dir)
        .output()
        .expect("run node tests/browser/signin.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON from the browser script ({e}):\n{stdout}\n{stderr}"));
    assert!(
        result.get("failure").is_none(),
        "the browser flow failed: {}\n{stderr}",
        result["failure"]
    );
    assert!(out.status.success(), "{result}\n{stderr}");

    // What the person saw, in order.
    assert_eq!(
        result["pages"],
        json!(["Sign in", "Two-step verification", "Allow access"]),
        "{result}"
    );
    assert_eq!(result["focusOrder"], json!(["email", "password"]));
    assert_eq!(result["inlineError"], "Email or password is invalid");
    let screenshots = result["screenshots"].as_array().unwrap();
    assert_eq!(screenshots.len(), 5, "{result}");
    for s in screenshots {
        let bytes = std::fs::read(s.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000);
    }

    // Where the browser landed.
    let callback = &result["callback"];
    assert_eq!(callback["state"], "browser-state");
    assert!(callback.get("error").is_none(), "{callback}");
    let code = callback["code"].as_str().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (status, tokens) = token_request(
            &gw,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("code_verifier", &verifier),
                ("client_id", &client),
                ("redirect_uri", &redirect_uri),
            ],
        )
        .await;
        assert_eq!(status, 200, "{tokens}");
        // offline_access was unticked: the narrower scope, and no refresh token.
        assert_eq!(tokens["scope"], "openid profile user/Patient.rs");
        assert!(tokens.get("refresh_token").is_none(), "{tokens}");
        assert_eq!(tokens["profile"]["reference"], seeded.profile.as_str());
        let id = jwt_claims(tokens["id_token"].as_str().unwrap());
        assert_eq!(id["nonce"], "browser-nonce");
        assert_eq!(id["sub"], seeded.user_id.as_str());

        let token = tokens["access_token"].as_str().unwrap();
        let http = TestGateway::client();
        let me: Value = http
            .get(format!("{}auth/me", gw.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(me["user"]["email"], email.as_str(), "{me}");
        let patients = http
            .get(format!("{}Patient?_count=1", gw.fhir))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(patients.status(), 200);
        let observations = http
            .get(format!("{}Observation?_count=1", gw.fhir))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(observations.status(), 403);
    });
}
