//! CORS, so that browser apps (a SMART app, the Medplum SDK in a page) can call fhirgate from
//! their own origin. Every client-facing path goes through the gateway, so this is the one
//! place: preflights are answered here before authentication and never forwarded (they carry no
//! credentials and reach no data); every other answer to an admitted origin — the gateway's own,
//! the control API's, the upstream's — gets the CORS headers, replacing any the upstream sent.
//! Admitted origins: `cors_origins`, by default those of the registered clients' redirect URIs.

use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use crate::config::CorsOrigins;
use crate::state::State;

/// Methods a preflight may ask for.
const METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";
/// Response headers a page may read besides the safelisted ones.
const EXPOSED: &str = "Location, ETag, Content-Location, Last-Modified, RateLimit, RateLimit-Policy, Retry-After, WWW-Authenticate";
/// Request headers a preflight may name, when it names none we do not know.
const MAX_REQUEST_HEADERS: usize = 1024;
/// How long a browser may cache a preflight answer (seconds).
const MAX_AGE: &str = "600";

/// What an admitted request's answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsGrant {
    /// `Access-Control-Allow-Origin`: the request's origin, or `*`.
    pub allow_origin: String,
    /// Cookies and credentials allowed (never with `*`).
    pub credentials: bool,
}

/// The grant for this request's `Origin`, if it has one and it is admitted.
pub async fn grant(state: &State, session: &Session) -> Option<CorsGrant> {
    let origin = session
        .req_header()
        .headers
        .get(http::header::ORIGIN)?
        .to_str()
        .ok()?;
    match &state.config.cors_origins {
        CorsOrigins::Any => Some(CorsGrant {
            allow_origin: "*".into(),
            credentials: false,
        }),
        CorsOrigins::List(list) => list.contains(origin).then(|| CorsGrant {
            allow_origin: origin.to_string(),
            credentials: true,
        }),
        // A store that cannot answer admits nobody (fail closed).
        CorsOrigins::Registered => state
            .identities
            .origin_known(origin)
            .await
            .unwrap_or(false)
            .then(|| CorsGrant {
                allow_origin: origin.to_string(),
                credentials: true,
            }),
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(session: &Session) -> bool {
    let req = session.req_header();
    req.method == http::Method::OPTIONS
        && req.headers.contains_key(http::header::ORIGIN)
        && req
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The headers an admitted answer carries.
pub fn headers(grant: &CorsGrant) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("access-control-allow-origin", grant.allow_origin.clone()),
        ("access-control-expose-headers", EXPOSED.to_string()),
        ("vary", "Origin".to_string()),
    ];
    if grant.credentials {
        out.push(("access-control-allow-credentials", "true".to_string()));
    }
    out
}

/// `extra` with the CORS headers of `grant` added: what the gateway's own answers (through
/// `respond`) carry so that a page may read them.
pub fn with_cors(
    extra: &[(&'static str, String)],
    grant: Option<&CorsGrant>,
) -> Vec<(&'static str, String)> {
    let mut out = extra.to_vec();
    if let Some(g) = grant {
        out.extend(headers(g));
    }
    out
}

/// The requested headers echoed back when every name is a plain header token.
fn allowed_request_headers(session: &Session) -> Option<String> {
    let asked = session
        .req_header()
        .headers
        .get("access-control-request-headers")?
        .to_str()
        .ok()?;
    let ok = asked.len() <= MAX_REQUEST_HEADERS
        && asked.split(',').all(|h| {
            let h = h.trim();
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| asked.to_string())
}

/// Answers a preflight: 204 with the CORS headers for an admitted origin, else 403 without them.
pub async fn answer_preflight(session: &mut Session, grant: Option<&CorsGrant>) -> Result<u16> {
    let Some(grant) = grant else {
        let outcome = fhirgate_core::fhir::outcome::Outcome::Forbidden;
        return super::respond::outcome(session, &outcome, &[]).await;
    };
    let mut extra = headers(grant);
    extra.push(("access-control-allow-methods", METHODS.to_string()));
    extra.push(("access-control-max-age", MAX_AGE.to_string()));
    if let Some(asked) = allowed_request_headers(session) {
        extra.push(("access-control-allow-headers", asked));
    }
    super::respond::write(session, 204, "text/plain", &extra, bytes::Bytes::new()).await?;
    Ok(204)
}

/// Puts this gateway's CORS answer on a forwarded response: whatever the upstream or the
/// control API said about CORS is dropped first.
pub fn apply(resp: &mut ResponseHeader, grant: Option<&CorsGrant>) -> Result<()> {
    let is_cors = |k: &http::HeaderName| k.as_str().starts_with("access-control-");
    if resp.headers.keys().any(is_cors) {
        let stale: Vec<http::HeaderName> = resp
            .headers
            .keys()
            .filter(|k| is_cors(k))
            .cloned()
            .collect();
        for name in stale {
            resp.remove_header(&name);
        }
    }
    if let Some(grant) = grant {
        for (name, value) in headers(grant) {
            if name == "vary" {
                resp.append_header(name, value)?;
            } else {
                resp.insert_header(name, value)?;
            }
        }
    }
    Ok(())
}
