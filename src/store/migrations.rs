//! Schema migrations, one list per dialect, applied in order and recorded in `schema_version`.

use sqlx::{AnyPool, Row};

use super::{Dialect, Result};

/// Each step is a list of statements. Append only; never edit a released step.
fn steps(dialect: Dialect) -> Vec<Vec<&'static str>> {
    let serial = match dialect {
        Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Dialect::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    let changes: &'static str = Box::leak(format!("CREATE TABLE IF NOT EXISTS changes (seq {serial}, kind TEXT NOT NULL, at BIGINT NOT NULL)").into_boxed_str());
    vec![
        vec![
            "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS resources (resource_type TEXT NOT NULL, id TEXT NOT NULL, project_id TEXT, version_id TEXT NOT NULL, last_updated TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (resource_type, id))",
            "CREATE TABLE IF NOT EXISTS resource_index (resource_type TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS resource_index_lookup ON resource_index (resource_type, name, value)",
            "CREATE INDEX IF NOT EXISTS resource_index_owner ON resource_index (resource_type, id)",
            "CREATE TABLE IF NOT EXISTS client_secrets (client_id TEXT PRIMARY KEY, secret_hash TEXT, retiring_hash TEXT)",
            "CREATE TABLE IF NOT EXISTS logins (id TEXT PRIMARY KEY, user_ref TEXT NOT NULL, client_id TEXT, membership_id TEXT, project_id TEXT, scope TEXT NOT NULL, auth_method TEXT NOT NULL, auth_time BIGINT NOT NULL, expires_at BIGINT NOT NULL, revoked BIGINT NOT NULL DEFAULT 0, remote_address TEXT, code TEXT, refresh_secret TEXT, extra TEXT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS logins_code ON logins (code)",
            "CREATE INDEX IF NOT EXISTS logins_revoked ON logins (revoked, expires_at)",
            "CREATE TABLE IF NOT EXISTS signing_keys (id TEXT PRIMARY KEY, alg TEXT NOT NULL, private_der TEXT NOT NULL, active BIGINT NOT NULL, created_at BIGINT NOT NULL)",
            changes,
        ],
        // 2: one-time security requests (invite, reset, verify-email links: only a keyed hash of the
        // secret is kept; `used` flips 0 → 1 by compare-and-swap) and unique keys claimed in the
        // same transaction as the resource they guard (e-mail per user scope, one membership per
        // user and project), so two instances cannot both create the same identity.
        vec![
            "CREATE TABLE IF NOT EXISTS security_requests (id TEXT PRIMARY KEY, kind TEXT NOT NULL, user_id TEXT NOT NULL, secret_hash TEXT NOT NULL, redirect_uri TEXT, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, used BIGINT NOT NULL DEFAULT 0)",
            "CREATE INDEX IF NOT EXISTS security_requests_user ON security_requests (user_id, kind, used)",
            "CREATE TABLE IF NOT EXISTS unique_keys (key TEXT PRIMARY KEY, resource_type TEXT NOT NULL, id TEXT NOT NULL)",
        ],
        // 3: `private_key_jwt` assertions already accepted (a keyed hash of client and `jti`),
        // until they expire: an assertion authenticates once across every control instance.
        vec![
            "CREATE TABLE IF NOT EXISTS used_assertions (key TEXT PRIMARY KEY, expires_at BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS used_assertions_expiry ON used_assertions (expires_at)",
        ],
        // 4: incremental state. Each change names what changed (`subject`), so instances drop
        // exactly that from their caches; indexes keep every lookup of a sign-in, a logout or
        // a housekeeping pass logarithmic in the number of identities. (No index on
        // `resources.project_id`: SQLite would walk it in `last_updated` order to satisfy a
        // search's ORDER BY instead of driving the search by its index filter.)
        vec![
            "ALTER TABLE changes ADD COLUMN subject TEXT",
            "CREATE INDEX IF NOT EXISTS changes_at ON changes (at)",
            "CREATE INDEX IF NOT EXISTS logins_user ON logins (user_ref, auth_time)",
            "CREATE INDEX IF NOT EXISTS logins_expiry ON logins (expires_at)",
        ],
        // 5: SAML sign-ins in flight: the AuthnRequest's id, what the sign-in asked for, until
        // it expires. Taken (deleted) by the one Response that answers it.
        vec![
            "CREATE TABLE IF NOT EXISTS saml_requests (id TEXT PRIMARY KEY, state TEXT NOT NULL, expires_at BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS saml_requests_expiry ON saml_requests (expires_at)",
        ],
    ]
}

/// Applies the missing steps, all in one transaction: a failed step leaves the schema as it was.
pub(super) async fn run(pool: &AnyPool, dialect: Dialect) -> Result<()> {
    let mut tx = pool.begin().await?;
    // Instances starting together on one database take turns: concurrent
    // `CREATE TABLE IF NOT EXISTS` can fail on PostgreSQL, and two could apply the same step.
    // The lock is released with the transaction.
    super::xact_lock(&mut tx, super::MIGRATION_LOCK).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
        .fetch_one(&mut *tx)
        .await?;
    let current: i64 = row.try_get("v")?;
    for (i, step) in steps(dialect).into_iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        for stmt in step {
            sqlx::query(stmt).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
