//! External identity providers (docs/medplum-compat.md §1.7, §9): the IdP of a client, its userinfo
//! and token endpoints (no redirects, a deadline, bounded bodies), and the sign-in of a user an
//! IdP vouched for, through the Login lifecycle of `flow`.

use crate::state::{ClientInfo, State};
use crate::store::{LoginRecord, StoredResource, now_unix};
use axum::http::{StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::time::Duration;

use crate::control::base::outbound;
use crate::control::base::users::find_user;
use crate::control::base::users::memberships_of;
use crate::control::login::flow::choose_profile;
use crate::control::login::pending::PendingLogin;
use crate::control::login::pkce::check_client_pkce;
use crate::control::login::state::ClientAsk;
use crate::control::login::state::PENDING_LIFETIME;
use crate::control::login::state::wants_offline;
use crate::control::web::ControlState;
use crate::control::web::error::ApiError;
use crate::outbound::Guarded;

const VERIFY_FAILED: &str = "Failed to verify code - check your identity provider configuration";

const INVALID_USER_INFO_URL: &str =
    "Invalid user info URL - check your identity provider configuration";

/// Scope of an external sign-in or exchange that names none (Medplum's default).
pub(crate) const DEFAULT_SCOPE: &str = "openid offline";

/// Calls to an IdP give up after this long.
const IDP_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest IdP answer read (token response, userinfo).
const IDP_MAX_BODY: usize = 256 * 1024;

/// An `IdentityProvider` (docs/medplum-compat.md §1.7), read leniently: a missing field is caught
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
pub(crate) fn client_idp(client: &ClientInfo) -> Option<IdentityProvider> {
    client
        .content
        .get("identityProvider")
        .and_then(IdentityProvider::from_value)
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
    pub(crate) fn into_oauth(self) -> ApiError {
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
pub async fn user_info(
    http: &Guarded,
    url: &str,
    access_token: &str,
) -> Result<Map<String, Value>, IdpError> {
    if !url.starts_with("http:") && !url.starts_with("https:") {
        return Err(IdpError::InvalidUserInfoUrl);
    }
    let resp = http
        .request(reqwest::Method::GET, url)
        .ok_or(IdpError::Failed)?
        .timeout(IDP_TIMEOUT)
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
        let body = outbound::read_bounded(resp, IDP_MAX_BODY)
            .await
            .ok_or(IdpError::Failed)?;
        match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(IdpError::Failed),
        }
    } else if content_type.contains("application/jwt") {
        let body = outbound::read_bounded(resp, IDP_MAX_BODY)
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
pub(crate) async fn claims_for_code(
    state: &ControlState,
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
    let mut request = state
        .guarded
        .request(reqwest::Method::POST, token_url)
        .ok_or_else(failed)?
        .timeout(IDP_TIMEOUT)
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
    let body = outbound::read_bounded(resp, IDP_MAX_BODY)
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

/// Medplum's `tryLogin` for `external` and `exchange` sign-ins.
pub struct ExternalLogin<'a> {
    /// `external` or `exchange`.
    pub auth_method: &'static str,
    pub email: Option<String>,
    pub external_id: Option<String>,
    pub project_id: Option<String>,
    pub client: Option<&'a ClientInfo>,
    /// A missing scope is [`DEFAULT_SCOPE`], a missing nonce a random one.
    pub ask: ClientAsk,
    pub remote_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// Token exchange: take the first membership when there are several.
    pub force_first_membership: bool,
    /// Token exchange: only this membership may be chosen.
    pub membership_id: Option<String>,
    /// The sign-in page: the code is bound to `ask.redirect_uri` (the other paths redirect
    /// through the app's own front end, which redeems the code without it).
    pub bind_redirect_uri: bool,
    /// The user's own second factor is asked for too, as after a password (SAML sign-in: the
    /// ordinary MFA policy). Medplum's external sign-ins ask for none.
    pub own_mfa: bool,
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
/// (through `choose_profile`, with all of its checks). "User not found" when there is no
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
    let ask = &req.ask;
    check_client_pkce(
        req.client,
        ask.code_challenge.as_deref(),
        ask.code_challenge_method.as_deref(),
    )?;
    let project = req.project_id.as_deref().filter(|p| !p.is_empty());
    let user = match (&req.external_id, &req.email) {
        (Some(ext), _) => user_by_external_id(state, ext, project).await?,
        (None, Some(email)) => find_user(state, &email.trim().to_lowercase(), project).await?,
        (None, None) => None,
    }
    .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let user_ref = format!("User/{}", user.id);
    let mut memberships = memberships_of(state, &user_ref, project, None).await?;
    if let Some(only) = &req.membership_id {
        memberships.retain(|(id, _)| id == only);
    }
    if memberships.is_empty() && project != Some("new") {
        return Err(ApiError::bad_request("User not found"));
    }

    let scope = ask.scope.as_deref().unwrap_or(DEFAULT_SCOPE);
    let login = PendingLogin {
        user_ref,
        client_id: req.client.map(|c| c.id.clone()),
        project_id: project.map(str::to_string),
        scope: scope.to_string(),
        auth_method: req.auth_method,
        lifetime: PENDING_LIFETIME,
        remote_address: req.remote_address,
        nonce: ask
            .nonce
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        code_challenge: ask.code_challenge.as_deref(),
        code_challenge_method: ask.code_challenge_method.as_deref(),
        launch: ask.launch.as_deref(),
        redirect_uri: ask
            .redirect_uri
            .as_deref()
            .filter(|_| req.bind_redirect_uri),
        origin: None,
        user_agent: req.user_agent.as_deref(),
        profile_type: None,
        remember: false,
        offline: wants_offline(scope),
        // The IdP authenticated the user: no fhirgate MFA for this sign-in unless asked (as
        // Medplum); a membership that requires MFA still sets `mfaEnrollRequired` when it is
        // chosen.
        mfa_required: req.own_mfa
            && user
                .content
                .get("mfaEnrolled")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        mfa_enroll_required: false,
    }
    .build(now_unix());
    state.store.insert_login(&login).await?;
    let chosen = match memberships.as_slice() {
        [(id, _)] => Some(id.clone()),
        [(id, _), ..] if req.force_first_membership => Some(id.clone()),
        _ => None,
    };
    match chosen {
        Some(id) => choose_profile(state, &login, &id, req.remote_address).await,
        None => Ok(login),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn idp_errors_have_medplums_texts_and_statuses() {
        let e = IdpError::UnsupportedContentType("text/plain".into());
        assert_eq!(
            e.to_string(),
            "Failed to verify code - unsupported content type: text/plain"
        );
        assert_eq!(
            IdpError::TooManyRequests.into_oauth().oauth_parts(),
            Some((
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_request",
                "Too Many Requests".to_string()
            ))
        );
    }
}
