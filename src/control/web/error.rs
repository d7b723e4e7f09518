//! The one error type of the control API. Every handler answers `Result<Response, ApiError>`;
//! the variant decides the wire shape: OAuth `{error, error_description}` for the token
//! endpoint, an OperationOutcome (`application/fhir+json`) for everything else, plain text where
//! Medplum answers plain text. Internal errors are logged here and answered with a generic 500
//! that says nothing about the cause.

use crate::store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::{Outcome, Stock};
use serde_json::json;

pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Debug)]
pub enum ApiError {
    /// RFC 6749 error: `{error, error_description}`.
    OAuth {
        status: StatusCode,
        error: &'static str,
        description: String,
    },
    /// An OperationOutcome with Medplum's status and text.
    Outcome(Outcome),
    /// 401 `unauthorized`; with `basic_realm`, also `WWW-Authenticate: Basic realm="…"`.
    Unauthorized { basic_realm: Option<String> },
    /// A validation failure of one field: 400 OperationOutcome with `expression`.
    Invalid { text: String, expression: String },
    /// 405 for a method the path does not serve.
    MethodNotAllowed,
    /// Plain-text error (Medplum answers some errors this way).
    Text(StatusCode, &'static str),
    /// Something broke on our side. The message is logged, never sent.
    Internal(String),
}

impl ApiError {
    /// `invalid_request` with a description, status 400 (the token endpoint's usual error).
    pub fn oauth(description: impl Into<String>) -> ApiError {
        ApiError::OAuth {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            description: description.into(),
        }
    }

    pub fn oauth_code(error: &'static str, description: impl Into<String>) -> ApiError {
        ApiError::OAuth {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
        }
    }

    /// RFC 6749 §5.2 `invalid_client`: the client could not be authenticated (401).
    pub fn invalid_client(description: impl Into<String>) -> ApiError {
        ApiError::OAuth {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: description.into(),
        }
    }

    /// True for an `invalid_client` refusal.
    pub fn is_invalid_client(&self) -> bool {
        matches!(
            self,
            ApiError::OAuth {
                error: "invalid_client",
                ..
            }
        )
    }

    /// An OAuth error's status, code and description; `None` for any other kind.
    #[cfg(test)]
    pub fn oauth_parts(&self) -> Option<(StatusCode, &'static str, String)> {
        match self {
            ApiError::OAuth {
                status,
                error,
                description,
            } => Some((*status, error, description.clone())),
            _ => None,
        }
    }

    pub fn bad_request(text: impl Into<String>) -> ApiError {
        ApiError::Outcome(Outcome::BadRequest(text.into()))
    }

    pub fn invalid(expression: &str, text: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            text: text.into(),
            expression: expression.to_string(),
        }
    }

    pub fn forbidden() -> ApiError {
        ApiError::Outcome(Outcome::Forbidden)
    }

    pub fn not_found() -> ApiError {
        ApiError::Outcome(Outcome::NotFound)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::Unauthorized { basic_realm: None }
    }

    pub fn conflict(text: impl Into<String>) -> ApiError {
        ApiError::Outcome(Outcome::Conflict(text.into()))
    }

    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(format!("{context}: {e}"))
    }

    /// The same error in OAuth shape (for the token endpoint, whose every error is OAuth-shaped).
    pub fn into_oauth(self) -> ApiError {
        match self {
            ApiError::Outcome(o) if o.status() < 500 => {
                let status = StatusCode::from_u16(o.status()).unwrap_or(StatusCode::BAD_REQUEST);
                let text = o.to_json()["issue"][0]["details"]["text"]
                    .as_str()
                    .unwrap_or("Invalid request")
                    .to_string();
                ApiError::OAuth {
                    status,
                    error: "invalid_request",
                    description: text,
                }
            }
            ApiError::Invalid { text, .. } => ApiError::oauth(text),
            other => other,
        }
    }
}

/// What a lookup found, or `missing()` when it found nothing; a store that could not answer
/// stays a store error (503), never "not found".
pub fn required<T>(
    found: Result<Option<T>, StoreError>,
    missing: impl FnOnce() -> ApiError,
) -> Result<T, ApiError> {
    found?.ok_or_else(missing)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::VersionConflict => ApiError::Outcome(Stock::VersionMismatch.outcome()),
            StoreError::Conflict => ApiError::conflict("Resource already exists"),
            StoreError::NotFound => ApiError::not_found(),
            // The database is unreachable: nothing was written (each write is one transaction);
            // the client may retry.
            other if other.is_unavailable() => ApiError::Outcome(Stock::StoreUnavailable.outcome()),
            other => ApiError::internal("store", other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::OAuth {
                status,
                error,
                description,
            } => {
                let body = json!({"error": error, "error_description": description});
                let mut r = (status, axum::Json(body)).into_response();
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r.headers_mut()
                    .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
                r
            }
            ApiError::Outcome(o) => outcome_response(&o),
            ApiError::Unauthorized { basic_realm } => {
                let mut r = outcome_response(&Outcome::Unauthorized);
                if let Some(realm) = basic_realm {
                    let value = format!("Basic realm=\"{}\"", realm.replace(['"', '\\'], ""));
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                }
                r
            }
            ApiError::Invalid { text, expression } => {
                let body = json!({
                    "resourceType": "OperationOutcome",
                    "id": uuid::Uuid::new_v4().to_string(),
                    "issue": [{"severity": "error", "code": "invalid", "expression": [expression], "details": {"text": text}}]
                });
                (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
                    body.to_string(),
                )
                    .into_response()
            }
            ApiError::MethodNotAllowed => {
                let body = json!({
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "not-supported", "details": {"text": "Method not allowed"}}]
                });
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
                    body.to_string(),
                )
                    .into_response()
            }
            ApiError::Text(status, text) => (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                )],
                text,
            )
                .into_response(),
            ApiError::Internal(message) => {
                tracing::error!(error = %message, "control API internal error");
                outcome_response(&Outcome::Internal)
            }
        }
    }
}

/// An OperationOutcome response.
pub fn outcome_response(outcome: &Outcome) -> Response {
    let status =
        StatusCode::from_u16(outcome.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        outcome.to_bytes(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_errors_convert_to_oauth_shape() {
        assert_eq!(
            ApiError::bad_request("IP address not allowed")
                .into_oauth()
                .oauth_parts(),
            Some((
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "IP address not allowed".to_string()
            ))
        );
    }

    #[test]
    fn store_errors_map_to_statuses() {
        assert!(matches!(
            ApiError::from(StoreError::VersionConflict),
            ApiError::Outcome(Outcome::PreconditionFailed(_))
        ));
        assert!(matches!(
            ApiError::from(StoreError::Conflict),
            ApiError::Outcome(Outcome::Conflict(_))
        ));
        assert!(matches!(
            ApiError::from(StoreError::NotFound),
            ApiError::Outcome(Outcome::NotFound)
        ));
    }
}
