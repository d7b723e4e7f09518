//! Self-service registration (docs/medplum-compat.md §2.7–§2.9): `/auth/newuser` creates a User and a
//! Login without a membership, then `/auth/newproject` makes the user the admin of a new
//! Project, or `/auth/newpatient` makes them a Patient of a project that opened registration
//! (`defaultPatientAccessPolicy`). Both answer `{login, code}` through `login::flow`.
//!
//! Stricter than Medplum, on purpose: `/auth/newuser` and `/auth/newproject` are closed unless
//! `register_enabled` is set (a new project's admin has no access policy, and projects share
//! the upstream FHIR server); project-scoped registration also needs the project's
//! `defaultPatientAccessPolicy`. No default ClientApplication is made for a new project: its
//! secret could never be shown to anyone; admins create clients through the admin API.

use crate::state::State;
use crate::store::{BatchWrite, LoginRecord, StoreError, StoredResource, now_unix};
use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::response::Response;
use serde_json::{Value, json};

use crate::control::base::clients::named_client;
use crate::control::base::guards::check_recaptcha;
use crate::control::base::index::index_rows;
use crate::control::base::passwords::OUT_OF_RANGE;
use crate::control::base::passwords::check_password;
use crate::control::base::passwords::hash_password;
use crate::control::base::passwords::with_project;
use crate::control::base::resources::refreshed;
use crate::control::base::upstream::ProfileSpec;
use crate::control::base::upstream::ProjectUpstream;
use crate::control::base::upstream::ensure_profile;
use crate::control::base::upstream::profile_key;
use crate::control::base::upstream::remove_profile;
use crate::control::base::users::email_key;
use crate::control::base::users::read_user;
use crate::control::base::users::valid_email;
use crate::control::login::flow::choose_profile;
use crate::control::login::flow::login_response;
use crate::control::login::flow::registration_login;
use crate::control::login::pkce::check_client_pkce;
use crate::control::login::state::ClientAsk;
use crate::control::login::state::LoginRequest;
use crate::control::login::state::ensure_pending;
use crate::control::login::state::get_login;
use crate::control::login::state::keys;
use crate::control::login::state::mfa_satisfied;
use crate::control::login::state::save_pending;
use crate::control::login::state::set_extra;
use crate::control::web::AppState;
use crate::control::web::ControlState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::body::login_and;
use crate::control::web::body::ok_json;
use crate::control::web::body::origin;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::password_policy::PasswordContext;

fn length_between(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.chars().count())
}

/// `POST /auth/newuser`: 200 `{login}`, no code yet.
pub async fn new_user(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let first_name = body_str(&body, "firstName").unwrap_or_default();
    let last_name = body_str(&body, "lastName").unwrap_or_default();
    let email = body_str(&body, "email")
        .map(|e| e.trim().to_lowercase())
        .unwrap_or_default();
    let password = body_str(&body, "password").unwrap_or_default();
    if !length_between(first_name.trim(), 1, 128) {
        return Err(ApiError::invalid(
            "firstName",
            "First name must be between 1 and 128 characters",
        ));
    }
    if !length_between(last_name.trim(), 1, 128) {
        return Err(ApiError::invalid(
            "lastName",
            "Last name must be between 1 and 128 characters",
        ));
    }
    if !length_between(&email, 3, 72) || !valid_email(&email) {
        return Err(ApiError::invalid(
            "email",
            "Valid email address between 3 and 72 characters is required",
        ));
    }
    // Bytes, not characters: Medplum's bcrypt limit, kept as the rule.
    if !(8..=72).contains(&password.len()) {
        return Err(ApiError::invalid("password", OUT_OF_RANGE));
    }
    if !state.config.register_enabled {
        return Err(ApiError::bad_request("Registration is disabled"));
    }
    let remote_ip = client_ip(&state, &parts)?.map(|ip| ip.to_string());
    check_recaptcha(&state, &body, remote_ip.as_deref()).await?;
    let snap = state.snapshot();
    let client = named_client(&state, body_str(&body, "clientId")).await?;
    let mut project_id = body_str(&body, "projectId").filter(|p| p != "new");
    if let Some(c) = &client {
        if project_id.is_some() && project_id != c.project_id {
            return Err(ApiError::bad_request("Client and project do not match"));
        }
        if !c.active {
            return Err(ApiError::bad_request("Invalid client"));
        }
        project_id.clone_from(&c.project_id);
    }
    if let Some(p) = &project_id {
        let open = snap
            .projects
            .get(p)
            .is_some_and(|p| p.content.get("defaultPatientAccessPolicy").is_some());
        if !open {
            return Err(ApiError::bad_request(
                "Project does not allow open registration",
            ));
        }
    }
    let challenge = body_str(&body, "codeChallenge");
    let method = body_str(&body, "codeChallengeMethod");
    check_client_pkce(client.as_deref(), challenge.as_deref(), method.as_deref())?;
    if state
        .store
        .users_by_email(&email, project_id.as_deref())
        .await?
        .into_iter()
        .next()
        .is_some()
    {
        return Err(ApiError::invalid("email", "Email already registered"));
    }
    let owner = PasswordContext::new()
        .email(&email)
        .name(&first_name)
        .name(&last_name);
    let owner = with_project(&state, owner, project_id.as_deref());
    check_password(&state, "password", &password, owner).await?;
    let user_id = uuid::Uuid::new_v4().to_string();
    let mut user = json!({
        "resourceType": "User",
        "id": user_id,
        "firstName": first_name.trim(),
        "lastName": last_name.trim(),
        "email": email,
        "passwordHash": hash_password(&password).await?,
    });
    if let Some(p) = &project_id {
        user["project"] = json!({"reference": format!("Project/{p}")});
    }
    let written = state
        .store
        .write_batch(vec![
            BatchWrite::Claim {
                key: email_key(project_id.as_deref(), &email),
                resource_type: "User".into(),
                id: user_id.clone(),
            },
            BatchWrite::Put {
                index: index_rows(&user),
                content: user,
                project_id: project_id.clone(),
                expected_version: None,
                create_only: true,
            },
        ])
        .await;
    match written {
        Ok(_) => {}
        // Someone registered the same address a moment earlier.
        Err(StoreError::Conflict) => {
            return Err(ApiError::invalid("email", "Email already registered"));
        }
        Err(e) => return Err(e.into()),
    }
    let request = LoginRequest {
        email,
        client_id: client.map(|c| c.id.clone()),
        project_id: Some(project_id.unwrap_or_else(|| "new".into())),
        ask: ClientAsk {
            scope: body_str(&body, "scope"),
            nonce: body_str(&body, "nonce"),
            code_challenge: challenge,
            code_challenge_method: method,
            ..ClientAsk::default()
        },
        remember: matches!(body.get("remember"), Some(Value::Bool(true))),
        origin: origin(&parts.headers),
        remote_address: client_ip(&state, &parts)?,
        user_agent: user_agent(&parts.headers),
        ..Default::default()
    };
    let login = registration_login(&format!("User/{user_id}"), &request);
    state.store.insert_login(&login).await?;
    Ok(ok_json(&json!({"login": login.id})))
}

/// The Login of a registration step: pending, unexpired, a User's, without a membership, and
/// past MFA. Returns it with the User.
async fn pending_registration(
    state: &State,
    login_id: &str,
) -> Result<(LoginRecord, StoredResource), ApiError> {
    let login = get_login(state, login_id).await?;
    ensure_pending(&login)?;
    if login.membership_id.is_some() {
        return Err(ApiError::bad_request("Login already has a membership"));
    }
    if login.expires_at <= now_unix() {
        return Err(ApiError::bad_request("Login expired"));
    }
    if !mfa_satisfied(&login) {
        return Err(ApiError::bad_request("MFA verification required"));
    }
    let user = read_user(state, &login.user_ref)
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    Ok((login, user))
}

fn user_field<'a>(user: &'a StoredResource, key: &str) -> &'a str {
    user.content.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `POST /auth/newproject {login, projectName}`: 200 `{login, code}`.
pub async fn new_project(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let login_id = body_str(&body, "login").filter(|l| uuid::Uuid::parse_str(l).is_ok());
    let login_id = login_id.ok_or_else(|| ApiError::invalid("login", "Login ID is required."))?;
    let name = body_str(&body, "projectName")
        .map(|n| n.trim().to_string())
        .filter(|n| length_between(n, 4, 72))
        .ok_or_else(|| {
            ApiError::invalid(
                "projectName",
                "Project name must be between 4 and 72 characters",
            )
        })?;
    if !state.config.register_enabled {
        return Err(ApiError::bad_request("Registration is disabled"));
    }
    let (mut login, user) = pending_registration(&state, &login_id).await?;
    if user.project_id.is_some() {
        return Err(ApiError::bad_request(
            "Project owner must not belong to another Project",
        ));
    }
    let user_ref = format!("User/{}", user.id);
    let project_id = uuid::Uuid::new_v4().to_string();
    let project = json!({
        "resourceType": "Project",
        "id": project_id,
        "name": name,
        "owner": {"reference": user_ref},
        "strictMode": true,
    });
    // A self-registered project shares the global upstream: its data, the admin's own
    // Practitioner first, carries its marker (docs/contract.md §3).
    let target = ProjectUpstream::new_project(&state, &project_id);
    let project_write = BatchWrite::Put {
        index: index_rows(&project),
        content: project,
        project_id: Some(project_id.clone()),
        expected_version: None,
        create_only: true,
    };
    let joining = Joining {
        target: &target,
        user: &user,
        project_id: &project_id,
        resource_type: "Practitioner",
        grant: ("admin", Value::Bool(true)),
    };
    let membership_id = joining
        .join(&state, Some(project_write), ApiError::from)
        .await?;
    // Medplum sets the membership here without the sign-in checks: the user owns the project.
    login.membership_id = Some(membership_id);
    login.project_id = Some(project_id);
    set_extra(&mut login, keys::PROFILE_SET, Value::Bool(true));
    save_pending(&state, &login).await?;
    login_response(&state, login).await
}

/// A registering user joining a project: their profile there (made upstream unless an earlier
/// attempt made it) and a new membership with it; `grant` is the one field that differs
/// (`admin` for a new project's owner, `accessPolicy` for a patient).
struct Joining<'a> {
    target: &'a ProjectUpstream,
    user: &'a StoredResource,
    project_id: &'a str,
    resource_type: &'static str,
    grant: (&'static str, Value),
}

impl Joining<'_> {
    /// Makes the profile, then writes `first` (if any) and the membership, claimed so that a
    /// user has at most one per project, in one transaction; a failed write removes the profile
    /// it made, and `refused` says why. The new membership's id.
    async fn join(
        self,
        state: &ControlState,
        first: Option<BatchWrite>,
        refused: impl FnOnce(StoreError) -> ApiError,
    ) -> Result<String, ApiError> {
        let email = user_field(self.user, "email");
        let spec = ProfileSpec {
            resource_type: self.resource_type,
            first_name: user_field(self.user, "firstName"),
            last_name: user_field(self.user, "lastName"),
            email: Some(email).filter(|e| !e.is_empty()),
            key: profile_key(self.project_id, email),
        };
        let (profile, created) = ensure_profile(state, self.target, None, &spec).await?;
        let project_id = self.project_id;
        let user_ref = format!("User/{}", self.user.id);
        let membership_id = uuid::Uuid::new_v4().to_string();
        let mut membership = json!({
            "resourceType": "ProjectMembership",
            "id": membership_id,
            "project": {"reference": format!("Project/{project_id}")},
            "user": {"reference": user_ref},
            "profile": {"reference": profile},
        });
        let (key, value) = self.grant;
        membership[key] = value;
        let writes = first
            .into_iter()
            .chain([
                BatchWrite::Claim {
                    key: format!("membership:{project_id}:{user_ref}"),
                    resource_type: "ProjectMembership".into(),
                    id: membership_id.clone(),
                },
                BatchWrite::Put {
                    index: index_rows(&membership),
                    content: membership,
                    project_id: Some(project_id.to_string()),
                    expected_version: None,
                    create_only: true,
                },
            ])
            .collect();
        if let Err(e) = state.store.write_batch(writes).await {
            if created {
                remove_profile(state, self.target, &profile).await;
            }
            return Err(refused(e));
        }
        refreshed(state).await;
        Ok(membership_id)
    }
}

/// `POST /auth/newpatient {login, projectId}`: 200 `{login, code}`.
pub async fn new_patient(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let (login_id, project_id) = login_and(&body, "projectId", "Project ID is required")?;
    let (login, user) = pending_registration(&state, &login_id).await?;
    if user.project_id.as_deref() != Some(project_id.as_str()) {
        return Err(ApiError::bad_request("User must be scoped to the project"));
    }
    let policy = state
        .snapshot()
        .projects
        .get(&project_id)
        .and_then(|p| p.content.get("defaultPatientAccessPolicy").cloned())
        .filter(|p| p.get("reference").and_then(Value::as_str).is_some())
        .ok_or_else(|| ApiError::bad_request("Project does not allow open registration"))?;
    let target = ProjectUpstream::of(&state, &project_id)?;
    let joining = Joining {
        target: &target,
        user: &user,
        project_id: &project_id,
        resource_type: "Patient",
        grant: ("accessPolicy", json!({"reference": policy["reference"]})),
    };
    let refused = |e| match e {
        StoreError::Conflict => ApiError::bad_request("Login already has a membership"),
        other => other.into(),
    };
    let membership_id = joining.join(&state, None, refused).await?;
    let ip = client_ip(&state, &parts)?;
    let login = choose_profile(&state, &login, &membership_id, ip).await?;
    login_response(&state, login).await
}
