//! SMART App Launch 2.2 and SMART Backend Services, one test per rule, against a real fhirgate
//! in front of the real FHIR upstream: what discovery advertises, public clients (PKCE S256 and
//! nothing else), asymmetric client authentication with every advertised algorithm (inline
//! `jwks` and `jwksUri`), backend token lifetime, refresh down-scoping, ID token algorithms.
//! The browser-driven launches (fhirclient in chromium) are in `tests/browser_smart.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::assertion::{
    AssertionKey, assertion, assertion_key, p384_assertion_key, rsa_assertion_key, serve_jwks,
};
use common::gateway::{TestGateway, shared as gw};
use common::http::{basic, bearer_get_status, rt, send};
use common::people::{
    UserSeed, auth_login, jwt_claims, jwt_header, pkce_pair, seed, seed_client, sign_in,
    token_request, unique_email,
};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";

fn oauth_error(error: &str, description: &str) -> Value {
    json!({"error": error, "error_description": description})
}

/// A Practitioner in the default project; returns the e-mail.
fn practitioner(tag: &str) -> String {
    let e = unique_email(tag);
    seed(gw(), &UserSeed::new(&e, PASSWORD));
    e
}

/// A public client: registered redirect URI, no secret, no keys.
fn public_client(extra: Value) -> String {
    let mut fields = json!({"name": "public app", "redirectUris": ["https://app.example/cb"]});
    for (k, v) in extra.as_object().unwrap() {
        fields[k] = v.clone();
    }
    let (id, _) = seed_client(gw(), None, fields, None);
    // seed_client always gives a secret; a public client has none.
    let c = id.clone();
    common::people::on_gateway(gw(), move |state| async move {
        state.store.set_client_secret(&c, None, None).await.unwrap();
        state.refresh().await.unwrap();
    });
    id
}

/// An HTTP client that does not follow redirects (the authorization server's 302s are the
/// answer under test).
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get_json(url: &str) -> Value {
    let (status, body) = send(TestGateway::client().get(url)).await;
    assert_eq!(status, 200, "{url}: {body}");
    body
}

#[test]
fn smart_configuration_lists_what_is_real() {
    rt().block_on(async {
        for path in [
            ".well-known/smart-configuration",
            "fhir/R4/.well-known/smart-configuration",
        ] {
            let c = get_json(&format!("{}{path}", gw().base)).await;
            assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
            // Exactly the algorithms `backend_services_with_every_advertised_algorithm` signs
            // with (ES512 is not one: the JWT library has no P-521).
            assert_eq!(
                c["token_endpoint_auth_signing_alg_values_supported"],
                json!(["RS256", "RS384", "RS512", "ES256", "ES384"])
            );
            let caps: Vec<&str> = c["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            for cap in [
                "launch-standalone",
                "launch-ehr",
                "client-public",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "sso-openid-connect",
                "context-ehr-patient",
                "context-ehr-encounter",
                "context-standalone-patient",
                "permission-patient",
                "permission-user",
                "permission-v1",
                "permission-v2",
                "permission-offline",
                "authorize-post",
            ] {
                assert!(caps.contains(&cap), "{cap} missing from {caps:?}");
            }
            assert_eq!(
                c["token_endpoint"],
                format!("{}oauth2/token", gw().base).as_str()
            );
        }
        // `sso-openid-connect` needs RS256 ID tokens (SMART App Launch 2.2 §2.0.2).
        let oidc = get_json(&format!("{}.well-known/openid-configuration", gw().base)).await;
        let algs = oidc["id_token_signing_alg_values_supported"]
            .as_array()
            .unwrap();
        assert!(algs.contains(&json!("RS256")), "{algs:?}");
        let jwks = get_json(&format!("{}.well-known/jwks.json", gw().base)).await;
        let kinds: Vec<(&str, &str)> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (k["kty"].as_str().unwrap(), k["alg"].as_str().unwrap()))
            .collect();
        assert!(kinds.contains(&("RSA", "RS256")), "{kinds:?}");
        assert!(kinds.contains(&("EC", "ES256")), "{kinds:?}");
    });
}

#[test]
fn public_clients_must_use_pkce_s256() {
    let email = practitioner("smart-public");
    // pkceOptional does not let a public client off: PKCE is all that binds its codes.
    let client = public_client(json!({"pkceOptional": true}));
    rt().block_on(async {
        let login = |challenge: Option<(&str, &str)>| {
            let mut body = json!({"email": email, "password": PASSWORD, "clientId": client,
                                  "scope": "openid"});
            if let Some((c, m)) = challenge {
                body["codeChallenge"] = json!(c);
                body["codeChallengeMethod"] = json!(m);
            }
            body
        };
        let refused = |(s, b): (u16, Value)| {
            assert_eq!(s, 400, "{b}");
            assert_eq!(
                common::http::outcome_text(&b),
                "Public clients must use PKCE with S256"
            );
        };
        refused(auth_login(gw(), &login(None)).await);
        refused(auth_login(gw(), &login(Some(("abc", "plain")))).await);

        // With S256, the code and its verifier are enough: no secret.
        let t = sign_in(gw(), &email, PASSWORD, Some(&client), "openid").await;
        assert_eq!(jwt_claims(&t.access_token)["client_id"], client.as_str());
        let (status, _) = send(
            TestGateway::client()
                .get(format!("{}Patient?_count=1", gw().fhir))
                .bearer_auth(&t.access_token),
        )
        .await;
        assert_eq!(status, 200);

        // A wrong verifier is `invalid_grant` (RFC 7636 §4.6).
        let (verifier, challenge) = pkce_pair();
        let (s, b) = auth_login(gw(), &login(Some((&challenge, "S256")))).await;
        assert_eq!(s, 200, "{b}");
        let code = b["code"].as_str().unwrap();
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("client_id", &client),
                ("code_verifier", &format!("{verifier}x")),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (400, oauth_error("invalid_grant", "Invalid code verifier"))
        );

        // The authorize endpoint refuses it too, before any sign-in page.
        let url = format!(
            "{}oauth2/authorize?response_type=code&client_id={client}&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&scope=openid&state=s1",
            gw().base
        );
        let r = no_redirects().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 302);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(
            location.starts_with("https://app.example/cb?")
                && location.contains("error=invalid_request")
                && location.contains("state=s1"),
            "{location}"
        );

        // No client credentials grant: a public client has nothing to authenticate with.
        let (s, b) = token_request(
            gw(),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client),
            ],
        )
        .await;
        assert_eq!(
            (s, b),
            (401, oauth_error("invalid_client", "Missing client_secret"))
        );
    });
}

/// A backend service registered with `key` (inline or by URL) gets a token with a signed
/// assertion; returns the token response.
async fn backend_token(client: &str, key: &AssertionKey) -> (u16, Value) {
    let token_url = format!("{}oauth2/token", gw().base);
    let now = fhirgate::store::now_unix();
    let claims = json!({"iss": client, "sub": client, "aud": token_url, "iat": now,
                        "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string()});
    token_request(
        gw(),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.rs"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion(key, &claims)),
        ],
    )
    .await
}

#[test]
fn backend_services_with_every_advertised_algorithm() {
    rt().block_on(async {
        let keys = [
            rsa_assertion_key(Algorithm::RS256),
            rsa_assertion_key(Algorithm::RS384),
            rsa_assertion_key(Algorithm::RS512),
            assertion_key(),
            p384_assertion_key(),
        ];
        for key in &keys {
            // Keys registered inline (SMART 2.2 `jwks`) and published at a URL.
            let inline = seed_client(gw(), None, json!({"jwks": key.jwks}), None).0;
            let url = serve_jwks(key.jwks.clone()).await;
            let by_url = seed_client(gw(), None, json!({"jwksUri": url}), None).0;
            for client in [&inline, &by_url] {
                let (s, b) = backend_token(client, key).await;
                assert_eq!(s, 200, "{:?}: {b}", key.alg);
                assert_eq!(b["scope"], "system/Patient.rs");
                // SMART Backend Services: at most five minutes by default.
                assert_eq!(b["expires_in"], 300, "{:?}", key.alg);
                assert!(b.get("refresh_token").is_none());
            }
            // Another client's key proves nothing.
            let stranger = p384_assertion_key();
            let (s, b) = backend_token(&inline, &stranger).await;
            assert_eq!(
                (s, b),
                (
                    401,
                    oauth_error("invalid_client", "Invalid client assertion signature")
                ),
                "{:?}",
                key.alg
            );
        }
    });
}

#[test]
fn an_inline_jwk_set_holds_only_public_asymmetric_keys() {
    rt().block_on(async {
        let admin = gw().admin_token().await;
        let key = rsa_assertion_key(Algorithm::RS384);
        let mut private = key.jwks.clone();
        private["keys"][0]["d"] = json!("AQAB");
        let symmetric = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]});
        for (jwks, why) in [
            (private, "a private key"),
            (symmetric, "a symmetric key"),
            (json!({"keys": []}), "no key"),
            (json!("https://example.com/jwks"), "not a set"),
        ] {
            let (s, b) = send(
                TestGateway::client()
                    .post(format!("{}ClientApplication", gw().fhir))
                    .bearer_auth(&admin)
                    .json(&json!({"resourceType": "ClientApplication", "name": why, "jwks": jwks})),
            )
            .await;
            assert_eq!(s, 400, "{why}: {b}");
            assert_eq!(b["issue"][0]["expression"][0], "ClientApplication.jwks");
        }
    });
}

#[test]
fn refresh_may_narrow_the_scope_never_widen_it() {
    let email = practitioner("smart-refresh");
    let (client, secret) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let admin = gw().admin_token().await;
        let (s, patient) = send(
            TestGateway::client()
                .post(format!("{}Patient", gw().fhir))
                .bearer_auth(&admin)
                .json(&json!({"resourceType": "Patient", "name": [{"family": "Narrow"}]})),
        )
        .await;
        assert_eq!(s, 201, "{patient}");
        let patient_url = format!("{}Patient/{}", gw().fhir, patient["id"].as_str().unwrap());
        let read = |token: String| {
            let url = patient_url.clone();
            async move { bearer_get_status(&url, &token).await }
        };
        let granted = "openid offline_access user/Patient.rs user/Observation.rs";
        let t = sign_in(gw(), &email, PASSWORD, Some(&client), granted).await;
        assert_eq!(read(t.access_token.clone()).await, 200);
        let refresh = |token: String, scope: Option<&'static str>| {
            let (client, secret) = (client.clone(), secret.clone());
            async move {
                let mut form = vec![("grant_type", "refresh_token".to_string())];
                form.push(("refresh_token", token));
                if let Some(s) = scope {
                    form.push(("scope", s.to_string()));
                }
                send(
                    TestGateway::client()
                        .post(format!("{}oauth2/token", gw().base))
                        .header("authorization", basic(&client, &secret))
                        .form(&form),
                )
                .await
            }
        };

        // Narrower: the new access token carries only what was asked for, and the gateway
        // enforces that (no Patient read with Observation alone).
        let (s, b) = refresh(
            t.refresh_token.clone().unwrap(),
            Some("openid user/Observation.rs"),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["scope"], "openid user/Observation.rs");
        let narrowed = b["access_token"].as_str().unwrap().to_string();
        assert_eq!(jwt_claims(&narrowed)["scope"], "openid user/Observation.rs");
        assert_eq!(read(narrowed).await, 403);
        // A narrowing of a granted SMART scope (read only) is a narrowing too.
        let (s, b) = refresh(
            b["refresh_token"].as_str().unwrap().to_string(),
            Some("user/Patient.r"),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(read(b["access_token"].as_str().unwrap().into()).await, 200);

        // Wider: refused, and the refresh token is not spent.
        let current = b["refresh_token"].as_str().unwrap().to_string();
        for wider in [
            "openid user/Patient.rs user/Condition.rs",
            "user/Patient.cruds",
            "system/*.rs",
            // No resource scope at all: the token would carry the whole policy.
            "openid",
            "openid offline_access",
        ] {
            let (s, b) = refresh(current.clone(), Some(wider)).await;
            assert_eq!(
                (s, b),
                (400, oauth_error("invalid_scope", "Invalid scope")),
                "{wider}"
            );
        }
        // No scope: the whole grant again (RFC 6749 §6).
        let (s, b) = refresh(current, None).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["scope"], granted);
        assert_eq!(read(b["access_token"].as_str().unwrap().into()).await, 200);
    });
}

#[test]
fn id_tokens_are_rs256_for_smart_sign_ins_and_on_request() {
    let email = practitioner("smart-idtoken");
    let (plain_client, _) = seed_client(gw(), None, json!({}), None);
    let (rs_client, _) = seed_client(
        gw(),
        None,
        json!({"extension": [{
            "url": "https://fhirgate.dev/fhir/StructureDefinition/id-token-signed-response-alg",
            "valueCode": "RS256"
        }]}),
        None,
    );
    rt().block_on(async {
        let jwks = get_json(&format!("{}.well-known/jwks.json", gw().base)).await;
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
        let verify = |token: &str, client: &str| {
            let header = jsonwebtoken::decode_header(token).unwrap();
            let jwk = jwks
                .find(header.kid.as_deref().unwrap())
                .expect("a published key");
            let mut v = jsonwebtoken::Validation::new(header.alg);
            v.set_audience(&[client]);
            v.set_issuer(&[gw().base.as_str()]);
            jsonwebtoken::decode::<Value>(
                token,
                &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
                &v,
            )
            .unwrap_or_else(|e| panic!("{e}: {token}"))
            .claims
        };
        let cases = [
            (&plain_client, "openid", "ES256"),
            (&plain_client, "openid fhirUser", "RS256"),
            (&plain_client, "openid user/Patient.rs", "RS256"),
            (&rs_client, "openid", "RS256"),
        ];
        for (client, scope, alg) in cases {
            let t = sign_in(gw(), &email, PASSWORD, Some(client), scope).await;
            assert_eq!(jwt_header(&t.id_token)["alg"], alg, "{scope}");
            let claims = verify(&t.id_token, client);
            assert!(
                claims["fhirUser"]
                    .as_str()
                    .unwrap()
                    .starts_with("Practitioner/")
            );
            // Access tokens stay ES256 whatever the ID token uses.
            assert_eq!(jwt_header(&t.access_token)["alg"], "ES256");
        }
    });
}

/// Creates a Patient upstream through the gateway as the bootstrap admin; returns its id.
async fn new_patient(admin: &str, family: &str) -> String {
    let (s, p) = send(
        TestGateway::client()
            .post(format!("{}Patient", gw().fhir))
            .bearer_auth(admin)
            .json(&json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Test"]}]})),
    )
    .await;
    assert_eq!(s, 201, "{p}");
    p["id"].as_str().unwrap().to_string()
}

async fn status_of(token: &str, path: &str) -> u16 {
    bearer_get_status(&format!("{}{path}", gw().fhir), token).await
}

/// Signs `email` in through `/auth/login` with an EHR `launch` and redeems the code; returns
/// the token endpoint's answer.
async fn launch_redeem(email: &str, client: &str, scope: &str, launch: &str) -> (u16, Value) {
    let (verifier, challenge) = pkce_pair();
    let (s, login) = auth_login(
        gw(),
        &json!({"email": email, "password": PASSWORD, "clientId": client,
                "scope": scope, "launch": launch,
                "codeChallenge": challenge, "codeChallengeMethod": "S256"}),
    )
    .await;
    assert_eq!(s, 200, "{login}");
    token_request(
        gw(),
        &[
            ("grant_type", "authorization_code"),
            ("code", login["code"].as_str().unwrap()),
            ("code_verifier", &verifier),
            ("client_id", client),
        ],
    )
    .await
}

/// [`launch_redeem`], which must succeed; returns the token response.
async fn launch_sign_in(email: &str, client: &str, scope: &str, launch: &str) -> Value {
    let (s, tokens) = launch_redeem(email, client, scope, launch).await;
    assert_eq!(s, 200, "{tokens}");
    tokens
}

/// `$smart-launch` as the EHR: the 302 to the app's launch URI; returns the launch id.
async fn smart_launch(admin: &str, client: &str, query: &str) -> (u16, Value, Option<String>) {
    let r = no_redirects()
        .get(format!(
            "{}ClientApplication/{client}/$smart-launch?{query}",
            gw().fhir
        ))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, location)
}

/// A confidential client an EHR can launch (`launchUri`), with its redirect URI; (id, secret).
fn launchable_client() -> (String, String) {
    seed_client(
        gw(),
        None,
        json!({"launchUri": "https://app.example/launch",
               "redirectUris": ["https://app.example/cb"]}),
        None,
    )
}

/// The `launch` parameter of the app launch URI `$smart-launch` redirected to.
fn launch_of(location: Option<String>) -> String {
    url::Url::parse(&location.expect("a redirect"))
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "launch")
        .expect("a launch parameter")
        .1
        .into_owned()
}

#[test]
fn ehr_launch_context_reaches_tokens_introspection_and_the_gateway() {
    let email = practitioner("smart-ehr");
    let (client, secret) = seed_client(
        gw(),
        None,
        json!({"launchUri": "https://app.example/launch?v=2",
               "redirectUris": ["https://app.example/cb"]}),
        None,
    );
    let (no_launch_uri, _) = seed_client(gw(), None, json!({}), None);
    rt().block_on(async {
        let admin = gw().admin_token().await;
        let family = format!("Ehr{}", uuid::Uuid::new_v4().simple());
        let in_context = new_patient(&admin, &family).await;
        let other = new_patient(&admin, &family).await;

        // The EHR launches the app with a patient in context.
        let (s, b, location) =
            smart_launch(&admin, &client, &format!("patient={in_context}")).await;
        assert_eq!(s, 302, "{b}");
        let location = url::Url::parse(&location.unwrap()).unwrap();
        assert_eq!(
            (location.host_str(), location.path()),
            (Some("app.example"), "/launch")
        );
        let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
        assert_eq!(q["v"], "2", "the launch URI's own query is kept");
        assert_eq!(q["iss"], format!("{}fhir/R4/", gw().base));
        let launch = q["launch"].clone();
        // The launch context is a SmartAppLaunch of the project, readable like any resource.
        let (s, stored) = send(
            TestGateway::client()
                .get(format!("{}SmartAppLaunch/{launch}", gw().fhir))
                .bearer_auth(&admin),
        )
        .await;
        assert_eq!(s, 200, "{stored}");
        assert_eq!(
            stored["patient"]["reference"],
            format!("Patient/{in_context}")
        );

        // The app signs the user in with `launch`.
        let tokens = launch_sign_in(
            &email,
            &client,
            "launch openid fhirUser patient/*.rs",
            &launch,
        )
        .await;
        assert_eq!(tokens["patient"], in_context.as_str());
        assert_eq!(tokens["need_patient_banner"], true);
        let access = tokens["access_token"].as_str().unwrap();
        // The token itself carries its patient: a later launch in the same session (which
        // reuses the Login) cannot move an earlier token to another patient.
        assert_eq!(jwt_claims(access)["patient"], in_context.as_str());

        // patient/ scopes reach the patient in context and nobody else (Medplum lets a
        // Practitioner's patient/*.rs read every patient).
        assert_eq!(
            status_of(access, &format!("Patient/{in_context}")).await,
            200
        );
        assert_ne!(status_of(access, &format!("Patient/{other}")).await, 200);
        let (s, bundle) = send(
            TestGateway::client()
                .get(format!("{}Patient?family={family}", gw().fhir))
                .bearer_auth(access),
        )
        .await;
        assert_eq!(s, 200, "{bundle}");
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [in_context.as_str()]);

        // Introspection says the same (SMART 2.2 §2.0.11).
        let (s, info) = send(
            TestGateway::client()
                .post(format!("{}oauth2/introspect", gw().base))
                .header("authorization", basic(&client, &secret))
                .form(&[("token", access)]),
        )
        .await;
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["active"], true);
        assert_eq!(info["patient"], in_context.as_str());
        assert!(
            info["fhirUser"]
                .as_str()
                .unwrap()
                .starts_with("Practitioner/")
        );

        // An encounter launch carries the encounter.
        let (s, b, location) = smart_launch(&admin, &client, "encounter=enc-1").await;
        assert_eq!(s, 302, "{b}");
        let launch = launch_of(location);
        let tokens = launch_sign_in(&email, &client, "launch openid", &launch).await;
        assert_eq!(tokens["encounter"], "enc-1");
        assert!(tokens.get("patient").is_none());

        // Medplum's refusals.
        let (s, b, _) = smart_launch(&admin, &no_launch_uri, "patient=x").await;
        assert_eq!(s, 400);
        assert_eq!(
            common::http::outcome_text(&b),
            "ClientApplication not configured for launch"
        );
        let (s, b, _) = smart_launch(&admin, &client, "patient=x&encounter=y").await;
        assert_eq!(s, 400);
        assert_eq!(
            common::http::outcome_text(&b),
            "Only one launch context can be specified"
        );
    });
}

#[test]
fn a_launch_of_another_project_is_refused() {
    let (client, _) = launchable_client();
    let other_project = common::people::seed_project(gw(), json!({}));
    let launch = uuid::Uuid::new_v4().to_string();
    let l = launch.clone();
    common::people::on_gateway(gw(), move |state| async move {
        state
            .store
            .put(
                json!({"resourceType": "SmartAppLaunch", "id": l,
                       "patient": {"reference": "Patient/someone-elses"}}),
                Some(&other_project),
                &[],
                None,
                true,
            )
            .await
            .unwrap();
    });
    rt().block_on(async {
        let (_, challenge) = pkce_pair();
        let url = format!(
            "{}oauth2/authorize?response_type=code&client_id={client}&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&scope=launch+openid&state=s&launch={launch}&code_challenge={challenge}&code_challenge_method=S256",
            gw().base
        );
        let r = no_redirects().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 302);
        let location = r.headers()["location"].to_str().unwrap();
        assert!(
            location.contains("error=invalid_request")
                && location.contains("error_description=Invalid+launch"),
            "{location}"
        );
    });
}

#[test]
fn an_ehr_made_launch_context_carries_fhir_context() {
    let email = practitioner("smart-fhircontext");
    let (client, secret) = launchable_client();
    rt().block_on(async {
        let admin = gw().admin_token().await;
        let patient = new_patient(&admin, "Context").await;
        let create = |body: Value| {
            let admin = admin.clone();
            async move {
                send(
                    TestGateway::client()
                        .post(format!("{}SmartAppLaunch", gw().fhir))
                        .bearer_auth(&admin)
                        .json(&body),
                )
                .await
            }
        };
        // The EHR creates the launch context itself (SMART 2.2 `fhirContext`).
        let (s, launch) = create(json!({"resourceType": "SmartAppLaunch",
            "patient": {"reference": format!("Patient/{patient}")},
            "fhirContext": [{"reference": "DiagnosticReport/dr-1"}]}))
        .await;
        assert_eq!(s, 201, "{launch}");
        let tokens = launch_sign_in(
            &email,
            &client,
            "launch openid patient/*.rs",
            launch["id"].as_str().unwrap(),
        )
        .await;
        let context = json!([{"reference": "DiagnosticReport/dr-1"}]);
        assert_eq!(tokens["patient"], patient.as_str());
        assert_eq!(tokens["fhirContext"], context);
        let (s, info) = send(
            TestGateway::client()
                .post(format!("{}oauth2/introspect", gw().base))
                .header("authorization", basic(&client, &secret))
                .form(&[("token", tokens["access_token"].as_str().unwrap())]),
        )
        .await;
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["fhirContext"], context);
        assert_eq!(info["patient"], patient.as_str());

        // A context must name what it says it names.
        for (body, expression) in [
            (
                json!({"resourceType": "SmartAppLaunch", "patient": {"reference": "Observation/o1"}}),
                "SmartAppLaunch.patient",
            ),
            (
                json!({"resourceType": "SmartAppLaunch", "encounter": {"reference": "Encounter/../x"}}),
                "SmartAppLaunch.encounter",
            ),
            (
                json!({"resourceType": "SmartAppLaunch", "fhirContext": [{"reference": "nothing"}]}),
                "SmartAppLaunch.fhirContext",
            ),
        ] {
            let (s, b) = create(body).await;
            assert_eq!(s, 400, "{b}");
            assert_eq!(common::http::outcome_expression(&b), expression);
        }
    });
}

#[test]
fn a_launch_without_a_patient_gets_no_patient_scopes() {
    // An encounter-only EHR launch asking for patient/ scopes: no patient in context, so the
    // code is refused rather than leaving patient/*.rs without the patient it is about.
    let email = practitioner("smart-nopatient");
    let (client, _) = launchable_client();
    rt().block_on(async {
        let admin = gw().admin_token().await;
        let (s, b, location) = smart_launch(&admin, &client, "encounter=enc-9").await;
        assert_eq!(s, 302, "{b}");
        let launch = launch_of(location);
        let (s, b) = launch_redeem(&email, &client, "launch openid patient/*.rs", &launch).await;
        assert_eq!(
            (s, b),
            (
                400,
                oauth_error("invalid_grant", "No patient in the launch context")
            )
        );
    });
}

#[test]
fn a_super_admins_launch_belongs_to_the_apps_project() {
    let (client, _) = launchable_client();
    rt().block_on(async {
        let super_admin = common::people::super_admin_token(gw()).await;
        let (s, b, location) = smart_launch(&super_admin, &client, "patient=p-7").await;
        assert_eq!(s, 302, "{b}");
        let launch = launch_of(location);
        let (_, challenge) = pkce_pair();
        let url = format!(
            "{}oauth2/authorize?response_type=code&client_id={client}&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&scope=launch+openid&state=s&launch={launch}&code_challenge={challenge}&code_challenge_method=S256",
            gw().base
        );
        let r = no_redirects().get(&url).send().await.unwrap();
        // The sign-in page, not "Invalid launch": the launch is in the app's project.
        assert_eq!(r.status(), 200, "{:?}", r.headers().get("location"));
    });
}
