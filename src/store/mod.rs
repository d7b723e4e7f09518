//! The store: identity resources (Project, User, ProjectMembership, ClientApplication,
//! AccessPolicy) as FHIR JSON plus search index rows, client secret hashes, Logins, signing keys
//! and a change feed. Invariant: this is the only module that speaks SQL or imports sqlx.
//!
//! One implementation over sqlx's `Any` driver serves SQLite and PostgreSQL: the queries use
//! `$n` placeholders and portable types (TEXT, BIGINT), and only the migrations differ by dialect.
//! Every write also appends to `changes` in the same transaction, so other instances (and the
//! local snapshot refresher) see that something changed by polling one number.
//!
//! Rules that keep a query right on both (the store tests run on both):
//! - integers are BIGINT and decode as `i64`; booleans are BIGINT 0/1 (`revoked = 1`);
//! - every selected column must have a type the `Any` driver knows (TEXT, BIGINT, INTEGER,
//!   BOOLEAN, REAL): select a constant from a function returning `void`, never the call itself;
//! - `=` and `IN` compare case-sensitively on both; for case-insensitive matches store a
//!   lower-cased value (index rows) or compare `LOWER(a) = LOWER($n)`, never `LIKE`
//!   (case-insensitive on SQLite, case-sensitive on PostgreSQL);
//! - concurrent writers are real on PostgreSQL (several instances, READ COMMITTED): a
//!   read-then-write must be a compare-and-swap (`UPDATE … WHERE col = $old`, check
//!   `rows_affected`), and a duplicate insert surfaces as a unique violation;
//! - `record_change` is the last statement of a transaction (it serialises commits, see there).

mod migrations;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored JSON is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("version conflict")]
    VersionConflict,
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Conflict,
    #[error("cannot open store: {0}")]
    Open(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A stored identity resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub project_id: Option<String>,
    pub version_id: String,
    pub last_updated: String,
    /// The full resource, `meta.versionId` and `meta.lastUpdated` included.
    pub content: Value,
}

/// A Login: one per authentication session (docs/medplum-compat.md §1.5).
#[derive(Debug, Clone, PartialEq)]
pub struct LoginRecord {
    pub id: String,
    /// `User/…` or `ClientApplication/…`.
    pub user_ref: String,
    pub client_id: Option<String>,
    pub membership_id: Option<String>,
    pub project_id: Option<String>,
    pub scope: String,
    pub auth_method: String,
    pub auth_time: i64,
    /// After this (unix seconds) no token of this Login can be valid any more.
    pub expires_at: i64,
    pub revoked: bool,
    pub remote_address: Option<String>,
    pub code: Option<String>,
    pub refresh_secret: Option<String>,
    /// Everything else (PKCE challenge, nonce, redirect URI, granted, MFA state …).
    pub extra: Value,
}

/// A signing key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub id: String,
    pub alg: String,
    /// PKCS#8 DER sealed with the key-encryption key (`crate::sealed`); a key written before
    /// sealing existed holds it base64 in clear until the next start seals it.
    pub private_der: String,
    pub active: bool,
    pub created_at: i64,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect)
            .finish()
    }
}

/// A duplicate key (another writer created the same row first) is a conflict, not a failure.
fn conflict_on_duplicate(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Db(e),
    }
}

fn row_to_resource(row: &AnyRow) -> Result<StoredResource> {
    let content: String = row.try_get("content")?;
    Ok(StoredResource {
        resource_type: row.try_get("resource_type")?,
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        version_id: row.try_get("version_id")?,
        last_updated: row.try_get("last_updated")?,
        content: serde_json::from_str(&content)?,
    })
}

fn row_to_login(row: &AnyRow) -> Result<LoginRecord> {
    let extra: String = row.try_get("extra")?;
    Ok(LoginRecord {
        id: row.try_get("id")?,
        user_ref: row.try_get("user_ref")?,
        client_id: row.try_get("client_id")?,
        membership_id: row.try_get("membership_id")?,
        project_id: row.try_get("project_id")?,
        scope: row.try_get("scope")?,
        auth_method: row.try_get("auth_method")?,
        auth_time: row.try_get("auth_time")?,
        expires_at: row.try_get("expires_at")?,
        revoked: row.try_get::<i64, _>("revoked")? != 0,
        remote_address: row.try_get("remote_address")?,
        code: row.try_get("code")?,
        refresh_secret: row.try_get("refresh_secret")?,
        extra: serde_json::from_str(&extra)?,
    })
}

/// `AnyConnection::backend_name` of PostgreSQL connections.
const POSTGRES_BACKEND: &str = "PostgreSQL";
/// PostgreSQL advisory lock keys (one namespace per database; arbitrary but fixed).
const CHANGE_FEED_LOCK: i64 = 0x6668_6972_6761_7401;
const MIGRATION_LOCK: i64 = 0x6668_6972_6761_7402;

/// Takes the PostgreSQL advisory lock `key` until the transaction ends (nothing on SQLite, whose
/// write transactions are serial already).
async fn xact_lock(tx: &mut sqlx::Transaction<'_, sqlx::Any>, key: i64) -> Result<()> {
    if tx.backend_name() == POSTGRES_BACKEND {
        sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
            .bind(key)
            .fetch_one(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Runs a compare-and-swap `UPDATE`: true when it changed exactly one row.
async fn swapped(
    pool: &AnyPool,
    update: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
) -> Result<bool> {
    Ok(update.execute(pool).await?.rows_affected() == 1)
}

const RESOURCE_COLUMNS: &str = "resource_type, id, project_id, version_id, last_updated, content";
const LOGIN_COLUMNS: &str = "id, user_ref, client_id, membership_id, project_id, scope, auth_method, auth_time, expires_at, revoked, remote_address, code, refresh_secret, extra";

/// The SQLite store holds password hashes, secret hashes and signing keys: a directory fhirgate
/// creates for it is 0700 and the database file 0600 (SQLite gives its `-wal` and `-shm` files
/// the database's mode). Existing directories and files keep the modes the operator gave them.
fn create_private(db: &std::path::Path, parent: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(db)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// A store URL fit for a message: no password, no query.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.scheme().starts_with("postgres") => {
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        _ => url.split('?').next().unwrap_or(url).to_string(),
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the store at `url` with the default pool size.
    pub async fn open(url: &str) -> Result<Store> {
        Self::open_with(url, None).await
    }

    /// Opens and migrates the store at `url` (`sqlite://PATH` or `postgres://…`) with at most
    /// `max_connections` pooled connections (default: 4 for SQLite, 16 for PostgreSQL).
    pub async fn open_with(url: &str, max_connections: Option<u32>) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        let mut url = url.to_string();
        if dialect == Dialect::Sqlite {
            if let Some(path) = url
                .strip_prefix("sqlite://")
                .map(|p| p.split('?').next().unwrap_or(p).to_string())
                && path != ":memory:"
                && let Some(parent) = std::path::Path::new(&path).parent()
                && !parent.as_os_str().is_empty()
            {
                create_private(std::path::Path::new(&path), parent)
                    .map_err(|e| StoreError::Open(format!("{}: {e}", parent.display())))?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let default_max = match dialect {
            // One writer at a time anyway; a few readers beside it.
            Dialect::Sqlite => 4,
            Dialect::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.unwrap_or(default_max).max(1))
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        sqlx::query("PRAGMA journal_mode=WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout=5000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous=NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(e) => {
                // A pool says only that it timed out: one plain connection says why.
                let reason = match e {
                    sqlx::Error::PoolTimedOut => {
                        use sqlx::Connection;
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            sqlx::AnyConnection::connect(&url),
                        )
                        .await
                        {
                            Ok(Err(direct)) => direct.to_string(),
                            Ok(Ok(_)) | Err(_) => e.to_string(),
                        }
                    }
                    other => other.to_string(),
                };
                return Err(StoreError::Open(format!(
                    "{}: {reason}",
                    without_password(&url)
                )));
            }
        };
        let store = Store { pool, dialect };
        migrations::run(&store.pool, dialect).await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// A transaction that writes. SQLite takes its single write lock up front (`BEGIN
    /// IMMEDIATE`, waiting up to the busy timeout), so a read-then-write cannot fail later on a
    /// snapshot another writer made stale; PostgreSQL relies on row locks and compare-and-swap.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    /// A cheap liveness probe for readiness.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // === settings ===

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>("value")).transpose()?)
    }

    /// Sets `key` only if it has no value yet; returns the value in force.
    pub async fn setting_init(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        self.setting(key).await?.ok_or(StoreError::NotFound)
    }

    /// Removes `key` (a value that must no longer be kept, e.g. one now stored sealed).
    pub async fn delete_setting(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM settings WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the first use of a client assertion, kept until `expires_at`: false when it was
    /// used before, on any instance sharing this store. Expired records are dropped first.
    pub async fn claim_assertion(&self, key: &str, expires_at: i64, now: i64) -> Result<bool> {
        sqlx::query("DELETE FROM used_assertions WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO used_assertions (key, expires_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    // === change feed ===

    /// The latest change sequence number; it grows with every write.
    pub async fn change_seq(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("seq")?)
    }

    /// Appends to the change feed; call it last in the transaction, right before `commit`.
    ///
    /// On PostgreSQL a sequence value is taken when the row is inserted, not when it commits: a
    /// transaction holding seq 10 could commit after another one holding 11, and a poller that
    /// had already seen 11 would never notice 10. A transaction-scoped lock taken here makes seq
    /// order commit order (it is held from here to commit, so only this last step is serialised).
    async fn record_change(tx: &mut sqlx::Transaction<'_, sqlx::Any>, kind: &str) -> Result<()> {
        xact_lock(tx, CHANGE_FEED_LOCK).await?;
        sqlx::query("INSERT INTO changes (kind, at) VALUES ($1, $2)")
            .bind(kind)
            .bind(now_unix())
            .execute(&mut **tx)
            .await?;
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

    // === identity resources ===

    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<StoredResource>> {
        let sql = format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources WHERE resource_type = $1 AND id = $2"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(resource_type)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_resource).transpose()
    }

    /// All resources of a type (for snapshots), oldest first.
    pub async fn list(&self, resource_type: &str) -> Result<Vec<StoredResource>> {
        let sql = format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources WHERE resource_type = $1 ORDER BY last_updated, id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(resource_type)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_resource).collect()
    }

    /// Resources of a type whose index rows match every `(name, value)` filter (AND; a filter's
    /// values are alternatives). `project` limits to one project.
    pub async fn search(
        &self,
        resource_type: &str,
        filters: &[(String, Vec<String>)],
        project: Option<&str>,
        limit: i64,
    ) -> Result<Vec<StoredResource>> {
        let mut sql =
            format!("SELECT {RESOURCE_COLUMNS} FROM resources r WHERE r.resource_type = $1");
        let mut binds: Vec<String> = vec![resource_type.to_string()];
        if let Some(p) = project {
            binds.push(p.to_string());
            sql.push_str(&format!(" AND r.project_id = ${}", binds.len()));
        }
        for (name, values) in filters {
            if values.is_empty() {
                continue;
            }
            binds.push(name.clone());
            let name_slot = binds.len();
            let mut slots = Vec::new();
            for v in values {
                binds.push(v.clone());
                slots.push(format!("${}", binds.len()));
            }
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM resource_index i WHERE i.resource_type = r.resource_type AND i.id = r.id AND i.name = ${name_slot} AND i.value IN ({}))",
                slots.join(", ")
            ));
        }
        sql.push_str(&format!(
            " ORDER BY r.last_updated, r.id LIMIT {}",
            limit.clamp(1, 10_000)
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in &binds {
            q = q.bind(b.clone());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(row_to_resource).collect()
    }

    /// Creates or replaces a resource. `expected_version`: `Some(v)` requires the current version
    /// to be `v`; `create_only` refuses to overwrite. Returns the stored form with new meta.
    pub async fn put(
        &self,
        content: Value,
        project_id: Option<&str>,
        index: &[(String, String)],
        expected_version: Option<&str>,
        create_only: bool,
    ) -> Result<StoredResource> {
        let mut tx = self.begin_write().await?;
        let stored = Self::put_in_tx(
            &mut tx,
            content,
            project_id,
            index,
            expected_version,
            create_only,
        )
        .await?;
        Self::record_change(&mut tx, &stored.resource_type).await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub async fn delete(&self, resource_type: &str, id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM resources WHERE resource_type = $1 AND id = $2")
            .bind(resource_type)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM resource_index WHERE resource_type = $1 AND id = $2")
            .bind(resource_type)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if resource_type == "ClientApplication" {
            sqlx::query("DELETE FROM client_secrets WHERE client_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Self::record_change(&mut tx, resource_type).await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    // === client secrets (keyed hashes, never the secret) ===

    pub async fn set_client_secret(
        &self,
        client_id: &str,
        secret_hash: Option<&str>,
        retiring_hash: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO client_secrets (client_id, secret_hash, retiring_hash) VALUES ($1, $2, $3) ON CONFLICT (client_id) DO UPDATE SET secret_hash = excluded.secret_hash, retiring_hash = excluded.retiring_hash")
            .bind(client_id)
            .bind(secret_hash.map(str::to_string))
            .bind(retiring_hash.map(str::to_string))
            .execute(&mut *tx)
            .await?;
        Self::record_change(&mut tx, "ClientSecret").await?;
        tx.commit().await?;
        Ok(())
    }

    /// `(client_id, secret_hash, retiring_hash)` of every client.
    pub async fn client_secrets(&self) -> Result<Vec<(String, Option<String>, Option<String>)>> {
        let rows = sqlx::query("SELECT client_id, secret_hash, retiring_hash FROM client_secrets")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("client_id")?,
                    r.try_get("secret_hash")?,
                    r.try_get("retiring_hash")?,
                ))
            })
            .collect()
    }

    // === logins ===

    pub async fn insert_login(&self, l: &LoginRecord) -> Result<()> {
        let sql = format!(
            "INSERT INTO logins ({LOGIN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&l.id)
            .bind(&l.user_ref)
            .bind(l.client_id.clone())
            .bind(l.membership_id.clone())
            .bind(l.project_id.clone())
            .bind(&l.scope)
            .bind(&l.auth_method)
            .bind(l.auth_time)
            .bind(l.expires_at)
            .bind(i64::from(l.revoked))
            .bind(l.remote_address.clone())
            .bind(l.code.clone())
            .bind(l.refresh_secret.clone())
            .bind(serde_json::to_string(&l.extra)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn login(&self, id: &str) -> Result<Option<LoginRecord>> {
        self.login_where("id = $1", id).await
    }

    /// The first Login matching `condition`, a fixed SQL condition on the one bound `value`.
    async fn login_where(&self, condition: &str, value: &str) -> Result<Option<LoginRecord>> {
        let sql = format!("SELECT {LOGIN_COLUMNS} FROM logins WHERE {condition} LIMIT 1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(value)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_login).transpose()
    }

    /// Compare-and-swap of a Login's `extra`: written only if the stored `extra` is still
    /// `expected` (as read), so concurrent updates on several instances cannot lose one another.
    /// False when it changed in between (or the Login is gone, or revoked): read and retry.
    pub async fn update_login_extra_cas(
        &self,
        id: &str,
        expected: &Value,
        new: &Value,
    ) -> Result<bool> {
        let update = sqlx::query(
            "UPDATE logins SET extra = $3 WHERE id = $1 AND extra = $2 AND revoked = 0",
        )
        .bind(id)
        .bind(serde_json::to_string(expected)?)
        .bind(serde_json::to_string(new)?);
        swapped(&self.pool, update).await
    }

    /// Marks a Login revoked; returns false if it does not exist.
    pub async fn revoke_login(&self, id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("UPDATE logins SET revoked = 1 WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        Self::record_change(&mut tx, "Login").await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Revokes every Login of `user_ref` (`User/…`, or a client's reference) and, when given,
    /// only those of one membership. Returns how many were revoked. Every instance sees it with
    /// the next snapshot (the `Login` change), so all their tokens stop within the budget.
    pub async fn revoke_logins_of(
        &self,
        user_ref: &str,
        membership_id: Option<&str>,
    ) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let n = match membership_id {
            None => {
                sqlx::query("UPDATE logins SET revoked = 1 WHERE user_ref = $1 AND revoked = 0")
                    .bind(user_ref)
                    .execute(&mut *tx)
                    .await?
            }
            Some(m) => {
                sqlx::query("UPDATE logins SET revoked = 1 WHERE user_ref = $1 AND membership_id = $2 AND revoked = 0")
                    .bind(user_ref)
                    .bind(m)
                    .execute(&mut *tx)
                    .await?
            }
        }
        .rows_affected();
        Self::record_change(&mut tx, "Login").await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Logins of one user (`User/…`) authenticated at or after `since` (unix seconds), newest
    /// first, at most 100.
    pub async fn logins_for_user(&self, user_ref: &str, since: i64) -> Result<Vec<LoginRecord>> {
        let sql = format!(
            "SELECT {LOGIN_COLUMNS} FROM logins WHERE user_ref = $1 AND auth_time >= $2 ORDER BY auth_time DESC LIMIT 100"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user_ref)
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_login).collect()
    }

    /// Ids of revoked Logins whose tokens could still be unexpired.
    pub async fn revoked_logins(&self, now: i64) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM logins WHERE revoked = 1 AND expires_at > $1")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("id")?))
            .collect()
    }

    /// Users whose lower-cased e-mail is `email`: those of `project` when given, else the
    /// server-scoped ones (no project), as Medplum's `getUserByEmail` looks them up.
    pub async fn users_by_email(
        &self,
        email: &str,
        project: Option<&str>,
    ) -> Result<Vec<StoredResource>> {
        let scope = match project {
            Some(_) => "r.project_id = $2",
            None => "r.project_id IS NULL",
        };
        let sql = format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources r WHERE r.resource_type = 'User' AND {scope} AND EXISTS (SELECT 1 FROM resource_index i WHERE i.resource_type = r.resource_type AND i.id = r.id AND i.name = 'email' AND i.value = $1) ORDER BY r.last_updated, r.id LIMIT 10"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(email.to_string());
        if let Some(p) = project {
            q = q.bind(p.to_string());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(row_to_resource).collect()
    }

    /// Writes the flow state of a Login that has no tokens yet (membership, project, scope,
    /// expiry, address, refresh secret hash, `extra`). False when the Login is gone or revoked.
    pub async fn update_login(&self, l: &LoginRecord) -> Result<bool> {
        let update = sqlx::query("UPDATE logins SET membership_id = $2, project_id = $3, scope = $4, expires_at = $5, remote_address = $6, refresh_secret = $7, extra = $8 WHERE id = $1 AND revoked = 0")
            .bind(&l.id)
            .bind(l.membership_id.clone())
            .bind(l.project_id.clone())
            .bind(&l.scope)
            .bind(l.expires_at)
            .bind(l.remote_address.clone())
            .bind(l.refresh_secret.clone())
            .bind(serde_json::to_string(&l.extra)?);
        swapped(&self.pool, update).await
    }

    /// Replaces a Login's authorization code (stored as a hash) and `extra`, compare-and-swap on
    /// the code read before (`expected`, `None` for no code): a code granted or replaced in
    /// between, or a revocation, makes it false.
    pub async fn set_login_code(
        &self,
        id: &str,
        expected: Option<&str>,
        code_hash: &str,
        extra: &Value,
    ) -> Result<bool> {
        let update = sqlx::query("UPDATE logins SET code = $2, extra = $3 WHERE id = $1 AND revoked = 0 AND COALESCE(code, '') = $4")
            .bind(id)
            .bind(code_hash)
            .bind(serde_json::to_string(extra)?)
            .bind(expected.unwrap_or_default());
        swapped(&self.pool, update).await
    }

    /// The Login whose `code` column holds `value`.
    pub async fn login_by_code(&self, value: &str) -> Result<Option<LoginRecord>> {
        self.login_where("code = $1", value).await
    }

    /// Redeems an authorization code: compare-and-swap of the `code` column from `code_hash` to
    /// `granted`, writing the refresh secret hash, expiry and `extra` of the granted Login. False
    /// when another request redeemed it first or the Login was revoked: exactly one wins.
    pub async fn redeem_login_code(
        &self,
        id: &str,
        code_hash: &str,
        granted: &str,
        refresh_secret: Option<&str>,
        expires_at: i64,
        extra: &Value,
    ) -> Result<bool> {
        let update = sqlx::query("UPDATE logins SET code = $3, refresh_secret = $4, expires_at = $5, extra = $6 WHERE id = $1 AND code = $2 AND revoked = 0")
            .bind(id)
            .bind(code_hash)
            .bind(granted)
            .bind(refresh_secret.map(str::to_string))
            .bind(expires_at)
            .bind(serde_json::to_string(extra)?);
        swapped(&self.pool, update).await
    }

    /// Rotates a refresh secret (hashes): compare-and-swap from `old` to `new`, so a refresh
    /// token can be used once even when two instances see it at the same time.
    pub async fn rotate_refresh_secret(
        &self,
        id: &str,
        old: &str,
        new: &str,
        expires_at: i64,
        remote_address: Option<&str>,
    ) -> Result<bool> {
        let update = sqlx::query("UPDATE logins SET refresh_secret = $3, expires_at = $4, remote_address = COALESCE($5, remote_address) WHERE id = $1 AND refresh_secret = $2 AND revoked = 0")
            .bind(id)
            .bind(old)
            .bind(new)
            .bind(expires_at)
            .bind(remote_address.map(str::to_string));
        swapped(&self.pool, update).await
    }

    // === signing keys ===

    pub async fn insert_key(&self, k: &StoredKey) -> Result<()> {
        let mut tx = self.begin_write().await?;
        Self::insert_key_in_tx(&mut tx, k).await?;
        Self::record_change(&mut tx, "JsonWebKey").await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_key_in_tx(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        k: &StoredKey,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO signing_keys (id, alg, private_der, active, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&k.id)
            .bind(&k.alg)
            .bind(&k.private_der)
            .bind(i64::from(k.active))
            .bind(k.created_at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Every stored key's id and private half as stored, retired ones included.
    pub async fn key_secrets(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, private_der FROM signing_keys ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("private_der")?)))
            .collect()
    }

    /// Replaces a key's private half, only if it is still `old` (another instance may have
    /// replaced it first).
    pub async fn replace_key_secret(&self, id: &str, old: &str, new: &str) -> Result<()> {
        sqlx::query("UPDATE signing_keys SET private_der = $1 WHERE id = $2 AND private_der = $3")
            .bind(new)
            .bind(id)
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Active keys, oldest first (the first one signs, as in Medplum).
    pub async fn active_keys(&self) -> Result<Vec<StoredKey>> {
        let rows = sqlx::query("SELECT id, alg, private_der, active, created_at FROM signing_keys WHERE active = 1 ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredKey {
                    id: r.try_get("id")?,
                    alg: r.try_get("alg")?,
                    private_der: r.try_get("private_der")?,
                    active: r.try_get::<i64, _>("active")? != 0,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }
}

// === people: one-time security requests and multi-resource writes ===

/// A one-time security request (Medplum's `UserSecurityRequest`): an invite, reset or
/// verify-email link. Only a keyed hash of the link's secret is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityRequest {
    pub id: String,
    /// `invite`, `reset` or `verify-email`.
    pub kind: String,
    pub user_id: String,
    pub secret_hash: String,
    pub redirect_uri: Option<String>,
    pub created_at: i64,
    /// Unix seconds after which the link is refused.
    pub expires_at: i64,
    pub used: bool,
}

/// One step of [`Store::write_batch`].
#[derive(Debug, Clone)]
pub enum BatchWrite {
    /// As [`Store::put`].
    Put {
        content: Value,
        project_id: Option<String>,
        index: Vec<(String, String)>,
        expected_version: Option<String>,
        create_only: bool,
    },
    /// Claims `key` for the resource `(resource_type, id)`: [`StoreError::Conflict`] when a
    /// resource that still exists holds it. A claim whose resource was deleted is taken over.
    Claim {
        key: String,
        resource_type: String,
        id: String,
    },
    /// Stores a new security request; the user's earlier unused requests of the same kind are
    /// marked used (a new link supersedes the old ones).
    NewSecurityRequest(SecurityRequest),
    /// Marks an unused, unexpired security request used: [`StoreError::Conflict`] when another
    /// redemption (on any instance) came first.
    RedeemSecurityRequest { id: String, now: i64 },
}

fn row_to_security_request(row: &AnyRow) -> Result<SecurityRequest> {
    Ok(SecurityRequest {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        user_id: row.try_get("user_id")?,
        secret_hash: row.try_get("secret_hash")?,
        redirect_uri: row.try_get("redirect_uri")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        used: row.try_get::<i64, _>("used")? != 0,
    })
}

impl Store {
    pub async fn security_request(&self, id: &str) -> Result<Option<SecurityRequest>> {
        let row = sqlx::query("SELECT id, kind, user_id, secret_hash, redirect_uri, created_at, expires_at, used FROM security_requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_security_request).transpose()
    }

    /// Applies every step in one transaction: all of them, or none (the first failing step's
    /// error). Returns the stored form of each `Put`, in order.
    pub async fn write_batch(&self, writes: Vec<BatchWrite>) -> Result<Vec<StoredResource>> {
        let mut tx = self.begin_write().await?;
        let mut stored = Vec::new();
        let mut kind = "Batch".to_string();
        for w in writes {
            match w {
                BatchWrite::Put {
                    content,
                    project_id,
                    index,
                    expected_version,
                    create_only,
                } => {
                    let r = Self::put_in_tx(
                        &mut tx,
                        content,
                        project_id.as_deref(),
                        &index,
                        expected_version.as_deref(),
                        create_only,
                    )
                    .await?;
                    kind = r.resource_type.clone();
                    stored.push(r);
                }
                BatchWrite::Claim {
                    key,
                    resource_type,
                    id,
                } => Self::claim_in_tx(&mut tx, &key, &resource_type, &id).await?,
                BatchWrite::NewSecurityRequest(r) => {
                    sqlx::query("UPDATE security_requests SET used = 1 WHERE user_id = $1 AND kind = $2 AND used = 0")
                        .bind(&r.user_id)
                        .bind(&r.kind)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("INSERT INTO security_requests (id, kind, user_id, secret_hash, redirect_uri, created_at, expires_at, used) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                        .bind(&r.id)
                        .bind(&r.kind)
                        .bind(&r.user_id)
                        .bind(&r.secret_hash)
                        .bind(r.redirect_uri.clone())
                        .bind(r.created_at)
                        .bind(r.expires_at)
                        .bind(i64::from(r.used))
                        .execute(&mut *tx)
                        .await
                        .map_err(conflict_on_duplicate)?;
                }
                BatchWrite::RedeemSecurityRequest { id, now } => {
                    let n = sqlx::query("UPDATE security_requests SET used = 1 WHERE id = $1 AND used = 0 AND expires_at > $2")
                        .bind(&id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if n != 1 {
                        return Err(StoreError::Conflict);
                    }
                }
            }
        }
        Self::record_change(&mut tx, &kind).await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// [`BatchWrite::Claim`] inside a caller's transaction.
    async fn claim_in_tx(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        key: &str,
        resource_type: &str,
        id: &str,
    ) -> Result<()> {
        // A claim whose resource is gone is stale: drop it, so it can be taken over.
        sqlx::query("DELETE FROM unique_keys WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM resources r WHERE r.resource_type = unique_keys.resource_type AND r.id = unique_keys.id)")
            .bind(key)
            .execute(&mut **tx)
            .await?;
        let inserted = sqlx::query("INSERT INTO unique_keys (key, resource_type, id) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(resource_type)
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(conflict_on_duplicate)?
            .rows_affected()
            == 1;
        // Held already: fine when by this very resource (an update claims again).
        if !inserted
            && sqlx::query("SELECT 1 AS held FROM unique_keys WHERE key = $1 AND resource_type = $2 AND id = $3")
                .bind(key)
                .bind(resource_type)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?
                .is_none()
        {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    /// [`Store::put`] inside a caller's transaction (no change record: the caller adds one).
    async fn put_in_tx(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        mut content: Value,
        project_id: Option<&str>,
        index: &[(String, String)],
        expected_version: Option<&str>,
        create_only: bool,
    ) -> Result<StoredResource> {
        let resource_type = content
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let id = content
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if resource_type.is_empty() || id.is_empty() {
            return Err(StoreError::NotFound);
        }
        // PostgreSQL: lock the row until commit, so the version read is the one replaced (an
        // unconditional write then waits for a concurrent one instead of failing the CAS below).
        // SQLite's write transactions are serial already (`BEGIN IMMEDIATE`).
        let sql = if tx.backend_name() == POSTGRES_BACKEND {
            "SELECT version_id FROM resources WHERE resource_type = $1 AND id = $2 FOR UPDATE"
        } else {
            "SELECT version_id FROM resources WHERE resource_type = $1 AND id = $2"
        };
        let current = sqlx::query(sql)
            .bind(&resource_type)
            .bind(&id)
            .fetch_optional(&mut **tx)
            .await?;
        let current_version: Option<String> =
            current.map(|r| r.try_get("version_id")).transpose()?;
        if create_only && current_version.is_some() {
            return Err(StoreError::Conflict);
        }
        if let Some(expected) = expected_version
            && current_version.as_deref() != Some(expected)
        {
            return Err(StoreError::VersionConflict);
        }
        let version_id = uuid::Uuid::new_v4().to_string();
        let last_updated = now_rfc3339();
        if let Some(obj) = content.as_object_mut() {
            let meta = obj
                .entry("meta")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert("versionId".into(), Value::String(version_id.clone()));
                meta.insert("lastUpdated".into(), Value::String(last_updated.clone()));
                if let Some(p) = project_id {
                    meta.insert("project".into(), Value::String(p.to_string()));
                }
            }
        }
        let text = serde_json::to_string(&content)?;
        if let Some(read_version) = &current_version {
            // Compare-and-swap on the version read above: another instance's write in between
            // (PostgreSQL, READ COMMITTED) makes this update match nothing instead of losing it.
            let n = sqlx::query("UPDATE resources SET project_id = $3, version_id = $4, last_updated = $5, content = $6 WHERE resource_type = $1 AND id = $2 AND version_id = $7")
                .bind(&resource_type)
                .bind(&id)
                .bind(project_id.map(str::to_string))
                .bind(&version_id)
                .bind(&last_updated)
                .bind(&text)
                .bind(read_version)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if n != 1 {
                return Err(StoreError::VersionConflict);
            }
            sqlx::query("DELETE FROM resource_index WHERE resource_type = $1 AND id = $2")
                .bind(&resource_type)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
        } else {
            sqlx::query("INSERT INTO resources (resource_type, id, project_id, version_id, last_updated, content) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&resource_type)
                .bind(&id)
                .bind(project_id.map(str::to_string))
                .bind(&version_id)
                .bind(&last_updated)
                .bind(&text)
                .execute(&mut **tx)
                .await
                .map_err(conflict_on_duplicate)?;
        }
        for (name, value) in index {
            sqlx::query("INSERT INTO resource_index (resource_type, id, name, value) VALUES ($1, $2, $3, $4)")
                .bind(&resource_type)
                .bind(&id)
                .bind(name)
                .bind(value)
                .execute(&mut **tx)
                .await?;
        }
        Ok(StoredResource {
            resource_type,
            id,
            project_id: project_id.map(str::to_string),
            version_id,
            last_updated,
            content,
        })
    }
}

/// The PostgreSQL test harness of the integration tests, shared by the store's test modules (one
/// throwaway cluster per test binary).
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
mod test_pg;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod people_tests;

// === many instances: change notifications, store availability, key rotation ===

/// The PostgreSQL channel every change is notified on (by `record_change`, at commit).
pub const CHANGE_CHANNEL: &str = "fhirgate_changes";
/// Serialises key rotations across instances (same namespace as the other advisory locks).
const KEY_ROTATION_LOCK: i64 = 0x6668_6972_6761_7403;
/// Settings key prefix of a signing key's scheduled retirement (`<prefix><kid>` → unix seconds).
const KEY_RETIRE_PREFIX: &str = "signing-key-retire:";

/// The settings rows of scheduled key retirements (`key`, `value`).
fn retirements_query() -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let sql = format!(
        "SELECT key, value FROM settings WHERE substr(key, 1, {}) = $1",
        KEY_RETIRE_PREFIX.len()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).bind(KEY_RETIRE_PREFIX)
}

impl StoreError {
    /// The database could not be reached (or is shutting down, or has no connection to give):
    /// a condition to answer with 503 and retry later, not a bug. Nothing was written.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Open(_) => true,
            StoreError::Db(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // connection_exception (08…), operator intervention such as admin_shutdown or
                // cannot_connect_now (57P…), too_many_connections.
                sqlx::Error::Database(db) => db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
                _ => false,
            },
            _ => false,
        }
    }
}

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

impl Store {
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

    /// Scheduled retirements of signing keys: `(kid, unix seconds)`.
    pub async fn key_retirements(&self) -> Result<Vec<(String, i64)>> {
        let rows = retirements_query().fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for r in &rows {
            let key: String = r.try_get("key")?;
            let value: String = r.try_get("value")?;
            if let (Some(kid), Ok(at)) = (key.strip_prefix(KEY_RETIRE_PREFIX), value.parse()) {
                out.push((kid.to_string(), at));
            }
        }
        Ok(out)
    }

    /// Key rotation in one transaction: adds `new` (its `created_at` is when it starts to
    /// sign) and schedules every other active key that has no retirement yet to retire at
    /// `retire_at`. Rotations on several instances take turns. Returns the keys scheduled.
    pub async fn rotate_signing_key(&self, new: &StoredKey, retire_at: i64) -> Result<Vec<String>> {
        let mut tx = self.begin_write().await?;
        xact_lock(&mut tx, KEY_ROTATION_LOCK).await?;
        let active = sqlx::query("SELECT id FROM signing_keys WHERE active = 1")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<Vec<_>, _>>()?;
        let scheduled = retirements_query()
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("key"))
            .collect::<Result<std::collections::HashSet<_>, _>>()?;
        Self::insert_key_in_tx(&mut tx, new)
            .await
            .map_err(conflict_on_duplicate)?;
        let mut retiring = Vec::new();
        for id in active {
            let key = format!("{KEY_RETIRE_PREFIX}{id}");
            // A key already on its way out keeps its earlier date.
            if id == new.id || scheduled.contains(&key) {
                continue;
            }
            sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                .bind(&key)
                .bind(retire_at.to_string())
                .execute(&mut *tx)
                .await?;
            retiring.push(id);
        }
        Self::record_change(&mut tx, "JsonWebKey").await?;
        tx.commit().await?;
        Ok(retiring)
    }

    /// Marks keys inactive: out of every keyring and the JWKS for good.
    pub async fn deactivate_keys(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query("UPDATE signing_keys SET active = 0 WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Self::record_change(&mut tx, "JsonWebKey").await?;
        tx.commit().await?;
        Ok(())
    }
}
