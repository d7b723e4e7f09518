//! openid-client (npm, current major: a certified OpenID Connect relying party) against a real
//! fhirgate in front of the real FHIR upstream: `tests/compat/openid-client.mjs` runs discovery,
//! the authorization code flow with PKCE through the sign-in page, the code exchange with the ID
//! token verified against the JWKS (signature, iss, aud, nonce), userinfo, introspection,
//! refresh and revocation, and prints one JSON object; this test asserts on every field.
//!
//! Negative checks prove the RP's checks are real: a wrong `state`, a wrong `nonce` and an ID
//! token whose signature was altered in transit are all refused by openid-client.
//!
//! Needs `tests/compat/node_modules` and `tests/upstream/node_modules` (`scripts/setup`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::compat::run_script;
use common::gateway::{TestGateway, free_port};
use common::people::{UserSeed, seed, seed_client};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

const PASSWORD: &str = "a long relying party password";
const SCOPE: &str = "openid profile email offline_access user/Patient.rs";

/// An openid-client `ClientError` whose wrapped cause says which check failed.
fn client_error(code: &str, message: &str, cause_code: &str, cause: &str) -> Value {
    json!({
        "name": "ClientError",
        "code": code,
        "error": null,
        "error_description": null,
        "status": null,
        "message": message,
        "cause": {"code": cause_code, "message": cause},
    })
}

/// An OAuth error answer as openid-client reports it.
fn oauth_error(status: u16, error: &str, description: &str) -> Value {
    json!({
        "name": "ResponseBodyError",
        "code": "OAUTH_RESPONSE_BODY_ERROR",
        "error": error,
        "error_description": description,
        "status": status,
        "message": "server responded with an error in the response body",
        "cause": null,
    })
}

#[test]
fn openid_client_is_a_happy_relying_party() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let email = format!("rita-{}@example.com", uuid::Uuid::new_v4().simple());
    let mut person = UserSeed::new(&email, PASSWORD);
    person.first_name = "Rita".into();
    person.last_name = "Relying".into();
    let seeded = seed(&gw, &person);
    // Nothing listens there: the RP reads the code from the 302's Location.
    let redirect_uri = format!("http://127.0.0.1:{}/callback", free_port());
    let (client_id, secret) = seed_client(
        &gw,
        None,
        json!({"name": "Certified RP", "redirectUris": [redirect_uri]}),
        None,
    );

    let input = json!({
        "issuer": gw.base,
        "clientId": client_id,
        "clientSecret": secret,
        "redirectUri": redirect_uri,
        "email": email,
        "password": PASSWORD,
        "scope": SCOPE,
        "fhirBase": gw.fhir,
    });
    let run = run_script("openid-client.mjs", &input);
    let r = &run.result;
    assert!(
        r.get("failure").is_none(),
        "the openid-client suite failed: {}\n{}",
        r["failure"],
        run.stderr
    );
    assert!(run.success, "{r}\n{}", run.stderr);
    let base = gw.base.as_str();

    // Discovery: what openid-client read from /.well-known/openid-configuration.
    assert_eq!(
        r["discovery"],
        json!({
            "issuer": base,
            "authorizationEndpoint": format!("{base}oauth2/authorize"),
            "tokenEndpoint": format!("{base}oauth2/token"),
            "userinfoEndpoint": format!("{base}oauth2/userinfo"),
            "jwksUri": format!("{base}.well-known/jwks.json"),
            "introspectionEndpoint": format!("{base}oauth2/introspect"),
            "revocationEndpoint": format!("{base}oauth2/revoke"),
            "idTokenAlgs": ["ES256", "RS256"],
            "pkce": ["S256", "plain"],
            "supportsPKCE": true,
        }),
        "{r}"
    );

    // The sign-in page, then consent, then the 302 to the client with code and state.
    assert_eq!(r["pages"], json!(["Sign in", "Allow access"]), "{r}");
    assert_eq!(
        r["callback"],
        json!({"hasCode": true, "stateEchoed": true, "iss": null, "error": null})
    );
    assert_eq!(
        r["wrongState"],
        client_error(
            "OAUTH_INVALID_RESPONSE",
            "invalid response encountered",
            "OAUTH_INVALID_RESPONSE",
            "unexpected \"state\" response parameter value"
        )
    );

    // The code exchange, the ID token verified by openid-client (JWKS signature, iss, aud,
    // nonce, exp, iat).
    assert_eq!(
        r["tokens"],
        json!({
            "tokenType": "bearer",
            "hasAccessToken": true,
            "hasRefreshToken": true,
            "expiresIn": 3600,
            "scope": SCOPE,
        }),
        "{r}"
    );
    // A sign-in with `fhirUser` is a SMART sign-in: its ID token is RS256 (SMART App Launch
    // requires it for `sso-openid-connect`), verified by openid-client against the JWKS.
    assert_eq!(
        r["idToken"],
        json!({
            "alg": "RS256",
            "kidInJwks": true,
            "iss": base,
            "aud": client_id,
            "sub": seeded.user_id,
            "nonceMatches": true,
            "fhirUser": seeded.profile,
            "email": email,
            "authTimeIsNumber": true,
        })
    );
    assert_eq!(r["fhirObservationStatus"], 403, "{r}");

    // userinfo: `sub` matches the ID token's (openid-client checks it), claims by scope.
    assert_eq!(
        r["userinfo"],
        json!({
            "sub": seeded.user_id,
            "email": email,
            "given_name": "Rita",
            "family_name": "Relying",
            "profile": seeded.profile,
        })
    );

    // Introspection with client authentication (client_secret_basic); a wrong secret is 401.
    assert_eq!(
        r["introspection"],
        json!({
            "active": true,
            "sub": seeded.user_id,
            "clientId": client_id,
            "scope": SCOPE,
            "iss": base,
            "refreshActive": true,
        })
    );
    // RFC 6749 §5.2: a client that tried Basic gets a 401 with a Basic challenge, which
    // openid-client reports as the challenge it is.
    assert_eq!(
        r["introspectionWrongSecret"],
        json!({
            "name": "WWWAuthenticateChallengeError",
            "code": "OAUTH_WWW_AUTHENTICATE_CHALLENGE",
            "error": null,
            "error_description": null,
            "status": 401,
            "message": "server responded with a challenge in the WWW-Authenticate HTTP Header",
            "cause": null,
        })
    );

    // Refresh: new tokens for the same Login (the new ID token passes the same checks), the
    // old refresh token refused and inactive.
    assert_eq!(
        r["refresh"],
        json!({
            "newAccessToken": true,
            "newRefreshToken": true,
            "idTokenSub": seeded.user_id,
            "sameLogin": true,
            "fhirStatusBefore": 200,
            "fhirStatusAfter": 200,
            "oldRefresh": oauth_error(400, "invalid_request", "Invalid token"),
            "oldRefreshIntrospection": false,
        })
    );

    // Revocation (RFC 7009) of the refresh token ends the Login: both tokens inactive, the
    // gateway and userinfo refuse the access token, refresh says revoked; an unknown token is
    // still 200.
    assert_eq!(
        r["revocation"],
        json!({
            "accessIntrospection": {"active": false},
            "refreshIntrospection": {"active": false},
            "fhirStatus": 401,
            "userinfo": {
                "name": "ClientError",
                "code": "OAUTH_RESPONSE_IS_NOT_CONFORM",
                "error": null,
                "error_description": null,
                "status": null,
                "message": "unexpected HTTP response status code",
                "cause": null,
            },
            "userinfoStatus": 401,
            "refresh": oauth_error(400, "invalid_grant", "Token revoked"),
            "unknownToken": "ok",
        })
    );

    // The revoked Login's browser session is gone (sign in again); the next one is reused
    // (consent only).
    assert_eq!(r["secondPages"], json!(["Sign in", "Allow access"]));
    assert_eq!(r["thirdPages"], json!(["Allow access"]));
    assert_eq!(
        r["wrongNonce"],
        client_error(
            "OAUTH_JWT_CLAIM_COMPARISON_FAILED",
            "unexpected JWT claim value encountered",
            "OAUTH_JWT_CLAIM_COMPARISON_FAILED",
            "unexpected ID Token \"nonce\" claim value"
        )
    );
    assert_eq!(
        r["tamperedSignature"],
        client_error(
            "OAUTH_INVALID_RESPONSE",
            "invalid response encountered",
            "OAUTH_INVALID_RESPONSE",
            "JWT signature verification failed"
        )
    );
}
