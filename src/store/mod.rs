//! The store: identity resources (Project, User, ProjectMembership, ClientApplication,
//! AccessPolicy) as FHIR JSON plus search index rows, client secret hashes, Logins, signing keys
//! and a change feed. Invariant: this is the only module that speaks SQL or imports sqlx.
//!
//! One implementation over sqlx's `Any` driver serves SQLite and PostgreSQL: the queries use
//! `$n` placeholders and portable types (TEXT, BIGINT), and only the migrations differ by dialect.
//! Every write also appends to `changes` in the same transaction, so other instances (and the
//! local snapshot refresher) see that something changed by polling one number.

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

/// A Login: one per authentication session (medplum-auth.md §1.5).
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
    /// PKCS#8 DER, base64.
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

const RESOURCE_COLUMNS: &str = "resource_type, id, project_id, version_id, last_updated, content";
const LOGIN_COLUMNS: &str = "id, user_ref, client_id, membership_id, project_id, scope, auth_method, auth_time, expires_at, revoked, remote_address, code, refresh_secret, extra";

impl Store {
    /// Opens (creating if needed) and migrates the store at `url`.
    pub async fn open(url: &str) -> Result<Store> {
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
                std::fs::create_dir_all(parent)
                    .map_err(|e| StoreError::Open(format!("{}: {e}", parent.display())))?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let max = if dialect == Dialect::Sqlite { 4 } else { 16 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
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
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let store = Store { pool, dialect };
        migrations::run(&store.pool, dialect).await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
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

    // === change feed ===

    /// The latest change sequence number; it grows with every write.
    pub async fn change_seq(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("seq")?)
    }

    async fn record_change(tx: &mut sqlx::Transaction<'_, sqlx::Any>, kind: &str) -> Result<()> {
        sqlx::query("INSERT INTO changes (kind, at) VALUES ($1, $2)")
            .bind(kind)
            .bind(now_unix())
            .execute(&mut **tx)
            .await?;
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
        let mut tx = self.pool.begin().await?;
        let current =
            sqlx::query("SELECT version_id FROM resources WHERE resource_type = $1 AND id = $2")
                .bind(&resource_type)
                .bind(&id)
                .fetch_optional(&mut *tx)
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
        if current_version.is_some() {
            sqlx::query("UPDATE resources SET project_id = $3, version_id = $4, last_updated = $5, content = $6 WHERE resource_type = $1 AND id = $2")
                .bind(&resource_type)
                .bind(&id)
                .bind(project_id.map(str::to_string))
                .bind(&version_id)
                .bind(&last_updated)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM resource_index WHERE resource_type = $1 AND id = $2")
                .bind(&resource_type)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("INSERT INTO resources (resource_type, id, project_id, version_id, last_updated, content) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&resource_type)
                .bind(&id)
                .bind(project_id.map(str::to_string))
                .bind(&version_id)
                .bind(&last_updated)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
        }
        for (name, value) in index {
            sqlx::query("INSERT INTO resource_index (resource_type, id, name, value) VALUES ($1, $2, $3, $4)")
                .bind(&resource_type)
                .bind(&id)
                .bind(name)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        Self::record_change(&mut tx, &resource_type).await?;
        tx.commit().await?;
        Ok(StoredResource {
            resource_type,
            id,
            project_id: project_id.map(str::to_string),
            version_id,
            last_updated,
            content,
        })
    }

    pub async fn delete(&self, resource_type: &str, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
        let sql = format!("SELECT {LOGIN_COLUMNS} FROM logins WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_login).transpose()
    }

    /// Marks a Login revoked; returns false if it does not exist.
    pub async fn revoke_login(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("UPDATE logins SET revoked = 1 WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        Self::record_change(&mut tx, "Login").await?;
        tx.commit().await?;
        Ok(n > 0)
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

    // === signing keys ===

    pub async fn insert_key(&self, k: &StoredKey) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO signing_keys (id, alg, private_der, active, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&k.id)
            .bind(&k.alg)
            .bind(&k.private_der)
            .bind(i64::from(k.active))
            .bind(k.created_at)
            .execute(&mut *tx)
            .await?;
        Self::record_change(&mut tx, "JsonWebKey").await?;
        tx.commit().await?;
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

#[cfg(test)]
mod tests;
