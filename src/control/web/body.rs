//! Reading requests: bodies (bounded), query strings, media types, the `/auth/*` body (JSON or
//! form) and its fields, and the JSON answers of the `/auth/*`, OAuth and discovery endpoints.

use crate::control::web::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// Largest request body the control API reads.
pub const MAX_BODY: usize = 1 << 20;

/// Largest `/auth/*` request body.
const MAX_AUTH_BODY: usize = 64 * 1024;

/// Reads the whole body, at most `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::Outcome(fhirgate_core::fhir::outcome::Stock::BodyTooLarge.outcome()))
}

/// The decoded `name=value` pairs of a request's query string, in order, repeats kept.
pub(crate) fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The media type of a request, lower-case, without parameters.
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// Parses a JSON request body (`application/json` or `application/fhir+json`) into an object.
pub(crate) async fn json_body(
    headers: &HeaderMap,
    body: Body,
) -> Result<serde_json::Value, ApiError> {
    let bytes = read_body(body, MAX_BODY).await?;
    match media_type(headers).as_deref() {
        Some("application/json" | "application/fhir+json") => {}
        _ => return Err(ApiError::bad_request("Unsupported content type")),
    }
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| ApiError::bad_request("Invalid JSON"))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("Invalid JSON"));
    }
    Ok(value)
}

/// 200 `application/json`: the answer of the `/auth/*`, OAuth and discovery endpoints.
pub(crate) fn ok_json(body: &serde_json::Value) -> Response {
    json_response(axum::http::StatusCode::OK, "application/json", body)
}

/// A JSON response with a content type.
pub(crate) fn json_response(
    status: axum::http::StatusCode,
    content_type: &'static str,
    body: &serde_json::Value,
) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body.to_string(),
    )
        .into_response()
}

/// `/auth/*` bodies: JSON, or a form (Medplum parses both on every route). Form values are
/// strings; `true`/`false` become booleans.
/// With `booleans` false, form values all stay strings (the legacy `/auth/exchange`).
async fn auth_body(
    headers: &HeaderMap,
    body: Body,
    booleans: bool,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(body, MAX_AUTH_BODY).await?;
    match media_type(headers).as_deref() {
        Some("application/x-www-form-urlencoded") => {
            let mut map = Map::new();
            for (k, v) in form_urlencoded::parse(&bytes) {
                let value = match v.as_ref() {
                    "true" if booleans => Value::Bool(true),
                    "false" if booleans => Value::Bool(false),
                    _ => Value::String(v.into_owned()),
                };
                map.insert(k.into_owned(), value);
            }
            Ok(map)
        }
        Some("application/json" | "application/fhir+json") => {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(ApiError::bad_request("Invalid JSON")),
            }
        }
        // No body at all reads as an empty object, so the field checks answer.
        _ if bytes.is_empty() => Ok(Map::new()),
        _ => Err(ApiError::bad_request("Unsupported content type")),
    }
}

/// The `/auth/*` body as an extractor (see [`auth_body`]); it reads the body, so it comes last.
/// `AuthBody<false>` keeps form values as strings (`/auth/exchange`, as Medplum reads it).
pub struct AuthBody<const FORM_BOOLEANS: bool = true>(pub Map<String, Value>);

impl<S: Send + Sync, const FORM_BOOLEANS: bool> FromRequest<S> for AuthBody<FORM_BOOLEANS> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        auth_body(&parts.headers, body, FORM_BOOLEANS)
            .await
            .map(AuthBody)
    }
}

/// A JSON object body as an extractor (see [`json_body`]), for handlers that read it before
/// anything else may refuse.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<JsonBody, ApiError> {
        let (parts, body) = req.into_parts();
        json_body(&parts.headers, body).await.map(JsonBody)
    }
}

/// A string field; other JSON types count as absent.
pub fn body_str(body: &Map<String, Value>, key: &str) -> Option<String> {
    body.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

pub(crate) fn body_bool(body: &Map<String, Value>, key: &str) -> bool {
    match body.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

/// The request's `Origin` header.
pub fn origin(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub fn user_agent(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(header::USER_AGENT)?.to_str().ok()?;
    Some(ua.chars().take(256).collect())
}

/// The `login` of a step on a pending Login and the one other field the step needs, reported
/// in that order when missing.
pub(crate) fn login_and(
    body: &Map<String, Value>,
    key: &str,
    missing: &str,
) -> Result<(String, String), ApiError> {
    let login_id =
        body_str(body, "login").ok_or_else(|| ApiError::invalid("login", "Missing login"))?;
    let other = body_str(body, key).ok_or_else(|| ApiError::invalid(key, missing))?;
    Ok((login_id, other))
}
