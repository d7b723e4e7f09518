use super::*;
use crate::control::base::passwords::TOO_SHORT;

fn parse(v: Value) -> Result<Invite, String> {
    let Value::Object(m) = v else {
        return Err("not an object".into());
    };
    Invite::parse(&m).map_err(|e| match e {
        ApiError::Invalid { text, expression } => format!("{expression}: {text}"),
        other => format!("{other:?}"),
    })
}

#[test]
fn validation_texts_are_medplums_in_order() {
    let err = |v| parse(v).err().unwrap_or_default();
    assert_eq!(err(json!({})), "resourceType: Resource type is required");
    assert_eq!(
        err(json!({"resourceType": "Observation"})),
        "resourceType: Resource type is required"
    );
    assert_eq!(
        err(json!({"resourceType": "Patient"})),
        "firstName: First name is required"
    );
    assert_eq!(
        err(json!({"resourceType": "Patient", "firstName": "A"})),
        "lastName: Last name is required"
    );
    assert_eq!(
        err(json!({"resourceType": "Patient", "firstName": "A", "lastName": "B"})),
        "email: Either email or externalId is required"
    );
    assert_eq!(
        err(json!({"resourceType": "Patient", "firstName": "A", "lastName": "B", "email": "nope"})),
        "email: Either email or externalId is required"
    );
    assert_eq!(
        err(
            json!({"resourceType": "Patient", "firstName": "A", "lastName": "B", "email": "a@b.example", "password": "short"})
        ),
        format!("password: {}", TOO_SHORT)
    );
}

#[test]
fn scope_and_template_follow_the_request() {
    let i = parse(json!({
        "resourceType": "Practitioner", "firstName": "A", "lastName": "B",
        "email": "Alice@Example.COM",
        "admin": false,
        "accessPolicy": {"reference": "AccessPolicy/old"},
        "membership": {"admin": true, "accessPolicy": {"reference": "AccessPolicy/new"}, "project": {"reference": "Project/x"}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(i.email.as_deref(), Some("alice@example.com"));
    assert!(
        !i.project_scoped,
        "a Practitioner is server-scoped by default"
    );
    assert_eq!(i.template.get("admin"), Some(&Value::Bool(true)));
    assert_eq!(
        i.template.get("accessPolicy"),
        Some(&json!({"reference": "AccessPolicy/new"}))
    );
    assert!(i.template.get("project").is_none());
    assert!(i.send_email);
    let p = parse(json!({"resourceType": "Patient", "firstName": "A", "lastName": "B", "email": "p@x.example"}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(p.project_scoped);
    let x = parse(json!({"resourceType": "Practitioner", "firstName": "A", "lastName": "B", "externalId": "ext-1", "sendEmail": false}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(x.project_scoped);
    assert!(!x.send_email);
    assert_eq!(x.template.get("externalId"), Some(&json!("ext-1")));
    assert_eq!(x.profile_key("p1"), "p1/external-id/ext-1");
    assert_eq!(p.profile_key("p1"), "p1/p@x.example");
}
