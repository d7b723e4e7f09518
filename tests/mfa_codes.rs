//! One-time sign-in codes by e-mail and SMS (issue 17, README "The sign-in page and MFA"): a
//! project that requires MFA of every member and allows `totp,email,sms`; enrolment at sign-in
//! through a code sent to the method; codes through a real SMTP sink and a local SMS hook
//! receiver; several methods with one preferred; the limits (wrong codes, expiry, sends).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::gateway::TestGateway;
use common::http::{outcome_text, rt, serve};
use common::mail::{self, SmtpSink};
use common::people::{
    UserSeed, auth_login, on_gateway, post_json, seed, seed_admin_client, seed_project,
};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

const PASSWORD: &str = "a long front desk password";

/// What the SMS hook received: (Authorization header, JSON body).
type Texts = Arc<Mutex<Vec<(String, Value)>>>;

async fn sms_receiver() -> (String, Texts) {
    let texts: Texts = Arc::default();
    let kept = texts.clone();
    let app = axum::Router::new().route(
        "/sms",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let kept = kept.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    kept.lock().unwrap().push((auth, body));
                    "sent"
                }
            },
        ),
    );
    let port = serve(app).await;
    (format!("http://127.0.0.1:{port}/sms"), texts)
}

/// The code of a verification e-mail: in its body, never its subject.
fn emailed_code(message: &str) -> String {
    assert_eq!(
        mail::header(message, "Subject").as_deref(),
        Some("Your fhirgate verification code")
    );
    code_in(&mail::body(message))
}

/// The 6-digit code in a text.
fn code_in(text: &str) -> String {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .unwrap_or_else(|| panic!("no code in {text:?}"))
        .to_string()
}

fn last_text(texts: &Texts) -> (String, Value) {
    texts
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a text was sent")
}

fn login_body(email: &str) -> Value {
    json!({"email": email, "password": PASSWORD, "codeChallenge": "verifier-0123456789", "codeChallengeMethod": "plain"})
}

#[test]
fn codes_by_e_mail_and_sms_sign_people_in() {
    let upstream = FhirUpstream::start();
    let sink = SmtpSink::start();
    // A multi-threaded runtime: the receiver keeps serving between the test's own calls.
    let runtime = rt();
    let (hook, texts) = runtime.block_on(sms_receiver());
    let gw = TestGateway::start_with(&upstream.base_url, |f| {
        f.smtp_host = Some("127.0.0.1".into());
        f.smtp_port = Some(sink.port);
        f.smtp_tls = Some("none".into());
        f.sms_hook_url = Some(hook.clone());
        f.sms_hook_authorization = Some("Bearer hook-secret".into());
    });
    let project = seed_project(
        &gw,
        json!({"name": "Front desk clinic", "setting": [
            {"name": "allowedMfaMethods", "valueString": "totp,email,sms"},
            {"name": "mfaRequired", "valueBoolean": true}]}),
    );
    let mut desk = UserSeed::new("desk@clinic.example", PASSWORD);
    desk.project = Some(project.clone());
    seed(&gw, &desk);
    let mut nurse = UserSeed::new("nurse@clinic.example", PASSWORD);
    nurse.project = Some(project.clone());
    let nurse = seed(&gw, &nurse);
    let (admin_id, admin_secret) = seed_admin_client(&gw, &project);
    // A project that allows TOTP only (the default) and requires nothing.
    let plain_project = seed_project(&gw, json!({"name": "Plain clinic"}));
    let mut plain = UserSeed::new("plain@clinic.example", PASSWORD);
    plain.project = Some(plain_project.clone());
    seed(&gw, &plain);
    // A user of both clinics, with e-mail codes, which only the first allows.
    let mut both = UserSeed::new("both@clinic.example", PASSWORD);
    both.project = Some(project.clone());
    let both_user = seed(&gw, &both).user_id;
    let mut elsewhere = both.clone();
    elsewhere.project = Some(plain_project.clone());
    common::people::add_membership(&gw, &both_user, &elsewhere);
    let id = both_user.clone();
    on_gateway(&gw, move |state| async move {
        let mut user = state.store.read("User", &id).await.unwrap().unwrap();
        user.content["mfaEnrolled"] = json!(true);
        user.content["mfaMethod"] = json!(["email"]);
        let index = fhirgate::control::index::index_rows(&user.content);
        state
            .store
            .put(
                user.content.clone(),
                user.project_id.as_deref(),
                &index,
                Some(&user.version_id),
                false,
            )
            .await
            .unwrap();
    });

    runtime.block_on(async {
        // The project requires MFA of everyone: enrolment first, with the allowed methods.
        let (status, b) = auth_login(&gw, &login_body("desk@clinic.example")).await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(b["mfaEnrollRequired"], true, "{b}");
        assert_eq!(b["allowedMfaMethods"], json!(["totp", "email", "sms"]), "{b}");
        assert!(b.get("code").is_none());
        let login = b["login"].as_str().unwrap().to_string();

        // E-mail: the code goes to her address; verifying it enrols her and signs her in.
        let (status, b) = post_json(&gw, "auth/mfa/login-enroll", &json!({"login": login, "method": "email"})).await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(b, json!({"login": login, "mfaRequired": true, "mfaMethods": ["email"], "email": "desk@clinic.example"}));
        let messages = sink.wait_for(1);
        let code = emailed_code(&messages[0]);
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": "000000"})).await;
        assert_eq!((status, outcome_text(&b)), (400, "Invalid MFA token"), "{b}");
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": code})).await;
        assert_eq!(status, 200, "{b}");
        assert!(b["code"].is_string(), "signed in: {b}");

        // The next sign-in sends a code by itself (her only method); the old one is spent.
        let (_, b) = auth_login(&gw, &login_body("desk@clinic.example")).await;
        assert_eq!(b["mfaMethods"], json!(["email"]), "{b}");
        let second = b["login"].as_str().unwrap().to_string();
        let messages = sink.wait_for(2);
        let fresh = emailed_code(&messages[1]);
        let (status, _) = post_json(&gw, "auth/mfa/verify", &json!({"login": second, "token": code})).await;
        assert_eq!(status, 400, "a code is good once, for its own sign-in");
        // Polling the sign-in sends no other.
        let (status, b) = common::http::send(TestGateway::client().get(format!("{}auth/login/{second}", gw.base))).await;
        assert_eq!((status, &b["mfaRequired"]), (200, &json!(true)), "{b}");
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": second, "token": fresh})).await;
        assert_eq!(status, 200);
        assert_eq!(sink.messages().len(), 2);
        // A stolen session cannot turn her MFA off with a code sent to a phone of the thief's.
        let desk_token = exchange(&gw, b["code"].as_str().unwrap()).await;
        let (status, b) = bearer_post(&gw, &desk_token, "auth/mfa/send-sms-challenge", json!({"phone": "+15035550666"})).await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(last_text(&texts).1["to"], "+15035550666");
        let thief = code_in(last_text(&texts).1["text"].as_str().unwrap());
        let (status, b) = bearer_post(&gw, &desk_token, "auth/mfa/disable", json!({"token": thief})).await;
        assert_eq!((status, outcome_text(&b)), (400, "Invalid token"), "{b}");
        let (_, st) = bearer_get(&gw, &desk_token, "auth/mfa/status").await;
        assert_eq!(st["enrolledMethods"], json!(["email"]), "still on: {st}");

        // SMS: the number is given at enrolment; the operator's hook gets the text.
        let (_, b) = auth_login(&gw, &login_body("nurse@clinic.example")).await;
        let login = b["login"].as_str().unwrap().to_string();
        let (status, b) = post_json(&gw, "auth/mfa/login-enroll", &json!({"login": login, "method": "sms", "phone": "555-0199"})).await;
        assert_eq!(status, 400, "{b}");
        let (status, b) = post_json(&gw, "auth/mfa/login-enroll", &json!({"login": login, "method": "sms", "phone": "+15035550199"})).await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(b["mfaMethods"], json!(["sms"]), "{b}");
        assert_eq!(b["phone"], "••• ••• ••99", "shown masked: {b}");
        let (auth, text) = last_text(&texts);
        assert_eq!(auth, "Bearer hook-secret");
        assert_eq!(text["to"], "+15035550199");
        assert_eq!(text["purpose"], "mfa");
        let code = code_in(text["text"].as_str().unwrap());
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": code})).await;
        assert_eq!(status, 200, "{b}");
        let token = exchange(&gw, b["code"].as_str().unwrap()).await;
        // A challenge for her own method goes to her own number, whatever number is asked for.
        let (status, b) = bearer_post(&gw, &token, "auth/mfa/send-sms-challenge", json!({"phone": "+15035550666"})).await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(last_text(&texts).1["to"], "+15035550199");
        // Nor can a password alone add a method at sign-in for an enrolled user.
        let (_, b) = auth_login(&gw, &login_body("nurse@clinic.example")).await;
        let enrolled_login = b["login"].as_str().unwrap().to_string();
        let (status, b) = post_json(&gw, "auth/mfa/login-enroll", &json!({"login": enrolled_login, "method": "email"})).await;
        assert_eq!((status, outcome_text(&b)), (400, "Already enrolled"), "{b}");

        // A second method, then the preferred one: e-mail, enrolled from her session.
        let (status, b) = bearer_post(&gw, &token, "auth/mfa/send-email-challenge", json!({})).await;
        assert_eq!(status, 200, "{b}");
        let email_code = emailed_code(sink.wait_for(3).last().unwrap());
        let (status, b) = bearer_post(&gw, &token, "auth/mfa/enroll", json!({"method": "email", "token": email_code})).await;
        assert_eq!(status, 200, "{b}");
        let (_, st) = bearer_get(&gw, &token, "auth/mfa/status").await;
        assert_eq!(st["enrolledMethods"], json!(["sms", "email"]), "{st}");
        let (status, _) = bearer_post(&gw, &token, "auth/mfa/preferred", json!({"method": "email"})).await;
        assert_eq!(status, 200);
        // A session that did not pass MFA (or not lately) adds no factor to a user who has one.
        let claims = common::people::jwt_claims(&token);
        let login_id = claims["login_id"].as_str().unwrap_or_default().to_string();
        assert!(!login_id.is_empty(), "{claims}");
        let id = login_id.clone();
        on_gateway(&gw, move |state| async move {
            let record = state.store.login(&id).await.unwrap().unwrap();
            let mut extra = record.extra.clone();
            extra["mfaVerified"] = json!(false);
            assert!(state.store.update_login_extra_cas(&id, &record.extra, &extra).await.unwrap());
        });
        let (status, b) = bearer_post(&gw, &token, "auth/mfa/enroll", json!({"method": "totp", "token": "000000"})).await;
        assert_eq!(
            (status, outcome_text(&b)),
            (400, "Sign in again (with your current verification method) to add another"),
            "{b}"
        );
        let texts_before = texts.lock().unwrap().len();
        let (_, b) = auth_login(&gw, &login_body("nurse@clinic.example")).await;
        assert_eq!(b["mfaMethods"], json!(["email", "sms"]), "{b}");
        sink.wait_for(4);
        assert_eq!(texts.lock().unwrap().len(), texts_before, "the preferred method's code only");
        // She may still ask for the other.
        let login = b["login"].as_str().unwrap().to_string();
        let (status, _) = post_json(&gw, "auth/mfa/send-sms", &json!({"login": login})).await;
        assert_eq!(status, 200);
        let code = code_in(last_text(&texts).1["text"].as_str().unwrap());
        let (status, _) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": code})).await;
        assert_eq!(status, 200);

        // Limits: five sends per sign-in, five wrong codes revoke it, codes expire.
        let (_, b) = auth_login(&gw, &login_body("nurse@clinic.example")).await;
        let login = b["login"].as_str().unwrap().to_string();
        let mut last = 0;
        for _ in 0..5 {
            let (status, _) = post_json(&gw, "auth/mfa/send-sms", &json!({"login": login})).await;
            last = status;
            if status != 200 {
                break;
            }
        }
        assert_eq!(last, 429, "the first code and four more, then no more");
        for _ in 0..5 {
            let (status, _) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": "999999"})).await;
            assert_eq!(status, 400);
        }
        let code = code_in(last_text(&texts).1["text"].as_str().unwrap());
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": code})).await;
        assert_eq!((status, outcome_text(&b)), (400, "Login revoked"), "{b}");

        let (_, b) = auth_login(&gw, &login_body("desk@clinic.example")).await;
        let login = b["login"].as_str().unwrap().to_string();
        let code = emailed_code(sink.wait_for(6).last().unwrap());
        let id = login.clone();
        on_gateway(&gw, move |state| async move {
            let record = state.store.login(&id).await.unwrap().unwrap();
            let mut extra = record.extra.clone();
            extra["mfaSentCode"]["expiresAt"] = json!(fhirgate::store::now_unix() - 1);
            assert!(state.store.update_login_extra_cas(&id, &record.extra, &extra).await.unwrap());
        });
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": code})).await;
        assert_eq!((status, outcome_text(&b)), (400, "Invalid MFA token"), "an expired code: {b}");

        // Her admin resets the SMS method (a lost phone): no code needed, her sessions end, she
        // is told by e-mail. Only methods she has can be reset.
        let admin = gw.token(&admin_id, &admin_secret, None).await;
        let reset = format!("admin/projects/{project}/members/{}/mfa/reset", nurse.membership_id);
        let (status, b) = bearer_post(&gw, &admin, &reset, json!({"method": "sms"})).await;
        assert_eq!(status, 200, "{b}");
        let (status, _) = bearer_get(&gw, &token, "auth/me").await;
        assert_eq!(status, 401, "the reset ended her sessions");
        let notice = sink.wait_for(7);
        assert_eq!(
            mail::header(notice.last().unwrap(), "Subject").as_deref(),
            Some("Your multi-factor authentication has been reset")
        );
        let (status, b) = bearer_post(&gw, &admin, &reset, json!({"method": "sms"})).await;
        assert_eq!((status, outcome_text(&b)), (400, "User is not enrolled in MFA method: sms"), "{b}");
        let (status, b) = bearer_post(&gw, &admin, &reset, json!({"method": "carrier-pigeon"})).await;
        assert_eq!(status, 400, "{b}");
        let (_, b) = auth_login(&gw, &login_body("nurse@clinic.example")).await;
        assert_eq!(b["mfaMethods"], json!(["email"]), "{b}");
        // Another project's admin cannot reach her.
        let (plain_admin, plain_secret) = seed_admin_client(&gw, &plain_project);
        let other = gw.token(&plain_admin, &plain_secret, None).await;
        let (status, _) = bearer_post(&gw, &other, &reset.replace(&project, &plain_project), json!({"method": "email"})).await;
        assert_eq!(status, 403);

        // Before a project is chosen, only what all of a user's projects allow is usable: the
        // e-mail code would not be good in the plain clinic.
        let (_, b) = auth_login(&gw, &login_body("both@clinic.example")).await;
        assert_eq!(b["mfaMethods"], json!([]), "{b}");
        let login = b["login"].as_str().unwrap().to_string();
        let (status, b) = post_json(&gw, "auth/mfa/send-email", &json!({"login": login})).await;
        assert_eq!((status, outcome_text(&b)), (400, "User not enrolled in email MFA"), "{b}");
        let (status, b) = post_json(&gw, "auth/mfa/verify", &json!({"login": login, "token": "123456"})).await;
        assert_eq!((status, outcome_text(&b)), (400, "MFA method not allowed"), "{b}");
        let mut into_first = login_body("both@clinic.example");
        into_first["projectId"] = json!(project);
        let (_, b) = auth_login(&gw, &into_first).await;
        assert_eq!(b["mfaMethods"], json!(["email"]), "signing into the first clinic: {b}");

        // A method the project does not allow cannot be enrolled.
        let (_, b) = auth_login(&gw, &login_body("plain@clinic.example")).await;
        let token = exchange(&gw, b["code"].as_str().unwrap_or_else(|| panic!("{b}"))).await;
        let (status, b) = bearer_post(&gw, &token, "auth/mfa/send-email-challenge", json!({})).await;
        assert_eq!((status, outcome_text(&b)), (400, "MFA method not allowed"), "{b}");
        let (status, b) = bearer_post(&gw, &token, "auth/mfa/enroll", json!({"method": "sms", "token": "123456"})).await;
        assert_eq!((status, outcome_text(&b)), (400, "MFA method not allowed"), "{b}");
    });
}

async fn exchange(gw: &TestGateway, code: &str) -> String {
    let (status, tokens) = common::people::token_request(
        gw,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", "verifier-0123456789"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    tokens["access_token"].as_str().unwrap().to_string()
}

async fn bearer_post(gw: &TestGateway, token: &str, path: &str, body: Value) -> (u16, Value) {
    common::http::send(
        TestGateway::client()
            .post(format!("{}{path}", gw.base))
            .bearer_auth(token)
            .json(&body),
    )
    .await
}

async fn bearer_get(gw: &TestGateway, token: &str, path: &str) -> (u16, Value) {
    common::http::send(
        TestGateway::client()
            .get(format!("{}{path}", gw.base))
            .bearer_auth(token),
    )
    .await
}
