//! Google sign-in (docs/medplum-compat.md §2.11): a Google ID token ("credential") verified
//! against Google's published keys — RS256, the configured issuer, `aud` one of the Google
//! client ids fhirgate accepts, not expired, `email_verified` — then the person signs in as the
//! user with that e-mail, through `login::external` (an identity provider vouched for them, so
//! fhirgate asks no MFA code, as Medplum). Used by `POST /auth/google` (the Medplum SDK's
//! `startGoogleLogin`) and by the sign-in page's "Sign in with Google" button.
//!
//! Which Google client ids are accepted: the server's (`google_client_ids`), or one a Project
//! names in `site[].googleClientId`, which then decides the project.

use crate::store::{BatchWrite, StoreError};
use serde_json::{Value, json};

use crate::control::base::client_auth::jwks_for;
use crate::control::base::index::index_rows;
use crate::control::base::users::email_key;
use crate::control::web::ControlState;
use crate::control::web::error::ApiError;

/// What fhirgate takes from a verified Google ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoogleIdentity {
    /// Lower-cased.
    pub email: String,
    pub given_name: String,
    pub family_name: String,
}

/// Google's keys are refetched when a token names a key id they lack, at most this often.
const REFETCH_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Verifies a Google credential issued to `google_client_id`. Every failure is Medplum's 400
/// "Verification failed" (the reason is logged at debug level, never sent).
pub(crate) async fn verify_google_credential(
    state: &ControlState,
    google_client_id: &str,
    credential: &str,
) -> Result<GoogleIdentity, ApiError> {
    let failed = |why: &str| {
        tracing::debug!(reason = why, "a Google credential was refused");
        ApiError::bad_request("Verification failed")
    };
    let google = &state.config.google;
    let header = jsonwebtoken::decode_header(credential).map_err(|_| failed("not a JWT"))?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(failed("not RS256"));
    }
    let kid = header.kid.ok_or_else(|| failed("no kid"))?;
    let mut keys = jwks_for(state, &google.jwks_url, false)
        .await
        .ok_or_else(|| failed("Google's keys are unavailable"))?;
    if keys.set.find(&kid).is_none() && keys.fetched.elapsed() > REFETCH_AFTER {
        keys = jwks_for(state, &google.jwks_url, true)
            .await
            .ok_or_else(|| failed("Google's keys are unavailable"))?;
    }
    let jwk = keys.set.find(&kid).ok_or_else(|| failed("unknown kid"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|_| failed("unusable key"))?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[google_client_id]);
    let issuers: Vec<&str> = google.issuers.iter().map(String::as_str).collect();
    v.set_issuer(&issuers);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    // Google's clock and ours may differ a little.
    v.leeway = 30;
    let claims = jsonwebtoken::decode::<Value>(credential, &key, &v)
        .map_err(|_| failed("signature or claims"))?
        .claims;
    let verified = match claims.get("email_verified") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let email = text("email").trim().to_lowercase();
    if !verified || email.is_empty() {
        return Err(failed("e-mail not verified"));
    }
    Ok(GoogleIdentity {
        email,
        given_name: text("given_name"),
        family_name: text("family_name"),
    })
}

/// Is `google_client_id` one fhirgate accepts? The server's own (`None`: any project), or the
/// one Project whose `site` names it (`Some(project)`), within `project` when one is asked
/// for. Anything else is Medplum's 400 "Invalid googleClientId".
pub(crate) async fn google_client_project(
    state: &ControlState,
    google_client_id: &str,
    project: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let invalid = || ApiError::bad_request("Invalid googleClientId");
    if state
        .config
        .google
        .client_ids
        .iter()
        .any(|id| id == google_client_id)
    {
        return Ok(None);
    }
    let filter = vec![(
        "google-client-id".to_string(),
        vec![google_client_id.to_string()],
    )];
    let found = state
        .store
        .search("Project", &filter, None, 2)
        .await?
        .into_iter()
        .filter(|p| project.is_none_or(|want| p.id == want))
        .collect::<Vec<_>>();
    match found.as_slice() {
        [one] => Ok(Some(one.id.clone())),
        _ => Err(invalid()),
    }
}

/// A new server-level User from a verified Google identity, with no password (Google vouches
/// for the address; a password can be set later through a reset). When the address was
/// registered a moment earlier by someone else, that User is the one signed in.
pub(crate) async fn create_google_user(
    state: &ControlState,
    person: &GoogleIdentity,
) -> Result<(), ApiError> {
    let user_id = uuid::Uuid::new_v4().to_string();
    let user = json!({
        "resourceType": "User",
        "id": user_id,
        "firstName": person.given_name,
        "lastName": person.family_name,
        "email": person.email,
        "emailVerified": true,
    });
    let written = state
        .store
        .write_batch(vec![
            BatchWrite::Claim {
                key: email_key(None, &person.email),
                resource_type: "User".into(),
                id: user_id.clone(),
            },
            BatchWrite::Put {
                index: index_rows(&user),
                content: user,
                project_id: None,
                expected_version: None,
                create_only: true,
            },
        ])
        .await;
    match written {
        Ok(_) | Err(StoreError::Conflict) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
