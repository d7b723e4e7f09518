//! People: one-time security requests, and multi-resource writes in one transaction.

use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;

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
        let subjects: Vec<String> = stored.iter().map(StoredResource::reference).collect();
        Self::record_change(&mut tx, &kind, &subjects).await?;
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
    pub(super) async fn put_in_tx(
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
