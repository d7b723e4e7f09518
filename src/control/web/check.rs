//! Permission checks of the identity types (`X-Fhirgate-Check: permission`; the gateway answers
//! every other type, see `gateway::check`). The control API decides them with its own handlers,
//! so a check and the request it asks about can never disagree: a read runs as usual and its
//! answer becomes the verdict; a create, update or delete runs with [`Commit::CheckOnly`] and
//! stops before the store is written; anything else (operations) cannot be checked and is
//! refused, never performed.

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::permission::{PERMISSION, Verdict, is_verdict};
use serde_json::Value;

use super::error::ApiError;
use super::error::outcome_response;

static X_FHIRGATE_CHECK: HeaderName = HeaderName::from_static("x-fhirgate-check");

/// The largest refusal read back into a verdict (an OperationOutcome is far smaller).
const REFUSAL_LIMIT: usize = 64 * 1024;

/// Whether a write handler performs the write or only checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Write,
    CheckOnly,
}

impl<S: Send + Sync> FromRequestParts<S> for Commit {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Commit>()
            .copied()
            .unwrap_or(Commit::Write))
    }
}

/// What a handler that committed nothing answers: the middleware turns it into a verdict.
pub fn checked_only() -> Response {
    outcome_response(&Outcome::AllOk)
}

enum Checkable {
    Read,
    Write,
}

/// Which of the FHIR requests of the control API can be checked.
fn checkable(method: &Method, rest: &str) -> Option<Checkable> {
    let segments: Vec<&str> = rest.split('/').collect();
    match (method, segments.as_slice()) {
        // An operation may act, even on a GET (`$smart-launch` stores a launch).
        (_, [_, _, op, ..]) if op.starts_with('$') => None,
        (&Method::GET | &Method::HEAD, _) => Some(Checkable::Read),
        (&Method::POST, [_, "_search"]) => Some(Checkable::Read),
        (&Method::POST, [_]) | (&Method::PUT | &Method::DELETE, [_, _]) => Some(Checkable::Write),
        _ => None,
    }
}

/// The middleware: requests without the header pass untouched.
pub async fn permission_check(mut req: Request, next: Next) -> Response {
    let Some(value) = req.headers().get(&X_FHIRGATE_CHECK) else {
        return next.run(req).await;
    };
    if !value.as_bytes().eq_ignore_ascii_case(PERMISSION.as_bytes()) {
        return ApiError::bad_request("X-Fhirgate-Check takes the value `permission`")
            .into_response();
    }
    let path = req.uri().path();
    let path = path.strip_prefix("/api").unwrap_or(path);
    let Some(rest) = path.strip_prefix("/fhir/R4/") else {
        return ApiError::bad_request("X-Fhirgate-Check applies to FHIR requests only")
            .into_response();
    };
    match checkable(req.method(), rest) {
        None => {
            return ApiError::bad_request(
                "This request cannot be checked; ask about its interaction",
            )
            .into_response();
        }
        Some(Checkable::Write) => {
            req.extensions_mut().insert(Commit::CheckOnly);
        }
        Some(Checkable::Read) => {}
    }
    verdict_of(next.run(req).await).await
}

/// The verdict a handler's answer stands for; errors of the check itself pass as they are.
async fn verdict_of(response: Response) -> Response {
    let status = response.status().as_u16();
    let verdict = if (200..300).contains(&status) || status == 304 {
        Verdict::allowed(&[])
    } else if !is_verdict(status) {
        return response;
    } else {
        let body = axum::body::to_bytes(response.into_body(), REFUSAL_LIMIT)
            .await
            .unwrap_or_default();
        let outcome: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let issue = &outcome["issue"][0];
        let reason = issue["code"].as_str().unwrap_or("refused");
        let text = issue["details"]["text"].as_str().map(str::to_string);
        Verdict::refused_with(status, reason, text)
    };
    let mut answer = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/fhir+json")
        .header(header::CACHE_CONTROL, "no-store");
    for (name, value) in verdict.headers() {
        answer = answer.header(name, value);
    }
    answer
        .body(Body::from(verdict.to_bytes()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_and_plain_writes_can_be_checked() {
        let is = |m: Method, rest: &str| match checkable(&m, rest) {
            Some(Checkable::Read) => "read",
            Some(Checkable::Write) => "write",
            None => "no",
        };
        assert_eq!(is(Method::GET, "ProjectMembership"), "read");
        assert_eq!(is(Method::GET, "ClientApplication/c1"), "read");
        assert_eq!(is(Method::POST, "AccessPolicy/_search"), "read");
        assert_eq!(is(Method::POST, "AccessPolicy"), "write");
        assert_eq!(is(Method::PUT, "AccessPolicy/a1"), "write");
        assert_eq!(is(Method::DELETE, "AccessPolicy/a1"), "write");
        assert_eq!(
            is(Method::POST, "ClientApplication/c1/$rotate-secret"),
            "no"
        );
        assert_eq!(is(Method::PATCH, "AccessPolicy/a1"), "no");
        assert_eq!(is(Method::PUT, "AccessPolicy"), "no");
    }
}
