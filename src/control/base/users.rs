//! Users: lookups by reference and e-mail, their memberships, the e-mail rule and key, and the
//! one way a User is changed (read fresh, changed, written with a version check, retried).

use crate::state::State;
use crate::store::{BatchWrite, StoreError, StoredResource};
use fhirgate_core::policy::model::ProjectMembership;
use serde_json::{Map, Value};

use crate::control::base::index::index_rows;
use crate::control::web::error::ApiError;
use crate::obs::security::{SecurityEvent, SecurityEventKind};

/// Medplum lists at most this many memberships to choose from.
const MAX_MEMBERSHIPS: i64 = 100;

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

/// Stored memberships with every `(search parameter, value)` of `filters`, in `project` when
/// given; at most `limit`.
pub async fn find_memberships(
    state: &State,
    filters: &[(&str, &str)],
    project: Option<&str>,
    limit: i64,
) -> Result<Vec<StoredResource>, StoreError> {
    let filters: Vec<(String, Vec<String>)> = filters
        .iter()
        .map(|(name, value)| (name.to_string(), vec![value.to_string()]))
        .collect();
    state
        .store
        .search("ProjectMembership", &filters, project, limit)
        .await
}

/// The memberships of a user (`User/<id>`), of `project` when given, whose profile is of
/// `profile_type` when given. Inactive ones are included: choosing one is what fails.
pub async fn memberships_of(
    state: &State,
    user_ref: &str,
    project: Option<&str>,
    profile_type: Option<&str>,
) -> Result<Vec<(String, ProjectMembership)>, ApiError> {
    let rows = find_memberships(
        state,
        &[("user", user_ref)],
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
                .profile_ref()
                .is_some_and(|r| r.starts_with(&format!("{t}/")))
        {
            continue;
        }
        out.push((row.id, m));
    }
    Ok(out)
}

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

/// The unique key of a User's e-mail in its scope (a project, or the server).
pub fn email_key(project: Option<&str>, email: &str) -> String {
    format!("user-email:{}:{email}", project.unwrap_or(""))
}

/// How often a write that lost a race with another writer of the same User is retried.
const WRITE_ATTEMPTS: usize = 3;

fn user_put(user: &StoredResource) -> BatchWrite {
    BatchWrite::Put {
        index: index_rows(&user.content),
        content: user.content.clone(),
        project_id: user.project_id.clone(),
        expected_version: Some(user.version_id.clone()),
        create_only: false,
    }
}

/// Changes a User (read fresh, `change` applied, written with a version check), together with
/// `also` in one transaction; retried when another writer changed the User in between.
pub(crate) async fn update_user(
    state: &State,
    user_id: &str,
    also: impl Fn() -> Vec<BatchWrite>,
    change: impl Fn(&mut Map<String, Value>),
) -> Result<(), ApiError> {
    for _ in 0..WRITE_ATTEMPTS {
        let mut user = state
            .store
            .read("User", user_id)
            .await?
            .ok_or_else(ApiError::not_found)?;
        let password_before = user.content.get("passwordHash").cloned();
        if let Some(obj) = user.content.as_object_mut() {
            change(obj);
        }
        let password_changed = user.content.get("passwordHash") != password_before.as_ref();
        let mut writes = also();
        writes.push(user_put(&user));
        match state.store.write_batch(writes).await {
            Ok(_) => {
                // A new password (changed, reset, set by an admin) ends every session: whoever
                // held the old one is out (docs/contract.md §2).
                if password_changed {
                    let user_ref = format!("User/{user_id}");
                    SecurityEvent::new(SecurityEventKind::PasswordChanged)
                        .subject(&user_ref)
                        .emit();
                    if password_before.is_some() {
                        revoke_sessions_of(state, &user_ref, None).await?;
                    }
                }
                return Ok(());
            }
            Err(StoreError::VersionConflict) => continue,
            // The only unique step of these batches is a link's redemption: another one won.
            Err(StoreError::Conflict) => return Err(ApiError::bad_request("Already used")),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict("User changed; try again"))
}

/// Ends every session of `user_ref` (`User/…`), or only those of one membership: each of
/// their tokens stops on every instance within the revocation budget. Called when credentials
/// change (password, MFA), a User is deleted or a membership removed (docs/contract.md §2).
pub(crate) async fn revoke_sessions_of(
    state: &State,
    user_ref: &str,
    membership_id: Option<&str>,
) -> Result<u64, ApiError> {
    let n = state
        .store
        .revoke_logins_of(user_ref, membership_id)
        .await?;
    state
        .refresh()
        .await
        .map_err(|e| ApiError::internal("refreshing after a revocation", e))?;
    if n > 0 {
        SecurityEvent::new(SecurityEventKind::SessionsEnded)
            .subject(user_ref)
            .emit();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
