//! Policies as files (docs/contract.md §3) through a real fhirgate: loaded at start into the default project,
//! applied to a client that references them, reloaded on change within seconds, an invalid
//! change leaving the previous version in force, restarts creating no versions, and an invalid
//! file stopping the start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway, free_port};
use common::http::{basic, rt};
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

fn shipped_policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

async fn status_of(gw: &TestGateway, token: &str, path: &str) -> u16 {
    TestGateway::client()
        .get(format!("{}{path}", gw.fhir))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `GET AccessPolicy/<id>` as admin.
async fn stored_policy(gw: &TestGateway, admin: &str, id: &str) -> (u16, Value) {
    let resp = TestGateway::client()
        .get(format!("{}AccessPolicy/{id}", gw.fhir))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls `path` until it answers `want` (5 s at most); returns the last status.
async fn wait_for_status(gw: &TestGateway, token: &str, path: &str, want: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = status_of(gw, token, path).await;
        if got == want || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_policy(path: &Path, policy: &Value) {
    // Write then rename, as deployment tools do; the watcher also copes with in-place writes.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(policy).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_policy_file_is_applied_reloaded_and_an_invalid_change_is_refused() {
    let upstream = FhirUpstream::start();
    let policies = tempfile::tempdir().unwrap();
    let file = policies.path().join("file-policy.json");
    write_policy(
        &file,
        &json!({"resourceType": "AccessPolicy", "name": "from a file", "resource": [
            {"resourceType": "Observation"}
        ]}),
    );
    let dir = policies.path().to_path_buf();
    let gw = TestGateway::start_with(&upstream.base_url, |f| f.policies_dir = Some(dir));
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let (status, stored) = stored_policy(&gw, &admin, "file-policy").await;
        assert_eq!(status, 200, "{stored}");
        assert_eq!(stored["name"], "from a file");

        let (id, secret) = gw.client_with_policy(&admin, Some("file-policy")).await;
        let token = gw.token(&id, &secret, None).await;
        assert_eq!(status_of(&gw, &token, "Observation").await, 200);
        assert_eq!(status_of(&gw, &token, "Patient").await, 403);

        // Allow Patient: applied within a few seconds, without a restart.
        write_policy(
            &file,
            &json!({"resourceType": "AccessPolicy", "name": "from a file, v2", "resource": [
                {"resourceType": "Observation"},
                {"resourceType": "Patient"}
            ]}),
        );
        assert_eq!(wait_for_status(&gw, &token, "Patient", 200).await, 200);
        assert_eq!(status_of(&gw, &token, "Observation").await, 200);
        let (_, v2) = stored_policy(&gw, &admin, "file-policy").await;
        assert_eq!(v2["name"], "from a file, v2");
        let v2_version = v2["meta"]["versionId"].clone();

        // An invalid version (it would also drop Patient) is refused; v2 stays in force.
        write_policy(
            &file,
            &json!({"resourceType": "AccessPolicy", "name": "broken", "resource": [
                {"resourceType": "Observation", "interaction": ["fly"]}
            ]}),
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(status_of(&gw, &token, "Patient").await, 200);
        assert_eq!(status_of(&gw, &token, "Observation").await, 200);
        let (_, still) = stored_policy(&gw, &admin, "file-policy").await;
        assert_eq!(still["name"], "from a file, v2");
        assert_eq!(still["meta"]["versionId"], v2_version);

        // Half-written JSON is refused the same way.
        std::fs::write(&file, br#"{"resourceType": "AccessPolicy", "resou"#).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(status_of(&gw, &token, "Patient").await, 200);

        // Fixing the file applies it again (Patient removed).
        write_policy(
            &file,
            &json!({"resourceType": "AccessPolicy", "name": "from a file, v3", "resource": [
                {"resourceType": "Observation"}
            ]}),
        );
        assert_eq!(wait_for_status(&gw, &token, "Patient", 403).await, 403);

        // Deleting the file leaves the stored policy in force (documented choice).
        std::fs::remove_file(&file).unwrap();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert_eq!(status_of(&gw, &token, "Observation").await, 200);
        let (status, kept) = stored_policy(&gw, &admin, "file-policy").await;
        assert_eq!(status, 200);
        assert_eq!(kept["name"], "from a file, v3");

        // A new file is picked up too.
        write_policy(
            &policies.path().join("added.json"),
            &json!({"resourceType": "AccessPolicy", "resource": [{"resourceType": "Patient"}]}),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _) = stored_policy(&gw, &admin, "added").await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "added.json was not loaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn serve_loads_every_shipped_example_and_a_restart_creates_no_versions() {
    let upstream = FhirUpstream::start();
    let data = tempfile::tempdir().unwrap();
    let ids: Vec<String> = fhirgate::policies_dir::policy_files(&shipped_policies())
        .unwrap()
        .iter()
        .map(|p| fhirgate::policies_dir::read_policy_file(p).unwrap().id)
        .collect();
    assert!(ids.len() >= 5, "{ids:?}");

    let versions = |gw: &TestGateway| {
        rt().block_on(async {
            let admin = gw.admin_token().await;
            let mut out = Vec::new();
            for id in &ids {
                let (status, p) = stored_policy(gw, &admin, id).await;
                assert_eq!(status, 200, "AccessPolicy/{id}: {p}");
                assert_eq!(p["id"], id.as_str());
                assert!(p["name"].as_str().is_some_and(|n| !n.is_empty()), "{p}");
                out.push(p["meta"]["versionId"].as_str().unwrap().to_string());
            }
            out
        })
    };

    let gw = TestGateway::start_in(&upstream.base_url, data.path(), |f| {
        f.policies_dir = Some(shipped_policies())
    });
    let first = versions(&gw);
    gw.stop();
    let gw = TestGateway::start_in(&upstream.base_url, data.path(), |f| {
        f.policies_dir = Some(shipped_policies())
    });
    assert_eq!(
        versions(&gw),
        first,
        "unchanged files must not create versions"
    );

    // A shipped policy works for a client that references it: the webhook sender, on Basic
    // auth, may run its one Bot operation and nothing else.
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let (id, secret) = gw.client_with_policy(&admin, Some("webhook-sender")).await;
        let post = |path: &str, body: serde_json::Value| {
            TestGateway::client()
                .post(format!("{}{path}", gw.fhir))
                .header("authorization", basic(&id, &secret))
                .header("content-type", "application/json")
                .json(&body)
                .send()
        };
        let event = json!({"id": "evt_1", "type": "invoice.paid"});
        upstream.reset();
        let run = post("Bot/stripe-webhook/$execute", event.clone())
            .await
            .unwrap();
        assert_ne!(run.status(), 403, "the granted operation was refused");
        assert_ne!(run.status(), 401);
        let seen = upstream.requests();
        assert!(
            seen.iter().any(|r| r["method"] == "POST"
                && r["url"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("Bot/stripe-webhook/$execute")),
            "the operation never reached the upstream: {seen:?}"
        );
        upstream.reset();
        for (path, body) in [
            ("Bot/other-bot/$execute", event.clone()),
            ("Bot/stripe-webhook/$validate", event.clone()),
            (
                "Bot",
                json!({"resourceType": "Bot", "id": "stripe-webhook"}),
            ),
            (
                "Communication",
                json!({"resourceType": "Communication", "status": "completed"}),
            ),
        ] {
            let r = post(path, body).await.unwrap();
            assert_eq!(r.status(), 403, "POST {path}");
        }
        let read = TestGateway::client()
            .get(format!("{}Patient", gw.fhir))
            .header("authorization", basic(&id, &secret))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 403);
        assert!(
            upstream.requests().is_empty(),
            "a refused request reached the upstream"
        );
    });
}

#[test]
fn an_invalid_policy_file_stops_the_start() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::copy(
        shipped_policies().join("webhook-sender.json"),
        policies.path().join("webhook-sender.json"),
    )
    .unwrap();
    std::fs::write(
        policies.path().join("bad.json"),
        r#"{"resourceType": "AccessPolicy", "resource": [{"resourceType": "Observation", "criteria": "Patient?name=x"}]}"#,
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = fhirgate::config::ConfigFile {
        listen: Some(format!("127.0.0.1:{}", free_port())),
        control_listen: Some(format!("127.0.0.1:{}", free_port())),
        metrics_listen: Some(format!("127.0.0.1:{}", free_port())),
        upstream: Some("http://127.0.0.1:9/fhir/R4".into()),
        data_dir: Some(data.path().to_path_buf()),
        admin_client_id: Some(ADMIN_CLIENT_ID.into()),
        admin_client_secret: Some(ADMIN_CLIENT_SECRET.into()),
        admin_password: Some("admin-password-for-tests".into()),
        log_format: Some("text".into()),
        policies_dir: Some(policies.path().to_path_buf()),
        ..Default::default()
    };
    let config = fhirgate::config::Config::from_file(file).unwrap();
    let result = std::thread::spawn(move || {
        fhirgate::server::start(config, fhirgate::server::Planes::BOTH).map(|_| ())
    })
    .join()
    .unwrap();
    let message = result
        .expect_err("an invalid policy file must stop the start")
        .to_string();
    assert!(message.contains("bad.json"), "{message}");
    assert!(
        message.contains("must start with `Observation?`"),
        "{message}"
    );
    assert!(!message.contains("webhook-sender.json"), "{message}");

    // A missing directory is an error too, not an empty policy set.
    let data = tempfile::tempdir().unwrap();
    let file = fhirgate::config::ConfigFile {
        listen: Some(format!("127.0.0.1:{}", free_port())),
        control_listen: Some(format!("127.0.0.1:{}", free_port())),
        metrics_listen: Some(format!("127.0.0.1:{}", free_port())),
        upstream: Some("http://127.0.0.1:9/fhir/R4".into()),
        data_dir: Some(data.path().to_path_buf()),
        log_format: Some("text".into()),
        policies_dir: Some(data.path().join("no-such-dir")),
        ..Default::default()
    };
    let config = fhirgate::config::Config::from_file(file).unwrap();
    let result = std::thread::spawn(move || {
        fhirgate::server::start(config, fhirgate::server::Planes::BOTH).map(|_| ())
    })
    .join()
    .unwrap();
    let message = result
        .expect_err("a missing policies_dir must stop the start")
        .to_string();
    assert!(message.contains("no-such-dir"), "{message}");
}

#[test]
fn reloads_under_load_drop_no_request() {
    let upstream = FhirUpstream::start();
    let policies = tempfile::tempdir().unwrap();
    let file = policies.path().join("busy-policy.json");
    let version = |n: usize| {
        json!({"resourceType": "AccessPolicy", "name": format!("busy v{n}"), "resource": [
            {"resourceType": "Observation"},
            {"resourceType": "Patient", "readonly": n.is_multiple_of(2)}
        ]})
    };
    write_policy(&file, &version(0));
    let dir = policies.path().to_path_buf();
    let gw = TestGateway::start_with(&upstream.base_url, |f| f.policies_dir = Some(dir));
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let (id, secret) = gw.client_with_policy(&admin, Some("busy-policy")).await;
        let token = gw.token(&id, &secret, None).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Four clients read without pause while the file changes eight times.
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (url, token, stop) = (
                    format!("{}Observation?_count=1", gw.fhir),
                    token.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let c = TestGateway::client();
                    let mut answers = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = c.get(&url).bearer_auth(&token).send().await;
                        answers.push(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
                    }
                    answers
                })
            })
            .collect();
        for n in 1..=8 {
            write_policy(&file, &version(n));
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        // The last version is applied (within the reload period) while the readers go on.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, stored) = stored_policy(&gw, &admin, "busy-policy").await;
            if stored["name"] == "busy v8" {
                break;
            }
            assert!(Instant::now() < deadline, "v8 never applied: {stored}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        for r in readers {
            for answer in r.await.unwrap() {
                total += 1;
                assert_eq!(answer, Ok(200), "a request during a reload");
            }
        }
        assert!(total > 40, "only {total} requests ran during the reloads");
    });
}
