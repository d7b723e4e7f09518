//! Identity resources (FHIR JSON plus search index rows) and client secret hashes.

use serde_json::Value;
use sqlx::Row;

use super::*;

impl Store {
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
        // The first filter drives the query through the index (`IN` on the primary key: a
        // lookup per match on both databases); the others only check the rows it found. A
        // correlated `EXISTS` alone would visit every resource of the type.
        let mut driving = true;
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
            let slots = slots.join(", ");
            if driving {
                sql.push_str(&format!(
                    " AND r.id IN (SELECT i.id FROM resource_index i WHERE i.resource_type = $1 AND i.name = ${name_slot} AND i.value IN ({slots}))"
                ));
                driving = false;
            } else {
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM resource_index i WHERE i.resource_type = r.resource_type AND i.id = r.id AND i.name = ${name_slot} AND i.value IN ({slots}))"
                ));
            }
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
        Self::record_change(&mut tx, &stored.resource_type, &[stored.reference()]).await?;
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
        Self::record_change(&mut tx, resource_type, &[format!("{resource_type}/{id}")]).await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// The membership of `profile` (a reference) in `project`: one index lookup.
    pub async fn membership_by_profile(
        &self,
        project: &str,
        profile: &str,
    ) -> Result<Option<StoredResource>> {
        let filters = [("profile".to_string(), vec![profile.to_string()])];
        let found = self
            .search("ProjectMembership", &filters, Some(project), 1)
            .await?;
        Ok(found.into_iter().next())
    }

    /// Whether an active client names `origin` (`scheme://host[:port]`) among its redirect
    /// URIs, launch URI or allowed origins (the `origin` index rows).
    pub async fn client_origin_known(&self, origin: &str) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM (SELECT 1 FROM resource_index WHERE resource_type = 'ClientApplication' AND name = 'origin' AND value = $1 LIMIT 1) AS found")
            .bind(origin)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Replaces the index rows of every stored resource of `resource_type` with what `index`
    /// computes now (after the index gained a parameter). Pages through the store.
    pub async fn reindex(
        &self,
        resource_type: &str,
        index: impl Fn(&Value) -> Vec<(String, String)>,
    ) -> Result<u64> {
        let mut after = String::new();
        let mut done = 0u64;
        loop {
            let sql = format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE resource_type = $1 AND id > $2 ORDER BY id LIMIT 500"
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(resource_type)
                .bind(&after)
                .fetch_all(&self.pool)
                .await?;
            let Some(last) = rows.last() else {
                return Ok(done);
            };
            after = last.try_get("id")?;
            let mut tx = self.begin_write().await?;
            for row in &rows {
                let r = row_to_resource(row)?;
                sqlx::query("DELETE FROM resource_index WHERE resource_type = $1 AND id = $2")
                    .bind(resource_type)
                    .bind(&r.id)
                    .execute(&mut *tx)
                    .await?;
                for (name, value) in index(&r.content) {
                    sqlx::query("INSERT INTO resource_index (resource_type, id, name, value) VALUES ($1, $2, $3, $4)")
                        .bind(resource_type)
                        .bind(&r.id)
                        .bind(name)
                        .bind(value)
                        .execute(&mut *tx)
                        .await?;
                }
                done += 1;
            }
            tx.commit().await?;
        }
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
            "SELECT {RESOURCE_COLUMNS} FROM resources r WHERE r.resource_type = 'User' AND {scope} AND r.id IN (SELECT i.id FROM resource_index i WHERE i.resource_type = 'User' AND i.name = 'email' AND i.value = $1) ORDER BY r.last_updated, r.id LIMIT 10"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(email.to_string());
        if let Some(p) = project {
            q = q.bind(p.to_string());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(row_to_resource).collect()
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
        Self::record_change(
            &mut tx,
            "ClientSecret",
            &[format!("ClientApplication/{client_id}")],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `(secret_hash, retiring_hash)` of one client (`None`: it never had a secret).
    pub async fn client_secret(
        &self,
        client_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        let row = sqlx::query(
            "SELECT secret_hash, retiring_hash FROM client_secrets WHERE client_id = $1",
        )
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("secret_hash")?, r.try_get("retiring_hash")?)))
            .transpose()
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
}
