//! `GET|POST /oauth2/logout` (docs/medplum-compat.md §2.15, §7): revokes the caller's Login, so every
//! access, refresh and ID token of it fails on the very next request, on every instance (the
//! revocation is a store write, hence a change-feed event), and clears the browser session
//! cookie `medplum-<clientId>` of the sign-in page.

use axum::extract::State as AxState;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;

use crate::control::base::access::Caller;
use crate::control::login::state::revoke;
use crate::control::web::AppState;
use crate::control::web::error::ApiError;
use crate::control::web::error::outcome_response;
use crate::obs::security::SecurityEventKind;

pub async fn logout(
    AxState(state): AxState<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    // Basic auth has no Login to revoke; the call succeeds and changes nothing.
    if let Some(login) = &caller.identity.login_id {
        revoke(&state, login).await?;
        let subject = format!("Login/{login}");
        caller
            .event(SecurityEventKind::Logout, &subject, caller.project_id())
            .emit();
    }
    let mut response = outcome_response(&Outcome::AllOk);
    if let Some(client_id) = &caller.identity.client_id {
        let secure = if state.config.base_url.starts_with("https:") {
            "; Secure"
        } else {
            ""
        };
        let clear =
            format!("medplum-{client_id}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}");
        if let Ok(v) = HeaderValue::from_str(&clear) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(response)
}
