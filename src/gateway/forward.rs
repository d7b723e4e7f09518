//! Forwarding: the upstream peer for a route, and the upstream request rewrite. The client's
//! `Authorization` never leaves the gateway; identity headers are ours alone.

use fhirgate_core::fhir::request::QueryParam;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use crate::state::State;
use crate::upstream_headers;
use crate::upstream_headers::UpstreamIdentity;

use super::ctx::RequestCtx;
use super::ctx::ResponsePlan;
use super::route::Route;

/// Headers a client may not send upstream: fhirgate sets or strips them itself. Names, not
/// strings: a name given as a string is parsed again on every call.
static STRIPPED: [HeaderName; 13] = [
    HeaderName::from_static("x-fhirgate-explain"),
    http::header::AUTHORIZATION,
    HeaderName::from_static(upstream_headers::PROFILE),
    HeaderName::from_static(upstream_headers::PROJECT),
    HeaderName::from_static(upstream_headers::ON_BEHALF_OF),
    HeaderName::from_static("x-medplum-on-behalf-of"),
    http::header::FORWARDED,
    // A server behind a proxy may build its URLs from these (HAPI's proxy address strategy):
    // only the gateway says where it is.
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    http::header::COOKIE,
    // Authorization is decided here, never by the upstream: no protocol switch either.
    http::header::UPGRADE,
    // Only when the body is filtered (it must come back plain): the last one, see `strip`.
    http::header::ACCEPT_ENCODING,
];

/// Removes the client's headers of [`STRIPPED`] (`accept-encoding` only when `plain_body`).
/// One pass over the request's few headers finds them; only those present are removed, each
/// by its name.
fn strip(headers: &mut HeaderMap, plain_body: bool) {
    let considered = if plain_body {
        STRIPPED.len()
    } else {
        STRIPPED.len() - 1
    };
    let mut present = 0u32;
    for name in headers.keys() {
        if let Some(i) = STRIPPED[..considered].iter().position(|s| s == name) {
            present |= 1 << i;
        }
    }
    while present != 0 {
        let i = present.trailing_zeros() as usize;
        present &= present - 1;
        headers.remove(&STRIPPED[i]);
    }
}

/// Who a request forwarded or mediated for `ctx` is made for, to the upstream `up`.
pub(super) fn upstream_identity<'a>(
    ctx: &'a RequestCtx,
    up: &'a crate::config::Upstream,
) -> UpstreamIdentity<'a> {
    UpstreamIdentity {
        authorization: up.authorization.as_deref(),
        caller: ctx
            .identity
            .as_deref()
            .map(|id| (id.profile.as_str(), id.project_id.as_str())),
        on_behalf_of: ctx.on_behalf_of_profile.as_deref(),
    }
}

pub fn peer(state: &State, ctx: &RequestCtx) -> Result<Box<HttpPeer>> {
    let config = &state.config;
    let mut peer = match &ctx.route {
        Route::Control => {
            // `control_url`, resolved off the request path (a name is looked up again every
            // few seconds, so a control instance that moves is followed).
            let target = &state.control;
            let Some(addr) = target.pick() else {
                return Error::e_explain(ConnectNoRoute, "control_url has no address yet");
            };
            let url = target.url();
            Box::new(HttpPeer::new(addr, url.tls, url.host.clone()))
        }
        _ => {
            let binding = ctx.binding(state);
            let up = &binding.upstream;
            let Some(addr) = binding.target.pick() else {
                return Error::e_explain(ConnectNoRoute, "the upstream's host has no address yet");
            };
            Box::new(HttpPeer::new(addr, up.tls, up.host.clone()))
        }
    };
    peer.options.connection_timeout = Some(config.upstream.connect_timeout);
    peer.options.total_connection_timeout = Some(config.upstream.connect_timeout);
    peer.options.read_timeout = Some(config.upstream.read_timeout);
    peer.options.write_timeout = Some(config.upstream.read_timeout);
    peer.options.idle_timeout = Some(std::time::Duration::from_secs(60));
    Ok(peer)
}

/// `base/rest?query&narrowing…`: the upstream target of a forwarded or mediated request, the
/// client's query kept as sent and the policy's narrowing parameters appended.
pub(super) fn upstream_target(
    base: &str,
    rest: &str,
    query: Option<&str>,
    narrowing: &[QueryParam],
) -> String {
    let mut target = format!("{base}/{rest}");
    let query = query.unwrap_or("");
    if query.is_empty() && narrowing.is_empty() {
        return target;
    }
    target.push('?');
    target.push_str(query);
    let start = target.len() - query.len();
    let mut pairs = form_urlencoded::Serializer::for_suffix(target, start);
    for p in narrowing {
        pairs.append_pair(&p.name, &p.value);
    }
    pairs.finish()
}

fn append_xff(headers: &mut HeaderMap, session: &Session) -> Result<()> {
    // Room for the client's address and a few before it: a common chain is built in one
    // allocation.
    let mut value = String::with_capacity(64);
    for prior in headers.get_all(&super::names::X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str() {
            value.push_str(prior);
            value.push_str(", ");
        }
    }
    if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
        crate::net::push_ip(&mut value, peer.ip());
    }
    let value =
        HeaderValue::try_from(value).or_err(InvalidHTTPHeader, "invalid X-Forwarded-For")?;
    headers.insert(super::names::X_FORWARDED_FOR.clone(), value);
    Ok(())
}

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Where the gateway says it is (`X-Forwarded-Proto`, `X-Forwarded-Host`), prepared once.
pub struct Forwarded {
    proto: HeaderValue,
    host: HeaderValue,
}

impl Forwarded {
    pub fn new(config: &crate::config::Config) -> Forwarded {
        let value = |v: &str| {
            HeaderValue::from_str(v).expect("the public base URL's scheme and host are header-safe")
        };
        Forwarded {
            proto: value(&config.forwarded_proto),
            host: value(&config.forwarded_host),
        }
    }
}

pub fn rewrite_request(
    state: &State,
    forwarded: &Forwarded,
    session: &Session,
    upstream: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let rest = match &ctx.route {
        Route::Control => None,
        Route::Metadata => Some("metadata"),
        Route::Fhir { rest } => Some(rest.as_str()),
        Route::NotFound | Route::BadPath => {
            return Error::e_explain(HTTPStatus(400), "unroutable request reached forwarding");
        }
    };
    // FHIR traffic: the path after the base, and the caller's upstream. Control traffic: none.
    let fhir = rest.map(|rest| (rest, ctx.binding(state)));
    with_header_map(upstream, |headers| {
        // The client's own headers go first (fewer entries to make room for); filtering needs
        // the plain body. Control traffic keeps them: the control API reads them itself.
        if fhir.is_some() {
            strip(headers, !matches!(ctx.plan, ResponsePlan::Stream));
        }
        headers.reserve(ADDED_HEADERS);
        append_xff(headers, session)?;
        headers.insert(X_FORWARDED_PROTO.clone(), forwarded.proto.clone());
        headers.insert(X_FORWARDED_HOST.clone(), forwarded.host.clone());
        if let Some((_, binding)) = fhir {
            for (name, value) in upstream_identity(ctx, &binding.upstream).headers() {
                let value = HeaderValue::from_str(value)
                    .or_err(InvalidHTTPHeader, "identity not valid in a header")?;
                headers.insert(name.clone(), value);
            }
            headers.insert(http::header::HOST, binding.host_header.clone());
        }
        Ok(())
    })?;
    let Some((rest, binding)) = fhir else {
        return Ok(());
    };
    let up = &binding.upstream;
    let original = session.req_header().uri.query();
    let query = match &ctx.plan {
        ResponsePlan::Buffer(spec) => spec.upstream_query(original),
        ResponsePlan::Stream => original.map(Into::into),
    };
    let path = session.req_header().uri.path();
    let same_query = matches!(
        (&query, original),
        (None, None) | (Some(std::borrow::Cow::Borrowed(_)), Some(_))
    ) && original != Some("");
    if same_query && ctx.extra_query.is_empty() && is_upstream_path(path, &up.base_path, rest) {
        // The client's target is already the upstream's: nothing to rebuild or parse.
        return Ok(());
    }
    let uri = upstream_target(&up.base_path, rest, query.as_deref(), &ctx.extra_query);
    let parsed = uri
        .parse::<http::Uri>()
        .or_err(HTTPStatus(400), "invalid upstream URI")?;
    upstream.set_uri(parsed);
    Ok(())
}

/// The most headers [`rewrite_request`] adds: `X-Forwarded-For`, `-Proto`, `-Host`, `Host`
/// and the upstream identity's four.
const ADDED_HEADERS: usize = 8;

/// Runs `edit` on the request's header map itself, through `http`'s own `Parts`.
///
/// pingora's `insert_header` parses a name again on every call (copying a custom one), keeps a
/// case-preserving map beside the value map and grows both past the size of the client's
/// request: the six headers set here cost about 9,000 instructions that way, more than the
/// rest of the rewrite. Header names then go upstream in their canonical case (standard
/// names titled, others in lower case), as HTTP/2 sends every name; a name's case carries no
/// meaning (RFC 9110 §5.1). A target the URI does not reproduce (absolute-form, not UTF-8) is
/// put back as it was.
fn with_header_map(
    upstream: &mut RequestHeader,
    edit: impl FnOnce(&mut HeaderMap) -> Result<()>,
) -> Result<()> {
    let raw_target = {
        let raw = upstream.raw_path();
        let from_uri = upstream
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().as_bytes());
        (from_uri != Some(raw)).then(|| raw.to_vec())
    };
    let end_stream = upstream.send_end_stream();
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = http::request::Parts::from(std::mem::replace(upstream, placeholder));
    let edited = edit(&mut parts.headers);
    *upstream = RequestHeader::from(parts);
    if let Some(raw) = raw_target {
        upstream.set_raw_path(&raw)?;
    }
    if let Some(end_stream) = end_stream {
        upstream.set_send_end_stream(end_stream);
    }
    edited
}

/// Whether `path` is `base/rest` already (an upstream whose base path is the gateway's).
fn is_upstream_path(path: &str, base: &str, rest: &str) -> bool {
    path.len() == base.len() + 1 + rest.len()
        && path.starts_with(base)
        && path[base.len()..].starts_with('/')
        && path.ends_with(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, value: &str) -> QueryParam {
        QueryParam {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn headers_are_edited_in_place_and_the_target_is_kept() {
        let targets: [&[u8]; 4] = [
            b"/fhir/R4/Patient/p1?_elements=name",
            b"http://gateway.example/fhir/R4/Patient/p1",
            b"/fhir/R4/Patient/\xff",
            b"*",
        ];
        for target in targets {
            let mut req = RequestHeader::build("GET", target, None).unwrap();
            req.insert_header("X-Client-Header", "kept").unwrap();
            req.insert_header("Authorization", "Bearer secret").unwrap();
            let uri_before = req.uri.clone();
            with_header_map(&mut req, |headers| {
                headers.remove(http::header::AUTHORIZATION);
                headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
                Ok(())
            })
            .unwrap();
            assert_eq!(
                req.raw_path(),
                target,
                "{}",
                String::from_utf8_lossy(target)
            );
            assert_eq!(req.uri, uri_before);
            assert_eq!(req.headers["x-client-header"], "kept");
            assert_eq!(req.headers["x-forwarded-proto"], "https");
            assert!(req.headers.get("authorization").is_none());
            let mut wire = Vec::new();
            req.header_to_h1_wire(&mut wire);
            let wire = String::from_utf8(wire).unwrap();
            assert_eq!(
                wire,
                "x-client-header: kept\r\nx-forwarded-proto: https\r\n"
            );
        }
    }

    #[test]
    fn a_failed_edit_still_leaves_the_request_whole() {
        let mut req = RequestHeader::build("POST", b"/fhir/R4/Patient", None).unwrap();
        req.insert_header("Content-Type", "application/fhir+json")
            .unwrap();
        let failed = with_header_map(&mut req, |_| {
            Error::e_explain(InvalidHTTPHeader, "refused on purpose")
        });
        assert!(failed.is_err());
        assert_eq!(req.method, http::Method::POST);
        assert_eq!(req.raw_path(), b"/fhir/R4/Patient");
        assert_eq!(req.headers["content-type"], "application/fhir+json");
    }

    #[test]
    fn the_upstream_path_is_recognised_only_when_it_is_base_and_rest() {
        assert!(is_upstream_path(
            "/fhir/R4/Patient/p1",
            "/fhir/R4",
            "Patient/p1"
        ));
        assert!(is_upstream_path("/fhir/R4/", "/fhir/R4", ""));
        assert!(!is_upstream_path("/fhir/R4", "/fhir/R4", ""));
        assert!(!is_upstream_path(
            "/api/fhir/R4/Patient/p1",
            "/fhir/R4",
            "Patient/p1"
        ));
        assert!(!is_upstream_path(
            "/fhir/R4/Patient/p1",
            "/fhir",
            "R4/Patient/p1x"
        ));
        assert!(!is_upstream_path(
            "/fhir/R4xPatient/p1",
            "/fhir/R4",
            "Patient/p1"
        ));
        assert!(!is_upstream_path(
            "/fhir/R4/Patient/p1",
            "/baseR4",
            "Patient/p1"
        ));
    }

    #[test]
    fn narrowing_is_appended_to_the_query_as_sent() {
        let narrowing = [param("_compartment", "Patient/p 1"), param("x", "&=")];
        assert_eq!(
            upstream_target("/base", "Patient", None, &[]),
            "/base/Patient"
        );
        assert_eq!(
            upstream_target("/base", "Patient", Some(""), &[]),
            "/base/Patient"
        );
        assert_eq!(
            upstream_target("/base", "Patient", Some("name=a%20b"), &[]),
            "/base/Patient?name=a%20b"
        );
        assert_eq!(
            upstream_target("/base", "Patient", Some(""), &narrowing),
            "/base/Patient?_compartment=Patient%2Fp+1&x=%26%3D"
        );
        assert_eq!(
            upstream_target("/base", "", Some("name=a"), &narrowing[..1]),
            "/base/?name=a&_compartment=Patient%2Fp+1"
        );
    }
}
