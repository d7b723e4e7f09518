//! The client address of a control API request (the rule itself is `crate::net`'s).

use crate::control::web::error::ApiError;
use crate::state::State;
use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The client's address: the TCP peer, or — when the peer is a trusted proxy or loopback (the
/// gateway appends the client to `X-Forwarded-For`) — the right-most untrusted hop. `None` only
/// when the server was started without connect info (in-process use). Malformed → 400.
pub(crate) fn client_ip(state: &State, parts: &Parts) -> Result<Option<IpAddr>, ApiError> {
    let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
        return Ok(None);
    };
    let mut xff = Vec::new();
    for v in parts.headers.get_all("x-forwarded-for") {
        xff.push(
            v.to_str()
                .map_err(|_| ApiError::bad_request("Invalid X-Forwarded-For header"))?,
        );
    }
    let mut proxies: Vec<IpNet> = state.config.trusted_proxies.clone();
    proxies.extend(LOOPBACK.iter().filter_map(|n| n.parse::<IpNet>().ok()));
    crate::net::resolve(peer.ip(), &xff, &proxies)
        .map(Some)
        .map_err(|_| ApiError::bad_request("Invalid X-Forwarded-For header"))
}

const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];
