use super::*;
use serde_json::json;

fn parse(name: &str, v: &Value) -> Result<PolicyFile, PolicyFileError> {
    parse_policy(Path::new(name), v.to_string().as_bytes())
}

#[test]
fn the_id_comes_from_the_file_or_its_stem() {
    let with_id = parse(
            "/p/other.json",
            &json!({"resourceType": "AccessPolicy", "id": "given", "resource": [{"resourceType": "Patient"}]}),
        )
        .unwrap();
    assert_eq!(with_id.id, "given");
    let from_stem = parse(
        "/p/from-stem.v2.json",
        &json!({"resourceType": "AccessPolicy", "resource": [{"resourceType": "Patient"}]}),
    )
    .unwrap();
    assert_eq!(from_stem.id, "from-stem.v2");
    assert_eq!(from_stem.content["id"], "from-stem.v2");
    assert_eq!(from_stem.policy.id.as_deref(), Some("from-stem.v2"));
}

#[test]
fn bad_ids_are_refused_with_the_reason() {
    let e = parse(
        "/p/has space.json",
        &json!({"resourceType": "AccessPolicy"}),
    )
    .unwrap_err();
    assert!(e.reason.contains("file name `has space`"), "{e}");
    let e = parse(
        "/p/x.json",
        &json!({"resourceType": "AccessPolicy", "id": "a/b"}),
    )
    .unwrap_err();
    assert!(e.reason.contains("id `a/b`"), "{e}");
    let e = parse(
        "/p/x.json",
        &json!({"resourceType": "AccessPolicy", "id": 7}),
    )
    .unwrap_err();
    assert!(e.reason.contains("must be a string"), "{e}");
}

#[test]
fn invalid_content_is_refused_with_the_reason() {
    let e = parse_policy(Path::new("/p/x.json"), b"{\"resourceType\": ").unwrap_err();
    assert!(e.reason.starts_with("invalid JSON"), "{e}");
    assert!(e.to_string().starts_with("/p/x.json: "), "{e}");
    let e = parse("/p/x.json", &json!({"resourceType": "Patient"})).unwrap_err();
    assert!(e.reason.contains("AccessPolicy"), "{e}");
    let e = parse("/p/x.json", &json!([1])).unwrap_err();
    assert!(e.reason.contains("object"), "{e}");
    let e = parse_policy(
            Path::new("/p/x.json"),
            br#"{"resourceType": "AccessPolicy", "resource": [{"resourceType": "Patient", "interaction": ["read"], "interaction": ["create"]}]}"#,
        )
        .unwrap_err();
    assert!(e.reason.contains("duplicate key `interaction`"), "{e}");
    let e = parse(
            "/p/x.json",
            &json!({"resourceType": "AccessPolicy", "resource": [{"resourceType": "Nope"}, {"resourceType": "Patient", "interaction": ["fly"]}]}),
        )
        .unwrap_err();
    assert!(e.reason.contains("`Nope`"), "{e}");
    assert!(e.reason.contains("`fly`"), "{e}");
}

#[test]
fn store_meta_is_not_content() {
    let f = parse(
            "/p/x.json",
            &json!({"resourceType": "AccessPolicy", "meta": {"versionId": "1", "lastUpdated": "x", "project": "p"}}),
        )
        .unwrap();
    assert!(f.content.get("meta").is_none());
    let f = parse(
            "/p/x.json",
            &json!({"resourceType": "AccessPolicy", "meta": {"versionId": "1", "tag": [{"code": "t"}]}}),
        )
        .unwrap();
    assert_eq!(f.content["meta"], json!({"tag": [{"code": "t"}]}));
}

#[test]
fn the_shipped_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let files = policy_files(&dir).unwrap();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let p = read_policy_file(&f).unwrap();
        assert_eq!(Some(p.id.as_str()), f.file_stem().and_then(|s| s.to_str()));
    }
}

#[test]
fn only_visible_json_files_are_policy_files() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["b.json", "a.json", ".#a.json", "notes.md", "c.json.swp"] {
        std::fs::write(dir.path().join(name), "{}").unwrap();
    }
    std::fs::create_dir(dir.path().join("d.json")).unwrap();
    let names: Vec<String> = policy_files(dir.path())
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.json", "b.json"]);
}

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (Store::open(&url).await.unwrap(), dir)
}

#[tokio::test]
async fn upsert_writes_only_changes_and_never_takes_over_another_project() {
    let (s, _dir) = store().await;
    let v1 = json!({"resourceType": "AccessPolicy", "id": "p", "name": "one", "resource": [{"resourceType": "Patient"}]});
    let f1 = parse("/d/p.json", &v1).unwrap();
    assert_eq!(upsert(&s, "proj", &f1).await.unwrap(), Upsert::Created);
    let stored = s.read("AccessPolicy", "p").await.unwrap().unwrap();
    assert_eq!(stored.project_id.as_deref(), Some("proj"));
    assert_eq!(upsert(&s, "proj", &f1).await.unwrap(), Upsert::Unchanged);
    let again = s.read("AccessPolicy", "p").await.unwrap().unwrap();
    assert_eq!(again.version_id, stored.version_id);

    let mut v2 = v1.clone();
    v2["name"] = json!("two");
    let f2 = parse("/d/p.json", &v2).unwrap();
    assert_eq!(upsert(&s, "proj", &f2).await.unwrap(), Upsert::Updated);
    let updated = s.read("AccessPolicy", "p").await.unwrap().unwrap();
    assert_ne!(updated.version_id, stored.version_id);
    assert_eq!(updated.content["name"], "two");
    let rows = s
        .search(
            "AccessPolicy",
            &[("name".into(), vec!["two".into()])],
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);

    assert!(matches!(
        upsert(&s, "elsewhere", &f2).await,
        Err(UpsertError::Foreign(_))
    ));
}
