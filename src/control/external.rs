//! External identity providers (medplum-auth.md §1.7, §2.1, §2.13 token exchange, §2.20, §9).
//!
//! - `POST /auth/method`: tells a sign-in front end whether an e-mail's domain signs in at an
//!   external IdP (a `DomainConfiguration`), and where.
//! - `GET /auth/external`: the IdP's redirect back. The code is exchanged at the IdP's token
//!   endpoint, the user is found by e-mail (or by external id with `useSubject`), and a Login is
//!   created through the Login lifecycle of `login.rs`.
//! - `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693) at `/oauth2/token`,
//!   and its legacy form `POST /auth/exchange`: an IdP access token, checked only by calling the
//!   client's IdP userinfo endpoint, becomes fhirgate tokens.
//!
//! IdPs come from `ClientApplication.identityProvider` (the client's project) or from a
//! `DomainConfiguration` (server-wide, super admins only). Following Medplum, the ID token of
//! the code exchange is read without checking its signature: it comes straight from the IdP's
//! token endpoint, which fhirgate called itself. The external sign-in needs no fhirgate MFA
//! (Medplum asks for MFA on password sign-ins only); a membership that requires MFA still
//! refuses to issue a code until it is done.
//!
//! Stricter than Medplum: the prefix match of a redirect URI compares scheme, host and port and
//! whole path segments; outgoing calls never follow redirects, time out, and read bounded
//! bodies; a client secret presented with a token exchange is checked; an `off` client is
//! refused.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};

use super::authorize;
use super::login::{self, keys};
use super::token::{
    TokenForm, access_token_lifetime, granted_until, issue_user_tokens, refresh_token_lifetime,
};
use super::{ApiError, client_ip, ok_json};
use crate::obs::METRICS;
use crate::state::{ClientInfo, State};
use crate::store::{LoginRecord, StoredResource, now_unix};
use crate::tokens::random_hex;

/// The grant type of RFC 8693 token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The only subject token type accepted (as Medplum).
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const VERIFY_FAILED: &str = "Failed to verify code - check your identity provider configuration";
const INVALID_USER_INFO_URL: &str =
    "Invalid user info URL - check your identity provider configuration";
/// Scope of an external sign-in or exchange that names none (Medplum's default).
const DEFAULT_SCOPE: &str = "openid offline";
/// Calls to an IdP give up after this long.
const IDP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest IdP answer read (token response, userinfo).
const IDP_MAX_BODY: usize = 256 * 1024;
/// Largest `/auth/*` body of this module.
const MAX_BODY: usize = 64 * 1024;

static IDP_HTTP: LazyLock<Option<reqwest::Client>> =
    LazyLock::new(|| super::outbound::client(IDP_TIMEOUT));

// === configuration ===

/// An `IdentityProvider` (medplum-auth.md §1.7), read leniently: a missing field is caught
/// where it is used, with the reference's error. No `Debug`: it holds the client secret.
#[derive(Clone, Default)]
pub struct IdentityProvider {
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    pub token_auth_method: Option<String>,
    pub user_info_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub use_pkce: bool,
    pub use_subject: bool,
}

impl IdentityProvider {
    /// `None` unless `v` is an object.
    pub fn from_value(v: &Value) -> Option<IdentityProvider> {
        let obj = v.as_object()?;
        let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
        let b = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        Some(IdentityProvider {
            authorize_url: s("authorizeUrl"),
            token_url: s("tokenUrl"),
            token_auth_method: s("tokenAuthMethod"),
            user_info_url: s("userInfoUrl"),
            client_id: s("clientId"),
            client_secret: s("clientSecret"),
            use_pkce: b("usePkce"),
            use_subject: b("useSubject"),
        })
    }
}

/// The IdP of a client, if it has one.
fn client_idp(client: &ClientInfo) -> Option<IdentityProvider> {
    client
        .content
        .get("identityProvider")
        .and_then(IdentityProvider::from_value)
}

/// The `DomainConfiguration` of `domain` (compared lower-case), as stored.
pub async fn domain_configuration(state: &State, domain: &str) -> Result<Option<Value>, ApiError> {
    let wanted = domain.to_lowercase();
    Ok(state
        .store
        .list("DomainConfiguration")
        .await?
        .into_iter()
        .map(|r| r.content)
        .find(|c| {
            c.get("domain")
                .and_then(Value::as_str)
                .is_some_and(|d| d.to_lowercase() == wanted)
        }))
}

/// The fields an `IdentityProvider` must have (1..1 in Medplum's profile).
const IDP_REQUIRED: [&str; 5] = [
    "authorizeUrl",
    "tokenUrl",
    "userInfoUrl",
    "clientId",
    "clientSecret",
];

/// Validation of a `DomainConfiguration` before it is stored (the FHIR CRUD of `fhir.rs`):
/// `domain` is required, stored lower-case and unique; an `identityProvider` has its required
/// fields. It belongs to no project.
pub async fn prepare_domain_configuration(
    state: &State,
    resource: &mut Value,
    existing: Option<&StoredResource>,
) -> Result<Option<String>, ApiError> {
    let domain = resource
        .get("domain")
        .and_then(Value::as_str)
        .map(|d| d.trim().to_lowercase())
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            ApiError::invalid("DomainConfiguration.domain", "Missing required property")
        })?;
    if domain
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "@/\\?#".contains(c))
    {
        return Err(ApiError::invalid(
            "DomainConfiguration.domain",
            "Invalid domain",
        ));
    }
    if let Some(idp) = resource.get("identityProvider") {
        let Some(obj) = idp.as_object() else {
            return Err(ApiError::invalid(
                "DomainConfiguration.identityProvider",
                "Invalid identity provider",
            ));
        };
        for field in IDP_REQUIRED {
            if obj
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::invalid(
                    &format!("DomainConfiguration.identityProvider.{field}"),
                    "Missing required property",
                ));
            }
        }
    }
    let own_id = resource
        .get("id")
        .and_then(Value::as_str)
        .or(existing.map(|e| e.id.as_str()))
        .unwrap_or_default()
        .to_string();
    let taken = state
        .store
        .list("DomainConfiguration")
        .await?
        .into_iter()
        .any(|r| {
            r.id != own_id
                && r.content
                    .get("domain")
                    .and_then(Value::as_str)
                    .is_some_and(|d| d.to_lowercase() == domain)
        });
    if taken {
        return Err(ApiError::conflict(format!(
            "Key (domain)=({domain}) already exists."
        )));
    }
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("domain".into(), Value::String(domain));
    }
    Ok(None)
}

// === small helpers ===

/// Express's `res.redirect`: 302 with a `Location`.
fn found(location: &str) -> Result<Response, ApiError> {
    let value = HeaderValue::from_str(location)
        .map_err(|_| ApiError::bad_request("Invalid redirect URI"))?;
    Ok((StatusCode::FOUND, [(header::LOCATION, value)]).into_response())
}

/// WHATWG `URLSearchParams.set` for each pair: replaces the first parameter of that name (and
/// drops the others), or appends it; the whole query is re-serialized form-style.
fn set_params(url: &mut url::Url, params: &[(&str, &str)]) {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (name, value) in params {
        let mut seen = false;
        pairs.retain_mut(|(k, v)| {
            if k != name {
                return true;
            }
            if seen {
                return false;
            }
            seen = true;
            *v = (*value).to_string();
            true
        });
        if !seen {
            pairs.push(((*name).to_string(), (*value).to_string()));
        }
    }
    url.query_pairs_mut().clear().extend_pairs(pairs);
}

/// The payload of a JWT, read without any verification (Medplum's `parseJWTPayload`).
pub fn jwt_payload(token: &str) -> Option<Map<String, Value>> {
    let mut parts = token.split('.');
    let (_, payload) = (parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// The host of an IdP URL, for log lines (never the URL's query, which may carry secrets).
fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

// === calls to the IdP ===

/// Why asking an IdP for a user's identity failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdpError {
    #[error("{INVALID_USER_INFO_URL}")]
    InvalidUserInfoUrl,
    #[error("{VERIFY_FAILED}")]
    Failed,
    #[error("Too Many Requests")]
    TooManyRequests,
    #[error("Failed to verify code - unsupported content type: {0}")]
    UnsupportedContentType(String),
}

impl IdpError {
    /// The token endpoint's answer: `invalid_request`, 429 for a rate-limited IdP, else 400.
    fn into_oauth(self) -> ApiError {
        let status = if self == IdpError::TooManyRequests {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::OAuth {
            status,
            error: "invalid_request",
            description: self.to_string(),
        }
    }
}

/// Medplum's `getExternalUserInfo`: `GET userInfoUrl` with the external access token; JSON or
/// `application/jwt` (payload read unverified) answers are accepted.
pub async fn user_info(url: &str, access_token: &str) -> Result<Map<String, Value>, IdpError> {
    if !url.starts_with("http:") && !url.starts_with("https:") {
        return Err(IdpError::InvalidUserInfoUrl);
    }
    let client = IDP_HTTP.as_ref().ok_or(IdpError::Failed)?;
    let resp = client
        .get(url)
        .header(header::ACCEPT, "application/json")
        .bearer_auth(access_token)
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(idp = %host_of(url), error = %e.without_url(), "IdP userinfo request failed");
            IdpError::Failed
        })?;
    let status = resp.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        tracing::warn!(idp = %host_of(url), "IdP userinfo rate limit exceeded");
        return Err(IdpError::TooManyRequests);
    }
    if status != StatusCode::OK {
        tracing::warn!(idp = %host_of(url), status = status.as_u16(), "IdP userinfo refused the token");
        return Err(IdpError::Failed);
    }
    // JavaScript's `String(null)` when there is no Content-Type.
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_else(|| "null".to_string());
    if content_type.contains("application/json") {
        let body = super::outbound::read_bounded(resp, IDP_MAX_BODY)
            .await
            .ok_or(IdpError::Failed)?;
        match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(IdpError::Failed),
        }
    } else if content_type.contains("application/jwt") {
        let body = super::outbound::read_bounded(resp, IDP_MAX_BODY)
            .await
            .ok_or(IdpError::Failed)?;
        let text = String::from_utf8(body).map_err(|_| IdpError::Failed)?;
        jwt_payload(text.trim()).ok_or(IdpError::Failed)
    } else {
        Err(IdpError::UnsupportedContentType(content_type))
    }
}

/// Medplum's `verifyExternalCode`: the IdP's authorization code for its ID token's claims.
/// `verifier` (the sign-in state's `codeChallenge`) is sent only when the IdP uses PKCE.
async fn claims_for_code(
    state: &State,
    idp: &IdentityProvider,
    code: &str,
    verifier: Option<&str>,
) -> Result<Map<String, Value>, ApiError> {
    let failed = || ApiError::bad_request(VERIFY_FAILED);
    let token_url = idp.token_url.as_deref().ok_or_else(failed)?;
    if !token_url.starts_with("http:") && !token_url.starts_with("https:") {
        return Err(failed());
    }
    let client_id = idp.client_id.as_deref().unwrap_or_default();
    let client_secret = idp.client_secret.as_deref().unwrap_or_default();
    let redirect_uri = format!("{}auth/external", state.config.base_url);
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "authorization_code"),
        ("redirect_uri", &redirect_uri),
        ("code", code),
    ];
    if idp.use_pkce
        && let Some(v) = verifier
    {
        form.push(("code_verifier", v));
    }
    let post = idp.token_auth_method.as_deref() == Some("client_secret_post");
    if post {
        form.push(("client_id", client_id));
        form.push(("client_secret", client_secret));
    }
    let http = IDP_HTTP.as_ref().ok_or_else(failed)?;
    let mut request = http
        .post(token_url)
        .header(header::ACCEPT, "application/json")
        .form(&form);
    if !post {
        // client_secret_basic: both halves form-urlencoded (RFC 6749 §2.3.1).
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = STANDARD.encode(format!("{}:{}", enc(client_id), enc(client_secret)));
        request = request.header(header::AUTHORIZATION, format!("Basic {basic}"));
    }
    let resp = request.send().await.map_err(|e| {
        tracing::warn!(idp = %host_of(token_url), error = %e.without_url(), "IdP token request failed");
        failed()
    })?;
    let status = resp.status();
    let body = super::outbound::read_bounded(resp, IDP_MAX_BODY)
        .await
        .ok_or_else(failed)?;
    if !status.is_success() {
        tracing::warn!(idp = %host_of(token_url), status = status.as_u16(), "IdP refused the authorization code");
        return Err(failed());
    }
    let body: Value = serde_json::from_slice(&body).map_err(|_| failed())?;
    body.get("id_token")
        .and_then(Value::as_str)
        .and_then(jwt_payload)
        .ok_or_else(failed)
}

// === the Login ===

/// Medplum's `tryLogin` for `external` and `exchange` sign-ins.
pub struct ExternalLogin<'a> {
    /// `external` or `exchange`.
    pub auth_method: &'static str,
    pub email: Option<String>,
    pub external_id: Option<String>,
    pub project_id: Option<String>,
    pub client: Option<&'a ClientInfo>,
    pub scope: String,
    pub nonce: String,
    pub launch: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub remote_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// Token exchange: take the first membership when there are several.
    pub force_first_membership: bool,
    /// Token exchange: only this membership may be chosen.
    pub membership_id: Option<String>,
}

/// Medplum's `getUserByExternalId`: the user of the project's membership with this external
/// id, else (legacy) a project user with it.
async fn user_by_external_id(
    state: &State,
    external_id: &str,
    project: Option<&str>,
) -> Result<Option<StoredResource>, ApiError> {
    let Some(project) = project.filter(|p| *p != "new") else {
        return Ok(None);
    };
    let project_ref = format!("Project/{project}");
    let filters = |name: &str| {
        vec![
            (name.to_string(), vec![external_id.to_string()]),
            ("project".to_string(), vec![project_ref.clone()]),
        ]
    };
    let memberships = state
        .store
        .search(
            "ProjectMembership",
            &filters("external-id"),
            Some(project),
            1,
        )
        .await?;
    if let Some(m) = memberships.first() {
        let user_id = m
            .content
            .get("user")
            .and_then(|u| u.get("reference"))
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("User/"));
        return match user_id {
            Some(id) => Ok(state.store.read("User", id).await?),
            None => Ok(None),
        };
    }
    let users = state
        .store
        .search("User", &filters("external-id"), Some(project), 1)
        .await?;
    Ok(users.into_iter().next())
}

/// Finds the user, stores a new Login and chooses its membership when there is one to take
/// (through `login::choose_profile`, with all of its checks). "User not found" when there is no
/// such user or no membership to sign in to.
pub async fn external_login(
    state: &State,
    req: &ExternalLogin<'_>,
) -> Result<LoginRecord, ApiError> {
    if let Some(c) = req.client
        && !c.active
    {
        return Err(ApiError::bad_request("Invalid client"));
    }
    login::check_client_pkce(
        req.client,
        req.code_challenge.as_deref(),
        req.code_challenge_method.as_deref(),
    )?;
    let project = req.project_id.as_deref().filter(|p| !p.is_empty());
    let user = match (&req.external_id, &req.email) {
        (Some(ext), _) => user_by_external_id(state, ext, project).await?,
        (None, Some(email)) => {
            login::find_user(state, &email.trim().to_lowercase(), project).await?
        }
        (None, None) => None,
    }
    .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let user_ref = format!("User/{}", user.id);
    let mut memberships = login::memberships_of(state, &user_ref, project, None).await?;
    if let Some(only) = &req.membership_id {
        memberships.retain(|(id, _)| id == only);
    }
    if memberships.is_empty() && project != Some("new") {
        return Err(ApiError::bad_request("User not found"));
    }

    let now = now_unix();
    let mut extra = Map::new();
    let mut put = |k: &str, v: Value| {
        extra.insert(k.to_string(), v);
    };
    put(keys::GRANTED, Value::Bool(false));
    put(keys::NONCE, Value::String(req.nonce.clone()));
    for (k, v) in login::pkce_extra(
        req.code_challenge.as_deref(),
        req.code_challenge_method.as_deref(),
    ) {
        put(k, v);
    }
    if let Some(l) = &req.launch {
        put(keys::LAUNCH, Value::String(l.clone()));
    }
    if let Some(ua) = &req.user_agent {
        put(keys::USER_AGENT, Value::String(ua.clone()));
    }
    put(keys::REMEMBER, Value::Bool(false));
    put(keys::OFFLINE, Value::Bool(login::wants_offline(&req.scope)));
    // The IdP authenticated the user: no fhirgate MFA for this sign-in (as Medplum); a
    // membership that requires MFA still sets `mfaEnrollRequired` when it is chosen.
    put(keys::MFA_REQUIRED, Value::Bool(false));
    put(keys::MFA_VERIFIED, Value::Bool(false));
    put(keys::MFA_ENROLL_REQUIRED, Value::Bool(false));
    let login = LoginRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_ref,
        client_id: req.client.map(|c| c.id.clone()),
        membership_id: None,
        project_id: project.map(str::to_string),
        scope: req.scope.clone(),
        auth_method: req.auth_method.into(),
        auth_time: now,
        expires_at: now.saturating_add(login::PENDING_LIFETIME),
        revoked: false,
        remote_address: req.remote_address.map(|a| a.to_string()),
        code: None,
        refresh_secret: None,
        extra: Value::Object(extra),
    };
    state.store.insert_login(&login).await?;
    let chosen = match memberships.as_slice() {
        [(id, _)] => Some(id.clone()),
        [(id, _), ..] if req.force_first_membership => Some(id.clone()),
        _ => None,
    };
    match chosen {
        Some(id) => login::choose_profile(state, &login, &id, req.remote_address).await,
        None => Ok(login),
    }
}

// === POST /auth/method ===

/// Medplum's `isExternalAuth`: `{domain, authorizeUrl}` when the domain has an IdP.
async fn external_auth(state: &State, email: &str) -> Result<Option<Value>, ApiError> {
    let domain = email.split('@').nth(1).unwrap_or_default();
    let Some(config) = domain_configuration(state, domain).await? else {
        return Ok(None);
    };
    let Some(idp) = config
        .get("identityProvider")
        .and_then(IdentityProvider::from_value)
    else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("Failed to construct URL for the domain");
    let mut url = url::Url::parse(idp.authorize_url.as_deref().ok_or_else(bad)?).map_err(|_| {
        tracing::error!(domain = %domain, "the authorizeUrl of a DomainConfiguration is not a URL");
        bad()
    })?;
    let redirect_uri = format!("{}auth/external", state.config.base_url);
    set_params(
        &mut url,
        &[
            ("client_id", idp.client_id.as_deref().unwrap_or_default()),
            ("redirect_uri", &redirect_uri),
            ("response_type", "code"),
            ("scope", "openid profile email"),
        ],
    );
    Ok(Some(
        json!({"domain": domain, "authorizeUrl": url.to_string()}),
    ))
}

/// `POST /auth/method {email}`.
pub async fn method(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = login::auth_body(&parts, body).await?;
    let email = login::body_str(&body, "email").unwrap_or_default();
    if !login::valid_email(&email) {
        return Err(ApiError::invalid(
            "email",
            "Valid email address is required",
        ));
    }
    let answer = external_auth(&state, &email)
        .await?
        .unwrap_or_else(|| json!({}));
    Ok(ok_json(&answer))
}

// === GET /auth/external ===

/// The sign-in state the front end sent to the IdP (Medplum's `ExternalAuthState`). Fields
/// that are not strings count as absent; `projectId` keeps "given but not a string" apart.
struct ExternalState {
    domain: Option<String>,
    project_id: Option<Value>,
    client_id: Option<String>,
    scope: Option<String>,
    nonce: Option<String>,
    launch: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    redirect_uri: Option<String>,
}

impl ExternalState {
    fn parse(text: &str) -> Option<ExternalState> {
        let value: Value = serde_json::from_str(text).ok()?;
        let empty = Map::new();
        let obj = match &value {
            Value::Object(m) => m,
            // JSON, but not an object: every field is absent (as destructuring in Medplum).
            Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Array(_) => &empty,
            Value::Null => return None,
        };
        let s = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Some(ExternalState {
            domain: s("domain"),
            project_id: obj.get("projectId").cloned(),
            client_id: s("clientId"),
            scope: s("scope"),
            nonce: s("nonce"),
            launch: s("launch"),
            code_challenge: s("codeChallenge"),
            code_challenge_method: s("codeChallengeMethod"),
            redirect_uri: s("redirectUri"),
        })
    }
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

/// `GET /auth/external?code&state`.
pub async fn external_callback(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let query: Vec<(String, String)> = super::query_pairs(&parts);
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let code = param("code").ok_or_else(|| ApiError::bad_request("Missing code"))?;
    let raw_state = param("state").ok_or_else(|| ApiError::bad_request("Missing state"))?;
    let st =
        ExternalState::parse(raw_state).ok_or_else(|| ApiError::bad_request("Invalid state"))?;

    let snap = state.snapshot();
    let client = match &st.client_id {
        Some(id) => Some(snap.clients.get(id).ok_or_else(ApiError::not_found)?),
        None => None,
    };
    let mut idp = client.and_then(client_idp);
    if idp.is_none()
        && let Some(domain) = &st.domain
    {
        idp = domain_configuration(&state, domain).await?.and_then(|c| {
            c.get("identityProvider")
                .and_then(IdentityProvider::from_value)
        });
    }
    let idp = idp.ok_or_else(|| ApiError::bad_request("Identity provider not found"))?;

    let claims = claims_for_code(&state, &idp, code, st.code_challenge.as_deref()).await?;
    let claim = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (email, external_id) = if idp.use_subject {
        let sub = claim("sub")
            .ok_or_else(|| ApiError::bad_request("External token does not contain subject"))?;
        (None, Some(sub))
    } else {
        let email = claim("email").map(|e| e.to_lowercase()).ok_or_else(|| {
            ApiError::bad_request("External token does not contain email address")
        })?;
        (Some(email), None)
    };
    if let Some(domain) = &st.domain
        && !email
            .as_deref()
            .is_some_and(|e| e.ends_with(&format!("@{domain}")))
    {
        return Err(ApiError::bad_request("Email address does not match domain"));
    }
    let mut project_id = match &st.project_id {
        Some(Value::String(p)) => Some(p.clone()),
        _ => None,
    };
    if let Some(c) = client {
        if st.project_id.is_some() && project_id != c.project_id {
            return Err(ApiError::bad_request("Invalid project"));
        }
        project_id = c.project_id.clone();
    }

    let ip = client_ip(&state, &parts)?;
    let request = ExternalLogin {
        auth_method: "external",
        email,
        external_id,
        project_id,
        client,
        scope: st
            .scope
            .clone()
            .unwrap_or_else(|| DEFAULT_SCOPE.to_string()),
        nonce: st
            .nonce
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        launch: st.launch.clone(),
        code_challenge: st.code_challenge.clone(),
        code_challenge_method: st.code_challenge_method.clone(),
        remote_address: ip,
        user_agent: login::user_agent(&parts.headers),
        force_first_membership: false,
        membership_id: None,
    };
    let mut login = external_login(&state, &request).await?;

    // A Login that still needs a step (MFA enrolment a membership requires) goes to the
    // front end instead.
    if login.membership_id.is_some()
        && login::not_ready(&login).is_none()
        && let (Some(requested), Some(c)) = (&st.redirect_uri, client)
    {
        let target = match_redirect_uri(&authorize::registered_redirect_uris(c), requested)
            .ok_or_else(|| ApiError::bad_request("Invalid redirect URI"))?;
        let mut url =
            url::Url::parse(&target).map_err(|_| ApiError::bad_request("Invalid redirect URI"))?;
        let code = login::issue_code(&state, &mut login).await?;
        set_params(&mut url, &[("login", &login.id), ("code", &code)]);
        return found(url.as_str());
    }

    // The sign-in front end continues with `GET /auth/login/:login` (memberships, MFA, code).
    let page = if login::extra_str(&login, keys::LAUNCH).is_some() {
        "oauth"
    } else {
        "signin"
    };
    let mut url = url::Url::parse(&state.config.base_url)
        .and_then(|b| b.join(page))
        .map_err(|e| ApiError::internal("the sign-in page URL", e))?;
    let nonce = login::extra_str(&login, keys::NONCE)
        .unwrap_or_default()
        .to_string();
    let mut params: Vec<(&str, &str)> = vec![
        ("login", &login.id),
        ("scope", &login.scope),
        ("nonce", &nonce),
    ];
    if let Some(c) = login::extra_str(&login, keys::CODE_CHALLENGE) {
        params.push(("code_challenge", c));
    }
    if let Some(m) = login::extra_str(&login, keys::CODE_CHALLENGE_METHOD) {
        params.push(("code_challenge_method", m));
    }
    set_params(&mut url, &params);
    found(url.as_str())
}

// === token exchange ===

/// What a token exchange was asked for.
struct ExchangeRequest<'a> {
    client_id: Option<&'a str>,
    client_secret: Option<&'a str>,
    subject_token: Option<&'a str>,
    subject_token_type: Option<&'a str>,
    scope: Option<&'a str>,
    nonce: Option<&'a str>,
    membership_id: Option<&'a str>,
}

/// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` at `/oauth2/token`. Errors are
/// OAuth-shaped, except those of the sign-in itself ("User not found", …), which Medplum answers
/// as OperationOutcomes.
pub(crate) async fn token_exchange(state: &State, parts: &Parts, form: &TokenForm) -> Response {
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

fn respond(result: Result<Value, ApiError>) -> Response {
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

/// `POST /auth/exchange {externalAccessToken, clientId}` (legacy form of the token exchange).
pub async fn exchange_legacy(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body): (Parts, Body) = req.into_parts();
    let bytes = super::read_body(body, MAX_BODY).await?;
    let body: Map<String, Value> = match super::media_type(&parts.headers).as_deref() {
        Some("application/json" | "application/fhir+json") => {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => m,
                _ => return Err(ApiError::bad_request("Invalid JSON")),
            }
        }
        Some("application/x-www-form-urlencoded") => form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect(),
        _ if bytes.is_empty() => Map::new(),
        _ => return Err(ApiError::bad_request("Unsupported content type")),
    };
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    if s("externalAccessToken").is_none() {
        return Err(ApiError::invalid(
            "externalAccessToken",
            "Missing externalAccessToken",
        ));
    }
    if s("clientId").is_none() {
        return Err(ApiError::invalid("clientId", "Missing clientId"));
    }
    let req = ExchangeRequest {
        client_id: s("clientId"),
        client_secret: s("clientSecret"),
        subject_token: s("externalAccessToken"),
        subject_token_type: Some(ACCESS_TOKEN_TYPE),
        scope: s("scope"),
        nonce: s("nonce"),
        membership_id: None,
    };
    Ok(respond(exchange(&state, &parts, &req).await))
}

/// Medplum's `exchangeExternalAuthToken`, then the tokens of the new, granted Login.
async fn exchange(
    state: &State,
    parts: &Parts,
    req: &ExchangeRequest<'_>,
) -> Result<Value, ApiError> {
    let client_id = req
        .client_id
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    let subject_token = req
        .subject_token
        .ok_or_else(|| ApiError::oauth("Invalid subject_token"))?;
    if req.subject_token_type != Some(ACCESS_TOKEN_TYPE) {
        return Err(ApiError::oauth("Invalid subject_token_type"));
    }
    let snap = state.snapshot();
    let client = snap
        .clients
        .get(client_id)
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if !client.active {
        return Err(ApiError::oauth("Invalid client"));
    }
    let idp = client_idp(client).ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if let Some(secret) = req.client_secret {
        super::token::check_client_secret(state, client, secret)?;
    }
    let url = idp.user_info_url.as_deref().unwrap_or_default();
    let info = user_info(url, subject_token)
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
        scope: req.scope.unwrap_or(DEFAULT_SCOPE).to_string(),
        nonce: req
            .nonce
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        launch: None,
        code_challenge: None,
        code_challenge_method: None,
        remote_address: ip,
        user_agent: login::user_agent(&parts.headers),
        force_first_membership: true,
        membership_id: req.membership_id.map(str::to_string),
    };
    let login = external_login(state, &request).await?;
    grant(state, client, login).await
}

/// Turns a ready exchange Login into a granted one and signs its tokens.
async fn grant(
    state: &State,
    client: &ClientInfo,
    mut login: LoginRecord,
) -> Result<Value, ApiError> {
    if let Some(why) = login::not_ready(&login) {
        return Err(ApiError::bad_request(why));
    }
    let membership_id = login
        .membership_id
        .clone()
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let snap = state.snapshot();
    let membership = snap
        .memberships
        .get(&membership_id)
        .cloned()
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
    let profile = membership
        .profile
        .reference
        .clone()
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
    let project_id = login
        .project_id
        .clone()
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;

    let now = now_unix();
    let lifetime = access_token_lifetime(state, client);
    let offline = login::flag(&login, keys::OFFLINE);
    let refresh_lifetime = offline.then(|| refresh_token_lifetime(state, Some(client)));
    let refresh_secret = offline.then(|| random_hex(32));
    login.expires_at = granted_until(now, lifetime, refresh_lifetime);
    login.refresh_secret = refresh_secret.as_deref().map(|s| state.hash_secret(s));
    login::set_extra(&mut login, keys::GRANTED, Value::Bool(true));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_params_are_set_like_urlsearchparams() {
        let mut u =
            url::Url::parse("https://idp.example.com/auth?a=1&client_id=x&client_id=y").unwrap();
        set_params(
            &mut u,
            &[("client_id", "c"), ("scope", "openid profile email")],
        );
        assert_eq!(
            u.as_str(),
            "https://idp.example.com/auth?a=1&client_id=c&scope=openid+profile+email"
        );
        let mut u = url::Url::parse("https://idp.example.com").unwrap();
        set_params(&mut u, &[("redirect_uri", "http://gw/auth/external")]);
        assert_eq!(
            u.as_str(),
            "https://idp.example.com/?redirect_uri=http%3A%2F%2Fgw%2Fauth%2Fexternal"
        );
    }

    #[test]
    fn jwt_payloads_are_read_unverified() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"email":"a@b.com"}"#);
        let m = jwt_payload(&format!("h.{payload}.s")).unwrap();
        assert_eq!(m["email"], "a@b.com");
        assert!(jwt_payload("nodots").is_none());
        assert!(jwt_payload("h.!!!.s").is_none());
        let array = URL_SAFE_NO_PAD.encode(b"[1]");
        assert!(jwt_payload(&format!("h.{array}.s")).is_none());
    }

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

    #[test]
    fn states_parse_like_json_parse() {
        assert!(ExternalState::parse("not json").is_none());
        assert!(ExternalState::parse("null").is_none());
        let s = ExternalState::parse("\"just a string\"").unwrap();
        assert!(s.domain.is_none());
        let s = ExternalState::parse(r#"{"domain":"x.com","projectId":7,"clientId":""}"#).unwrap();
        assert_eq!(s.domain.as_deref(), Some("x.com"));
        assert_eq!(s.project_id, Some(json!(7)));
        assert!(s.client_id.is_none());
    }

    #[test]
    fn idp_errors_have_medplums_texts_and_statuses() {
        let e = IdpError::UnsupportedContentType("text/plain".into());
        assert_eq!(
            e.to_string(),
            "Failed to verify code - unsupported content type: text/plain"
        );
        match IdpError::TooManyRequests.into_oauth() {
            ApiError::OAuth {
                status,
                error,
                description,
            } => {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
                assert_eq!(error, "invalid_request");
                assert_eq!(description, "Too Many Requests");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
