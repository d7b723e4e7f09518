//! Authentication of an `Authorization` header into an `Identity` (docs/medplum-compat.md §3.6), with
//! the stricter live checks of docs/contract.md §2: a revoked Login, an inactive membership, a client that
//! is `off` or a rotated-out secret fail on the very next request.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::State;
use super::identity::Identity;
use super::standing::{Epoch, StandingSlot, TokenEntry};
use crate::store::{StoreError, now_unix};

/// The longest the first sight of a token waits for its Login; then 503 rather than a hang.
const LOGIN_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why authentication failed. All of them answer 401 on the wire; the variant is for metrics
/// and the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    Missing,
    #[error("malformed authorization header")]
    Malformed,
    #[error("invalid token")]
    InvalidToken,
    #[error("login revoked or unknown")]
    LoginRevoked,
    #[error("membership inactive or missing")]
    MembershipInactive,
    #[error("client off or unknown")]
    ClientInactive,
    #[error("invalid client credentials")]
    InvalidClient,
    #[error("store unavailable")]
    StoreUnavailable,
}

impl AuthError {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::InvalidToken => "invalid_token",
            AuthError::LoginRevoked => "login_revoked",
            AuthError::MembershipInactive => "membership_inactive",
            AuthError::ClientInactive => "client_inactive",
            AuthError::InvalidClient => "invalid_client",
            AuthError::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Outcome of the token cache lookup, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    Hit,
    Miss,
    None,
}

impl State {
    /// Authenticates an `Authorization` header value. The live checks always run (the control
    /// API's callers: never on a kept standing).
    pub async fn authenticate(
        &self,
        header: Option<&str>,
    ) -> (Result<Arc<Identity>, AuthError>, CacheUse) {
        let (result, cache) = self.authenticate_inner(header, false).await;
        (result.map(|(identity, _)| identity), cache)
    }

    /// [`State::authenticate`] for the data plane: with the slot of the token's [`standing`]
    /// (`super::standing`). A Bearer token whose standing was kept at the current epoch passed
    /// these same live checks then, and nothing they read has changed since: they are not
    /// repeated.
    pub async fn authenticate_with_standing(
        &self,
        header: Option<&str>,
    ) -> (Result<(Arc<Identity>, StandingSlot), AuthError>, CacheUse) {
        self.authenticate_inner(header, true).await
    }

    async fn authenticate_inner(
        &self,
        header: Option<&str>,
        reuse_standing: bool,
    ) -> (Result<(Arc<Identity>, StandingSlot), AuthError>, CacheUse) {
        let Some(header) = header else {
            return (Err(AuthError::Missing), CacheUse::None);
        };
        let Some((scheme, value)) = header.split_once(' ') else {
            return (Err(AuthError::Malformed), CacheUse::None);
        };
        if self.store_outage_expired() {
            return (Err(AuthError::StoreUnavailable), CacheUse::None);
        }
        // Before any check: what the checks read can only have changed if the epoch moves.
        let epoch = self.epoch();
        match scheme {
            "Bearer" => self.authenticate_bearer(value, epoch, reuse_standing).await,
            "Basic" => (
                self.authenticate_basic(value)
                    .await
                    .map(|identity| (Arc::new(identity), StandingSlot::none(epoch))),
                CacheUse::None,
            ),
            _ => (Err(AuthError::Malformed), CacheUse::None),
        }
    }

    async fn authenticate_bearer(
        &self,
        token: &str,
        epoch: Epoch,
        reuse_standing: bool,
    ) -> (Result<(Arc<Identity>, StandingSlot), AuthError>, CacheUse) {
        if token.is_empty() {
            return (Err(AuthError::Malformed), CacheUse::None);
        }
        let now = now_unix();
        if let Some(entry) = self.tokens.get(token) {
            // A key that left the keyring takes its tokens with it, even one cached by a miss
            // that raced the keyring's swap. Under the snapshot it was verified with, it is in.
            let key_kept = entry.snapshot == epoch.snapshot
                || self.snapshot.load().key_ids.contains(&entry.kid);
            if entry.identity.expires_at > now && key_kept {
                let identity = entry.identity.clone();
                let slot = StandingSlot::new(Some(entry), epoch);
                if reuse_standing && slot.current().is_some() {
                    return (Ok((identity, slot)), CacheUse::Hit);
                }
                let checked = self.live_check(identity).await;
                return (checked.map(|identity| (identity, slot)), CacheUse::Hit);
            }
            self.tokens.invalidate(token);
            return (Err(AuthError::InvalidToken), CacheUse::Hit);
        }
        // Only verified tokens are cached, and none has a space.
        if token.contains(' ') {
            return (Err(AuthError::Malformed), CacheUse::None);
        }
        let (verified, snapshot) = {
            let snap = self.snapshot.load();
            (snap.keyring.verify_with_kid(token), snap.version)
        };
        let Ok((claims, kid)) = verified else {
            return (Err(AuthError::InvalidToken), CacheUse::Miss);
        };
        // Refresh tokens (refresh secret) and ID tokens (fhirUser, no scope) are not access tokens.
        if claims.refresh_secret.is_some() || claims.fhir_user.is_some() || claims.scope.is_none() {
            return (Err(AuthError::InvalidToken), CacheUse::Miss);
        }
        let Some(login_id) = claims.login_id else {
            return (Err(AuthError::InvalidToken), CacheUse::Miss);
        };
        // Known to be down: answer at once instead of waiting for the pool to give up.
        if !self.store_up() {
            return (Err(AuthError::StoreUnavailable), CacheUse::Miss);
        }
        let mark = self.identities.mark();
        let login =
            match tokio::time::timeout(LOGIN_LOOKUP_TIMEOUT, self.store.login(&login_id)).await {
                Ok(Ok(Some(l))) => l,
                Ok(Ok(None)) => return (Err(AuthError::LoginRevoked), CacheUse::Miss),
                Ok(Err(e)) => {
                    self.note_store::<()>(&Err(e));
                    return (Err(AuthError::StoreUnavailable), CacheUse::Miss);
                }
                Err(_) => {
                    self.note_store_timeout();
                    return (Err(AuthError::StoreUnavailable), CacheUse::Miss);
                }
            };
        self.identities.note_login(&login.id, login.revoked, mark);
        if login.revoked {
            return (Err(AuthError::LoginRevoked), CacheUse::Miss);
        }
        let Some(membership_id) = login.membership_id.clone() else {
            return (Err(AuthError::LoginRevoked), CacheUse::Miss);
        };
        // Read through the cache, from the store on a miss: a membership created moments ago
        // through another instance (a new client's first token) is found.
        let membership = match self.identities.membership(&membership_id).await {
            Ok(Some(m)) => m,
            Ok(None) => return (Err(AuthError::MembershipInactive), CacheUse::Miss),
            Err(e) => {
                self.note_store::<()>(&Err(e));
                return (Err(AuthError::StoreUnavailable), CacheUse::Miss);
            }
        };
        let identity = Arc::new(Identity {
            login_id: Some(login.id.clone()),
            membership_id,
            project_id: membership
                .project
                .type_and_id()
                .map(|(_, id)| id.to_string())
                .unwrap_or_default(),
            profile: membership.profile_ref().unwrap_or_default().to_string(),
            user_ref: login.user_ref.clone(),
            client_id: login.client_id.clone(),
            // The token's own scope: a refresh may have narrowed it below the Login's.
            scope: claims.scope.clone(),
            patient: claims.patient.clone(),
            expires_at: claims.exp.min(login.expires_at),
        });
        let entry = Arc::new(TokenEntry::new(identity.clone(), kid, snapshot));
        self.tokens.insert(token.to_string(), entry.clone());
        let slot = StandingSlot::new(Some(entry), epoch);
        (
            self.live_check(identity)
                .await
                .map(|identity| (identity, slot)),
            CacheUse::Miss,
        )
    }

    async fn authenticate_basic(&self, value: &str) -> Result<Identity, AuthError> {
        let decoded = STANDARD
            .decode(value.trim())
            .map_err(|_| AuthError::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
        let (client_id, secret) = text.split_once(':').ok_or(AuthError::Malformed)?;
        if client_id.is_empty() || secret.is_empty() {
            return Err(AuthError::Malformed);
        }
        let client = self
            .identities
            .client(client_id)
            .await
            .map_err(|e| self.store_failed(e))?
            .ok_or(AuthError::InvalidClient)?;
        // Only the primary secret is accepted here (docs/medplum-compat.md §8.3): a rotated-out secret
        // stops working at once.
        let stored = client
            .secret_hash
            .as_deref()
            .ok_or(AuthError::InvalidClient)?;
        if !crate::tokens::hashes_equal(stored, &self.hash_secret(secret)) {
            return Err(AuthError::InvalidClient);
        }
        if !client.active {
            return Err(AuthError::ClientInactive);
        }
        let (membership_id, membership) = self
            .identities
            .client_membership(&client)
            .await
            .map_err(|e| self.store_failed(e))?
            .ok_or(AuthError::MembershipInactive)?;
        if !membership.is_active() {
            return Err(AuthError::MembershipInactive);
        }
        Ok(Identity {
            login_id: None,
            membership_id,
            project_id: client.project_id.clone().unwrap_or_default(),
            profile: format!("ClientApplication/{}", client.id),
            user_ref: format!("ClientApplication/{}", client.id),
            client_id: Some(client.id.clone()),
            scope: None,
            patient: None,
            expires_at: i64::MAX,
        })
    }
}

impl State {
    /// A store failure while authenticating: noted (for readiness and the outage clock) and
    /// answered as unavailable, never as "no such credential".
    fn store_failed(&self, e: StoreError) -> AuthError {
        self.note_store::<()>(&Err(e));
        AuthError::StoreUnavailable
    }

    /// The checks that run on every request, cache hit or not: the Login not revoked, the
    /// membership active, the client not turned off.
    async fn live_check(&self, id: Arc<Identity>) -> Result<Arc<Identity>, AuthError> {
        if let Some(login) = &id.login_id
            && self
                .identities
                .login_revoked(login)
                .await
                .map_err(|e| self.store_failed(e))?
        {
            return Err(AuthError::LoginRevoked);
        }
        match self
            .identities
            .membership(&id.membership_id)
            .await
            .map_err(|e| self.store_failed(e))?
        {
            Some(m) if m.is_active() => {}
            _ => return Err(AuthError::MembershipInactive),
        }
        if let Some(client_id) = &id.client_id {
            // Every token obtained through a client stops working when the client is turned
            // off; a client-credentials token also when its client is deleted.
            let client = self
                .identities
                .client(client_id)
                .await
                .map_err(|e| self.store_failed(e))?;
            match client {
                Some(c) if !c.active => return Err(AuthError::ClientInactive),
                None if id.user_ref.starts_with("ClientApplication/") => {
                    return Err(AuthError::ClientInactive);
                }
                _ => {}
            }
        }
        Ok(id)
    }
}
