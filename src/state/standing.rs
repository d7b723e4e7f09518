//! A Bearer token's standing: what the gateway derives from the caller on every request (its
//! project's upstream, its admin rights, its effective policy), kept with the verified token
//! while nothing it was derived from has changed.
//!
//! Deriving it takes five cache lookups (Login, membership twice, client, effective policy);
//! repeated for every request of the same token, they were the largest part of fhirgate's own
//! cost per request. A standing is kept at the [`Epoch`] read before the first of the live checks
//! that preceded it, and used only while the epoch is the same. Every change the feed applies
//! moves `applied`, a reset of the caches moves `generation`, and new small tables (projects,
//! keys) move the snapshot's version, so a kept standing never outlives a change that could
//! alter it: the next request after the change derives it again, as before this memo.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use fhirgate_core::policy::EffectivePolicy;

use super::identities::Mark;
use super::identity::Identity;
use super::upstreams::UpstreamBinding;
use super::{Snapshot, State};
use crate::store::StoreError;

/// The caller's standing, acting as itself.
#[derive(Debug)]
pub struct Standing {
    /// The upstream of the caller's project.
    pub binding: Arc<UpstreamBinding>,
    /// Project admin (or super admin).
    pub admin: bool,
    pub super_admin: bool,
    /// The caller's effective policy under the token's scope and patient.
    pub policy: Arc<EffectivePolicy>,
}

/// How far the caches had got: the feed's mark and the snapshot's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    pub(super) mark: Mark,
    pub(super) snapshot: u64,
}

/// A verified token in the token cache.
#[derive(Debug)]
pub(super) struct TokenEntry {
    pub identity: Arc<Identity>,
    /// The signing key that verified the token, and the version of the snapshot whose keyring
    /// did.
    pub kid: String,
    pub snapshot: u64,
    kept: ArcSwapOption<Kept>,
}

#[derive(Debug)]
struct Kept {
    epoch: Epoch,
    standing: Arc<Standing>,
}

impl TokenEntry {
    pub fn new(identity: Arc<Identity>, kid: String, snapshot: u64) -> TokenEntry {
        TokenEntry {
            identity,
            kid,
            snapshot,
            kept: ArcSwapOption::empty(),
        }
    }
}

/// Where one request finds and keeps its token's standing.
#[derive(Debug)]
pub struct StandingSlot {
    entry: Option<Arc<TokenEntry>>,
    epoch: Epoch,
}

impl StandingSlot {
    pub(super) fn new(entry: Option<Arc<TokenEntry>>, epoch: Epoch) -> StandingSlot {
        StandingSlot { entry, epoch }
    }

    /// A slot that keeps nothing (Basic credentials: no token to keep it with).
    pub(super) fn none(epoch: Epoch) -> StandingSlot {
        StandingSlot { entry: None, epoch }
    }

    /// The standing kept at this request's epoch, if any.
    pub fn current(&self) -> Option<Arc<Standing>> {
        let entry = self.entry.as_ref()?;
        let kept = entry.kept.load();
        kept.as_ref()
            .filter(|k| k.epoch == self.epoch)
            .map(|k| k.standing.clone())
    }

    /// Keeps `standing`, derived after this request's live checks passed, for the token's next
    /// requests at the same epoch.
    pub fn keep(&self, standing: Arc<Standing>) {
        if let Some(entry) = &self.entry {
            entry.kept.store(Some(Arc::new(Kept {
                epoch: self.epoch,
                standing,
            })));
        }
    }
}

/// Why a caller has no standing (the gateway answers each in its own way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StandingError {
    /// The project's upstream is not configured here: fail closed.
    #[error("the project's upstream is not configured")]
    UpstreamUnbound,
    #[error("membership or project gone")]
    MembershipGone,
    #[error("store unavailable")]
    StoreUnavailable,
}

impl From<StoreError> for StandingError {
    fn from(_: StoreError) -> StandingError {
        StandingError::StoreUnavailable
    }
}

impl State {
    /// The standing of an authenticated caller acting as itself: the one kept in `slot` at
    /// this request's epoch, or derived from the current snapshot and the caches and kept
    /// there (the snapshot is read only then).
    pub async fn standing(
        &self,
        identity: &Identity,
        slot: &StandingSlot,
    ) -> Result<Arc<Standing>, StandingError> {
        if let Some(kept) = slot.current() {
            return Ok(kept);
        }
        let snap = self.snapshot();
        let standing = Arc::new(self.derive_standing(&snap, identity).await?);
        // Kept only when derived from the snapshot of the slot's epoch.
        if snap.version == slot.epoch.snapshot {
            slot.keep(standing.clone());
        }
        Ok(standing)
    }

    async fn derive_standing(
        &self,
        snap: &Snapshot,
        identity: &Identity,
    ) -> Result<Standing, StandingError> {
        let binding = snap
            .projects
            .get(&identity.project_id)
            .and_then(|p| self.upstreams.get(&p.upstream))
            .ok_or(StandingError::UpstreamUnbound)?;
        let membership = self
            .identities
            .membership(&identity.membership_id)
            .await?
            .ok_or(StandingError::MembershipGone)?;
        let super_admin = membership
            .project
            .type_and_id()
            .and_then(|(_, p)| snap.projects.get(p))
            .is_some_and(|p| p.super_admin);
        let policy = self
            .effective_policy_in_context(
                snap,
                &identity.membership_id,
                identity.scope.as_deref(),
                identity.patient.as_deref(),
            )
            .await?
            .ok_or(StandingError::MembershipGone)?;
        Ok(Standing {
            binding: binding.clone(),
            admin: membership.is_admin() || super_admin,
            super_admin,
            policy,
        })
    }
}
