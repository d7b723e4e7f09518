//! What most integration tests need around a request: a runtime, Basic credentials, answers read
//! as (status, JSON), and the parts of an OperationOutcome the tests assert on.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::Method;
use serde_json::Value;

use super::gateway::TestGateway;

/// The runtime a blocking test drives its requests on.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// An `Authorization` value for client (or user) credentials.
pub fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

/// The `details.text` of an OperationOutcome's first issue ("" when there is none).
pub fn outcome_text(v: &Value) -> &str {
    v["issue"][0]["details"]["text"]
        .as_str()
        .unwrap_or_default()
}

/// The first `expression` of an OperationOutcome's first issue ("" when there is none).
pub fn outcome_expression(v: &Value) -> &str {
    v["issue"][0]["expression"][0].as_str().unwrap_or_default()
}

/// Sends `req`; returns (status, body as JSON; a body that is not JSON as a JSON string, an
/// empty one as `Null`).
pub async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("the request is sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("the body is read");
    if text.is_empty() {
        return (status, Value::Null);
    }
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// The status of a GET of `url` with `Authorization: Bearer <token>`.
pub async fn bearer_get_status(url: &str, token: &str) -> u16 {
    crate::common::gateway::TestGateway::client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("the request is sent")
        .status()
        .as_u16()
}

/// `req` with `Authorization: Bearer <token>` when a token is given.
pub fn with_bearer(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// `req` with this `Authorization` value when one is given.
pub fn with_authorization(
    req: reqwest::RequestBuilder,
    authorization: Option<&str>,
) -> reqwest::RequestBuilder {
    match authorization {
        Some(a) => req.header("authorization", a),
        None => req,
    }
}

impl TestGateway {
    /// `send` of a JSON POST to `<base><path>`, with a Bearer token when given.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: impl serde::Serialize,
    ) -> (u16, Value) {
        self.call(Method::POST, path, token, Some(body)).await
    }

    /// `send` of a JSON PUT to `<base><path>`, with a Bearer token when given.
    pub async fn put(
        &self,
        path: &str,
        token: Option<&str>,
        body: impl serde::Serialize,
    ) -> (u16, Value) {
        self.call(Method::PUT, path, token, Some(body)).await
    }

    /// `send` of a GET of `<base><path>`, with a Bearer token when given.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(Method::GET, path, token, None::<()>).await
    }

    /// `send` of a DELETE of `<base><path>`, with a Bearer token when given.
    pub async fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(Method::DELETE, path, token, None::<()>).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<impl serde::Serialize>,
    ) -> (u16, Value) {
        let mut req = Self::client().request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        send(with_bearer(req, token)).await
    }
}

/// (status, body as JSON, or `Null` when it is not JSON) of a response.
pub async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends `req`; returns only the status.
pub async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send()
        .await
        .expect("the request is sent")
        .status()
        .as_u16()
}

/// Serves `app` on a free loopback port on the current runtime (a local stand-in for a service
/// outside fhirgate); returns the port.
pub async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}
