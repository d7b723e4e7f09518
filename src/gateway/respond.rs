//! The one place the gateway writes a response of its own: OperationOutcomes for denials and
//! errors, and whole mediated responses.

use bytes::Bytes;
use fhirgate_core::fhir::outcome::Outcome;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

/// `list` (an `If-Match` or `If-None-Match` value) names `etag`, or is `*` (weak compare).
pub fn etag_listed(list: &str, etag: &str) -> bool {
    fn bare(t: &str) -> &str {
        t.trim().trim_start_matches("W/").trim_matches('"')
    }
    list.split(',')
        .any(|w| w.trim() == "*" || bare(w) == bare(etag))
}

/// Writes `outcome` as `application/fhir+json`; returns the status written.
pub async fn outcome(
    session: &mut Session,
    outcome: &Outcome,
    extra_headers: &[(&'static str, String)],
) -> Result<u16> {
    let body = outcome.to_bytes();
    let status = outcome.status();
    write(
        session,
        status,
        "application/fhir+json",
        extra_headers,
        Bytes::from(body),
    )
    .await?;
    Ok(status)
}

pub async fn write(
    session: &mut Session,
    status: u16,
    content_type: &str,
    extra_headers: &[(&'static str, String)],
    body: Bytes,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra_headers.len()))?;
    resp.insert_header("content-type", content_type)?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    for (k, v) in extra_headers {
        resp.insert_header(*k, v.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
