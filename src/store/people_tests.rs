//! Tests of the people additions to the store (security requests, unique-key claims, batches),
//! on SQLite and on a real PostgreSQL, like `tests.rs`.

use serde_json::json;

use super::*;

use super::tests::{on_both_dialects, postgres, sqlite, winners};

on_both_dialects!(
    a_failing_step_undoes_the_whole_batch,
    claims_are_unique_until_their_resource_is_gone,
    security_requests_redeem_once_and_supersede,
    concurrent_redemptions_have_one_winner,
    concurrent_claims_have_one_winner,
);

fn user(id: &str) -> BatchWrite {
    BatchWrite::Put {
        content: json!({"resourceType": "User", "id": id, "email": "a@example.com"}),
        project_id: None,
        index: vec![("email".into(), "a@example.com".into())],
        expected_version: None,
        create_only: true,
    }
}

fn claim(key: &str, id: &str) -> BatchWrite {
    BatchWrite::Claim {
        key: key.into(),
        resource_type: "User".into(),
        id: id.into(),
    }
}

fn request(id: &str, user: &str, kind: &str, expires_at: i64) -> SecurityRequest {
    SecurityRequest {
        id: id.into(),
        kind: kind.into(),
        user_id: user.into(),
        secret_hash: format!("hash-{id}"),
        redirect_uri: None,
        created_at: now_unix(),
        expires_at,
        used: false,
    }
}

async fn a_failing_step_undoes_the_whole_batch(store: Store) {
    store
        .write_batch(vec![claim("k", "u0"), user("u0")])
        .await
        .unwrap();
    let seq = store.change_seq().await.unwrap();
    // u1's put succeeds inside the transaction, then the claim fails: nothing of it remains.
    let err = store
        .write_batch(vec![
            user("u1"),
            BatchWrite::NewSecurityRequest(request("r1", "u1", "invite", now_unix() + 60)),
            claim("k", "u1"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    assert!(store.read("User", "u1").await.unwrap().is_none());
    assert!(store.security_request("r1").await.unwrap().is_none());
    assert_eq!(store.change_seq().await.unwrap(), seq);
}

async fn claims_are_unique_until_their_resource_is_gone(store: Store) {
    store
        .write_batch(vec![claim("k", "u1"), user("u1")])
        .await
        .unwrap();
    assert!(matches!(
        store.write_batch(vec![claim("k", "u2"), user("u2")]).await,
        Err(StoreError::Conflict)
    ));
    // The holder may claim again (an update of the same resource).
    store.write_batch(vec![claim("k", "u1")]).await.unwrap();
    // Once u1 is deleted (by any path), its claim is stale and can be taken over.
    store.delete("User", "u1").await.unwrap();
    let stored = store
        .write_batch(vec![claim("k", "u2"), user("u2")])
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, "u2");
}

async fn security_requests_redeem_once_and_supersede(store: Store) {
    let now = now_unix();
    store
        .write_batch(vec![BatchWrite::NewSecurityRequest(request(
            "r1",
            "u",
            "reset",
            now + 60,
        ))])
        .await
        .unwrap();
    let r1 = store.security_request("r1").await.unwrap().unwrap();
    assert_eq!(r1.secret_hash, "hash-r1");
    assert!(!r1.used);
    // A second reset link supersedes the first; an invite link of the same user is untouched.
    store
        .write_batch(vec![
            BatchWrite::NewSecurityRequest(request("i1", "u", "invite", now + 60)),
            BatchWrite::NewSecurityRequest(request("r2", "u", "reset", now + 60)),
        ])
        .await
        .unwrap();
    assert!(store.security_request("r1").await.unwrap().unwrap().used);
    assert!(!store.security_request("i1").await.unwrap().unwrap().used);
    let redeem = |id: &str, now: i64| BatchWrite::RedeemSecurityRequest { id: id.into(), now };
    assert!(matches!(
        store.write_batch(vec![redeem("r1", now)]).await,
        Err(StoreError::Conflict)
    ));
    store.write_batch(vec![redeem("r2", now)]).await.unwrap();
    assert!(matches!(
        store.write_batch(vec![redeem("r2", now)]).await,
        Err(StoreError::Conflict)
    ));
    // Expired: refused even though unused.
    assert!(matches!(
        store.write_batch(vec![redeem("i1", now + 61)]).await,
        Err(StoreError::Conflict)
    ));
    assert!(!store.security_request("i1").await.unwrap().unwrap().used);
    assert!(store.security_request("missing").await.unwrap().is_none());
}

async fn concurrent_redemptions_have_one_winner(store: Store) {
    let now = now_unix();
    store
        .write_batch(vec![BatchWrite::NewSecurityRequest(request(
            "r",
            "u",
            "reset",
            now + 60,
        ))])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.write_batch(vec![BatchWrite::RedeemSecurityRequest {
                id: "r".into(),
                now,
            }])
            .await
        }));
    }
    let wins = winners(tasks, |e| matches!(e, StoreError::Conflict))
        .await
        .len();
    assert_eq!(wins, 1);
}

async fn concurrent_claims_have_one_winner(store: Store) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("u{i}");
            s.write_batch(vec![claim("email:a@example.com", &id), user(&id)])
                .await
        }));
    }
    let wins = winners(tasks, |e| matches!(e, StoreError::Conflict))
        .await
        .len();
    assert_eq!(wins, 1);
    let users = store
        .search(
            "User",
            &[("email".into(), vec!["a@example.com".into()])],
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(users.len(), 1);
}
