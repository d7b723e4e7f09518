//! Shared state of both planes: the compiled `Snapshot` of the identity store (projects,
//! memberships, clients, policies, revoked logins, signing keys) behind an `ArcSwap`, the caches
//! in front of it, and authentication of `Authorization` headers.
//!
//! Invariant: the request path reads the snapshot and the caches only. The one exception is the
//! first sight of a Bearer token, whose Login is read from the store once and then cached; every
//! later request re-checks the Login, membership and client against the current snapshot, so a
//! revocation is seen on the very next request after the snapshot is refreshed.

mod auth;
mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

pub use auth::{AuthError, CacheUse, Identity};
pub use snapshot::{ClientInfo, ProjectInfo, Snapshot};

use crate::config::Config;
use crate::store::{Store, StoreError};
use crate::tokens::Keyring;

/// Everything both planes share.
pub struct State {
    pub config: Config,
    pub store: Store,
    snapshot: ArcSwap<Snapshot>,
    /// Keyed-hash key for client secrets (per installation).
    secret_key: Vec<u8>,
    tokens: moka::sync::Cache<String, Arc<Identity>>,
    effective: moka::sync::Cache<
        (u64, String, Option<String>),
        Arc<fhirgate_core::policy::EffectivePolicy>,
    >,
    refresh_lock: tokio::sync::Mutex<i64>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("version", &self.snapshot().version)
            .finish_non_exhaustive()
    }
}

impl State {
    pub async fn new(
        config: Config,
        store: Store,
        secret_key: Vec<u8>,
    ) -> Result<Arc<State>, StoreError> {
        let seq = store.change_seq().await?;
        let snap = Snapshot::load(&store, &config, 1).await?;
        let tokens = moka::sync::Cache::builder()
            .max_capacity(config.token_cache_capacity)
            .time_to_live(Duration::from_secs(24 * 3600))
            .build();
        let effective = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(600))
            .build();
        Ok(Arc::new(State {
            config,
            store,
            snapshot: ArcSwap::from_pointee(snap),
            secret_key,
            tokens,
            effective,
            refresh_lock: tokio::sync::Mutex::new(seq),
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn keyring(&self) -> Arc<Keyring> {
        self.snapshot.load().keyring.clone()
    }

    pub fn hash_secret(&self, secret: &str) -> String {
        crate::tokens::hash_secret(&self.secret_key, secret)
    }

    /// Rebuilds the snapshot from the store and swaps it in. Called after every local write and
    /// by the change-feed poller; concurrent calls coalesce.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let mut last_seq = self.refresh_lock.lock().await;
        let seq = self.store.change_seq().await?;
        let version = self.snapshot.load().version + 1;
        let snap = Snapshot::load(&self.store, &self.config, version).await?;
        self.snapshot.store(Arc::new(snap));
        *last_seq = seq;
        Ok(())
    }

    /// Refreshes only if the store's change sequence moved.
    pub async fn refresh_if_changed(&self) -> Result<bool, StoreError> {
        let seq = self.store.change_seq().await?;
        if seq == *self.refresh_lock.lock().await {
            return Ok(false);
        }
        self.refresh().await?;
        Ok(true)
    }

    /// Polls the change feed until `shutdown` fires.
    pub async fn run_change_feed(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.refresh_if_changed().await {
                        tracing::warn!(error = %e, "change feed poll failed");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// The effective policy of an identity under the current snapshot (cached per snapshot).
    pub fn effective_policy(
        &self,
        snap: &Snapshot,
        membership_id: &str,
        scope: Option<&str>,
    ) -> Option<Arc<fhirgate_core::policy::EffectivePolicy>> {
        let key = (
            snap.version,
            membership_id.to_string(),
            scope.map(str::to_string),
        );
        if let Some(p) = self.effective.get(&key) {
            return Some(p);
        }
        let p = Arc::new(snap.effective_policy(membership_id, scope)?);
        self.effective.insert(key, p.clone());
        Some(p)
    }
}
