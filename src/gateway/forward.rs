//! Forwarding: the upstream peer for a route, and the upstream request rewrite. The client's
//! `Authorization` never leaves the gateway; identity headers are ours alone.

use fhirgate_core::fhir::request::QueryParam;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use crate::state::State;
use crate::upstream_headers;
use crate::upstream_headers::UpstreamIdentity;

use super::ctx::RequestCtx;
use super::ctx::ResponsePlan;
use super::route::Route;

/// Headers a client may not send upstream: fhirgate sets or strips them itself.
const STRIPPED: [&str; 11] = [
    "x-fhirgate-explain",
    "authorization",
    upstream_headers::PROFILE,
    upstream_headers::PROJECT,
    upstream_headers::ON_BEHALF_OF,
    "x-medplum-on-behalf-of",
    "forwarded",
    // A server behind a proxy may build its URLs from these (HAPI's proxy address strategy):
    // only the gateway says where it is.
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-real-ip",
    "cookie",
];

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
    use std::fmt::Write;
    let mut value = String::new();
    for prior in upstream.headers.get_all("x-forwarded-for") {
        if let Ok(prior) = prior.to_str() {
            value.push_str(prior);
            value.push_str(", ");
        }
    }
    if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
        let _ = write!(value, "{}", peer.ip());
    }
    upstream.insert_header("x-forwarded-for", value)?;
    Ok(())
}

pub fn rewrite_request(
    state: &State,
    session: &Session,
    upstream: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let config = &state.config;
    append_xff(upstream, session)?;
    upstream.insert_header("x-forwarded-proto", config.forwarded_proto.as_str())?;
    upstream.insert_header("x-forwarded-host", config.forwarded_host.as_str())?;
    let rest = match &ctx.route {
        Route::Control => return Ok(()),
        Route::Metadata => "metadata",
        Route::Fhir { rest } => rest.as_str(),
        Route::NotFound | Route::BadPath => {
            return Error::e_explain(HTTPStatus(400), "unroutable request reached forwarding");
        }
    };
    for h in STRIPPED {
        upstream.remove_header(h);
    }
    // Authorization is decided here, never by the upstream: no protocol switch either.
    upstream.remove_header("upgrade");
    let up = &ctx.binding(state).upstream;
    for (name, value) in upstream_identity(ctx, up).headers() {
        upstream.insert_header(name, value)?;
    }
    upstream.insert_header("host", up.host_header.as_str())?;
    if !matches!(ctx.plan, ResponsePlan::Stream) {
        // Filtering needs the plain body.
        upstream.remove_header("accept-encoding");
    }
    let query = match &ctx.plan {
        ResponsePlan::Buffer(spec) => spec.upstream_query(session.req_header().uri.query()),
        ResponsePlan::Stream => session.req_header().uri.query().map(Into::into),
    };
    let uri = upstream_target(&up.base_path, rest, query.as_deref(), &ctx.extra_query);
    let parsed = uri
        .parse::<http::Uri>()
        .or_err(HTTPStatus(400), "invalid upstream URI")?;
    upstream.set_uri(parsed);
    Ok(())
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
