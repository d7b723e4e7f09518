//! `private_key_jwt` client assertions: a client key, its JWK Set served over HTTP, and signed
//! assertions.

use serde_json::Value;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::Algorithm;
use serde_json::json;

/// A key of a client (PKCS#8 DER), its algorithm, and the JWK Set that publishes it.
pub struct AssertionKey {
    pub kid: String,
    pub alg: Algorithm,
    pub der: Vec<u8>,
    pub jwks: Value,
}

/// An ES256 (P-256) client key.
pub fn assertion_key() -> AssertionKey {
    let kid = uuid::Uuid::new_v4().to_string();
    let (key, der) = fhirgate::tokens::SigningKey::generate(kid.clone()).unwrap();
    let jwks = fhirgate::tokens::Keyring::new("x".into(), vec![key]).jwks();
    AssertionKey {
        kid,
        alg: Algorithm::ES256,
        der,
        jwks,
    }
}

/// An RSA 2048 client key that signs with `alg` (RS256, RS384 or RS512).
pub fn rsa_assertion_key(alg: Algorithm) -> AssertionKey {
    let kid = uuid::Uuid::new_v4().to_string();
    let (key, der) = fhirgate::tokens::SigningKey::generate_rsa(kid.clone()).unwrap();
    let mut jwks = fhirgate::tokens::Keyring::new("x".into(), vec![key]).jwks();
    jwks["keys"][0]["alg"] = json!(format!("{alg:?}"));
    AssertionKey {
        kid,
        alg,
        der,
        jwks,
    }
}

/// A P-384 client key (ES384).
pub fn p384_assertion_key() -> AssertionKey {
    use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let kid = uuid::Uuid::new_v4().to_string();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
        .unwrap()
        .as_ref()
        .to_vec();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &der).unwrap();
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 97);
    let jwks = json!({"keys": [{
        "kid": kid, "kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..49]),
        "y": URL_SAFE_NO_PAD.encode(&point[49..97]),
    }]});
    AssertionKey {
        kid,
        alg: Algorithm::ES384,
        der,
        jwks,
    }
}

pub fn assertion(key: &AssertionKey, claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(key.alg);
    h.kid = Some(key.kid.clone());
    let encoding = match key.alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            let body = STANDARD.encode(&key.der);
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            let pem = format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                lines.join("\n")
            );
            jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
        }
        _ => jsonwebtoken::EncodingKey::from_ec_der(&key.der),
    };
    jsonwebtoken::encode(&h, claims, &encoding).unwrap()
}

/// Serves `jwks` at `http://127.0.0.1:PORT/jwks.json` on the current runtime.
pub async fn serve_jwks(jwks: Value) -> String {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let port = super::http::serve(app).await;
    format!("http://127.0.0.1:{port}/jwks.json")
}
