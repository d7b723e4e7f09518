//! Shared state of both planes: the `Snapshot` of the small tables (signing keys, projects)
//! behind an `ArcSwap`, the bounded identity caches (`identities`: memberships, clients,
//! policies, Logins, effective policies), the verified-token cache, and authentication of
//! `Authorization` headers.
//!
//! Invariant: the request path reads the snapshot and the caches; only a cache miss reads the
//! store (one row, by key or index). Every request re-checks the Login, membership and client
//! through the caches, and the change feed (`refresh`) drops exactly the entries each change
//! names, so a revocation is seen on the very next request after the feed catches up. Memory
//! is bounded by the cache capacities, not by the number of identities in the store.
//!
//! The store's reachability is tracked here too (`note_store`): while it is down, what cannot be
//! verified without it gets 503 at once, and after `store_outage_ttl` nothing authenticated is
//! served (an instance cut off from the store cannot learn of revocations).

mod auth;
pub mod control;
pub mod failures;
mod identities;
mod identity;
pub mod keys;
mod snapshot;
pub mod standing;
pub mod upstreams;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use arc_swap::ArcSwap;

pub use auth::{AuthError, CacheUse};
pub use identities::{Identities, Mark, StoredPolicy};
pub use identity::Identity;
pub use snapshot::{ClientInfo, ProjectInfo, Snapshot, origin_of};

use crate::config::Config;
use crate::store::{Store, StoreError, now_unix};
use crate::tokens::Keyring;
use control::ControlTarget;

/// Everything both planes share.
pub struct State {
    pub config: Config,
    pub store: Store,
    snapshot: ArcSwap<Snapshot>,
    /// Keyed-hash key for client secrets (per installation; sealed in the store).
    secret_key: Vec<u8>,
    /// Seals and opens the signing keys in the store.
    pub kek: Arc<crate::sealed::KeyEncryptionKey>,
    tokens: moka::sync::Cache<String, Arc<standing::TokenEntry>, foldhash::fast::RandomState>,
    /// Memberships, clients, policies, Logins and effective policies, bounded.
    pub identities: Identities,
    /// One catch-up with the feed at a time.
    refresh_lock: tokio::sync::Mutex<()>,
    /// Where the gateway forwards control traffic.
    pub control: ControlTarget,
    /// The global upstream FHIR server's addresses, resolved off the request path like
    /// `control` (pingora's `HttpPeer::new` would look a name up on every request, blocking, and
    /// panic when the lookup fails). The default binding of `upstreams`.
    pub upstream_target: Arc<ControlTarget>,
    /// Every upstream a project can be bound to.
    pub upstreams: upstreams::Upstreams,
    /// The failed-credential budget (`None`: off).
    pub credential_failures: Option<failures::CredentialFailures>,
    /// The last store round trip succeeded.
    store_up: AtomicBool,
    /// Unix milliseconds of the last successful store round trip.
    last_store_contact: AtomicI64,
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
        kek: Arc<crate::sealed::KeyEncryptionKey>,
        secret_key: Vec<u8>,
    ) -> Result<Arc<State>, StoreError> {
        let seq = store.change_seq().await?;
        let snap = Snapshot::load(&store, &config, Some(&kek), 1).await?;
        let tokens = moka::sync::Cache::builder()
            .max_capacity(config.token_cache_capacity)
            .time_to_live(config.token_cache_ttl)
            .build_with_hasher(foldhash::fast::RandomState::default());
        let identities = Identities::new(
            store.clone(),
            config.identity_cache_capacity,
            config.token_cache_capacity,
            seq,
        );
        let control = ControlTarget::new(config.control_url.clone());
        let upstreams = upstreams::Upstreams::from_config(&config);
        let upstream_target = upstreams.default_binding().target.clone();
        let credential_failures =
            failures::CredentialFailures::new(config.credential_failure_limit);
        Ok(Arc::new(State {
            config,
            store,
            snapshot: ArcSwap::from_pointee(snap),
            secret_key,
            kek,
            tokens,
            identities,
            refresh_lock: tokio::sync::Mutex::new(()),
            control,
            upstream_target,
            upstreams,
            credential_failures,
            store_up: AtomicBool::new(true),
            last_store_contact: AtomicI64::new(now_millis()),
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// How far the caches and the snapshot had got ([`standing`]).
    pub fn epoch(&self) -> standing::Epoch {
        // The mark first: a refresh stores its snapshot before it applies its changes.
        let mark = self.identities.mark();
        standing::Epoch {
            mark,
            snapshot: self.snapshot.load().version,
        }
    }

    pub fn keyring(&self) -> Arc<Keyring> {
        self.snapshot.load().keyring.clone()
    }

    pub fn hash_secret(&self, secret: &str) -> String {
        crate::tokens::hash_secret(&self.secret_key, secret)
    }

    /// The seal of an upstream page handle for one caller (`fhir::page`): a keyed hash of both,
    /// the same on every instance (the key is the store's).
    pub fn page_seal(&self, caller: &str, handle: &str) -> String {
        let input = format!("fhirgate page handle\n{caller}\n{handle}");
        crate::tokens::hash_secret(&self.secret_key, &input)
    }

    /// Catches up with the change feed: applies every change since the last one applied
    /// (dropping exactly the cache entries they name, and reloading the small tables when a
    /// project or key changed). Called after every local write and by the feed; concurrent
    /// calls take turns.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let result = self.refresh_inner().await;
        self.note_store(&result);
        result
    }

    async fn refresh_inner(&self) -> Result<(), StoreError> {
        let _turn = self.refresh_lock.lock().await;
        let applied = self.identities.applied();
        let head = self.store.change_seq().await?;
        let mut changes = Vec::new();
        let mut gap = head - applied > MAX_CHANGES_APPLIED;
        if !gap && head > applied {
            changes = self
                .store
                .changes_after(applied, MAX_CHANGES_APPLIED)
                .await?;
            // Read after the changes: a prune that raced the read shows up here.
            gap = self.store.changes_pruned_through().await? > applied;
        }
        let key_due = self.key_change_due();
        let tables_changed = gap
            || key_due
            || changes
                .iter()
                .any(|c| matches!(c.kind.as_str(), "Project" | "JsonWebKey"));
        let mut projects = Vec::new();
        if tables_changed {
            let old = self.snapshot.load_full();
            let snap =
                Snapshot::load(&self.store, &self.config, Some(&self.kek), old.version + 1).await?;
            // A key that left the keyring (retired, or deactivated after a compromise) must
            // take the tokens it verified with it, cached or not.
            if old.key_ids.iter().any(|k| !snap.key_ids.contains(k)) {
                self.tokens.invalidate_all();
            }
            projects = changed_projects(&old, &snap);
            self.snapshot.store(Arc::new(snap));
        }
        if gap {
            tracing::info!(
                applied,
                head,
                "change feed: too far behind to apply change by change; dropping every cached identity"
            );
            self.identities.reset(head);
        } else {
            self.identities.forget(&changes, &projects);
        }
        Ok(())
    }

    /// A signing key starts to sign or retires by now: the keyring must be rebuilt.
    fn key_change_due(&self) -> bool {
        self.snapshot
            .load()
            .next_key_change
            .is_some_and(|t| t <= now_unix())
    }

    /// Catches up if the store's change sequence moved, or a signing key's start or retirement
    /// came due. Returns whether it did.
    pub async fn refresh_if_changed(&self) -> Result<bool, StoreError> {
        let result = self.store.change_seq().await;
        self.note_store(&result);
        self.refresh_if_behind(result?).await
    }

    /// [`State::refresh_if_changed`] with the sequence number already read.
    pub async fn refresh_if_behind(&self, seq: i64) -> Result<bool, StoreError> {
        let key_due = self.key_change_due();
        if !key_due && seq <= self.identities.applied() {
            return Ok(false);
        }
        self.refresh().await?;
        Ok(true)
    }

    /// Records the outcome of a store round trip (logs the transitions, not every failure).
    pub fn note_store<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => {
                self.last_store_contact
                    .store(now_millis(), Ordering::Relaxed);
                if !self.store_up.swap(true, Ordering::Relaxed) {
                    tracing::info!("store reachable again");
                }
            }
            Err(e) if e.is_unavailable() => {
                if self.store_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "store unreachable: serving already-verified credentials until it returns or store_outage_ttl passes");
                }
            }
            Err(_) => {}
        }
    }

    /// A store round trip that did not finish in time counts as a failure.
    pub fn note_store_timeout(&self) {
        if self.store_up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "store unreachable (timed out): serving already-verified credentials until it returns or store_outage_ttl passes"
            );
        }
    }

    /// The last store round trip succeeded.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    /// Cut off from the store for longer than `store_outage_ttl`: revocations made meanwhile
    /// could be missed, so nothing authenticated is served any more (fail closed).
    pub fn store_outage_expired(&self) -> bool {
        if self.store_up() {
            return false;
        }
        let ttl = i64::try_from(self.config.store_outage_ttl.as_millis()).unwrap_or(i64::MAX);
        now_millis().saturating_sub(self.last_store_contact.load(Ordering::Relaxed)) > ttl
    }

    /// The effective policy of a membership with optional SMART scopes, under the projects
    /// of `snap` (cached until something it was built from changes). `None` when the
    /// membership or its project is gone.
    pub async fn effective_policy(
        &self,
        snap: &Snapshot,
        membership_id: &str,
        scope: Option<&str>,
    ) -> Result<Option<Arc<fhirgate_core::policy::EffectivePolicy>>, StoreError> {
        self.effective_policy_in_context(snap, membership_id, scope, None)
            .await
    }

    /// [`State::effective_policy`] of a token with a SMART launch context: `patient/` scopes
    /// reach only `patient`.
    pub async fn effective_policy_in_context(
        &self,
        snap: &Snapshot,
        membership_id: &str,
        scope: Option<&str>,
        patient: Option<&str>,
    ) -> Result<Option<Arc<fhirgate_core::policy::EffectivePolicy>>, StoreError> {
        let result = self
            .identities
            .effective_policy(snap, membership_id, scope, patient)
            .await;
        if result.is_err() {
            self.note_store(&result);
        }
        result
    }
}

/// More changes than this since the last catch-up are not applied one by one: everything
/// cached is dropped instead (cheaper, and bounded).
const MAX_CHANGES_APPLIED: i64 = 20_000;

/// The projects whose effective policies must be rebuilt after the tables changed: those gone,
/// and those whose admin standing, upstream or isolation differs (a project's isolation depends
/// on the others sharing its upstream, so one new project can change another's).
fn changed_projects(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let differs = |a: &ProjectInfo, b: &ProjectInfo| {
        a.super_admin != b.super_admin || a.upstream != b.upstream || a.isolation != b.isolation
    };
    old.projects
        .values()
        .filter(|p| new.projects.get(&p.id).is_none_or(|n| differs(p, n)))
        .map(|p| p.id.clone())
        .collect()
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
