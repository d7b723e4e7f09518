//! Cookies of the sign-in page: the CSRF token (cookie, form field, hash in the Login) and the
//! session of an earlier sign-in of this browser, reused for `prompt=none` and consent.

use crate::control::login::state::CODE_LIFETIME;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::code_hash;
use crate::control::login::state::get_login;
use crate::control::login::state::is_granted;
use crate::control::login::state::keys;
use crate::control::login::state::mfa_satisfied;
use crate::control::login::state::set_extra;
use crate::control::oauth2::authorize::request::AuthRequest;
use crate::control::oauth2::authorize::request::Params;
use crate::control::web::error::ApiError;
use crate::state::State;
use crate::store::{LoginRecord, now_unix};
use crate::tokens::{hashes_equal, random_hex};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use fhirgate_core::fhir::path::is_valid_id;
use serde_json::{Map, Value};

/// Lifetime of the `medplum-<clientId>` session cookie (Medplum: 1 h).
pub(super) const SESSION_COOKIE_SECONDS: i64 = 3600;

/// The CSRF cookie lives as long as a sign-in may take.
const CSRF_COOKIE_SECONDS: i64 = 3600;

const CSRF_COOKIE: &str = "fhirgate-csrf";

/// The CSRF cookie's name over https: with the `__Host-` prefix a browser keeps it only when
/// this host set it over https, with `Path=/` and no `Domain`, so a sibling subdomain cannot
/// plant a token of its choosing (which would let it carry a victim's browser through a
/// sign-in it started: login CSRF). Over plain http (local development) browsers refuse the
/// prefix, so the plain name stays.
const CSRF_COOKIE_HOST: &str = "__Host-fhirgate-csrf";

pub(super) fn csrf_cookie_name(base_url: &str) -> &'static str {
    if base_url.starts_with("https:") {
        CSRF_COOKIE_HOST
    } else {
        CSRF_COOKIE
    }
}

/// The CSRF token in the cookie of this server's name for it, when it is well formed.
pub(super) fn csrf_in(headers: &HeaderMap, base_url: &str) -> Option<String> {
    cookie_value(headers, csrf_cookie_name(base_url))
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(super) fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

pub(super) fn set_cookie(state: &State, name: String, value: String, max_age: i64) -> String {
    cookie::Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .secure(state.config.base_url.starts_with("https:"))
        .same_site(cookie::SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(max_age))
        .build()
        .to_string()
}

pub(super) fn session_cookie_name(client_id: &str) -> String {
    format!("medplum-{client_id}")
}

/// The browser's CSRF token: the one it has, or a new one.
pub(super) fn csrf_token(state: &State, parts: &Parts) -> String {
    csrf_in(&parts.headers, &state.config.base_url).unwrap_or_else(|| random_hex(32))
}

/// The browser's CSRF token, if it has one.
pub(super) fn csrf_value(state: &State, parts: &Parts) -> Option<String> {
    csrf_in(&parts.headers, &state.config.base_url)
}

/// The form repeats the browser's cookie (a cross-site post cannot read or set it).
pub(super) fn csrf_matches(state: &State, parts: &Parts, p: &Params) -> Option<String> {
    let cookie = csrf_in(&parts.headers, &state.config.base_url)?;
    let field = p.one("csrf")?;
    hashes_equal(&cookie, field).then(|| field.to_string())
}

/// The Login of an earlier sign-in of this browser for this client, if it may be reused:
/// tokens were issued from it, it is not revoked, it is recent enough for `max_age`, and its
/// membership is still active.
pub(super) async fn find_session(
    state: &State,
    parts: &Parts,
    request: &AuthRequest,
) -> Result<Option<LoginRecord>, ApiError> {
    // Only the browser's session cookie is a session (docs/contract.md §2): a token presented as
    // `id_token_hint` (which may have leaked) never stands in for one, and when given it must
    // name the cookie's own Login.
    let Some(value) = cookie_value(&parts.headers, &session_cookie_name(&request.client.id)) else {
        return Ok(None);
    };
    let Some((id, secret)) = value.split_once('.') else {
        return Ok(None);
    };
    if !is_valid_id(id) {
        return Ok(None);
    }
    if let Some(hint) = &request.id_token_hint {
        let hinted = state.keyring().verify(hint).ok().and_then(|c| c.login_id);
        if hinted.as_deref() != Some(id) {
            return Ok(None);
        }
    }
    let login = match state.store.login(id).await? {
        Some(l)
            if LoginFlow::of(&l)
                .cookie
                .is_some_and(|h| hashes_equal(&h, &state.hash_secret(secret))) =>
        {
            Some(l)
        }
        _ => None,
    };
    let Some(login) = login else {
        return Ok(None);
    };
    let now = now_unix();
    let membership_active = match login.membership_id.as_deref() {
        Some(m) => state
            .identities
            .membership(m)
            .await?
            .is_some_and(|m| m.is_active()),
        None => false,
    };
    let usable = !login.revoked
        && is_granted(&login)
        && login.client_id.as_deref() == Some(request.client.id.as_str())
        && login.auth_method == "password"
        && login.auth_time.saturating_add(request.max_age) >= now
        && login.expires_at > now
        && membership_active
        && mfa_satisfied(&login);
    Ok(usable.then_some(login))
}

/// Gives a reused session a new code for this request (nonce, PKCE, launch, redirect URI and
/// state of the new request; `granted` cleared), with compare-and-swap on the old code so two
/// tabs cannot both reopen it. `None` when the Login changed in between.
pub(super) async fn reopen(
    state: &State,
    login: &LoginRecord,
    request: &AuthRequest,
) -> Result<Option<(LoginRecord, String)>, ApiError> {
    let mut extra = match &login.extra {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let mut set = |k: &str, v: Option<String>| match v {
        Some(v) => {
            extra.insert(k.to_string(), Value::String(v));
        }
        None => {
            extra.remove(k);
        }
    };
    set(
        keys::NONCE,
        Some(
            request
                .nonce
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        ),
    );
    set(keys::CODE_CHALLENGE, request.code_challenge.clone());
    set(
        keys::CODE_CHALLENGE_METHOD,
        request.code_challenge_method.clone(),
    );
    set(keys::LAUNCH, request.launch.clone());
    set(keys::REDIRECT_URI, Some(request.redirect_uri.clone()));
    set(keys::AUTHORIZE_STATE, Some(request.state.clone()));
    extra.insert(keys::GRANTED.into(), Value::Bool(false));
    extra.insert(
        keys::CODE_EXPIRES_AT.into(),
        Value::from(now_unix().saturating_add(CODE_LIFETIME)),
    );
    let extra = Value::Object(extra);
    let code = random_hex(16);
    let hash = code_hash(state, &code);
    if !state
        .store
        .set_login_code(&login.id, login.code.as_deref(), &hash, &extra)
        .await?
    {
        return Ok(None);
    }
    let mut updated = login.clone();
    updated.code = Some(hash);
    updated.extra = extra;
    Ok(Some((updated, code)))
}

/// Stores the hash of the browser's CSRF token (and any other `extra` changes made in memory)
/// in the Login.
pub(super) async fn bind_csrf(
    state: &State,
    login: &mut LoginRecord,
    csrf: &str,
) -> Result<(), ApiError> {
    let stored = get_login(state, &login.id).await?;
    set_extra(login, keys::CSRF, Value::String(state.hash_secret(csrf)));
    if !state
        .store
        .update_login_extra_cas(&login.id, &stored.extra, &login.extra)
        .await?
    {
        return Err(ApiError::conflict("Login changed; try again"));
    }
    Ok(())
}

pub(super) fn csrf_cookie(state: &State, csrf: &str) -> String {
    set_cookie(
        state,
        csrf_cookie_name(&state.config.base_url).to_string(),
        csrf.to_string(),
        CSRF_COOKIE_SECONDS,
    )
}
