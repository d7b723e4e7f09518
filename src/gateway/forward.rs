//! Forwarding: the upstream peer for a route, and the upstream request rewrite. The client's
//! `Authorization` never leaves the gateway; identity headers are ours alone.

use fhirgate_core::fhir::request::QueryParam;
use http::{HeaderName, HeaderValue};
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
fn strip(upstream: &mut RequestHeader, plain_body: bool) {
    let considered = if plain_body {
        STRIPPED.len()
    } else {
        STRIPPED.len() - 1
    };
    let mut present = 0u32;
    for name in upstream.headers.keys() {
        if let Some(i) = STRIPPED[..considered].iter().position(|s| s == name) {
            present |= 1 << i;
        }
    }
    while present != 0 {
        let i = present.trailing_zeros() as usize;
        present &= present - 1;
        upstream.remove_header(&STRIPPED[i]);
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

fn append_xff(upstream: &mut RequestHeader, session: &Session) -> Result<()> {
    let mut value = String::new();
    for prior in upstream.headers.get_all(&super::names::X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str() {
            value.push_str(prior);
            value.push_str(", ");
        }
    }
    if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
        push_ip(&mut value, peer.ip());
    }
    upstream.insert_header("x-forwarded-for", value)?;
    Ok(())
}

/// Appends `ip` as text: an IPv4 address digit by digit (the formatter's padding machinery cost
/// more than the rest of the header on every request), any other through `Display`.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    use std::fmt::Write;
    let std::net::IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

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
    // The client's own headers go before any is added (fewer to grow the maps by); filtering
    // needs the plain body. Control traffic keeps them: the control API reads them itself.
    if rest.is_some() {
        strip(upstream, !matches!(ctx.plan, ResponsePlan::Stream));
    }
    append_xff(upstream, session)?;
    upstream.insert_header("x-forwarded-proto", forwarded.proto.clone())?;
    upstream.insert_header("x-forwarded-host", forwarded.host.clone())?;
    let Some(rest) = rest else {
        return Ok(());
    };
    let binding = ctx.binding(state);
    let up = &binding.upstream;
    for (name, value) in upstream_identity(ctx, up).headers() {
        upstream.insert_header(name, value)?;
    }
    upstream.insert_header("host", binding.host_header.clone())?;
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
    fn addresses_are_written_as_display_writes_them() {
        let cases = [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.1.20",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ];
        for case in cases {
            let ip: std::net::IpAddr = case.parse().unwrap();
            let mut out = String::from("prior, ");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("prior, {ip}"));
        }
        for octet in 0..=255u8 {
            let ip = std::net::IpAddr::from([octet, 0, octet, 1]);
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
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
