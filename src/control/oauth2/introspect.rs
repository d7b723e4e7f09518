//! `POST /oauth2/introspect` (docs/medplum-compat.md §2.17, RFC 7662). Stricter than Medplum:
//! introspection requires client authentication and only answers `active: true` for live tokens
//! of the introspecting client's project; a refresh token whose secret was rotated out is
//! inactive.

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::control::base::client_auth::authenticate_client;
use crate::control::base::client_auth::with_basic_challenge;
use crate::control::login::launch::LaunchContext;
use crate::control::oauth2::live_token;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;
use crate::control::web::form::as_form;

/// `POST /oauth2/introspect` (RFC 7662): `{active: false}` for anything that is not a live
/// token of the calling client's project.
pub async fn introspect(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let Some(token) = body_str(&body, "token") else {
        return Err(ApiError::Text(
            StatusCode::BAD_REQUEST,
            "Token to introspect must be provided",
        ));
    };
    let form = as_form(&body);
    let (_, client_project) = match authenticate_client(&state, &parts, &form, false).await {
        Ok(found) => found,
        Err(e) => {
            let refusal = e.into_oauth().into_response();
            return Ok(with_basic_challenge(&parts.headers, refusal));
        }
    };
    let inactive = || ok_json(&json!({"active": false}));
    let Some((claims, login)) = live_token(&state, &token).await else {
        return Ok(inactive());
    };
    if client_project.is_none() || login.project_id != client_project {
        return Ok(inactive());
    }
    let profile = match login.membership_id.as_deref() {
        Some(m) => state
            .identities
            .membership(m)
            .await?
            .and_then(|m| m.profile_ref().map(str::to_string)),
        None => None,
    };
    let sub = claims.sub.clone().unwrap_or_else(|| {
        login
            .user_ref
            .split_once('/')
            .map(|(_, id)| id.to_string())
            .unwrap_or_default()
    });
    let mut out = json!({
        "active": true,
        "iat": claims.iat,
        "exp": claims.exp,
        "iss": claims.iss,
        "sub": sub,
        // A refreshed token may carry less than its Login was granted.
        "scope": claims.scope.as_deref().unwrap_or(&login.scope),
    });
    if let Some(c) = login.client_id.as_deref().or(claims.client_id.as_deref()) {
        out["client_id"] = Value::String(c.to_string());
    }
    // SMART App Launch 2.2 §2.0.11: the launch context and `fhirUser` of the token.
    let mut context = LaunchContext::of(&login);
    // The patient the token itself carries (a later launch in the session may have moved the
    // Login's own); a Patient's own profile otherwise.
    context.patient = claims.patient.clone().or_else(|| {
        profile
            .as_deref()
            .and_then(|p| p.strip_prefix("Patient/"))
            .map(str::to_string)
    });
    if let Some(p) = context.patient {
        out["patient"] = Value::String(p);
    }
    if let Some(e) = context.encounter {
        out["encounter"] = Value::String(e);
    }
    if !context.fhir_context.is_empty() {
        out["fhirContext"] = Value::Array(context.fhir_context);
    }
    if let Some(p) = profile {
        out["fhirUser"] = Value::String(p);
    }
    Ok(ok_json(&out))
}
