//! The change feed: keeps this instance's caches and snapshot in step with the store, so a
//! revocation, policy or key change made through any instance is enforced here within a
//! second. Each change names what changed, and only that is dropped from the caches.
//!
//! Two layers. On PostgreSQL a dedicated connection `LISTEN`s for the notification every write
//! sends at commit (`store::CHANGE_CHANNEL`) and wakes the refresh at once. Under it, whatever
//! the store, a poll of the change sequence every 250 ms catches up on anything the listener
//! missed: a notification lost while its connection was down, or the whole listener while it
//! reconnects (with backoff). Both end in `State::refresh_if_changed`, which compares sequence
//! numbers, so a wake-up without a change costs one query and a change is never applied twice.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, interval, timeout};

use crate::state::State;
use crate::state::control::ControlTarget;
use crate::store::{ChangeListener, Dialect, Store, StoreError};

/// The catch-up poll.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// A poll of the sequence that takes longer counts as a store failure (the pool alone would
/// keep retrying a refused connection for seconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A catch-up reads the changes since the last one (bounded) and, when a project or key
/// changed, the projects and keys.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(250);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often the feed and the Login table are pruned (by every instance; it is idempotent).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a change stays in the feed: an instance cut off for longer drops its caches
/// instead of applying changes one by one.
const CHANGE_RETENTION_SECS: i64 = 600;
/// How long after its expiry a Login is kept (no token of it is valid by then; the margin
/// covers clocks that disagree).
const LOGIN_RETENTION_SECS: i64 = 3600;
/// How often `control_url`'s host name is looked up again.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<ChangeListener, StoreError>> + Send>>;

/// Runs until `shutdown` fires.
pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let listen = state.store.dialect() == Dialect::Postgres;
    let mut listener: Option<ChangeListener> = None;
    // A listener connection being set up, beside the polls (which must not wait for it).
    let mut connecting: Option<Connecting> = None;
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut connect_at = Instant::now();
    let mut tick = interval(POLL_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut prune_tick = interval(PRUNE_EVERY);
    prune_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Housekeeping runs beside the loop, one pass at a time: a long pass (a first one over a
    // large backlog takes seconds) must never hold up applying changes.
    let mut pruning: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if listen && listener.is_none() && connecting.is_none() && Instant::now() >= connect_at {
            let url = state.config.store_url.clone();
            connecting = Some(Box::pin(async move {
                match timeout(LISTEN_CONNECT_TIMEOUT, Store::change_listener(&url)).await {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::Open("listen timed out".into())),
                }
            }));
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => catch_up(&state).await,
            _ = prune_tick.tick() => {
                if pruning.as_ref().is_none_or(|p| p.is_finished()) {
                    pruning = Some(tokio::spawn(prune(state.clone())));
                }
            }
            woke = next_notification(&mut listener) => {
                if !matches!(woke, Ok(true)) {
                    // Lost the connection (and maybe notifications): poll now, reconnect later.
                    tracing::debug!("change feed: listener connection lost");
                    listener = None;
                    connect_at = Instant::now() + backoff;
                }
                catch_up(&state).await;
            }
            connected = connected(&mut connecting) => {
                connecting = None;
                match connected {
                    Ok(l) => {
                        tracing::debug!("change feed: listening for notifications");
                        listener = Some(l);
                        backoff = LISTEN_BACKOFF_MIN;
                        // Whatever committed before LISTEN took effect was never notified to us.
                        catch_up(&state).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, retry_in = ?backoff, "change feed: cannot listen; polling meanwhile");
                        connect_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
                    }
                }
            }
        }
    }
    // Stopping ends a pass in flight too (its transaction rolls back; the next one redoes it).
    if let Some(p) = pruning {
        p.abort();
    }
}

async fn next_notification(listener: &mut Option<ChangeListener>) -> Result<bool, StoreError> {
    match listener {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

async fn connected(connecting: &mut Option<Connecting>) -> Result<ChangeListener, StoreError> {
    match connecting {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn prune(state: Arc<State>) {
    let now = crate::store::now_unix();
    let pruned = timeout(
        REFRESH_TIMEOUT,
        state
            .store
            .prune(now, CHANGE_RETENTION_SECS, LOGIN_RETENTION_SECS),
    )
    .await;
    if let Ok(Err(e)) = pruned
        && !e.is_unavailable()
    {
        tracing::warn!(error = %e, "change feed: pruning failed");
    }
}

async fn catch_up(state: &State) {
    let seq = match timeout(PROBE_TIMEOUT, state.store.change_seq()).await {
        Ok(result) => {
            // Unavailability is logged once per outage, by `State::note_store`.
            state.note_store(&result);
            match result {
                Ok(seq) => seq,
                Err(e) => {
                    if !e.is_unavailable() {
                        tracing::warn!(error = %e, "change feed: cannot read the change sequence");
                    }
                    return;
                }
            }
        }
        Err(_) => {
            state.note_store_timeout();
            return;
        }
    };
    match timeout(REFRESH_TIMEOUT, state.refresh_if_behind(seq)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.is_unavailable() => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "change feed: refresh failed"),
        Err(_) => state.note_store_timeout(),
    }
}

/// Looks the host names of `control_url` and of the upstream up again and again (nothing to
/// do for IP addresses).
pub async fn resolve_control(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let upstreams = state.upstreams.targets();
    let targets: Vec<&ControlTarget> = std::iter::once(&state.control)
        .chain(upstreams.iter().map(|t| t.as_ref()))
        .collect();
    if !targets.iter().any(|t| t.needs_resolution()) {
        return;
    }
    let mut tick = interval(RESOLVE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = vec![false; targets.len()];
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {
                for (target, failing) in targets.iter().zip(failing.iter_mut()) {
                    match target.resolve().await {
                        Ok(_) => *failing = false,
                        Err(e) => {
                            if !*failing {
                                tracing::warn!(url = %target.url().url, error = %e, "cannot resolve a host name; keeping the last addresses");
                            }
                            *failing = true;
                        }
                    }
                }
            }
        }
    }
}
