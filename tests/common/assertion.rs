//! `private_key_jwt` client assertions: a client key, its JWK Set served over HTTP, and signed
//! assertions.

use serde_json::Value;

/// An ES256 key of a client, with the JWK Set that publishes it.
pub struct AssertionKey {
    pub kid: String,
    pub der: Vec<u8>,
    pub jwks: Value,
}

pub fn assertion_key() -> AssertionKey {
    let kid = uuid::Uuid::new_v4().to_string();
    let (key, der) = fhirgate::tokens::SigningKey::generate(kid.clone()).unwrap();
    let jwks = fhirgate::tokens::Keyring::new("x".into(), vec![key]).jwks();
    AssertionKey { kid, der, jwks }
}

pub fn assertion(key: &AssertionKey, claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(
        &h,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.der),
    )
    .unwrap()
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
