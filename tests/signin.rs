//! Sign-in, tokens and revocation through a real fhirgate in front of the real FHIR upstream:
//! reference docs/medplum-compat.md §12 cases 10–25, 27, 36–47 and 55 (the case number is in each
//! test's name), with Medplum's exact texts, plus fhirgate's stricter rules (docs/contract.md §2): codes
//! expire and are bound to their redirect URI, redemption and refresh rotation are atomic,
//! MFA gates the code, refresh tokens are no access tokens, a revoked Login's tokens fail on
//! the very next request, introspection needs client authentication, RFC 7009 revocation.
//!
//! One upstream and one gateway serve every test of this file; each test makes its own users
//! and clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::assertion::{assertion, assertion_key, serve_jwks};
use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway, shared as gw};
use common::http::{basic, outcome_text, rt, send, status, with_authorization};
use common::people::{
    Seeded, TokenResponse, UserSeed, add_membership, auth_login, default_project, jwt_claims,
    on_gateway, pkce_pair, post_json, seed, seed_client, seed_policy, seed_project, seed_user,
    sign_in, super_admin_project, token_request, unique_email,
};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";

fn oauth_error(error: &str, description: &str) -> Value {
    json!({"error": error, "error_description": description})
}

/// A user with one Practitioner membership in the default project.
fn user(tag: &str) -> (String, Seeded) {
    let e = unique_email(tag);
    let s = seed(gw(), &UserSeed::new(&e, PASSWORD));
    (e, s)
}

/// `/auth/login` for `email`; the body must carry a code; returns (login id, code).
async fn login_code(body: Value) -> (String, String) {
    let (status, login) = auth_login(gw(), &body).await;
    assert_eq!(status, 200, "{login}");
    (
        login["login"].as_str().expect("login").to_string(),
        login["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no code: {login}"))
            .to_string(),
    )
}

/// A FHIR read through the gateway with a Bearer token; returns the status.
async fn fhir_status(token: &str) -> u16 {
    status(
        TestGateway::client()
            .get(format!("{}Patient?_count=1", gw().fhir))
            .bearer_auth(token),
    )
    .await
}

async fn get_with(path: &str, auth: Option<&str>) -> (u16, Value) {
    send(with_authorization(
        TestGateway::client().get(format!("{}{path}", gw().base)),
        auth,
    ))
    .await
}

async fn post_with(path: &str, auth: Option<&str>, body: &Value) -> (u16, Value) {
    let req = TestGateway::client()
        .post(format!("{}{path}", gw().base))
        .json(body);
    send(with_authorization(req, auth)).await
}

fn revoke_in_store(login_id: &str) {
    let id = login_id.to_string();
    on_gateway(gw(), move |state| async move {
        assert!(state.store.revoke_login(&id).await.unwrap());
        state.refresh().await.unwrap();
    });
}

// === token endpoint: authorization_code ===

#[test]
fn case_10_missing_and_unknown_code() {
    rt().block_on(async {
        let (s, b) = token_request(gw(), &[("grant_type", "authorization_code")]).await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_request", "Missing code"))
        );
        let (s, b) =
            token_request(gw(), &[("grant_type", "authorization_code"), ("code", "")]).await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_request", "Missing code"))
        );
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", "0123456789abcdef0123456789abcdef"),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_request", "Invalid code"))
        );
    });
}

#[test]
fn case_11_login_without_challenge_needs_verification_context() {
    let (e, _) = user("c11");
    let (client, _) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let (_, code) =
            login_code(json!({"email": e, "password": PASSWORD, "clientId": client})).await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("client_id", &client),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (
                400,
                oauth_error("invalid_request", "Missing verification context")
            )
        );
    });
}

#[test]
fn case_12_plain_pkce_then_tokens_with_email_claim() {
    let (e, seeded) = user("c12");
    rt().block_on(async {
        let (_, code) = login_code(json!({
            "email": e, "password": PASSWORD, "scope": "openid profile email",
            "codeChallenge": "xyz", "codeChallengeMethod": "plain", "nonce": "n-12"
        }))
        .await;
        let (s, b) = token_request(
            gw(),
            &[("grant_type", "authorization_code"), ("code", &code)],
        )
        .await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_request", "Missing code verifier"))
        );
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", "xyz"),
            ],
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["token_type"], "Bearer");
        assert_eq!(b["scope"], "openid profile email");
        assert_eq!(b["expires_in"], 3600);
        assert!(b["access_token"].is_string() && b["id_token"].is_string());
        assert!(b.get("refresh_token").is_none(), "{b}");
        assert_eq!(b["profile"]["reference"], seeded.profile);
        assert_eq!(
            b["project"]["reference"],
            format!("Project/{}", seeded.project_id)
        );
        let id = jwt_claims(b["id_token"].as_str().unwrap());
        assert_eq!(id["email"], e);
        assert_eq!(id["nonce"], "n-12");
        assert_eq!(id["fhirUser"], seeded.profile);
        assert_eq!(id["sub"], seeded.user_id);
        assert_eq!(id["name"], "Test User");
        assert_eq!(id["given_name"], "Test");
        assert_eq!(id["family_name"], "User");
        assert!(id["auth_time"].as_i64().unwrap() > 0);
        let access = jwt_claims(b["access_token"].as_str().unwrap());
        assert_eq!(access["sub"], seeded.user_id);
        assert_eq!(access["profile"], seeded.profile);
        assert_eq!(access["scope"], "openid profile email");
        assert!(access["login_id"].is_string());
        // The token works at the gateway.
        assert_eq!(fhir_status(b["access_token"].as_str().unwrap()).await, 200);

        // Without the `email` (or `profile`) scope, the ID token names neither.
        let (_, code) = login_code(json!({
            "email": e, "password": PASSWORD, "scope": "openid",
            "codeChallenge": "xyz", "codeChallengeMethod": "plain"
        }))
        .await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", "xyz"),
            ],
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let id = jwt_claims(b["id_token"].as_str().unwrap());
        for claim in [
            "email",
            "email_verified",
            "name",
            "given_name",
            "family_name",
        ] {
            assert!(id.get(claim).is_none(), "{claim} without its scope: {id}");
        }
        assert_eq!(id["fhirUser"], seeded.profile);
        assert_eq!(id["sub"], seeded.user_id);
    });
}

#[test]
fn case_13_wrong_verifier_with_valid_basic_secret_is_refused() {
    let (e, _) = user("c13");
    let (client, secret) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let (_, challenge) = pkce_pair();
        let (_, code) = login_code(json!({
            "email": e, "password": PASSWORD, "clientId": client,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"
        }))
        .await;
        let resp = TestGateway::client()
            .post(format!("{}oauth2/token", gw().base))
            .header("authorization", basic(&client, &secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", "not-the-verifier"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let b: Value = resp.json().await.unwrap();
        assert!(b.get("access_token").is_none());
        // RFC 7636 §4.6 (Medplum answers `invalid_request`).
        assert_eq!(b, oauth_error("invalid_grant", "Invalid code verifier"));
    });
}

#[test]
fn case_14_pkce_optional_client_secret_and_retiring_secret() {
    let (e, _) = user("c14");
    let (client, secret) = seed_client(gw(), None, json!({"pkceOptional": true}), None);
    rt().block_on(async {
        let login = json!({"email": e, "password": PASSWORD, "clientId": client});
        let (_, code) = login_code(login.clone()).await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("client_id", &client),
            ],
        )
        .await;
        assert_eq!(
            s, 200,
            "a code alone is enough for a pkceOptional client: {b}"
        );

        let (_, code) = login_code(login.clone()).await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("client_id", &client),
                ("client_secret", "wrong"),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (401, oauth_error("invalid_client", "Invalid secret"))
        );

        // Rotate: the old secret becomes the retiring one.
        let new_secret = "new-secret-for-case-14";
        let (c, old) = (client.clone(), secret.clone());
        on_gateway(gw(), move |state| async move {
            state
                .store
                .set_client_secret(
                    &c,
                    Some(&state.hash_secret(new_secret)),
                    Some(&state.hash_secret(&old)),
                )
                .await
                .unwrap();
            state.refresh().await.unwrap();
        });
        let (_, code) = login_code(login).await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("client_id", &client),
                ("client_secret", &secret),
            ],
        )
        .await;
        assert_eq!(s, 200, "the retiring secret is accepted: {b}");
    });
}

#[test]
fn case_15_offline_scopes_and_remember_get_refresh_tokens() {
    let (e, _) = user("c15");
    rt().block_on(async {
        for (scope, remember, wants) in [
            ("openid offline", false, true),
            ("openid offline_access", false, true),
            ("openid", true, true),
            ("openid", false, false),
        ] {
            let (verifier, challenge) = pkce_pair();
            let (_, code) = login_code(json!({
                "email": e, "password": PASSWORD, "scope": scope, "remember": remember,
                "codeChallenge": challenge, "codeChallengeMethod": "S256"
            }))
            .await;
            let (s, b) = token_request(
                gw(),
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("code_verifier", &verifier),
                ],
            )
            .await;
            assert_eq!(s, 200, "{b}");
            assert_eq!(
                b["refresh_token"].is_string(),
                wants,
                "scope {scope}, remember {remember}: {b}"
            );
        }
    });
}

#[test]
fn case_16_code_of_another_client_is_refused() {
    let (e, _) = user("c16");
    let (client_a, _) = seed_client(gw(), None, json!({}), None);
    let (client_b, _) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let (verifier, challenge) = pkce_pair();
        let (_, code) = login_code(json!({
            "email": e, "password": PASSWORD, "clientId": client_a,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"
        }))
        .await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", &verifier),
                ("client_id", &client_b),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_grant", "Invalid client"))
        );
        // The right client still can.
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", &verifier),
                ("client_id", &client_a),
            ],
        )
        .await;
        assert_eq!(s, 200, "{b}");
    });
}

#[test]
fn case_17_code_replay_revokes_the_login() {
    let (e, _) = user("c17");
    rt().block_on(async {
        let (verifier, challenge) = pkce_pair();
        let (_, code) = login_code(json!({
            "email": e, "password": PASSWORD, "scope": "openid offline",
            "codeChallenge": challenge, "codeChallengeMethod": "S256"
        }))
        .await;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
        ];
        let (s, first) = token_request(gw(), &form).await;
        assert_eq!(s, 200, "{first}");
        let tokens = TokenResponse::from_body(first);
        assert_eq!(fhir_status(&tokens.access_token).await, 200);
        let (s, b) = token_request(gw(), &form).await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_grant", "Token already granted"))
        );
        // Every token of the Login is dead on the very next request.
        assert_eq!(fhir_status(&tokens.access_token).await, 401);
        let (s, _) = get_with("auth/me", Some(&format!("Bearer {}", tokens.access_token))).await;
        assert_eq!(s, 401);
        let refresh = tokens.refresh_token.unwrap();
        let (s, b) = token_request(
            gw(),
            &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
        )
        .await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Token revoked")));
    });
}

#[test]
fn concurrent_redemptions_of_one_code_yield_one_token() {
    let (e, _) = user("race");
    rt().block_on(async {
        let (verifier, challenge) = pkce_pair();
        let (_, code) = login_code(json!({
            "email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"
        }))
        .await;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
        ];
        let results = futures_join(token_request(gw(), &form), token_request(gw(), &form)).await;
        let statuses = [results.0.0, results.1.0];
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "exactly one exchange wins: {results:?}"
        );
        let loser = if results.0.0 == 200 {
            &results.1.1
        } else {
            &results.0.1
        };
        assert_eq!(
            *loser,
            oauth_error("invalid_grant", "Token already granted")
        );
    });
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

#[test]
fn case_18_login_revoked_before_exchange() {
    let (e, _) = user("c18");
    rt().block_on(async {
        let (verifier, challenge) = pkce_pair();
        let (login, code) = login_code(json!({
            "email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"
        }))
        .await;
        revoke_in_store(&login);
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Token revoked")));
    });
}

#[test]
fn expired_code_and_redirect_uri_binding() {
    let (e, _) = user("expiry");
    rt().block_on(async {
        let (verifier, challenge) = pkce_pair();
        let body = json!({
            "email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"
        });
        // A code past its lifetime is refused.
        let (login, code) = login_code(body.clone()).await;
        let id = login.clone();
        on_gateway(gw(), move |state| async move {
            let mut l = state.store.login(&id).await.unwrap().unwrap();
            l.extra["codeExpiresAt"] = json!(fhirgate::store::now_unix() - 1);
            assert!(state.store.update_login(&l).await.unwrap());
        });
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
        ];
        let (s, b) = token_request(gw(), &form).await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Code expired")));

        // A code bound to a redirect URI (as /oauth2/authorize binds it) needs that URI.
        let (login, code) = login_code(body).await;
        let id = login.clone();
        on_gateway(gw(), move |state| async move {
            let mut l = state.store.login(&id).await.unwrap().unwrap();
            l.extra["redirectUri"] = json!("https://app.example.com/callback");
            assert!(state.store.update_login(&l).await.unwrap());
        });
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
            ("redirect_uri", "https://evil.example.com/callback"),
        ];
        let (s, b) = token_request(gw(), &form).await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_grant", "Invalid redirect URI"))
        );
        form[3].1 = "https://app.example.com/callback";
        let (s, b) = token_request(gw(), &form).await;
        assert_eq!(s, 200, "{b}");
    });
}

// === token endpoint: refresh_token ===

/// Signs in with `openid offline` and returns the tokens.
async fn offline_tokens(e: &str, client: Option<&str>) -> TokenResponse {
    let t = sign_in(gw(), e, PASSWORD, client, "openid offline").await;
    assert!(t.refresh_token.is_some(), "{}", t.body);
    t
}

#[test]
fn case_19_invalid_refresh_tokens() {
    let (e, _) = user("c19");
    rt().block_on(async {
        let invalid = oauth_error("invalid_request", "Invalid refresh token");
        let (s, b) = token_request(gw(), &[("grant_type", "refresh_token")]).await;
        assert_eq!((s, &b), (400, &invalid));
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "not.a.jwt"),
            ],
        )
        .await;
        assert_eq!((s, &b), (400, &invalid));
        // A JWT without a refresh_secret claim (an access token).
        let t = sign_in(gw(), &e, PASSWORD, None, "openid").await;
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &t.access_token),
            ],
        )
        .await;
        assert_eq!((s, &b), (400, &invalid));
        // A well-signed refresh JWT for a Login that has no refresh secret.
        let login_id = jwt_claims(&t.access_token)["login_id"]
            .as_str()
            .unwrap()
            .to_string();
        let forged = on_gateway(gw(), move |state| async move {
            let now = fhirgate::store::now_unix();
            state
                .keyring()
                .sign(&fhirgate::tokens::Claims {
                    iss: state.config.base_url.clone(),
                    iat: now,
                    exp: now + 600,
                    login_id: Some(login_id),
                    refresh_secret: Some("0".repeat(64)),
                    ..Default::default()
                })
                .unwrap()
        });
        let (s, b) = token_request(
            gw(),
            &[("grant_type", "refresh_token"), ("refresh_token", &forged)],
        )
        .await;
        assert_eq!((s, &b), (400, &invalid));
    });
}

#[test]
fn case_20_refresh_after_logout_is_revoked() {
    let (e, _) = user("c20");
    rt().block_on(async {
        let t = offline_tokens(&e, None).await;
        let (s, _) = post_with(
            "oauth2/logout",
            Some(&format!("Bearer {}", t.access_token)),
            &json!({}),
        )
        .await;
        assert_eq!(s, 200);
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", t.refresh_token.as_deref().unwrap()),
            ],
        )
        .await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Token revoked")));
    });
}

#[test]
fn case_21_refresh_rotation() {
    let (e, _) = user("c21");
    rt().block_on(async {
        let t = offline_tokens(&e, None).await;
        let r1 = t.refresh_token.unwrap();
        let refresh = |r: String| async move {
            token_request(
                gw(),
                &[("grant_type", "refresh_token"), ("refresh_token", &r)],
            )
            .await
        };
        let (s, b) = refresh(r1.clone()).await;
        assert_eq!(s, 200, "{b}");
        let r2 = b["refresh_token"].as_str().unwrap().to_string();
        assert_ne!(r1, r2);
        assert_eq!(fhir_status(b["access_token"].as_str().unwrap()).await, 200);
        let (s, b) = refresh(r2.clone()).await;
        assert_eq!(s, 200, "{b}");
        let r3 = b["refresh_token"].as_str().unwrap().to_string();
        let newest_access = b["access_token"].as_str().unwrap().to_string();
        assert_eq!(fhir_status(&newest_access).await, 200);
        // Issue 10: r1 was rotated away; presenting it again means someone else holds the
        // family (OAuth 2.0 Security BCP): the whole Login ends, for the newest tokens too.
        let (s, b) = refresh(r1).await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_request", "Invalid token"))
        );
        assert_eq!(
            fhir_status(&newest_access).await,
            401,
            "the family is revoked"
        );
        let (s, b) = refresh(r3).await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Token revoked")));
        let (s, b) = refresh(r2).await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Token revoked")));
    });
}

/// Issue 10: a password change, a password set by an admin, an MFA reset, a User deletion or
/// a membership removal left every existing access and refresh token working. Each now ends
/// every session of that user (only that membership's, for a removal).
#[test]
fn credential_changes_end_every_session() {
    rt().block_on(async {
        // Own password change: both sessions end, the access tokens and the refresh tokens.
        let (e, _) = user("sess-pw");
        let a = offline_tokens(&e, None).await;
        let b = offline_tokens(&e, None).await;
        let (s, out) = post_with(
            "auth/changepassword",
            Some(&format!("Bearer {}", a.access_token)),
            &json!({"oldPassword": PASSWORD, "newPassword": "a new horse battery"}),
        )
        .await;
        assert_eq!(s, 200, "{out}");
        for t in [&a, &b] {
            assert_eq!(fhir_status(&t.access_token).await, 401);
            let (s, _) = token_request(
                gw(),
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", t.refresh_token.as_deref().unwrap()),
                ],
            )
            .await;
            assert_eq!(s, 400, "the refresh token ended too");
        }
        // The new password signs in.
        let t = sign_in(gw(), &e, "a new horse battery", None, "openid").await;
        assert_eq!(fhir_status(&t.access_token).await, 200);

        // A password set by the super admin.
        let (e, _) = user("sess-admin");
        let t = offline_tokens(&e, None).await;
        let admin = common::people::super_admin_token(gw()).await;
        let (s, out) = post_with(
            "admin/super/setpassword",
            Some(&format!("Bearer {admin}")),
            &json!({"email": e, "password": "set by the admin 1"}),
        )
        .await;
        assert_eq!(s, 200, "{out}");
        assert_eq!(fhir_status(&t.access_token).await, 401);

        // The User deleted.
        let (e, seeded) = user("sess-del");
        let t = offline_tokens(&e, None).await;
        let (s, out) = send(
            TestGateway::client()
                .delete(format!("{}fhir/R4/User/{}", gw().base, seeded.user_id))
                .bearer_auth(&admin),
        )
        .await;
        assert_eq!(s, 200, "{out}");
        assert_eq!(fhir_status(&t.access_token).await, 401);

        // The membership removed by the project's admin.
        let (e, seeded) = user("sess-member");
        let t = offline_tokens(&e, None).await;
        let project_admin = gw().admin_token().await;
        let (s, out) = send(
            TestGateway::client()
                .delete(format!(
                    "{}admin/projects/{}/members/{}",
                    gw().base,
                    seeded.project_id,
                    seeded.membership_id
                ))
                .bearer_auth(&project_admin),
        )
        .await;
        assert_eq!(s, 200, "{out}");
        assert_eq!(fhir_status(&t.access_token).await, 401);
        let (s, _) = token_request(
            gw(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", t.refresh_token.as_deref().unwrap()),
            ],
        )
        .await;
        assert_eq!(s, 400);
    });
}

/// Issue 10: the operator could not sign in with the bootstrap credentials ("User not found":
/// the admin User had no membership).
#[test]
fn the_bootstrap_admin_signs_in() {
    rt().block_on(async {
        let email = gw().running().bootstrap.admin_email.clone();
        let t = sign_in(gw(), &email, "admin-password-for-tests", None, "openid").await;
        let (s, me) = get_with("auth/me", Some(&format!("Bearer {}", t.access_token))).await;
        assert_eq!(s, 200, "{me}");
        assert_eq!(
            me["project"]["id"],
            super_admin_project(gw()).as_str(),
            "{me}"
        );
        assert_eq!(me["membership"]["admin"], true, "{me}");
    });
}

#[test]
fn case_22_refresh_client_authentication() {
    let (e, _) = user("c22");
    let (client, secret) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let t = offline_tokens(&e, Some(&client)).await;
        let r = t.refresh_token.unwrap();
        let with_auth = |auth: String, r: String| async move {
            let resp = TestGateway::client()
                .post(format!("{}oauth2/token", gw().base))
                .header("authorization", auth)
                .form(&[("grant_type", "refresh_token"), ("refresh_token", &r)])
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        };
        let (s, b) = with_auth(basic("someone-else", &secret), r.clone()).await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_grant", "Incorrect client"))
        );
        let (s, b) = with_auth(basic(&client, ""), r.clone()).await;
        assert_eq!(
            (s, b),
            (
                401,
                oauth_error("invalid_client", "Incorrect client secret")
            )
        );
        // Stricter than Medplum: the secret's value is checked too.
        let (s, b) = with_auth(basic(&client, "wrong"), r.clone()).await;
        assert_eq!(
            (s, b),
            (
                401,
                oauth_error("invalid_client", "Incorrect client secret")
            )
        );
        let (s, b) = with_auth("Bearer xyz".into(), r.clone()).await;
        assert_eq!(
            (s, b),
            (
                401,
                oauth_error("invalid_client", "Invalid authorization header")
            )
        );
        let (s, b) = with_auth(basic(&client, &secret), r).await;
        assert_eq!(s, 200, "{b}");
    });
}

#[test]
fn case_23_access_token_lifetime_per_client() {
    let (e, _) = user("c23");
    let (client, secret) = seed_client(gw(), None, json!({"accessTokenLifetime": "60s"}), None);
    rt().block_on(async {
        let t = sign_in(gw(), &e, PASSWORD, Some(&client), "openid").await;
        assert_eq!(t.body["expires_in"], 60);
        let c = jwt_claims(&t.access_token);
        assert_eq!(c["exp"].as_i64().unwrap(), c["iat"].as_i64().unwrap() + 60);
        let cc = gw().token(&client, &secret, None).await;
        let c = jwt_claims(&cc);
        assert_eq!(c["exp"].as_i64().unwrap(), c["iat"].as_i64().unwrap() + 60);
        // Lifetimes that are not `^\d+[smhdwy]$` are refused when the client is made.
        let admin = gw().admin_token().await;
        let project = default_project(gw());
        for bad in ["300", "medplum"] {
            let (s, b) = post_with(
                &format!("admin/projects/{project}/client"),
                Some(&format!("Bearer {admin}")),
                &json!({"name": "bad lifetime", "accessTokenLifetime": bad}),
            )
            .await;
            assert_eq!(s, 400, "{bad}: {b}");
            assert!(outcome_text(&b).contains("clapp-1"), "{b}");
        }
    });
}

#[test]
fn case_24_patient_profile_in_token_response() {
    let e = unique_email("c24");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.profile_type = "Patient".into();
    s.project_scoped = true;
    let seeded = seed(gw(), &s);
    rt().block_on(async {
        // A project-scoped user exists only for its project: without a client or projectId
        // of that project there is no such user.
        let (s, b) = auth_login(gw(), &json!({"email": e, "password": PASSWORD})).await;
        assert_eq!((s, outcome_text(&b)), (400, "User not found"));
        let t = sign_in(gw(), &e, PASSWORD, Some(ADMIN_CLIENT_ID), "openid").await;
        let patient_id = seeded.profile.strip_prefix("Patient/").unwrap();
        assert_eq!(t.body["patient"], patient_id);
        assert_eq!(t.body["need_patient_banner"], true);
        assert_eq!(t.body["profile"]["reference"], seeded.profile);
    });
}

// === client assertions (private_key_jwt) ===

#[test]
fn case_25_client_assertions() {
    let key = assertion_key();
    let other_key = assertion_key();
    rt().block_on(async {
        let jwks_uri = serve_jwks(key.jwks.clone()).await;
        let (client, _) = seed_client(gw(), None, json!({"jwksUri": jwks_uri}), None);
        let (no_jwks, _) = seed_client(gw(), None, json!({}), None);
        let token_url = format!("{}oauth2/token", gw().base);
        let now = fhirgate::store::now_unix();
        let claims = |iss: &str, sub: &str, aud: &str| {
            json!({"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + 300,
                   "jti": uuid::Uuid::new_v4().to_string()})
        };
        let jwt_bearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
        let send = |assertion_type: &'static str, assertion: String| async move {
            token_request(
                gw(),
                &[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", assertion_type),
                    ("client_assertion", &assertion),
                ],
            )
            .await
        };
        // A client that cannot be authenticated: `invalid_client`, 401 (RFC 6749 §5.2).
        let err = |d: &str| (401, oauth_error("invalid_client", d));

        let good = assertion(&key, &claims(&client, &client, &token_url));
        let (s, b) = send(jwt_bearer, good.clone()).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            jwt_claims(b["access_token"].as_str().unwrap())["sub"],
            client.as_str()
        );
        // An assertion authenticates once.
        assert_eq!(
            send(jwt_bearer, good).await,
            err("Invalid client assertion")
        );

        let wrong_aud = assertion(&key, &claims(&client, &client, "https://elsewhere/token"));
        assert_eq!(
            send(jwt_bearer, wrong_aud).await,
            err("Invalid client assertion audience")
        );
        let wrong_iss = assertion(&key, &claims("someone", &client, &token_url));
        assert_eq!(
            send(jwt_bearer, wrong_iss).await,
            err("Invalid client assertion issuer")
        );
        let unknown = uuid::Uuid::new_v4().to_string();
        let unknown_client = assertion(&key, &claims(&unknown, &unknown, &token_url));
        assert_eq!(
            send(jwt_bearer, unknown_client).await,
            err("Client not found")
        );
        let no_uri = assertion(&key, &claims(&no_jwks, &no_jwks, &token_url));
        assert_eq!(
            send(jwt_bearer, no_uri).await,
            err("Client must have a JWK Set URL")
        );
        let forged = assertion(&other_key, &claims(&client, &client, &token_url));
        assert_eq!(
            send(jwt_bearer, forged).await,
            err("Invalid client assertion signature")
        );
        let mut expired_claims = claims(&client, &client, &token_url);
        expired_claims["exp"] = json!(now - 10);
        assert_eq!(
            send(jwt_bearer, assertion(&key, &expired_claims)).await,
            err("Invalid client assertion signature")
        );
        let fine = assertion(&key, &claims(&client, &client, &token_url));
        assert_eq!(
            send("urn:other", fine).await,
            err("Unsupported client assertion type")
        );
        assert_eq!(
            send(jwt_bearer, "not-a-jwt".into()).await,
            err("Invalid client assertion")
        );
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", jwt_bearer),
            ],
        )
        .await;
        assert_eq!((s, b), err("Invalid client assertion"));
    });
}

#[test]
fn case_27_super_admin_users_get_no_refresh_token() {
    let e = unique_email("c27");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.project = Some(super_admin_project(gw()));
    seed(gw(), &s);
    rt().block_on(async {
        let t = sign_in(gw(), &e, PASSWORD, None, "openid offline").await;
        assert!(t.refresh_token.is_none(), "{}", t.body);
    });
}

#[test]
fn case_28_fhircast_scope_names_hub_and_topic() {
    rt().block_on(async {
        let token = |scope: &'static str| async move {
            let resp = TestGateway::client()
                .post(format!("{}oauth2/token", gw().base))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", ADMIN_CLIENT_ID),
                    ("client_secret", ADMIN_CLIENT_SECRET),
                    ("scope", scope),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        };
        let with = token("openid fhircast/ImagingStudy-open.read").await;
        assert_eq!(
            with["hub.url"],
            format!("{}fhircast/STU3", gw().base),
            "{with}"
        );
        let topic = with["hub.topic"].as_str().expect("hub.topic");
        assert_eq!(topic.len(), 32);
        // Stable per user (here: the client), so a second token names the same topic.
        let again = token("fhircast/DiagnosticReport-open.read").await;
        assert_eq!(again["hub.topic"], topic);
        let without = token("openid").await;
        assert!(without.get("hub.url").is_none(), "{without}");
        assert!(without.get("hub.topic").is_none(), "{without}");
    });
}

// === logout, introspection, userinfo ===

#[test]
fn case_36_logout() {
    let (e, _) = user("c36");
    rt().block_on(async {
        let t = sign_in(gw(), &e, PASSWORD, None, "openid").await;
        let bearer = format!("Bearer {}", t.access_token);
        let (s, b) = post_with("oauth2/logout", Some(&bearer), &json!({})).await;
        assert_eq!(s, 200);
        assert_eq!(outcome_text(&b), "All OK");
        let (s, _) = get_with("oauth2/userinfo", Some(&bearer)).await;
        assert_eq!(s, 401);
        let (s, _) = post_with("oauth2/logout", Some(&bearer), &json!({})).await;
        assert_eq!(s, 401);
        let (s, b) = post_with("oauth2/logout", None, &json!({})).await;
        assert_eq!(s, 401);
        assert_eq!(outcome_text(&b), "Unauthorized");
        assert_eq!(fhir_status(&t.access_token).await, 401);
    });
}

async fn introspect(auth: Option<&str>, form: &[(&str, &str)]) -> (u16, String) {
    let mut req = TestGateway::client()
        .post(format!("{}oauth2/introspect", gw().base))
        .form(form);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[test]
fn case_37_introspection() {
    let (e, seeded) = user("c37");
    rt().block_on(async {
        let t = offline_tokens(&e, None).await;
        let admin = basic(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET);
        let (s, b) = introspect(Some(&admin), &[("token", &t.access_token)]).await;
        assert_eq!(s, 200);
        let b: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(b["active"], true, "{b}");
        assert_eq!(b["sub"], seeded.user_id);
        assert_eq!(b["scope"], "openid offline");
        assert_eq!(b["iss"], gw().base);
        assert!(b["exp"].as_i64().unwrap() > b["iat"].as_i64().unwrap());
        // Refresh tokens are introspectable too.
        let refresh = t.refresh_token.clone().unwrap();
        let (_, b) = introspect(Some(&admin), &[("token", &refresh)]).await;
        assert_eq!(serde_json::from_str::<Value>(&b).unwrap()["active"], true);
        // Client authentication is required (stricter than Medplum).
        let (s, b) = introspect(None, &[("token", &t.access_token)]).await;
        assert_eq!(s, 401, "{b}");
        let (s, _) = introspect(
            Some(&basic(ADMIN_CLIENT_ID, "wrong")),
            &[("token", &t.access_token)],
        )
        .await;
        assert_eq!(s, 401);
        // No token: 400 text.
        let (s, b) = introspect(Some(&admin), &[]).await;
        assert_eq!(
            (s, b.as_str()),
            (400, "Token to introspect must be provided")
        );
        // Garbage is simply inactive.
        let (s, b) = introspect(Some(&admin), &[("token", "garbage")]).await;
        assert_eq!((s, b.as_str()), (200, r#"{"active":false}"#));
        // After logout: exactly {active:false}, for the access and the refresh token.
        let (s, _) = post_with(
            "oauth2/logout",
            Some(&format!("Bearer {}", t.access_token)),
            &json!({}),
        )
        .await;
        assert_eq!(s, 200);
        let (s, b) = introspect(Some(&admin), &[("token", &t.access_token)]).await;
        assert_eq!((s, b.as_str()), (200, r#"{"active":false}"#));
        let (s, b) = introspect(Some(&admin), &[("token", &refresh)]).await;
        assert_eq!((s, b.as_str()), (200, r#"{"active":false}"#));
    });
}

#[test]
fn introspection_is_limited_to_the_clients_project() {
    let project = seed_project(gw(), json!({"name": "other"}));
    let (other_client, other_secret) = seed_client(gw(), Some(&project), json!({}), None);
    let (e, _) = user("introspect-project");
    rt().block_on(async {
        let t = sign_in(gw(), &e, PASSWORD, None, "openid").await;
        let (s, b) = introspect(
            Some(&basic(&other_client, &other_secret)),
            &[("token", &t.access_token)],
        )
        .await;
        assert_eq!((s, b.as_str()), (200, r#"{"active":false}"#));
    });
}

#[test]
fn case_38_userinfo_by_scope() {
    let e = unique_email("c38");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.first_name = "Medplum".into();
    s.last_name = "Admin".into();
    let seeded = seed(gw(), &s);
    rt().block_on(async {
        let t = sign_in(
            gw(),
            &e,
            PASSWORD,
            None,
            "openid profile email phone address",
        )
        .await;
        let bearer = format!("Bearer {}", t.access_token);
        let (status, b) = get_with("oauth2/userinfo", Some(&bearer)).await;
        assert_eq!(status, 200, "{b}");
        // `sub` is the ID token's subject (the User), as OIDC Core §5.3.2 requires, where
        // Medplum answers the profile id; the profile is in `profile`.
        assert_eq!(b["sub"], seeded.user_id);
        assert_eq!(b["name"], "Medplum Admin");
        assert_eq!(b["given_name"], "Medplum");
        assert_eq!(b["family_name"], "Admin");
        assert_eq!(b["email"], e);
        assert_eq!(b["email_verified"], false);
        assert_eq!(b["profile"], seeded.profile);
        assert_eq!(b["locale"], "en-US");
        // POST answers the same.
        let (status, b2) = post_with("oauth2/userinfo", Some(&bearer), &json!({})).await;
        assert_eq!((status, &b2), (200, &b));

        let t = sign_in(gw(), &e, PASSWORD, None, "openid").await;
        let (status, b) = get_with(
            "oauth2/userinfo",
            Some(&format!("Bearer {}", t.access_token)),
        )
        .await;
        assert_eq!((status, b), (200, json!({"sub": seeded.user_id})));
        let (status, _) = get_with("oauth2/userinfo", None).await;
        assert_eq!(status, 401);
    });
}

// === /auth/login ===

#[test]
fn case_39_unknown_client_ids() {
    let (e, _) = user("c39");
    rt().block_on(async {
        for client in ["123".to_string(), uuid::Uuid::new_v4().to_string()] {
            let (s, b) = auth_login(
                gw(),
                &json!({"email": e, "password": PASSWORD, "clientId": client}),
            )
            .await;
            assert_eq!(s, 404, "{b}");
            assert_eq!(outcome_text(&b), "Not found");
        }
    });
}

#[test]
fn case_40_login_validation() {
    let (e, _) = user("c40");
    let (client, _) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        for body in [
            json!({"password": PASSWORD}),
            json!({"email": "not-an-email", "password": PASSWORD}),
        ] {
            let (s, b) = auth_login(gw(), &body).await;
            assert_eq!(s, 400, "{b}");
            assert_eq!(outcome_text(&b), "Valid email address is required");
            assert_eq!(b["issue"][0]["expression"][0], "email");
        }
        let (s, b) = auth_login(gw(), &json!({"email": e})).await;
        assert_eq!(s, 400);
        assert_eq!(
            outcome_text(&b),
            "Invalid password, must be at least 5 characters"
        );
        let (s, b) = auth_login(gw(), &json!({"email": e, "password": "wrong password"})).await;
        assert_eq!(s, 400);
        assert_eq!(outcome_text(&b), "Email or password is invalid");
        let (s, b) = auth_login(
            gw(),
            &json!({"email": e, "password": PASSWORD, "clientId": client,
                    "projectId": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
        assert_eq!(s, 400);
        assert_eq!(outcome_text(&b), "Invalid projectId");
    });
}

#[test]
fn case_41_memberships_and_email_case() {
    let no_membership = unique_email("c41-none");
    let mut s = UserSeed::new(&no_membership, PASSWORD);
    s.no_membership = true;
    seed(gw(), &s);
    let inactive = unique_email("c41-inactive");
    let mut s = UserSeed::new(&inactive, PASSWORD);
    s.active = false;
    seed(gw(), &s);
    let google = unique_email("c41-google");
    let project = seed_project(gw(), json!({"features": ["google-auth-required"]}));
    let mut s = UserSeed::new(&google, PASSWORD);
    s.project = Some(project);
    seed(gw(), &s);
    let (plain, _) = user("c41-case");
    rt().block_on(async {
        for (e, text) in [
            (&no_membership, "User not found"),
            (&inactive, "Profile not active"),
            (&google, "Google authentication is required"),
        ] {
            let (s, b) = auth_login(gw(), &json!({"email": e, "password": PASSWORD})).await;
            assert_eq!((s, outcome_text(&b)), (400, text), "{e}: {b}");
        }
        let (s, b) = auth_login(
            gw(),
            &json!({"email": unique_email("nobody"), "password": PASSWORD}),
        )
        .await;
        assert_eq!((s, outcome_text(&b)), (400, "User not found"));
        let (s, b) = auth_login(
            gw(),
            &json!({"email": plain.to_uppercase(), "password": PASSWORD}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert!(b["code"].is_string());
    });
}

#[test]
fn case_42_allowed_origin() {
    let (e, _) = user("c42");
    let (client, _) = seed_client(
        gw(),
        None,
        json!({"allowedOrigin": ["https://app.example.com"], "pkceOptional": true}),
        None,
    );
    rt().block_on(async {
        let login = |origin: Option<&'static str>| {
            let body = json!({"email": e, "password": PASSWORD, "clientId": client});
            async move {
                let mut req = TestGateway::client()
                    .post(format!("{}auth/login", gw().base))
                    .json(&body);
                if let Some(o) = origin {
                    req = req.header("origin", o);
                }
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap())
            }
        };
        let (s, b) = login(Some("https://evil.example.com")).await;
        assert_eq!((s, outcome_text(&b)), (400, "Invalid origin"));
        let (s, b) = login(None).await;
        assert_eq!(s, 200, "{b}");
        let (s, b) = login(Some("https://app.example.com")).await;
        assert_eq!(s, 200, "{b}");
    });
}

#[test]
fn case_43_ip_rules_at_login() {
    let policy = seed_policy(
        gw(),
        None,
        json!({"resource": [{"resourceType": "*"}],
               "ipAccessRule": [{"value": "6.6.6.6", "action": "block"},
                                {"value": "*", "action": "allow"}]}),
    );
    let e = unique_email("c43");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.access_policy = Some(policy);
    seed(gw(), &s);
    rt().block_on(async {
        let login = |ip: &'static str| {
            let body = json!({"email": e, "password": PASSWORD});
            async move {
                let resp = TestGateway::client()
                    .post(format!("{}auth/login", gw().base))
                    .header("x-forwarded-for", ip)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap())
            }
        };
        let (s, b) = login("6.6.6.6").await;
        assert_eq!((s, outcome_text(&b)), (400, "IP address not allowed"));
        let (s, b) = login("5.5.5.5").await;
        assert_eq!(s, 200, "{b}");
        assert!(b["code"].is_string(), "{b}");
    });
}

#[test]
fn case_44_scope_narrowing() {
    let (e, _) = user("c44");
    rt().block_on(async {
        let scope = |body: Value| async move { post_json(gw(), "auth/scope", &body).await };
        let start = |requested: &'static str| {
            let e = e.clone();
            async move {
                login_code(json!({"email": e, "password": PASSWORD, "scope": requested}))
                    .await
                    .0
            }
        };
        let (s, b) = scope(json!({"scope": "openid"})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Missing login"));
        let login = start("openid profile").await;
        let (s, b) = scope(json!({"login": login})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Missing scope"));
        let (s, _) =
            scope(json!({"login": uuid::Uuid::new_v4().to_string(), "scope": "openid"})).await;
        assert_eq!(s, 404);
        let (s, b) =
            scope(json!({"login": login, "scope": "patient/Condition.rs?category=health-concern"}))
                .await;
        assert_eq!((s, outcome_text(&b)), (400, "Invalid scope"));

        let login = start("openid patient/Condition.crs").await;
        let (s, b) = scope(json!({"login": login, "scope": "patient/Condition.read"})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["login"], login.as_str());
        assert!(b["code"].is_string());

        let login = start("openid patient/Condition.rs").await;
        let (s, b) = scope(
            json!({"login": login, "scope": "openid patient/Condition.rs?category=health-concern"}),
        )
        .await;
        assert_eq!(s, 200, "{b}");

        let login = start("openid patient/Condition.rs?encounter=123").await;
        let (s, b) = scope(
            json!({"login": login, "scope": "openid patient/Condition.rs?category=health-concern"}),
        )
        .await;
        assert_eq!((s, outcome_text(&b)), (400, "Invalid scope"));

        // Revoked and granted Logins.
        let login = start("openid").await;
        revoke_in_store(&login);
        let (s, b) = scope(json!({"login": login, "scope": "openid"})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login revoked"));
        let (verifier, challenge) = pkce_pair();
        let (login, code) = login_code(json!({"email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"}))
        .await;
        let (s, _) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(s, 200);
        let (s, b) = scope(json!({"login": login, "scope": "openid"})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login granted"));
    });
}

/// A user with two memberships (default project and another one); returns its email, the
/// seed, and the second membership id.
fn two_membership_user(tag: &str) -> (String, Seeded, String) {
    let (e, seeded) = user(tag);
    let other = seed_project(gw(), json!({"name": format!("{tag} second")}));
    let mut s = UserSeed::new(&e, PASSWORD);
    s.project = Some(other);
    let (second, _) = add_membership(gw(), &seeded.user_id, &s);
    (e, seeded, second)
}

#[test]
fn case_45_choose_profile() {
    let (e, seeded, second) = two_membership_user("c45");
    let (_, stranger) = user("c45-stranger");
    rt().block_on(async {
        let profile = |body: Value| async move { post_json(gw(), "auth/profile", &body).await };
        let (s, b) = auth_login(gw(), &json!({"email": e, "password": PASSWORD})).await;
        assert_eq!(s, 200, "{b}");
        assert!(b.get("code").is_none());
        let list = b["memberships"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{b}");
        let ids: Vec<&str> = list.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert!(ids.contains(&seeded.membership_id.as_str()) && ids.contains(&second.as_str()));
        assert!(list.iter().all(
            |m| m["profile"]["reference"].is_string() && m["project"]["reference"].is_string()
        ));
        let login = b["login"].as_str().unwrap().to_string();

        let (s, b) = profile(json!({"profile": second})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Missing login"));
        let (s, b) = profile(json!({"login": login})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Missing profile"));
        let (s, _) =
            profile(json!({"login": uuid::Uuid::new_v4().to_string(), "profile": second})).await;
        assert_eq!(s, 404);
        let (s, b) =
            profile(json!({"login": login, "profile": uuid::Uuid::new_v4().to_string()})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Profile not found"));
        let (s, b) = profile(json!({"login": login, "profile": stranger.membership_id})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Invalid profile"));
        let (s, b) = profile(json!({"login": login, "profile": second})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["login"], login.as_str());
        let code = b["code"].as_str().unwrap().to_string();
        let (s, b) = profile(json!({"login": login, "profile": seeded.membership_id})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login profile already set"));

        // The code of the chosen profile (no PKCE at this login: Medplum then wants none).
        let (s, b) = token_request(
            gw(),
            &[("grant_type", "authorization_code"), ("code", &code)],
        )
        .await;
        assert_eq!(
            (s, b),
            (
                400,
                oauth_error("invalid_request", "Missing verification context")
            )
        );

        // Granted and revoked Logins.
        let (verifier, challenge) = pkce_pair();
        let (s, b) = auth_login(
            gw(),
            &json!({"email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"}),
        )
        .await;
        assert_eq!(s, 200);
        let login = b["login"].as_str().unwrap().to_string();
        let (_, b) = profile(json!({"login": login, "profile": second})).await;
        let code = b["code"].as_str().unwrap().to_string();
        let (s, t) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(s, 200, "{t}");
        let (s, b) = profile(json!({"login": login, "profile": second})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login granted"));
        let (_, b) = auth_login(gw(), &json!({"email": e, "password": PASSWORD})).await;
        let login = b["login"].as_str().unwrap().to_string();
        revoke_in_store(&login);
        let (s, b) = profile(json!({"login": login, "profile": second})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login revoked"));
    });
}

#[test]
fn case_46_login_status() {
    let (e, _) = user("c46");
    rt().block_on(async {
        let (s, _) = get_with("auth/login/not-a-uuid", None).await;
        assert_eq!(s, 400);
        let (s, _) = get_with("auth/login/", None).await;
        assert_eq!(s, 404);
        let (s, _) = get_with(&format!("auth/login/{}", uuid::Uuid::new_v4()), None).await;
        assert_eq!(s, 404);

        let (verifier, challenge) = pkce_pair();
        let (login, first_code) = login_code(json!({"email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"}))
        .await;
        // A pending Login answers with a fresh code; the earlier one stops working.
        let (s, b) = get_with(&format!("auth/login/{login}"), None).await;
        assert_eq!(s, 200, "{b}");
        let code = b["code"].as_str().unwrap().to_string();
        assert_ne!(code, first_code);
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &first_code),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_request", "Invalid code"))
        );
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let (s, b) = get_with(&format!("auth/login/{login}"), None).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login already granted"));

        let (login, _) = login_code(json!({"email": e, "password": PASSWORD})).await;
        revoke_in_store(&login);
        let (s, b) = get_with(&format!("auth/login/{login}"), None).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login revoked"));
    });
}

#[test]
fn case_47_revoke_another_session() {
    let (e, _) = user("c47");
    let (other, _) = user("c47-other");
    rt().block_on(async {
        let (s, _) = post_with(
            "auth/revoke",
            None,
            &json!({"loginId": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
        assert_eq!(s, 401);
        let one = sign_in(gw(), &e, PASSWORD, None, "openid").await;
        let two = sign_in(gw(), &e, PASSWORD, None, "openid").await;
        let stranger = sign_in(gw(), &other, PASSWORD, None, "openid").await;
        let bearer = format!("Bearer {}", one.access_token);
        let sessions = || {
            let bearer = bearer.clone();
            async move {
                let (s, me) = get_with("auth/me", Some(&bearer)).await;
                assert_eq!(s, 200, "{me}");
                me["security"]["sessions"].as_array().unwrap().len()
            }
        };
        assert_eq!(sessions().await, 2);
        let (s, b) = post_with("auth/revoke", Some(&bearer), &json!({})).await;
        assert_eq!((s, outcome_text(&b)), (400, "Login ID is required."));
        let (s, _) = post_with(
            "auth/revoke",
            Some(&bearer),
            &json!({"loginId": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
        assert_eq!(s, 404);
        let stranger_login = jwt_claims(&stranger.access_token)["login_id"]
            .as_str()
            .unwrap()
            .to_string();
        let (s, _) = post_with(
            "auth/revoke",
            Some(&bearer),
            &json!({"loginId": stranger_login}),
        )
        .await;
        assert_eq!(s, 404);
        assert_eq!(
            fhir_status(&stranger.access_token).await,
            200,
            "another user's session lives on"
        );
        let two_login = jwt_claims(&two.access_token)["login_id"]
            .as_str()
            .unwrap()
            .to_string();
        let (s, b) = post_with("auth/revoke", Some(&bearer), &json!({"loginId": two_login})).await;
        assert_eq!((s, outcome_text(&b)), (200, "All OK"));
        assert_eq!(sessions().await, 1);
        assert_eq!(fhir_status(&two.access_token).await, 401);
        assert_eq!(fhir_status(&one.access_token).await, 200);
    });
}

// === /auth/me ===

#[test]
fn case_55_auth_me() {
    let policy = seed_policy(
        gw(),
        None,
        json!({"resource": [{"resourceType": "Patient"}]}),
    );
    let e = unique_email("c55");
    let mut s = UserSeed::new(&e, PASSWORD);
    s.access_policy = Some(policy.clone());
    s.last_name = "Upstreamson".into();
    let seeded = seed(gw(), &s);
    let mut inactive = UserSeed::new(&e, PASSWORD);
    inactive.project = Some(seed_project(gw(), json!({"name": "c55 inactive"})));
    inactive.active = false;
    add_membership(gw(), &seeded.user_id, &inactive);
    rt().block_on(async {
        let (s, _) = get_with("auth/me", None).await;
        assert_eq!(s, 401);
        let (s, me) = get_with(
            "auth/me",
            Some(&basic(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET)),
        )
        .await;
        assert_eq!(s, 200, "{me}");
        assert_eq!(me["profile"]["resourceType"], "ClientApplication");
        assert!(me.get("user").is_none());

        // Two memberships: choose the active one.
        let (verifier, challenge) = pkce_pair();
        let (_, b) = auth_login(
            gw(),
            &json!({"email": e, "password": PASSWORD,
            "codeChallenge": challenge, "codeChallengeMethod": "S256"}),
        )
        .await;
        let login = b["login"].as_str().unwrap().to_string();
        let (s, b) = post_json(
            gw(),
            "auth/profile",
            &json!({"login": login, "profile": seeded.membership_id}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let (s, t) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", b["code"].as_str().unwrap()),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(s, 200, "{t}");
        let bearer = format!("Bearer {}", t["access_token"].as_str().unwrap());
        let (s, me) = get_with("auth/me", Some(&bearer)).await;
        assert_eq!(s, 200, "{me}");
        assert_eq!(me["user"]["id"], seeded.user_id);
        assert_eq!(me["user"]["email"], e);
        assert!(me["user"].get("passwordHash").is_none());
        assert_eq!(me["membership"]["id"], seeded.membership_id);
        assert_eq!(me["project"]["id"], seeded.project_id);
        // The profile is read from the upstream FHIR server.
        assert_eq!(me["profile"]["resourceType"], "Practitioner");
        assert_eq!(me["profile"]["name"][0]["family"], "Upstreamson");
        assert_eq!(me["accessPolicy"]["basedOn"][0]["reference"], policy);
        assert_eq!(me["config"]["resourceType"], "UserConfiguration");
        let memberships = me["security"]["memberships"].as_array().unwrap();
        assert_eq!(memberships.len(), 1, "only active memberships: {me}");
        assert_eq!(memberships[0]["id"], seeded.membership_id);
        let sessions = me["security"]["sessions"].as_array().unwrap();
        assert!(!sessions.is_empty());
        assert_eq!(sessions[0]["authMethod"], "password");
        assert_eq!(me["security"]["mfaEnrolled"], false);
    });
}

// === stricter rules ===

#[test]
fn mfa_gates_the_code() {
    let enrolled = unique_email("mfa-enrolled");
    let mut s = UserSeed::new(&enrolled, PASSWORD);
    s.mfa_secret = Some("JBSWY3DPEHPK3PXP".into());
    seed(gw(), &s);
    let forced = unique_email("mfa-forced");
    let mut s = UserSeed::new(&forced, PASSWORD);
    s.mfa_required = true;
    seed(gw(), &s);
    rt().block_on(async {
        let (s, b) = auth_login(gw(), &json!({"email": enrolled, "password": PASSWORD})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["mfaRequired"], true);
        assert!(b.get("code").is_none(), "{b}");
        let login = b["login"].as_str().unwrap().to_string();
        let (s, b) = get_with(&format!("auth/login/{login}"), None).await;
        assert_eq!(s, 200);
        assert_eq!(
            b,
            json!({"login": login, "mfaRequired": true, "mfaMethods": ["totp"], "email": enrolled})
        );
        let (s, b) = post_json(
            gw(),
            "auth/scope",
            &json!({"login": login, "scope": "openid"}),
        )
        .await;
        assert_eq!(s, 200);
        assert!(b.get("code").is_none(), "no code before MFA: {b}");

        let (s, b) = auth_login(gw(), &json!({"email": forced, "password": PASSWORD})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["mfaEnrollRequired"], true);
        assert!(b.get("code").is_none(), "{b}");
        let uri = b["enrollUri"].as_str().unwrap();
        assert!(uri.starts_with("otpauth://totp/Medplum%20-%20"), "{uri}");
        assert!(uri.contains("&issuer=medplum.com"), "{uri}");
        assert!(
            b["enrollQrCode"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,")
        );
    });
}

#[test]
fn refresh_and_id_tokens_are_not_access_tokens() {
    let (e, _) = user("not-access");
    rt().block_on(async {
        let t = offline_tokens(&e, None).await;
        assert_eq!(fhir_status(t.refresh_token.as_deref().unwrap()).await, 401);
        assert_eq!(fhir_status(&t.id_token).await, 401);
        let (s, _) = get_with(
            "auth/me",
            Some(&format!("Bearer {}", t.refresh_token.unwrap())),
        )
        .await;
        assert_eq!(s, 401);
        assert_eq!(fhir_status(&t.access_token).await, 200);
    });
}

#[test]
fn rfc7009_revocation() {
    let (e, _) = user("rfc7009");
    let (client, secret) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let revoke = |auth: Option<String>, form: Vec<(&'static str, String)>| async move {
            let mut req = TestGateway::client()
                .post(format!("{}oauth2/revoke", gw().base))
                .form(&form);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        };
        let t = offline_tokens(&e, Some(&client)).await;
        let refresh = t.refresh_token.clone().unwrap();
        // Without client authentication: 401 invalid_client, nothing revoked.
        let (s, b) = revoke(None, vec![("token", refresh.clone())]).await;
        assert_eq!(s, 401, "{b}");
        assert_eq!(
            serde_json::from_str::<Value>(&b).unwrap()["error"],
            "invalid_client"
        );
        let (s, _) = revoke(
            Some(basic(&client, "wrong")),
            vec![("token", refresh.clone())],
        )
        .await;
        assert_eq!(s, 401);
        // Another client's revocation is a no-op (but still 200).
        let (s, _) = revoke(
            Some(basic(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET)),
            vec![("token", refresh.clone())],
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(fhir_status(&t.access_token).await, 200);
        // Unknown tokens: 200.
        let (s, _) = revoke(
            Some(basic(&client, &secret)),
            vec![("token", "garbage".into())],
        )
        .await;
        assert_eq!(s, 200);
        // The right client revoking the refresh token ends the whole Login.
        let (s, _) = revoke(
            Some(basic(&client, &secret)),
            vec![
                ("token", refresh.clone()),
                ("token_type_hint", "refresh_token".into()),
            ],
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(fhir_status(&t.access_token).await, 401);
        let (s, b) = token_request(
            gw(),
            &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
        )
        .await;
        assert_eq!((s, b), (400, oauth_error("invalid_grant", "Token revoked")));
    });
}

#[test]
fn discovery_advertises_the_sign_in_endpoints() {
    rt().block_on(async {
        let (s, d) = get_with(".well-known/openid-configuration", None).await;
        assert_eq!(s, 200);
        let base = &gw().base;
        assert_eq!(d["token_endpoint"], format!("{base}oauth2/token"));
        assert_eq!(d["userinfo_endpoint"], format!("{base}oauth2/userinfo"));
        assert_eq!(
            d["introspection_endpoint"],
            format!("{base}oauth2/introspect")
        );
        assert_eq!(d["revocation_endpoint"], format!("{base}oauth2/revoke"));
        assert_eq!(d["end_session_endpoint"], format!("{base}oauth2/logout"));
        let grants: Vec<&str> = d["grant_types_supported"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for g in ["authorization_code", "refresh_token", "client_credentials"] {
            assert!(grants.contains(&g), "{g}");
        }
        assert_eq!(
            d["code_challenge_methods_supported"],
            json!(["S256", "plain"])
        );
        assert!(
            d["token_endpoint_auth_methods_supported"]
                .as_array()
                .unwrap()
                .contains(&json!("private_key_jwt"))
        );
        let (_, smart) = get_with(".well-known/smart-configuration", None).await;
        assert_eq!(smart["code_challenge_methods_supported"], json!(["S256"]));
    });
}

#[test]
fn seed_user_helper_signs_in() {
    let e = unique_email("helper");
    let (user_id, membership_id) = seed_user(gw(), &e, PASSWORD, None, "Practitioner");
    rt().block_on(async {
        let t = sign_in(gw(), &e, PASSWORD, Some(ADMIN_CLIENT_ID), "openid").await;
        let c = jwt_claims(&t.access_token);
        assert_eq!(c["sub"], user_id);
        assert_eq!(c["client_id"], ADMIN_CLIENT_ID);
        let (_, me) = get_with("auth/me", Some(&format!("Bearer {}", t.access_token))).await;
        assert_eq!(me["membership"]["id"], membership_id);
    });
}

/// Issue 10 (SSRF): a client record chose the address fhirgate fetched its JWK Set from,
/// loopback, private and cloud-metadata addresses included. Without `outbound_allow`, those are
/// refused before any connection (literal addresses) or at connection (names).
#[test]
fn client_chosen_urls_never_reach_internal_addresses() {
    let gw = TestGateway::start_with("http://127.0.0.1:9/fhir/R4", |c| c.outbound_allow = vec![]);
    let key = assertion_key();
    rt().block_on(async {
        let loopback = serve_jwks(key.jwks.clone()).await;
        let by_name = loopback.replace("127.0.0.1", "localhost");
        let token_url = format!("{}oauth2/token", gw.base);
        for jwks_uri in [
            loopback.as_str(),
            by_name.as_str(),
            "http://169.254.169.254/latest/meta-data/jwks.json",
            "http://[::1]:8081/.well-known/jwks.json",
        ] {
            let (client, _) = seed_client(&gw, None, json!({"jwksUri": jwks_uri}), None);
            let now = fhirgate::store::now_unix();
            let claims = json!({"iss": client, "sub": client, "aud": token_url, "iat": now,
                "exp": now + 300, "jti": uuid::Uuid::new_v4().to_string()});
            let (s, b) = token_request(
                &gw,
                &[
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion(&key, &claims)),
                ],
            )
            .await;
            assert_eq!(
                (s, b),
                (
                    401,
                    oauth_error("invalid_client", "Invalid client assertion signature")
                ),
                "{jwks_uri}"
            );
        }
    });
}

/// `fhirgate_security_events_total{event,outcome}` as the metrics listener shows it now.
async fn security_events(event: &str, outcome: &str) -> u64 {
    let text = TestGateway::client()
        .get(format!("{}metrics", gw().metrics))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let series =
        format!("fhirgate_security_events_total{{event=\"{event}\",outcome=\"{outcome}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 10: security events of the control plane are recorded (typed records without secrets,
/// counted per event and outcome): sign-in and its failures, token issuance, refresh reuse,
/// logout, password changes and the sessions they end.
#[test]
fn security_events_are_recorded() {
    let (e, _) = user("audit");
    rt().block_on(async {
        let failures = security_events("sign_in", "failure").await;
        let (s, _) = auth_login(gw(), &json!({"email": e, "password": "not the password"})).await;
        assert_eq!(s, 400);
        assert!(security_events("sign_in", "failure").await > failures);

        let sign_ins = security_events("sign_in", "success").await;
        let issued = security_events("token_issued", "success").await;
        let t = offline_tokens(&e, None).await;
        assert!(security_events("sign_in", "success").await > sign_ins);
        assert!(security_events("token_issued", "success").await > issued);

        let reused = security_events("refresh_token_reused", "failure").await;
        let r1 = t.refresh_token.clone().unwrap();
        let (s, _) = token_request(
            gw(),
            &[("grant_type", "refresh_token"), ("refresh_token", &r1)],
        )
        .await;
        assert_eq!(s, 200);
        let (s, _) = token_request(
            gw(),
            &[("grant_type", "refresh_token"), ("refresh_token", &r1)],
        )
        .await;
        assert_eq!(s, 400);
        assert!(security_events("refresh_token_reused", "failure").await > reused);

        let t = offline_tokens(&e, None).await;
        let changed = security_events("password_changed", "success").await;
        let ended = security_events("sessions_ended", "success").await;
        let (s, out) = post_with(
            "auth/changepassword",
            Some(&format!("Bearer {}", t.access_token)),
            &json!({"oldPassword": PASSWORD, "newPassword": "another horse battery"}),
        )
        .await;
        assert_eq!(s, 200, "{out}");
        assert!(security_events("password_changed", "success").await > changed);
        assert!(security_events("sessions_ended", "success").await > ended);
    });
}
