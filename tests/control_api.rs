//! In-process tests of the control API (docs/contract.md §2; docs/medplum-compat.md §12 cases 1–9, 32–35, 55, 74),
//! driving `control::router` with `tower::ServiceExt::oneshot` against a temp-dir SQLite store
//! (or, with `FHIRGATE_TEST_STORE=postgres`, a fresh PostgreSQL database of the test cluster).

// Helpers of an integration test crate are test code too; a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::StatusCode;
use common::http::basic;
use common::inprocess::{BASE, InProcess, PEER, Resp, request};
use common::people::jwt_claims;
use fhirgate::control::bootstrap::bootstrap;
use serde_json::{Value, json};

mod common;

/// One test's control API: on SQLite, or on PostgreSQL when the run asks for it.
struct Env(InProcess);

impl std::ops::Deref for Env {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.0
    }
}

async fn env() -> Env {
    Env(InProcess::start(common::pg::store_for, |_| {}).await)
}

impl Env {
    async fn call(&self, method: &str, uri: &str, auth: Option<&str>, body: Option<Value>) -> Resp {
        let mut headers = vec![];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let body = match body {
            Some(v) => {
                headers.push(("content-type", "application/fhir+json"));
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.send(request(method, uri, &headers, body, PEER)).await
    }

    async fn token_form(&self, form: &str, headers: &[(&str, &str)]) -> Resp {
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        h.extend_from_slice(headers);
        self.send(request("POST", "/oauth2/token", &h, form.to_string(), PEER))
            .await
    }

    async fn client_token(&self, id: &str, secret: &str) -> Resp {
        self.token_form(
            &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
            &[],
        )
        .await
    }

    fn admin_basic(&self) -> String {
        basic(
            &self.boot.client_id,
            self.boot.client_secret.as_deref().unwrap(),
        )
    }

    async fn admin_bearer(&self) -> String {
        let r = self
            .client_token(
                &self.boot.client_id,
                self.boot.client_secret.as_deref().unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        format!("Bearer {}", r.json()["access_token"].as_str().unwrap())
    }

    /// Creates a client through the admin API; returns `(id, secret, client json)`.
    async fn new_client(&self, body: Value) -> (String, String, Value) {
        let auth = self.admin_basic();
        let r = self
            .call(
                "POST",
                &format!("/admin/projects/{}/client", self.boot.default_project_id),
                Some(&auth),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let v = r.json();
        (
            v["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
            v,
        )
    }

    async fn create_policy(&self, policy: Value) -> String {
        let auth = self.admin_basic();
        let r = self
            .call("POST", "/fhir/R4/AccessPolicy", Some(&auth), Some(policy))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()["id"].as_str().unwrap().to_string()
    }

    async fn membership_of(&self, profile: &str) -> Value {
        let auth = self.admin_basic();
        let r = self
            .call(
                "GET",
                &format!("/fhir/R4/ProjectMembership?profile={profile}"),
                Some(&auth),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json()["entry"][0]["resource"].clone()
    }
}

// === token endpoint, cases 1–9 ===

#[tokio::test]
async fn case1_json_body_is_refused_as_plain_text() {
    let env = env().await;
    let body = json!({"grant_type": "client_credentials"}).to_string();
    let r = env
        .send(request(
            "POST",
            "/oauth2/token",
            &[("content-type", "application/json")],
            body,
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.text, "Unsupported content type");
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
}

#[tokio::test]
async fn case2_3_grant_type_missing_or_unsupported() {
    let env = env().await;
    let r = env.token_form("client_id=x", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.oauth_error(),
        ("invalid_request".into(), "Missing grant_type".into())
    );
    for grant in [
        "foo",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "password",
    ] {
        let r = env.token_form(&format!("grant_type={grant}"), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.oauth_error(),
            ("invalid_request".into(), "Unsupported grant_type".into()),
            "{grant}"
        );
    }
}

#[tokio::test]
async fn case4_client_credentials_token_claims_and_response_shape() {
    let env = env().await;
    let id = env.boot.client_id.clone();
    let r = env
        .client_token(&id, env.boot.client_secret.as_deref().unwrap())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let v = r.json();
    assert!(v.get("error").is_none());
    assert!(v.get("refresh_token").is_none());
    assert_eq!(v["token_type"], "Bearer");
    // A client using its secret keeps the configured lifetime (only assertion-authenticated
    // backend services get five minutes: tests/smart.rs).
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["scope"], "openid");
    assert_eq!(
        v["project"],
        json!({"reference": format!("Project/{}", env.boot.default_project_id)})
    );
    assert_eq!(
        v["profile"],
        json!({"reference": format!("ClientApplication/{id}")})
    );
    assert_eq!(
        v["smart_style_url"],
        format!("{BASE}fhir/R4/.well-known/smart-styles.json")
    );
    assert_eq!(v["need_patient_banner"], false);

    let access = v["access_token"].as_str().unwrap();
    let verified = env.state.keyring().verify(access).unwrap();
    assert_eq!(verified.iss, BASE);
    let c = jwt_claims(access);
    assert_eq!(c["aud"], id.as_str());
    assert_eq!(c["client_id"], id.as_str());
    assert_eq!(c["sub"], id.as_str());
    assert_eq!(c["username"], id.as_str());
    assert_eq!(c["scope"], "openid");
    assert_eq!(c["profile"], format!("ClientApplication/{id}"));
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    let login_id = c["login_id"].as_str().unwrap();
    let login = env.state.store.login(login_id).await.unwrap().unwrap();
    assert_eq!(login.auth_method, "client");
    assert_eq!(login.expires_at, c["exp"].as_i64().unwrap());
    assert_eq!(login.scope, "openid");
    assert!(login.membership_id.is_some());
    assert_eq!(login.user_ref, format!("ClientApplication/{id}"));

    let idt = jwt_claims(v["id_token"].as_str().unwrap());
    assert_eq!(idt["fhirUser"], format!("ClientApplication/{id}"));
    assert_eq!(idt["login_id"], login_id);
    assert_eq!(idt["aud"], id.as_str());

    // Mounted under /api/ too, and the scope is carried.
    let form = format!(
        "grant_type=client_credentials&client_id={id}&client_secret={}&scope=openid+system%2F*.rs",
        env.boot.client_secret.as_deref().unwrap()
    );
    let r = env
        .send(request(
            "POST",
            "/api/oauth2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["scope"], "openid system/*.rs");
}

#[tokio::test]
async fn case5_6_missing_unknown_and_wrong_credentials() {
    let env = env().await;
    let id = env.boot.client_id.clone();
    let cases = [
        (
            "grant_type=client_credentials&client_secret=x".to_string(),
            "Missing client_id",
        ),
        (
            format!("grant_type=client_credentials&client_id={id}"),
            "Missing client_secret",
        ),
        (
            "grant_type=client_credentials&client_id=nobody&client_secret=x".to_string(),
            "Invalid client",
        ),
        (
            format!("grant_type=client_credentials&client_id={id}&client_secret=wrong"),
            "Invalid secret",
        ),
    ];
    // RFC 6749 §5.2: a client that cannot be authenticated is `invalid_client`, 401 (Medplum
    // answers `invalid_request` 400 with the same texts).
    for (form, text) in cases {
        let r = env.token_form(&form, &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{form}");
        assert_eq!(
            r.oauth_error(),
            ("invalid_client".into(), text.into()),
            "{form}"
        );
        assert!(
            r.headers.get("www-authenticate").is_none(),
            "no Basic challenge for a client that did not try Basic: {form}"
        );
    }
    // Tried with Basic: the 401 names the scheme.
    let r = env
        .token_form(
            "grant_type=client_credentials",
            &[("authorization", &basic(&id, "wrong"))],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.oauth_error(),
        ("invalid_client".into(), "Invalid secret".into())
    );
    assert_eq!(
        r.headers["www-authenticate"].to_str().unwrap(),
        "Basic realm=\"fhirgate\""
    );
}

#[tokio::test]
async fn case7_basic_header_form_urldecoded_and_other_schemes_refused() {
    let env = env().await;
    let id = env.boot.client_id.clone();
    let secret = env.boot.client_secret.clone().unwrap();
    let r = env
        .token_form(
            "grant_type=client_credentials",
            &[("authorization", &basic(&id, &secret))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json()["access_token"].is_string());
    // RFC 6749 §2.3.1: the halves are form-urlencoded.
    let encoded: String = secret
        .chars()
        .map(|c| format!("%{:02X}", c as u32))
        .collect();
    let r = env
        .token_form(
            "grant_type=client_credentials",
            &[("authorization", &basic(&id, &encoded))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for header in ["Bearer xyz", "Basic !!!", "Digest abc"] {
        let r = env
            .token_form(
                "grant_type=client_credentials",
                &[("authorization", header)],
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{header}");
        assert_eq!(
            r.oauth_error(),
            (
                "invalid_client".into(),
                "Invalid authorization header".into()
            ),
            "{header}"
        );
        assert_eq!(
            r.headers.contains_key("www-authenticate"),
            header.starts_with("Basic "),
            "{header}"
        );
    }
}

#[tokio::test]
async fn case8_clients_without_secret_membership_or_active_status() {
    let env = env().await;
    let auth = env.admin_basic();
    // No secret at all, with a membership.
    let r = env
        .call(
            "POST",
            "/fhir/R4/ClientApplication",
            Some(&auth),
            Some(json!({"resourceType": "ClientApplication", "name": "nosecret"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let no_secret = r.json()["id"].as_str().unwrap().to_string();
    let m = json!({"resourceType": "ProjectMembership",
        "project": {"reference": format!("Project/{}", env.boot.default_project_id)},
        "user": {"reference": format!("ClientApplication/{no_secret}")},
        "profile": {"reference": format!("ClientApplication/{no_secret}")}});
    let r = env
        .call("POST", "/fhir/R4/ProjectMembership", Some(&auth), Some(m))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = env.client_token(&no_secret, "anything").await;
    assert_eq!(r.oauth_error().1, "Invalid client");

    // A secret but no membership.
    let secret = "0123456789abcdef0123456789abcdef";
    let r = env
        .call(
            "POST",
            "/fhir/R4/ClientApplication",
            Some(&auth),
            Some(json!({"resourceType": "ClientApplication", "name": "lonely", "secret": secret})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        r.json()["secret"],
        secret,
        "the secret is shown in the response that sets it"
    );
    let lonely = r.json()["id"].as_str().unwrap().to_string();
    let r = env.client_token(&lonely, secret).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.oauth_error().1, "Invalid client");
    let r = env
        .call(
            "GET",
            &format!("/fhir/R4/ClientApplication/{lonely}"),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.json().get("secret").is_none(),
        "secrets are never read back"
    );

    // status off, then active.
    let (id, secret, client) = env.new_client(json!({"name": "toggled"})).await;
    let mut off = client.clone();
    off["status"] = json!("off");
    off.as_object_mut().unwrap().remove("secret");
    let r = env
        .call(
            "PUT",
            &format!("/fhir/R4/ClientApplication/{id}"),
            Some(&auth),
            Some(off.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = env.client_token(&id, &secret).await;
    assert_eq!(r.oauth_error().1, "Invalid client");
    off["status"] = json!("active");
    let r = env
        .call(
            "PUT",
            &format!("/fhir/R4/ClientApplication/{id}"),
            Some(&auth),
            Some(off),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = env.client_token(&id, &secret).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn case9_ip_rules_at_the_token_endpoint() {
    let env = env().await;
    let policy = env
        .create_policy(json!({"resourceType": "AccessPolicy", "name": "ip",
            "resource": [{"resourceType": "Patient"}],
            "ipAccessRule": [{"name": "bad", "value": "6.6.6.6", "action": "block"}, {"name": "rest", "value": "*", "action": "allow"}]}))
        .await;
    let (id, secret, _) = env
        .new_client(
            json!({"name": "ip", "accessPolicy": {"reference": format!("AccessPolicy/{policy}")}}),
        )
        .await;
    let form = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    let ct = ("content-type", "application/x-www-form-urlencoded");
    let r = env
        .send(request(
            "POST",
            "/oauth2/token",
            &[ct, ("x-forwarded-for", "6.6.6.6")],
            form.clone(),
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.oauth_error(),
        ("invalid_request".into(), "IP address not allowed".into())
    );
    let r = env
        .send(request(
            "POST",
            "/oauth2/token",
            &[ct, ("x-forwarded-for", "5.5.5.5")],
            form.clone(),
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json()["access_token"].is_string());
    // An untrusted peer's X-Forwarded-For is ignored: the peer itself is the client.
    let r = env
        .send(request(
            "POST",
            "/oauth2/token",
            &[ct, ("x-forwarded-for", "5.5.5.5")],
            form.clone(),
            "6.6.6.6:1",
        ))
        .await;
    assert_eq!(r.oauth_error().1, "IP address not allowed");
    // Malformed X-Forwarded-For from a trusted peer fails closed.
    let r = env
        .send(request(
            "POST",
            "/oauth2/token",
            &[ct, ("x-forwarded-for", "not-an-ip")],
            form,
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // The rule holds on every request, Basic included.
    let r = env
        .send(request(
            "GET",
            "/auth/me",
            &[
                ("authorization", &basic(&id, &secret)),
                ("x-forwarded-for", "6.6.6.6"),
            ],
            Body::empty(),
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

// === /auth/me, cases 32–35, 55 ===

#[tokio::test]
async fn auth_me_for_bearer_basic_and_nobody() {
    let env = env().await;
    let bearer = env.admin_bearer().await;
    for auth in [bearer.clone(), env.admin_basic()] {
        let r = env.call("GET", "/auth/me", Some(&auth), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        assert_eq!(v["project"]["id"], env.boot.default_project_id.as_str());
        assert_eq!(v["project"]["resourceType"], "Project");
        assert_eq!(v["membership"]["admin"], true);
        assert_eq!(
            v["membership"]["profile"]["reference"],
            format!("ClientApplication/{}", env.boot.client_id)
        );
        assert_eq!(v["profile"]["resourceType"], "ClientApplication");
        assert_eq!(v["profile"]["id"], env.boot.client_id.as_str());
        assert!(v["profile"].get("secret").is_none());
        assert!(!r.text.contains(env.boot.client_secret.as_deref().unwrap()));
        assert_eq!(v["config"]["resourceType"], "UserConfiguration");
        assert_eq!(v["accessPolicy"]["resourceType"], "AccessPolicy");
        assert!(
            v["accessPolicy"]["resource"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["resourceType"] == "ProjectMembership")
        );
        assert!(v.get("user").is_none() && v.get("security").is_none());
    }
    let r = env.call("GET", "/auth/me", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["id"], "unauthorized");
    assert!(r.headers.get("www-authenticate").is_none());
    let r = env
        .call("GET", "/auth/me?_medplum-prompt-basic-auth=1", None, None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers["www-authenticate"],
        format!("Basic realm=\"{BASE}\"")
    );
    let id = env.boot.client_id.clone();
    for bad in [
        "foo".to_string(),
        "foo foo".into(),
        "Bearer foo".into(),
        "Basic ".into(),
        "Basic foo".into(),
        basic("", "secret"),
        basic(&id, ""),
        basic("unknown", "x"),
        basic(&id, "wrong"),
    ] {
        let r = env.call("GET", "/auth/me", Some(&bad), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad}");
    }
}

#[tokio::test]
async fn auth_me_lists_the_membership_policy_in_based_on() {
    let env = env().await;
    let policy = env.create_policy(json!({"resourceType": "AccessPolicy", "name": "p", "resource": [{"resourceType": "Observation"}]})).await;
    let (id, secret, _) = env.new_client(json!({"name": "reader", "accessPolicy": {"reference": format!("AccessPolicy/{policy}")}})).await;
    let r = env
        .call("GET", "/auth/me", Some(&basic(&id, &secret)), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(
        v["accessPolicy"]["basedOn"][0]["reference"],
        format!("AccessPolicy/{policy}")
    );
    assert!(v["membership"].get("admin").is_none_or(|a| a == false));
    assert_eq!(
        v["config"]["menu"].as_array().unwrap().len(),
        1,
        "no admin menu for a non-admin"
    );
}

#[tokio::test]
async fn revoked_login_and_unknown_login_are_unauthorized() {
    let env = env().await;
    let bearer = env.admin_bearer().await;
    let login_id = jwt_claims(bearer.trim_start_matches("Bearer "))["login_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        env.call("GET", "/auth/me", Some(&bearer), None)
            .await
            .status,
        StatusCode::OK
    );
    env.state.store.revoke_login(&login_id).await.unwrap();
    env.state.refresh().await.unwrap();
    assert_eq!(
        env.call("GET", "/auth/me", Some(&bearer), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

// === admin API, case 74 ===

#[tokio::test]
async fn admin_creates_a_client_that_can_get_a_token() {
    let env = env().await;
    let (id, secret, client) = env
        .new_client(json!({"name": "lab device", "description": "d", "accessTokenLifetime": "60s"}))
        .await;
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(client["resourceType"], "ClientApplication");
    assert_eq!(client["name"], "lab device");
    let r = env.client_token(&id, &secret).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["expires_in"], 60);
    let m = env.membership_of(&format!("ClientApplication/{id}")).await;
    assert_eq!(m["user"]["reference"], format!("ClientApplication/{id}"));
    assert_eq!(
        m["project"]["reference"],
        format!("Project/{}", env.boot.default_project_id)
    );

    let auth = env.admin_basic();
    let url = format!("/admin/projects/{}/client", env.boot.default_project_id);
    let r = env
        .call(
            "POST",
            &url,
            Some(&auth),
            Some(json!({"description": "no name"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.outcome_text(), "Client name is required");
    let r = env
        .call(
            "POST",
            &url,
            Some(&auth),
            Some(json!({"name": "x", "accessTokenLifetime": "300"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env
        .call(
            "POST",
            &url,
            Some(&basic(&id, &secret)),
            Some(json!({"name": "by a non-admin"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["id"], "forbidden");
}

#[tokio::test]
async fn member_endpoints_enforce_admin_and_project() {
    let env = env().await;
    let admin = env.admin_basic();
    let (id, secret, _) = env.new_client(json!({"name": "plain member"})).await;
    let member = basic(&id, &secret);
    let m = env.membership_of(&format!("ClientApplication/{id}")).await;
    let mid = m["id"].as_str().unwrap().to_string();
    let pid = env.boot.default_project_id.clone();
    let url = format!("/admin/projects/{pid}/members/{mid}");

    // Non-admin: 403 everywhere.
    assert_eq!(
        env.call(
            "GET",
            &format!("/admin/projects/{pid}"),
            Some(&member),
            None
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        env.call("GET", &url, Some(&member), None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        env.call("POST", &url, Some(&member), Some(m.clone()))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        env.call("DELETE", &url, Some(&member), None).await.status,
        StatusCode::FORBIDDEN
    );

    // Admin.
    let r = env
        .call("GET", &format!("/admin/projects/{pid}"), Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["project"]["id"], pid.as_str());
    assert_eq!(r.json()["project"]["name"], "Default");
    let r = env.call("GET", &url, Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], mid.as_str());

    let mut wrong_id = m.clone();
    wrong_id["id"] = json!("another");
    assert_eq!(
        env.call("POST", &url, Some(&admin), Some(wrong_id))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let mut wrong_type = m.clone();
    wrong_type["resourceType"] = json!("Patient");
    assert_eq!(
        env.call("POST", &url, Some(&admin), Some(wrong_type))
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    let mut promoted = m.clone();
    promoted["admin"] = json!(true);
    promoted["user"] = json!({"reference": "ClientApplication/someone-else"});
    let r = env.call("POST", &url, Some(&admin), Some(promoted)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["admin"], true);
    assert_eq!(
        v["user"]["reference"],
        format!("ClientApplication/{id}"),
        "user is read-only"
    );
    assert_eq!(
        v["meta"]["author"]["reference"],
        format!("ClientApplication/{}", env.boot.client_id)
    );
    // The promotion is visible at once.
    let r = env
        .call(
            "GET",
            &format!("/admin/projects/{pid}"),
            Some(&member),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // A membership of another project: 403.
    let other = env
        .state
        .store
        .list("ProjectMembership")
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.project_id.as_deref() != Some(pid.as_str()))
        .map(|m| m.id);
    if let Some(other) = other {
        assert_eq!(
            env.call(
                "GET",
                &format!("/admin/projects/{pid}/members/{other}"),
                Some(&admin),
                None
            )
            .await
            .status,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        env.call(
            "DELETE",
            &format!("/admin/projects/{pid}/members/nope"),
            Some(&admin),
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let r = env.call("DELETE", &url, Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], "ok");
    assert_eq!(
        env.client_token(&id, &secret).await.oauth_error().1,
        "Invalid client",
        "no membership, no token"
    );
}

#[tokio::test]
async fn deleting_the_project_owner_membership_is_refused() {
    let env = env().await;
    let admin = env.admin_basic();
    let pid = env.boot.default_project_id.clone();
    // A membership for the project owner (the bootstrap admin user).
    let m = json!({"resourceType": "ProjectMembership",
        "project": {"reference": format!("Project/{pid}")},
        "user": {"reference": format!("User/{}", env.boot.admin_user_id)},
        "profile": {"reference": "Practitioner/owner"}});
    let r = env
        .call("POST", "/fhir/R4/ProjectMembership", Some(&admin), Some(m))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let mid = r.json()["id"].as_str().unwrap().to_string();
    let r = env
        .call(
            "DELETE",
            &format!("/admin/projects/{pid}/members/{mid}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.outcome_text(), "Cannot delete the owner of the project");
}

#[tokio::test]
async fn rotate_secret_moves_the_old_secret_to_retiring() {
    let env = env().await;
    let admin = env.admin_basic();
    let (id, old, _) = env.new_client(json!({"name": "rotating"})).await;
    let url = format!("/fhir/R4/ClientApplication/{id}/$rotate-secret");
    let params = |name: &str, value: &str| json!({"resourceType": "Parameters", "parameter": [{"name": name, "valueString": value}]});

    let r = env
        .call(
            "POST",
            &url,
            Some(&admin),
            Some(json!({"resourceType": "Parameters"})),
        )
        .await;
    assert_eq!(
        (r.status, r.outcome_text()),
        (
            StatusCode::BAD_REQUEST,
            "Secret to rotate must be provided".into()
        )
    );
    let both = json!({"resourceType": "Parameters", "parameter": [{"name": "secret", "valueString": old}, {"name": "retiringSecret", "valueString": "x"}]});
    let r = env.call("POST", &url, Some(&admin), Some(both)).await;
    assert_eq!(
        (r.status, r.outcome_text()),
        (
            StatusCode::BAD_REQUEST,
            "Only one secret can be rotated at a time".into()
        )
    );
    let r = env
        .call("POST", &url, Some(&admin), Some(params("secret", "wrong")))
        .await;
    assert_eq!(
        (r.status, r.outcome_text()),
        (
            StatusCode::BAD_REQUEST,
            "Provided secret does not match client".into()
        )
    );
    let r = env
        .call(
            "POST",
            &url,
            Some(&basic(&id, &old)),
            Some(params("secret", &old)),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "non-admins cannot rotate");

    let r = env
        .call("POST", &url, Some(&admin), Some(params("secret", &old)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["resourceType"], "ClientApplication");
    let new = v["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(new.len(), 64);

    // Basic auth takes only the primary secret, at once.
    assert!(
        env.state
            .authenticate(Some(&basic(&id, &old)))
            .await
            .0
            .is_err()
    );
    assert!(
        env.state
            .authenticate(Some(&basic(&id, &new)))
            .await
            .0
            .is_ok()
    );
    // The token endpoint also takes the retiring secret (case 6).
    assert_eq!(env.client_token(&id, &old).await.status, StatusCode::OK);
    assert_eq!(env.client_token(&id, &new).await.status, StatusCode::OK);

    let r = env
        .call(
            "POST",
            &url,
            Some(&admin),
            Some(params("retiringSecret", &old)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json().get("secret").is_none());
    assert_eq!(
        env.client_token(&id, &old).await.oauth_error().1,
        "Invalid secret"
    );
    assert_eq!(env.client_token(&id, &new).await.status, StatusCode::OK);
}

// === discovery ===

#[tokio::test]
async fn jwks_publishes_the_signing_key_and_tokens_verify_against_it() {
    let env = env().await;
    let bearer = env.admin_bearer().await;
    let token = bearer.trim_start_matches("Bearer ");
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.unwrap();
    let r = env.call("GET", "/.well-known/jwks.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let jwks = r.json();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("kid published")
        .clone();
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");
    assert!(key.get("d").is_none(), "no private part");
    let decoding = jsonwebtoken::DecodingKey::from_ec_components(
        key["x"].as_str().unwrap(),
        key["y"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.validate_aud = false;
    validation.set_issuer(&[BASE]);
    let data = jsonwebtoken::decode::<Value>(token, &decoding, &validation).unwrap();
    assert_eq!(data.claims["client_id"], env.boot.client_id.as_str());
}

#[tokio::test]
async fn discovery_advertises_what_works() {
    let env = env().await;
    let a = env
        .call("GET", "/.well-known/openid-configuration", None, None)
        .await
        .json();
    let b = env
        .call("GET", "/.well-known/oauth-authorization-server", None, None)
        .await
        .json();
    assert_eq!(a, b);
    assert_eq!(a["issuer"], BASE);
    assert_eq!(a["token_endpoint"], format!("{BASE}oauth2/token"));
    assert_eq!(a["jwks_uri"], format!("{BASE}.well-known/jwks.json"));
    // ES256 signs every token; RS256 signs the ID tokens of SMART sign-ins.
    assert_eq!(
        a["id_token_signing_alg_values_supported"],
        json!(["ES256", "RS256"])
    );
    assert_eq!(a["revocation_endpoint"], format!("{BASE}oauth2/revoke"));
    assert_eq!(a["end_session_endpoint"], format!("{BASE}oauth2/logout"));
    assert_eq!(a["response_types_supported"], json!(["code"]));
    for path in [
        "/.well-known/smart-configuration",
        "/fhir/R4/.well-known/smart-configuration",
        "/api/.well-known/smart-configuration",
    ] {
        let r = env.call("GET", path, None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        let s = r.json();
        assert_eq!(
            s["code_challenge_methods_supported"],
            json!(["S256"]),
            "{path}"
        );
        assert_eq!(s["token_endpoint"], format!("{BASE}oauth2/token"));
    }
    let r = env
        .call("GET", "/fhir/R4/.well-known/smart-styles.json", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = env
        .call(
            "GET",
            "/.well-known/oauth-protected-resource?resource=http://evil/",
            None,
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::BAD_REQUEST, "Invalid resource URL")
    );
}

// === identity CRUD ===

#[tokio::test]
async fn access_policy_crud_with_if_match_and_validation() {
    let env = env().await;
    let auth = env.admin_basic();
    let r = env
        .call("POST", "/fhir/R4/AccessPolicy", Some(&auth), Some(json!({"resourceType": "AccessPolicy", "name": "Nurses", "resource": [{"resourceType": "Patient", "readonly": true}]})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    let version = created["meta"]["versionId"].as_str().unwrap().to_string();
    assert_eq!(
        created["meta"]["project"],
        env.boot.default_project_id.as_str()
    );
    assert_eq!(r.headers["etag"], format!("W/\"{version}\""));
    assert!(
        r.headers["location"]
            .to_str()
            .unwrap()
            .starts_with(&format!("{BASE}fhir/R4/AccessPolicy/{id}/_history/"))
    );

    let r = env
        .call(
            "GET",
            &format!("/fhir/R4/AccessPolicy/{id}"),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["name"], "Nurses");

    let mut updated = created.clone();
    updated["name"] = json!("Nurses 2");
    let uri = format!("/fhir/R4/AccessPolicy/{id}");
    let send_put = |if_match: String, body: Value| {
        request(
            "PUT",
            &uri,
            &[
                ("authorization", &auth),
                ("content-type", "application/fhir+json"),
                ("if-match", &if_match),
            ],
            body.to_string(),
            "127.0.0.1:1",
        )
    };
    let r = env
        .send(send_put(format!("W/\"{version}\""), updated.clone()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["name"], "Nurses 2");
    let v2 = r.json()["meta"]["versionId"].as_str().unwrap().to_string();
    assert_ne!(v2, version);
    let mut unchanged = updated.clone();
    unchanged["meta"] = json!({"versionId": v2});
    let r = env.send(send_put(format!("W/\"{v2}\""), unchanged)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json()["meta"]["versionId"],
        v2.as_str(),
        "an unchanged resource is not a new version"
    );
    let mut again = updated.clone();
    again["name"] = json!("Nurses 3");
    let r = env.send(send_put(format!("W/\"{version}\""), again)).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.text);

    // Search by name (prefix, case-insensitive).
    let r = env
        .call(
            "GET",
            "/fhir/R4/AccessPolicy?name=nurses",
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.json()["total"], 1);

    // Validation.
    let bad = json!({"resourceType": "AccessPolicy", "resource": [{"resourceType": "Patient", "criteria": "Observation?status=final"}]});
    let r = env
        .call("POST", "/fhir/R4/AccessPolicy", Some(&auth), Some(bad))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.outcome_text().contains("axp-3"), "{}", r.text);
    // Criteria that cannot be evaluated (an unknown search parameter) are refused the same way,
    // with the reason.
    let unknown = json!({"resourceType": "AccessPolicy", "resource": [{"resourceType": "Patient", "criteria": "Patient?nonsense=x"}]});
    let r = env
        .call("POST", "/fhir/R4/AccessPolicy", Some(&auth), Some(unknown))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.outcome_text().contains("nonsense"), "{}", r.text);
    let r = env
        .call(
            "POST",
            "/fhir/R4/AccessPolicy",
            Some(&auth),
            Some(json!({"resourceType": "Patient"})),
        )
        .await;
    assert_eq!(
        (r.status, r.outcome_text()),
        (StatusCode::BAD_REQUEST, "Incorrect resource type".into())
    );
    let r = env
        .send(request(
            "POST",
            "/fhir/R4/AccessPolicy",
            &[
                ("authorization", &auth),
                ("content-type", "application/fhir+json"),
            ],
            "{not json",
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["resourceType"], "OperationOutcome");
    let mut wrong_id = updated.clone();
    wrong_id["id"] = json!("other");
    let r = env
        .call(
            "PUT",
            &format!("/fhir/R4/AccessPolicy/{id}"),
            Some(&auth),
            Some(wrong_id),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = env
        .call(
            "DELETE",
            &format!("/fhir/R4/AccessPolicy/{id}"),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = env
        .call(
            "GET",
            &format!("/fhir/R4/AccessPolicy/{id}"),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn membership_search_by_profile_type_and_user_secrets_hidden() {
    let env = env().await;
    let auth = env.admin_basic();
    let pid = env.boot.default_project_id.clone();
    let r = env
        .call("POST", "/fhir/R4/User", Some(&auth), Some(json!({"resourceType": "User", "firstName": "Pat", "lastName": "Ient", "email": "Pat@Example.com", "passwordHash": "$fake"})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let user = r.json();
    assert_eq!(user["email"], "pat@example.com");
    assert!(user.get("passwordHash").is_none());
    assert_eq!(
        user["project"]["reference"],
        format!("Project/{pid}"),
        "a project admin creates project-scoped users"
    );
    let uid = user["id"].as_str().unwrap().to_string();
    let r = env
        .call(
            "POST",
            "/fhir/R4/User",
            Some(&auth),
            Some(json!({"resourceType": "User", "email": "pat@example.com"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let m = json!({"resourceType": "ProjectMembership",
        "project": {"reference": "Project/somewhere-else"},
        "user": {"reference": format!("User/{uid}")},
        "profile": {"reference": "Patient/p1"}});
    let r = env
        .call("POST", "/fhir/R4/ProjectMembership", Some(&auth), Some(m))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let created = r.json();
    assert_eq!(
        created["project"]["reference"],
        format!("Project/{pid}"),
        "the caller's project is forced"
    );
    let mid = created["id"].as_str().unwrap().to_string();

    let r = env
        .call(
            "GET",
            "/fhir/R4/ProjectMembership?profile-type=Patient",
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let b = r.json();
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 1);
    assert_eq!(b["entry"][0]["resource"]["id"], mid.as_str());
    assert_eq!(
        b["entry"][0]["fullUrl"],
        format!("{BASE}fhir/R4/ProjectMembership/{mid}")
    );

    let all = env
        .call("GET", "/fhir/R4/ProjectMembership", Some(&auth), None)
        .await
        .json();
    let total = all["total"].as_u64().unwrap();
    assert!(total >= 2);
    let not_patient = env
        .call(
            "GET",
            "/fhir/R4/ProjectMembership?profile-type:not=Patient",
            Some(&auth),
            None,
        )
        .await
        .json();
    assert_eq!(not_patient["total"].as_u64().unwrap(), total - 1);
    let both = env
        .call(
            "GET",
            "/fhir/R4/ProjectMembership?profile-type=Patient,ClientApplication",
            Some(&auth),
            None,
        )
        .await
        .json();
    assert_eq!(both["total"].as_u64().unwrap(), total);
    let by_user = env
        .call(
            "GET",
            &format!("/fhir/R4/ProjectMembership?user=User/{uid}"),
            Some(&auth),
            None,
        )
        .await
        .json();
    assert_eq!(by_user["total"], 1);
    let r = env
        .call(
            "GET",
            "/fhir/R4/ProjectMembership?bogus=1",
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env
        .call(
            "GET",
            "/fhir/R4/User?email=PAT@example.com",
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.json()["total"], 1);
    assert!(!r.text.contains("passwordHash"));

    // Paging.
    let page = env
        .call(
            "GET",
            "/fhir/R4/ProjectMembership?_count=1",
            Some(&auth),
            None,
        )
        .await
        .json();
    assert_eq!(page["entry"].as_array().unwrap().len(), 1);
    assert!(
        page["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next")
    );

    // Non-admins never see the admin types (docs/medplum-compat.md §4.2).
    let (cid, secret, _) = env.new_client(json!({"name": "member"})).await;
    let member = basic(&cid, &secret);
    for path in [
        "/fhir/R4/ProjectMembership",
        "/fhir/R4/User",
        "/fhir/R4/Project",
    ] {
        assert_eq!(
            env.call("GET", path, Some(&member), None).await.status,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    assert_eq!(
        env.call(
            "GET",
            &format!("/fhir/R4/ProjectMembership/{mid}"),
            Some(&member),
            None
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    // ... nor, stricter than Medplum (issue 10), ClientApplications and AccessPolicies: a `*`
    // member could otherwise rewrite a client's credentials or widen a policy.
    for path in ["/fhir/R4/ClientApplication", "/fhir/R4/AccessPolicy"] {
        assert_eq!(
            env.call("GET", path, Some(&member), None).await.status,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    // Protected types: super admins only.
    assert_eq!(
        env.call("GET", "/fhir/R4/Login", Some(&auth), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        env.call("GET", "/fhir/R4/ProjectMembership", None, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn project_scoping_and_project_admin_view_of_its_project() {
    let env = env().await;
    let auth = env.admin_basic();
    let pid = env.boot.default_project_id.clone();
    let r = env
        .call("GET", &format!("/fhir/R4/Project/{pid}"), Some(&auth), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let p = r.json();
    assert_eq!(p["name"], "Default");
    assert!(p.get("strictMode").is_none(), "hidden from project admins");
    // Another project does not exist for this caller.
    let r = env
        .call(
            "GET",
            &format!("/fhir/R4/Project/{}", env.boot.super_admin_project_id),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = env.call("GET", "/fhir/R4/Project", Some(&auth), None).await;
    assert_eq!(r.json()["total"], 1);
    // Project admins cannot create projects.
    let r = env
        .call(
            "POST",
            "/fhir/R4/Project",
            Some(&auth),
            Some(json!({"resourceType": "Project", "name": "mine"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // The server-scoped bootstrap admin user is invisible to a project admin.
    let r = env
        .call(
            "GET",
            &format!("/fhir/R4/User/{}", env.boot.admin_user_id),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn super_admin_sees_every_project() {
    let env = env().await;
    // A client in the super admin project (made directly, as an operator would).
    let st = &env.state;
    let mut client = json!({"resourceType": "ClientApplication", "name": "root"});
    let secret = "f".repeat(64);
    let sa = env.boot.super_admin_project_id.clone();
    let store = &st.store;
    let id = "root-client";
    client["id"] = json!(id);
    store
        .put(
            client.clone(),
            Some(&sa),
            &fhirgate::control::index::index_rows(&client),
            None,
            true,
        )
        .await
        .unwrap();
    store
        .set_client_secret(id, Some(&st.hash_secret(&secret)), None)
        .await
        .unwrap();
    let m = json!({"resourceType": "ProjectMembership", "id": "root-m", "project": {"reference": format!("Project/{sa}")},
        "user": {"reference": format!("ClientApplication/{id}")}, "profile": {"reference": format!("ClientApplication/{id}")}});
    store
        .put(
            m.clone(),
            Some(&sa),
            &fhirgate::control::index::index_rows(&m),
            None,
            true,
        )
        .await
        .unwrap();
    st.refresh().await.unwrap();

    let auth = basic(id, &secret);
    let r = env.call("GET", "/fhir/R4/Project", Some(&auth), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["total"], 2);
    let r = env
        .call(
            "GET",
            &format!("/fhir/R4/User/{}", env.boot.admin_user_id),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.json().get("passwordHash").is_none(),
        "never serialized, not even to super admins"
    );
    let r = env.call("GET", "/auth/me", Some(&auth), None).await;
    assert_eq!(r.json()["project"]["superAdmin"], true);
    // Super admins act on the project the admin URL names.
    let r = env
        .call(
            "GET",
            &format!("/admin/projects/{}", env.boot.default_project_id),
            Some(&auth),
            None,
        )
        .await;
    assert_eq!(r.json()["project"]["name"], "Default");
}

// === robustness and bootstrap ===

#[tokio::test]
async fn bad_input_never_gives_a_500() {
    let env = env().await;
    let auth = env.admin_basic();
    let r = env.call("GET", "/nowhere", None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["resourceType"], "OperationOutcome");
    let r = env.call("DELETE", "/oauth2/token", None, None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let big = "x".repeat(2 << 20);
    let r = env
        .send(request(
            "POST",
            "/fhir/R4/AccessPolicy",
            &[
                ("authorization", &auth),
                ("content-type", "application/fhir+json"),
            ],
            big,
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = env
        .send(request(
            "POST",
            "/fhir/R4/AccessPolicy",
            &[("authorization", &auth), ("content-type", "text/plain")],
            "{}",
            "127.0.0.1:1",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    for path in [
        "/fhir/R4/AccessPolicy/..%2F..",
        "/fhir/R4/AccessPolicy/%FF",
        "/fhir/R4/ProjectMembership?_count=abc",
        "/fhir/R4/ProjectMembership?profile:missing=maybe",
        "/fhir/R4/Patient/1",
        "/fhir/R4/User/a/b/c",
        "/admin/projects/x/members/..",
    ] {
        let r = env.call("GET", path, Some(&auth), None).await;
        assert!(r.status.is_client_error(), "{path}: {}", r.status);
    }
    let r = env
        .call(
            "PUT",
            "/fhir/R4/ClientApplication/none",
            Some(&auth),
            Some(json!([1, 2])),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env
        .call(
            "POST",
            "/fhir/R4/ProjectMembership",
            Some(&auth),
            Some(json!({"resourceType": "ProjectMembership"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = env
        .token_form("grant_type=client_credentials&client_assertion_type=x", &[])
        .await;
    assert_eq!(r.oauth_error().1, "Unsupported client assertion type");
    let r = env
        .token_form(
            "grant_type=client_credentials&grant_type=client_credentials",
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bootstrap_is_idempotent() {
    let env = env().await;
    let first = env.boot.clone();
    assert!(first.client_secret.is_some());
    assert!(first.admin_password.is_some());
    assert!(first.created.contains(&"signing key"));
    assert!(first.created.contains(&"admin client"));
    let keys = env.state.store.active_keys().await.unwrap().len();
    let projects = env.state.store.list("Project").await.unwrap().len();
    let clients = env
        .state
        .store
        .list("ClientApplication")
        .await
        .unwrap()
        .len();
    let second = bootstrap(&env.state).await.unwrap();
    assert!(second.created.is_empty(), "{:?}", second.created);
    assert_eq!(second.client_id, first.client_id);
    assert_eq!(second.default_project_id, first.default_project_id);
    assert_eq!(second.super_admin_project_id, first.super_admin_project_id);
    assert!(second.client_secret.is_none());
    assert!(second.admin_password.is_none());
    assert_eq!(env.state.store.active_keys().await.unwrap().len(), keys);
    assert_eq!(
        env.state.store.list("Project").await.unwrap().len(),
        projects
    );
    assert_eq!(
        env.state
            .store
            .list("ClientApplication")
            .await
            .unwrap()
            .len(),
        clients
    );
    let projects = env.state.snapshot();
    assert!(projects.projects[&first.super_admin_project_id].super_admin);
    assert!(!projects.projects[&first.default_project_id].super_admin);
    let user = env
        .state
        .store
        .read("User", &first.admin_user_id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        user.content["passwordHash"]
            .as_str()
            .unwrap()
            .starts_with("$argon2id$")
    );
}

#[tokio::test]
async fn bootstrap_uses_configured_credentials() {
    let env = InProcess::start(common::pg::store_for, |f| {
        f.admin_client_id = Some("automation".into());
        f.admin_client_secret = Some("known-secret-value".into());
        f.admin_password = Some("known-password".into());
    })
    .await;
    let (state, report) = (&env.state, &env.boot);
    assert_eq!(report.client_id, "automation");
    assert!(
        report.client_secret.is_none(),
        "a configured secret is not echoed"
    );
    assert!(report.created.contains(&"admin client"));
    assert!(
        report.admin_password.is_none(),
        "a configured password is not echoed"
    );
    assert!(
        state
            .authenticate(Some(&basic("automation", "known-secret-value")))
            .await
            .0
            .is_ok()
    );
}
