//! The permission check: "may this caller do this?", answered by the request path itself.
//!
//! - `X-Fhirgate-Check: permission` on any FHIR request makes the gateway decide it exactly as it
//!   would serve it (authentication, policy, IP rules, on-behalf-of, classification, decision, and
//!   the instance checks, which read the stored instance upstream) and answer the verdict instead.
//!   Nothing is written upstream: a write stops where it would be sent.
//! - `GET /fhir/R4/$check-permission?interaction=…&resourceType=…[&id=…]` asks the same of one
//!   interaction on a type or an instance, without a body (a UI deciding what to show); it is
//!   turned into that interaction's request in check mode, so it can only ever read.
//!
//! The answer is a FHIR `Parameters`: `allowed`, the `status` the request would get, a `reason`
//! (the decision's label) and, for a denial, its `text`; a batch lists its entries' verdicts.
//! Errors of the check itself (no valid credentials, rate limits, the store or the upstream
//! unreachable) are answered as such, never as a verdict.

use bytes::Bytes;
use fhirgate_core::fhir::path::is_valid_id;
use http::Method;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::{Mode, RequestCtx};
use super::names;
use super::route::Route;

pub use fhirgate_core::fhir::permission::{PERMISSION, Verdict, is_verdict};

/// The path of the body-less form, after `/fhir/R4/`.
pub const OPERATION: &str = "$check-permission";

/// Why the request cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckRequestError {
    #[error("X-Fhirgate-Check takes the value `permission`")]
    UnknownCheck,
    #[error("X-Fhirgate-Check applies to FHIR requests only")]
    NotFhir,
    #[error("$check-permission is a GET")]
    NotGet,
    #[error(
        "$check-permission needs `interaction` (read, vread, search, history, create, update, patch, delete)"
    )]
    UnknownInteraction,
    #[error("$check-permission needs a valid `resourceType`")]
    BadType,
    #[error("$check-permission needs a valid `id` for this interaction")]
    BadId,
}

/// The mode a request asks for: `Check` when the header says so or the path is the operation,
/// which is then rewritten into the request it stands for (and `route` with it). An error is a
/// malformed question, to be answered as such.
pub fn prepare(
    session: &mut Session,
    route: &mut Route,
    present: names::Present,
) -> Result<Mode, CheckRequestError> {
    let header = if present.has(names::Present::CHECK) {
        session.req_header().headers.get(&names::X_FHIRGATE_CHECK)
    } else {
        None
    };
    let asked = match header {
        None => Mode::Serve,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(PERMISSION.as_bytes()) => Mode::Check,
        Some(_) => return Err(CheckRequestError::UnknownCheck),
    };
    match route {
        Route::Fhir { rest } if rest == OPERATION => {
            let req = session.req_header();
            let (method, rest) = operation_request(&req.method, req.uri.query())?;
            rewrite(session, method, &rest)?;
            let req = session.req_header();
            *route = super::route::route(req.method.as_str(), req.uri.path());
            Ok(Mode::Check)
        }
        // The identity types are the control API's: it answers their checks itself.
        Route::Control
            if asked == Mode::Check && !is_fhir_path(session.req_header().uri.path()) =>
        {
            Err(CheckRequestError::NotFhir)
        }
        _ => Ok(asked),
    }
}

/// The request `$check-permission?…` stands for: its method and its path and query after
/// `/fhir/R4/`.
pub fn operation_request(
    method: &Method,
    query: Option<&str>,
) -> Result<(Method, String), CheckRequestError> {
    if method != Method::GET {
        return Err(CheckRequestError::NotGet);
    }
    let mut interaction = None;
    let mut resource_type = None;
    let mut id = None;
    let mut version = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match k.as_ref() {
            "interaction" => &mut interaction,
            "resourceType" => &mut resource_type,
            "id" => &mut id,
            "versionId" => &mut version,
            _ => continue,
        };
        *slot = Some(v.into_owned());
    }
    let ty = resource_type
        .filter(|t| fhirgate_core::fhir::types::is_resource_type(t))
        .ok_or(CheckRequestError::BadType)?;
    if id.as_deref().is_some_and(|i| !is_valid_id(i)) {
        return Err(CheckRequestError::BadId);
    }
    let instance = || {
        id.clone()
            .map(|i| format!("{ty}/{i}"))
            .ok_or(CheckRequestError::BadId)
    };
    let interaction = interaction.ok_or(CheckRequestError::UnknownInteraction)?;
    Ok(match interaction.as_str() {
        "read" => (Method::GET, instance()?),
        "vread" => {
            let v = version
                .filter(|v| is_valid_id(v))
                .ok_or(CheckRequestError::BadId)?;
            (Method::GET, format!("{}/_history/{v}", instance()?))
        }
        "search" | "search-type" => (Method::GET, ty.clone()),
        "history" | "history-instance" | "history-type" => match &id {
            Some(_) => (Method::GET, format!("{}/_history", instance()?)),
            None => (Method::GET, format!("{ty}/_history")),
        },
        "create" => (Method::POST, ty.clone()),
        "update" => (Method::PUT, instance()?),
        "patch" => (Method::PATCH, instance()?),
        "delete" => (Method::DELETE, instance()?),
        _ => return Err(CheckRequestError::UnknownInteraction),
    })
}

/// Rewrites the operation's request into the one it stands for. Safe because a request in check
/// mode is never forwarded: the gateway answers it itself. (`rest` is a type and a valid id: it
/// always makes a URI.)
fn rewrite(session: &mut Session, method: Method, rest: &str) -> Result<(), CheckRequestError> {
    let uri: http::Uri = format!("/fhir/R4/{rest}")
        .parse()
        .map_err(|_| CheckRequestError::BadId)?;
    let req = session.req_header_mut();
    req.set_method(method);
    req.set_uri(uri);
    // The identity types are forwarded to the control API: the header tells it to check, never
    // to perform, whatever the client sent.
    req.insert_header(names::X_FHIRGATE_CHECK.clone(), PERMISSION)
        .map_err(|_| CheckRequestError::UnknownCheck)
}

/// The reason a verdict gives: the decision's label, except that every 404 is `not_found`, so a
/// check tells "not there" from "not yours" no more than the request itself would.
pub fn public_reason<'a>(
    outcome: &fhirgate_core::fhir::outcome::Outcome,
    label: &'a str,
) -> &'a str {
    if outcome.status() == 404 {
        "not_found"
    } else {
        label
    }
}

/// A FHIR path (`/fhir/R4/…`, also under `/api`).
fn is_fhir_path(path: &str) -> bool {
    let path = path.strip_prefix("/api").unwrap_or(path);
    path.starts_with("/fhir/R4/")
}

/// Writes a verdict (always 200: the check succeeded, whatever it found).
pub async fn answer(session: &mut Session, ctx: &mut RequestCtx, verdict: Verdict) -> Result<u16> {
    let cors = super::cors::with_cors(&verdict.headers(), ctx.cors.as_ref());
    let body = Bytes::from(verdict.to_bytes());
    super::respond::write(session, 200, "application/fhir+json", &cors, body).await?;
    ctx.answered = Some(200);
    Ok(200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operation_stands_for_one_interaction() {
        let stands_for = [
            (
                "interaction=read&resourceType=Patient&id=p1",
                Method::GET,
                "Patient/p1",
            ),
            (
                "interaction=update&resourceType=Patient&id=p1",
                Method::PUT,
                "Patient/p1",
            ),
            (
                "interaction=patch&resourceType=Patient&id=p1",
                Method::PATCH,
                "Patient/p1",
            ),
            (
                "interaction=delete&resourceType=Patient&id=p1",
                Method::DELETE,
                "Patient/p1",
            ),
            (
                "interaction=create&resourceType=Observation",
                Method::POST,
                "Observation",
            ),
            (
                "interaction=search&resourceType=Observation",
                Method::GET,
                "Observation",
            ),
            (
                "interaction=history&resourceType=Patient&id=p1",
                Method::GET,
                "Patient/p1/_history",
            ),
            (
                "interaction=history&resourceType=Patient",
                Method::GET,
                "Patient/_history",
            ),
            (
                "interaction=vread&resourceType=Patient&id=p1&versionId=2",
                Method::GET,
                "Patient/p1/_history/2",
            ),
        ];
        for (query, method, rest) in stands_for {
            assert_eq!(
                operation_request(&Method::GET, Some(query)),
                Ok((method, rest.to_string())),
                "{query}"
            );
        }
        let refused = [
            (
                "interaction=read&resourceType=Patient",
                CheckRequestError::BadId,
            ),
            (
                "interaction=read&resourceType=Patient&id=a/../b",
                CheckRequestError::BadId,
            ),
            (
                "interaction=vread&resourceType=Patient&id=p1",
                CheckRequestError::BadId,
            ),
            (
                "interaction=read&resourceType=Nope&id=p1",
                CheckRequestError::BadType,
            ),
            (
                "interaction=read&resourceType=Patient%2F..&id=p1",
                CheckRequestError::BadType,
            ),
            (
                "interaction=purge&resourceType=Patient&id=p1",
                CheckRequestError::UnknownInteraction,
            ),
            (
                "resourceType=Patient&id=p1",
                CheckRequestError::UnknownInteraction,
            ),
        ];
        for (query, error) in refused {
            assert_eq!(
                operation_request(&Method::GET, Some(query)),
                Err(error),
                "{query}"
            );
        }
        assert_eq!(
            operation_request(
                &Method::POST,
                Some("interaction=read&resourceType=Patient&id=p1")
            ),
            Err(CheckRequestError::NotGet)
        );
    }
}
