//! The OAuth2 / OIDC endpoints: token, authorize (with its sign-in page), userinfo, introspect,
//! revoke, logout and discovery.

pub mod authorize;
pub mod discovery;
pub mod introspect;
pub mod logout;
pub mod revoke;
pub mod token;
pub mod userinfo;

use crate::state::State;
use crate::store::LoginRecord;
use crate::tokens::{Claims, hashes_equal};

use crate::control::login::state::is_granted;

/// A verified fhirgate token and its Login, when the token is still good: the Login exists, was
/// granted and is not revoked, and a refresh token's secret is the current one.
async fn live_token(state: &State, token: &str) -> Option<(Claims, LoginRecord)> {
    let claims = state.keyring().verify(token).ok()?;
    let login = state
        .store
        .login(claims.login_id.as_deref()?)
        .await
        .ok()??;
    if login.revoked || !is_granted(&login) {
        return None;
    }
    if let Some(secret) = claims.refresh_secret.as_deref() {
        let stored = login.refresh_secret.as_deref()?;
        if !hashes_equal(stored, &state.hash_secret(secret)) {
            return None;
        }
    }
    Some((claims, login))
}
