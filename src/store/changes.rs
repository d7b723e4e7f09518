//! The change feed: every write appends rows to `changes` in its own transaction, naming what
//! changed, so every instance applies exactly those changes to its caches.

use sqlx::Row;

use super::*;

/// The PostgreSQL channel every change is notified on (by `record_change`, at commit).
pub const CHANGE_CHANNEL: &str = "fhirgate_changes";

/// A dedicated PostgreSQL connection that LISTENs on [`CHANGE_CHANNEL`].
pub struct ChangeListener(sqlx::postgres::PgListener);

impl std::fmt::Debug for ChangeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeListener")
    }
}

impl ChangeListener {
    /// Waits for the next notification (`Ok(true)`). `Ok(false)`: the connection was lost, and
    /// with it any notification sent meanwhile; the caller re-reads the change sequence and
    /// connects a new listener when it sees fit (this one does not reconnect by itself).
    pub async fn next(&mut self) -> Result<bool> {
        Ok(self.0.try_recv().await?.is_some())
    }
}

/// The settings key of [`Store::changes_pruned_through`].
const CHANGES_PRUNED_SETTING: &str = "changes.pruned_through";

/// One row of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    /// The resource type (`ProjectMembership`, `Login`, `JsonWebKey` …).
    pub kind: String,
    /// What changed (`ProjectMembership/123`, `Login/abc`); `None`: anything of `kind`.
    pub subject: Option<String>,
}

impl Store {
    /// The latest change sequence number; it grows with every write.
    pub async fn change_seq(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("seq")?)
    }

    /// Appends to the change feed one row per changed thing (`Type/id`, `Login/id`; its kind is
    /// the subject's type), or one row of `kind` without a subject when the change cannot be
    /// pinned down (then every instance drops what it cached of `kind`). Call it last in the
    /// transaction, right before `commit`.
    ///
    /// On PostgreSQL a sequence value is taken when the row is inserted, not when it commits: a
    /// transaction holding seq 10 could commit after another one holding 11, and a poller that
    /// had already seen 11 would never notice 10. A transaction-scoped lock taken here makes seq
    /// order commit order (it is held from here to commit, so only this last step is serialised).
    pub(super) async fn record_change(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        kind: &str,
        subjects: &[String],
    ) -> Result<()> {
        xact_lock(tx, CHANGE_FEED_LOCK).await?;
        let now = now_unix();
        // A row names its own subject's type (a batch writes several), so readers can go by
        // `kind` alone.
        let rows: Vec<(&str, Option<&str>)> = if subjects.is_empty() {
            vec![(kind, None)]
        } else {
            subjects
                .iter()
                .map(|s| {
                    (
                        s.split_once('/').map_or(kind, |(ty, _)| ty),
                        Some(s.as_str()),
                    )
                })
                .collect()
        };
        for (kind, subject) in rows {
            sqlx::query("INSERT INTO changes (kind, subject, at) VALUES ($1, $2, $3)")
                .bind(kind)
                .bind(subject.map(str::to_string))
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
        if tx.backend_name() == POSTGRES_BACKEND {
            // Delivered at commit (and dropped on rollback), so a listener that wakes up finds
            // the change already visible. The payload is empty: listeners re-read the sequence.
            sqlx::query("SELECT 1 AS notified FROM pg_notify($1, '')")
                .bind(CHANGE_CHANNEL)
                .fetch_one(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The changes after `seq`, oldest first, at most `limit`.
    pub async fn changes_after(&self, seq: i64, limit: i64) -> Result<Vec<Change>> {
        let rows = sqlx::query(
            "SELECT seq, kind, subject FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Change {
                    seq: r.try_get("seq")?,
                    kind: r.try_get("kind")?,
                    subject: r.try_get("subject")?,
                })
            })
            .collect()
    }

    /// The newest change the feed no longer holds (0: none pruned yet). An instance that has
    /// applied less than this missed changes, and must drop everything it cached.
    pub async fn changes_pruned_through(&self) -> Result<i64> {
        Ok(self
            .setting(CHANGES_PRUNED_SETTING)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Housekeeping any instance may run at any time (it is idempotent): drops changes older
    /// than `keep` seconds (the newest always stays, it carries the sequence), and Logins that
    /// expired more than `keep_logins` seconds ago (no token of theirs can be valid, so
    /// forgetting them — revoked or not — changes no answer: an unknown Login is refused).
    ///
    /// It does not take the feed's lock: writers only ever append above the newest row, which
    /// stays, so a long pass (a first one over a large backlog) never holds up a write. The
    /// deletion and the new `changes.pruned_through` commit together, and that mark only grows,
    /// so a reader that finds changes missing always sees why.
    pub async fn prune(&self, now: i64, keep: i64, keep_logins: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) AS seq FROM changes WHERE at < $1 AND seq < (SELECT MAX(seq) FROM changes)",
        )
        .bind(now - keep)
        .fetch_one(&mut *tx)
        .await?;
        let through: i64 = row.try_get("seq")?;
        if through > 0 {
            sqlx::query("DELETE FROM changes WHERE seq <= $1")
                .bind(through)
                .execute(&mut *tx)
                .await?;
            // Two passes may race: the mark keeps the larger of the two.
            sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE CAST(settings.value AS BIGINT) < CAST(excluded.value AS BIGINT)")
                .bind(CHANGES_PRUNED_SETTING)
                .bind(through.to_string())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM logins WHERE expires_at < $1")
            .bind(now - keep_logins)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Opens a [`ChangeListener`] on the PostgreSQL store at `url` (its own connection, outside
    /// the pool). Fails within a few seconds when the database cannot be reached.
    pub async fn change_listener(url: &str) -> Result<ChangeListener> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .max_lifetime(None)
            .idle_timeout(None)
            .connect(url)
            .await?;
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        // Reconnecting is the caller's business (with its own backoff): a lost connection must
        // come back as `Ok(false)` at once, not after the pool has retried for seconds.
        listener.eager_reconnect(false);
        listener.listen(CHANGE_CHANNEL).await?;
        Ok(ChangeListener(listener))
    }
}
