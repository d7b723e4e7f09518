//! The identities the planes act for — memberships, clients, AccessPolicies, Logins, and the
//! effective policies built from them — read through bounded caches backed by the store.
//!
//! Nothing here holds a full copy of the store: memory is bounded by `identity_cache_capacity`
//! (and the token cache), whatever the number of identities. A miss reads one row (an index or
//! primary-key lookup); the change feed drops exactly the entries a change names
//! ([`Identities::forget`]), so a change made anywhere is seen within the feed's budget.
//!
//! A load races the feed: a change can commit after the load read the store but before the
//! load put its result in the cache, and that stale entry would outlive the change's own
//! invalidation. The [`Fence`] closes that gap: every load notes how far the feed had got before
//! it read, and after inserting checks whether anything it was built from changed since; if so
//! it drops its own entry (the answer it returns is still fit for the request in flight, which
//! raced the change anyway).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirgate_core::policy::effective::{EffectiveInputs, EffectivePolicy, effective};
use fhirgate_core::policy::model::{AccessPolicy, ProjectMembership};
use moka::sync::Cache;
use serde_json::Value;

use super::snapshot::{ClientInfo, ProjectInfo, Snapshot};
use crate::store::{Change, Store, StoreError};

/// How long a load may take; the fence remembers changes for longer than that.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the fence remembers a change (well beyond [`LOAD_TIMEOUT`]).
const FENCE_MEMORY: Duration = Duration::from_secs(60);
/// The most scopes one membership's effective policies are kept for (a client asks for a few).
const SCOPES_PER_MEMBERSHIP: usize = 16;
/// The fence's subject for "some client's origins changed" (the origin cache is keyed by
/// origin, not by client).
const ANY_CLIENT: &str = "ClientApplication/*";

/// A stored AccessPolicy and the project it belongs to.
#[derive(Debug)]
pub struct StoredPolicy {
    pub policy: AccessPolicy,
    pub project: Option<String>,
}

/// What one membership's effective policies are built from, frozen at load, and the policies
/// built from it per scope.
/// What narrows a membership's policy for one token: its scope and its patient in context.
type Narrowing = (Option<String>, Option<String>);

struct PolicyEntry {
    membership: Arc<ProjectMembership>,
    project: ProjectInfo,
    policies: HashMap<String, AccessPolicy>,
    scoped: Mutex<HashMap<Narrowing, Arc<EffectivePolicy>>>,
}

impl PolicyEntry {
    fn policy(&self, scope: Option<&str>, patient: Option<&str>) -> Arc<EffectivePolicy> {
        let key = (scope.map(str::to_string), patient.map(str::to_string));
        let mut scoped = self.scoped.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = scoped.get(&key) {
            return p.clone();
        }
        let built = effective(&EffectiveInputs {
            membership: &self.membership,
            policies: &self.policies,
            project_id: &self.project.id,
            project_super_admin: self.project.super_admin,
            linked_projects: &[],
            scope,
            patient_in_context: patient,
        })
        .with_isolation(self.project.isolation.clone());
        let built = Arc::new(built);
        if scoped.len() >= SCOPES_PER_MEMBERSHIP {
            scoped.clear();
        }
        scoped.insert(key, built.clone());
        built
    }
}

/// How far the change feed had got when a load began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    seq: i64,
    generation: u64,
    retractions: u64,
}

/// Remembers recent changes so that a load can tell whether what it read went stale before
/// it reached the cache.
struct Fence {
    /// The newest change applied to the caches.
    applied: AtomicI64,
    /// Bumped when everything is dropped at once (a gap in the feed, a change of unknown
    /// extent): every load in flight is stale.
    generation: AtomicU64,
    /// Bumped when a load drops the value it had just cached (see `Identities::keep`). Part of
    /// a mark, so a token's kept standing does not outlive it, but not of `moved`: a load is
    /// not stale because another one was, and one retraction never sets off others.
    retractions: AtomicU64,
    /// Subject → sequence number of its newest change.
    recent: Cache<String, i64>,
}

impl Fence {
    fn mark(&self) -> Mark {
        // Generation first: a reset between the two reads then shows as a moved generation.
        let generation = self.generation.load(Ordering::SeqCst);
        Mark {
            seq: self.applied.load(Ordering::SeqCst),
            generation,
            retractions: self.retractions.load(Ordering::SeqCst),
        }
    }

    fn moved(&self, mark: Mark, subjects: &[&str]) -> bool {
        self.generation.load(Ordering::SeqCst) != mark.generation
            || subjects
                .iter()
                .any(|s| self.recent.get(*s).is_some_and(|seq| seq > mark.seq))
    }
}

/// The caches, and the store behind them.
pub struct Identities {
    store: Store,
    memberships: Cache<String, Option<Arc<ProjectMembership>>>,
    /// `(project id, profile reference)` → membership id. Only found ones are kept, and a hit
    /// is checked against the membership itself, so a moved or deleted membership never
    /// answers for a profile.
    by_profile: Cache<(String, String), String>,
    clients: Cache<String, Option<Arc<ClientInfo>>>,
    policies: Cache<String, Option<Arc<StoredPolicy>>>,
    /// Login id → revoked (or gone).
    logins: Cache<String, bool>,
    /// Browser origin → some active client names it.
    origins: Cache<String, bool>,
    /// Membership id → its effective policies.
    effective: Cache<String, Arc<PolicyEntry>>,
    fence: Fence,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("memberships", &self.memberships.entry_count())
            .field("clients", &self.clients.entry_count())
            .field("effective", &self.effective.entry_count())
            .finish_non_exhaustive()
    }
}

fn bounded<K, V>(capacity: u64) -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(capacity)
        .support_invalidation_closures()
        .build()
}

/// A store read bounded in time (a hung connection must not hold a request, and the fence
/// only remembers changes for so long).
async fn timed<T>(read: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(LOAD_TIMEOUT, read)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

impl Identities {
    /// `capacity` bounds each cache (entries); `logins` the Login cache (as many as tokens).
    /// `applied` is the change sequence the caches start from.
    pub fn new(store: Store, capacity: u64, logins: u64, applied: i64) -> Identities {
        Identities {
            store,
            memberships: bounded(capacity),
            by_profile: bounded(capacity),
            clients: bounded(capacity),
            policies: bounded(capacity),
            logins: bounded(logins),
            origins: bounded(capacity.min(10_000)),
            effective: bounded(capacity),
            fence: Fence {
                applied: AtomicI64::new(applied),
                generation: AtomicU64::new(0),
                retractions: AtomicU64::new(0),
                recent: Cache::builder()
                    .max_capacity(1_000_000)
                    .time_to_live(FENCE_MEMORY)
                    .build(),
            },
        }
    }

    /// The newest change applied.
    pub fn applied(&self) -> i64 {
        self.fence.applied.load(Ordering::SeqCst)
    }

    /// Entries held, all caches together (for metrics and the scaling benchmark).
    pub fn entries(&self) -> u64 {
        self.memberships.entry_count()
            + self.by_profile.entry_count()
            + self.clients.entry_count()
            + self.policies.entry_count()
            + self.logins.entry_count()
            + self.origins.entry_count()
            + self.effective.entry_count()
    }

    /// The cached value of `key`, or `load`ed from the store and cached unless the change-feed
    /// `subject` it was built from changed meanwhile. A hit allocates nothing: this runs on
    /// every request.
    async fn through<V>(
        &self,
        cache: &Cache<String, V>,
        key: &str,
        subject: impl FnOnce() -> String,
        load: impl Future<Output = Result<V, StoreError>>,
    ) -> Result<V, StoreError>
    where
        V: Clone + Send + Sync + 'static,
    {
        if let Some(v) = cache.get(key) {
            return Ok(v);
        }
        let mark = self.fence.mark();
        let value = timed(load).await?;
        let subject = subject();
        self.keep(cache, key.to_string(), value.clone(), mark, &[&subject]);
        Ok(value)
    }

    /// Caches `value`, then drops it again if it went stale on the way (see the module text:
    /// insert first, check second, so that either the check or the feed's own invalidation
    /// sees the other).
    fn keep<K, V>(&self, cache: &Cache<K, V>, key: K, value: V, mark: Mark, subjects: &[&str])
    where
        K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
        V: Clone + Send + Sync + 'static,
    {
        cache.insert(key.clone(), value);
        if self.fence.moved(mark, subjects) {
            cache.invalidate(&key);
            // The stale value was in the cache for a moment: another request may have read it,
            // built an entry on it (an effective policy) or kept a token's standing on it
            // (the `standing` module). Every epoch moves, so no standing kept on it survives, and
            // what was built on the same subjects meanwhile is dropped.
            self.fence.retractions.fetch_add(1, Ordering::SeqCst);
            for subject in subjects {
                self.drop_subject(subject);
            }
        }
    }

    pub async fn membership(&self, id: &str) -> Result<Option<Arc<ProjectMembership>>, StoreError> {
        let subject = || format!("ProjectMembership/{id}");
        self.through(&self.memberships, id, subject, async {
            Ok(match self.store.read("ProjectMembership", id).await? {
                Some(r) => parse_membership(&r.id, r.content),
                None => None,
            })
        })
        .await
    }

    pub async fn client(&self, id: &str) -> Result<Option<Arc<ClientInfo>>, StoreError> {
        let subject = || format!("ClientApplication/{id}");
        self.through(&self.clients, id, subject, async {
            let Some(r) = self.store.read("ClientApplication", id).await? else {
                return Ok(None);
            };
            let (secret_hash, retiring_hash) =
                self.store.client_secret(id).await?.unwrap_or_default();
            Ok(Some(Arc::new(ClientInfo::new(
                r.id,
                r.project_id,
                r.content,
                secret_hash,
                retiring_hash,
            ))))
        })
        .await
    }

    async fn policy(&self, id: &str) -> Result<Option<Arc<StoredPolicy>>, StoreError> {
        let subject = || format!("AccessPolicy/{id}");
        self.through(&self.policies, id, subject, async {
            let Some(r) = self.store.read("AccessPolicy", id).await? else {
                return Ok(None);
            };
            Ok(match serde_json::from_value::<AccessPolicy>(r.content) {
                Ok(policy) => Some(Arc::new(StoredPolicy {
                    policy,
                    project: r.project_id,
                })),
                Err(e) => {
                    tracing::error!(id = %r.id, error = %e, "stored AccessPolicy is unreadable; references to it grant nothing");
                    None
                }
            })
        })
        .await
    }

    /// The membership of `profile` (a reference) in `project_id`.
    pub async fn membership_of_profile(
        &self,
        project_id: &str,
        profile: &str,
    ) -> Result<Option<(String, Arc<ProjectMembership>)>, StoreError> {
        let key = (project_id.to_string(), profile.to_string());
        let belongs = |m: &ProjectMembership| {
            m.project.type_and_id().map(|(_, p)| p) == Some(project_id)
                && m.profile_ref() == Some(profile)
        };
        if let Some(id) = self.by_profile.get(&key) {
            match self.membership(&id).await? {
                Some(m) if belongs(&m) => return Ok(Some((id, m))),
                _ => self.by_profile.invalidate(&key),
            }
        }
        let Some(found) = timed(self.store.membership_by_profile(project_id, profile)).await?
        else {
            return Ok(None);
        };
        let Some(m) = self.membership(&found.id).await? else {
            return Ok(None);
        };
        if !belongs(&m) {
            return Ok(None);
        }
        // Self-checking on every hit (above), so no fence is needed here.
        self.by_profile.insert(key, found.id.clone());
        Ok(Some((found.id, m)))
    }

    /// The membership of a client application (`profile == ClientApplication/<id>`).
    pub async fn client_membership(
        &self,
        client: &ClientInfo,
    ) -> Result<Option<(String, Arc<ProjectMembership>)>, StoreError> {
        let Some(project) = client.project_id.as_deref() else {
            return Ok(None);
        };
        self.membership_of_profile(project, &format!("ClientApplication/{}", client.id))
            .await
    }

    /// Resolves an `X-Medplum-On-Behalf-Of` value (docs/medplum-compat.md §6:
    /// `ProjectMembership/<id>` or a profile reference) to a membership id in `project_id`;
    /// `None` when it names nothing there. Both planes use it.
    pub async fn on_behalf_of(
        &self,
        project_id: &str,
        value: &str,
    ) -> Result<Option<String>, StoreError> {
        let value = value.trim();
        if let Some(id) = value.strip_prefix("ProjectMembership/") {
            let found = self.membership(id).await?;
            return Ok(found
                .filter(|m| m.project.type_and_id().map(|(_, p)| p) == Some(project_id))
                .map(|_| id.to_string()));
        }
        Ok(self
            .membership_of_profile(project_id, value)
            .await?
            .map(|(id, _)| id))
    }

    /// Whether a Login is revoked or gone.
    pub async fn login_revoked(&self, id: &str) -> Result<bool, StoreError> {
        let subject = || format!("Login/{id}");
        self.through(&self.logins, id, subject, async {
            Ok(self.store.login(id).await?.is_none_or(|l| l.revoked))
        })
        .await
    }

    /// How far the feed had got; take it before reading something to [`Identities::note_login`].
    pub fn mark(&self) -> Mark {
        self.fence.mark()
    }

    /// Caches a Login's state read from the store after `mark`.
    pub fn note_login(&self, id: &str, revoked: bool, mark: Mark) {
        let subject = format!("Login/{id}");
        self.keep(&self.logins, id.to_string(), revoked, mark, &[&subject]);
    }

    /// Whether an active client names the browser `origin`.
    pub async fn origin_known(&self, origin: &str) -> Result<bool, StoreError> {
        let subject = || ANY_CLIENT.to_string();
        self.through(&self.origins, origin, subject, async {
            self.store.client_origin_known(origin).await
        })
        .await
    }

    /// The effective policy of a membership (docs/medplum-compat.md §4.2) with optional SMART
    /// scopes, under the projects of `tables`. `None` when the membership or its project is
    /// gone.
    pub async fn effective_policy(
        &self,
        tables: &Snapshot,
        membership_id: &str,
        scope: Option<&str>,
        patient: Option<&str>,
    ) -> Result<Option<Arc<EffectivePolicy>>, StoreError> {
        if let Some(entry) = self.effective.get(membership_id) {
            return Ok(Some(entry.policy(scope, patient)));
        }
        let mark = self.fence.mark();
        let Some(membership) = self.membership(membership_id).await? else {
            return Ok(None);
        };
        let Some(project_id) = membership.project.type_and_id().map(|(_, p)| p.to_string()) else {
            return Ok(None);
        };
        let Some(project) = tables.projects.get(&project_id).cloned() else {
            return Ok(None);
        };
        // A membership's policy references resolve within its own project only: a policy of
        // another project is not found, whatever its id (a project admin chooses the ids of
        // the policies it creates).
        let mut policies = HashMap::new();
        for id in referenced_policies(&membership) {
            if let Some(stored) = self.policy(&id).await?
                && stored.project.as_deref() == Some(project_id.as_str())
            {
                policies.insert(id, stored.policy.clone());
            }
        }
        let mut subjects = vec![
            format!("ProjectMembership/{membership_id}"),
            format!("Project/{project_id}"),
        ];
        subjects.extend(referenced_policies(&membership).map(|id| format!("AccessPolicy/{id}")));
        let entry = Arc::new(PolicyEntry {
            membership,
            project,
            policies,
            scoped: Mutex::new(HashMap::new()),
        });
        let policy = entry.policy(scope, patient);
        let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
        self.keep(
            &self.effective,
            membership_id.to_string(),
            entry,
            mark,
            &subjects,
        );
        Ok(Some(policy))
    }

    /// Applies changes read from the feed (in order), dropping exactly what they name, plus
    /// every cached effective policy of `projects` (projects whose settings or whose isolation
    /// changed). A change without a subject drops everything of its kind.
    pub fn forget(&self, changes: &[Change], projects: &[String]) {
        let Some(last) = changes.last().map(|c| c.seq) else {
            // No change read, yet projects differ (the small tables were reloaded for a key
            // change due, and a Project write landed meanwhile): there is no sequence number to
            // fence with, so every load in flight is treated as stale.
            if !projects.is_empty() {
                self.fence.generation.fetch_add(1, Ordering::SeqCst);
                self.drop_projects(projects);
            }
            return;
        };
        // Remember first, then drop: a load that checks the fence after this sees the change;
        // one that checked before has already inserted, and is dropped below.
        let mut wide = false;
        for c in changes {
            match &c.subject {
                Some(s) => {
                    self.fence.recent.insert(s.clone(), c.seq);
                    if s.starts_with("ClientApplication/") {
                        self.fence.recent.insert(ANY_CLIENT.to_string(), c.seq);
                    }
                }
                None => wide |= matters(&c.kind),
            }
        }
        for p in projects {
            self.fence.recent.insert(format!("Project/{p}"), last);
        }
        if wide {
            self.fence.generation.fetch_add(1, Ordering::SeqCst);
        }
        for c in changes {
            match &c.subject {
                Some(s) => self.drop_subject(s),
                None => self.drop_kind(&c.kind),
            }
        }
        self.drop_projects(projects);
        self.fence.applied.fetch_max(last, Ordering::SeqCst);
    }

    /// Drops the effective policies of `projects`.
    fn drop_projects(&self, projects: &[String]) {
        for p in projects {
            let p = p.clone();
            let _ = self
                .effective
                .invalidate_entries_if(move |_, e| e.project.id == p);
        }
    }

    /// Drops everything (a gap in the feed) and continues from `applied`.
    pub fn reset(&self, applied: i64) {
        self.fence.generation.fetch_add(1, Ordering::SeqCst);
        for kind in [
            "ProjectMembership",
            "ClientApplication",
            "AccessPolicy",
            "Login",
        ] {
            self.drop_kind(kind);
        }
        self.fence.applied.fetch_max(applied, Ordering::SeqCst);
    }

    fn drop_subject(&self, subject: &str) {
        let Some((kind, id)) = subject.split_once('/') else {
            return;
        };
        match kind {
            "ProjectMembership" => {
                self.memberships.invalidate(id);
                self.effective.invalidate(id);
            }
            "ClientApplication" => {
                self.clients.invalidate(id);
                self.origins.invalidate_all();
            }
            "AccessPolicy" => {
                self.policies.invalidate(id);
                let id = id.to_string();
                let _ = self
                    .effective
                    .invalidate_entries_if(move |_, e| e.policies.contains_key(&id));
            }
            "Login" => self.logins.invalidate(id),
            _ => {}
        }
    }

    fn drop_kind(&self, kind: &str) {
        match kind {
            "ProjectMembership" => {
                self.memberships.invalidate_all();
                self.by_profile.invalidate_all();
                self.effective.invalidate_all();
            }
            "ClientApplication" | "ClientSecret" => {
                self.clients.invalidate_all();
                self.origins.invalidate_all();
            }
            "AccessPolicy" => {
                self.policies.invalidate_all();
                self.effective.invalidate_all();
            }
            "Login" => self.logins.invalidate_all(),
            _ => {}
        }
    }
}

/// Whether a change of `kind` can touch what these caches hold.
fn matters(kind: &str) -> bool {
    matches!(
        kind,
        "ProjectMembership" | "ClientApplication" | "ClientSecret" | "AccessPolicy" | "Login"
    )
}

/// The AccessPolicy ids a membership refers to (`accessPolicy`, `access[].policy`).
fn referenced_policies(m: &ProjectMembership) -> impl Iterator<Item = String> + '_ {
    m.access_policy
        .iter()
        .chain(m.access.iter().map(|a| &a.policy))
        .filter_map(|r| match r.type_and_id() {
            Some(("AccessPolicy", id)) => Some(id.to_string()),
            _ => None,
        })
}

fn parse_membership(id: &str, content: Value) -> Option<Arc<ProjectMembership>> {
    match serde_json::from_value::<ProjectMembership>(content) {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            tracing::error!(id = %id, error = %e, "stored membership is unreadable; it grants nothing");
            None
        }
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    async fn identities() -> (Identities, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        (Identities::new(store, 100, 100, 0), dir)
    }

    fn change(seq: i64, subject: &str) -> Change {
        Change {
            seq,
            kind: subject.split('/').next().unwrap_or_default().to_string(),
            subject: Some(subject.to_string()),
        }
    }

    /// Loads `value` as client `c` through `cache`, running `meanwhile` while the load is in
    /// flight (between its store read and its insert). Returns what the caller got.
    async fn load(
        ids: &Identities,
        cache: &Cache<String, &'static str>,
        value: &'static str,
        meanwhile: impl FnOnce(),
    ) -> &'static str {
        let subject = || "ClientApplication/c".to_string();
        let read = async {
            meanwhile();
            Ok(value)
        };
        ids.through(cache, "c", subject, read).await.unwrap()
    }

    /// The race the fence exists for, played in order: a load reads the old value, the change
    /// is applied (its invalidation finds nothing to drop yet), then the load inserts. The
    /// stale value must not stay cached.
    #[tokio::test]
    async fn a_load_overtaken_by_a_change_is_not_kept() {
        let (ids, _dir) = identities().await;
        let cache = bounded(10);
        let got = load(&ids, &cache, "old", || {
            ids.forget(&[change(1, "ClientApplication/c")], &[]);
        })
        .await;
        assert_eq!(got, "old", "the caller still gets what it read");
        assert_eq!(cache.get("c"), None, "but it is not kept");

        // With no change meanwhile, a load is kept.
        load(&ids, &cache, "new", || {}).await;
        assert_eq!(cache.get("c"), Some("new"));
    }

    /// A change of another subject, or one applied before the load began, leaves the load's
    /// value in place.
    #[tokio::test]
    async fn only_later_changes_of_the_same_subject_count() {
        let (ids, _dir) = identities().await;
        ids.forget(&[change(1, "ClientApplication/c")], &[]);
        let cache = bounded(10);
        load(&ids, &cache, "v", || {
            ids.forget(&[change(2, "ClientApplication/other")], &[]);
        })
        .await;
        assert_eq!(cache.get("c"), Some("v"));
    }

    /// A value retracted by its own load was in the cache for a moment: the retraction moves
    /// every epoch, so no token's standing kept on it survives (the `standing` module).
    #[tokio::test]
    async fn a_retracted_load_moves_every_epoch() {
        let (ids, _dir) = identities().await;
        let cache = bounded(10);
        let mut after_change = None;
        load(&ids, &cache, "old", || {
            ids.forget(&[change(1, "ClientApplication/c")], &[]);
            after_change = Some(ids.mark());
        })
        .await;
        assert_eq!(cache.get("c"), None);
        assert_ne!(
            Some(ids.mark()),
            after_change,
            "a standing kept at the epoch after the change would outlive the retraction"
        );

        // A load kept without a retraction moves nothing.
        let before = ids.mark();
        load(&ids, &cache, "new", || {}).await;
        assert_eq!(ids.mark(), before);
    }

    /// A retraction moves epochs, not other loads: a load in flight meanwhile, of another
    /// subject, is still kept (one retraction never sets off a chain of them under load).
    #[tokio::test]
    async fn a_retraction_does_not_drop_other_loads() {
        let (ids, _dir) = identities().await;
        let cache = bounded(10);
        let other: Cache<String, &'static str> = bounded(10);
        load(&ids, &cache, "v", || {
            let mark = ids.mark();
            ids.forget(&[change(1, "ClientApplication/d")], &[]);
            ids.keep(
                &other,
                "d".to_string(),
                "stale",
                mark,
                &["ClientApplication/d"],
            );
        })
        .await;
        assert_eq!(other.get("d"), None, "the raced load is retracted");
        assert_eq!(cache.get("c"), Some("v"), "the other load is kept");
    }

    /// Projects that changed without a change read (a key change due raced a Project write)
    /// still make every load in flight stale.
    #[tokio::test]
    async fn changed_projects_without_changes_move_the_epoch() {
        let (ids, _dir) = identities().await;
        let before = ids.mark();
        ids.forget(&[], &["p".to_string()]);
        assert_ne!(ids.mark(), before);
        let before = ids.mark();
        ids.forget(&[], &[]);
        assert_eq!(ids.mark(), before, "nothing changed, nothing moves");
    }

    /// Everything dropped at once (a gap in the feed) makes every load in flight stale.
    #[tokio::test]
    async fn a_reset_during_a_load_drops_it() {
        let (ids, _dir) = identities().await;
        let cache = bounded(10);
        load(&ids, &cache, "old", || ids.reset(5)).await;
        assert_eq!(cache.get("c"), None);
    }
}
