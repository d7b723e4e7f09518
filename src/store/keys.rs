//! Signing keys: stored sealed, rotated with a scheduled retirement, deactivated for good.

use sqlx::Row;

use super::*;

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

impl Store {
    // === signing keys ===

    pub async fn insert_key(&self, k: &StoredKey) -> Result<()> {
        let mut tx = self.begin_write().await?;
        Self::insert_key_in_tx(&mut tx, k).await?;
        Self::record_change(&mut tx, "JsonWebKey", &[]).await?;
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

    /// Key rotation in one transaction: adds the `new` keys (one per algorithm; `created_at`
    /// is when each starts to sign) and schedules every other active key that has no retirement yet to retire at
    /// `retire_at`. Rotations on several instances take turns. Returns the keys scheduled.
    pub async fn rotate_signing_keys(
        &self,
        new: &[StoredKey],
        retire_at: i64,
    ) -> Result<Vec<String>> {
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
        for k in new {
            Self::insert_key_in_tx(&mut tx, k)
                .await
                .map_err(conflict_on_duplicate)?;
        }
        let mut retiring = Vec::new();
        for id in active {
            let key = format!("{KEY_RETIRE_PREFIX}{id}");
            // A key already on its way out keeps its earlier date.
            if new.iter().any(|k| k.id == id) || scheduled.contains(&key) {
                continue;
            }
            sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                .bind(&key)
                .bind(retire_at.to_string())
                .execute(&mut *tx)
                .await?;
            retiring.push(id);
        }
        Self::record_change(&mut tx, "JsonWebKey", &[]).await?;
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
        Self::record_change(&mut tx, "JsonWebKey", &[]).await?;
        tx.commit().await?;
        Ok(())
    }
}
