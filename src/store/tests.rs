use serde_json::json;

use super::*;

async fn mem() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    std::mem::forget(dir);
    store
}

#[tokio::test]
async fn put_read_search_delete_roundtrip() {
    let s = mem().await;
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
            &idx,
            Some(&stored.version_id),
            false,
        )
        .await
        .unwrap();
    assert_ne!(updated.version_id, stored.version_id);

    assert!(s.delete("ProjectMembership", "m1").await.unwrap());
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

#[tokio::test]
async fn logins_revoke_and_list() {
    let s = mem().await;
    let login = LoginRecord {
        id: "l1".into(),
        user_ref: "ClientApplication/c1".into(),
        client_id: Some("c1".into()),
        membership_id: Some("m1".into()),
        project_id: Some("p".into()),
        scope: "openid".into(),
        auth_method: "client".into(),
        auth_time: 1,
        expires_at: now_unix() + 3600,
        revoked: false,
        remote_address: None,
        code: None,
        refresh_secret: None,
        extra: json!({}),
    };
    s.insert_login(&login).await.unwrap();
    assert_eq!(s.login("l1").await.unwrap().unwrap(), login);
    assert!(s.revoked_logins(now_unix()).await.unwrap().is_empty());
    assert!(s.revoke_login("l1").await.unwrap());
    assert_eq!(
        s.revoked_logins(now_unix()).await.unwrap(),
        vec!["l1".to_string()]
    );
    assert!(!s.revoke_login("nope").await.unwrap());
}

#[tokio::test]
async fn settings_init_keeps_first_value() {
    let s = mem().await;
    assert_eq!(s.setting_init("k", "a").await.unwrap(), "a");
    assert_eq!(s.setting_init("k", "b").await.unwrap(), "a");
}
