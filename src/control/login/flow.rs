//! The Login lifecycle (docs/medplum-compat.md §1.5, §2.2–§2.5): password sign-in creates a Login,
//! a membership is chosen (automatically when there is one), the scope may be narrowed, and
//! once everything is in place an authorization code is issued, which `/oauth2/token` redeems
//! exactly once (`oauth2::token`).
//!
//! The plain async functions here are the API the sign-in front ends build on (the `/auth/*`
//! JSON endpoints of `auth::login`, the server-rendered page of `/oauth2/authorize`, MFA,
//! registration, external IdPs): [`password_login`] → [`choose_profile`] / [`set_scope`] →
//! [`login_result`] (which calls [`issue_code`] when the Login is ready). Flow state lives in
//! `LoginRecord.extra` under the keys of `login::state::keys`.
//!
//! Stricter than Medplum (docs/contract.md §2): a code is issued only when a membership is chosen, the
//! scope is set, the Login is neither revoked nor granted, MFA is verified when the user is
//! enrolled and no enrolment is pending; codes are stored as keyed hashes, expire after
//! [`CODE_LIFETIME`] seconds and are replaced by a fresh one each time a result shows one.

use crate::state::State;
use crate::store::{LoginRecord, now_unix};
use crate::tokens::random_hex;
use axum::response::Response;
use fhirgate_core::policy::model::ProjectMembership;
use fhirgate_core::policy::scope::SmartScope;
use serde_json::{Value, json};
use std::net::IpAddr;

use crate::control::base::passwords::verify_password;
use crate::control::base::resources::read_by_id;
use crate::control::base::users::find_user;
use crate::control::base::users::memberships_of;
use crate::control::base::users::valid_email;
use crate::control::login::mfa::MfaUser;
use crate::control::login::mfa::allowed_methods;
use crate::control::login::mfa::enroll_details;
use crate::control::login::mfa::ensure_secret;
use crate::control::login::mfa::project_requires_mfa;
use crate::control::login::mfa::read_user;
use crate::control::login::mfa::send_preferred_if_due;
use crate::control::login::mfa::usable_methods;
use crate::control::login::otp;
use crate::control::login::otp::Pending;
use crate::control::login::pending::PendingLogin;
use crate::control::login::pkce::check_client_pkce;
use crate::control::login::state::CODE_LIFETIME;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::LoginRequest;
use crate::control::login::state::PENDING_LIFETIME;
use crate::control::login::state::code_hash;
use crate::control::login::state::ensure_pending;
use crate::control::login::state::get_login;
use crate::control::login::state::keys;
use crate::control::login::state::not_ready;
use crate::control::login::state::save_pending;
use crate::control::login::state::set_extra;
use crate::control::login::state::wants_offline;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;
use crate::control::web::error::required;
use crate::obs::security::{SecurityEvent, SecurityEventKind};

/// express-validator's answer (a validation OperationOutcome with a random id), for the first
/// failed field.
fn validation_errors(errors: &[(&str, &str)]) -> ApiError {
    match errors.first() {
        Some((expression, text)) => ApiError::invalid(expression, *text),
        None => ApiError::bad_request("Invalid request"),
    }
}

/// Why a password sign-in failed, as its security event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignInFailure {
    UnknownUser,
    NoPassword,
    WrongPassword,
    NoMembership,
}

impl SignInFailure {
    /// The stable label of the security event.
    fn label(self) -> &'static str {
        match self {
            SignInFailure::UnknownUser => "unknown_user",
            SignInFailure::NoPassword => "no_password",
            SignInFailure::WrongPassword => "wrong_password",
            SignInFailure::NoMembership => "no_membership",
        }
    }
}

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
    let client = match req.client_id.as_deref().filter(|c| !c.is_empty()) {
        Some(id) => Some(required(
            state.identities.client(id).await,
            ApiError::not_found,
        )?),
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
    let challenge = req.ask.code_challenge.as_deref().filter(|s| !s.is_empty());
    let method = req
        .ask
        .code_challenge_method
        .as_deref()
        .filter(|s| !s.is_empty());
    check_client_pkce(client.as_deref(), challenge, method)?;
    let failed = |reason: SignInFailure, user: Option<&str>| {
        let mut event = SecurityEvent::new(SecurityEventKind::SignIn)
            .failed(reason.label())
            .from_ip(req.remote_address);
        if let Some(u) = user {
            event = event.subject(u);
        }
        event.emit();
    };
    let Some(user) = find_user(state, &email, project_id.as_deref()).await? else {
        failed(SignInFailure::UnknownUser, None);
        return Err(ApiError::bad_request("User not found"));
    };
    let user_ref = format!("User/{}", user.id);
    let Some(hash) = user.content.get("passwordHash").and_then(Value::as_str) else {
        failed(SignInFailure::NoPassword, Some(&user_ref));
        return Err(ApiError::bad_request("Invalid authentication method"));
    };
    if !verify_password(hash, &req.password).await? {
        failed(SignInFailure::WrongPassword, Some(&user_ref));
        return Err(ApiError::bad_request("Email or password is invalid"));
    }
    let profile_type = req.resource_type.as_deref().filter(|s| !s.is_empty());
    let memberships = memberships_of(state, &user_ref, project_id.as_deref(), profile_type).await?;
    if memberships.is_empty() && project_id.as_deref() != Some("new") {
        failed(SignInFailure::NoMembership, Some(&user_ref));
        return Err(ApiError::bad_request("User not found"));
    }

    let now = now_unix();
    let scope = req.ask.scope_or_openid();
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
                || m.project
                    .reference
                    .as_deref()
                    .and_then(|r| r.strip_prefix("Project/"))
                    .is_some_and(|p| project_requires_mfa(state, p))
        });
    let mut login = PendingLogin {
        user_ref,
        client_id: client.as_ref().map(|c| c.id.clone()),
        project_id,
        scope: scope.clone(),
        auth_method: "password",
        lifetime: PENDING_LIFETIME,
        remote_address: req.remote_address,
        nonce: req
            .ask
            .nonce
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        code_challenge: challenge,
        code_challenge_method: method,
        launch: req.ask.launch.as_deref().filter(|s| !s.is_empty()),
        redirect_uri: req.ask.redirect_uri.as_deref().filter(|s| !s.is_empty()),
        origin: req.origin.as_deref(),
        user_agent: req.user_agent.as_deref(),
        profile_type,
        remember: req.remember,
        offline: req.remember || wants_offline(&scope),
        mfa_required: mfa_enrolled,
        mfa_enroll_required: mfa_wanted && !mfa_enrolled,
    }
    .build(now);
    if let [(id, membership)] = memberships.as_slice() {
        apply_membership(state, &mut login, id, membership, req.remote_address).await?;
    }
    state.store.insert_login(&login).await?;
    let mut event = SecurityEvent::new(SecurityEventKind::SignIn)
        .subject(&login.user_ref)
        .from_ip(req.remote_address);
    if let Some(project) = &login.project_id {
        event = event.project(project);
    }
    event.emit();
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
        .project_id()
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?
        .to_string();
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
    if !snap.projects.contains_key(&project_id) {
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
            .await?
            .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
        if !policy.check_ip(ip).is_allowed() {
            return Err(ApiError::bad_request("IP address not allowed"));
        }
    }
    login.membership_id = Some(membership_id.to_string());
    login.project_id = Some(project_id);
    set_extra(login, keys::PROFILE_SET, Value::Bool(true));
    if project.super_admin {
        // Super admins never get refresh tokens (docs/medplum-compat.md §3.4).
        set_extra(login, keys::OFFLINE, Value::Bool(false));
    }
    if (membership
        .extra
        .get("mfaRequired")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || login
            .project_id
            .as_deref()
            .is_some_and(|p| project_requires_mfa(state, p)))
        && !LoginFlow::of(login).mfa_required
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
    let stored = read_by_id(state, "ProjectMembership", membership_id)
        .await?
        .ok_or_else(|| ApiError::bad_request("Profile not found"))?;
    let membership: ProjectMembership = serde_json::from_value(stored.content)
        .map_err(|_| ApiError::bad_request("Profile not found"))?;
    let mut updated = login.clone();
    apply_membership(state, &mut updated, membership_id, &membership, ip).await?;
    save_pending(state, &updated).await?;
    Ok(updated)
}

/// `POST /auth/scope` minus the HTTP: every SMART resource scope of `scope` must narrow one
/// of the requested ones (docs/medplum-compat.md §5); then the Login's scope is `scope` verbatim.
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
    let flow = LoginFlow::of(login);
    let offline = flow.offline && (flow.remember || wants_offline(scope));
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
        .filter(|w| is_smart_resource_scope(w))
        .all(|w| match SmartScope::parse(w) {
            Some(s) => requested.iter().any(|r| s.is_subset_of(r)),
            // Shaped like a resource scope but malformed: never a narrowing.
            None => false,
        })
}

/// A word shaped like a SMART resource scope (`patient/…`, `user/…`, `system/…`).
pub fn is_smart_resource_scope(word: &str) -> bool {
    ["patient/", "user/", "system/"]
        .iter()
        .any(|p| word.starts_with(p))
}

/// Issues a fresh authorization code for a ready Login (see [`not_ready`]); any previous code
/// of it stops working. The code itself is returned once and only its hash is stored.
pub async fn issue_code(state: &State, login: &mut LoginRecord) -> Result<String, ApiError> {
    if let Some(why) = not_ready(login) {
        return Err(ApiError::bad_request(why.text()));
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
    let flow = LoginFlow::of(login);
    if flow.mfa_enroll_required && !flow.mfa_verified {
        if let Some(pending) = Pending::of(login) {
            // A method chosen at `login-enroll`: its code was sent; verify it like any other.
            let user = read_user(state, &login.user_ref).await?;
            let methods = [pending.channel.as_str().to_string()];
            return Ok(challenge(
                login,
                user.as_ref(),
                &methods,
                pending.phone.as_deref(),
            ));
        }
        // Medplum hands out the secret to enrol with right here (creating it if needed).
        let mut out = json!({"login": id, "mfaEnrollRequired": true,
            "allowedMfaMethods": allowed_methods(state, login.project_id.as_deref())});
        if let Some(user) = read_user(state, &login.user_ref).await? {
            let user = ensure_secret(state, user).await?;
            if let Some(secret) = user.secret() {
                let (uri, qr) = enroll_details(user.email(), secret)?;
                out["enrollUri"] = Value::String(uri);
                out["enrollQrCode"] = Value::String(qr);
            }
        }
        return Ok(out);
    }
    if flow.mfa_required && !flow.mfa_verified {
        let Some(user) = read_user(state, &login.user_ref).await? else {
            return Ok(json!({"login": id, "mfaRequired": true}));
        };
        let methods = usable_methods(state, login, &user).await?;
        // The preferred method's code goes out on its own, once per sign-in.
        if let Some(updated) = send_preferred_if_due(state, login, &user, &methods).await {
            *login = updated;
        }
        return Ok(challenge(login, Some(&user), &methods, user.phone()));
    }
    if login.project_id.as_deref() == Some("new") && login.membership_id.is_none() {
        return Ok(json!({"login": id}));
    }
    if login.membership_id.is_some() {
        let code = issue_code(state, login).await?;
        return Ok(json!({"login": id, "code": code}));
    }
    let memberships = login_memberships(state, login).await?;
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

/// The memberships a Login may choose from: its user's, in its project (when it names one), of
/// its profile type (when `/auth/login` asked for one).
pub(crate) async fn login_memberships(
    state: &State,
    login: &LoginRecord,
) -> Result<Vec<(String, ProjectMembership)>, ApiError> {
    memberships_of(
        state,
        &login.user_ref,
        login.project_id.as_deref(),
        LoginFlow::of(login).profile_type.as_deref(),
    )
    .await
}

/// `{login, mfaRequired: true, mfaMethods, email}` (Medplum's), and where a code went by SMS, the
/// phone it went to, masked.
fn challenge(
    login: &LoginRecord,
    user: Option<&MfaUser>,
    methods: &[String],
    phone: Option<&str>,
) -> Value {
    let mut out = json!({"login": login.id, "mfaRequired": true, "mfaMethods": methods});
    if let Some(user) = user {
        out["email"] = Value::String(user.email().to_string());
    }
    if let (Some(phone), true) = (phone, methods.iter().any(|m| m == "sms")) {
        out["phone"] = Value::String(otp::mask_phone(phone));
    }
    out
}

/// [`login_result`] as the 200 JSON answer of the `/auth/*` endpoints.
pub async fn login_response(state: &State, mut login: LoginRecord) -> Result<Response, ApiError> {
    let result = login_result(state, &mut login).await?;
    Ok(ok_json(&result))
}

/// A Login made at registration can be continued (newproject, newpatient) this long.
const REGISTRATION_LOGIN_LIFETIME: i64 = PENDING_LIFETIME;

/// The Login of a user who just registered: authenticated by the password they chose, with no
/// membership yet (Medplum's `tryLogin` with `allowNoMembership`). Flow state as `login::state` keeps
/// it.
pub(crate) fn registration_login(user_ref: &str, req: &LoginRequest) -> LoginRecord {
    let scope = req.ask.scope_or_openid();
    PendingLogin {
        user_ref: user_ref.to_string(),
        client_id: req.client_id.clone(),
        project_id: req.project_id.clone(),
        scope: scope.clone(),
        auth_method: "password",
        lifetime: REGISTRATION_LOGIN_LIFETIME,
        remote_address: req.remote_address,
        nonce: req
            .ask
            .nonce
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        code_challenge: req.ask.code_challenge.as_deref(),
        code_challenge_method: req.ask.code_challenge_method.as_deref(),
        launch: None,
        redirect_uri: None,
        origin: req.origin.as_deref(),
        user_agent: req.user_agent.as_deref(),
        profile_type: None,
        remember: req.remember,
        offline: req.remember || wants_offline(&scope),
        mfa_required: false,
        mfa_enroll_required: false,
    }
    .build(now_unix())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
