//! Passwords: the operator's policy (`crate::password_policy`) and the breached-password check
//! of a new password, argon2id hashing and verification (off the async threads), and setting a User's
//! password.

use crate::state::State;
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::Value;

use crate::store::StoredResource;

use crate::password_policy::{PasswordContext, PasswordPolicy};

use crate::control::base::guards::check_not_breached;
use crate::control::base::users::update_user;
use crate::control::web::ControlState;
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;

pub use crate::password_policy::{MIN_CHARS as MIN_PASSWORD_CHARS, OUT_OF_RANGE, TOO_SHORT};

/// Medplum's length rules, checked while a body is validated, before anything is looked up; the
/// operator's policy comes after, in [`check_password`].
pub fn check_new_password(field: &str, password: &str) -> Result<(), ApiError> {
    let medplum = PasswordPolicy {
        min_chars: MIN_PASSWORD_CHARS,
        min_strength: 0,
    };
    medplum
        .check(password, &PasswordContext::new())
        .map_err(|weakness| ApiError::invalid(field, weakness.text()))
}

/// A new password: the operator's policy (length, then strength against its owner's words), then
/// the breached-password check (when configured). `field` is the expression of the validation
/// error.
pub async fn check_password(
    state: &ControlState,
    field: &str,
    password: &str,
    owner: PasswordContext,
) -> Result<(), ApiError> {
    check_policy(state.config.password_policy, field, password, owner).await?;
    check_not_breached(state, field, password).await
}

/// The operator's policy alone, off the async threads (a long password takes zxcvbn
/// milliseconds).
pub async fn check_policy(
    policy: PasswordPolicy,
    field: &str,
    password: &str,
    owner: PasswordContext,
) -> Result<(), ApiError> {
    let candidate = password.to_string();
    let verdict = tokio::task::spawn_blocking(move || policy.check(&candidate, &owner))
        .await
        .map_err(|e| ApiError::internal("password check task", e))?;
    verdict.map_err(|weakness| ApiError::invalid(field, weakness.text()))
}

/// The words a password of `user` must not be built from: the User's name and e-mail address,
/// and the name of the project it is given in (`project_id`, else the User's own project).
pub fn owner_of(state: &State, user: &StoredResource, project_id: Option<&str>) -> PasswordContext {
    let field = |k: &str| {
        user.content
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let owner = PasswordContext::new()
        .email(field("email"))
        .name(field("firstName"))
        .name(field("lastName"));
    with_project(state, owner, project_id.or(user.project_id.as_deref()))
}

/// `owner` and the name of a project, when it names one.
pub fn with_project(
    state: &State,
    owner: PasswordContext,
    project_id: Option<&str>,
) -> PasswordContext {
    let snapshot = state.snapshot();
    match project_id.and_then(|id| snapshot.projects.get(id)) {
        Some(project) => owner.name(&project.name),
        None => owner,
    }
}

/// An argon2id PHC string, computed off the async threads (argon2 is slow on purpose).
pub async fn hash_password(password: &str) -> Result<String, ApiError> {
    let password = password.to_string();
    tokio::task::spawn_blocking(move || hash_password_sync(&password))
        .await
        .map_err(|e| ApiError::internal("password hashing task", e))?
        .map_err(|e| ApiError::internal("password hashing", e))
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

pub(crate) async fn set_user_password(
    state: &State,
    user_id: &str,
    password: &str,
) -> Result<Response, ApiError> {
    let hash = hash_password(password).await?;
    update_user(state, user_id, Vec::new, |u| {
        u.insert("passwordHash".into(), Value::String(hash.clone()));
    })
    .await?;
    Ok(outcome_response(&Outcome::AllOk))
}

/// An argon2id PHC string of `password` (slow on purpose: call it off the async threads).
pub fn hash_password_sync(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;
    use rand::RngCore;
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}
