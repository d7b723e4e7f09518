//! Token exchange (RFC 8693, docs/medplum-compat.md §2.13): an IdP access token, checked by calling the
//! client's IdP userinfo endpoint, becomes fhirgate tokens of a new, granted Login.

use crate::obs::METRICS;
use crate::state::ClientInfo;
use crate::store::{LoginRecord, now_unix};
use crate::tokens::random_hex;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::control::base::client_auth::check_client_secret;
use crate::control::base::clients::access_token_lifetime;
use crate::control::base::clients::refresh_token_lifetime;
use crate::control::login::external::ExternalLogin;
use crate::control::login::external::IdpError;
use crate::control::login::external::client_idp;
use crate::control::login::external::external_login;
use crate::control::login::external::user_info;
use crate::control::login::state::ClientAsk;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::keys;
use crate::control::login::state::not_ready;
use crate::control::login::state::set_extra;
use crate::control::login::tokens::granted_until;
use crate::control::login::tokens::issue_user_tokens;
use crate::control::web::ControlState;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::control::web::error::required;
use crate::control::web::form::TokenForm;

/// The grant type of RFC 8693 token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// The only subject token type accepted (as Medplum).
pub(crate) const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// What a token exchange was asked for.
pub(crate) struct ExchangeRequest<'a> {
    pub(crate) client_id: Option<&'a str>,
    pub(crate) client_secret: Option<&'a str>,
    pub(crate) subject_token: Option<&'a str>,
    pub(crate) subject_token_type: Option<&'a str>,
    pub(crate) scope: Option<&'a str>,
    pub(crate) nonce: Option<&'a str>,
    pub(crate) membership_id: Option<&'a str>,
}

/// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` at `/oauth2/token`. Errors are
/// OAuth-shaped, except those of the sign-in itself ("User not found", …), which Medplum answers
/// as OperationOutcomes.
pub(crate) async fn token_exchange(
    state: &ControlState,
    parts: &Parts,
    form: &TokenForm,
) -> Response {
    let req = ExchangeRequest {
        client_id: form.get("client_id"),
        client_secret: form.get("client_secret"),
        subject_token: form.get("subject_token"),
        subject_token_type: form.get("subject_token_type"),
        scope: form.get("scope"),
        nonce: form.get("nonce"),
        membership_id: form.get("membership_id"),
    };
    respond(exchange(state, parts, &req).await)
}

pub(crate) fn respond(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(body) => {
            METRICS
                .tokens_issued
                .with_label_values(&["token_exchange"])
                .inc();
            let mut r = (StatusCode::OK, axum::Json(body)).into_response();
            let h = r.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            r
        }
        Err(e) => e.into_response(),
    }
}

/// Medplum's `exchangeExternalAuthToken`, then the tokens of the new, granted Login.
pub(crate) async fn exchange(
    state: &ControlState,
    parts: &Parts,
    req: &ExchangeRequest<'_>,
) -> Result<Value, ApiError> {
    let client_id = req
        .client_id
        .ok_or_else(|| ApiError::invalid_client("Invalid client"))?;
    let subject_token = req
        .subject_token
        .ok_or_else(|| ApiError::oauth("Invalid subject_token"))?;
    if req.subject_token_type != Some(ACCESS_TOKEN_TYPE) {
        return Err(ApiError::oauth("Invalid subject_token_type"));
    }
    let client = required(state.identities.client(client_id).await, || {
        ApiError::invalid_client("Invalid client")
    })?;
    let client = client.as_ref();
    if !client.active {
        return Err(ApiError::invalid_client("Invalid client"));
    }
    let idp = client_idp(client).ok_or_else(|| ApiError::invalid_client("Invalid client"))?;
    if let Some(secret) = req.client_secret {
        check_client_secret(state, client, secret)?;
    }
    let url = idp.user_info_url.as_deref().unwrap_or_default();
    let info = user_info(&state.guarded, url, subject_token)
        .await
        .map_err(IdpError::into_oauth)?;
    let field = |k: &str| {
        info.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (email, external_id) = if idp.use_subject {
        (None, field("sub"))
    } else {
        (field("email"), None)
    };
    let ip = client_ip(state, parts)?;
    let request = ExternalLogin {
        auth_method: "exchange",
        email,
        external_id,
        project_id: client.project_id.clone(),
        client: Some(client),
        ask: ClientAsk {
            scope: req.scope.map(str::to_string),
            nonce: req.nonce.map(str::to_string),
            ..ClientAsk::default()
        },
        remote_address: ip,
        user_agent: user_agent(&parts.headers),
        force_first_membership: true,
        membership_id: req.membership_id.map(str::to_string),
        bind_redirect_uri: false,
        own_mfa: false,
    };
    let login = external_login(state, &request).await?;
    grant(state, client, login).await
}

/// Turns a ready exchange Login into a granted one and signs its tokens.
async fn grant(
    state: &ControlState,
    client: &ClientInfo,
    mut login: LoginRecord,
) -> Result<Value, ApiError> {
    if let Some(why) = not_ready(&login) {
        return Err(ApiError::bad_request(why.text()));
    }
    let membership_id = login
        .membership_id
        .clone()
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let membership = required(state.identities.membership(&membership_id).await, || {
        ApiError::bad_request("Profile not found")
    })?;
    let profile = membership
        .profile_ref()
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?
        .to_string();
    let project_id = login
        .project_id
        .clone()
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;

    let now = now_unix();
    let lifetime = access_token_lifetime(state, client);
    let offline = LoginFlow::of(&login).offline;
    let refresh_lifetime = offline.then(|| refresh_token_lifetime(state, Some(client)));
    let refresh_secret = offline.then(|| random_hex(32));
    login.expires_at = granted_until(now, lifetime, refresh_lifetime);
    login.refresh_secret = refresh_secret.as_deref().map(|s| state.hash_secret(s));
    set_extra(&mut login, keys::GRANTED, Value::Bool(true));
    if !state.store.update_login(&login).await? {
        return Err(ApiError::bad_request("Login revoked"));
    }
    // The exchange Login was started by `client` (external_login records it), so the tokens
    // name the same client issue_user_tokens reads from the Login.
    issue_user_tokens(
        state,
        &login,
        &profile,
        &project_id,
        Some(client),
        refresh_secret.as_deref().zip(refresh_lifetime),
        now,
    )
    .await
}
