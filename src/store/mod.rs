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

mod changes;
mod keys;
mod logins;
mod migrations;
mod people;
mod resources;

pub use changes::{CHANGE_CHANNEL, Change, ChangeListener};
pub use people::{BatchWrite, SecurityRequest};

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
    #[error("store did not answer in time")]
    Timeout,
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

impl StoredResource {
    /// `Type/id`: how the change feed names it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}

/// A Login: one per authentication session (docs/medplum-compat.md §1.5).
#[derive(Debug, Clone, Default, PartialEq)]
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

/// Unix seconds as RFC 3339 (`2026-12-06T03:44:06Z`); empty when out of range.
pub fn unix_rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
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

    /// Sets `key`, replacing any value.
    pub async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
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

    /// Keeps a SAML sign-in in flight until `expires_at` (expired ones are dropped first).
    pub async fn put_saml_request(
        &self,
        id: &str,
        state: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<()> {
        sqlx::query("DELETE FROM saml_requests WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO saml_requests (id, state, expires_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(state)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes a SAML sign-in in flight: its state, once, on whichever instance asks first, and
    /// only while it has not expired.
    pub async fn take_saml_request(&self, id: &str, now: i64) -> Result<Option<String>> {
        let row =
            sqlx::query("DELETE FROM saml_requests WHERE id = $1 RETURNING state, expires_at")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else { return Ok(None) };
        let expires_at: i64 = row.try_get("expires_at")?;
        if expires_at < now {
            return Ok(None);
        }
        Ok(Some(row.try_get("state")?))
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

impl StoreError {
    /// The database could not be reached (or is shutting down, or has no connection to give):
    /// a condition to answer with 503 and retry later, not a bug. Nothing was written.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Open(_) | StoreError::Timeout => true,
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
