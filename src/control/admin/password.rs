//! `POST /admin/projects/setpassword` and `POST /admin/super/setpassword`.

use axum::extract::State as AxState;
use axum::response::Response;
use serde_json::{Map, Value};

use crate::control::base::access::AdminCaller;
use crate::control::base::access::SuperAdmin;
use crate::control::base::passwords::check_password;
use crate::control::base::passwords::owner_of;
use crate::control::base::passwords::set_user_password;
use crate::control::base::passwords::{MIN_PASSWORD_CHARS, TOO_SHORT};
use crate::control::base::users::find_user;
use crate::control::base::users::valid_email;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::error::ApiError;

/// `POST /admin/projects/setpassword` (project admin): a project-scoped user of the caller's
/// project only.
pub async fn admin_set_password(
    AxState(state): AxState<AppState>,
    AdminCaller(caller): AdminCaller,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let (email, password) = email_and_password(&body)?;
    let user = state
        .store
        .users_by_email(&email, Some(caller.project_id()))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let owner = owner_of(&state, &user, Some(caller.project_id()));
    check_password(&state, "password", &password, owner).await?;
    set_user_password(&state, &user.id, &password).await
}

/// `POST /admin/super/setpassword` (super admin): any user, by e-mail and optional project.
pub async fn super_set_password(
    AxState(state): AxState<AppState>,
    _: SuperAdmin,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let (email, password) = email_and_password(&body)?;
    let project = body_str(&body, "projectId");
    let user = find_user(&state, &email, project.as_deref())
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    let owner = owner_of(&state, &user, project.as_deref());
    check_password(&state, "password", &password, owner).await?;
    set_user_password(&state, &user.id, &password).await
}

/// The body's fields, with the length rules that need no User (Medplum's order: the body is
/// validated before anyone is looked up).
fn email_and_password(body: &Map<String, Value>) -> Result<(String, String), ApiError> {
    let email = body_str(body, "email")
        .map(|e| e.trim().to_lowercase())
        .filter(|e| valid_email(e))
        .ok_or_else(|| ApiError::invalid("email", "Valid email address is required"))?;
    let password = body_str(body, "password").unwrap_or_default();
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::invalid("password", TOO_SHORT));
    }
    Ok((email, password))
}
