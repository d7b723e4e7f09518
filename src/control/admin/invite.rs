//! `POST /admin/projects/:projectId/invite` (docs/medplum-compat.md §8.1, §11): a profile resource in
//! the upstream FHIR server, then a User and a ProjectMembership in fhirgate's store, then the
//! e-mail.
//!
//! Nothing is left half-made:
//! - every check that can refuse (body, policies, an existing membership, a duplicate external
//!   id, a template profile) runs before anything is written;
//! - the profile is created with `If-None-Exist` on an identifier fhirgate sets (project plus
//!   e-mail or external id), so a retry finds the profile of the first attempt instead of making
//!   a second one;
//! - the User, the membership, the unique keys that guard them against a concurrent invite
//!   (e-mail per user scope, one membership per user and project, external id per project) and
//!   the invite link are written in one transaction;
//! - when that transaction fails, the profile is deleted again if this invite created it and no
//!   membership uses it.

use crate::state::ProjectInfo;
use crate::store::{BatchWrite, StoreError, StoredResource};
use crate::tokens::random_hex;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::Response;
use fhirgate_core::policy::model::ProjectMembership;
use serde_json::{Map, Value, json};

use crate::control::base::access::AdminProject;
use crate::control::base::access::Caller;
use crate::control::base::index::index_rows;
use crate::control::base::links::LinkKind;
use crate::control::base::links::new_link;
use crate::control::base::passwords::check_new_password;
use crate::control::base::passwords::check_password;
use crate::control::base::passwords::hash_password;
use crate::control::base::resources::refreshed;
use crate::control::base::resources::validate::check_policy_reference;
use crate::control::base::upstream::ProfileSpec;
use crate::control::base::upstream::ProjectUpstream;
use crate::control::base::upstream::ensure_profile;
use crate::control::base::upstream::profile_key;
use crate::control::base::upstream::remove_profile;
use crate::control::base::upstream::upstream_read;
use crate::control::base::users::email_key;
use crate::control::base::users::find_memberships;
use crate::control::base::users::valid_email;
use crate::control::login::mfa::new_secret;
use crate::control::web::AppState;
use crate::control::web::ControlState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::json_response;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;
use crate::obs::security::SecurityEventKind;
use crate::password_policy::PasswordContext;
use fhirgate_core::fhir::path::is_valid_id;

/// An invite whose commit lost a race with a concurrent one is run once more: the second pass
/// sees what the winner wrote and answers precisely (409, or success with the winner's User).
const ATTEMPTS: usize = 2;

pub const SEND_FAILED: &str = "Could not send email. Make sure you have SMTP set up.";

/// The checked `InviteRequest`.
#[derive(Debug, Clone)]
struct Invite {
    resource_type: &'static str,
    first_name: String,
    last_name: String,
    /// Lower-cased.
    email: Option<String>,
    external_id: Option<String>,
    /// The User belongs to the project (Patient, external id, or `scope: project`).
    project_scoped: bool,
    password: Option<String>,
    send_email: bool,
    /// The membership template: `membership` over the deprecated top-level shortcuts, without
    /// the fields the invite sets itself.
    template: Map<String, Value>,
    upsert: bool,
    force_new_membership: bool,
    mfa_required: bool,
}

impl Invite {
    /// Medplum's validation, first failure first.
    fn parse(body: &Map<String, Value>) -> Result<Invite, ApiError> {
        let resource_type = match body.get("resourceType").and_then(Value::as_str) {
            Some("Patient") => "Patient",
            Some("Practitioner") => "Practitioner",
            Some("RelatedPerson") => "RelatedPerson",
            _ => {
                return Err(ApiError::invalid(
                    "resourceType",
                    "Resource type is required",
                ));
            }
        };
        let first_name = text_field(body, "firstName")
            .ok_or_else(|| ApiError::invalid("firstName", "First name is required"))?;
        let last_name = text_field(body, "lastName")
            .ok_or_else(|| ApiError::invalid("lastName", "Last name is required"))?;
        let email = text_field(body, "email").map(|e| e.to_lowercase());
        let external_id = text_field(body, "externalId");
        match (&email, &external_id) {
            (Some(e), _) if valid_email(e) => {}
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "email",
                    "Valid email address is required",
                ));
            }
            (_, Some(_)) => {}
            _ => {
                return Err(ApiError::invalid(
                    "email",
                    "Either email or externalId is required",
                ));
            }
        }
        let email = email.filter(|e| valid_email(e));
        let scope = match body.get("scope") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "project" || s == "server" => Some(s.as_str()),
            Some(_) => return Err(ApiError::invalid("scope", "Invalid scope")),
        };
        let password = match body.get("password") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => {
                check_new_password("password", p)?;
                Some(p.clone())
            }
            Some(_) => return Err(ApiError::invalid("password", "Invalid password")),
        };
        let mut template = Map::new();
        for key in ["accessPolicy", "access", "admin"] {
            if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
                template.insert(key.to_string(), v.clone());
            }
        }
        match body.get("membership") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => template.extend(m.clone()),
            Some(_) => return Err(ApiError::invalid("membership", "Invalid membership")),
        }
        for key in ["resourceType", "id", "meta", "project", "user"] {
            template.remove(key);
        }
        if let Some(ext) = &external_id {
            template.insert("externalId".into(), Value::String(ext.clone()));
        }
        let mfa_required = bool_field(body, "mfaRequired")?.unwrap_or(false);
        if mfa_required {
            template.insert("mfaRequired".into(), Value::Bool(true));
        }
        Ok(Invite {
            resource_type,
            first_name,
            last_name,
            project_scoped: resource_type == "Patient"
                || external_id.is_some()
                || scope == Some("project"),
            email,
            external_id,
            password,
            send_email: bool_field(body, "sendEmail")?.unwrap_or(true),
            template,
            upsert: bool_field(body, "upsert")?.unwrap_or(false),
            force_new_membership: bool_field(body, "forceNewMembership")?.unwrap_or(false),
            mfa_required,
        })
    }

    /// The identifier value of the profile this invite creates.
    fn profile_key(&self, project: &str) -> String {
        match (&self.email, &self.external_id) {
            (Some(e), _) => profile_key(project, e),
            (None, Some(x)) => format!("{project}/external-id/{x}"),
            (None, None) => project.to_string(),
        }
    }
}

fn bool_field(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "true" => Ok(Some(true)),
        Some(Value::String(s)) if s == "false" => Ok(Some(false)),
        Some(_) => Err(ApiError::invalid(key, format!("Invalid {key}"))),
    }
}

fn text_field(body: &Map<String, Value>, key: &str) -> Option<String> {
    body.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `POST /admin/projects/:projectId/invite`.
pub async fn invite(
    AxState(state): AxState<AppState>,
    AdminProject { caller, project }: AdminProject,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let invite = Invite::parse(&body)?;
    if let Some(password) = &invite.password {
        let mut owner = PasswordContext::new()
            .name(&invite.first_name)
            .name(&invite.last_name)
            .name(&project.name);
        if let Some(email) = &invite.email {
            owner = owner.email(email);
        }
        check_password(&state, "password", password, owner).await?;
    }
    let mut outcome = None;
    for attempt in 1..=ATTEMPTS {
        match run(&state, &caller, &project, &invite).await {
            Err(Failure::Lost) if attempt < ATTEMPTS => continue,
            Err(Failure::Lost) => {
                return Err(ApiError::conflict(
                    "Another change to this user or membership happened at the same time; try again",
                ));
            }
            Err(Failure::Api(e)) => return Err(e),
            Ok(done) => {
                outcome = Some(done);
                break;
            }
        }
    }
    let Some(done) = outcome else {
        return Err(ApiError::internal("invite", "no attempt finished"));
    };
    refreshed(&state).await;
    if let (Some(email), true) = (&invite.email, invite.send_email) {
        let message = welcome_email(&state, &project, email, done.link.as_deref());
        if crate::email::send(&state.config, &message).await.is_err() {
            // Medplum's convention: the invite stands, the caller learns the e-mail failed.
            let body = json!({
                "resourceType": "OperationOutcome",
                "id": "ok",
                "issue": [{"severity": "error", "code": "exception", "details": {"text": SEND_FAILED}}]
            });
            return Ok(json_response(StatusCode::OK, FHIR_JSON, &body));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        FHIR_JSON,
        &done.membership.content,
    ))
}

struct Done {
    membership: StoredResource,
    /// The set-password link of a new User.
    link: Option<String>,
}

enum Failure {
    /// The commit lost a race (a unique key or a version changed): run again.
    Lost,
    Api(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure::Api(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Api(e.into())
    }
}

fn membership_in(m: &StoredResource, field: &str) -> Option<String> {
    m.content
        .get(field)
        .and_then(|r| r.get("reference"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

async fn run(
    state: &ControlState,
    caller: &Caller,
    project: &ProjectInfo,
    invite: &Invite,
) -> Result<Done, Failure> {
    let project_ref = format!("Project/{}", project.id);
    // 1. Checks, before anything is written.
    let template_profile = match invite.template.get("profile") {
        None | Some(Value::Null) => None,
        Some(r) => Some(check_template_profile(state, project, invite, r).await?),
    };
    check_policies(state, project, &invite.template).await?;
    check_template_shape(&invite.template)?;
    let existing_user = match &invite.email {
        Some(email) => state
            .store
            .users_by_email(email, invite.project_scoped.then_some(project.id.as_str()))
            .await?
            .into_iter()
            .next(),
        None => None,
    };
    let existing_membership = match (&existing_user, invite.force_new_membership) {
        (Some(user), false) => {
            let user_ref = format!("User/{}", user.id);
            let filters = [
                ("user", user_ref.as_str()),
                ("project", project_ref.as_str()),
            ];
            find_memberships(state, &filters, Some(&project.id), 2)
                .await?
                .into_iter()
                .next()
        }
        _ => None,
    };
    if let Some(m) = &existing_membership {
        if !invite.upsert {
            return Err(ApiError::conflict("User is already a member of this project").into());
        }
        if let Some(p) = &template_profile
            && membership_in(m, "profile").as_deref() != Some(p.as_str())
        {
            return Err(ApiError::conflict(
                "User is already a member of this project with a different profile",
            )
            .into());
        }
    }
    if let Some(ext) = &invite.external_id {
        let filters = [
            ("project", project_ref.as_str()),
            ("external-id", ext.as_str()),
        ];
        let dupes = find_memberships(state, &filters, Some(&project.id), 2).await?;
        let own = existing_membership.as_ref().map(|m| m.id.as_str());
        if dupes.iter().any(|d| Some(d.id.as_str()) != own) {
            return Err(ApiError::conflict(duplicate_external_id(&project.id, ext)).into());
        }
    }

    // 2. The User.
    let mut writes = Vec::new();
    let mut link = None;
    let user_id = match &existing_user {
        Some(u) => u.id.clone(),
        None => {
            let user = new_user(invite, &project.id).await?;
            let id = user["id"].as_str().unwrap_or_default().to_string();
            if let Some(email) = &invite.email {
                writes.push(BatchWrite::Claim {
                    key: email_key(invite.project_scoped.then_some(project.id.as_str()), email),
                    resource_type: "User".into(),
                    id: id.clone(),
                });
            }
            writes.push(BatchWrite::Put {
                index: index_rows(&user),
                content: user,
                project_id: invite.project_scoped.then(|| project.id.clone()),
                expected_version: None,
                create_only: true,
            });
            let l = new_link(state, LinkKind::Invite, &id, None);
            link = Some(l.url);
            writes.push(BatchWrite::NewSecurityRequest(l.request));
            id
        }
    };
    let user_ref = format!("User/{user_id}");

    // 3. The membership (and, for a new one, its profile upstream).
    let mut created_profile = None;
    let membership = match &existing_membership {
        Some(m) => {
            let mut content = m.content.clone();
            if let Some(obj) = content.as_object_mut() {
                for (k, v) in &invite.template {
                    if k != "profile" {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                obj.insert(
                    "meta".into(),
                    json!({"author": {"reference": caller.profile()}}),
                );
            }
            BatchWrite::Put {
                index: index_rows(&content),
                content,
                project_id: Some(project.id.clone()),
                expected_version: Some(m.version_id.clone()),
                create_only: false,
            }
        }
        None => {
            let profile = match template_profile {
                Some(p) => p,
                None => {
                    let spec = ProfileSpec {
                        resource_type: invite.resource_type,
                        first_name: &invite.first_name,
                        last_name: &invite.last_name,
                        email: invite.email.as_deref(),
                        key: invite.profile_key(&project.id),
                    };
                    let target = ProjectUpstream::of(state, &project.id)?;
                    let (reference, created) = ensure_profile(
                        state,
                        &target,
                        Some((caller.profile(), &project.id)),
                        &spec,
                    )
                    .await?;
                    if created {
                        created_profile = Some(reference.clone());
                    }
                    reference
                }
            };
            let id = uuid::Uuid::new_v4().to_string();
            let mut content = Value::Object(invite.template.clone());
            if let Some(obj) = content.as_object_mut() {
                obj.insert("resourceType".into(), "ProjectMembership".into());
                obj.insert("id".into(), Value::String(id.clone()));
                obj.insert("project".into(), json!({"reference": project_ref}));
                obj.insert("user".into(), json!({"reference": user_ref}));
                obj.insert("profile".into(), json!({"reference": profile}));
                if caller.identity.user_ref.starts_with("User/") {
                    obj.insert(
                        "invitedBy".into(),
                        json!({"reference": caller.identity.user_ref}),
                    );
                }
                obj.insert(
                    "meta".into(),
                    json!({"author": {"reference": caller.profile()}}),
                );
            }
            if !invite.force_new_membership {
                writes.push(BatchWrite::Claim {
                    key: format!("membership:{}:{user_ref}", project.id),
                    resource_type: "ProjectMembership".into(),
                    id: id.clone(),
                });
            }
            BatchWrite::Put {
                index: index_rows(&content),
                content,
                project_id: Some(project.id.clone()),
                expected_version: None,
                create_only: true,
            }
        }
    };
    let membership_id = match &membership {
        BatchWrite::Put { content, .. } => content["id"].as_str().unwrap_or_default().to_string(),
        _ => String::new(),
    };
    if let Some(ext) = &invite.external_id {
        writes.push(BatchWrite::Claim {
            key: format!("external-id:{}:{ext}", project.id),
            resource_type: "ProjectMembership".into(),
            id: membership_id.clone(),
        });
    }
    writes.push(membership);

    // 4. One transaction.
    match state.store.write_batch(writes).await {
        Ok(stored) => {
            let membership = stored
                .into_iter()
                .find(|r| r.resource_type == "ProjectMembership")
                .ok_or_else(|| ApiError::internal("invite", "membership not stored"))?;
            let subject = format!("ProjectMembership/{}", membership.id);
            caller
                .event(SecurityEventKind::Invitation, &subject, &project.id)
                .emit();
            Ok(Done { membership, link })
        }
        Err(e) => {
            if let Some(p) = &created_profile
                && let Ok(target) = ProjectUpstream::of(state, &project.id)
            {
                remove_profile(state, &target, p).await;
            }
            match e {
                StoreError::Conflict | StoreError::VersionConflict => Err(Failure::Lost),
                other => Err(other.into()),
            }
        }
    }
}

fn duplicate_external_id(project: &str, ext: &str) -> String {
    format!("Key (project, external-id)=({project}, {ext}) already exists.")
}

async fn new_user(invite: &Invite, project: &str) -> Result<Value, ApiError> {
    // Without a password the account cannot be signed into until the invite link is used;
    // like Medplum, it still gets a (random, never shown) hash rather than none.
    let password = invite.password.clone().unwrap_or_else(|| random_hex(16));
    let mut user = json!({
        "resourceType": "User",
        "id": uuid::Uuid::new_v4().to_string(),
        "firstName": invite.first_name,
        "lastName": invite.last_name,
        "passwordHash": hash_password(&password).await?,
    });
    if let Some(e) = &invite.email {
        user["email"] = Value::String(e.clone());
    }
    if invite.project_scoped {
        user["project"] = json!({"reference": format!("Project/{project}")});
    }
    if invite.mfa_required {
        user["mfaRequired"] = Value::Bool(true);
        user["mfaSecret"] = Value::String(new_secret());
    }
    Ok(user)
}

/// A `membership.profile` given by the caller: of the invited type, existing upstream, and not
/// the profile of a membership in another project. Returns the reference.
async fn check_template_profile(
    state: &ControlState,
    project: &ProjectInfo,
    invite: &Invite,
    reference: &Value,
) -> Result<String, ApiError> {
    let r = reference
        .get("reference")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (ty, id) = r.split_once('/').unwrap_or(("", ""));
    if ty != invite.resource_type {
        return Err(ApiError::bad_request(
            "Profile resourceType does not match request",
        ));
    }
    let foreign = || ApiError::bad_request("Profile does not belong to project");
    if !is_valid_id(id) {
        return Err(foreign());
    }
    let others = find_memberships(state, &[("profile", r)], None, 100).await?;
    if others
        .iter()
        .any(|m| m.project_id.as_deref() != Some(project.id.as_str()))
    {
        return Err(foreign());
    }
    let target = ProjectUpstream::of(state, &project.id)?;
    match upstream_read(state, &target, ty, id).await? {
        Some(_) => Ok(r.to_string()),
        None => Err(foreign()),
    }
}

/// The template must make a well-formed membership (types of `active`, `admin`, `access`, …).
fn check_template_shape(template: &Map<String, Value>) -> Result<(), ApiError> {
    let mut probe = Value::Object(template.clone());
    if let Some(obj) = probe.as_object_mut() {
        obj.insert("resourceType".into(), "ProjectMembership".into());
        obj.insert("project".into(), json!({"reference": "Project/p"}));
        obj.insert("user".into(), json!({"reference": "User/u"}));
        obj.entry("profile")
            .or_insert_with(|| json!({"reference": "Practitioner/p"}));
    }
    serde_json::from_value::<ProjectMembership>(probe)
        .map(|_| ())
        .map_err(|_| ApiError::invalid("membership", "Invalid membership"))
}

async fn check_policies(
    state: &ControlState,
    project: &ProjectInfo,
    template: &Map<String, Value>,
) -> Result<(), ApiError> {
    if let Some(p) = template.get("accessPolicy").filter(|v| !v.is_null()) {
        check_policy_reference(state, &project.id, p).await?;
    }
    match template.get("access") {
        None | Some(Value::Null) => {}
        Some(Value::Array(entries)) => {
            for entry in entries {
                let policy = entry
                    .get("policy")
                    .ok_or_else(|| ApiError::invalid("access", "Invalid access policy"))?;
                check_policy_reference(state, &project.id, policy).await?;
            }
        }
        Some(_) => return Err(ApiError::invalid("access", "Invalid access")),
    }
    Ok(())
}

fn welcome_email(
    state: &ControlState,
    project: &ProjectInfo,
    to: &str,
    link: Option<&str>,
) -> crate::email::Email {
    match link {
        Some(url) => crate::email::Email {
            to: to.to_string(),
            subject: "Welcome to fhirgate".into(),
            body: format!(
                "You were invited to {}.\n\n\
                 The next step is to set your password. This link works once, for 7 days:\n\n\
                 {url}\n\n\
                 Thank you,\nfhirgate\n",
                project.name
            ),
        },
        None => crate::email::Email {
            to: to.to_string(),
            subject: format!("fhirgate: Welcome to {}", project.name),
            body: format!(
                "You were invited to {}.\n\n\
                 The next time you sign in at {}, you will see {} as an option.\n\n\
                 Thank you,\nfhirgate\n",
                project.name, state.config.base_url, project.name
            ),
        },
    }
}

#[cfg(test)]
mod tests;
