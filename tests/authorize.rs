//! The sign-in page (`/oauth2/authorize`) and MFA through a real fhirgate in front of the real
//! FHIR upstream: reference docs/medplum-compat.md §12 cases 29–31 and 54 with Medplum's exact texts
//! (the case number is in each test's name), and the page itself over plain HTTP (forms, CSRF,
//! inline errors, consent, the session cookie). `tests/browser_signin.rs` drives the same page in
//! a real browser.
//!
//! One upstream and one gateway serve every test of this file; each test makes its own users
//! and clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use common::gateway::{TestGateway, shared as gw};
use common::http::{bearer_get_status, outcome_text, rt};
use common::page::{Browser, inputs, unescape};
use common::people::{
    Seeded, UserSeed, auth_login, jwt_claims, on_gateway, pkce_pair, post_json, seed, seed_client,
    sign_in, token_request, unique_email,
};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";
const REDIRECT: &str = "https://app.example.org/callback";

/// A client of the default project registered for [`REDIRECT`].
fn app(extra: Value) -> String {
    let mut fields = json!({"name": "Test App", "redirectUris": [REDIRECT]});
    if let (Some(obj), Value::Object(more)) = (fields.as_object_mut(), extra) {
        obj.extend(more);
    }
    seed_client(gw(), None, fields, None).0
}

fn user(tag: &str) -> (String, Seeded) {
    let e = unique_email(tag);
    let s = seed(gw(), &UserSeed::new(&e, PASSWORD));
    (e, s)
}

/// Query parameters of a request.
type Params<'a> = Vec<(&'a str, &'a str)>;

fn authorize_url(params: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(&format!("{}oauth2/authorize", gw().base)).unwrap();
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    u.to_string()
}

/// The usual request of a SMART app, with `extra` parameters; returns the URL and the PKCE
/// verifier.
fn request(client: &str, scope: &str, extra: &[(&str, &str)]) -> (String, String) {
    let (verifier, challenge) = pkce_pair();
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", client),
        ("redirect_uri", REDIRECT),
        ("scope", scope),
        ("state", "st-123"),
        ("nonce", "n-456"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    params.extend_from_slice(extra);
    (authorize_url(&params), verifier)
}

async fn exchange(client: &str, code: &str, verifier: &str) -> (u16, Value) {
    token_request(
        gw(),
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("client_id", client),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn totp_code(secret: &str, at: u64) -> String {
    let secret = totp_rs::Secret::try_from_base32(secret).unwrap();
    totp_rs::Builder::new()
        .with_secret(secret)
        .build()
        .unwrap()
        .generate(at)
        .to_string()
}

/// A code for a step after `used` (codes are single-use per step), waiting for the clock when
/// the next acceptable step has not begun yet. Returns the code and its step.
fn code_after(secret: &str, used: u64) -> (String, u64) {
    loop {
        let current = now() / 30;
        let step = (used + 1).max(current);
        // Accepted steps are current-1 ..= current+1; leave a margin at the boundary.
        if step <= current + 1 && !(step == current + 1 && now() % 30 >= 28) {
            return (totp_code(secret, step * 30), step);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn secret_of(enroll_uri: &str) -> String {
    url::Url::parse(enroll_uri)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "secret")
        .unwrap()
        .1
        .into_owned()
}

// === case 29: before the redirect URI is trusted, plain text ===

#[test]
fn case_29_client_and_redirect_uri_errors_are_plain_text() {
    let client = app(json!({}));
    let bare = seed_client(gw(), None, json!({"name": "no redirects"}), None).0;
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![("client_id", "no-such-client"), ("redirect_uri", REDIRECT)],
                "Client not found",
            ),
            (vec![("redirect_uri", REDIRECT)], "Client not found"),
            (vec![("client_id", &client)], "Missing redirect URI"),
            (
                vec![("client_id", &client), ("redirect_uri", "not a url")],
                "Invalid redirect URI",
            ),
            (
                vec![
                    ("client_id", &client),
                    ("redirect_uri", "https://evil.example/callback"),
                ],
                "Invalid redirect URI",
            ),
            // Exact match only: no prefix, no extra query.
            (
                vec![
                    ("client_id", &client),
                    ("redirect_uri", "https://app.example.org/callback/x"),
                ],
                "Invalid redirect URI",
            ),
            (
                vec![
                    ("client_id", &client),
                    ("redirect_uri", "https://app.example.org/callback?x=1"),
                ],
                "Invalid redirect URI",
            ),
            (
                vec![("client_id", &bare), ("redirect_uri", REDIRECT)],
                "Invalid redirect URI",
            ),
        ];
        for (params, text) in cases {
            let mut all = params.clone();
            all.extend([("response_type", "code"), ("scope", "openid")]);
            let page = b.get(&authorize_url(&all)).await;
            assert_eq!(page.status, 400, "{params:?}");
            assert!(page.location.is_none());
            assert!(page.content_type.starts_with("text/plain"), "{params:?}");
            assert_eq!(page.body, text, "{params:?}");
        }
    });
}

// === case 30: after, 302 errors to the client ===

#[test]
fn case_30_request_errors_redirect_to_the_client() {
    let client = app(json!({}));
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let base = |extra: &[(&'static str, &'static str)]| {
            let mut p: Vec<(&str, &str)> = vec![
                ("client_id", client.as_str()),
                ("redirect_uri", REDIRECT),
                ("response_type", "code"),
                ("scope", "openid"),
                ("state", "xyz"),
            ];
            for (k, v) in extra {
                p.retain(|(pk, _)| pk != k);
                p.push((k, v));
            }
            p.retain(|(_, v)| !v.is_empty());
            authorize_url(&p)
        };
        let aud_other = "http://other.example/fhir/R4";
        let cases: Vec<(Params, &str, &str)> = vec![
            (
                vec![("response_type", "token")],
                "unsupported_response_type",
                "Invalid response type",
            ),
            (
                vec![("request", "eyJhbGciOiJub25lIn0.e30.")],
                "request_not_supported",
                "Unsupported request parameter",
            ),
            (vec![("scope", "")], "invalid_request", "Missing scope"),
            (
                vec![("code_challenge", "abc")],
                "invalid_request",
                "Missing code challenge method",
            ),
            (
                vec![("aud", aud_other)],
                "invalid_request",
                "Invalid audience",
            ),
            (
                vec![("aud", "not a url")],
                "invalid_request",
                "Invalid audience",
            ),
            // SMART 2.2: the audience is the FHIR base URL, not merely this origin.
            (
                vec![("aud", gw().base.as_str())],
                "invalid_request",
                "Invalid audience",
            ),
            (
                vec![("launch", "00000000-0000-4000-8000-000000000000")],
                "invalid_request",
                "Invalid launch",
            ),
        ];
        for (extra, error, description) in cases {
            let page = b.get(&base(&extra)).await;
            assert_eq!(page.status, 302, "{extra:?}: {}", page.body);
            let q = page.redirect_params();
            assert_eq!(q["error"], error, "{extra:?}");
            assert_eq!(q["error_description"], description, "{extra:?}");
            assert_eq!(q["state"], "xyz", "{extra:?}");
            assert!(!q.contains_key("code"));
        }
        // The FHIR base URL, with or without its trailing slash, is the audience: the sign-in page.
        let fhir = format!("{}fhir/R4", gw().base);
        let fhir_slash = format!("{fhir}/");
        for aud in [fhir.as_str(), fhir_slash.as_str()] {
            let mut p = vec![
                ("client_id", client.as_str()),
                ("redirect_uri", REDIRECT),
                ("response_type", "code"),
                ("scope", "openid"),
                ("aud", aud),
            ];
            p.push(("state", "s"));
            let page = b.get(&authorize_url(&p)).await;
            assert_eq!(page.status, 200, "aud {aud}: {}", page.body);
            assert_eq!(page.title(), "Sign in");
            assert!(page.content_type.starts_with("text/html"));
        }
    });
}

#[test]
fn missing_scope_falls_back_to_the_clients_default_scope() {
    let client = app(json!({"defaultScope": ["openid", "patient/*.rs"]}));
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let page = b
            .get(&authorize_url(&[
                ("client_id", &client),
                ("redirect_uri", REDIRECT),
                ("response_type", "code"),
            ]))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.field("scope"), "openid patient/*.rs");
        assert_eq!(page.field("state"), "");
    });
}

#[test]
fn an_authorization_request_sent_by_post_works_like_get() {
    // OpenID Connect Core §3.1.2.1: the request may come as a form POST.
    let client = app(json!({}));
    let (email, seeded) = user("post-request");
    rt().block_on(async {
        let (verifier, challenge) = pkce_pair();
        let fields: Vec<(String, String)> = [
            ("response_type", "code"),
            ("client_id", client.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", "openid"),
            ("state", "st-post"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut b = Browser::new(&gw().base, REDIRECT);
        let page = b.post(&fields).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.title(), "Sign in");
        let done = b
            .submit(&page, &[("email", email.as_str()), ("password", PASSWORD)])
            .await;
        assert_eq!(done.status, 302, "{}", done.body);
        let params = done.redirect_params();
        assert_eq!(params["state"], "st-post");
        let (status, tokens) = exchange(&client, &params["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["profile"]["reference"], seeded.profile.as_str());
    });
}

// === the page over HTTP ===

/// Signs in through the page (no MFA, one membership) and consents to everything; returns the
/// redirect's parameters.
async fn page_sign_in(
    b: &mut Browser,
    url: &str,
    email: &str,
    untick: &[&str],
) -> HashMap<String, String> {
    let page = b.get(url).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let page = b
        .submit(&page, &[("email", email), ("password", PASSWORD)])
        .await;
    let page = if page.status == 200 && page.title() == "Allow access" {
        let boxes = inputs(&page.body, "checkbox");
        let mut extra: Vec<(&str, &str)> = vec![("decision", "allow")];
        for (name, value) in &boxes {
            if !untick.contains(&value.as_str()) {
                extra.push((name.as_str(), value.as_str()));
            }
        }
        b.submit(&page, &extra).await
    } else {
        page
    };
    assert_eq!(page.status, 302, "{}", page.body);
    page.redirect_params()
}

#[test]
fn page_signs_in_consents_and_the_code_works_at_the_gateway() {
    let client = app(json!({}));
    let (email, seeded) = user("page");
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, verifier) = request(&client, "openid user/Patient.rs user/Observation.rs", &[]);
        let page = b.get(&url).await;
        assert_eq!(page.status, 200);
        assert_eq!(page.title(), "Sign in");
        assert!(
            page.body
                .contains("to continue to <strong>Test App</strong>")
        );
        assert!(page.body.contains(r#"<label for="email">Email</label>"#));
        assert!(page.body.contains(r#"autocomplete="username""#));
        let csp = page.csp.clone().unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(
            csp.contains("form-action 'self' https://app.example.org"),
            "{csp}"
        );
        assert!(b.cookies.contains_key("fhirgate-csrf"));

        // Wrong password: the same form with an inline error, nothing issued.
        let again = b
            .submit(&page, &[("email", &email), ("password", "wrong password")])
            .await;
        assert_eq!(again.status, 400);
        assert_eq!(
            again.alert().as_deref(),
            Some("Email or password is invalid")
        );
        assert!(again.body.contains(&format!(r#"value="{email}""#)));
        // An unknown user gets the same words.
        let unknown = b
            .submit(
                &page,
                &[("email", "nobody@example.com"), ("password", PASSWORD)],
            )
            .await;
        assert_eq!(
            unknown.alert().as_deref(),
            Some("Email or password is invalid")
        );

        let consent = b
            .submit(&again, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(consent.status, 200, "{}", consent.body);
        assert_eq!(consent.title(), "Allow access");
        let boxes: Vec<String> = inputs(&consent.body, "checkbox")
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(boxes, ["openid", "user/Patient.rs", "user/Observation.rs"]);
        // A scope that was not asked for is refused.
        let bad = b
            .submit(
                &consent,
                &[("decision", "allow"), ("grant", "user/*.cruds")],
            )
            .await;
        assert_eq!(bad.status, 400);
        assert_eq!(bad.alert().as_deref(), Some("Invalid scope"));
        // Unticking Observation narrows the grant.
        let done = b
            .submit(
                &consent,
                &[
                    ("decision", "allow"),
                    ("grant", "openid"),
                    ("grant", "user/Patient.rs"),
                ],
            )
            .await;
        assert_eq!(done.status, 302, "{}", done.body);
        let q = done.redirect_params();
        assert_eq!(q["state"], "st-123");
        assert!(!q.contains_key("error"));
        let session = b
            .cookies
            .get(&format!("medplum-{client}"))
            .cloned()
            .unwrap();
        assert!(session.contains('.'));

        let (status, tokens) = exchange(&client, &q["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["scope"], "openid user/Patient.rs");
        assert_eq!(tokens["profile"]["reference"], seeded.profile.as_str());
        let id = jwt_claims(tokens["id_token"].as_str().unwrap());
        assert_eq!(id["nonce"], "n-456");
        assert_eq!(id["sub"], seeded.user_id.as_str());
        // The token reads Patients at the gateway, and its scope keeps Observations out.
        let token = tokens["access_token"].as_str().unwrap();
        let http = TestGateway::client();
        let patients = http
            .get(format!("{}Patient?_count=1", gw().fhir))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(patients.status(), 200);
        let observations = http
            .get(format!("{}Observation?_count=1", gw().fhir))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(observations.status(), 403);
        // The code is single-use.
        let (status, replay) = exchange(&client, &q["code"], &verifier).await;
        assert_eq!(status, 400, "{replay}");
    });
}

#[test]
fn plain_openid_needs_no_consent_and_deny_ends_the_login() {
    let client = app(json!({}));
    let (email, _) = user("deny");
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, verifier) = request(&client, "openid", &[]);
        let q = page_sign_in(&mut b, &url, &email, &[]).await;
        let (status, tokens) = exchange(&client, &q["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");

        let mut other = Browser::new(&gw().base, REDIRECT);
        let (url, _) = request(&client, "openid profile", &[]);
        let page = other.get(&url).await;
        let consent = other
            .submit(&page, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(consent.title(), "Allow access");
        let denied = other.submit(&consent, &[("decision", "deny")]).await;
        assert_eq!(denied.status, 302);
        let q = denied.redirect_params();
        assert_eq!(q["error"], "access_denied");
        assert_eq!(q["state"], "st-123");
        // The Login is over: its form cannot be used again.
        let reuse = other
            .submit(&consent, &[("decision", "allow"), ("grant", "openid")])
            .await;
        assert_eq!(reuse.status, 400);
        assert_eq!(reuse.title(), "Sign-in stopped");
    });
}

#[test]
fn forms_are_bound_to_their_browser_and_login() {
    let client = app(json!({}));
    let (email, _) = user("csrf");
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, _) = request(&client, "openid profile", &[]);
        let page = b.get(&url).await;
        // A post from elsewhere has no CSRF cookie: refused, nothing signed in.
        let mut attacker = Browser::new(&gw().base, REDIRECT);
        let forged = attacker
            .submit(&page, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(forged.status, 403);
        assert_eq!(
            forged.alert().as_deref(),
            Some("This form has expired. Please sign in again.")
        );
        let consent = b
            .submit(&page, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(consent.title(), "Allow access");
        // The Login's step form in another browser (with its own CSRF cookie) is refused too.
        let _ = attacker.get(&url).await;
        let mut fields = consent.hidden();
        let theirs = attacker.cookies["fhirgate-csrf"].clone();
        for f in &mut fields {
            if f.0 == "csrf" {
                f.1 = theirs.clone();
            }
        }
        fields.push(("decision".into(), "allow".into()));
        fields.push(("grant".into(), "openid".into()));
        let stolen = attacker.post(&fields).await;
        assert_eq!(stolen.status, 403, "{}", stolen.body);
        assert_eq!(stolen.title(), "Sign-in stopped");
        // The owner still can.
        let done = b
            .submit(&consent, &[("decision", "allow"), ("grant", "openid")])
            .await;
        assert_eq!(done.status, 302, "{}", done.body);
        assert!(done.redirect_params().contains_key("code"));
    });
}

#[test]
fn several_memberships_show_the_profile_choice() {
    let client = app(json!({}));
    let (email, seeded) = user("profiles");
    let mut second = UserSeed::new(&email, PASSWORD);
    second.profile_type = "Patient".into();
    second.first_name = "Second".into();
    let (membership, profile) = common::people::add_membership(gw(), &seeded.user_id, &second);
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, verifier) = request(&client, "openid", &[]);
        let page = b.get(&url).await;
        let choice = b
            .submit(&page, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(choice.status, 200, "{}", choice.body);
        assert_eq!(choice.title(), "Choose a profile");
        let radios: Vec<String> = inputs(&choice.body, "radio")
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(radios.len(), 2);
        assert!(radios.contains(&membership));
        assert!(choice.body.contains("Second User"));
        let done = b.submit(&choice, &[("profile", &membership)]).await;
        assert_eq!(done.status, 302, "{}", done.body);
        let (status, tokens) = exchange(&client, &done.redirect_params()["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["profile"]["reference"], profile.as_str());
    });
}

// === case 31: prompt=none and sessions ===

#[test]
fn case_31_prompt_none_and_browser_sessions() {
    let client = app(json!({}));
    let (email, _) = user("session");
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        // No session yet.
        let (url, _) = request(&client, "openid user/Patient.rs", &[("prompt", "none")]);
        let page = b.get(&url).await;
        assert_eq!(page.status, 302);
        let q = page.redirect_params();
        assert_eq!(q["error"], "login_required");
        assert_eq!(q["error_description"], "Login required");
        assert_eq!(q["state"], "st-123");

        let (url, verifier) = request(&client, "openid user/Patient.rs", &[]);
        let q = page_sign_in(&mut b, &url, &email, &[]).await;
        let first_code = q["code"].clone();
        let (status, tokens) = exchange(&client, &first_code, &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        let id_token = tokens["id_token"].as_str().unwrap().to_string();
        let access = tokens["access_token"].as_str().unwrap().to_string();

        // With the session cookie: a new code at once.
        let (url, verifier) = request(&client, "openid user/Patient.rs", &[("prompt", "none")]);
        let page = b.get(&url).await;
        assert_eq!(page.status, 302, "{}", page.body);
        let q = page.redirect_params();
        assert!(!q.contains_key("error"), "{q:?}");
        assert_ne!(q["code"], first_code);
        assert_eq!(q["state"], "st-123");
        let (status, tokens) = exchange(&client, &q["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["scope"], "openid user/Patient.rs");

        // Issue 10: with id_token_hint and no cookie, Medplum (and fhirgate before) minted a
        // fresh code, again and again: a leaked token became permanent access. Only the
        // browser's cookie is a session.
        let mut fresh = Browser::new(&gw().base, REDIRECT);
        let (url, _) = request(
            &client,
            "openid",
            &[("prompt", "none"), ("id_token_hint", &id_token)],
        );
        let page = fresh.get(&url).await;
        assert_eq!(page.status, 302);
        let q = page.redirect_params();
        assert_eq!(q["error"], "login_required", "{q:?}");
        assert!(!q.contains_key("code"), "{q:?}");
        // The access token or the refresh token as a hint: no more.
        let (url, _) = request(
            &client,
            "openid",
            &[("prompt", "none"), ("id_token_hint", &access)],
        );
        let page = fresh.get(&url).await;
        assert_eq!(page.redirect_params()["error"], "login_required");
        // With the cookie, a hint naming the cookie's own Login still works.
        let (url, verifier) = request(
            &client,
            "openid",
            &[("prompt", "none"), ("id_token_hint", &id_token)],
        );
        let page = b.get(&url).await;
        let q = page.redirect_params();
        assert!(q.contains_key("code"), "{q:?}");
        let (status, _) = exchange(&client, &q["code"], &verifier).await;
        assert_eq!(status, 200);

        // A session without prompt: the consent page, with the new request's scope; nothing
        // changes until it is answered.
        let (url, verifier) = request(&client, "openid user/Patient.rs", &[]);
        let page = b.get(&url).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.title(), "Allow access");
        assert_eq!(page.field("step"), "resume");
        assert!(
            inputs(&page.body, "checkbox")
                .iter()
                .any(|(_, v)| v == "user/Patient.rs")
        );
        let done = b
            .submit(
                &page,
                &[
                    ("decision", "allow"),
                    ("grant", "openid"),
                    ("grant", "user/Patient.rs"),
                ],
            )
            .await;
        assert_eq!(done.status, 302, "{}", done.body);
        let (status, tokens) = exchange(&client, &done.redirect_params()["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");

        // prompt=login ignores the session.
        let (url, _) = request(&client, "openid", &[("prompt", "login")]);
        let page = b.get(&url).await;
        assert_eq!(page.title(), "Sign in");

        // Signed out: the session is gone.
        let logout = TestGateway::client()
            .post(format!("{}oauth2/logout", gw().base))
            .bearer_auth(&access)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(logout.status(), 200);
        let (url, _) = request(&client, "openid", &[("prompt", "none")]);
        let page = b.get(&url).await;
        assert_eq!(page.redirect_params()["error"], "login_required");
        let (url, _) = request(
            &client,
            "openid",
            &[("prompt", "none"), ("id_token_hint", &id_token)],
        );
        let page = fresh.get(&url).await;
        assert_eq!(page.redirect_params()["error"], "login_required");
    });
}

#[test]
fn a_session_is_only_for_its_own_client() {
    let client = app(json!({}));
    let other = app(json!({}));
    let (email, _) = user("per-client");
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, _) = request(&client, "openid", &[]);
        let _ = page_sign_in(&mut b, &url, &email, &[]).await;
        // The cookie is named for the first client; a forged one for the other is refused.
        let value = b.cookies[&format!("medplum-{client}")].clone();
        b.cookies.insert(format!("medplum-{other}"), value);
        let (url, _) = request(&other, "openid", &[("prompt", "none")]);
        let page = b.get(&url).await;
        assert_eq!(page.redirect_params()["error"], "login_required");
    });
}

// === MFA on the page ===

#[test]
fn page_asks_for_the_mfa_code_and_shows_a_wrong_one_inline() {
    let client = app(json!({}));
    let e = unique_email("page-mfa");
    let secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP".to_string();
    let mut s = UserSeed::new(&e, PASSWORD);
    s.mfa_secret = Some(secret.clone());
    seed(gw(), &s);
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, verifier) = request(&client, "openid", &[]);
        let page = b.get(&url).await;
        let mfa = b
            .submit(&page, &[("email", &e), ("password", PASSWORD)])
            .await;
        assert_eq!(mfa.status, 200, "{}", mfa.body);
        assert_eq!(mfa.title(), "Two-step verification");
        assert!(mfa.body.contains(r#"autocomplete="one-time-code""#));
        let wrong = b
            .submit(&mfa, &[("token", &totp_code(&secret, now() + 3600))])
            .await;
        assert_eq!(wrong.status, 400);
        assert_eq!(wrong.alert().as_deref(), Some("Invalid MFA token"));
        let (code, _) = code_after(&secret, 0);
        let done = b.submit(&wrong, &[("token", &code)]).await;
        assert_eq!(done.status, 302, "{}", done.body);
        let (status, tokens) = exchange(&client, &done.redirect_params()["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
    });
}

#[test]
fn page_enrols_a_user_whose_mfa_is_required() {
    let client = app(json!({}));
    let e = unique_email("page-enroll");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.mfa_required = true;
    let seeded = seed(gw(), &s);
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, verifier) = request(&client, "openid", &[]);
        let page = b.get(&url).await;
        let enroll = b
            .submit(&page, &[("email", &e), ("password", PASSWORD)])
            .await;
        assert_eq!(enroll.status, 200, "{}", enroll.body);
        assert_eq!(enroll.title(), "Set up two-step verification");
        assert!(unescape(&enroll.body).contains(r#"src="data:image/png;base64,iVBORw0KGgo"#));
        let start = enroll.body.find(r#"<span class="secret">"#).unwrap() + 21;
        let end = enroll.body[start..].find("</span>").unwrap() + start;
        let secret = enroll.body[start..end].to_string();
        let (code, _) = code_after(&secret, 0);
        let done = b.submit(&enroll, &[("token", &code)]).await;
        assert_eq!(done.status, 302, "{}", done.body);
        let (status, tokens) = exchange(&client, &done.redirect_params()["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        let enrolled = on_gateway(gw(), |state| async move {
            state
                .store
                .read("User", &seeded.user_id)
                .await
                .unwrap()
                .unwrap()
                .content
        });
        assert_eq!(enrolled["mfaEnrolled"], true);
    });
}

// === case 54: the MFA endpoints ===

fn login_body(email: &str) -> Value {
    let (_, challenge) = pkce_pair();
    json!({"email": email, "password": PASSWORD, "codeChallenge": challenge, "codeChallengeMethod": "S256"})
}

#[test]
fn case_54_mfa_enrol_verify_disable() {
    let (email, _) = user("mfa");
    rt().block_on(async {
        let tokens = sign_in(gw(), &email, PASSWORD, None, "openid").await;
        let token = tokens.access_token.as_str();

        // Before any secret exists.
        let (status, body) = gw()
            .post("auth/mfa/enroll", Some(token), &json!({"token": "123456"}))
            .await;
        assert_eq!(
            (status, outcome_text(&body)),
            (400, "Secret not found"),
            "{body}"
        );
        let (status, body) = gw()
            .post("auth/mfa/disable", Some(token), &json!({"token": "123456"}))
            .await;
        assert_eq!(
            (status, outcome_text(&body)),
            (400, "Secret not found"),
            "{body}"
        );
        let (status, login) = auth_login(gw(), &login_body(&email)).await;
        assert_eq!(status, 200, "{login}");
        let (status, body) = post_json(
            gw(),
            "auth/mfa/verify",
            &json!({"login": login["login"], "token": "123456"}),
        )
        .await;
        assert_eq!(
            (status, outcome_text(&body)),
            (400, "User not enrolled in MFA")
        );

        // Status creates the secret; it stays the same until enrolment.
        let (status, st) = gw().get("auth/mfa/status", Some(token)).await;
        assert_eq!(status, 200, "{st}");
        assert_eq!(st["enrolled"], false);
        let uri = st["enrollUri"].as_str().unwrap().to_string();
        assert!(
            uri.starts_with(&format!(
                "otpauth://totp/Medplum%20-%20{}?secret=",
                email.replace('@', "%40")
            )),
            "{uri}"
        );
        assert!(uri.ends_with("&issuer=medplum.com"), "{uri}");
        assert!(
            st["enrollQrCode"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,iVBORw0KGgo")
        );
        let (_, again) = gw().get("auth/mfa/status", Some(token)).await;
        assert_eq!(again["enrollUri"], uri.as_str());
        let secret = secret_of(&uri);

        let (status, body) = gw()
            .post("auth/mfa/enroll", Some(token), &json!({"token": "12345x"}))
            .await;
        assert_eq!((status, outcome_text(&body)), (400, "Invalid token"));
        let (status, body) = gw().post("auth/mfa/enroll", Some(token), &json!({})).await;
        assert_eq!((status, outcome_text(&body)), (400, "Missing token"));
        let (code, used) = code_after(&secret, 0);
        let (status, body) = gw()
            .post("auth/mfa/enroll", Some(token), &json!({"token": code}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], "ok");
        let (code2, _) = code_after(&secret, used);
        let (status, body) = gw()
            .post("auth/mfa/enroll", Some(token), &json!({"token": code2}))
            .await;
        assert_eq!((status, outcome_text(&body)), (400, "Already enrolled"));
        let (_, st) = gw().get("auth/mfa/status", Some(token)).await;
        assert_eq!(st["enrolled"], true, "{st}");
        assert_eq!(st["enrolledMethods"], json!(["totp"]), "{st}");
        assert!(
            st.get("enrollUri").is_none() && st.get("enrollQrCode").is_none(),
            "an enrolled authenticator's secret is never shown again: {st}"
        );

        // Sign-in now asks for the code, and gives no code before it.
        let (status, login) = auth_login(gw(), &login_body(&email)).await;
        assert_eq!(status, 200, "{login}");
        assert_eq!(login["mfaRequired"], true, "{login}");
        assert!(login.get("code").is_none());
        let login_id = login["login"].as_str().unwrap().to_string();
        let (status, body) = post_json(
            gw(),
            "auth/mfa/verify",
            &json!({"login": login_id, "token": ""}),
        )
        .await;
        assert_eq!((status, outcome_text(&body)), (400, "Missing token"));
        let (status, body) = post_json(gw(), "auth/mfa/verify", &json!({"token": "123456"})).await;
        assert_eq!((status, outcome_text(&body)), (400, "Missing login"));
        let (status, body) = post_json(
            gw(),
            "auth/mfa/verify",
            &json!({"login": login_id, "token": totp_code(&secret, now() + 3600)}),
        )
        .await;
        assert_eq!((status, outcome_text(&body)), (400, "Invalid MFA token"));
        // The code of a step already used is refused (RFC 6238 §5.2).
        let (status, body) = post_json(
            gw(),
            "auth/mfa/verify",
            &json!({"login": login_id, "token": code}),
        )
        .await;
        assert_eq!((status, outcome_text(&body)), (400, "Invalid MFA token"));
        let (code3, used) = code_after(&secret, used);
        let (status, body) = post_json(
            gw(),
            "auth/mfa/verify",
            &json!({"login": login_id, "token": code3}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["login"], login_id.as_str());
        assert!(body["code"].is_string(), "{body}");
        let (status, body) = post_json(
            gw(),
            "auth/mfa/verify",
            &json!({"login": login_id, "token": code3}),
        )
        .await;
        assert_eq!(
            (status, outcome_text(&body)),
            (400, "Login already verified")
        );

        // Disable: token checks, then a new secret.
        let (status, body) = gw().post("auth/mfa/disable", Some(token), &json!({})).await;
        assert_eq!((status, outcome_text(&body)), (400, "Missing token"));
        let (status, body) = gw()
            .post("auth/mfa/disable", Some(token), &json!({"token": "12345x"}))
            .await;
        assert_eq!((status, outcome_text(&body)), (400, "Invalid token"));
        let (code4, _) = code_after(&secret, used);
        let (status, body) = gw()
            .post("auth/mfa/disable", Some(token), &json!({"token": code4}))
            .await;
        assert_eq!(status, 200, "{body}");
        // Issue 10: weaker credentials end every session, this one included.
        let (status, _) = gw()
            .post("auth/mfa/disable", Some(token), &json!({"token": code4}))
            .await;
        assert_eq!(status, 401, "the session ended with the MFA reset");
        let fresh = sign_in(gw(), &email, PASSWORD, None, "openid").await;
        let token = fresh.access_token.as_str();
        let (status, body) = gw()
            .post("auth/mfa/disable", Some(token), &json!({"token": code4}))
            .await;
        assert_eq!(
            (status, outcome_text(&body)),
            (400, "User not enrolled in MFA")
        );
        let (_, st) = gw().get("auth/mfa/status", Some(token)).await;
        assert_eq!(st["enrolled"], false);
        assert_ne!(st["enrollUri"], uri.as_str());
    });
}

#[test]
fn case_54_forced_enrolment_at_login() {
    let e = unique_email("forced");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.mfa_required = true;
    let seeded = seed(gw(), &s);
    // Invite gives such a user a secret; so does this test.
    let secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ".to_string();
    {
        let secret = secret.clone();
        let id = seeded.user_id.clone();
        on_gateway(gw(), move |state| async move {
            let mut u = state.store.read("User", &id).await.unwrap().unwrap();
            u.content["mfaSecret"] = json!(secret);
            state
                .store
                .put(
                    u.content.clone(),
                    None,
                    &fhirgate::control::index::index_rows(&u.content),
                    None,
                    false,
                )
                .await
                .unwrap();
        });
    }
    rt().block_on(async {
        let (status, login) = auth_login(gw(), &login_body(&e)).await;
        assert_eq!(status, 200, "{login}");
        assert_eq!(login["mfaEnrollRequired"], true, "{login}");
        assert_eq!(
            login["enrollUri"].as_str(),
            Some(
                format!(
                    "otpauth://totp/Medplum%20-%20{}?secret={secret}&issuer=medplum.com",
                    e.replace('@', "%40")
                )
                .as_str()
            ),
            "{login}"
        );
        assert!(login.get("code").is_none());
        let login_id = login["login"].as_str().unwrap();
        let (status, body) = post_json(
            gw(),
            "auth/mfa/login-enroll",
            &json!({"login": login_id, "token": "12345x"}),
        )
        .await;
        assert_eq!((status, outcome_text(&body)), (400, "Invalid MFA token"));
        let (code, used) = code_after(&secret, 0);
        let (status, body) = post_json(
            gw(),
            "auth/mfa/login-enroll",
            &json!({"login": login_id, "token": code}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["code"].is_string(), "{body}");
        let (code2, _) = code_after(&secret, used);
        let (status, body) = post_json(
            gw(),
            "auth/mfa/login-enroll",
            &json!({"login": login_id, "token": code2}),
        )
        .await;
        assert_eq!((status, outcome_text(&body)), (400, "Already enrolled"));
    });
}

#[test]
fn mfa_attempts_are_limited_per_login_and_per_user() {
    let e = unique_email("limits");
    let secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXQ".to_string();
    let mut s = UserSeed::new(&e, PASSWORD);
    s.mfa_secret = Some(secret.clone());
    seed(gw(), &s);
    rt().block_on(async {
        let verify = |login: String, token: String| async move {
            post_json(
                gw(),
                "auth/mfa/verify",
                &json!({"login": login, "token": token}),
            )
            .await
        };
        // A code that is never right now: its step is far away.
        let wrong = totp_code(&secret, now() + 3600);
        for round in 0..2 {
            let (_, login) = auth_login(gw(), &login_body(&e)).await;
            let id = login["login"].as_str().unwrap().to_string();
            for attempt in 0..5 {
                let (status, body) = verify(id.clone(), wrong.clone()).await;
                assert_eq!(
                    (status, outcome_text(&body)),
                    (400, "Invalid MFA token"),
                    "round {round} attempt {attempt}"
                );
            }
            // The fifth wrong code revoked the Login.
            let (status, body) = verify(id.clone(), wrong.clone()).await;
            assert_eq!((status, outcome_text(&body)), (400, "Login revoked"));
        }
        // Ten wrong codes within 15 minutes: even the right code is refused for now.
        let (_, login) = auth_login(gw(), &login_body(&e)).await;
        let id = login["login"].as_str().unwrap().to_string();
        let (code, _) = code_after(&secret, 0);
        let (status, body) = verify(id, code).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(outcome_text(&body), "Too Many Requests");
    });
}

#[test]
fn mfa_endpoints_need_a_signed_in_user() {
    rt().block_on(async {
        let http = TestGateway::client();
        let resp = http
            .get(format!("{}auth/mfa/status", gw().base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        // A client is no user: nothing to enrol.
        let admin = gw().admin_token().await;
        let (status, _) = gw().get("auth/mfa/status", Some(&admin)).await;
        assert_eq!(status, 403);
    });
}

#[test]
fn a_standalone_launch_asks_which_patient_and_the_tokens_carry_it() {
    let client = app(json!({}));
    let (email, _) = user("picker");
    rt().block_on(async {
        let admin = gw().admin_token().await;
        let family = format!("Picker{}", uuid::Uuid::new_v4().simple());
        let mut ids = Vec::new();
        for given in ["Ana", "Ben"] {
            let r = TestGateway::client()
                .post(format!("{}Patient", gw().fhir))
                .bearer_auth(&admin)
                .json(
                    &json!({"resourceType": "Patient", "birthDate": "1980-02-03",
                              "name": [{"family": family, "given": [given]}]}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            ids.push(
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, verifier) = request(&client, "openid launch/patient patient/*.rs", &[]);
        let page = b.get(&url).await;
        let consent = b
            .submit(&page, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(consent.title(), "Allow access", "{}", consent.body);
        let picker = b
            .submit(
                &consent,
                &[
                    ("decision", "allow"),
                    ("grant", "openid"),
                    ("grant", "launch/patient"),
                    ("grant", "patient/*.rs"),
                ],
            )
            .await;
        assert_eq!(picker.status, 200, "{}", picker.body);
        assert_eq!(picker.title(), "Choose a patient");
        // Search by name: both patients, named and dated.
        let found = b
            .submit(&picker, &[("decision", "search"), ("q", &family)])
            .await;
        assert_eq!(found.status, 200, "{}", found.body);
        let choices: Vec<String> = inputs(&found.body, "radio")
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(choices.len(), 2, "{}", found.body);
        assert!(ids.iter().all(|id| choices.contains(id)), "{choices:?}");
        assert!(found.body.contains(&format!("{family}, Ana")));
        assert!(found.body.contains("1980-02-03"));
        // A patient that does not exist (or that the person may not read) cannot be chosen.
        let refused = b
            .submit(
                &found,
                &[("decision", "choose"), ("patient", "no-such-patient")],
            )
            .await;
        assert_eq!(refused.status, 400);
        assert_eq!(
            refused.alert().as_deref(),
            Some("That patient cannot be chosen.")
        );
        let done = b
            .submit(&found, &[("decision", "choose"), ("patient", &ids[1])])
            .await;
        assert_eq!(done.status, 302, "{}", done.body);
        let q = done.redirect_params();
        let (status, tokens) = exchange(&client, &q["code"], &verifier).await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["patient"], ids[1].as_str());
        assert_eq!(tokens["need_patient_banner"], true);
        // patient/*.rs now reaches that patient only.
        let token = tokens["access_token"].as_str().unwrap();
        let read = |id: String| async move {
            bearer_get_status(&format!("{}Patient/{id}", gw().fhir), token).await
        };
        assert_eq!(read(ids[1].clone()).await, 200);
        assert_ne!(read(ids[0].clone()).await, 200);
    });
}

#[test]
fn the_patient_picker_is_no_way_around_mfa() {
    // Signed in with the password only, the person is on the MFA page: the picker's step must
    // not answer (it lists patients' names) before the code is verified.
    let client = app(json!({}));
    let email = unique_email("picker-mfa");
    let mut s = UserSeed::new(&email, PASSWORD);
    s.mfa_secret = Some("KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU".into());
    seed(gw(), &s);
    rt().block_on(async {
        let mut b = Browser::new(&gw().base, REDIRECT);
        let (url, _) = request(&client, "openid launch/patient patient/*.rs", &[]);
        let page = b.get(&url).await;
        let mfa = b
            .submit(&page, &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(mfa.title(), "Two-step verification", "{}", mfa.body);
        let mut fields: Vec<(String, String)> = mfa
            .hidden()
            .into_iter()
            .map(|(k, v)| {
                if k == "step" {
                    (k, "patient".into())
                } else {
                    (k, v)
                }
            })
            .collect();
        fields.push(("decision".into(), "search".into()));
        fields.push(("q".into(), String::new()));
        let answer = b.post(&fields).await;
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert!(!answer.body.contains("Choose a patient"), "{}", answer.body);
    });
}
