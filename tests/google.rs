//! Google sign-in (docs/medplum-compat.md §2.11) against a real fhirgate in front of the real
//! FHIR upstream, with a local key server standing in for Google's: ID tokens signed as Google
//! signs them (RS256, `kid`, Google's claims) are accepted for the configured client ids, and
//! every other token is refused with Medplum's texts. `POST /auth/google` answers as
//! `/auth/login` does (the Medplum SDK's `startGoogleLogin`), never asks for an MFA code, and
//! the sign-in page offers "Sign in with Google" and accepts the credential Google hands it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::assertion::{AssertionKey, assertion, rsa_assertion_key, serve_jwks};
use common::gateway::TestGateway;
use common::http::{outcome_expression, outcome_text, rt, send};
use common::page::Browser;
use common::people::{
    UserSeed, jwt_claims, pkce_pair, seed, seed_client, seed_project, token_request, unique_email,
};
use common::upstream::FhirUpstream;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const GOOGLE_CLIENT: &str = "fhirgate-test.apps.googleusercontent.com";
const ISSUER: &str = "https://accounts.google.test";
const REDIRECT: &str = "https://app.example.org/callback";

/// A Google ID token for `email`, signed with `key`, with `changes` merged into its claims.
fn credential(key: &AssertionKey, email: &str, changes: Value) -> String {
    let now = fhirgate::store::now_unix();
    let mut claims = json!({
        "iss": ISSUER, "aud": GOOGLE_CLIENT, "azp": GOOGLE_CLIENT,
        "sub": "1043", "email": email, "email_verified": true,
        "given_name": "Gail", "family_name": "Google", "picture": "https://example.com/p.png",
        "iat": now, "exp": now + 600,
    });
    for (k, v) in changes.as_object().unwrap() {
        claims[k] = v.clone();
    }
    assertion(key, &claims)
}

/// A gateway that accepts Google credentials for [`GOOGLE_CLIENT`], checked against the keys
/// at `jwks_url`.
fn gateway(upstream: &FhirUpstream, jwks_url: &str, register: bool) -> TestGateway {
    let url = jwks_url.to_string();
    TestGateway::start_with(&upstream.base_url, move |c| {
        c.google_client_ids = vec![GOOGLE_CLIENT.into()];
        c.google_jwks_url = Some(url);
        c.google_issuer = Some(ISSUER.into());
        c.register_enabled = Some(register);
    })
}

async fn google(gw: &TestGateway, body: &Value) -> (u16, Value) {
    send(
        TestGateway::client()
            .post(format!("{}auth/google", gw.base))
            .json(&body),
    )
    .await
}

#[test]
fn google_credentials_sign_in_as_the_sdk_sends_them() {
    let upstream = FhirUpstream::start();
    let rt = rt();
    let key = rsa_assertion_key(Algorithm::RS256);
    let other_key = rsa_assertion_key(Algorithm::RS256);
    let jwks_url = rt.block_on(serve_jwks(key.jwks.clone()));
    let gw = gateway(&upstream, &jwks_url, false);
    // Enrolled in MFA: Google vouches for the person, so no code is asked (as Medplum).
    let email = unique_email("google");
    let mut s = UserSeed::new(&email, "a password nobody types");
    s.mfa_secret = Some("KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU".into());
    let seeded = seed(&gw, &s);
    rt.block_on(async {
        let (verifier, challenge) = pkce_pair();
        let (status, login) = google(
            &gw,
            &json!({"googleClientId": GOOGLE_CLIENT,
                    "googleCredential": credential(&key, &email.to_uppercase(), json!({})),
                    "codeChallenge": challenge, "codeChallengeMethod": "S256"}),
        )
        .await;
        assert_eq!(status, 200, "{login}");
        let code = login["code"].as_str().unwrap_or_else(|| panic!("{login}"));
        let (status, tokens) = token_request(
            &gw,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(status, 200, "{tokens}");
        assert_eq!(tokens["profile"]["reference"], seeded.profile.as_str());
        // The default scope of a Google sign-in is "openid offline".
        assert!(tokens["refresh_token"].is_string(), "{tokens}");
        let access = tokens["access_token"].as_str().unwrap();
        assert_eq!(jwt_claims(access)["login_id"], login["login"]);
        let (status, _) = send(
            TestGateway::client()
                .get(format!("{}Patient?_count=1", gw.fhir))
                .bearer_auth(access),
        )
        .await;
        assert_eq!(status, 200);

        // Refusals, with Medplum's texts; nothing signs in.
        let now = fhirgate::store::now_unix();
        let body = |credential: String| {
            json!({"googleClientId": GOOGLE_CLIENT, "googleCredential": credential})
        };
        let verification_failed = [
            ("another audience", credential(&key, &email, json!({"aud": "someone-else"}))),
            ("another issuer", credential(&key, &email, json!({"iss": "https://evil.test"}))),
            ("expired", credential(&key, &email, json!({"exp": now - 120, "iat": now - 700}))),
            ("another key", credential(&other_key, &email, json!({}))),
            ("unverified e-mail", credential(&key, &email, json!({"email_verified": false}))),
            ("not a JWT", "not-a-jwt".to_string()),
        ];
        for (why, c) in verification_failed {
            let (status, b) = google(&gw, &body(c)).await;
            assert_eq!(status, 400, "{why}: {b}");
            assert_eq!(outcome_text(&b), "Verification failed", "{why}");
        }
        // A token signed with HS256 over the RSA key's public half is never accepted.
        let mut forged = credential(&key, &email, json!({})).split('.').map(String::from).collect::<Vec<_>>();
        forged[0] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            format!(r#"{{"alg":"HS256","kid":"{}"}}"#, key.kid),
        );
        let (status, b) = google(&gw, &body(forged.join("."))).await;
        assert_eq!((status, outcome_text(&b)), (400, "Verification failed"));

        let (status, b) = google(
            &gw,
            &json!({"googleClientId": "not-ours.apps.googleusercontent.com",
                    "googleCredential": credential(&key, &email, json!({"aud": "not-ours.apps.googleusercontent.com"}))}),
        )
        .await;
        assert_eq!((status, outcome_text(&b)), (400, "Invalid googleClientId"));
        let (status, b) = google(&gw, &body(credential(&key, &unique_email("nobody"), json!({})))).await;
        assert_eq!((status, outcome_text(&b)), (400, "User not found"));
        let (status, b) = google(
            &gw,
            &json!({"googleClientId": GOOGLE_CLIENT, "createUser": true,
                    "googleCredential": credential(&key, &unique_email("newbie"), json!({}))}),
        )
        .await;
        assert_eq!((status, outcome_text(&b)), (400, "Registration is disabled"));
        for (missing, field) in [("googleClientId", "googleClientId"), ("googleCredential", "googleCredential")] {
            let mut b = json!({"googleClientId": GOOGLE_CLIENT, "googleCredential": credential(&key, &email, json!({}))});
            b.as_object_mut().unwrap().remove(missing);
            let (status, b) = google(&gw, &b).await;
            assert_eq!(status, 400);
            assert_eq!(outcome_text(&b), format!("Missing {field}"));
            assert_eq!(outcome_expression(&b), field);
        }
    });
}

#[test]
fn a_projects_own_google_client_id_signs_in_to_that_project() {
    let upstream = FhirUpstream::start();
    let rt = rt();
    let key = rsa_assertion_key(Algorithm::RS256);
    let jwks_url = rt.block_on(serve_jwks(key.jwks.clone()));
    let gw = gateway(&upstream, &jwks_url, true);
    let site_client = "clinic-site.apps.googleusercontent.com";
    let project = seed_project(
        &gw,
        json!({"site": [{"name": "clinic", "domain": ["clinic.example"], "googleClientId": site_client}]}),
    );
    let email = unique_email("site");
    let mut s = UserSeed::new(&email, "a password nobody types");
    s.project = Some(project.clone());
    seed(&gw, &s);
    rt.block_on(async {
        let (status, login) = google(
            &gw,
            &json!({"googleClientId": site_client,
                    "googleCredential": credential(&key, &email, json!({"aud": site_client}))}),
        )
        .await;
        assert_eq!(status, 200, "{login}");
        assert!(login["code"].is_string(), "{login}");
        // Registration: a new person gets a User (server-level) and a Login without a project.
        let newbie = unique_email("newbie");
        let (status, login) = google(
            &gw,
            &json!({"googleClientId": GOOGLE_CLIENT, "createUser": true, "projectId": "new",
                    "googleCredential": credential(&key, &newbie, json!({}))}),
        )
        .await;
        assert_eq!(status, 200, "{login}");
        assert!(
            login["login"].is_string() && login.get("code").is_none(),
            "{login}"
        );
    });
}

#[test]
fn the_sign_in_page_offers_google_and_accepts_its_credential() {
    let upstream = FhirUpstream::start();
    let rt = rt();
    let key = rsa_assertion_key(Algorithm::RS256);
    let jwks_url = rt.block_on(serve_jwks(key.jwks.clone()));
    let gw = gateway(&upstream, &jwks_url, false);
    let email = unique_email("google-page");
    seed(&gw, &UserSeed::new(&email, "a password nobody types"));
    let (client, _) = seed_client(
        &gw,
        None,
        json!({"name": "Page app", "redirectUris": [REDIRECT]}),
        None,
    );
    rt.block_on(async {
        let mut b = Browser::new(&gw.base, REDIRECT);
        let (verifier, challenge) = pkce_pair();
        let mut url = url::Url::parse(&format!("{}oauth2/authorize", gw.base)).unwrap();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &client)
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("scope", "openid")
            .append_pair("state", "g-1")
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        let page = b.get(url.as_str()).await;
        assert_eq!(page.status, 200, "{}", page.body);
        // Google Identity Services' button, with this server's Google client id, and a CSP that
        // lets exactly Google's script and frame in.
        assert!(
            page.body
                .contains(&format!(r#"data-client_id="{GOOGLE_CLIENT}""#)),
            "{}",
            page.body
        );
        assert!(page.body.contains("https://accounts.google.com/gsi/client"));
        let csp = page.csp.clone().unwrap();
        assert!(
            csp.contains("script-src 'self' https://accounts.google.com/gsi/client"),
            "{csp}"
        );
        assert!(
            csp.contains("frame-src https://accounts.google.com/gsi/"),
            "{csp}"
        );
        // What Google's script posts back through the page's form.
        let mut form = page.form("google-form");
        // Google's script fills the (empty) credential field.
        form.retain(|(name, _)| name != "credential");
        let mut fields = form.clone();
        fields.push(("credential".into(), credential(&key, &email, json!({}))));
        let done = b.post(&fields).await;
        assert_eq!(done.status, 302, "{}", done.body);
        let q = done.redirect_params();
        assert_eq!(q["state"], "g-1");
        let (status, tokens) = token_request(
            &gw,
            &[
                ("grant_type", "authorization_code"),
                ("code", &q["code"]),
                ("code_verifier", &verifier),
                ("client_id", &client),
                ("redirect_uri", REDIRECT),
            ],
        )
        .await;
        assert_eq!(status, 200, "{tokens}");
        // A forged credential: the sign-in page again, with the reason, and no code.
        let mut fields = form;
        fields.push((
            "credential".into(),
            credential(&key, &email, json!({"aud": "x"})),
        ));
        let refused = b.post(&fields).await;
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert_eq!(refused.alert().as_deref(), Some("Google sign-in failed"));
    });
}
