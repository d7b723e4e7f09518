//! `POST /oauth2/token` (docs/medplum-compat.md §2.13, §3): form bodies only, client authentication by
//! body, `Authorization: Basic` (form-urldecoded, RFC 6749 §2.3.1) or a client assertion, and
//! the grants. Every error is `{error, error_description}`, except the plain-text
//! "Unsupported content type".
//!
//! Grants are dispatched by [`Grant`]; each one authenticates the client, creates or loads a
//! Login and hands it to `login::tokens`, which signs the tokens and shapes the response.
//!
//! Stricter than Medplum (docs/contract.md §2): codes expire, are bound to the `redirect_uri` given at
//! `/oauth2/authorize`, and are redeemed by a compare-and-swap (exactly one of two concurrent
//! exchanges wins, the other counts as a replay); a client secret presented with a code or a
//! refresh token is always checked; MFA, membership state and IP rules are checked again at
//! every exchange; codes and refresh secrets are stored as keyed hashes only.

use crate::obs::METRICS;
use crate::obs::security::{SecurityEvent, SecurityEventKind};
use crate::state::{ClientInfo, Snapshot};
use crate::store::{LoginRecord, now_unix};
use crate::tokens::{hashes_equal, random_hex};
use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::policy::model::ProjectMembership;
use fhirgate_core::policy::scope::SmartScope;
use serde_json::{Value, json};
use std::sync::Arc;

use crate::control::base::client_auth::basic_credentials;
use crate::control::base::client_auth::check_client_secret;
use crate::control::base::client_auth::is_public;
use crate::control::base::client_auth::presented_client;
use crate::control::base::client_auth::with_basic_challenge;
use crate::control::base::clients::backend_access_lifetime;
use crate::control::base::clients::client_flag;
use crate::control::base::clients::refresh_token_lifetime;
use crate::control::login::exchange::TOKEN_EXCHANGE_GRANT;
use crate::control::login::exchange::token_exchange;
use crate::control::login::flow::is_smart_resource_scope;
use crate::control::login::flow::scope_narrows;
use crate::control::login::launch::LaunchContext;
use crate::control::login::launch::resolve_context;
use crate::control::login::pkce::PUBLIC_CLIENT_PKCE;
use crate::control::login::pkce::pkce_matches;
use crate::control::login::state::GRANTED_PREFIX;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::code_hash;
use crate::control::login::state::is_granted;
use crate::control::login::state::keys;
use crate::control::login::state::not_ready;
use crate::control::login::state::revoke;
use crate::control::login::tokens::Issue;
use crate::control::login::tokens::granted_until;
use crate::control::login::tokens::id_token_alg;
use crate::control::login::tokens::issue_tokens;
use crate::control::login::tokens::issue_user_tokens;
use crate::control::login::tokens::user_access_lifetime;
use crate::control::web::AppState;
use crate::control::web::ControlState;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::control::web::error::required;
use crate::control::web::form::OAuthForm;
use crate::control::web::form::TokenForm;

/// The grant types of the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    ClientCredentials,
    AuthorizationCode,
    RefreshToken,
    /// RFC 8693, answered by `login::exchange`.
    TokenExchange,
}

impl Grant {
    fn parse(s: &str) -> Option<Grant> {
        match s {
            "client_credentials" => Some(Grant::ClientCredentials),
            "authorization_code" => Some(Grant::AuthorizationCode),
            "refresh_token" => Some(Grant::RefreshToken),
            TOKEN_EXCHANGE_GRANT => Some(Grant::TokenExchange),
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

pub async fn token(
    AxState(state): AxState<AppState>,
    parts: Parts,
    form: Result<OAuthForm, ApiError>,
) -> Response {
    let result = match form {
        Ok(OAuthForm(form)) => handle(&state, &parts, form).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            let e = e.into_oauth();
            let challenge_needed = e.is_invalid_client();
            let response = e.into_response();
            if challenge_needed {
                with_basic_challenge(&parts.headers, response)
            } else {
                response
            }
        }
    }
}

async fn handle(
    state: &ControlState,
    parts: &Parts,
    form: TokenForm,
) -> Result<Response, ApiError> {
    let grant = form
        .get("grant_type")
        .ok_or_else(|| ApiError::oauth("Missing grant_type"))?;
    let grant = Grant::parse(grant).ok_or_else(|| ApiError::oauth("Unsupported grant_type"))?;
    let req = GrantRequest {
        state,
        parts,
        form: &form,
    };
    let result = match grant {
        Grant::ClientCredentials => client_credentials(req).await,
        Grant::AuthorizationCode => authorization_code(req).await,
        Grant::RefreshToken => refresh_token(req).await,
        // Answers its own errors: some are OperationOutcomes, not OAuth errors.
        Grant::TokenExchange => {
            return Ok(token_exchange(state, parts, &form).await);
        }
    };
    let kind = if grant == Grant::RefreshToken {
        SecurityEventKind::TokenRefreshed
    } else {
        SecurityEventKind::TokenIssued
    };
    let ip = client_ip(state, parts).ok().flatten();
    let mut event = SecurityEvent::new(kind).subject(grant.label()).from_ip(ip);
    if let Some(client) = form.get("client_id") {
        event = event.actor(client);
    }
    let body = match result {
        Ok(body) => body,
        Err(e) => {
            event.failed("refused").emit();
            return Err(e);
        }
    };
    let project = body
        .pointer("/project/reference")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("Project/"));
    if let Some(project) = project {
        event = event.project(project);
    }
    event.emit();
    METRICS
        .tokens_issued
        .with_label_values(&[grant.label()])
        .inc();
    Ok(token_response(&body))
}

/// What a grant reads of its token request.
#[derive(Clone, Copy)]
struct GrantRequest<'a> {
    state: &'a ControlState,
    parts: &'a Parts,
    form: &'a TokenForm,
}

fn token_response(body: &Value) -> Response {
    let mut r = (StatusCode::OK, axum::Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

async fn client_credentials(req: GrantRequest<'_>) -> Result<Value, ApiError> {
    let GrantRequest { state, parts, form } = req;
    let presented = presented_client(state, parts, form).await?;
    let client_id = presented
        .id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::invalid_client("Missing client_id"))?;
    let secret = presented.secret.filter(|s| !s.is_empty());
    if secret.is_none() && !presented.assertion_verified {
        return Err(ApiError::invalid_client("Missing client_secret"));
    }
    let snap = state.snapshot();
    let client = required(state.identities.client(&client_id).await, || {
        ApiError::invalid_client("Invalid client")
    })?;
    let client = client.as_ref();
    if !client.active {
        return Err(ApiError::invalid_client("Invalid client"));
    }
    if let Some(secret) = &secret {
        check_client_secret(state, client, secret)?;
    }
    let (membership_id, membership) = state
        .identities
        .client_membership(client)
        .await?
        .ok_or_else(|| ApiError::invalid_client("Invalid client"))?;
    if !membership.is_active() {
        return Err(ApiError::invalid_client("Invalid client"));
    }
    let project_id = membership
        .project_id()
        .ok_or_else(|| ApiError::invalid_client("Invalid client"))?
        .to_string();
    let scope = form.get("scope").unwrap_or("openid").to_string();
    let ip = client_ip(state, parts)?;
    let policy = state
        .effective_policy(&snap, &membership_id, Some(&scope))
        .await?
        .ok_or_else(|| {
            ApiError::oauth("Cannot authenticate: Invalid access policy configuration")
        })?;
    if let Some(ip) = ip
        && !policy.check_ip(ip).is_allowed()
    {
        return Err(ApiError::oauth("IP address not allowed"));
    }
    let lifetime = backend_access_lifetime(state, client, presented.assertion_verified);
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
        extra: json!({"granted": true, "userAgent": user_agent(&parts.headers)}),
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
            context: &LaunchContext::default(),
            id_token_alg: id_token_alg(Some(client), &login.scope),
            now,
        },
    )
}

/// The membership, project and IP checks a grant repeats at exchange time: the Login's
/// membership must still exist and be active, and the caller's address must pass its IP rules.
async fn live_membership(
    state: &ControlState,
    snap: &Snapshot,
    parts: &Parts,
    login: &LoginRecord,
) -> Result<(Arc<ProjectMembership>, bool), ApiError> {
    let membership_id = login
        .membership_id
        .as_deref()
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    let membership = required(state.identities.membership(membership_id).await, || {
        ApiError::oauth("Invalid profile")
    })?;
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
            .await?
            .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
        if !policy.check_ip(ip).is_allowed() {
            return Err(ApiError::oauth("IP address not allowed"));
        }
    }
    Ok((membership, super_admin))
}

/// The profile reference and project id a token of `membership` names.
fn profile_and_project(
    membership: &fhirgate_core::policy::model::ProjectMembership,
) -> Result<(String, String), ApiError> {
    let profile = membership
        .profile_ref()
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?
        .to_string();
    let project_id = membership
        .project_id()
        .ok_or_else(|| ApiError::oauth("Invalid profile"))?;
    Ok((profile, project_id.to_string()))
}

/// The client a Login was started by, which must still exist and be active to redeem it.
async fn login_client(
    state: &ControlState,
    login: &LoginRecord,
) -> Result<Option<Arc<ClientInfo>>, ApiError> {
    let Some(id) = login.client_id.as_deref() else {
        return Ok(None);
    };
    let c = required(state.identities.client(id).await, || {
        ApiError::invalid_client("Invalid client")
    })?;
    if !c.active {
        return Err(ApiError::invalid_client("Invalid client"));
    }
    Ok(Some(c))
}

/// Replay of a redeemed code: revoke the Login (every token of it stops working), then refuse.
async fn replayed(state: &ControlState, login_id: &str) -> ApiError {
    if let Err(e) = revoke(state, login_id).await {
        return e;
    }
    ApiError::oauth_code("invalid_grant", "Token already granted")
}

async fn authorization_code(req: GrantRequest<'_>) -> Result<Value, ApiError> {
    let GrantRequest { state, parts, form } = req;
    let presented = presented_client(state, parts, form).await?;
    let code = form
        .get("code")
        .ok_or_else(|| ApiError::oauth("Missing code"))?;
    let hash = code_hash(state, code);
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
        // RFC 6749 §5.2: a code issued to another client.
        return Err(ApiError::oauth_code("invalid_grant", "Invalid client"));
    }
    if login.membership_id.is_none() {
        return Err(ApiError::oauth("Invalid profile"));
    }
    if is_granted(&login) {
        return Err(replayed(state, &login.id).await);
    }
    if login.revoked {
        return Err(ApiError::oauth_code("invalid_grant", "Token revoked"));
    }
    let now = now_unix();
    let flow = LoginFlow::of(&login);
    let expires = flow.code_expires_at.unwrap_or(0);
    if expires <= now {
        return Err(ApiError::oauth_code("invalid_grant", "Code expired"));
    }
    if let Some(why) = not_ready(&login) {
        return Err(ApiError::oauth_code("invalid_grant", why.text()));
    }
    let snap = state.snapshot();
    let client = login_client(state, &login).await?;
    let client = client.as_deref();
    if let Some(bound) = flow.ask.redirect_uri.as_deref()
        && form.get("redirect_uri") != Some(bound)
    {
        return Err(ApiError::oauth_code(
            "invalid_grant",
            "Invalid redirect URI",
        ));
    }
    let public = client.is_some_and(is_public);
    let pkce_optional = !public && client.is_some_and(|c| client_flag(c, "pkceOptional"));
    let challenge = flow.ask.code_challenge.as_deref();
    let method = flow.ask.code_challenge_method.as_deref().unwrap_or("plain");
    if public && (challenge.is_none() || method != "S256") {
        return Err(ApiError::oauth_code("invalid_grant", PUBLIC_CLIENT_PKCE));
    }
    if !pkce_optional || challenge.is_some() {
        let challenge = challenge.ok_or_else(|| ApiError::oauth("Missing verification context"))?;
        let verifier = form
            .get("code_verifier")
            .ok_or_else(|| ApiError::oauth("Missing code verifier"))?;
        if !pkce_matches(method, challenge, verifier) {
            // RFC 7636 §4.6.
            return Err(ApiError::oauth_code(
                "invalid_grant",
                "Invalid code verifier",
            ));
        }
    }
    if !presented.assertion_verified
        && let Some(secret) = presented.secret.as_deref().filter(|s| !s.is_empty())
    {
        let c = client.ok_or_else(|| ApiError::invalid_client("Invalid client"))?;
        check_client_secret(state, c, secret)?;
    }
    let (membership, super_admin) = live_membership(state, &snap, parts, &login).await?;
    let (profile, project_id) = profile_and_project(&membership)?;
    let context = resolve_context(state, &login, &profile).await?;

    let lifetime = user_access_lifetime(state, client);
    let offline = flow.offline && !super_admin;
    let refresh_lifetime = offline.then(|| refresh_token_lifetime(state, client));
    let refresh_secret = offline.then(|| random_hex(32));
    let mut extra = login.extra.clone();
    if let Some(obj) = extra.as_object_mut() {
        obj.insert(keys::GRANTED.into(), Value::Bool(true));
        obj.remove(keys::CODE_EXPIRES_AT);
        obj.insert(keys::CONTEXT.into(), context.to_value());
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

async fn refresh_token(req: GrantRequest<'_>) -> Result<Value, ApiError> {
    let GrantRequest { state, parts, form } = req;
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
        // Signed by us for this Login, yet not its current secret: an already rotated refresh
        // token, used again. Someone else holds the family (OAuth 2.0 Security BCP 4.14.2):
        // end it, for the thief and the owner alike.
        revoke(state, &login.id).await?;
        let subject = format!("Login/{}", login.id);
        let mut event = SecurityEvent::new(SecurityEventKind::RefreshTokenReused)
            .failed("rotated_token_reused")
            .subject(&subject)
            .actor(&login.user_ref);
        if let Some(project) = &login.project_id {
            event = event.project(project);
        }
        event.emit();
        return Err(ApiError::oauth("Invalid token"));
    }
    let snap = state.snapshot();
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let (id, presented_secret) = basic_credentials(value)?;
        if login.client_id.as_deref() != Some(id.as_str()) {
            return Err(ApiError::oauth_code("invalid_grant", "Incorrect client"));
        }
        let presented_secret = presented_secret
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::invalid_client("Incorrect client secret"))?;
        // Stricter than Medplum, which only checks that a secret is present.
        if let Some(c) = state.identities.client(&id).await?
            && check_client_secret(state, &c, &presented_secret).is_err()
        {
            return Err(ApiError::invalid_client("Incorrect client secret"));
        }
    } else if let (Some(body_id), Some(login_client)) =
        (form.get("client_id"), login.client_id.as_deref())
        && body_id != login_client
    {
        return Err(ApiError::oauth_code("invalid_grant", "Incorrect client"));
    }
    // RFC 6749 §6: a refresh may ask for less than was granted, never for more.
    let narrowed = match form.get("scope").filter(|s| !s.trim().is_empty()) {
        Some(asked) if !within_grant(&login.scope, asked) => {
            return Err(ApiError::oauth_code("invalid_scope", "Invalid scope"));
        }
        Some(asked) => Some(asked.split_ascii_whitespace().collect::<Vec<_>>().join(" ")),
        None => None,
    };
    let client = login_client(state, &login).await?;
    let client = client.as_deref();
    let (membership, _) = live_membership(state, &snap, parts, &login).await?;
    let (profile, project_id) = profile_and_project(&membership)?;
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
        // Used concurrently (another request rotated it first: the same token presented twice
        // is reuse too), or revoked in between. Either way the family ends.
        revoke(state, &login.id).await?;
        return Err(ApiError::oauth("Invalid token"));
    }
    // The Login keeps the whole grant (a later refresh may ask for it again); these tokens
    // carry only what was asked for.
    let mut issued = login;
    if let Some(scope) = narrowed {
        issued.scope = scope;
    }
    issue_user_tokens(
        state,
        &issued,
        &profile,
        &project_id,
        client,
        Some((&new_secret, refresh_lifetime)),
        now,
    )
    .await
}

/// Is `asked` a narrowing of the `granted` scope? Every word must be granted, or narrow one of
/// its SMART resource scopes (`patient/Observation.rs` within `patient/*.rs`). And since a
/// token's resource scopes narrow its policy only together, dropping some must not widen it:
/// a grant with resource scopes keeps at least one, and a `*` scope may not stay behind once a
/// type-specific one it gave way to is dropped (`user/*.cruds user/Patient.r` without
/// `user/Patient.r` would write Patients).
fn within_grant(granted: &str, asked: &str) -> bool {
    let granted_words: Vec<&str> = granted.split_ascii_whitespace().collect();
    let words_ok = asked
        .split_ascii_whitespace()
        .filter(|w| !granted_words.contains(w))
        .all(|w| is_smart_resource_scope(w) && scope_narrows(granted, w));
    if !words_ok {
        return false;
    }
    let resource_scopes = |scope: &str| -> Vec<SmartScope> {
        scope
            .split_ascii_whitespace()
            .filter(|w| is_smart_resource_scope(w))
            .filter_map(SmartScope::parse)
            .collect()
    };
    let granted_scopes = resource_scopes(granted);
    let asked_scopes = resource_scopes(asked);
    if granted_scopes.is_empty() {
        return true;
    }
    if asked_scopes.is_empty() {
        return false;
    }
    if !asked_scopes.iter().any(|s| s.resource_type == "*") {
        return true;
    }
    // A `*` scope stays only with every type-specific scope of the grant beside it.
    let asked_words: Vec<&str> = asked.split_ascii_whitespace().collect();
    granted
        .split_ascii_whitespace()
        .filter(|w| is_smart_resource_scope(w))
        .filter(|w| SmartScope::parse(w).is_some_and(|s| s.resource_type != "*"))
        .all(|w| asked_words.contains(&w))
}

#[cfg(test)]
mod tests {
    use super::within_grant;

    #[test]
    fn a_refresh_scope_may_narrow_never_lift_the_smart_narrowing() {
        let granted = "openid offline_access patient/Observation.rs patient/Patient.r";
        assert!(within_grant(granted, "openid patient/Observation.rs"));
        assert!(within_grant(granted, "patient/Observation.r"));
        assert!(within_grant(granted, granted));
        // Without any resource scope the token would carry the whole policy.
        assert!(!within_grant(granted, "openid"));
        assert!(!within_grant(granted, "offline_access"));
        assert!(!within_grant(granted, "patient/Condition.rs"));
        assert!(!within_grant(granted, "user/Observation.rs"));
        // A `*` scope loses to a type-specific one only while that one is there.
        let mixed = "user/*.cruds user/Patient.r";
        assert!(within_grant(mixed, "user/Patient.r"));
        assert!(within_grant(mixed, "user/Patient.r user/*.cruds"));
        assert!(within_grant(mixed, "user/*.rs user/Patient.r"));
        assert!(!within_grant(mixed, "user/*.cruds"));
        assert!(!within_grant(mixed, "user/*.rs"));
        // A grant without resource scopes narrows nothing, so any of its words may be asked.
        assert!(within_grant("openid offline_access", "openid"));
    }
}
