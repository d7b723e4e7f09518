//! ClientApplications: their flags, redirect URIs, token lifetimes, and creating one with its
//! membership.

use crate::state::{ClientInfo, State};
use crate::store::StoredResource;
use serde_json::{Value, json};
use std::time::Duration;

use crate::control::base::index::index_rows;
use crate::control::base::resources::refreshed;
use crate::control::web::error::ApiError;

/// The client a request names by id (404 when there is none), or none when it names none.
pub(crate) async fn named_client(
    state: &State,
    id: Option<String>,
) -> Result<Option<std::sync::Arc<ClientInfo>>, ApiError> {
    match id {
        Some(id) => Ok(Some(crate::control::web::error::required(
            state.identities.client(&id).await,
            ApiError::not_found,
        )?)),
        None => Ok(None),
    }
}

pub fn client_flag(client: &ClientInfo, key: &str) -> bool {
    client
        .content
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The redirect URIs a client registered (`redirectUri` and `redirectUris[]`).
pub(crate) fn registered_redirect_uris(client: &ClientInfo) -> Vec<&str> {
    let mut out: Vec<&str> = client
        .content
        .get("redirectUris")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if let Some(one) = client.content.get("redirectUri").and_then(Value::as_str) {
        out.push(one);
    }
    out
}

/// Medplum's `getClientRedirectUri(client, uri, allowPartial = true)`: an exact match, else
/// the requested URI when a registered one is its prefix. Stricter: the prefix must have the
/// same scheme, host and port, end on a path segment boundary, and carry no user info.
pub fn match_redirect_uri<S: AsRef<str>>(registered: &[S], requested: &str) -> Option<String> {
    if registered.iter().any(|r| r.as_ref() == requested) {
        return Some(requested.to_string());
    }
    let req = url::Url::parse(requested).ok()?;
    if !req.username().is_empty() || req.password().is_some() {
        return None;
    }
    registered.iter().find_map(|r| {
        let reg = url::Url::parse(r.as_ref()).ok()?;
        let same_origin = reg.scheme() == req.scheme()
            && reg.host_str() == req.host_str()
            && reg.port_or_known_default() == req.port_or_known_default();
        let (rp, qp) = (reg.path(), req.path());
        let on_boundary = qp == rp
            || (qp.starts_with(rp) && (rp.ends_with('/') || qp[rp.len()..].starts_with('/')));
        (same_origin && on_boundary && reg.query().is_none()).then(|| requested.to_string())
    })
}

/// The client's `refreshTokenLifetime`, else the configured default.
pub(crate) fn refresh_token_lifetime(state: &State, client: Option<&ClientInfo>) -> Duration {
    client
        .and_then(|c| c.content.get("refreshTokenLifetime"))
        .and_then(Value::as_str)
        .and_then(crate::config::parse_lifetime)
        .unwrap_or(state.config.refresh_token_lifetime)
}

/// SMART Backend Services (client credentials with a signed assertion) get short tokens unless
/// their client says otherwise: the specification recommends at most five minutes.
const BACKEND_ACCESS_LIFETIME: Duration = Duration::from_secs(300);

/// Access token lifetime of a client-credentials grant: the client's `accessTokenLifetime`;
/// else, for a client that authenticated with a signed assertion (a SMART backend service), the
/// configured default capped at five minutes; else the configured default. Not capped for a
/// client using its secret: the Medplum SDK renews a token five minutes before it expires and
/// gets a new one with the secret, so a five-minute token would be renewed on every request.
pub(crate) fn backend_access_lifetime(
    state: &State,
    client: &ClientInfo,
    by_assertion: bool,
) -> Duration {
    if client.access_token_lifetime.is_some() || !by_assertion {
        return access_token_lifetime(state, client);
    }
    state
        .config
        .access_token_lifetime
        .min(BACKEND_ACCESS_LIFETIME)
}

/// The client's `accessTokenLifetime`, else the configured default. Values are checked when a
/// client is saved; a stored value that does not parse falls back to the default.
pub(crate) fn access_token_lifetime(state: &State, client: &ClientInfo) -> Duration {
    match client.access_token_lifetime.as_deref() {
        Some(s) => crate::config::parse_lifetime(s).unwrap_or_else(|| {
            tracing::warn!(client = %client.id, "stored accessTokenLifetime is invalid; using the default");
            state.config.access_token_lifetime
        }),
        None => state.config.access_token_lifetime,
    }
}

/// A client made by [`create_client_with_membership`].
pub(crate) struct CreatedClient {
    pub client: StoredResource,
    pub secret: String,
}

/// Stores a ClientApplication (`client` without id: one is generated unless `client.id` is
/// set), the hash of `secret` and its membership (`user = profile = client`). On failure,
/// nothing is left behind. Refreshes the snapshot.
pub(crate) async fn create_client_with_membership(
    state: &State,
    project_id: &str,
    mut client: Value,
    access_policy: Option<Value>,
    admin: bool,
    author: Option<&str>,
    secret: String,
) -> Result<CreatedClient, ApiError> {
    let client_id = match client.get("id").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    client["id"] = Value::String(client_id.clone());
    if let Some(a) = author {
        client["meta"] = json!({"author": {"reference": a}});
    }
    let client_ref = format!("ClientApplication/{client_id}");
    let mut membership = json!({
        "resourceType": "ProjectMembership",
        "id": uuid::Uuid::new_v4().to_string(),
        "project": {"reference": format!("Project/{project_id}")},
        "user": {"reference": client_ref},
        "profile": {"reference": client_ref},
    });
    if let Some(p) = access_policy {
        membership["accessPolicy"] = p;
    }
    if admin {
        membership["admin"] = Value::Bool(true);
    }
    if let Some(a) = author {
        membership["meta"] = json!({"author": {"reference": a}});
    }
    let index = index_rows(&client);
    let stored_client = state
        .store
        .put(client, Some(project_id), &index, None, true)
        .await?;
    let hash = state.hash_secret(&secret);
    let rest = async {
        state
            .store
            .set_client_secret(&client_id, Some(&hash), None)
            .await?;
        state
            .store
            .put(
                membership.clone(),
                Some(project_id),
                &index_rows(&membership),
                None,
                true,
            )
            .await
    };
    if let Err(e) = rest.await {
        if let Err(cleanup) = state.store.delete("ClientApplication", &client_id).await {
            tracing::error!(error = %cleanup, "could not remove a half-created client");
        }
        return Err(e.into());
    }
    refreshed(state).await;
    Ok(CreatedClient {
        client: stored_client,
        secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_match_exactly_or_by_whole_segments() {
        let reg = vec!["https://app.example.com/cb".to_string()];
        let m = |r: &str| match_redirect_uri(&reg, r);
        assert_eq!(
            m("https://app.example.com/cb").as_deref(),
            Some("https://app.example.com/cb")
        );
        assert!(m("https://app.example.com/cb/deeper?x=1").is_some());
        assert!(m("https://app.example.com/cb?x=1").is_some());
        assert!(m("https://app.example.com/cbevil").is_none());
        assert!(m("https://app.example.com.evil.com/cb").is_none());
        assert!(m("http://app.example.com/cb").is_none());
        assert!(m("https://app.example.com:8443/cb").is_none());
        assert!(m("https://user@app.example.com/cb/x").is_none());
        assert!(m("not a url").is_none());
        let custom = vec!["myapp:/cb".to_string()];
        assert!(match_redirect_uri(&custom, "otherapp:/cb").is_none());
    }
}
