//! Forwarding: the upstream peer for a route, and the upstream request rewrite. The client's
//! `Authorization` never leaves the gateway; identity headers are ours alone.

use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use crate::config::Config;
use crate::state::State;

use super::ctx::RequestCtx;
use super::filter::ResponsePlan;
use super::route::Route;

/// Headers a client may not send upstream: fhirgate sets or strips them itself.
const STRIPPED: [&str; 9] = [
    "x-fhirgate-explain",
    "authorization",
    "x-fhirgate-profile",
    "x-fhirgate-project",
    "x-fhirgate-on-behalf-of",
    "x-medplum-on-behalf-of",
    "forwarded",
    "x-real-ip",
    "cookie",
];

pub fn peer(state: &State, route: &Route) -> Result<Box<HttpPeer>> {
    let config = &state.config;
    let mut peer = match route {
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
            let up = &config.upstream;
            let Some(addr) = state.upstream_target.pick() else {
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

fn append_xff(upstream: &mut RequestHeader, session: &Session) -> Result<()> {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let prior: Vec<String> = upstream
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let value = if prior.is_empty() {
        peer
    } else {
        format!("{}, {peer}", prior.join(", "))
    };
    upstream.insert_header("x-forwarded-for", value)?;
    Ok(())
}

pub fn rewrite_request(
    config: &Config,
    session: &Session,
    upstream: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    append_xff(upstream, session)?;
    upstream.insert_header("x-forwarded-proto", config.forwarded_proto.as_str())?;
    upstream.insert_header("x-forwarded-host", config.forwarded_host.as_str())?;
    let rest = match &ctx.route {
        Route::Control => return Ok(()),
        Route::Metadata => "metadata".to_string(),
        Route::Fhir { rest } => rest.clone(),
        Route::NotFound | Route::BadPath => {
            return Error::e_explain(HTTPStatus(400), "unroutable request reached forwarding");
        }
    };
    for h in STRIPPED {
        upstream.remove_header(h);
    }
    // Authorization is decided here, never by the upstream: no protocol switch either.
    upstream.remove_header("upgrade");
    let up = &config.upstream;
    if let Some(auth) = &up.authorization {
        upstream.insert_header("authorization", auth.as_str())?;
    }
    if let Some(id) = &ctx.identity {
        upstream.insert_header("x-fhirgate-profile", id.profile.as_str())?;
        upstream.insert_header("x-fhirgate-project", id.project_id.as_str())?;
    }
    if let Some(obo) = &ctx.on_behalf_of_profile {
        upstream.insert_header("x-fhirgate-on-behalf-of", obo.as_str())?;
    }
    upstream.insert_header("host", up.host_header.as_str())?;
    if !matches!(ctx.plan, ResponsePlan::Stream) {
        // Filtering needs the plain body.
        upstream.remove_header("accept-encoding");
    }
    let mut query = session
        .req_header()
        .uri
        .query()
        .map(str::to_string)
        .unwrap_or_default();
    for (k, v) in &ctx.extra_query {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(
            &form_urlencoded::Serializer::new(String::new())
                .append_pair(k, v)
                .finish(),
        );
    }
    let mut uri = format!("{}/{}", up.base_path, rest);
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(&query);
    }
    let parsed = uri
        .parse::<http::Uri>()
        .or_err(HTTPStatus(400), "invalid upstream URI")?;
    upstream.set_uri(parsed);
    Ok(())
}
