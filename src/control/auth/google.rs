//! `POST /auth/google` (docs/medplum-compat.md §2.11, the Medplum SDK's `startGoogleLogin`):
//! a Google credential in, the same answer as `/auth/login` out. The verification and the
//! sign-in are `login::google`'s and `login::external`'s.

use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::response::Response;

use crate::control::auth::external::external_auth;
use crate::control::base::clients::named_client;
use crate::control::base::users::find_user;
use crate::control::login::external::ExternalLogin;
use crate::control::login::external::external_login;
use crate::control::login::flow::login_response;
use crate::control::login::google::GoogleIdentity;
use crate::control::login::google::create_google_user;
use crate::control::login::google::google_client_project;
use crate::control::login::google::verify_google_credential;
use crate::control::login::state::ClientAsk;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_bool;
use crate::control::web::body::body_str;
use crate::control::web::body::ok_json;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;

/// `projectId` counts only when it is a UUID or `new` (as Medplum).
fn project_param(value: Option<String>) -> Option<String> {
    value.filter(|p| p == "new" || uuid::Uuid::parse_str(p).is_ok())
}

/// `POST /auth/google`.
pub async fn google(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let google_client_id = body_str(&body, "googleClientId")
        .ok_or_else(|| ApiError::invalid("googleClientId", "Missing googleClientId"))?;
    let credential = body_str(&body, "googleCredential")
        .ok_or_else(|| ApiError::invalid("googleCredential", "Missing googleCredential"))?;
    let mut project_id = project_param(body_str(&body, "projectId"));
    let client = named_client(&state, body_str(&body, "clientId")).await?;
    if let Some(c) = &client {
        project_id.clone_from(&c.project_id);
    }
    let named = project_id.as_deref().filter(|p| *p != "new");
    if let Some(site_project) = google_client_project(&state, &google_client_id, named).await? {
        project_id = Some(site_project);
    }
    let person = verify_google_credential(&state, &google_client_id, &credential).await?;
    // An address whose domain signs in through its own identity provider is sent there.
    if let Some(hint) = external_auth(&state, &person.email).await? {
        return Ok(ok_json(&hint));
    }
    let server_level = project_id.as_deref().is_none_or(|p| p == "new");
    let known = find_user(
        &state,
        &person.email,
        project_id.as_deref().filter(|p| *p != "new"),
    )
    .await?
    .is_some();
    if !known {
        if !body_bool(&body, "createUser") || !server_level {
            return Err(ApiError::bad_request("User not found"));
        }
        if !state.config.register_enabled {
            return Err(ApiError::bad_request("Registration is disabled"));
        }
        create_google_user(&state, &person).await?;
    }
    let GoogleIdentity { email, .. } = person;
    let request = ExternalLogin {
        auth_method: "google",
        email: Some(email),
        external_id: None,
        project_id,
        client: client.as_deref(),
        ask: ClientAsk::of_body(&body),
        remote_address: client_ip(&state, &parts)?,
        user_agent: user_agent(&parts.headers),
        force_first_membership: false,
        membership_id: None,
        bind_redirect_uri: false,
        own_mfa: false,
    };
    let login = external_login(&state, &request).await?;
    login_response(&state, login).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_id_counts_only_as_a_uuid_or_new() {
        let id = "0b4fd6a8-8a3c-4c0e-8d47-6e3b2c8c9f11".to_string();
        assert_eq!(project_param(Some(id.clone())), Some(id));
        assert_eq!(project_param(Some("new".into())), Some("new".into()));
        assert_eq!(project_param(Some("default".into())), None);
        assert_eq!(project_param(None), None);
    }
}
