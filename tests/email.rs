//! E-mail end to end: a real gateway sends the invite and reset e-mails through SMTP to a real
//! local sink (aiosmtpd), and their links work once and only once — through the server-rendered
//! set-password page as a browser posts it, and through the JSON API. Without SMTP, the same
//! messages land in the outbox folder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::TestGateway;
use common::http::{outcome_text, rt};
use common::mail::{self, SmtpSink};
use common::upstream::FhirUpstream;
use serde_json::json;

/// What a browser does with the page's form.
async fn submit_form(gw: &TestGateway, fields: &[(&str, &str)]) -> (u16, String) {
    let resp = TestGateway::client()
        .post(format!("{}auth/setpassword", gw.base))
        .header("accept", "text/html,application/xhtml+xml")
        .form(fields)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    (status, resp.text().await.unwrap())
}

async fn get_page(url: &str) -> (u16, String) {
    let resp = TestGateway::client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// `/auth/login` succeeds (the password works): a code, or the memberships to choose from.
async fn signs_in(gw: &TestGateway, email: &str, password: &str) -> bool {
    signs_in_to(gw, email, password, None).await
}

/// The same for a project-scoped user, who signs in to their project.
async fn signs_in_to(gw: &TestGateway, email: &str, password: &str, project: Option<&str>) -> bool {
    let mut body = json!({"email": email, "password": password});
    if let Some(p) = project {
        body["projectId"] = json!(p);
    }
    let (status, body) = gw.post("auth/login", None, body).await;
    status == 200 && (body["code"].is_string() || body["memberships"].is_array())
}

/// The hidden form fields of the page.
fn hidden(html: &str, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + marker.len();
    html[start..].split('"').next().unwrap().to_string()
}

#[test]
fn invite_and_reset_e_mails_through_smtp_and_their_links_work_once() {
    let upstream = FhirUpstream::start();
    let sink = SmtpSink::start();
    let gw = TestGateway::start_with(&upstream.base_url, |f| {
        f.smtp_host = Some("127.0.0.1".into());
        f.smtp_port = Some(sink.port);
        f.smtp_tls = Some("none".into());
        f.smtp_from = Some("Clinic Gateway <no-reply@clinic.example>".into());
    });
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;

        // The invite e-mail.
        let (status, m) = gw.post(
            &format!("admin/projects/{project}/invite"),
            Some(&admin),
            json!({"resourceType": "Practitioner", "firstName": "Mary", "lastName": "Seacole", "email": "Mary.Seacole@Example.com"}),
        )
        .await;
        assert_eq!(status, 200, "{m}");
        assert_eq!(m["resourceType"], "ProjectMembership");
        let messages = sink.wait_for(1);
        let invite = &messages[0];
        assert_eq!(mail::header(invite, "Subject").as_deref(), Some("Welcome to fhirgate"));
        assert_eq!(mail::header(invite, "To").as_deref(), Some("mary.seacole@example.com"));
        assert_eq!(
            mail::header(invite, "From").as_deref(),
            Some("\"Clinic Gateway\" <no-reply@clinic.example>")
        );
        assert!(mail::body(invite).contains("You were invited to Default"), "{invite}");
        let link = mail::link(invite, "/auth/setpassword/").expect("a set-password link");
        assert!(link.starts_with(&gw.base), "{link}");
        assert!(!std::fs::exists(gw.data_dir.join("outbox")).unwrap(), "SMTP, not the outbox");

        // The page behind the link, then the browser's form post.
        let (status, page) = get_page(&link).await;
        assert_eq!(status, 200, "{page}");
        assert!(page.contains(r#"<label for="password">"#), "{page}");
        assert!(page.contains(r#"autocomplete="new-password""#), "{page}");
        let id = hidden(&page, "id");
        let secret = hidden(&page, "secret");
        assert!(link.ends_with(&format!("{id}/{secret}")), "{link}");
        let (status, html) = submit_form(
            &gw,
            &[("id", &id), ("secret", &secret), ("password", "sea-cole-1854"), ("confirmPassword", "sea-cole-1855")],
        )
        .await;
        assert_eq!(status, 400);
        assert!(html.contains("Passwords do not match"), "{html}");
        let (status, html) = submit_form(
            &gw,
            &[("id", &id), ("secret", &secret), ("password", "short"), ("confirmPassword", "short")],
        )
        .await;
        assert_eq!(status, 400);
        assert!(html.contains("Invalid password, must be at least 8 characters"), "{html}");
        assert!(!signs_in(&gw, "mary.seacole@example.com", "sea-cole-1854").await);
        let (status, html) = submit_form(
            &gw,
            &[("id", &id), ("secret", &secret), ("password", "sea-cole-1854"), ("confirmPassword", "sea-cole-1854")],
        )
        .await;
        assert_eq!(status, 200, "{html}");
        assert!(html.contains("Your password has been set"), "{html}");
        assert!(signs_in(&gw, "mary.seacole@example.com", "sea-cole-1854").await);

        // Only once: the page, the form and the API all refuse it now.
        let (status, page) = get_page(&link).await;
        assert_eq!(status, 400);
        assert!(page.contains("already been used"), "{page}");
        let (status, out) = gw.post(
            "auth/setpassword",
            None,
            json!({"id": id, "secret": secret, "password": "another-pass-1"}),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Already used");
        assert!(!signs_in(&gw, "mary.seacole@example.com", "another-pass-1").await);

        // Inviting an existing user into the project again (another membership) sends the
        // "welcome to the project" e-mail, without a link.
        let (status, _) = gw.post(
            &format!("admin/projects/{project}/invite"),
            Some(&admin),
            json!({"resourceType": "Practitioner", "firstName": "Mary", "lastName": "Seacole", "email": "mary.seacole@example.com", "forceNewMembership": true}),
        )
        .await;
        assert_eq!(status, 200);
        let messages = sink.wait_for(2);
        assert_eq!(mail::header(&messages[1], "Subject").as_deref(), Some("fhirgate: Welcome to Default"));
        assert!(mail::link(&messages[1], "/auth/setpassword/").is_none());

        // The reset e-mail.
        let (status, out) = gw.post("auth/resetpassword", None, json!({"email": "mary.seacole@example.com"})).await;
        assert_eq!(status, 200);
        assert_eq!(outcome_text(&out), "All OK");
        let messages = sink.wait_for(3);
        let reset = &messages[2];
        assert_eq!(mail::header(reset, "Subject").as_deref(), Some("fhirgate Password Reset"));
        let (rid, rsecret) = mail::set_password_ids(reset, &gw.base);
        let (status, out) = gw.post("auth/setpassword", None, json!({"id": rid, "secret": rsecret, "password": "reset-pass-1860"})).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(outcome_text(&out), "All OK");
        assert!(signs_in(&gw, "mary.seacole@example.com", "reset-pass-1860").await);
        assert!(!signs_in(&gw, "mary.seacole@example.com", "sea-cole-1854").await);
        let (status, out) = gw.post("auth/setpassword", None, json!({"id": rid, "secret": rsecret, "password": "reset-pass-1861"})).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Already used");

        // Resetting an unknown address: the same answer, and no e-mail.
        let (status, out) = gw.post("auth/resetpassword", None, json!({"email": "nobody@example.com"})).await;
        assert_eq!(status, 200);
        assert_eq!(outcome_text(&out), "All OK");
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(sink.messages().len(), 3);
    });
}

#[test]
fn without_smtp_e_mails_go_to_the_outbox_and_their_links_work() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let (status, _) = gw.post(
            &format!("admin/projects/{project}/invite"),
            Some(&admin),
            json!({"resourceType": "Patient", "firstName": "Out", "lastName": "Box", "email": "outbox@example.com"}),
        )
        .await;
        assert_eq!(status, 200);
        let messages = mail::wait_for_outbox(&gw.data_dir, 1);
        assert_eq!(messages.len(), 1);
        assert_eq!(mail::header(&messages[0], "To").as_deref(), Some("outbox@example.com"));
        assert_eq!(mail::header(&messages[0], "Subject").as_deref(), Some("Welcome to fhirgate"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(gw.data_dir.join("outbox")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the outbox is private: {mode:o}");
        }
        let link = mail::link(&messages[0], "/auth/setpassword/").unwrap();
        let (status, page) = get_page(&link).await;
        assert_eq!(status, 200);
        let (id, secret) = (hidden(&page, "id"), hidden(&page, "secret"));
        let (status, html) = submit_form(
            &gw,
            &[("id", &id), ("secret", &secret), ("password", "quiet-harbour-lamp"), ("confirmPassword", "quiet-harbour-lamp")],
        )
        .await;
        assert_eq!(status, 200, "{html}");
        assert!(!signs_in(&gw, "outbox@example.com", "quiet-harbour-lamp").await, "project-scoped");
        assert!(signs_in_to(&gw, "outbox@example.com", "quiet-harbour-lamp", Some(&project)).await);
        let (status, html) = submit_form(
            &gw,
            &[("id", &id), ("secret", &secret), ("password", "quiet-harbour-lamp-2"), ("confirmPassword", "quiet-harbour-lamp-2")],
        )
        .await;
        assert_eq!(status, 400);
        assert!(html.contains("already been used"), "{html}");
        // A made-up link gets the invalid-link page, not a form.
        let (status, page) = get_page(&format!("{}auth/setpassword/{}/{secret}", gw.base, uuid_like())).await;
        assert_eq!(status, 404);
        assert!(page.contains("Invalid link"), "{page}");
        assert!(!page.contains("<form"), "{page}");
    });
}

fn uuid_like() -> &'static str {
    "00000000-0000-4000-8000-000000000000"
}
