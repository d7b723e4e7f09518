//! `GET|POST /oauth2/logout` (medplum-auth.md §7): revokes the caller's Login, so every access
//! and refresh token of it fails on the very next request, on every instance (the revocation
//! is a store write, hence a change-feed event).

use std::sync::Arc;

use axum::extract::{Request, State as AxState};
use axum::response::Response;
use fhirgate_core::fhir::outcome::Outcome;

use super::ApiError;
use super::access::authenticate;
use super::error::outcome_response;
use crate::state::State;

pub async fn logout(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    // Basic auth has no Login to revoke; the call succeeds and changes nothing.
    if let Some(login) = &caller.identity.login_id {
        state.store.revoke_login(login).await?;
        state.refresh().await?;
    }
    Ok(outcome_response(&Outcome::AllOk))
}
