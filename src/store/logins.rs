//! Logins: one per authentication session, their codes, refresh secrets and revocation.

use serde_json::Value;
use sqlx::Row;

use super::*;

impl Store {
    // === logins ===

    pub async fn insert_login(&self, l: &LoginRecord) -> Result<()> {
        Self::login_insert(l)?.execute(&self.pool).await?;
        Ok(())
    }

    /// Many Logins in one transaction (all or none): how an import or a load generator brings
    /// sessions in without a commit each.
    pub async fn insert_logins(&self, logins: &[LoginRecord]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        for l in logins {
            Self::login_insert(l)?.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn login_insert(
        l: &LoginRecord,
    ) -> Result<sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>> {
        let sql = format!(
            "INSERT INTO logins ({LOGIN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        );
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(l.id.clone())
            .bind(l.user_ref.clone())
            .bind(l.client_id.clone())
            .bind(l.membership_id.clone())
            .bind(l.project_id.clone())
            .bind(l.scope.clone())
            .bind(l.auth_method.clone())
            .bind(l.auth_time)
            .bind(l.expires_at)
            .bind(i64::from(l.revoked))
            .bind(l.remote_address.clone())
            .bind(l.code.clone())
            .bind(l.refresh_secret.clone())
            .bind(serde_json::to_string(&l.extra)?))
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
        Self::record_change(&mut tx, "Login", &[format!("Login/{id}")]).await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Revokes every Login of `user_ref` (`User/…`, or a client's reference) and, when given,
    /// only those of one membership. Returns how many were revoked. Every instance sees it with
    /// the next catch-up (one `Login/<id>` change each), so all their tokens stop within the budget.
    pub async fn revoke_logins_of(
        &self,
        user_ref: &str,
        membership_id: Option<&str>,
    ) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let rows = match membership_id {
            None => {
                sqlx::query("UPDATE logins SET revoked = 1 WHERE user_ref = $1 AND revoked = 0 RETURNING id")
                    .bind(user_ref)
                    .fetch_all(&mut *tx)
                    .await?
            }
            Some(m) => {
                sqlx::query("UPDATE logins SET revoked = 1 WHERE user_ref = $1 AND membership_id = $2 AND revoked = 0 RETURNING id")
                    .bind(user_ref)
                    .bind(m)
                    .fetch_all(&mut *tx)
                    .await?
            }
        };
        let subjects = rows
            .iter()
            .map(|r| Ok(format!("Login/{}", r.try_get::<String, _>("id")?)))
            .collect::<Result<Vec<_>>>()?;
        if !subjects.is_empty() {
            Self::record_change(&mut tx, "Login", &subjects).await?;
        }
        tx.commit().await?;
        let n = subjects.len() as u64;
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
}
