//! Client authentication (docs/medplum-compat.md §2.13): the presented client (assertion, `Basic` or
//! body), `private_key_jwt` against the client's JWK Set, secrets compared by keyed hash, and the
//! `invalid_client` authentication of `/oauth2/introspect` and `/oauth2/revoke`.

use crate::state::{ClientInfo, State};
use crate::tokens::hashes_equal;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

use crate::control::base::outbound;
use crate::control::web::ControlState;
use crate::control::web::FetchedJwks;
use crate::control::web::error::ApiError;
use crate::control::web::error::required;
use crate::control::web::form::TokenForm;
use crate::outbound::Guarded;

const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Client id and secret as presented (not yet checked), or a client already authenticated by
/// a verified client assertion.
#[derive(Debug, Default)]
pub(crate) struct PresentedClient {
    pub id: Option<String>,
    pub secret: Option<String>,
    /// `private_key_jwt`: the assertion was verified against the client's JWKS.
    pub assertion_verified: bool,
}

/// RFC 6749 §2.3.1: both halves of `client_secret_basic` are form-urlencoded.
fn form_urldecode(s: &str) -> Option<String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// `client_id:client_secret` of an `Authorization: Basic` value (anything else is "Invalid
/// authorization header").
pub(crate) fn basic_credentials(value: &HeaderValue) -> Result<(String, Option<String>), ApiError> {
    let bad = || ApiError::invalid_client("Invalid authorization header");
    let value = value.to_str().map_err(|_| bad())?;
    let encoded = value.strip_prefix("Basic ").ok_or_else(bad)?;
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (id, secret) = match text.split_once(':') {
        Some((id, secret)) => (id, Some(secret)),
        None => (text.as_str(), None),
    };
    Ok((
        form_urldecode(id).ok_or_else(bad)?,
        secret
            .map(|s| form_urldecode(s).ok_or_else(bad))
            .transpose()?,
    ))
}

/// `getClientIdAndSecret` (docs/medplum-compat.md §2.13): a client assertion, else the `Authorization`
/// header (Basic only), else the body.
pub(crate) async fn presented_client(
    state: &ControlState,
    parts: &Parts,
    form: &TokenForm,
) -> Result<PresentedClient, ApiError> {
    if let Some(kind) = form.get("client_assertion_type") {
        if kind != JWT_BEARER_ASSERTION {
            return Err(ApiError::invalid_client(
                "Unsupported client assertion type",
            ));
        }
        let assertion = form
            .get("client_assertion")
            .ok_or_else(|| ApiError::invalid_client("Invalid client assertion"))?;
        let client_id = verify_client_assertion(state, assertion).await?;
        return Ok(PresentedClient {
            id: Some(client_id),
            secret: None,
            assertion_verified: true,
        });
    }
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let (id, secret) = basic_credentials(value)?;
        return Ok(PresentedClient {
            id: Some(id),
            secret,
            assertion_verified: false,
        });
    }
    Ok(PresentedClient {
        id: form.get("client_id").map(str::to_string),
        secret: form.get("client_secret").map(str::to_string),
        assertion_verified: false,
    })
}

/// JWK Sets are kept at most this long (the revocation budget of a key a client withdraws),
/// less when the set's `Cache-Control` says so; a key id that is not in a set older than
/// [`JWKS_REFETCH_AFTER`] makes one fresh fetch (the client may have rotated its keys).
pub(crate) const JWKS_TTL: Duration = Duration::from_secs(300);

/// How long a fetched set may be used: its `max-age` (`no-store`/`no-cache`: none), within
/// [`JWKS_REFETCH_AFTER`] (so an assertion cannot make fhirgate fetch on every request) and
/// [`JWKS_TTL`].
fn jwks_lifetime(headers: &reqwest::header::HeaderMap) -> Duration {
    let max_age = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|directive| {
            if directive.eq_ignore_ascii_case("no-store")
                || directive.eq_ignore_ascii_case("no-cache")
            {
                return Some(0);
            }
            let (name, value) = directive.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("max-age")
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())?
        });
    max_age.map_or(JWKS_TTL, |secs| {
        Duration::from_secs(secs).clamp(JWKS_REFETCH_AFTER, JWKS_TTL)
    })
}

const JWKS_REFETCH_AFTER: Duration = Duration::from_secs(10);

const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

const JWKS_MAX_BYTES: usize = 256 * 1024;

/// URLs whose JWK Set could not be fetched lately are not fetched again before this long.
pub(crate) const JWKS_FAILURE_TTL: Duration = Duration::from_secs(30);

async fn fetch_jwks(state: &ControlState, url: &str) -> Option<FetchedJwks> {
    let failures = &state.client_jwks.failures;
    if failures.contains_key(url) {
        return None;
    }
    let fetched = fetch_jwks_now(&state.guarded, url).await;
    if fetched.is_none() {
        failures.insert(url.to_string(), ());
    }
    fetched
}

async fn fetch_jwks_now(http: &Guarded, url: &str) -> Option<FetchedJwks> {
    let resp = http
        .request(reqwest::Method::GET, url)?
        .timeout(JWKS_TIMEOUT)
        .header(header::ACCEPT, "application/json")
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let lifetime = jwks_lifetime(resp.headers());
    let body = outbound::read_bounded(resp, JWKS_MAX_BYTES).await?;
    let set = serde_json::from_slice(&body).ok()?;
    let fetched = std::time::Instant::now();
    Some(FetchedJwks {
        set,
        fetched,
        fresh_until: fetched + lifetime,
    })
}

/// The JWK Set at `url`, from the cache unless `fresh` (a client's `jwksUri`, Google's keys).
pub(crate) async fn jwks_for(
    state: &ControlState,
    url: &str,
    fresh: bool,
) -> Option<Arc<FetchedJwks>> {
    let sets = &state.client_jwks.sets;
    if !fresh
        && let Some(c) = sets.get(url).await
        && std::time::Instant::now() < c.fresh_until
    {
        return Some(c);
    }
    let fetched = Arc::new(fetch_jwks(state, url).await?);
    sets.insert(url.to_string(), fetched.clone()).await;
    Some(fetched)
}

/// Authenticates a client by its `private_key_jwt` assertion (docs/medplum-compat.md §2.13, case 25);
/// returns the client id. Stricter than Medplum: an assertion is accepted once (`jti`, or the
/// whole assertion when it has none).
async fn verify_client_assertion(
    state: &ControlState,
    assertion: &str,
) -> Result<String, ApiError> {
    let token_url = format!("{}oauth2/token", state.config.base_url);
    let client_id = crate::tokens::assertion_client_id(assertion, &token_url)
        .map_err(|e| ApiError::invalid_client(e.to_string()))?;
    let client = required(state.identities.client(&client_id).await, || {
        ApiError::invalid_client("Client not found")
    })?;
    let bad_signature = || ApiError::invalid_client("Invalid client assertion signature");
    // SMART 2.2: the client's keys are registered inline (`jwks`) or published at `jwksUri`.
    let claims = if let Some(inline) = client.content.get("jwks") {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_value(inline.clone()).map_err(|_| bad_signature())?;
        crate::tokens::verify_assertion(assertion, &set, &client_id, &token_url)
            .map_err(|_| bad_signature())?
    } else {
        let url = client
            .content
            .get("jwksUri")
            .and_then(Value::as_str)
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .ok_or_else(|| ApiError::invalid_client("Client must have a JWK Set URL"))?
            .to_string();
        let mut jwks = jwks_for(state, &url, false)
            .await
            .ok_or_else(bad_signature)?;
        match crate::tokens::verify_assertion(assertion, &jwks.set, &client_id, &token_url) {
            Ok(c) => c,
            Err(_) if jwks.fetched.elapsed() > JWKS_REFETCH_AFTER => {
                jwks = jwks_for(state, &url, true)
                    .await
                    .ok_or_else(bad_signature)?;
                crate::tokens::verify_assertion(assertion, &jwks.set, &client_id, &token_url)
                    .map_err(|_| bad_signature())?
            }
            Err(_) => return Err(bad_signature()),
        }
    };
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    // Kept in the store, so a replay is refused on every control instance and after a restart.
    let seen_key = match claims.get("jti").and_then(Value::as_str) {
        Some(j) => state.hash_secret(&format!("assertion\u{0}{client_id}\u{0}{j}")),
        None => state.hash_secret(&format!("assertion\u{0}{client_id}\u{0}{assertion}")),
    };
    let now = crate::store::now_unix();
    if !state
        .store
        .claim_assertion(&seen_key, exp.max(now) + 60, now)
        .await?
    {
        return Err(ApiError::invalid_client("Invalid client assertion"));
    }
    Ok(client_id)
}

/// `validateClientIdAndSecret`: the secret must equal the client's secret or its retiring
/// secret. Both hashes are always compared.
pub(crate) fn check_client_secret(
    state: &State,
    client: &ClientInfo,
    secret: &str,
) -> Result<(), ApiError> {
    let Some(primary) = client.secret_hash.as_deref() else {
        return Err(ApiError::invalid_client("Invalid client"));
    };
    let presented = state.hash_secret(secret);
    let primary_ok = hashes_equal(primary, &presented);
    let retiring_ok = client
        .retiring_hash
        .as_deref()
        .is_some_and(|h| hashes_equal(h, &presented));
    if primary_ok | retiring_ok {
        Ok(())
    } else {
        Err(ApiError::invalid_client("Invalid secret"))
    }
}

fn invalid_client() -> ApiError {
    ApiError::invalid_client("Invalid client")
}

/// The answer to a request whose client authentication failed (a 401): when the client tried
/// `Authorization: Basic`, the 401 names the scheme (RFC 6749 §5.2).
pub(crate) fn with_basic_challenge(
    headers: &axum::http::HeaderMap,
    mut response: axum::response::Response,
) -> axum::response::Response {
    let tried_basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Basic "));
    if tried_basic && response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"fhirgate\""),
        );
    }
    response
}

/// A public client (SMART `client-public`): no secret and no keys, so nothing it presents can
/// prove who it is; its codes are bound by PKCE with S256 alone.
pub(crate) fn is_public(client: &ClientInfo) -> bool {
    client.secret_hash.is_none()
        && client.content.get("jwksUri").is_none()
        && client.content.get("jwks").is_none()
}

/// Authenticates the calling client (assertion, Basic or body). A client with a secret must
/// present it (or a verified assertion); `public_ok` lets a client without a secret identify
/// itself by its id alone (RFC 7009 public clients). Returns the client id and its project.
pub(crate) async fn authenticate_client(
    state: &ControlState,
    parts: &Parts,
    form: &TokenForm,
    public_ok: bool,
) -> Result<(String, Option<String>), ApiError> {
    let presented = presented_client(state, parts, form)
        .await
        .map_err(|_| invalid_client())?;
    let id = presented
        .id
        .filter(|s| !s.is_empty())
        .ok_or_else(invalid_client)?;
    let client = required(state.identities.client(&id).await, invalid_client)?;
    if !client.active {
        return Err(invalid_client());
    }
    if !presented.assertion_verified {
        match presented.secret.as_deref().filter(|s| !s.is_empty()) {
            Some(secret) => {
                check_client_secret(state, &client, secret).map_err(|_| invalid_client())?
            }
            None if public_ok && client.secret_hash.is_none() => {}
            None => return Err(invalid_client()),
        }
    }
    Ok((id, client.project_id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_urldecoded() {
        assert_eq!(form_urldecode("a%3Ab+c").as_deref(), Some("a:b c"));
        assert_eq!(form_urldecode("plain").as_deref(), Some("plain"));
        assert_eq!(form_urldecode("%FF"), None);
    }

    #[test]
    fn jwk_sets_are_kept_as_long_as_their_cache_control_says_within_bounds() {
        let lifetime = |values: &[&str]| {
            let mut h = reqwest::header::HeaderMap::new();
            for v in values {
                h.append(header::CACHE_CONTROL, v.parse().unwrap());
            }
            jwks_lifetime(&h).as_secs()
        };
        assert_eq!(lifetime(&[]), 300);
        assert_eq!(lifetime(&["public, max-age=60"]), 60);
        assert_eq!(lifetime(&["MAX-AGE = \"120\""]), 120);
        assert_eq!(lifetime(&["max-age=86400"]), 300);
        assert_eq!(lifetime(&["max-age=0"]), 10);
        assert_eq!(lifetime(&["no-store"]), 10);
        assert_eq!(lifetime(&["private", "no-cache"]), 10);
        assert_eq!(lifetime(&["max-age=soon"]), 300);
    }
}
