//! Password rules and hashing: the length rules and the breached-password check of a new
//! password, argon2id hashing and verification (off the async threads), and setting a User's
//! password.

use crate::state::State;
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::Value;

use crate::control::base::guards::check_not_breached;
use crate::control::base::users::update_user;
use crate::control::web::ControlState;
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;

/// Passwords are at least this many characters long…
pub const MIN_PASSWORD_CHARS: usize = 8;

/// …and at most this many bytes (Medplum's bcrypt limit, kept as the one rule everywhere).
pub const MAX_PASSWORD_BYTES: usize = 72;

pub const TOO_SHORT: &str = "Invalid password, must be at least 8 characters";

pub const OUT_OF_RANGE: &str = "Password must be between 8 and 72 characters";

/// The length rules for a new password. `field` is the expression of the validation error.
pub fn check_new_password(field: &str, password: &str) -> Result<(), ApiError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::invalid(field, TOO_SHORT));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid(field, OUT_OF_RANGE));
    }
    Ok(())
}

/// A new password: the length rules, then the breached-password check (when configured).
pub async fn check_password(
    state: &ControlState,
    field: &str,
    password: &str,
) -> Result<(), ApiError> {
    check_new_password(field, password)?;
    check_not_breached(state, field, password).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_rules_follow_medplum_texts() {
        let text = |r: Result<(), ApiError>| match r {
            Err(ApiError::Invalid { text, expression }) => format!("{expression}: {text}"),
            Err(other) => format!("{other:?}"),
            Ok(()) => "ok".into(),
        };
        assert_eq!(
            text(check_new_password("password", "1234567")),
            format!("password: {TOO_SHORT}")
        );
        assert_eq!(text(check_new_password("password", "12345678")), "ok");
        assert_eq!(text(check_new_password("password", &"x".repeat(72))), "ok");
        assert_eq!(
            text(check_new_password("newPassword", &"x".repeat(73))),
            format!("newPassword: {OUT_OF_RANGE}")
        );
        // 8 characters but 24 bytes is fine; 25 three-byte characters (75 bytes) is not.
        assert_eq!(text(check_new_password("password", &"€".repeat(8))), "ok");
        assert_eq!(
            text(check_new_password("password", &"€".repeat(25))),
            format!("password: {OUT_OF_RANGE}")
        );
    }
}
