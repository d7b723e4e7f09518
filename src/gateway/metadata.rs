//! The public CapabilityStatement (`GET [base]/metadata`), served from memory.
//!
//! Every answer the upstream gives is rendered once (fhirgate's OAuth endpoints advertised,
//! upstream URLs rewritten) and kept; for [`FRESH_FOR`] after that the gateway answers from
//! memory, without asking the upstream. The next request after that goes upstream again; an
//! answer with the same bytes as the last reuses its rendering. A client's `If-None-Match`
//! naming the upstream's `ETag` gets a 304.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use fhirgate_core::fhir::classify::accept_wants_non_json;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

/// How long a rendered CapabilityStatement is served without asking the upstream.
pub const FRESH_FOR: Duration = Duration::from_secs(10);

/// One rendered upstream answer.
#[derive(Debug)]
pub struct Rendered {
    /// The upstream's body as received.
    raw: Bytes,
    /// What clients get.
    body: Bytes,
    /// The upstream's headers that travel with it.
    headers: Vec<(&'static str, String)>,
    etag: Option<String>,
    at: Instant,
}

/// The upstream answer's headers kept with its rendering (read at header time).
pub const KEPT_HEADERS: [&str; 3] = ["content-type", "etag", "last-modified"];

#[derive(Debug, Default)]
pub struct MetadataCache {
    current: ArcSwapOption<Rendered>,
}

impl MetadataCache {
    /// The rendering to answer with, while it is fresh.
    pub fn fresh(&self) -> Option<Arc<Rendered>> {
        self.current
            .load_full()
            .filter(|r| r.at.elapsed() < FRESH_FOR)
    }

    /// The rendering of `raw` (reused when the upstream sent the same bytes last time), kept
    /// for the next requests.
    pub fn render(
        &self,
        raw: Vec<u8>,
        headers: Vec<(&'static str, String)>,
        render: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Bytes {
        let last = self.current.load_full();
        let body = match &last {
            Some(last) if last.raw.as_ref() == raw.as_slice() => last.body.clone(),
            _ => {
                let body = Bytes::from(render(&raw));
                // An upstream answer that is not JSON is rendered as an error: not kept.
                if serde_json::from_slice::<serde::de::IgnoredAny>(&raw).is_err() {
                    return body;
                }
                body
            }
        };
        let etag = headers
            .iter()
            .find(|(k, _)| *k == "etag")
            .map(|(_, v)| v.clone());
        self.current.store(Some(Arc::new(Rendered {
            raw: Bytes::from(raw),
            body: body.clone(),
            headers,
            etag,
            at: Instant::now(),
        })));
        body
    }
}

/// Only the plain form is kept: `GET metadata` without a query (no `mode`, `_format`,
/// `_summary`), asking for FHIR JSON or anything (no `Accept`, `*/*`), so every client that gets
/// the kept answer would have got the same from the upstream.
pub fn cacheable(session: &Session) -> bool {
    let req = session.req_header();
    let fhir_json = |v: &str| {
        !accept_wants_non_json(v)
            && v.split(',').any(|range| {
                let media = range.split(';').next().unwrap_or("").trim();
                media == "*/*" || media.eq_ignore_ascii_case("application/fhir+json")
            })
    };
    req.method == http::Method::GET
        && req.uri.query().is_none_or(str::is_empty)
        && req
            .headers
            .get_all("accept")
            .iter()
            .all(|v| v.to_str().is_ok_and(fhir_json))
}

/// Answers from memory; returns the status written.
pub async fn answer(
    session: &mut Session,
    rendered: &Rendered,
    cors: &[(&'static str, String)],
) -> Result<u16> {
    let not_modified = match (
        &rendered.etag,
        session.req_header().headers.get("if-none-match"),
    ) {
        (Some(etag), Some(wanted)) => wanted
            .to_str()
            .is_ok_and(|w| super::respond::etag_listed(w, etag)),
        _ => false,
    };
    let status = if not_modified { 304 } else { 200 };
    let mut resp = ResponseHeader::build(status, Some(3 + rendered.headers.len() + cors.len()))?;
    for (k, v) in rendered.headers.iter().chain(cors) {
        resp.insert_header(*k, v.as_str())?;
    }
    if not_modified {
        session.write_response_header(Box::new(resp), true).await?;
    } else {
        resp.insert_header("content-length", rendered.body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(rendered.body.clone()), true)
            .await?;
    }
    Ok(status)
}
