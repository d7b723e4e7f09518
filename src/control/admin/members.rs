//! `/admin/projects/:projectId/members/:membershipId`: read, update, delete a membership.

use crate::state::{ProjectInfo, State};
use crate::store::StoredResource;
use axum::extract::{FromRequestParts, Path, State as AxState};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::Value;
use std::collections::HashMap;

use crate::control::base::access::AdminProject;
use crate::control::base::access::Caller;
use crate::control::base::resources::read_by_id;
use crate::control::base::resources::refreshed;
use crate::control::base::resources::update_resource;
use crate::control::base::users::find_memberships;
use crate::control::base::users::revoke_sessions_of;
use crate::control::login::mfa::read_user as mfa_read_user;
use crate::control::login::mfa::remove_methods;
use crate::control::login::mfa::update_user as mfa_update_user;
use crate::control::web::AppState;
use crate::control::web::body::JsonBody;
use crate::control::web::body::json_response;
use crate::control::web::check::Commit;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;
use crate::control::web::error::outcome_response;
use crate::obs::security::SecurityEventKind;

/// The admin caller, the project the call acts on and the membership `membership_id` of it
/// (the members routes): 404 when it does not exist, 403 when it belongs elsewhere.
pub struct AdminMember {
    caller: Caller,
    project: ProjectInfo,
    member: StoredResource,
}

impl FromRequestParts<AppState> for AdminMember {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let AdminProject { caller, project } =
            AdminProject::from_request_parts(parts, state).await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let membership_id = params.get("membership_id").map_or("", String::as_str);
        let member = member_in_project(state, &project, membership_id)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(AdminMember {
            caller,
            project,
            member,
        })
    }
}

/// Reads a membership and checks it belongs to `project`.
async fn member_in_project(
    state: &State,
    project: &ProjectInfo,
    membership_id: &str,
) -> Result<StoredResource, ApiError> {
    let m = read_by_id(state, "ProjectMembership", membership_id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let project_ref = m
        .content
        .get("project")
        .and_then(|p| p.get("reference"))
        .and_then(Value::as_str);
    if project_ref != Some(format!("Project/{}", project.id).as_str()) {
        return Err(ApiError::forbidden());
    }
    Ok(m)
}

/// `GET /admin/projects/:projectId/members/:membershipId`.
pub async fn get_member(AdminMember { member, .. }: AdminMember) -> Response {
    json_response(StatusCode::OK, FHIR_JSON, &member.content)
}

/// `POST /admin/projects/:projectId/members/:membershipId`: the body must be that membership;
/// `project` and `user` stay as they are.
pub async fn update_member(
    AxState(state): AxState<AppState>,
    AdminMember { caller, member, .. }: AdminMember,
    JsonBody(resource): JsonBody,
) -> Result<Response, ApiError> {
    let resource_type = resource.get("resourceType").and_then(Value::as_str);
    let id = resource.get("id").and_then(Value::as_str);
    if resource_type != Some("ProjectMembership") || id != Some(member.id.as_str()) {
        return Err(ApiError::forbidden());
    }
    let (body, _) = update_resource(&state, &caller, &member, resource, None, Commit::Write)
        .await?
        .ok_or_else(|| ApiError::internal("member update", "not written"))?;
    Ok(json_response(StatusCode::OK, FHIR_JSON, &body))
}

/// `DELETE /admin/projects/:projectId/members/:membershipId`.
pub async fn delete_member(
    AxState(state): AxState<AppState>,
    AdminMember {
        caller,
        project,
        member: m,
    }: AdminMember,
) -> Result<Response, ApiError> {
    let owner = project
        .content
        .get("owner")
        .and_then(|o| o.get("reference"))
        .and_then(Value::as_str);
    let user = m
        .content
        .get("user")
        .and_then(|u| u.get("reference"))
        .and_then(Value::as_str);
    if owner.is_some() && owner == user {
        return Err(ApiError::bad_request(
            "Cannot delete the owner of the project",
        ));
    }
    state.store.delete("ProjectMembership", &m.id).await?;
    let subject = format!("ProjectMembership/{}", m.id);
    caller
        .event(SecurityEventKind::ResourceDeleted, &subject, &project.id)
        .versions(Some(&m.version_id), None)
        .emit();
    if let Some(user) = user {
        revoke_sessions_of(&state, user, Some(&m.id)).await?;
        remove_project_user_without_memberships(&state, &project.id, user).await;
    }
    refreshed(&state).await;
    Ok(outcome_response(&Outcome::AllOk))
}

/// A project-scoped User exists only for its project: once its last membership there is gone,
/// it goes too (as in newer Medplum), so no orphan can still sign in or hold the e-mail.
async fn remove_project_user_without_memberships(state: &State, project_id: &str, user_ref: &str) {
    let Some(user_id) = user_ref.strip_prefix("User/") else {
        return;
    };
    let result = async {
        let Some(user) = state.store.read("User", user_id).await? else {
            return Ok(());
        };
        if user.project_id.as_deref() != Some(project_id) {
            return Ok(());
        }
        let left = find_memberships(state, &[("user", user_ref)], None, 1).await?;
        if left.is_empty() {
            state.store.delete("User", user_id).await?;
        }
        Ok::<(), crate::store::StoreError>(())
    };
    if let Err(e) = result.await {
        tracing::error!(error = %e, "could not remove a project-scoped user without memberships");
    }
}

/// `POST /admin/projects/:projectId/members/:membershipId/mfa/reset {method?}` (Medplum's newer
/// admin reset): takes one MFA method (`totp` by default) from the member's User, without a code,
/// for a person who lost their phone or authenticator. Stricter than Medplum: a project admin may
/// reset only a user who belongs to no other project (a User shared with another project is that
/// project's too: only a super admin resets it), and every session of the user ends.
pub async fn reset_mfa(
    AxState(state): AxState<AppState>,
    AdminMember {
        caller,
        project,
        member,
    }: AdminMember,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let method = match body.get("method") {
        None | Some(Value::Null) => "totp".to_string(),
        Some(Value::String(m)) if matches!(m.as_str(), "totp" | "email" | "sms") => m.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "Method must be \"totp\", \"email\" or \"sms\"",
            ));
        }
    };
    let user_ref = member
        .content
        .get("user")
        .and_then(|u| u.get("reference"))
        .and_then(Value::as_str)
        .filter(|r| r.starts_with("User/"))
        .ok_or_else(|| ApiError::bad_request("The membership has no user"))?
        .to_string();
    if !caller.super_admin() {
        // Every membership of the user, whichever project (no project filter).
        let elsewhere = find_memberships(&state, &[("user", user_ref.as_str())], None, 10_000)
            .await?
            .iter()
            .any(|m| m.project_id.as_deref() != Some(project.id.as_str()));
        if elsewhere {
            return Err(ApiError::Outcome(Outcome::Forbidden));
        }
    }
    let user = mfa_read_user(&state, &user_ref)
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    if !user.methods().contains(&method) {
        return Err(ApiError::bad_request(format!(
            "User is not enrolled in MFA method: {method}"
        )));
    }
    mfa_update_user(&state, user.id(), |current, obj| {
        remove_methods(obj, current, Some(method.as_str()));
        Ok(())
    })
    .await?;
    caller
        .event(SecurityEventKind::MfaDisabled, &user_ref, &project.id)
        .emit();
    revoke_sessions_of(&state, &user_ref, None).await?;
    if !user.email().is_empty() {
        let what = match method.as_str() {
            "totp" => "authenticator app (TOTP)",
            "email" => "e-mail",
            _ => "text message (SMS)",
        };
        let message = crate::email::Email {
            to: user.email().to_string(),
            subject: "Your multi-factor authentication has been reset".into(),
            body: format!(
                "Hello,\n\nA project administrator has reset your {what} multi-factor \
                 authentication (MFA). You may need to enrol again the next time you sign in.\n\n\
                 If you did not expect this change, please contact your administrator \
                 immediately.\n\nThank you,\nfhirgate\n"
            ),
        };
        // The reset stands whether or not the notice could be sent.
        let _ = crate::email::send(&state.config, &message).await;
    }
    Ok(outcome_response(&Outcome::AllOk))
}
