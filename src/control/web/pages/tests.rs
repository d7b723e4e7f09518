use super::*;

fn frame() -> Frame {
    Frame {
        title: "Sign in",
        client_name: Some("<Evil & Co>".into()),
        error: Some("Email or password is invalid".into()),
        action: "authorize",
        hidden: vec![Hidden::new("state", "\"><script>x</script>")],
    }
}

#[derive(Serialize)]
struct SignIn {
    email: String,
    welcome: Option<String>,
}

#[test]
fn every_template_compiles() {
    let env = ENV.as_ref().unwrap();
    for (name, _) in TEMPLATES {
        env.get_template(name).unwrap();
    }
}

#[test]
fn values_are_escaped_and_the_form_is_accessible() {
    let html = render(
        "signin.html",
        &frame(),
        &SignIn {
            email: "a@b.example".into(),
            welcome: None,
        },
    )
    .unwrap();
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;Evil &amp; Co&gt;"));
    assert!(html.contains(r#"<label for="email">Email</label>"#));
    assert!(html.contains(r#"autocomplete="current-password""#));
    assert!(html.contains(r#"role="alert""#));
    assert!(html.contains(r#"value="a@b.example""#));
    // The stylesheet is inline and unescaped, so its hash matches the CSP.
    assert!(html.contains(CSS));
}

#[test]
fn csp_allows_the_redirect_origin_only() {
    let csp = content_security_policy(Some("https://app.example:8443/cb?x=1"));
    assert!(
        csp.contains("form-action 'self' https://app.example:8443;"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"));
    assert!(csp.contains(&*STYLE_HASH));
    let native = content_security_policy(Some("com.example.app:/callback"));
    assert!(
        native.contains("form-action 'self' com.example.app:;"),
        "{native}"
    );
    let none = content_security_policy(None);
    assert!(none.contains("form-action 'self';"));
}
