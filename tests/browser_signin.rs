//! The sign-in page in a real browser: Debian's chromium, driven by `tests/browser/signin.mjs`
//! (playwright-core, page JavaScript disabled), signs an MFA-enrolled user in through a real
//! fhirgate in front of the real FHIR upstream — keyboard focus order, a wrong password shown
//! inline, the TOTP code, the scope consent with one scope unticked — and lands on the client's
//! redirect URI with a code. This test then redeems the code and uses the tokens at the gateway.
//! A second test follows an invited person from the invitation e-mail to signing out; a third
//! is the operator's first sign-in with the bootstrap admin's credentials.
//! Screenshots of every page go to `target/test-output/browser-*/`.
//!
//! Needs `/usr/bin/chromium` and `tests/browser/node_modules` (both installed by
//! `scripts/setup`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::{TestGateway, free_port};
use common::people::{UserSeed, jwt_claims, seed, seed_client, super_admin_project, token_request};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

const PASSWORD: &str = "a long browser password";
const SECRET: &str = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU";

/// Runs `tests/browser/signin.mjs` with `input` (plus a screenshot folder under
/// `target/test-output/<name>/`) and returns its JSON, which must report no failure.
fn run_browser(name: &str, input: Value) -> Value {
    let run = common::browser::run_script("signin.mjs", name, &["playwright-core"], input);
    let result = run.output;
    assert!(
        result.get("failure").is_none(),
        "the browser flow failed: {}\npages: {}\n{}",
        result["failure"],
        result["pages"],
        run.stderr
    );
    assert!(run.success, "{result}\n{}", run.stderr);
    for s in result["screenshots"].as_array().unwrap() {
        let bytes = std::fs::read(s.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000);
    }
    result
}

/// Redeems an authorization code the browser brought back; returns the token response.
async fn redeem(
    gw: &TestGateway,
    code: &str,
    verifier: &str,
    client: &str,
    redirect_uri: &str,
) -> Value {
    let (status, tokens) = token_request(
        gw,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("client_id", client),
            ("redirect_uri", redirect_uri),
        ],
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    tokens
}

/// An authorization request of `client` with a fresh PKCE pair; returns (URL, verifier).
fn authorize_url(
    gw: &TestGateway,
    client: &str,
    redirect_uri: &str,
    scope: &str,
) -> (String, String) {
    common::people::authorize_url(gw, client, redirect_uri, scope, "browser")
}

#[test]
fn a_person_signs_in_with_mfa_in_chromium() {
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
    let scope = "openid profile user/Patient.rs offline_access";
    let (url, verifier) = authorize_url(&gw, &client, &redirect_uri, scope);

    let result = run_browser(
        "browser-signin",
        json!({
            "authorizeUrl": url,
            "email": email,
            "password": PASSWORD,
            "wrongPassword": "not the password",
            "totpSecret": SECRET,
            "callbackPort": port,
            "untick": ["offline_access"],
        }),
    );

    // What the person saw, in order.
    assert_eq!(
        result["pages"],
        json!(["Sign in", "Two-step verification", "Allow access"]),
        "{result}"
    );
    assert_eq!(result["focusOrder"], json!(["email", "password"]));
    assert_eq!(result["inlineError"], "Email or password is invalid");
    assert_eq!(
        result["screenshots"].as_array().unwrap().len(),
        5,
        "{result}"
    );

    // Where the browser landed.
    let callback = &result["callback"];
    assert_eq!(callback["state"], "browser-state");
    assert!(callback.get("error").is_none(), "{callback}");
    let code = callback["code"].as_str().unwrap();

    common::http::rt().block_on(async {
        let tokens = redeem(&gw, code, &verifier, &client, &redirect_uri).await;
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

/// The whole life of a person, in the browser where a person acts: an admin invites a
/// practitioner with MFA required; the invitation e-mail (the outbox: no SMTP configured) has a
/// set-password link; the browser sets the password there, signs in on the authorization page,
/// enrols an authenticator (reading the key off the page) and consents. The SMART app's tokens
/// then read the practitioner's own record through the gateway; signing out kills them, and
/// the invitation link does not work twice.
#[test]
fn an_invited_person_sets_a_password_enrols_mfa_signs_in_and_out() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let rt = common::http::rt();
    let email = common::people::unique_email("invited");
    let password = "my own chosen passphrase";
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let project = common::people::default_project(&gw);
    let (client, _) = seed_client(
        &gw,
        Some(&project),
        json!({"name": "Clinic App", "redirectUris": [redirect_uri]}),
        None,
    );
    let membership = rt.block_on(async {
        let admin = gw.admin_token().await;
        assert_eq!(gw.project_of(&admin).await, project);
        let (status, membership) = gw
            .post(
                &format!("admin/projects/{project}/invite"),
                Some(&admin),
                json!({"resourceType": "Practitioner", "firstName": "Ida", "lastName": "Invited",
                       "email": email, "sendEmail": true, "mfaRequired": true}),
            )
            .await;
        assert_eq!(status, 200, "{membership}");
        membership
    });
    let profile = membership["profile"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    let messages = common::mail::wait_for_outbox(&gw.data_dir, 1);
    assert_eq!(
        common::mail::header(&messages[0], "To").as_deref(),
        Some(email.as_str())
    );
    let link = common::mail::link(&messages[0], "/auth/setpassword/").expect("a set-password link");

    let (url, verifier) = authorize_url(&gw, &client, &redirect_uri, "openid profile user/*.rs");
    let result = run_browser(
        "browser-invitation",
        json!({
            "setPasswordUrl": link,
            "authorizeUrl": url,
            "email": email,
            "password": password,
            "callbackPort": port,
            "untick": [],
        }),
    );
    assert_eq!(
        result["pages"],
        json!([
            "Set your password",
            "Password set",
            "Sign in",
            "Set up two-step verification",
            "Allow access"
        ]),
        "{result}"
    );
    let code = result["callback"]["code"]
        .as_str()
        .expect("a code")
        .to_string();
    assert_eq!(result["callback"]["state"], "browser-state");

    rt.block_on(async {
        let tokens = redeem(&gw, &code, &verifier, &client, &redirect_uri).await;
        assert_eq!(tokens["profile"]["reference"], profile.as_str());
        let token = tokens["access_token"].as_str().unwrap().to_string();
        // The practitioner record the invitation created upstream, read as its owner.
        let (status, me) = gw.get(&format!("fhir/R4/{profile}"), Some(&token)).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["name"][0]["family"], "Invited");

        let http = TestGateway::client();
        let out = http
            .post(format!("{}oauth2/logout", gw.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(out.status(), 200);
        let (status, _) = gw.get(&format!("fhir/R4/{profile}"), Some(&token)).await;
        assert_eq!(status, 401, "a signed-out token still works");

        // The invitation link was used: it answers the "already used" page.
        let again = http.get(&link).send().await.unwrap();
        let html = again.text().await.unwrap();
        assert!(html.contains("Link already used"), "{html}");
    });
    // The secret the person enrolled is now the user's: a later sign-in needs its codes.
    assert!(
        result["enrolledSecret"]
            .as_str()
            .is_some_and(|s| s.len() >= 16)
    );
}

/// The operator's first sign-in: the bootstrap admin (`admin_email` / `admin_password`) signs
/// in on the authorization page in a browser, like any person, and its tokens act as the super
/// admin project's admin.
#[test]
fn the_bootstrap_admin_signs_in_in_chromium() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    // An app of the operator's own project, where the bootstrap admin's membership is.
    let (client, _) = seed_client(
        &gw,
        Some(&super_admin_project(&gw)),
        json!({"name": "Operator Console", "redirectUris": [redirect_uri]}),
        None,
    );
    let (url, verifier) = authorize_url(&gw, &client, &redirect_uri, "openid profile");
    let result = run_browser(
        "browser-bootstrap-admin",
        json!({
            "authorizeUrl": url,
            "email": "admin@example.com",
            "password": "admin-password-for-tests",
            "callbackPort": port,
        }),
    );
    assert_eq!(
        result["pages"],
        json!(["Sign in", "Allow access"]),
        "{result}"
    );
    let code = result["callback"]["code"]
        .as_str()
        .expect("a code")
        .to_string();
    common::http::rt().block_on(async {
        let tokens = redeem(&gw, &code, &verifier, &client, &redirect_uri).await;
        let token = tokens["access_token"].as_str().unwrap();
        let (status, me) = gw.get("auth/me", Some(token)).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["user"]["email"], "admin@example.com", "{me}");
        assert_eq!(me["membership"]["admin"], true, "{me}");
        assert_eq!(me["project"]["superAdmin"], true, "{me}");
    });
}

/// Front-desk staff without an authenticator app: their project requires MFA and allows codes
/// by e-mail. In chromium the person chooses e-mail codes on the enrolment page, reads the code
/// from the message the real SMTP sink received, and lands on the client; the next sign-in sends
/// a code by itself and asks only for it.
#[test]
fn a_person_without_an_authenticator_signs_in_with_e_mailed_codes_in_chromium() {
    let upstream = FhirUpstream::start();
    let sink = common::mail::SmtpSink::start();
    let gw = TestGateway::start_with(&upstream.base_url, |f| {
        f.smtp_host = Some("127.0.0.1".into());
        f.smtp_port = Some(sink.port);
        f.smtp_tls = Some("none".into());
    });
    let project = common::people::seed_project(
        &gw,
        json!({"name": "Front desk", "setting": [
            {"name": "allowedMfaMethods", "valueString": "totp,email"},
            {"name": "mfaRequired", "valueBoolean": true}]}),
    );
    let email = format!("desk-{}@example.com", uuid::Uuid::new_v4().simple());
    let mut person = UserSeed::new(&email, PASSWORD);
    person.project = Some(project.clone());
    let seeded = seed(&gw, &person);
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let (client, _) = seed_client(
        &gw,
        Some(&project),
        json!({"name": "Front Desk App", "redirectUris": [redirect_uri]}),
        None,
    );
    let mail_dir = sink.dir().to_string_lossy().to_string();
    for (round, pages) in [
        (
            "browser-email-enrol",
            json!([
                "Sign in",
                "Set up two-step verification",
                "Two-step verification",
                "Allow access"
            ]),
        ),
        (
            "browser-email-again",
            json!(["Sign in", "Two-step verification", "Allow access"]),
        ),
    ] {
        let (url, verifier) = authorize_url(&gw, &client, &redirect_uri, "openid profile");
        let result = run_browser(
            round,
            json!({
                "authorizeUrl": url,
                "email": email,
                "password": PASSWORD,
                "mailDir": mail_dir,
                "callbackPort": port,
            }),
        );
        assert_eq!(result["pages"], pages, "{result}");
        let hint = result["codeHint"].as_str().unwrap_or_default();
        assert!(
            hint.starts_with("We sent a 6-digit code by e-mail to d"),
            "{hint}"
        );
        let code = result["callback"]["code"].as_str().unwrap();
        common::http::rt().block_on(async {
            let tokens = redeem(&gw, code, &verifier, &client, &redirect_uri).await;
            assert_eq!(tokens["profile"]["reference"], seeded.profile.as_str());
        });
    }
    let sent = sink.messages();
    assert_eq!(sent.len(), 2, "one code a sign-in");
}
