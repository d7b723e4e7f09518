//! Every store test runs twice: on SQLite and on a real PostgreSQL (a throwaway cluster started
//! by the shared test harness, one fresh database per test).

use serde_json::json;

use super::*;

use super::test_pg as pg;

pub(super) async fn sqlite() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    std::mem::forget(dir);
    store
}

pub(super) async fn postgres() -> Store {
    // The harness shells out (initdb, createdb): keep that off the runtime's worker threads.
    let url = tokio::task::spawn_blocking(pg::fresh_database)
        .await
        .unwrap();
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.dialect(), Dialect::Postgres);
    store
}

/// `name` becomes a module with a `sqlite` and a `postgres` test calling `name(store)`.
macro_rules! on_both_dialects {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::sqlite().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::postgres().await).await;
            }
        }
    )*};
}
pub(super) use on_both_dialects;

/// What the successful `tasks` returned; `lost(e)` tells the failures a loser may see, any other
/// failure panics.
pub(super) async fn winners<T>(
    tasks: Vec<tokio::task::JoinHandle<Result<T>>>,
    lost: fn(&StoreError) -> bool,
) -> Vec<T> {
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(v) => won.push(v),
            Err(e) if lost(&e) => {}
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    won
}

on_both_dialects!(
    put_read_search_delete_roundtrip,
    logins_revoke_and_list,
    settings_init_keeps_first_value,
    client_secrets_upsert,
    signing_keys_roundtrip,
    change_seq_grows_with_every_write,
    concurrent_updates_of_one_version_have_one_winner,
    concurrent_creates_of_one_id_have_one_winner,
    concurrent_unconditional_updates_all_land,
    concurrent_code_redemptions_have_one_winner,
    reopen_keeps_data_and_migrates_once,
    assertions_are_claimed_once_until_they_expire,
    saml_requests_are_taken_once_before_they_expire,
);

fn login(id: &str, user_ref: &str, auth_time: i64) -> LoginRecord {
    LoginRecord {
        id: id.into(),
        user_ref: user_ref.into(),
        client_id: Some("c1".into()),
        membership_id: Some("m1".into()),
        project_id: Some("p".into()),
        scope: "openid".into(),
        auth_method: "client".into(),
        auth_time,
        expires_at: now_unix() + 3600,
        revoked: false,
        remote_address: None,
        code: None,
        refresh_secret: None,
        extra: json!({}),
    }
}

async fn put_read_search_delete_roundtrip(s: Store) {
    let seq0 = s.change_seq().await.unwrap();
    let m = json!({"resourceType": "ProjectMembership", "id": "m1", "profile": {"reference": "Patient/p1"}});
    let idx = vec![
        ("profile".to_string(), "Patient/p1".to_string()),
        ("profile-type".to_string(), "Patient".to_string()),
    ];
    let stored = s.put(m, Some("proj"), &idx, None, true).await.unwrap();
    assert_eq!(stored.content["meta"]["project"], "proj");
    assert!(s.change_seq().await.unwrap() > seq0);

    let again = s
        .put(
            json!({"resourceType": "ProjectMembership", "id": "m1"}),
            Some("proj"),
            &[],
            None,
            true,
        )
        .await;
    assert!(matches!(again, Err(StoreError::Conflict)));

    let read = s.read("ProjectMembership", "m1").await.unwrap().unwrap();
    assert_eq!(read, stored);
    assert_eq!(read.project_id.as_deref(), Some("proj"));

    let found = s
        .search(
            "ProjectMembership",
            &[("profile-type".into(), vec!["Patient".into()])],
            Some("proj"),
            100,
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    // Alternatives of one filter are ORed; a value differing only in case does not match.
    let alternatives = s
        .search(
            "ProjectMembership",
            &[(
                "profile-type".into(),
                vec!["patient".into(), "Patient".into()],
            )],
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(alternatives.len(), 1);
    let case = s
        .search(
            "ProjectMembership",
            &[("profile-type".into(), vec!["patient".into()])],
            None,
            100,
        )
        .await
        .unwrap();
    assert!(case.is_empty());
    let none = s
        .search(
            "ProjectMembership",
            &[("profile-type".into(), vec!["Practitioner".into()])],
            None,
            100,
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    let other_project = s
        .search("ProjectMembership", &[], Some("other"), 100)
        .await
        .unwrap();
    assert!(other_project.is_empty());

    let wrong = s
        .put(
            stored.content.clone(),
            Some("proj"),
            &idx,
            Some("not-the-version"),
            false,
        )
        .await;
    assert!(matches!(wrong, Err(StoreError::VersionConflict)));
    let updated = s
        .put(
            stored.content.clone(),
            Some("proj"),
            &idx[..1],
            Some(&stored.version_id),
            false,
        )
        .await
        .unwrap();
    assert_ne!(updated.version_id, stored.version_id);
    // The update replaced the index rows.
    assert!(
        s.search(
            "ProjectMembership",
            &[("profile-type".into(), vec!["Patient".into()])],
            None,
            10
        )
        .await
        .unwrap()
        .is_empty()
    );
    // Without a project the resource is server-scoped.
    let server = s
        .put(
            json!({"resourceType": "User", "id": "u1"}),
            None,
            &[],
            None,
            true,
        )
        .await
        .unwrap();
    assert_eq!(server.project_id, None);
    assert_eq!(
        s.read("User", "u1").await.unwrap().unwrap().project_id,
        None
    );
    assert_eq!(s.list("ProjectMembership").await.unwrap().len(), 1);

    assert!(s.delete("ProjectMembership", "m1").await.unwrap());
    assert!(!s.delete("ProjectMembership", "m1").await.unwrap());
    assert!(s.read("ProjectMembership", "m1").await.unwrap().is_none());
    assert!(
        s.search(
            "ProjectMembership",
            &[("profile".into(), vec!["Patient/p1".into()])],
            None,
            10
        )
        .await
        .unwrap()
        .is_empty()
    );
}

async fn logins_revoke_and_list(s: Store) {
    let mut l1 = login("l1", "User/u1", 100);
    l1.remote_address = Some("127.0.0.1".into());
    l1.extra = json!({"nonce": "n", "granted": false, "n": 3});
    s.insert_login(&l1).await.unwrap();
    s.insert_login(&login("l2", "User/u1", 200)).await.unwrap();
    s.insert_login(&login("l3", "User/u2", 300)).await.unwrap();
    assert_eq!(s.login("l1").await.unwrap().unwrap(), l1);
    assert!(s.login("nope").await.unwrap().is_none());

    let ids = |v: Vec<LoginRecord>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.logins_for_user("User/u1", 0).await.unwrap()),
        ["l2", "l1"]
    );
    assert_eq!(
        ids(s.logins_for_user("User/u1", 150).await.unwrap()),
        ["l2"]
    );

    assert!(s.revoked_logins(now_unix()).await.unwrap().is_empty());
    let seq = s.change_seq().await.unwrap();
    assert!(s.revoke_login("l1").await.unwrap());
    assert!(s.change_seq().await.unwrap() > seq);
    assert!(s.login("l1").await.unwrap().unwrap().revoked);
    assert_eq!(
        s.revoked_logins(now_unix()).await.unwrap(),
        vec!["l1".to_string()]
    );
    // Expired revoked Logins no longer need listing.
    assert!(
        s.revoked_logins(now_unix() + 7200)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!s.revoke_login("nope").await.unwrap());
}

async fn settings_init_keeps_first_value(s: Store) {
    assert_eq!(s.setting("k").await.unwrap(), None);
    assert_eq!(s.setting_init("k", "a").await.unwrap(), "a");
    assert_eq!(s.setting_init("k", "b").await.unwrap(), "a");
    assert_eq!(s.setting("k").await.unwrap().as_deref(), Some("a"));
}

async fn client_secrets_upsert(s: Store) {
    s.set_client_secret("c1", Some("h1"), None).await.unwrap();
    s.set_client_secret("c2", None, None).await.unwrap();
    s.set_client_secret("c1", Some("h2"), Some("h1"))
        .await
        .unwrap();
    let mut all = s.client_secrets().await.unwrap();
    all.sort();
    assert_eq!(
        all,
        vec![
            ("c1".into(), Some("h2".into()), Some("h1".into())),
            ("c2".into(), None, None),
        ]
    );
    // Deleting the client deletes its secret.
    s.put(
        json!({"resourceType": "ClientApplication", "id": "c1"}),
        Some("p"),
        &[],
        None,
        true,
    )
    .await
    .unwrap();
    assert!(s.delete("ClientApplication", "c1").await.unwrap());
    assert_eq!(
        s.client_secrets().await.unwrap(),
        vec![("c2".into(), None, None)]
    );
}

async fn signing_keys_roundtrip(s: Store) {
    let key = |id: &str, active: bool, created_at: i64| StoredKey {
        id: id.into(),
        alg: "ES256".into(),
        private_der: format!("der-{id}"),
        active,
        created_at,
    };
    s.insert_key(&key("k2", true, 20)).await.unwrap();
    s.insert_key(&key("k0", false, 5)).await.unwrap();
    s.insert_key(&key("k1", true, 10)).await.unwrap();
    assert_eq!(
        s.active_keys().await.unwrap(),
        vec![key("k1", true, 10), key("k2", true, 20)]
    );
}

async fn change_seq_grows_with_every_write(s: Store) {
    async fn grew(s: &Store, last: &mut i64) {
        let now = s.change_seq().await.unwrap();
        assert!(now > *last, "change_seq {now} did not grow past {last}");
        *last = now;
    }
    let mut last = s.change_seq().await.unwrap();
    s.put(
        json!({"resourceType": "AccessPolicy", "id": "a"}),
        Some("p"),
        &[],
        None,
        true,
    )
    .await
    .unwrap();
    grew(&s, &mut last).await;
    s.delete("AccessPolicy", "a").await.unwrap();
    grew(&s, &mut last).await;
    s.set_client_secret("c", Some("h"), None).await.unwrap();
    grew(&s, &mut last).await;
    s.insert_key(&StoredKey {
        id: "k".into(),
        alg: "ES256".into(),
        private_der: "d".into(),
        active: true,
        created_at: 1,
    })
    .await
    .unwrap();
    grew(&s, &mut last).await;
    s.insert_login(&login("l", "User/u", 1)).await.unwrap();
    s.revoke_login("l").await.unwrap();
    grew(&s, &mut last).await;
}

/// Two writers that read the same version: exactly one update lands, the other is told.
async fn concurrent_updates_of_one_version_have_one_winner(s: Store) {
    let first = s
        .put(
            json!({"resourceType": "AccessPolicy", "id": "a", "n": 0}),
            Some("p"),
            &[],
            None,
            true,
        )
        .await
        .unwrap();
    let writers = (1..=8)
        .map(|n| {
            let s = s.clone();
            let version = first.version_id.clone();
            tokio::spawn(async move {
                s.put(
                    json!({"resourceType": "AccessPolicy", "id": "a", "n": n}),
                    Some("p"),
                    &[("name".into(), format!("n{n}"))],
                    Some(&version),
                    false,
                )
                .await
            })
        })
        .collect();
    let winners = winners(writers, |e| matches!(e, StoreError::VersionConflict)).await;
    assert_eq!(winners.len(), 1);
    let now = s.read("AccessPolicy", "a").await.unwrap().unwrap();
    assert_eq!(now.version_id, winners[0].version_id);
    assert_eq!(now.content["n"], winners[0].content["n"]);
    // Only the winner's index rows exist.
    let n = winners[0].content["n"].as_i64().unwrap();
    let indexed = s
        .search(
            "AccessPolicy",
            &[("name".into(), (1..=8).map(|i| format!("n{i}")).collect())],
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(indexed.len(), 1);
    assert_eq!(indexed[0].content["n"], n);
}

async fn concurrent_creates_of_one_id_have_one_winner(s: Store) {
    let writers: Vec<_> = (0..8)
        .map(|n| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put(
                    json!({"resourceType": "Project", "id": "same", "n": n}),
                    None,
                    &[],
                    None,
                    true,
                )
                .await
            })
        })
        .collect();
    let created = winners(writers, |e| matches!(e, StoreError::Conflict))
        .await
        .len();
    assert_eq!(created, 1);
    assert_eq!(s.list("Project").await.unwrap().len(), 1);
}

/// Writes without an expected version wait for each other instead of failing.
async fn concurrent_unconditional_updates_all_land(s: Store) {
    s.put(
        json!({"resourceType": "Project", "id": "p", "n": 0}),
        None,
        &[],
        None,
        true,
    )
    .await
    .unwrap();
    let seq = s.change_seq().await.unwrap();
    let writers: Vec<_> = (1..=8)
        .map(|n| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put(
                    json!({"resourceType": "Project", "id": "p", "n": n}),
                    None,
                    &[("n".into(), n.to_string())],
                    None,
                    false,
                )
                .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for w in writers {
        versions.push(w.await.unwrap().unwrap().version_id);
    }
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 8);
    assert_eq!(s.change_seq().await.unwrap(), seq + 8);
    let last = s.read("Project", "p").await.unwrap().unwrap();
    assert!(versions.contains(&last.version_id));
    // Exactly the last writer's index row is left.
    let n = last.content["n"].as_i64().unwrap();
    for i in 1..=8 {
        let found = s
            .search("Project", &[("n".into(), vec![i.to_string()])], None, 10)
            .await
            .unwrap();
        assert_eq!(found.len(), usize::from(i == n), "index row n={i}");
    }
}

/// The compare-and-swap the token endpoint relies on: one code, many redeemers, one success.
async fn concurrent_code_redemptions_have_one_winner(s: Store) {
    let mut l = login("lc", "User/u1", 1);
    l.code = Some("code-hash".into());
    s.insert_login(&l).await.unwrap();
    let redeemers: Vec<_> = (0..8)
        .map(|n| {
            let s = s.clone();
            tokio::spawn(async move {
                s.redeem_login_code(
                    "lc",
                    "code-hash",
                    "granted",
                    Some(&format!("refresh-{n}")),
                    now_unix() + 60,
                    &json!({"n": n}),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut wins = 0;
    for r in redeemers {
        if r.await.unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    let after = s.login("lc").await.unwrap().unwrap();
    assert_eq!(after.code.as_deref(), Some("granted"));
    let secret = after.refresh_secret.clone().unwrap();

    // Refresh rotation: one of many rotations from the same secret wins.
    let rotators: Vec<_> = (0..8)
        .map(|n| {
            let s = s.clone();
            let old = secret.clone();
            tokio::spawn(async move {
                s.rotate_refresh_secret("lc", &old, &format!("next-{n}"), now_unix() + 60, None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut wins = 0;
    for r in rotators {
        if r.await.unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    assert!(
        s.login("lc")
            .await
            .unwrap()
            .unwrap()
            .refresh_secret
            .unwrap()
            .starts_with("next-")
    );
}

/// Reopening (a restart, or several instances starting at once) keeps the data and applies no
/// migration step twice.
async fn reopen_keeps_data_and_migrates_once(s: Store) {
    s.setting_init("kept", "yes").await.unwrap();
    let versions = |s: Store| async move {
        let rows = sqlx::query("SELECT version FROM schema_version ORDER BY version")
            .fetch_all(&s.pool)
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.try_get::<i64, _>("version").unwrap())
            .collect::<Vec<_>>()
    };
    let before = versions(s.clone()).await;
    assert_eq!(before, (1..=before.len() as i64).collect::<Vec<_>>());
    if s.dialect() == Dialect::Postgres {
        // A fresh database, opened by several instances at the same moment.
        let url = tokio::task::spawn_blocking(pg::fresh_database)
            .await
            .unwrap();
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Store::open(&url).await })
            })
            .collect();
        for o in opens {
            let fresh = o.await.unwrap().unwrap();
            assert_eq!(versions(fresh).await, before);
        }
    }
    let again = Store::open_with(&store_url(&s).await, Some(2))
        .await
        .unwrap();
    assert_eq!(again.setting("kept").await.unwrap().as_deref(), Some("yes"));
    assert_eq!(versions(again).await, before);
}

/// The URL `s` was opened with, recovered from the database itself.
async fn store_url(s: &Store) -> String {
    match s.dialect() {
        Dialect::Sqlite => {
            let row = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(&s.pool)
                .await
                .unwrap();
            format!("sqlite://{}", row.try_get::<String, _>("file").unwrap())
        }
        Dialect::Postgres => {
            let row = sqlx::query(
                "SELECT CAST(current_database() AS TEXT) AS db, CAST(inet_server_port() AS BIGINT) AS port",
            )
            .fetch_one(&s.pool)
            .await
            .unwrap();
            format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                row.try_get::<i64, _>("port").unwrap(),
                row.try_get::<String, _>("db").unwrap()
            )
        }
    }
}

async fn assertions_are_claimed_once_until_they_expire(s: Store) {
    let now = now_unix();
    let claimers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_assertion("a1", now + 60, now).await })
        })
        .collect();
    let won = winners(claimers, |_| false).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    assert!(s.claim_assertion("a2", now + 60, now).await.unwrap());
    // Past its expiry a record is dropped (the assertion itself is refused by then).
    assert!(s.claim_assertion("a1", now + 200, now + 120).await.unwrap());
    assert!(!s.claim_assertion("a1", now + 200, now + 121).await.unwrap());
}

async fn saml_requests_are_taken_once_before_they_expire(s: Store) {
    let now = now_unix();
    s.put_saml_request("_r1", "{\"a\":1}", now + 60, now)
        .await
        .unwrap();
    s.put_saml_request("_old", "{}", now + 5, now)
        .await
        .unwrap();
    let takers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.take_saml_request("_r1", now).await })
        })
        .collect();
    let won = winners(takers, |_| false).await;
    let taken: Vec<_> = won.into_iter().flatten().collect();
    assert_eq!(
        taken,
        vec!["{\"a\":1}".to_string()],
        "one Response, one sign-in"
    );
    assert_eq!(
        s.take_saml_request("_old", now + 6).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(s.take_saml_request("_none", now).await.unwrap(), None);
    assert!(s.put_saml_request("_r1", "{}", now + 60, now).await.is_ok());
}

/// Issue 10: the SQLite file (password and secret hashes, signing keys) and the directory
/// fhirgate makes for it were created with the umask's modes, often world-readable.
#[tokio::test]
async fn a_new_sqlite_store_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = data.join("fhirgate.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.setting_init("probe", "1").await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&path), 0o600, "database file");
    let wal = data.join("fhirgate.db-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600, "write-ahead log");
    }
}
