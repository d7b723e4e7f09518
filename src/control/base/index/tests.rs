use super::*;
use serde_json::json;

#[test]
fn membership_rows_cover_every_search_parameter() {
    let m = json!({
        "resourceType": "ProjectMembership",
        "project": {"reference": "Project/p"},
        "user": {"reference": "User/u"},
        "profile": {"reference": "Patient/x"},
        "accessPolicy": {"reference": "AccessPolicy/a"},
        "access": [{"policy": {"reference": "AccessPolicy/b"}}],
        "externalId": "ext",
        "identifier": [{"system": "s", "value": "v"}]
    });
    let rows = index_rows(&m);
    for (n, v) in [
        ("project", "Project/p"),
        ("user", "User/u"),
        ("profile", "Patient/x"),
        ("profile-type", "Patient"),
        ("access-policy", "AccessPolicy/a"),
        ("access-policy", "AccessPolicy/b"),
        ("external-id", "ext"),
        ("identifier", "v"),
        ("identifier", "s|v"),
    ] {
        assert!(
            rows.contains(&(n.to_string(), v.to_string())),
            "{n}={v} missing from {rows:?}"
        );
    }
}

#[test]
fn user_email_is_lower_cased() {
    let rows = index_rows(&json!({"resourceType": "User", "email": "A@Example.com"}));
    assert_eq!(
        rows,
        vec![("email".to_string(), "a@example.com".to_string())]
    );
}

#[test]
fn matching_rules() {
    assert!(value_matches(ParamKind::Reference, "user", "User/u", "u"));
    assert!(value_matches(
        ParamKind::Reference,
        "user",
        "User/u",
        "User/u"
    ));
    assert!(!value_matches(
        ParamKind::Reference,
        "user",
        "User/u",
        "Bot/u"
    ));
    assert!(value_matches(
        ParamKind::String,
        "name",
        "Lab Device",
        "lab"
    ));
    assert!(value_matches(
        ParamKind::Token,
        "email",
        "a@example.com",
        "A@example.com"
    ));
}
