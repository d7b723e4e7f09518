//! `POST /oauth2/token` (medplum-auth.md §2.13, §3): form bodies only, client authentication by
//! body, `Authorization: Basic` (form-urldecoded, RFC 6749 §2.3.1) or a client assertion, and
//! the grants. Every error is `{error, error_description}`, except the plain-text
//! "Unsupported content type".
//!
//! Grants are dispatched by [`Grant`]; each one authenticates the client, creates or loads a
//! Login and hands it to [`issue_tokens`], which signs the tokens and shapes the response.
//!
//! Stricter than Medplum (SPEC §2): codes expire, are bound to the `redirect_uri` given at
//! `/oauth2/authorize`, and are redeemed by a compare-and-swap (exactly one of two concurrent
//! exchanges wins, the other counts as a replay); a client secret presented with a code or a
//! refresh token is always checked; MFA, membership state and IP rules are checked again at
//! every exchange; codes and refresh secrets are stored as keyed hashes only.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::login::{self, GRANTED_PREFIX, keys};
use super::{ApiError, client_ip, media_type, read_body};
use crate::obs::METRICS;
use crate::state::{ClientInfo, Snapshot, State};
use crate::store::{LoginRecord, now_unix};
use crate::tokens::{Claims, hashes_equal, random_hex};

/// Token requests are small; anything bigger is refused before parsing.
const MAX_FORM: usize = 64 * 1024;
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// ID tokens live one hour, whatever the access token lifetime (medplum-auth.md §3.3).
const ID_TOKEN_LIFETIME: i64 = 3600;

/// The grant types of the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    ClientCredentials,
    AuthorizationCode,
    RefreshToken,
    /// RFC 8693, answered by `external.rs`.
    TokenExchange,
}

impl Grant {
    fn parse(s: &str) -> Option<Grant> {
        match s {
            "client_credentials" => Some(Grant::ClientCredentials),
            "authorization_code" => Some(Grant::AuthorizationCode),
            "refresh_token" => Some(Grant::RefreshToken),
            super::external::TOKEN_EXCHANGE_GRANT => Some(Grant::TokenExchange),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::AuthorizationCode => "authorization_code",
            Grant::RefreshToken => "refresh_token",
            Grant::TokenExchange => "token_exchange",
        }
    }
}

/// The parsed form. A parameter sent twice is refused (RFC 6749 §3.2).
pub(crate) struct TokenForm(HashMap<String, String>);

impl TokenForm {
    pub(crate) fn parse(bytes: &[u8]) -> Result<TokenForm, ApiError> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            if map.insert(k.into_owned(), v.into_owned()).is_some() {
                return Err(ApiError::oauth("Duplicate parameter"));
            }
        }
        Ok(TokenForm(map))
    }

    /// A form from parameters already parsed (e.g. a JSON body's strings).
    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> TokenForm {
        TokenForm(pairs.into_iter().collect())
    }

    /// A non-empty parameter.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

pub async fn token(AxState(state): AxState<Arc<State>>, req: Request) -> Response {
    match handle(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_oauth().into_response(),
    }
}

async fn handle(state: &State, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(ApiError::Text(
            StatusCode::BAD_REQUEST,
            "Unsupported content type",
        ));
    }
    let bytes = read_body(body, MAX_FORM).await?;
    let form = TokenForm::parse(&bytes)?;
    let grant = form
        .get("grant_type")
        .ok_or_else(|| ApiError::oauth("Missing grant_type"))?;
    let grant = Grant::parse(grant).ok_or_else(|| ApiError::oauth("Unsupported grant_type"))?;
    let body = match grant {
        Grant::ClientCredentials => client_credentials(state, &parts, &form).await?,
        Grant::AuthorizationCode => authorization_code(state, &parts, &form).await?,
        Grant::RefreshToken => refresh_token(state, &parts, &form).await?,
        // Answers its own errors: some are OperationOutcomes, not OAuth errors.
        Grant::TokenExchange => {
            return Ok(super::external::token_exchange(state, &parts, &form).await);
        }
    };
    METRICS
        .tokens_issued
        .with_label_values(&[grant.label()])
        .inc();
    Ok(token_response(&body))
}

fn token_response(body: &Value) -> Response {
    let mut r = (StatusCode::OK, axum::Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

// === client authentication ===

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
    let bad = || ApiError::oauth("Invalid authorization header");
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

/// `getClientIdAndSecret` (medplum-auth.md §2.13): a client assertion, else the `Authorization`
/// header (Basic only), else the body.
pub(crate) async fn presented_client(
    state: &State,
    parts: &Parts,
    form: &TokenForm,
) -> Result<PresentedClient, ApiError> {
    if let Some(kind) = form.get("client_assertion_type") {
        if kind != JWT_BEARER_ASSERTION {
            return Err(ApiError::oauth("Unsupported client assertion type"));
        }
        let assertion = form
            .get("client_assertion")
            .ok_or_else(|| ApiError::oauth("Invalid client assertion"))?;
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

// === private_key_jwt ===

/// A client's JWK Set as fetched, and when.
struct CachedJwks {
    set: jsonwebtoken::jwk::JwkSet,
    fetched: std::time::Instant,
}

/// JWK Sets are kept this long; a key id that is not in a set older than
/// [`JWKS_REFETCH_AFTER`] makes one fresh fetch (the client may have rotated its keys).
const JWKS_TTL: Duration = Duration::from_secs(300);
const JWKS_REFETCH_AFTER: Duration = Duration::from_secs(10);
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
const JWKS_MAX_BYTES: usize = 256 * 1024;

static JWKS_CACHE: LazyLock<moka::future::Cache<String, Arc<CachedJwks>>> = LazyLock::new(|| {
    moka::future::Cache::builder()
        .max_capacity(1_000)
        .time_to_live(JWKS_TTL)
        .build()
});

static JWKS_HTTP: LazyLock<Option<reqwest::Client>> =
    LazyLock::new(|| super::outbound::client(JWKS_TIMEOUT));

async fn fetch_jwks(url: &str) -> Option<CachedJwks> {
    let client = JWKS_HTTP.as_ref()?;
    let resp = client
        .get(url)
        .header(header::ACCEPT, "application/json")
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = super::outbound::read_bounded(resp, JWKS_MAX_BYTES).await?;
    let set = serde_json::from_slice(&body).ok()?;
    Some(CachedJwks {
        set,
        fetched: std::time::Instant::now(),
    })
}

async fn jwks_for(url: &str, fresh: bool) -> Option<Arc<CachedJwks>> {
    if !fresh && let Some(c) = JWKS_CACHE.get(url).await {
        return Some(c);
    }
    let fetched = Arc::new(fetch_jwks(url).await?);
    JWKS_CACHE.insert(url.to_string(), fetched.clone()).await;
    Some(fetched)
}

/// Authenticates a client by its `private_key_jwt` assertion (medplum-auth.md §2.13, case 25);
/// returns the client id. Stricter than Medplum: an assertion is accepted once (`jti`, or the
/// whole assertion when it has none).
async fn verify_client_assertion(state: &State, assertion: &str) -> Result<String, ApiError> {
    let token_url = format!("{}oauth2/token", state.config.base_url);
    let client_id = crate::tokens::assertion_client_id(assertion, &token_url)
        .map_err(|e| ApiError::oauth(e.to_string()))?;
    let snap = state.snapshot();
    let client = snap
        .clients
        .get(&client_id)
        .ok_or_else(|| ApiError::oauth("Client not found"))?;
    let url = client
        .content
        .get("jwksUri")
        .and_then(Value::as_str)
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .ok_or_else(|| ApiError::oauth("Client must have a JWK Set URL"))?
        .to_string();
    let bad_signature = || ApiError::oauth("Invalid client assertion signature");
    let mut jwks = jwks_for(&url, false).await.ok_or_else(bad_signature)?;
    let claims = match crate::tokens::verify_assertion(assertion, &jwks.set, &client_id, &token_url)
    {
        Ok(c) => c,
        Err(_) if jwks.fetched.elapsed() > JWKS_REFETCH_AFTER => {
            jwks = jwks_for(&url, true).await.ok_or_else(bad_signature)?;
            crate::tokens::verify_assertion(assertion, &jwks.set, &client_id, &token_url)
                .map_err(|_| bad_signature())?
        }
        Err(_) => return Err(bad_signature()),
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
        return Err(ApiError::oauth("Invalid client assertion"));
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
        return Err(ApiError::oauth("Invalid client"));
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
        Err(ApiError::oauth("Invalid secret"))
    }
}

// === grants ===

async fn client_credentials(
    state: &State,
    parts: &Parts,
    form: &TokenForm,
) -> Result<Value, ApiError> {
    let presented = presented_client(state, parts, form).await?;
    let client_id = presented
        .id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::oauth("Missing client_id"))?;
    let secret = presented.secret.filter(|s| !s.is_empty());
    if secret.is_none() && !presented.assertion_verified {
        return Err(ApiError::oauth("Missing client_secret"));
    }
    let snap = state.snapshot();
    let client = snap
        .clients
        .get(&client_id)
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if !client.active {
        return Err(ApiError::oauth("Invalid client"));
    }
    if let Some(secret) = &secret {
        check_client_secret(state, client, secret)?;
    }
    let (membership_id, membership) = snap
        .client_membership(client)
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if !membership.is_active() {
        return Err(ApiError::oauth("Invalid client"));
    }
    let project_id = membership
        .project
        .type_and_id()
        .map(|(_, id)| id.to_string())
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    let scope = form.get("scope").unwrap_or("openid").to_string();
    let ip = client_ip(state, parts)?;
    let policy = state
        .effective_policy(&snap, membership_id, Some(&scope))
        .ok_or_else(|| {
            ApiError::oauth("Cannot authenticate: Invalid access policy configuration")
        })?;
    if let Some(ip) = ip
        && !policy.check_ip(ip).is_allowed()
    {
        return Err(ApiError::oauth("IP address not allowed"));
    }
    let lifetime = access_token_lifetime(state, client);
    let now = now_unix();
    let profile = format!("ClientApplication/{}", client.id);
    let login = LoginRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_ref: profile.clone(),
        client_id: Some(client.id.clone()),
        membership_id: Some(membership_id.clone()),
        project_id: Some(project_id.clone()),
        scope,
        auth_method: "client".into(),
        auth_time: now,
        expires_at: now.saturating_add(lifetime.as_secs() as i64),
        revoked: false,
        remote_address: ip.map(|i| i.to_string()),
        code: None,
        refresh_secret: None,
        extra: json!({"granted": true, "userAgent": user_agent(parts)}),
    };
    state.store.insert_login(&login).await?;
    issue_tokens(
        state,
        &Issue {
            login: &login,
            sub: &client.id,
            profile: &profile,
            project_id: &project_id,
            client_id: Some(&client.id),
            lifetime,
            refresh: None,
            email: None,
            names: None,
            patient: None,
            now,
        },
    )
}

fn user_agent(parts: &Parts) -> Option<String> {
    login::user_agent(&parts.headers)
}

/// The client's `refreshTokenLifetime`, else the configured default.
pub(crate) fn refresh_token_lifetime(state: &State, client: Option<&ClientInfo>) -> Duration {
    client
        .and_then(|c| c.content.get("refreshTokenLifetime"))
        .and_then(Value::as_str)
        .and_then(crate::config::parse_lifetime)
        .unwrap_or(state.config.refresh_token_lifetime)
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

/// Does the space-separated `scope` contain `word`?
pub(crate) fn has_word(scope: &str, word: &str) -> bool {
    scope.split_ascii_whitespace().any(|w| w == word)
}

/// PKCE (RFC 7636): `plain` compares the strings, `S256` the unpadded base64url SHA-256 of the
/// verifier; both in constant time.
pub(crate) fn pkce_matches(method: &str, challenge: &str, verifier: &str) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let computed = match method {
        "plain" => verifier.to_string(),
        "S256" => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes())),
        _ => return false,
    };
    computed.len() == challenge.len() && bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

/// The current snapshot, caught up once when it does not know the Login's membership yet
/// (written moments ago, maybe by another instance).
async fn snapshot_for(state: &State, login: &LoginRecord) -> Arc<Snapshot> {
    let snap = state.snapshot();
    match login.membership_id.as_deref() {
        Some(m) if !snap.memberships.contains_key(m) => {
            if let Err(e) = state.refresh_if_changed().await {
                tracing::warn!(error = %e, "snapshot refresh before a token exchange failed");
            }
            state.snapshot()
        }
        _ => snap,
    }
}

/// The membership, project and IP checks a grant repeats at exchange time: the Login's
/// membership must still exist and be active, and the caller's address must pass its IP rules.
fn live_membership<'s>(
    state: &State,
    snap: &'s Snapshot,
    parts: &Parts,
    login: &LoginRecord,
) -> Result<
    (
        &'s String,
        &'s fhirgate_core::policy::model::ProjectMembership,
        bool,
    ),
    ApiError,
> {
    let membership_id = login
        .membership_id
        .as_deref()
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    let (id, membership) = snap
        .memberships
        .get_key_value(membership_id)
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    if !membership.is_active() {
        return Err(ApiError::oauth("Profile not active"));
    }
    let super_admin = membership
        .project
        .type_and_id()
        .and_then(|(_, p)| snap.projects.get(p))
        .map(|p| p.super_admin)
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    if let Some(ip) = client_ip(state, parts)? {
        let policy = state
            .effective_policy(snap, membership_id, Some(&login.scope))
            .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
        if !policy.check_ip(ip).is_allowed() {
            return Err(ApiError::oauth("IP address not allowed"));
        }
    }
    Ok((id, membership.as_ref(), super_admin))
}

/// The profile reference and project id a token of `membership` names.
fn profile_and_project(
    membership: &fhirgate_core::policy::model::ProjectMembership,
) -> Result<(String, String), ApiError> {
    let profile = membership
        .profile
        .reference
        .clone()
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    let project_id = membership
        .project
        .type_and_id()
        .map(|(_, p)| p.to_string())
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    Ok((profile, project_id))
}

/// Access token lifetime of a user's Login: its client's, or the server default without one.
fn user_access_lifetime(state: &State, client: Option<&ClientInfo>) -> Duration {
    match client {
        Some(c) => access_token_lifetime(state, c),
        None => state.config.access_token_lifetime,
    }
}

/// The client a Login was started by, which must still exist and be active to redeem it.
fn login_client<'s>(
    snap: &'s Snapshot,
    login: &LoginRecord,
) -> Result<Option<&'s ClientInfo>, ApiError> {
    let Some(id) = login.client_id.as_deref() else {
        return Ok(None);
    };
    let c = snap
        .clients
        .get(id)
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if !c.active {
        return Err(ApiError::oauth("Invalid client"));
    }
    Ok(Some(c))
}

/// Everything the token response says about a user's Login.
struct UserFacts {
    email: Option<String>,
    given: String,
    family: String,
}

async fn user_facts(state: &State, login: &LoginRecord) -> Result<UserFacts, ApiError> {
    let user = match login::user_id(login) {
        Some(id) => state.store.read("User", id).await?.map(|u| u.content),
        None => None,
    };
    let field = |k: &str| {
        user.as_ref()
            .and_then(|u| u.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(UserFacts {
        email: Some(field("email")).filter(|e| !e.is_empty()),
        given: field("firstName"),
        family: field("lastName"),
    })
}

/// Signs the tokens of a user's Login (authorization code and refresh grants).
pub(crate) async fn issue_user_tokens(
    state: &State,
    login: &LoginRecord,
    profile: &str,
    project_id: &str,
    client: Option<&ClientInfo>,
    refresh: Option<(&str, Duration)>,
    now: i64,
) -> Result<Value, ApiError> {
    let facts = user_facts(state, login).await?;
    let lifetime = user_access_lifetime(state, client);
    let sub = login::user_id(login).unwrap_or(login.user_ref.as_str());
    let patient = profile.strip_prefix("Patient/");
    issue_tokens(
        state,
        &Issue {
            login,
            sub,
            profile,
            project_id,
            client_id: login.client_id.as_deref(),
            lifetime,
            refresh,
            email: facts.email.as_deref(),
            names: Some((&facts.given, &facts.family)),
            patient,
            now,
        },
    )
}

/// How long a granted Login must stay known: as long as any token it issued can be valid.
pub(crate) fn granted_until(now: i64, access: Duration, refresh: Option<Duration>) -> i64 {
    let longest = access
        .as_secs()
        .max(ID_TOKEN_LIFETIME as u64)
        .max(refresh.map(|r| r.as_secs()).unwrap_or(0));
    now.saturating_add(i64::try_from(longest).unwrap_or(i64::MAX))
}

/// Replay of a redeemed code: revoke the Login (every token of it stops working), then refuse.
async fn replayed(state: &State, login_id: &str) -> ApiError {
    if let Err(e) = login::revoke(state, login_id).await {
        return e;
    }
    ApiError::oauth_code("invalid_grant", "Token already granted")
}

async fn authorization_code(
    state: &State,
    parts: &Parts,
    form: &TokenForm,
) -> Result<Value, ApiError> {
    let presented = presented_client(state, parts, form).await?;
    let code = form
        .get("code")
        .ok_or_else(|| ApiError::oauth("Missing code"))?;
    let hash = login::code_hash(state, code);
    let granted_marker = format!("{GRANTED_PREFIX}{hash}");
    let login = match state.store.login_by_code(&hash).await? {
        Some(l) => l,
        None => state
            .store
            .login_by_code(&granted_marker)
            .await?
            .ok_or_else(|| ApiError::oauth("Invalid code"))?,
    };
    if let Some(id) = presented.id.as_deref()
        && login.client_id.as_deref() != Some(id)
    {
        return Err(ApiError::oauth("Invalid client"));
    }
    if login.membership_id.is_none() {
        return Err(ApiError::oauth("Invalid profile"));
    }
    if login::is_granted(&login) {
        return Err(replayed(state, &login.id).await);
    }
    if login.revoked {
        return Err(ApiError::oauth_code("invalid_grant", "Token revoked"));
    }
    let now = now_unix();
    let expires = login
        .extra
        .get(keys::CODE_EXPIRES_AT)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if expires <= now {
        return Err(ApiError::oauth_code("invalid_grant", "Code expired"));
    }
    if let Some(why) = login::not_ready(&login) {
        return Err(ApiError::oauth_code("invalid_grant", why));
    }
    let snap = snapshot_for(state, &login).await;
    let client = login_client(&snap, &login)?;
    if let Some(bound) = login::extra_str(&login, keys::REDIRECT_URI)
        && form.get("redirect_uri") != Some(bound)
    {
        return Err(ApiError::oauth_code(
            "invalid_grant",
            "Invalid redirect URI",
        ));
    }
    let pkce_optional = client.is_some_and(|c| login::client_flag(c, "pkceOptional"));
    let challenge = login::extra_str(&login, keys::CODE_CHALLENGE);
    if !pkce_optional || challenge.is_some() {
        let challenge = challenge.ok_or_else(|| ApiError::oauth("Missing verification context"))?;
        let verifier = form
            .get("code_verifier")
            .ok_or_else(|| ApiError::oauth("Missing code verifier"))?;
        let method = login::extra_str(&login, keys::CODE_CHALLENGE_METHOD).unwrap_or("plain");
        if !pkce_matches(method, challenge, verifier) {
            return Err(ApiError::oauth("Invalid code verifier"));
        }
    }
    if !presented.assertion_verified
        && let Some(secret) = presented.secret.as_deref().filter(|s| !s.is_empty())
    {
        let c = client.ok_or_else(|| ApiError::oauth("Invalid client"))?;
        check_client_secret(state, c, secret)?;
    }
    let (_, membership, super_admin) = live_membership(state, &snap, parts, &login)?;
    let (profile, project_id) = profile_and_project(membership)?;

    let lifetime = user_access_lifetime(state, client);
    let offline = login::flag(&login, keys::OFFLINE) && !super_admin;
    let refresh_lifetime = offline.then(|| refresh_token_lifetime(state, client));
    let refresh_secret = offline.then(|| random_hex(32));
    let mut extra = login.extra.clone();
    if let Some(obj) = extra.as_object_mut() {
        obj.insert(keys::GRANTED.into(), Value::Bool(true));
        obj.remove(keys::CODE_EXPIRES_AT);
    }
    let won = state
        .store
        .redeem_login_code(
            &login.id,
            &hash,
            &granted_marker,
            refresh_secret
                .as_deref()
                .map(|s| state.hash_secret(s))
                .as_deref(),
            granted_until(now, lifetime, refresh_lifetime),
            &extra,
        )
        .await?;
    if !won {
        // Another exchange of the same code got there first (or a revocation did).
        return Err(replayed(state, &login.id).await);
    }
    let mut granted = login.clone();
    granted.extra = extra;
    granted.code = Some(granted_marker);
    issue_user_tokens(
        state,
        &granted,
        &profile,
        &project_id,
        client,
        refresh_secret.as_deref().zip(refresh_lifetime),
        now,
    )
    .await
}

async fn refresh_token(state: &State, parts: &Parts, form: &TokenForm) -> Result<Value, ApiError> {
    let invalid = || ApiError::oauth("Invalid refresh token");
    let token = form.get("refresh_token").ok_or_else(invalid)?;
    let claims = state.keyring().verify(token).map_err(|_| invalid())?;
    let (Some(login_id), Some(secret)) =
        (claims.login_id.as_deref(), claims.refresh_secret.as_deref())
    else {
        return Err(invalid());
    };
    let login = state.store.login(login_id).await?.ok_or_else(invalid)?;
    let stored = login.refresh_secret.clone().ok_or_else(invalid)?;
    if login.revoked {
        return Err(ApiError::oauth_code("invalid_grant", "Token revoked"));
    }
    if !hashes_equal(&stored, &state.hash_secret(secret)) {
        return Err(ApiError::oauth("Invalid token"));
    }
    let snap = snapshot_for(state, &login).await;
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let (id, presented_secret) = basic_credentials(value)?;
        if login.client_id.as_deref() != Some(id.as_str()) {
            return Err(ApiError::oauth_code("invalid_grant", "Incorrect client"));
        }
        let presented_secret = presented_secret
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::oauth_code("invalid_grant", "Incorrect client secret"))?;
        // Stricter than Medplum, which only checks that a secret is present.
        if let Some(c) = snap.clients.get(&id)
            && check_client_secret(state, c, &presented_secret).is_err()
        {
            return Err(ApiError::oauth_code(
                "invalid_grant",
                "Incorrect client secret",
            ));
        }
    } else if let (Some(body_id), Some(login_client)) =
        (form.get("client_id"), login.client_id.as_deref())
        && body_id != login_client
    {
        return Err(ApiError::oauth_code("invalid_grant", "Incorrect client"));
    }
    let client = login_client(&snap, &login)?;
    let (_, membership, _) = live_membership(state, &snap, parts, &login)?;
    let (profile, project_id) = profile_and_project(membership)?;
    let now = now_unix();
    let lifetime = user_access_lifetime(state, client);
    let refresh_lifetime = refresh_token_lifetime(state, client);
    let new_secret = random_hex(32);
    let ip = client_ip(state, parts)?.map(|i| i.to_string());
    let rotated = state
        .store
        .rotate_refresh_secret(
            &login.id,
            &stored,
            &state.hash_secret(&new_secret),
            granted_until(now, lifetime, Some(refresh_lifetime)),
            ip.as_deref(),
        )
        .await?;
    if !rotated {
        // Used concurrently, or revoked in between.
        return Err(ApiError::oauth("Invalid token"));
    }
    issue_user_tokens(
        state,
        &login,
        &profile,
        &project_id,
        client,
        Some((&new_secret, refresh_lifetime)),
        now,
    )
    .await
}

// === issuance ===

/// What a grant hands to [`issue_tokens`].
pub(crate) struct Issue<'a> {
    /// The Login, already stored.
    pub login: &'a LoginRecord,
    /// User id, or the client id for client credentials.
    pub sub: &'a str,
    /// `Practitioner/…`, `ClientApplication/…`, …
    pub profile: &'a str,
    pub project_id: &'a str,
    pub client_id: Option<&'a str>,
    pub lifetime: Duration,
    /// The refresh secret (as carried by the token, not its stored hash) and the refresh
    /// token's lifetime, when a refresh token is issued.
    pub refresh: Option<(&'a str, Duration)>,
    /// Put in the ID token when the scope asks for `email`.
    pub email: Option<&'a str>,
    /// `(given, family)`, put in the ID token when the scope asks for `profile`.
    pub names: Option<(&'a str, &'a str)>,
    /// Patient context of the token response.
    pub patient: Option<&'a str>,
    pub now: i64,
}

/// Signs the access token (claims of medplum-auth.md §3.2), the ID token (§3.3) and, when asked
/// for, the refresh token (§3.4); returns the response body of §3.5.
pub(crate) fn issue_tokens(state: &State, i: &Issue<'_>) -> Result<Value, ApiError> {
    let keyring = state.keyring();
    let issuer = state.config.base_url.clone();
    let login = i.login;
    let expires_in = i.lifetime.as_secs() as i64;
    let access = Claims {
        iss: issuer.clone(),
        iat: i.now,
        exp: i.now.saturating_add(expires_in),
        aud: i.client_id.map(str::to_string),
        client_id: i.client_id.map(str::to_string),
        login_id: Some(login.id.clone()),
        sub: Some(i.sub.to_string()),
        username: Some(i.sub.to_string()),
        scope: Some(login.scope.clone()),
        profile: Some(i.profile.to_string()),
        ..Default::default()
    };
    let id_claims = Claims {
        iss: issuer.clone(),
        iat: i.now,
        exp: i.now.saturating_add(ID_TOKEN_LIFETIME),
        aud: i.client_id.map(str::to_string),
        client_id: i.client_id.map(str::to_string),
        login_id: Some(login.id.clone()),
        sub: Some(i.sub.to_string()),
        fhir_user: Some(i.profile.to_string()),
        nonce: login
            .extra
            .get("nonce")
            .and_then(Value::as_str)
            .map(str::to_string),
        auth_time: Some(login.auth_time),
        email: if login.scope.contains("email") {
            i.email.map(str::to_string)
        } else {
            None
        },
        ..Default::default()
    };
    let mut id_claims = id_claims;
    if has_word(&login.scope, "profile")
        && let Some((given, family)) = i.names
    {
        let full = [given, family]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        id_claims.name = Some(full).filter(|s| !s.is_empty());
        id_claims.given_name = Some(given.to_string()).filter(|s| !s.is_empty());
        id_claims.family_name = Some(family.to_string()).filter(|s| !s.is_empty());
    }
    let sign = |c: &Claims| {
        keyring
            .sign(c)
            .map_err(|e| ApiError::internal("signing a token", e))
    };
    let access_token = sign(&access)?;
    let id_token = sign(&id_claims)?;
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": login.scope,
        "id_token": id_token,
        "access_token": access_token,
    });
    if let Some((secret, lifetime)) = i.refresh {
        let refresh = Claims {
            iss: issuer,
            iat: i.now,
            exp: i.now.saturating_add(lifetime.as_secs() as i64),
            aud: i.client_id.map(str::to_string),
            client_id: i.client_id.map(str::to_string),
            login_id: Some(login.id.clone()),
            refresh_secret: Some(secret.to_string()),
            ..Default::default()
        };
        body["refresh_token"] = Value::String(sign(&refresh)?);
    }
    body["project"] = json!({"reference": format!("Project/{}", i.project_id)});
    body["profile"] = json!({"reference": i.profile});
    if let Some(p) = i.patient {
        body["patient"] = Value::String(p.to_string());
    }
    body["smart_style_url"] = Value::String(format!(
        "{}fhir/R4/.well-known/smart-styles.json",
        state.config.base_url
    ));
    body["need_patient_banner"] = Value::Bool(i.patient.is_some());
    if login
        .scope
        .split_whitespace()
        .any(|w| w.starts_with("fhircast/"))
    {
        // medplum-auth.md §3.5: FHIRcast scopes name the hub and a per-user topic. fhirgate
        // hosts no hub; the URL is where an operator mounts one behind the same base URL. The
        // topic is stable per user and unguessable without the installation's key.
        body["hub.url"] = Value::String(format!("{}fhircast/STU3", state.config.base_url));
        let topic = state.hash_secret(&format!("fhircast-topic:{}", login.user_ref));
        body["hub.topic"] = Value::String(topic.chars().take(32).collect());
    }
    Ok(body)
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
    fn pkce_plain_and_s256() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches("S256", challenge, verifier));
        assert!(!pkce_matches("S256", challenge, "wrong"));
        assert!(pkce_matches("plain", "xyz", "xyz"));
        assert!(!pkce_matches("plain", "xyz", "xyZ"));
        assert!(!pkce_matches("S512", challenge, verifier));
    }

    #[test]
    fn duplicate_parameters_are_refused() {
        assert!(TokenForm::parse(b"grant_type=a&grant_type=b").is_err());
        let f = TokenForm::parse(b"grant_type=client_credentials&scope=").unwrap();
        assert_eq!(f.get("grant_type"), Some("client_credentials"));
        assert_eq!(f.get("scope"), None);
    }
}
