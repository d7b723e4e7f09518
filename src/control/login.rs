//! The Login lifecycle (medplum-auth.md §1.5, §2.2–§2.5): password sign-in creates a Login,
//! a membership is chosen (automatically when there is one), the scope may be narrowed, and
//! once everything is in place an authorization code is issued, which `/oauth2/token` redeems
//! exactly once (`token.rs`).
//!
//! The plain async functions here are the API the other sign-in front ends build on (the
//! `/auth/*` JSON endpoints below, the server-rendered page of `/oauth2/authorize`, MFA):
//! [`password_login`] → [`choose_profile`] / [`set_scope`] → [`login_result`] (which calls
//! [`issue_code`] when the Login is ready). Flow state lives in `LoginRecord.extra` under the
//! keys of the `keys` module.
//!
//! Stricter than Medplum (SPEC §2): a code is issued only when a membership is chosen, the
//! scope is set, the Login is neither revoked nor granted, MFA is verified when the user is
//! enrolled and no enrolment is pending; codes are stored as keyed hashes, expire after
//! [`CODE_LIFETIME`] seconds and are replaced by a fresh one each time a result shows one.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State as AxState};
use axum::http::{HeaderMap, header, request::Parts};
use axum::response::Response;
use fhirgate_core::policy::model::ProjectMembership;
use fhirgate_core::policy::scope::SmartScope;
use serde_json::{Map, Value, json};

use super::{ApiError, client_ip, media_type, ok_json, read_body};
use crate::state::{ClientInfo, State};
use crate::store::{LoginRecord, StoredResource, now_unix};
use crate::tokens::random_hex;

/// An authorization code is good for this many seconds (SPEC §2: at most 10 minutes).
pub const CODE_LIFETIME: i64 = 600;
/// A Login that has issued no token yet may be continued (MFA, profile, scope) this long.
pub const PENDING_LIFETIME: i64 = 3600;
/// The `code` column of a redeemed Login: this prefix and the code's hash, so that a replayed
/// code still finds its Login (and revokes it).
pub const GRANTED_PREFIX: &str = "g:";
/// Largest `/auth/*` request body.
const MAX_AUTH_BODY: usize = 64 * 1024;
/// Medplum lists at most this many memberships to choose from.
const MAX_MEMBERSHIPS: i64 = 100;

/// Keys of `LoginRecord.extra` (shared with the page, MFA and registration modules).
pub mod keys {
    pub const CODE_CHALLENGE: &str = "codeChallenge";
    pub const CODE_CHALLENGE_METHOD: &str = "codeChallengeMethod";
    pub const NONCE: &str = "nonce";
    pub const REDIRECT_URI: &str = "redirectUri";
    pub const LAUNCH: &str = "launch";
    pub const GRANTED: &str = "granted";
    pub const MFA_REQUIRED: &str = "mfaRequired";
    pub const MFA_VERIFIED: &str = "mfaVerified";
    pub const MFA_ENROLL_REQUIRED: &str = "mfaEnrollRequired";
    pub const SCOPE_GRANTED: &str = "scopeGranted";
    pub const PROFILE_SET: &str = "profileSet";
    pub const COOKIE: &str = "cookie";
    pub const REMEMBER: &str = "remember";
    pub const ORIGIN: &str = "origin";
    pub const USER_AGENT: &str = "userAgent";
    /// The profile type the membership must have (`resourceType` of `/auth/login`).
    pub const PROFILE_TYPE: &str = "profileType";
    /// Offline access was asked for (`offline`, `offline_access` or `remember`) and is allowed:
    /// the code exchange then creates a refresh secret.
    pub const OFFLINE: &str = "offline";
    /// Unix seconds after which the current code is refused.
    pub const CODE_EXPIRES_AT: &str = "codeExpiresAt";
}

/// What `/auth/login` (or the sign-in page) received.
#[derive(Debug, Clone, Default)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    pub client_id: Option<String>,
    pub project_id: Option<String>,
    /// Profile type filter (`Patient`, `Practitioner`, …).
    pub resource_type: Option<String>,
    pub scope: Option<String>,
    pub nonce: Option<String>,
    pub launch: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub remember: bool,
    /// Set by `/oauth2/authorize`: the code is then bound to it.
    pub redirect_uri: Option<String>,
    /// The request's `Origin` header.
    pub origin: Option<String>,
    pub remote_address: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl LoginRequest {
    /// The requested scope, `openid` when none was asked for (Medplum's default).
    pub(crate) fn scope_or_openid(&self) -> String {
        self.scope
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "openid".to_string())
    }
}

// === small accessors of the flow state ===

pub fn flag(login: &LoginRecord, key: &str) -> bool {
    login
        .extra
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub fn extra_str<'a>(login: &'a LoginRecord, key: &str) -> Option<&'a str> {
    login
        .extra
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

pub fn set_extra(login: &mut LoginRecord, key: &str, value: Value) {
    if !login.extra.is_object() {
        login.extra = Value::Object(Map::new());
    }
    if let Some(obj) = login.extra.as_object_mut() {
        obj.insert(key.to_string(), value);
    }
}

/// Tokens have been issued from this Login (its code was redeemed, or it is a client
/// credentials Login).
pub fn is_granted(login: &LoginRecord) -> bool {
    flag(login, keys::GRANTED)
        || login
            .code
            .as_deref()
            .is_some_and(|c| c.starts_with(GRANTED_PREFIX))
}

/// The scope words ask for a refresh token.
pub fn wants_offline(scope: &str) -> bool {
    scope
        .split_ascii_whitespace()
        .any(|w| w == "offline" || w == "offline_access")
}

/// MFA is satisfied: not enrolled, or verified on this Login; and no enrolment is pending.
pub fn mfa_satisfied(login: &LoginRecord) -> bool {
    (!flag(login, keys::MFA_REQUIRED) || flag(login, keys::MFA_VERIFIED))
        && (!flag(login, keys::MFA_ENROLL_REQUIRED) || flag(login, keys::MFA_VERIFIED))
}

/// Why no code can be issued yet; `None` when one can.
pub fn not_ready(login: &LoginRecord) -> Option<&'static str> {
    if login.revoked {
        return Some("Login revoked");
    }
    if is_granted(login) {
        return Some("Login granted");
    }
    if login.membership_id.is_none() {
        return Some("Profile not set");
    }
    if login.scope.trim().is_empty() {
        return Some("Scope not set");
    }
    if !mfa_satisfied(login) {
        return Some("MFA verification required");
    }
    None
}

/// The keyed hash under which a code is stored and looked up.
pub fn code_hash(state: &State, code: &str) -> String {
    state.hash_secret(code)
}

// === lookups ===

/// A Login by id: 404 `not-found` when the id is not a UUID or nothing has it.
pub async fn get_login(state: &State, id: &str) -> Result<LoginRecord, ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::not_found());
    }
    state.store.login(id).await?.ok_or_else(ApiError::not_found)
}

/// `revoked` → "Login revoked", `granted` → "Login granted" (the `/auth/profile` and
/// `/auth/scope` checks).
pub fn ensure_pending(login: &LoginRecord) -> Result<(), ApiError> {
    if login.revoked {
        return Err(ApiError::bad_request("Login revoked"));
    }
    if is_granted(login) {
        return Err(ApiError::bad_request("Login granted"));
    }
    Ok(())
}

/// The `User/<id>` a Login belongs to, when it is a user's Login.
pub fn user_id(login: &LoginRecord) -> Option<&str> {
    login.user_ref.strip_prefix("User/")
}

/// The User behind a `User/<id>` reference; `None` for a client's reference or a User that is
/// gone.
pub async fn read_user(state: &State, user_ref: &str) -> Result<Option<StoredResource>, ApiError> {
    match user_ref.strip_prefix("User/") {
        Some(id) => Ok(state.store.read("User", id).await?),
        None => Ok(None),
    }
}

/// Medplum's `getUserByEmail`: a project-scoped user of `project` first (when a real project
/// is named), then a server-scoped one. `email` must be lower-case.
pub async fn find_user(
    state: &State,
    email: &str,
    project: Option<&str>,
) -> Result<Option<StoredResource>, ApiError> {
    if let Some(p) = project.filter(|p| *p != "new")
        && let Some(u) = state
            .store
            .users_by_email(email, Some(p))
            .await?
            .into_iter()
            .next()
    {
        return Ok(Some(u));
    }
    Ok(state
        .store
        .users_by_email(email, None)
        .await?
        .into_iter()
        .next())
}

/// The memberships of a user (`User/<id>`), of `project` when given, whose profile is of
/// `profile_type` when given. Inactive ones are included: choosing one is what fails.
pub async fn memberships_of(
    state: &State,
    user_ref: &str,
    project: Option<&str>,
    profile_type: Option<&str>,
) -> Result<Vec<(String, ProjectMembership)>, ApiError> {
    let rows = state
        .store
        .search(
            "ProjectMembership",
            &[("user".to_string(), vec![user_ref.to_string()])],
            project.filter(|p| *p != "new"),
            MAX_MEMBERSHIPS,
        )
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let Ok(m) = serde_json::from_value::<ProjectMembership>(row.content) else {
            tracing::warn!(id = %row.id, "unreadable membership skipped at sign-in");
            continue;
        };
        if m.user.reference.as_deref() != Some(user_ref) {
            continue;
        }
        if let Some(t) = profile_type
            && !m
                .profile
                .reference
                .as_deref()
                .is_some_and(|r| r.starts_with(&format!("{t}/")))
        {
            continue;
        }
        out.push((row.id, m));
    }
    Ok(out)
}

/// Verifies a password against an argon2 PHC string, off the async threads (argon2 is slow on
/// purpose).
pub async fn verify_password(hash: &str, password: &str) -> Result<bool, ApiError> {
    let hash = hash.to_string();
    let password = password.to_string();
    tokio::task::spawn_blocking(move || {
        use argon2::PasswordVerifier;
        let Ok(parsed) = argon2::PasswordHash::new(&hash) else {
            tracing::error!("a stored password hash is not a PHC string");
            return false;
        };
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
    .await
    .map_err(|e| ApiError::internal("password verification task", e))
}

// === validation ===

/// A pragmatic e-mail check (express-validator's `isEmail` in spirit): one `@`, a non-empty
/// local part, a dotted domain of letters, digits and hyphens, no spaces or controls.
pub fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || local.len() > 64 || domain.len() > 253 || email.len() > 254 {
        return false;
    }
    if local.contains('@')
        || local
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "()<>[]\\,;:\"".contains(c))
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
    {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && !tld.chars().all(|c| c.is_ascii_digit()))
}

/// express-validator's answer (a validation OperationOutcome with a random id), for the first
/// failed field.
fn validation_errors(errors: &[(&str, &str)]) -> ApiError {
    match errors.first() {
        Some((expression, text)) => ApiError::invalid(expression, *text),
        None => ApiError::bad_request("Invalid request"),
    }
}

/// Medplum's PKCE parameter checks of every sign-in that starts a Login (`/auth/login`,
/// `/auth/newuser`, external IdPs), skipped for `pkceOptional` clients.
pub(crate) fn check_client_pkce(
    client: Option<&ClientInfo>,
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<(), ApiError> {
    if client.is_some_and(|c| client_flag(c, "pkceOptional")) {
        return Ok(());
    }
    check_pkce_params(challenge, method)
}

fn check_pkce_params(challenge: Option<&str>, method: Option<&str>) -> Result<(), ApiError> {
    match (challenge, method) {
        (None, Some(_)) => Err(ApiError::invalid(
            "code_challenge",
            "Invalid code challenge",
        )),
        (Some(_), None) => Err(ApiError::invalid(
            "code_challenge_method",
            "Invalid code challenge method",
        )),
        (Some(_), Some(m)) if m != "plain" && m != "S256" => Err(ApiError::invalid(
            "code_challenge_method",
            "Invalid code challenge method",
        )),
        _ => Ok(()),
    }
}

/// A new Login's PKCE state, as its `extra` entries: the challenge and its method, a bare
/// challenge counting as plain.
pub(crate) fn pkce_extra(
    challenge: Option<&str>,
    method: Option<&str>,
) -> impl Iterator<Item = (&'static str, Value)> {
    // pkceOptional clients may send a bare challenge; Medplum then compares it as plain.
    challenge.into_iter().flat_map(move |c| {
        [
            (keys::CODE_CHALLENGE, Value::String(c.to_string())),
            (
                keys::CODE_CHALLENGE_METHOD,
                Value::String(method.unwrap_or("plain").to_string()),
            ),
        ]
    })
}

pub fn client_flag(client: &ClientInfo, key: &str) -> bool {
    client
        .content
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

// === the lifecycle ===

/// `/auth/login` minus the HTTP: validates, checks the password, and returns the new Login,
/// already stored, with its membership chosen when the user has exactly one. Nothing is
/// stored when any check fails.
pub async fn password_login(state: &State, req: &LoginRequest) -> Result<LoginRecord, ApiError> {
    let email = req.email.trim().to_lowercase();
    let mut errors = Vec::new();
    if !valid_email(&email) {
        errors.push(("email", "Valid email address is required"));
    }
    if req.password.chars().count() < 5 {
        errors.push((
            "password",
            "Invalid password, must be at least 5 characters",
        ));
    }
    if !errors.is_empty() {
        return Err(validation_errors(&errors));
    }
    let snap = state.snapshot();
    let client = match req.client_id.as_deref().filter(|c| !c.is_empty()) {
        Some(id) => Some(
            snap.clients
                .get(id)
                .ok_or_else(ApiError::not_found)?
                .clone(),
        ),
        None => None,
    };
    let mut project_id = req.project_id.clone().filter(|p| !p.is_empty());
    if let Some(c) = &client {
        let client_project = c.project_id.clone();
        if project_id.is_some() && project_id != client_project {
            return Err(ApiError::bad_request("Invalid projectId"));
        }
        project_id = client_project;
        if let Some(allowed) = c.content.get("allowedOrigin").and_then(Value::as_array)
            && let Some(origin) = req.origin.as_deref()
            && !allowed.iter().any(|a| a.as_str() == Some(origin))
        {
            return Err(ApiError::bad_request("Invalid origin"));
        }
        if !c.active {
            return Err(ApiError::bad_request("Invalid client"));
        }
    }
    let challenge = req.code_challenge.as_deref().filter(|s| !s.is_empty());
    let method = req
        .code_challenge_method
        .as_deref()
        .filter(|s| !s.is_empty());
    check_client_pkce(client.as_ref(), challenge, method)?;
    let user = find_user(state, &email, project_id.as_deref())
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let Some(hash) = user.content.get("passwordHash").and_then(Value::as_str) else {
        return Err(ApiError::bad_request("Invalid authentication method"));
    };
    if !verify_password(hash, &req.password).await? {
        return Err(ApiError::bad_request("Email or password is invalid"));
    }
    let user_ref = format!("User/{}", user.id);
    let profile_type = req.resource_type.as_deref().filter(|s| !s.is_empty());
    let memberships = memberships_of(state, &user_ref, project_id.as_deref(), profile_type).await?;
    if memberships.is_empty() && project_id.as_deref() != Some("new") {
        return Err(ApiError::bad_request("User not found"));
    }

    let now = now_unix();
    let scope = req.scope_or_openid();
    let mfa_enrolled = user
        .content
        .get("mfaEnrolled")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mfa_wanted = user
        .content
        .get("mfaRequired")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || memberships.iter().any(|(_, m)| {
            m.extra
                .get("mfaRequired")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        });
    let mut extra = Map::new();
    let mut put = |k: &str, v: Value| {
        extra.insert(k.to_string(), v);
    };
    put(keys::GRANTED, Value::Bool(false));
    put(
        keys::NONCE,
        Value::String(
            req.nonce
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        ),
    );
    for (k, v) in pkce_extra(challenge, method) {
        put(k, v);
    }
    if let Some(l) = req.launch.as_deref().filter(|s| !s.is_empty()) {
        put(keys::LAUNCH, Value::String(l.to_string()));
    }
    if let Some(r) = req.redirect_uri.as_deref().filter(|s| !s.is_empty()) {
        put(keys::REDIRECT_URI, Value::String(r.to_string()));
    }
    if let Some(o) = req.origin.as_deref() {
        put(keys::ORIGIN, Value::String(o.to_string()));
    }
    if let Some(ua) = &req.user_agent {
        put(keys::USER_AGENT, Value::String(ua.clone()));
    }
    if let Some(t) = profile_type {
        put(keys::PROFILE_TYPE, Value::String(t.to_string()));
    }
    put(keys::REMEMBER, Value::Bool(req.remember));
    put(
        keys::OFFLINE,
        Value::Bool(req.remember || wants_offline(&scope)),
    );
    put(keys::MFA_REQUIRED, Value::Bool(mfa_enrolled));
    put(keys::MFA_VERIFIED, Value::Bool(false));
    put(
        keys::MFA_ENROLL_REQUIRED,
        Value::Bool(mfa_wanted && !mfa_enrolled),
    );
    let mut login = LoginRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_ref,
        client_id: client.as_ref().map(|c| c.id.clone()),
        membership_id: None,
        project_id,
        scope,
        auth_method: "password".into(),
        auth_time: now,
        expires_at: now.saturating_add(PENDING_LIFETIME),
        revoked: false,
        remote_address: req.remote_address.map(|a| a.to_string()),
        code: None,
        refresh_secret: None,
        extra: Value::Object(extra),
    };
    if let [(id, membership)] = memberships.as_slice() {
        apply_membership(state, &mut login, id, membership, req.remote_address).await?;
    }
    state.store.insert_login(&login).await?;
    Ok(login)
}

/// `setLoginMembership`'s checks after the Login-level ones, then the change in memory.
async fn apply_membership(
    state: &State,
    login: &mut LoginRecord,
    membership_id: &str,
    membership: &ProjectMembership,
    ip: Option<IpAddr>,
) -> Result<(), ApiError> {
    if membership.user.reference.as_deref() != Some(login.user_ref.as_str()) {
        return Err(ApiError::bad_request("Invalid profile"));
    }
    let project_id = membership
        .project
        .type_and_id()
        .map(|(_, id)| id.to_string())
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
    if let Some(p) = login.project_id.as_deref()
        && p != "new"
        && p != project_id
    {
        return Err(ApiError::bad_request("Invalid profile"));
    }
    if !membership.is_active() {
        return Err(ApiError::bad_request("Profile not active"));
    }
    let mut snap = state.snapshot();
    if !snap.memberships.contains_key(membership_id) || !snap.projects.contains_key(&project_id) {
        // Written moments ago, maybe by another instance: catch up once before refusing.
        state
            .refresh_if_changed()
            .await
            .map_err(|e| ApiError::internal("refreshing the snapshot", e))?;
        snap = state.snapshot();
    }
    let project = snap
        .projects
        .get(&project_id)
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
    let google_required = project
        .content
        .get("features")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|v| v.as_str() == Some("google-auth-required")));
    if google_required {
        return Err(ApiError::bad_request("Google authentication is required"));
    }
    let ip = ip.or_else(|| login.remote_address.as_deref().and_then(|a| a.parse().ok()));
    if let Some(ip) = ip {
        let policy = state
            .effective_policy(&snap, membership_id, Some(&login.scope))
            .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
        if !policy.check_ip(ip).is_allowed() {
            return Err(ApiError::bad_request("IP address not allowed"));
        }
    }
    login.membership_id = Some(membership_id.to_string());
    login.project_id = Some(project_id);
    set_extra(login, keys::PROFILE_SET, Value::Bool(true));
    if project.super_admin {
        // Super admins never get refresh tokens (medplum-auth.md §3.4).
        set_extra(login, keys::OFFLINE, Value::Bool(false));
    }
    if membership
        .extra
        .get("mfaRequired")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && !flag(login, keys::MFA_REQUIRED)
    {
        set_extra(login, keys::MFA_ENROLL_REQUIRED, Value::Bool(true));
    }
    Ok(())
}

/// `POST /auth/profile` minus the HTTP: chooses the membership `membership_id` for the Login,
/// with Medplum's checks in Medplum's order, and stores it.
pub async fn choose_profile(
    state: &State,
    login: &LoginRecord,
    membership_id: &str,
    ip: Option<IpAddr>,
) -> Result<LoginRecord, ApiError> {
    ensure_pending(login)?;
    if login.membership_id.is_some() {
        return Err(ApiError::bad_request("Login profile already set"));
    }
    let stored = if super::fhir::valid_id(membership_id) {
        state.store.read("ProjectMembership", membership_id).await?
    } else {
        None
    };
    let stored = stored.ok_or_else(|| ApiError::bad_request("Profile not found"))?;
    let membership: ProjectMembership = serde_json::from_value(stored.content)
        .map_err(|_| ApiError::bad_request("Profile not found"))?;
    let mut updated = login.clone();
    apply_membership(state, &mut updated, membership_id, &membership, ip).await?;
    save_pending(state, &updated).await?;
    Ok(updated)
}

/// `POST /auth/scope` minus the HTTP: every SMART resource scope of `scope` must narrow one
/// of the requested ones (medplum-auth.md §5); then the Login's scope is `scope` verbatim.
pub async fn set_scope(
    state: &State,
    login: &LoginRecord,
    scope: &str,
) -> Result<LoginRecord, ApiError> {
    ensure_pending(login)?;
    if !scope_narrows(&login.scope, scope) {
        return Err(ApiError::bad_request("Invalid scope"));
    }
    let mut updated = login.clone();
    updated.scope = scope.to_string();
    let offline =
        flag(login, keys::OFFLINE) && (flag(login, keys::REMEMBER) || wants_offline(scope));
    set_extra(&mut updated, keys::OFFLINE, Value::Bool(offline));
    set_extra(&mut updated, keys::SCOPE_GRANTED, Value::Bool(true));
    save_pending(state, &updated).await?;
    Ok(updated)
}

/// Is every SMART resource scope of `submitted` a subset of one in `requested`?
pub fn scope_narrows(requested: &str, submitted: &str) -> bool {
    let requested: Vec<SmartScope> = requested
        .split_ascii_whitespace()
        .filter_map(SmartScope::parse)
        .collect();
    submitted
        .split_ascii_whitespace()
        .filter(|w| looks_like_smart(w))
        .all(|w| match SmartScope::parse(w) {
            Some(s) => requested.iter().any(|r| s.is_subset_of(r)),
            // Shaped like a resource scope but malformed: never a narrowing.
            None => false,
        })
}

fn looks_like_smart(word: &str) -> bool {
    ["patient/", "user/", "system/"]
        .iter()
        .any(|p| word.starts_with(p))
}

/// Stores the flow state of a Login that has no tokens yet; a Login revoked in between is
/// refused.
pub async fn save_pending(state: &State, login: &LoginRecord) -> Result<(), ApiError> {
    if state.store.update_login(login).await? {
        Ok(())
    } else {
        Err(ApiError::bad_request("Login revoked"))
    }
}

/// Issues a fresh authorization code for a ready Login (see [`not_ready`]); any previous code
/// of it stops working. The code itself is returned once and only its hash is stored.
pub async fn issue_code(state: &State, login: &mut LoginRecord) -> Result<String, ApiError> {
    if let Some(why) = not_ready(login) {
        return Err(ApiError::bad_request(why));
    }
    let code = random_hex(16);
    let hash = code_hash(state, &code);
    let mut extra = login.extra.clone();
    if let Some(obj) = extra.as_object_mut() {
        obj.insert(
            keys::CODE_EXPIRES_AT.into(),
            Value::from(now_unix().saturating_add(CODE_LIFETIME)),
        );
    }
    if !state
        .store
        .set_login_code(&login.id, login.code.as_deref(), &hash, &extra)
        .await?
    {
        // Revoked, granted or given another code since it was read: look again.
        let fresh = get_login(state, &login.id).await?;
        ensure_pending(&fresh)?;
        return Err(ApiError::conflict("Login changed; try again"));
    }
    login.code = Some(hash);
    login.extra = extra;
    Ok(code)
}

/// Medplum's `sendLoginResult`: what the client does next, as the JSON body of 200.
/// - MFA enrolment pending → `{login, mfaEnrollRequired: true, enrollUri, enrollQrCode}`;
/// - MFA enrolled, not verified → `{login, mfaRequired: true}`;
/// - project `new` → `{login}`;
/// - membership chosen → `{login, code}` (a fresh code);
/// - otherwise → `{login, memberships}`.
pub async fn login_result(state: &State, login: &mut LoginRecord) -> Result<Value, ApiError> {
    let id = login.id.clone();
    if flag(login, keys::MFA_ENROLL_REQUIRED) && !flag(login, keys::MFA_VERIFIED) {
        // Medplum hands out the secret to enrol with right here (creating it if needed).
        let mut out = json!({"login": id, "mfaEnrollRequired": true});
        if let Some(user) = super::mfa::read_user(state, &login.user_ref).await? {
            let user = super::mfa::ensure_secret(state, user).await?;
            if let Some(secret) = user.secret() {
                let (uri, qr) = super::mfa::enroll_details(user.email(), secret)?;
                out["enrollUri"] = Value::String(uri);
                out["enrollQrCode"] = Value::String(qr);
            }
        }
        return Ok(out);
    }
    if flag(login, keys::MFA_REQUIRED) && !flag(login, keys::MFA_VERIFIED) {
        return Ok(json!({"login": id, "mfaRequired": true}));
    }
    if login.project_id.as_deref() == Some("new") && login.membership_id.is_none() {
        return Ok(json!({"login": id}));
    }
    if login.membership_id.is_some() {
        let code = issue_code(state, login).await?;
        return Ok(json!({"login": id, "code": code}));
    }
    let memberships = memberships_of(
        state,
        &login.user_ref,
        login.project_id.as_deref(),
        extra_str(login, keys::PROFILE_TYPE),
    )
    .await?;
    let snap = state.snapshot();
    let list: Vec<Value> = memberships
        .iter()
        .map(|(mid, m)| {
            let mut project = serde_json::to_value(&m.project).unwrap_or(Value::Null);
            if project.get("display").is_none()
                && let Some(p) = m
                    .project
                    .type_and_id()
                    .and_then(|(_, pid)| snap.projects.get(pid))
            {
                project["display"] = Value::String(p.name.clone());
            }
            let mut v = json!({
                "id": mid,
                "project": project,
                "profile": serde_json::to_value(&m.profile).unwrap_or(Value::Null),
            });
            if let Some(i) = m.extra.get("identifier") {
                v["identifier"] = i.clone();
            }
            v
        })
        .collect();
    Ok(json!({"login": id, "memberships": list}))
}

/// [`login_result`] as the 200 JSON answer of the `/auth/*` endpoints.
pub async fn login_response(state: &State, mut login: LoginRecord) -> Result<Response, ApiError> {
    let result = login_result(state, &mut login).await?;
    Ok(ok_json(&result))
}

/// Revokes a Login and makes the gateway see it at once; false when it does not exist.
pub async fn revoke(state: &State, login_id: &str) -> Result<bool, ApiError> {
    let found = state.store.revoke_login(login_id).await?;
    state
        .refresh()
        .await
        .map_err(|e| ApiError::internal("refreshing after a revocation", e))?;
    Ok(found)
}

// === HTTP ===

/// `/auth/*` bodies: JSON, or a form (Medplum parses both on every route). Form values are
/// strings; `true`/`false` become booleans.
pub async fn auth_body(parts: &Parts, body: Body) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(body, MAX_AUTH_BODY).await?;
    match media_type(&parts.headers).as_deref() {
        Some("application/x-www-form-urlencoded") => {
            let mut map = Map::new();
            for (k, v) in form_urlencoded::parse(&bytes) {
                let value = match v.as_ref() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => Value::String(v.into_owned()),
                };
                map.insert(k.into_owned(), value);
            }
            Ok(map)
        }
        Some("application/json" | "application/fhir+json") => {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(ApiError::bad_request("Invalid JSON")),
            }
        }
        // No body at all reads as an empty object, so the field checks answer.
        _ if bytes.is_empty() => Ok(Map::new()),
        _ => Err(ApiError::bad_request("Unsupported content type")),
    }
}

/// A string field; other JSON types count as absent.
pub fn body_str(body: &Map<String, Value>, key: &str) -> Option<String> {
    body.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

fn body_bool(body: &Map<String, Value>, key: &str) -> bool {
    match body.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

/// The request's `Origin` header.
pub fn origin(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub fn user_agent(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(header::USER_AGENT)?.to_str().ok()?;
    Some(ua.chars().take(256).collect())
}

/// `POST /auth/login`.
pub async fn login(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body).await?;
    let ip = client_ip(&state, &parts)?;
    let request = LoginRequest {
        email: body_str(&body, "email").unwrap_or_default(),
        password: body_str(&body, "password").unwrap_or_default(),
        client_id: body_str(&body, "clientId"),
        project_id: body_str(&body, "projectId"),
        resource_type: body_str(&body, "resourceType"),
        scope: body_str(&body, "scope"),
        nonce: body_str(&body, "nonce"),
        launch: body_str(&body, "launch"),
        code_challenge: body_str(&body, "codeChallenge"),
        code_challenge_method: body_str(&body, "codeChallengeMethod"),
        remember: body_bool(&body, "remember"),
        redirect_uri: None,
        origin: origin(&parts.headers),
        remote_address: ip,
        user_agent: user_agent(&parts.headers),
    };
    let login = password_login(&state, &request).await?;
    login_response(&state, login).await
}

/// `GET /auth/login/:login`: the state of a sign-in, for clients that resume it.
pub async fn login_status(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(ApiError::bad_request("Login ID is required"));
    }
    let login = get_login(&state, &id).await?;
    if is_granted(&login) {
        return Err(ApiError::bad_request("Login already granted"));
    }
    if login.revoked {
        return Err(ApiError::bad_request("Login revoked"));
    }
    login_response(&state, login).await
}

/// The `login` of a step on a pending Login and the one other field the step needs, reported
/// in that order when missing.
pub(crate) fn login_and(
    body: &Map<String, Value>,
    key: &str,
    missing: &str,
) -> Result<(String, String), ApiError> {
    let login_id =
        body_str(body, "login").ok_or_else(|| ApiError::invalid("login", "Missing login"))?;
    let other = body_str(body, key).ok_or_else(|| ApiError::invalid(key, missing))?;
    Ok((login_id, other))
}

/// `POST /auth/profile {login, profile}`.
pub async fn profile(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body).await?;
    let (login_id, profile) = login_and(&body, "profile", "Missing profile")?;
    let ip = client_ip(&state, &parts)?;
    let login = get_login(&state, &login_id).await?;
    let login = choose_profile(&state, &login, &profile, ip).await?;
    login_response(&state, login).await
}

/// `POST /auth/scope {login, scope}`.
pub async fn scope(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body).await?;
    let (login_id, scope) = login_and(&body, "scope", "Missing scope")?;
    let login = get_login(&state, &login_id).await?;
    let login = set_scope(&state, &login, &scope).await?;
    login_response(&state, login).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> LoginRecord {
        LoginRecord {
            id: "l".into(),
            user_ref: "User/u".into(),
            client_id: None,
            membership_id: Some("m".into()),
            project_id: Some("p".into()),
            scope: "openid".into(),
            auth_method: "password".into(),
            auth_time: 0,
            expires_at: 0,
            revoked: false,
            remote_address: None,
            code: None,
            refresh_secret: None,
            extra: json!({}),
        }
    }

    #[test]
    fn emails() {
        for ok in [
            "a@example.com",
            "A.B+c@sub.example.org",
            "x@xn--bcher-kva.ch",
        ] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@b.com",
            "a@b",
            "a b@c.com",
            "a@b..com",
            "a@-b.com",
            "a@b.c",
            "a@@b.com",
            "a@b.123",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn readiness_needs_membership_scope_and_mfa() {
        let mut l = login();
        assert_eq!(not_ready(&l), None);
        l.membership_id = None;
        assert_eq!(not_ready(&l), Some("Profile not set"));
        l = login();
        set_extra(&mut l, keys::MFA_REQUIRED, Value::Bool(true));
        assert_eq!(not_ready(&l), Some("MFA verification required"));
        set_extra(&mut l, keys::MFA_VERIFIED, Value::Bool(true));
        assert_eq!(not_ready(&l), None);
        l = login();
        set_extra(&mut l, keys::MFA_ENROLL_REQUIRED, Value::Bool(true));
        assert_eq!(not_ready(&l), Some("MFA verification required"));
        l = login();
        l.code = Some(format!("{GRANTED_PREFIX}abc"));
        assert_eq!(not_ready(&l), Some("Login granted"));
        l = login();
        l.revoked = true;
        assert_eq!(not_ready(&l), Some("Login revoked"));
    }

    #[test]
    fn scope_narrowing_follows_case_44() {
        assert!(!scope_narrows(
            "openid profile",
            "patient/Condition.rs?category=health-concern"
        ));
        assert!(scope_narrows(
            "openid patient/Condition.crs",
            "patient/Condition.read"
        ));
        assert!(scope_narrows(
            "openid patient/Condition.rs",
            "openid patient/Condition.rs?category=health-concern"
        ));
        assert!(!scope_narrows(
            "openid patient/Condition.rs?encounter=123",
            "openid patient/Condition.rs?category=health-concern"
        ));
        assert!(scope_narrows("openid", "openid profile email"));
        assert!(!scope_narrows(
            "openid patient/Patient.rs",
            "patient/Patient.sdurc"
        ));
    }

    #[test]
    fn pkce_parameters() {
        assert!(check_pkce_params(None, None).is_ok());
        assert!(check_pkce_params(Some("x"), Some("S256")).is_ok());
        assert!(check_pkce_params(Some("x"), Some("plain")).is_ok());
        assert!(check_pkce_params(None, Some("S256")).is_err());
        assert!(check_pkce_params(Some("x"), None).is_err());
        assert!(check_pkce_params(Some("x"), Some("S512")).is_err());
    }
}
