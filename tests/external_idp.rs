//! External identity providers (docs/medplum-compat.md §2.1, §2.13 token exchange, §2.20, §9; §12
//! cases 26, 56, 57).
//!
//! - In process (`control::router` with `oneshot`), every error text of the three cases, with
//!   a tiny local HTTP server in this file playing a misbehaving IdP (ID tokens chosen by the
//!   test, userinfo answering JSON, `application/jwt`, `text/plain`, 429, 500).
//! - End to end: a real fhirgate in front of the real FHIR upstream, and a real OpenID provider
//!   (`oidc-provider` from npm, `tests/idp/server.mjs`): sign-in form at the IdP, callback at
//!   `/auth/external`, fhirgate's code exchanged for tokens that work at the gateway; the
//!   domain flow (`DomainConfiguration`, `/auth/method`); token exchange with a real IdP access
//!   token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway};
use common::http::{basic, rt};
use common::inprocess::{InProcess, PEER, Resp, request};
use common::people;
use common::upstream::FhirUpstream;
use fhirgate::control::index::index_rows;
use serde_json::{Value, json};
use sha2::Digest;

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The only access token the fake IdP's userinfo accepts.
const GOOD_TOKEN: &str = "good-external-token";

fn b64url(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn query_of(url: &str) -> HashMap<String, String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

// =============================================================================================
// A misbehaving IdP, in process
// =============================================================================================

/// What the fake IdP's token endpoint received: the Authorization header and the form.
#[derive(Debug, Clone)]
struct TokenCall {
    authorization: Option<String>,
    form: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct FakeLog(Arc<Mutex<Vec<TokenCall>>>);

/// A local IdP whose answers the test chooses: the authorization `code` is the base64url of
/// the ID token's claims (`fail` → 400), and `/userinfo/<kind>[/<claims>]` answers as `kind`
/// says, to `Bearer good-external-token` only.
struct FakeIdp {
    base: String,
    log: FakeLog,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeIdp {
    async fn start() -> FakeIdp {
        let log = FakeLog::default();
        let app = Router::new()
            .route("/token", post(fake_token))
            .route("/userinfo/{kind}", get(fake_userinfo_plain))
            .route("/userinfo/{kind}/{claims}", get(fake_userinfo))
            .with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeIdp {
            base: format!("http://{addr}"),
            log,
            task,
        }
    }

    fn calls(&self) -> Vec<TokenCall> {
        self.log.0.lock().unwrap().clone()
    }

    /// A code for which the token endpoint answers an ID token with these claims.
    fn code_for(claims: &Value) -> String {
        b64url(claims)
    }
}

async fn fake_token(AxState(log): AxState<FakeLog>, headers: HeaderMap, body: String) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    log.0.lock().unwrap().push(TokenCall {
        authorization: headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string()),
        form: form.clone(),
    });
    let code = form.get("code").cloned().unwrap_or_default();
    if code == "fail" {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    let id_token = format!("{}.{code}.signature", b64url(&json!({"alg": "RS256"})));
    axum::Json(json!({"access_token": "idp-at", "token_type": "Bearer", "id_token": id_token}))
        .into_response()
}

async fn fake_userinfo_plain(
    log: AxState<FakeLog>,
    headers: HeaderMap,
    Path(kind): Path<String>,
) -> Response {
    fake_userinfo(log, headers, Path((kind, String::new()))).await
}

async fn fake_userinfo(
    _: AxState<FakeLog>,
    headers: HeaderMap,
    Path((kind, claims)): Path<(String, String)>,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if bearer != Some(&format!("Bearer {GOOD_TOKEN}")) {
        return (StatusCode::UNAUTHORIZED, "invalid token").into_response();
    }
    let decoded = || String::from_utf8(URL_SAFE_NO_PAD.decode(&claims).unwrap()).unwrap();
    match kind.as_str() {
        "json" => (
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            decoded(),
        )
            .into_response(),
        "jwt" => (
            [(header::CONTENT_TYPE, "application/jwt")],
            format!("{}.{claims}.signature", b64url(&json!({"alg": "RS256"}))),
        )
            .into_response(),
        "text" => ([(header::CONTENT_TYPE, "text/plain")], "hello").into_response(),
        "429" => (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response(),
        "500" => (StatusCode::INTERNAL_SERVER_ERROR, "broken").into_response(),
        "notjson" => ([(header::CONTENT_TYPE, "application/json")], "{not json").into_response(),
        _ => (StatusCode::NOT_FOUND, "no such kind").into_response(),
    }
}

// =============================================================================================
// fhirgate in process
// =============================================================================================

/// The control API in process (SQLite, no rate limit) and its admin client's Basic credentials.
struct Env {
    inner: InProcess,
    admin: String,
}

impl std::ops::Deref for Env {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.inner
    }
}

async fn env() -> Env {
    let inner = InProcess::start(|_| None, |f| f.auth_rate_limit = Some(0)).await;
    let boot = &inner.boot;
    let admin = basic(&boot.client_id, boot.client_secret.as_deref().unwrap());
    Env { inner, admin }
}

impl Env {
    async fn send(&self, method: &str, uri: &str, headers: &[(&str, &str)], body: Body) -> Resp {
        self.inner
            .send(request(method, uri, headers, body, PEER))
            .await
    }

    async fn json(&self, method: &str, uri: &str, auth: Option<&str>, body: &Value) -> Resp {
        let mut h = vec![("content-type", "application/json")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        self.send(method, uri, &h, Body::from(body.to_string()))
            .await
    }

    async fn get(&self, uri: &str) -> Resp {
        self.send("GET", uri, &[], Body::empty()).await
    }

    async fn form(&self, uri: &str, pairs: &[(&str, &str)]) -> Resp {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        self.send(
            "POST",
            uri,
            &[("content-type", "application/x-www-form-urlencoded")],
            Body::from(body),
        )
        .await
    }

    fn project(&self) -> &str {
        &self.boot.default_project_id
    }

    /// Stores a resource straight into fhirgate's store (with its index rows).
    async fn put(&self, resource: Value, project: Option<&str>) {
        let rows = index_rows(&resource);
        self.state
            .store
            .put(resource, project, &rows, None, true)
            .await
            .unwrap();
    }

    /// A user (server-scoped unless `user_project`) with a Practitioner membership in the
    /// default project; returns the membership id.
    async fn seed_user(
        &self,
        id: &str,
        email: Option<&str>,
        user_project: Option<&str>,
        membership_external_id: Option<&str>,
    ) -> String {
        let mut user =
            json!({"resourceType": "User", "id": id, "firstName": "Ext", "lastName": id});
        if let Some(e) = email {
            user["email"] = json!(e.to_lowercase());
        }
        if let Some(p) = user_project {
            user["project"] = json!({"reference": format!("Project/{p}")});
        }
        self.put(user, user_project).await;
        let membership_id = format!("{id}-membership");
        let mut m = json!({
            "resourceType": "ProjectMembership",
            "id": membership_id,
            "project": {"reference": format!("Project/{}", self.project())},
            "user": {"reference": format!("User/{id}")},
            "profile": {"reference": format!("Practitioner/{id}-profile")},
        });
        if let Some(x) = membership_external_id {
            m["externalId"] = json!(x);
        }
        self.put(m, Some(self.project())).await;
        self.state.refresh().await.unwrap();
        membership_id
    }

    /// A ClientApplication of the default project (through the admin API); returns its id.
    async fn client(&self, idp: Option<Value>, redirect_uris: &[&str]) -> String {
        let mut body = json!({"name": "external client", "redirectUris": redirect_uris});
        if let Some(i) = idp {
            body["identityProvider"] = i;
        }
        let r = self
            .json(
                "POST",
                &format!("/admin/projects/{}/client", self.project()),
                Some(&self.admin),
                &body,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// A DomainConfiguration, stored directly (the FHIR CRUD is tested on its own).
    async fn domain(&self, domain: &str, idp: Value) {
        self.put(
            json!({
                "resourceType": "DomainConfiguration",
                "id": uuid::Uuid::new_v4().to_string(),
                "domain": domain,
                "identityProvider": idp,
            }),
            None,
        )
        .await;
    }

    /// A super admin's access token: a ClientApplication with a membership in the super admin
    /// project (made in the store: nothing on the wire creates one), by client credentials.
    async fn super_admin_token(&self) -> String {
        let project = self.boot.super_admin_project_id.clone();
        let (id, secret) = ("super-client", "super-client-secret-0123456789");
        let client = json!({"resourceType": "ClientApplication", "id": id, "name": "super"});
        self.put(client, Some(&project)).await;
        self.state
            .store
            .set_client_secret(id, Some(&self.state.hash_secret(secret)), None)
            .await
            .unwrap();
        let membership = json!({
            "resourceType": "ProjectMembership",
            "id": "super-client-membership",
            "project": {"reference": format!("Project/{project}")},
            "user": {"reference": format!("ClientApplication/{id}")},
            "profile": {"reference": format!("ClientApplication/{id}")},
            "admin": true,
        });
        self.put(membership, Some(&project)).await;
        self.state.refresh().await.unwrap();
        let t = self
            .form(
                "/oauth2/token",
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", id),
                    ("client_secret", secret),
                ],
            )
            .await;
        assert_eq!(t.status, 200, "{}", t.text);
        format!("Bearer {}", t.json()["access_token"].as_str().unwrap())
    }
}

/// An IdP of the fake server (`userinfo` is the path after `/userinfo/`).
fn fake_idp_config(idp: &FakeIdp, userinfo: &str) -> Value {
    json!({
        "authorizeUrl": format!("{}/authorize", idp.base),
        "tokenUrl": format!("{}/token", idp.base),
        "userInfoUrl": format!("{}/userinfo/{userinfo}", idp.base),
        "clientId": "fhirgate-at-idp",
        "clientSecret": "idp-client-secret",
    })
}

fn external_uri(code: Option<&str>, state: Option<&Value>) -> String {
    let mut q = Vec::new();
    if let Some(c) = code {
        q.push(format!("code={}", enc(c)));
    }
    if let Some(s) = state {
        let text = match s {
            Value::String(raw) => raw.clone(),
            other => other.to_string(),
        };
        q.push(format!("state={}", enc(&text)));
    }
    format!("/auth/external?{}", q.join("&"))
}

// === case 56: /auth/method ===

#[tokio::test]
async fn case_56_auth_method() {
    let e = env().await;
    e.domain(
        "clinic.test",
        json!({
            "authorizeUrl": "https://idp.clinic.test/oauth2/authorize?prompt=login",
            "tokenUrl": "https://idp.clinic.test/oauth2/token",
            "userInfoUrl": "https://idp.clinic.test/userinfo",
            "clientId": "cid",
            "clientSecret": "secret",
        }),
    )
    .await;
    e.domain(
        "broken.test",
        json!({
            "authorizeUrl": "idp.broken.test/authorize",
            "tokenUrl": "https://idp.broken.test/token",
            "userInfoUrl": "https://idp.broken.test/userinfo",
            "clientId": "cid",
            "clientSecret": "secret",
        }),
    )
    .await;

    for body in [
        json!({}),
        json!({"email": ""}),
        json!({"email": "not-an-email"}),
    ] {
        let r = e.json("POST", "/auth/method", None, &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(
            r.operation_outcome_text(),
            "Valid email address is required"
        );
        assert_eq!(r.json()["issue"][0]["expression"][0], "email");
    }

    for email in ["alice@clinic.test", "Alice@CLINIC.Test"] {
        let r = e
            .json("POST", "/auth/method", None, &json!({"email": email}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let domain = email.split('@').nth(1).unwrap();
        assert_eq!(
            r.json(),
            json!({
                "domain": domain,
                "authorizeUrl": "https://idp.clinic.test/oauth2/authorize?prompt=login&client_id=cid&redirect_uri=http%3A%2F%2Fgw.test%2Fauth%2Fexternal&response_type=code&scope=openid+profile+email",
            })
        );
    }

    let r = e
        .json(
            "POST",
            "/auth/method",
            None,
            &json!({"email": "bob@elsewhere.test"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({}));

    let r = e
        .json(
            "POST",
            "/auth/method",
            None,
            &json!({"email": "bob@broken.test"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.operation_outcome_text(),
        "Failed to construct URL for the domain"
    );

    // Form bodies parse too (Medplum parses both on every /auth route).
    let r = e
        .send(
            "POST",
            "/auth/method",
            &[("content-type", "application/x-www-form-urlencoded")],
            Body::from("email=carol%40clinic.test"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["domain"], "clinic.test");
}

// === DomainConfiguration through the FHIR API ===

#[tokio::test]
async fn domain_configurations_are_managed_by_super_admins_only() {
    let e = env().await;
    let sa = e.super_admin_token().await;
    let idp = json!({
        "authorizeUrl": "https://idp.clinic.test/a",
        "tokenUrl": "https://idp.clinic.test/t",
        "userInfoUrl": "https://idp.clinic.test/u",
        "clientId": "cid",
        "clientSecret": "secret",
    });
    let body = json!({"resourceType": "DomainConfiguration", "domain": "Clinic.Test", "identityProvider": idp});

    // A project admin (the bootstrap client) may not touch it.
    let r = e
        .json(
            "POST",
            "/fhir/R4/DomainConfiguration",
            Some(&e.admin),
            &body,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.operation_outcome_text(), "Forbidden");

    let r = e
        .json("POST", "/fhir/R4/DomainConfiguration", Some(&sa), &body)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let created = r.json();
    assert_eq!(created["domain"], "clinic.test");
    let id = created["id"].as_str().unwrap().to_string();

    // Used at once by /auth/method.
    let r = e
        .json(
            "POST",
            "/auth/method",
            None,
            &json!({"email": "a@clinic.test"}),
        )
        .await;
    assert!(
        r.json()["authorizeUrl"]
            .as_str()
            .unwrap()
            .starts_with("https://idp.clinic.test/a?client_id=cid&")
    );

    // One configuration per domain, in any letter case.
    let dup = json!({"resourceType": "DomainConfiguration", "domain": "CLINIC.test", "identityProvider": idp});
    let r = e
        .json("POST", "/fhir/R4/DomainConfiguration", Some(&sa), &dup)
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(
        r.operation_outcome_text(),
        "Key (domain)=(clinic.test) already exists."
    );

    let r = e
        .json(
            "POST",
            "/fhir/R4/DomainConfiguration",
            Some(&sa),
            &json!({"resourceType": "DomainConfiguration", "identityProvider": idp}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.operation_outcome_text(), "Missing required property");
    let mut partial = idp.clone();
    partial.as_object_mut().unwrap().remove("tokenUrl");
    let r = e
        .json(
            "POST",
            "/fhir/R4/DomainConfiguration",
            Some(&sa),
            &json!({"resourceType": "DomainConfiguration", "domain": "other.test", "identityProvider": partial}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["issue"][0]["expression"][0],
        "DomainConfiguration.identityProvider.tokenUrl"
    );

    let r = e
        .send(
            "GET",
            &format!("/fhir/R4/DomainConfiguration/{id}"),
            &[("authorization", &sa)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["identityProvider"]["clientId"], "cid");
    let r = e
        .send(
            "GET",
            &format!("/fhir/R4/DomainConfiguration/{id}"),
            &[("authorization", &e.admin)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, 403);

    // Updating it keeps the uniqueness check off its own row.
    let mut update = created.clone();
    update["identityProvider"]["clientId"] = json!("cid2");
    let r = e
        .json(
            "PUT",
            &format!("/fhir/R4/DomainConfiguration/{id}"),
            Some(&sa),
            &update,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = e
        .json(
            "POST",
            "/auth/method",
            None,
            &json!({"email": "a@clinic.test"}),
        )
        .await;
    assert!(
        r.json()["authorizeUrl"]
            .as_str()
            .unwrap()
            .contains("client_id=cid2&")
    );

    let r = e
        .send(
            "DELETE",
            &format!("/fhir/R4/DomainConfiguration/{id}"),
            &[("authorization", &sa)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = e
        .json(
            "POST",
            "/auth/method",
            None,
            &json!({"email": "a@clinic.test"}),
        )
        .await;
    assert_eq!(r.json(), json!({}));
}

// === case 57: /auth/external ===

#[tokio::test]
async fn case_57_auth_external_errors() {
    let e = env().await;
    let idp = FakeIdp::start().await;
    e.domain("clinic.test", fake_idp_config(&idp, "json")).await;
    e.seed_user("dora", Some("dora@clinic.test"), None, None)
        .await;
    let app_uri = "https://app.clinic.test/callback";
    let client = e
        .client(Some(fake_idp_config(&idp, "json")), &[app_uri])
        .await;
    let mut subject_idp = fake_idp_config(&idp, "json");
    subject_idp["useSubject"] = json!(true);
    let subject_client = e.client(Some(subject_idp), &[app_uri]).await;
    let good = FakeIdp::code_for(&json!({"sub": "dora-sub", "email": "Dora@Clinic.test"}));

    let expect = |r: Resp, text: &str| {
        assert_eq!(r.status, 400, "{text}: {}", r.text);
        assert_eq!(r.operation_outcome_text(), text);
    };
    expect(
        e.get(&external_uri(None, Some(&json!({"domain": "clinic.test"}))))
            .await,
        "Missing code",
    );
    expect(
        e.get(&external_uri(Some(""), Some(&json!({})))).await,
        "Missing code",
    );
    expect(
        e.get(&external_uri(Some(&good), None)).await,
        "Missing state",
    );
    expect(
        e.get(&external_uri(Some(&good), Some(&json!("{not json"))))
            .await,
        "Invalid state",
    );
    expect(
        e.get(&external_uri(
            Some(&good),
            Some(&json!({"domain": "unknown.test"})),
        ))
        .await,
        "Identity provider not found",
    );
    expect(
        e.get(&external_uri(Some(&good), Some(&json!({})))).await,
        "Identity provider not found",
    );
    // The IdP refuses the code.
    expect(
        e.get(&external_uri(
            Some("fail"),
            Some(&json!({"domain": "clinic.test"})),
        ))
        .await,
        "Failed to verify code - check your identity provider configuration",
    );
    let no_email = FakeIdp::code_for(&json!({"sub": "x"}));
    expect(
        e.get(&external_uri(
            Some(&no_email),
            Some(&json!({"domain": "clinic.test"})),
        ))
        .await,
        "External token does not contain email address",
    );
    let outside = FakeIdp::code_for(&json!({"email": "dora@elsewhere.test"}));
    expect(
        e.get(&external_uri(
            Some(&outside),
            Some(&json!({"domain": "clinic.test"})),
        ))
        .await,
        "Email address does not match domain",
    );
    expect(
        e.get(&external_uri(
            Some(&good),
            Some(&json!({"clientId": client, "projectId": "another-project"})),
        ))
        .await,
        "Invalid project",
    );
    let unknown = FakeIdp::code_for(&json!({"email": "nobody@clinic.test"}));
    expect(
        e.get(&external_uri(
            Some(&unknown),
            Some(&json!({"domain": "clinic.test"})),
        ))
        .await,
        "User not found",
    );
    expect(
        e.get(&external_uri(
            Some(&good),
            Some(&json!({"clientId": client, "redirectUri": "https://evil.test/callback"})),
        ))
        .await,
        "Invalid redirect URI",
    );
    expect(
        e.get(&external_uri(
            Some(&good),
            Some(
                &json!({"clientId": client, "redirectUri": "https://app.clinic.test/callbackevil"}),
            ),
        ))
        .await,
        "Invalid redirect URI",
    );
    let subjectless = FakeIdp::code_for(&json!({"email": "dora@clinic.test"}));
    expect(
        e.get(&external_uri(
            Some(&subjectless),
            Some(&json!({"clientId": subject_client})),
        ))
        .await,
        "External token does not contain subject",
    );
    // An unknown client id: 404.
    let r = e
        .get(&external_uri(
            Some(&good),
            Some(&json!({"clientId": "no-such-client"})),
        ))
        .await;
    assert_eq!(r.status, 404, "{}", r.text);

    // The code went to the IdP's token endpoint as the reference says: Basic client
    // authentication, fhirgate's callback as redirect_uri, no verifier without usePkce.
    let call = idp.calls().into_iter().last().unwrap();
    assert_eq!(
        call.authorization.as_deref(),
        Some(basic("fhirgate-at-idp", "idp-client-secret").as_str())
    );
    assert_eq!(call.form["grant_type"], "authorization_code");
    assert_eq!(call.form["redirect_uri"], "http://gw.test/auth/external");
    assert!(!call.form.contains_key("code_verifier"));
    assert!(!call.form.contains_key("client_secret"));
}

#[tokio::test]
async fn case_57_auth_external_success_redirects() {
    let e = env().await;
    let idp = FakeIdp::start().await;
    e.domain("clinic.test", fake_idp_config(&idp, "json")).await;
    let membership = e
        .seed_user("erin", Some("erin@clinic.test"), None, None)
        .await;
    let code = FakeIdp::code_for(&json!({"sub": "erin-sub", "email": "ERIN@clinic.test"}));
    let verifier = "erin-verifier-0123456789-0123456789-0123456789";

    // Domain flow: no client, so the sign-in front end continues from the login.
    let st = json!({
        "domain": "clinic.test",
        "codeChallenge": s256(verifier),
        "codeChallengeMethod": "S256",
        "nonce": "n-123",
    });
    let r = e.get(&external_uri(Some(&code), Some(&st))).await;
    assert_eq!(r.status, 302, "{}", r.text);
    let location = r.location();
    assert!(
        location.starts_with("http://gw.test/signin?login="),
        "{location}"
    );
    let q = query_of(&location);
    assert_eq!(q["scope"], "openid offline");
    assert_eq!(q["nonce"], "n-123");
    assert_eq!(q["code_challenge"], s256(verifier));
    assert_eq!(q["code_challenge_method"], "S256");
    let login = q["login"].clone();
    let stored = e.state.store.login(&login).await.unwrap().unwrap();
    assert_eq!(stored.auth_method, "external");
    assert_eq!(stored.membership_id.as_deref(), Some(membership.as_str()));
    assert_eq!(stored.user_ref, "User/erin");

    // GET /auth/login/:id gives the code, which PKCE-exchanges for tokens with a refresh token.
    let r = e.get(&format!("/auth/login/{login}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let fhirgate_code = r.json()["code"].as_str().unwrap().to_string();
    let t = e
        .form(
            "/oauth2/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &fhirgate_code),
                ("code_verifier", verifier),
            ],
        )
        .await;
    assert_eq!(t.status, 200, "{}", t.text);
    let tokens = t.json();
    assert_eq!(tokens["profile"]["reference"], "Practitioner/erin-profile");
    assert_eq!(tokens["scope"], "openid offline");
    assert!(tokens["refresh_token"].is_string());

    // With a launch, the front end's page is `oauth`.
    let r = e
        .get(&external_uri(
            Some(&code),
            Some(&json!({"domain": "clinic.test", "launch": "l-1"})),
        ))
        .await;
    assert_eq!(r.status, 302, "{}", r.text);
    assert!(r.location().starts_with("http://gw.test/oauth?login="));

    // Client flow with a registered redirect URI (prefix match on a path segment): straight
    // back to the app with login and code; a usePkce IdP gets the state's codeChallenge as the
    // verifier, and client_secret_post puts the IdP credentials in the form.
    let mut idp_conf = fake_idp_config(&idp, "json");
    idp_conf["usePkce"] = json!(true);
    idp_conf["tokenAuthMethod"] = json!("client_secret_post");
    let client = e
        .client(Some(idp_conf), &["https://app.clinic.test/cb"])
        .await;
    let st = json!({
        "clientId": client,
        "projectId": e.project(),
        "codeChallenge": s256(verifier),
        "codeChallengeMethod": "S256",
        "redirectUri": "https://app.clinic.test/cb/inner?keep=1&code=old",
        "scope": "openid profile",
    });
    let r = e.get(&external_uri(Some(&code), Some(&st))).await;
    assert_eq!(r.status, 302, "{}", r.text);
    let location = r.location();
    assert!(
        location.starts_with("https://app.clinic.test/cb/inner?keep=1&code="),
        "{location}"
    );
    let q = query_of(&location);
    let call = idp.calls().into_iter().last().unwrap();
    assert_eq!(call.authorization, None);
    assert_eq!(call.form["client_id"], "fhirgate-at-idp");
    assert_eq!(call.form["client_secret"], "idp-client-secret");
    assert_eq!(call.form["code_verifier"], s256(verifier));
    let t = e
        .form(
            "/oauth2/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &q["code"]),
                ("client_id", &client),
                ("code_verifier", verifier),
            ],
        )
        .await;
    assert_eq!(t.status, 200, "{}", t.text);
    let tokens = t.json();
    assert_eq!(tokens["scope"], "openid profile");
    assert!(
        tokens.get("refresh_token").is_none(),
        "no offline scope asked for"
    );
    let stored = e.state.store.login(&q["login"]).await.unwrap().unwrap();
    assert_eq!(stored.client_id.as_deref(), Some(client.as_str()));

    // A replayed code is refused (and revokes the Login).
    let t = e
        .form(
            "/oauth2/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &q["code"]),
                ("client_id", &client),
                ("code_verifier", verifier),
            ],
        )
        .await;
    assert_eq!(t.status, 400);
    assert_eq!(t.oauth_error().1, "Token already granted");
}

#[tokio::test]
async fn external_ids_resolve_through_the_clients_project() {
    let e = env().await;
    let idp = FakeIdp::start().await;
    e.seed_user("finn", None, Some(e.project()), Some("finn-external-id"))
        .await;
    let mut conf = fake_idp_config(&idp, "json");
    conf["useSubject"] = json!(true);
    let client = e.client(Some(conf), &["https://app.clinic.test/cb"]).await;
    let code = FakeIdp::code_for(&json!({"sub": "finn-external-id"}));
    let verifier = "finn-verifier-0123456789-0123456789-0123456789";
    let st = json!({
        "clientId": client,
        "codeChallenge": s256(verifier),
        "codeChallengeMethod": "S256",
        "redirectUri": "https://app.clinic.test/cb",
    });
    let r = e.get(&external_uri(Some(&code), Some(&st))).await;
    assert_eq!(r.status, 302, "{}", r.text);
    let q = query_of(&r.location());
    assert!(
        r.location()
            .starts_with("https://app.clinic.test/cb?login=")
    );
    let stored = e.state.store.login(&q["login"]).await.unwrap().unwrap();
    assert_eq!(stored.user_ref, "User/finn");

    let unknown = FakeIdp::code_for(&json!({"sub": "someone-else"}));
    let r = e.get(&external_uri(Some(&unknown), Some(&st))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.operation_outcome_text(), "User not found");
}

// === case 26: token exchange ===

async fn exchange(
    e: &Env,
    client: Option<&str>,
    token: Option<&str>,
    ty: Option<&str>,
    extra: &[(&str, &str)],
) -> Resp {
    let mut pairs = vec![("grant_type", EXCHANGE)];
    if let Some(c) = client {
        pairs.push(("client_id", c));
    }
    if let Some(t) = token {
        pairs.push(("subject_token", t));
    }
    if let Some(t) = ty {
        pairs.push(("subject_token_type", t));
    }
    pairs.extend_from_slice(extra);
    e.form("/oauth2/token", &pairs).await
}

#[tokio::test]
async fn case_26_token_exchange() {
    let e = env().await;
    let idp = FakeIdp::start().await;
    let membership = e
        .seed_user("gina", Some("gina@clinic.test"), None, None)
        .await;
    let claims = b64url(&json!({"sub": "gina-sub", "email": "Gina@Clinic.test"}));
    let json_client = e
        .client(Some(fake_idp_config(&idp, &format!("json/{claims}"))), &[])
        .await;
    let jwt_client = e
        .client(Some(fake_idp_config(&idp, &format!("jwt/{claims}"))), &[])
        .await;
    let text_client = e.client(Some(fake_idp_config(&idp, "text")), &[]).await;
    let busy_client = e.client(Some(fake_idp_config(&idp, "429")), &[]).await;
    let broken_client = e.client(Some(fake_idp_config(&idp, "500")), &[]).await;
    let garbled_client = e.client(Some(fake_idp_config(&idp, "notjson")), &[]).await;
    let mut file = fake_idp_config(&idp, "json");
    file["userInfoUrl"] = json!("file:///etc/passwd");
    let file_client = e.client(Some(file), &[]).await;
    let plain_client = e.client(None, &[]).await;
    let nobody = b64url(&json!({"email": "nobody@clinic.test"}));
    let nobody_client = e
        .client(Some(fake_idp_config(&idp, &format!("json/{nobody}"))), &[])
        .await;

    // JSON and application/jwt userinfo answers both sign in.
    for client in [&json_client, &jwt_client] {
        let r = exchange(
            &e,
            Some(client),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let t = r.json();
        assert_eq!(t["token_type"], "Bearer");
        assert_eq!(t["scope"], "openid offline");
        assert_eq!(t["profile"]["reference"], "Practitioner/gina-profile");
        assert_eq!(
            t["project"]["reference"],
            format!("Project/{}", e.project())
        );
        assert!(t["refresh_token"].is_string());
        assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
        // The access token's Login is an exchange Login of that membership.
        let payload = t["access_token"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap()
            .to_string();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["sub"], "gina");
        assert_eq!(claims["client_id"], client.as_str());
        let login = e
            .state
            .store
            .login(claims["login_id"].as_str().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(login.auth_method, "exchange");
        assert_eq!(login.membership_id.as_deref(), Some(membership.as_str()));
        // Its refresh token rotates like any other.
        let rt = t["refresh_token"].as_str().unwrap();
        let r = e
            .form(
                "/oauth2/token",
                &[("grant_type", "refresh_token"), ("refresh_token", rt)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // A scope and a nonce of the request are kept.
    let r = exchange(
        &e,
        Some(&json_client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[("scope", "openid email"), ("nonce", "exchange-nonce")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let t = r.json();
    assert_eq!(t["scope"], "openid email");
    assert!(t.get("refresh_token").is_none());
    let id_payload = t["id_token"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let id: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(id_payload).unwrap()).unwrap();
    assert_eq!(id["nonce"], "exchange-nonce");
    assert_eq!(id["email"], "gina@clinic.test");

    let expect = |r: Resp, status: u16, text: &str| {
        assert_eq!(r.status.as_u16(), status, "{text}: {}", r.text);
        assert_eq!(
            r.oauth_error(),
            ("invalid_request".to_string(), text.to_string())
        );
    };
    // A client that cannot be authenticated: `invalid_client`, 401 (RFC 6749 §5.2).
    let expect_client = |r: Resp, status: u16, text: &str| {
        assert_eq!(r.status.as_u16(), status, "{text}: {}", r.text);
        assert_eq!(
            r.oauth_error(),
            ("invalid_client".to_string(), text.to_string())
        );
    };
    expect(
        exchange(
            &e,
            Some(&text_client),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await,
        400,
        "Failed to verify code - unsupported content type: text/plain",
    );
    expect(
        exchange(
            &e,
            Some(&busy_client),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await,
        429,
        "Too Many Requests",
    );
    expect(
        exchange(
            &e,
            Some(&file_client),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await,
        400,
        "Invalid user info URL - check your identity provider configuration",
    );
    for client in [&broken_client, &garbled_client] {
        expect(
            exchange(
                &e,
                Some(client),
                Some(GOOD_TOKEN),
                Some(ACCESS_TOKEN_TYPE),
                &[],
            )
            .await,
            400,
            "Failed to verify code - check your identity provider configuration",
        );
    }
    // A token the IdP does not know.
    expect(
        exchange(
            &e,
            Some(&json_client),
            Some("forged"),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await,
        400,
        "Failed to verify code - check your identity provider configuration",
    );
    expect_client(
        exchange(&e, None, Some(GOOD_TOKEN), Some(ACCESS_TOKEN_TYPE), &[]).await,
        401,
        "Invalid client",
    );
    expect_client(
        exchange(
            &e,
            Some(&plain_client),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await,
        401,
        "Invalid client",
    );
    expect_client(
        exchange(
            &e,
            Some("no-such-client"),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[],
        )
        .await,
        401,
        "Invalid client",
    );
    expect(
        exchange(&e, Some(&json_client), None, Some(ACCESS_TOKEN_TYPE), &[]).await,
        400,
        "Invalid subject_token",
    );
    expect(
        exchange(&e, Some(&json_client), Some(GOOD_TOKEN), None, &[]).await,
        400,
        "Invalid subject_token_type",
    );
    expect(
        exchange(
            &e,
            Some(&json_client),
            Some(GOOD_TOKEN),
            Some("urn:ietf:params:oauth:token-type:id_token"),
            &[],
        )
        .await,
        400,
        "Invalid subject_token_type",
    );
    // A secret, when presented, must be right.
    expect_client(
        exchange(
            &e,
            Some(&json_client),
            Some(GOOD_TOKEN),
            Some(ACCESS_TOKEN_TYPE),
            &[("client_secret", "wrong")],
        )
        .await,
        401,
        "Invalid secret",
    );
    // membership_id narrows the candidates: another one is "User not found".
    let r = exchange(
        &e,
        Some(&json_client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[("membership_id", "not-a-membership-of-hers")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.operation_outcome_text(), "User not found");
    let r = exchange(
        &e,
        Some(&json_client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[("membership_id", &membership)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // An unknown user is an OperationOutcome, not an OAuth error: at /oauth2/token and at the
    // legacy /auth/exchange.
    let r = exchange(
        &e,
        Some(&nobody_client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.operation_outcome_text(), "User not found");
    let r = e
        .json(
            "POST",
            "/auth/exchange",
            None,
            &json!({"externalAccessToken": GOOD_TOKEN, "clientId": nobody_client}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.operation_outcome_text(), "User not found");

    // The legacy endpoint: its own validation, then the same exchange.
    let r = e
        .json(
            "POST",
            "/auth/exchange",
            None,
            &json!({"clientId": json_client}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.operation_outcome_text(), "Missing externalAccessToken");
    let r = e
        .json(
            "POST",
            "/auth/exchange",
            None,
            &json!({"externalAccessToken": GOOD_TOKEN}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.operation_outcome_text(), "Missing clientId");
    let r = e
        .json(
            "POST",
            "/auth/exchange",
            None,
            &json!({"externalAccessToken": GOOD_TOKEN, "clientId": json_client}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["access_token"].is_string());
    let r = e
        .json(
            "POST",
            "/auth/exchange",
            None,
            &json!({"externalAccessToken": GOOD_TOKEN, "clientId": text_client}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.oauth_error().1,
        "Failed to verify code - unsupported content type: text/plain"
    );
}

#[tokio::test]
async fn token_exchange_by_subject_and_an_inactive_membership() {
    let e = env().await;
    let idp = FakeIdp::start().await;
    let membership = e
        .seed_user("hank", None, Some(e.project()), Some("hank-external"))
        .await;
    let claims = b64url(&json!({"sub": "hank-external"}));
    let mut conf = fake_idp_config(&idp, &format!("json/{claims}"));
    conf["useSubject"] = json!(true);
    let client = e.client(Some(conf), &[]).await;
    let r = exchange(
        &e,
        Some(&client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json()["profile"]["reference"],
        "Practitioner/hank-profile"
    );

    // A deactivated membership cannot be signed in to.
    let stored = e
        .state
        .store
        .read("ProjectMembership", &membership)
        .await
        .unwrap()
        .unwrap();
    let mut m = stored.content.clone();
    m["active"] = json!(false);
    let rows = index_rows(&m);
    e.state
        .store
        .put(m, Some(e.project()), &rows, Some(&stored.version_id), false)
        .await
        .unwrap();
    e.state.refresh().await.unwrap();
    let r = exchange(
        &e,
        Some(&client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.operation_outcome_text(), "Profile not active");
}

// =============================================================================================
// End to end with a real OpenID provider
// =============================================================================================

/// `tests/idp/server.mjs`: oidc-provider on a free port. Dropping it ends the process.
struct RealIdp {
    /// `http://127.0.0.1:PORT` (the issuer, no trailing slash).
    base: String,
    child: Child,
}

impl Drop for RealIdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RealIdp {
    fn start(config: &Value) -> RealIdp {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("idp");
        if !dir
            .join("node_modules/oidc-provider/package.json")
            .is_file()
        {
            panic!(
                "{} is missing: the test IdP is not installed. Run `scripts/setup` (it runs \
                 `npm ci` in tests/idp) or `scripts/test`.",
                dir.join("node_modules").display()
            );
        }
        let node = std::env::var("FHIRGATE_TEST_NODE").unwrap_or_else(|_| "node".to_string());
        let mut child = Command::new(&node)
            .args([
                "server.mjs",
                "--port",
                "0",
                "--exit-on-stdin-close",
                "--config",
            ])
            .arg(config.to_string())
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{node} server.mjs` in {}: {e}", dir.display()));
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[test-idp] {line}");
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(port.trim().parse::<u16>().unwrap());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!("the test IdP did not print `LISTENING <port>` within 30 s")
            });
        RealIdp {
            base: format!("http://127.0.0.1:{port}"),
            child,
        }
    }
}

/// A browser without JavaScript: follows redirects by hand, keeping the IdP's cookies.
struct Browser {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            cookies: HashMap::new(),
        }
    }

    fn remember(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all(header::SET_COOKIE) {
            let pair = v.to_str().unwrap().split(';').next().unwrap();
            if let Some((k, v)) = pair.split_once('=') {
                if v.is_empty() {
                    self.cookies.remove(k.trim());
                } else {
                    self.cookies.insert(k.trim().to_string(), v.to_string());
                }
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let resp = self
            .http
            .get(url)
            .header(header::COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap();
        self.remember(&resp);
        resp
    }

    async fn post_form(&mut self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let resp = self
            .http
            .post(url)
            .header(header::COOKIE, self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.remember(&resp);
        resp
    }

    /// Signs in at the IdP's authorize URL with the form, and follows the redirects until one
    /// leaves the IdP; returns that URL (the relying party's callback).
    async fn sign_in_at_idp(
        &mut self,
        idp: &RealIdp,
        authorize: &str,
        login: &str,
        password: &str,
    ) -> String {
        let mut url = authorize.to_string();
        let mut signed_in = false;
        for _ in 0..12 {
            if !url.starts_with(&idp.base) {
                return url;
            }
            let resp = self.get(&url).await;
            let status = resp.status();
            if status.is_redirection() {
                let next = resp.headers()[header::LOCATION]
                    .to_str()
                    .unwrap()
                    .to_string();
                url = url::Url::parse(&url)
                    .unwrap()
                    .join(&next)
                    .unwrap()
                    .to_string();
                continue;
            }
            let page = resp.text().await.unwrap();
            assert_eq!(status, 200, "{url}: {page}");
            assert!(!signed_in, "the IdP asked to sign in twice: {page}");
            // The sign-in form: post it like a browser.
            let action = page
                .split("action=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or_else(|| panic!("no form on {url}: {page}"))
                .to_string();
            let target = url::Url::parse(&url)
                .unwrap()
                .join(&action)
                .unwrap()
                .to_string();
            let resp = self
                .post_form(&target, &[("login", login), ("password", password)])
                .await;
            assert_eq!(resp.status(), 303, "sign-in refused at the IdP");
            let next = resp.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_string();
            url = url::Url::parse(&target)
                .unwrap()
                .join(&next)
                .unwrap()
                .to_string();
            signed_in = true;
        }
        panic!("too many redirects at the IdP, last {url}");
    }
}

/// A super admin's token: a client of the super admin project, by client credentials.
async fn e2e_super_admin(gw: &TestGateway) -> String {
    let project = people::super_admin_project(gw);
    let (id, secret) = people::seed_client(gw, Some(&project), json!({}), None);
    gw.token(&id, &secret, None).await
}

async fn post_json(url: &str, bearer: &str, body: &Value) -> Value {
    let resp = TestGateway::client()
        .post(url)
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "POST {url}: {v}");
    v
}

/// `/auth/me` and a FHIR read of the profile through the gateway with `token`.
async fn token_works_at_gateway(gw: &TestGateway, token: &str, profile: &str) {
    let c = TestGateway::client();
    let me = c
        .get(format!("{}auth/me", gw.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["membership"]["profile"]["reference"], profile, "{me}");
    let read = c
        .get(format!("{}{profile}", gw.fhir))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = read.status();
    let body: Value = read.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        format!("Practitioner/{}", body["id"].as_str().unwrap()),
        profile
    );
}

#[test]
fn real_openid_provider_signs_users_in_and_exchanges_tokens() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let callback = format!("{}auth/external", gw.base);
    let idp = RealIdp::start(&json!({
        "clients": [
            {"client_id": "fhirgate-client-idp", "client_secret": "client-idp-secret-0123456789",
             "redirect_uris": [callback], "token_endpoint_auth_method": "client_secret_post"},
            {"client_id": "fhirgate-domain-idp", "client_secret": "domain-idp-secret-0123456789",
             "redirect_uris": [callback]},
            {"client_id": "some-app", "client_secret": "some-app-secret-0123456789",
             "redirect_uris": ["http://127.0.0.1:9/app"]},
        ],
        "accounts": [
            {"sub": "iris-at-idp", "email": "Iris@Hospital.test", "password": "iris-idp-password"},
        ],
    }));
    let profile = "Practitioner/iris-practitioner";
    let created = upstream.fhir(
        "PUT",
        profile,
        Some(&json!({"resourceType": "Practitioner", "id": "iris-practitioner", "name": [{"family": "Iris"}]})),
    );
    assert!(
        created.status == 200 || created.status == 201,
        "{}",
        created.text()
    );

    rt().block_on(async {
        let c = TestGateway::client();
        let sa = e2e_super_admin(&gw).await;
        let project = gw.running().bootstrap.default_project_id.clone();

        // Iris: a server-scoped user with a Practitioner membership in the default project.
        let user = post_json(
            &format!("{}User", gw.fhir),
            &sa,
            &json!({"resourceType": "User", "firstName": "Iris", "lastName": "Idp", "email": "iris@hospital.test"}),
        )
        .await;
        assert!(user.get("project").is_none(), "{user}");
        post_json(
            &format!("{}ProjectMembership", gw.fhir),
            &sa,
            &json!({
                "resourceType": "ProjectMembership",
                "project": {"reference": format!("Project/{project}")},
                "user": {"reference": format!("User/{}", user["id"].as_str().unwrap())},
                "profile": {"reference": profile},
            }),
        )
        .await;

        // --- Client flow: the app's ClientApplication names the IdP (client_secret_post, PKCE).
        let admin = gw.admin_token().await;
        let app_callback = "http://127.0.0.1:9/app/callback";
        let client: Value = c
            .post(format!("{}admin/projects/{project}/client", gw.base))
            .bearer_auth(&admin)
            .json(&json!({
                "name": "IdP app",
                "redirectUris": [app_callback],
                "identityProvider": {
                    "authorizeUrl": format!("{}/auth", idp.base),
                    "tokenUrl": format!("{}/token", idp.base),
                    "tokenAuthMethod": "client_secret_post",
                    "userInfoUrl": format!("{}/me", idp.base),
                    "clientId": "fhirgate-client-idp",
                    "clientSecret": "client-idp-secret-0123456789",
                    "usePkce": true,
                },
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let client_id = client["id"].as_str().unwrap_or_else(|| panic!("{client}")).to_string();

        let verifier = "iris-app-verifier-0123456789-0123456789-0123456789";
        let challenge = s256(verifier);
        let st = json!({
            "clientId": client_id,
            "codeChallenge": challenge,
            "codeChallengeMethod": "S256",
            "redirectUri": app_callback,
            "nonce": "iris-nonce",
        });
        // fhirgate sends the state's codeChallenge to the IdP as the PKCE verifier.
        let authorize = format!(
            "{}/auth?client_id=fhirgate-client-idp&redirect_uri={}&response_type=code&scope={}&state={}&code_challenge={}&code_challenge_method=S256",
            idp.base,
            enc(&callback),
            enc("openid profile email"),
            enc(&st.to_string()),
            s256(&challenge),
        );
        let mut browser = Browser::new();
        let back = browser
            .sign_in_at_idp(&idp, &authorize, "Iris@Hospital.test", "iris-idp-password")
            .await;
        assert!(back.starts_with(&callback), "{back}");
        let resp = browser.get(&back).await;
        assert_eq!(resp.status(), 302, "{}", resp.text().await.unwrap());
        let location = resp.headers()[header::LOCATION].to_str().unwrap().to_string();
        assert!(location.starts_with(&format!("{app_callback}?login=")), "{location}");
        let q = query_of(&location);
        let tokens: Value = c
            .post(format!("{}oauth2/token", gw.base))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", q["code"].as_str()),
                ("client_id", &client_id),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let access = tokens["access_token"].as_str().unwrap_or_else(|| panic!("{tokens}"));
        assert_eq!(tokens["profile"]["reference"], profile);
        assert!(tokens["refresh_token"].is_string(), "default scope is openid offline");
        token_works_at_gateway(&gw, access, profile).await;

        // A wrong password at the IdP never reaches fhirgate.
        let mut stranger = Browser::new();
        let first = stranger.get(&authorize).await;
        let interaction = url::Url::parse(&idp.base)
            .unwrap()
            .join(first.headers()[header::LOCATION].to_str().unwrap())
            .unwrap();
        stranger.get(interaction.as_str()).await;
        let refused = stranger
            .post_form(
                &format!("{interaction}/login"),
                &[("login", "Iris@Hospital.test"), ("password", "guess")],
            )
            .await;
        assert_eq!(refused.status(), 401);

        // --- Token exchange: an access token another app got from the IdP for Iris.
        let app_auth = format!(
            "{}/auth?client_id=some-app&redirect_uri={}&response_type=code&scope={}",
            idp.base,
            enc("http://127.0.0.1:9/app"),
            enc("openid email"),
        );
        let mut app = Browser::new();
        let back = app
            .sign_in_at_idp(&idp, &app_auth, "Iris@Hospital.test", "iris-idp-password")
            .await;
        let idp_code = query_of(&back)["code"].clone();
        let idp_tokens: Value = c
            .post(format!("{}/token", idp.base))
            .basic_auth("some-app", Some("some-app-secret-0123456789"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &idp_code),
                ("redirect_uri", "http://127.0.0.1:9/app"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let idp_access = idp_tokens["access_token"].as_str().unwrap_or_else(|| panic!("{idp_tokens}"));
        let resp = c
            .post(format!("{}oauth2/token", gw.base))
            .form(&[
                ("grant_type", EXCHANGE),
                ("client_id", &client_id),
                ("subject_token", idp_access),
                ("subject_token_type", ACCESS_TOKEN_TYPE),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let exchanged: Value = resp.json().await.unwrap();
        assert_eq!(exchanged["profile"]["reference"], profile);
        token_works_at_gateway(&gw, exchanged["access_token"].as_str().unwrap(), profile).await;
        // A token the IdP never issued.
        let resp = c
            .post(format!("{}oauth2/token", gw.base))
            .form(&[
                ("grant_type", EXCHANGE),
                ("client_id", &client_id),
                ("subject_token", "not-an-idp-token"),
                ("subject_token_type", ACCESS_TOKEN_TYPE),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(
            err["error_description"],
            "Failed to verify code - check your identity provider configuration"
        );

        // --- Domain flow: a super admin configures hospital.test; /auth/method points there.
        let domain = post_json(
            &format!("{}DomainConfiguration", gw.fhir),
            &sa,
            &json!({
                "resourceType": "DomainConfiguration",
                "domain": "Hospital.test",
                "identityProvider": {
                    "authorizeUrl": format!("{}/auth", idp.base),
                    "tokenUrl": format!("{}/token", idp.base),
                    "userInfoUrl": format!("{}/me", idp.base),
                    "clientId": "fhirgate-domain-idp",
                    "clientSecret": "domain-idp-secret-0123456789",
                },
            }),
        )
        .await;
        assert_eq!(domain["domain"], "hospital.test");
        let method: Value = c
            .post(format!("{}auth/method", gw.base))
            .json(&json!({"email": "IRIS@hospital.test"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(method["domain"], "hospital.test");
        let authorize_url = method["authorizeUrl"].as_str().unwrap_or_else(|| panic!("{method}"));
        let verifier = "iris-domain-verifier-0123456789-0123456789-012345";
        let st = json!({
            "domain": "hospital.test",
            "codeChallenge": s256(verifier),
            "codeChallengeMethod": "S256",
        });
        let mut u = url::Url::parse(authorize_url).unwrap();
        u.query_pairs_mut().append_pair("state", &st.to_string());
        let mut browser = Browser::new();
        let back = browser
            .sign_in_at_idp(&idp, u.as_str(), "Iris@Hospital.test", "iris-idp-password")
            .await;
        assert!(back.starts_with(&callback), "{back}");
        let resp = browser.get(&back).await;
        assert_eq!(resp.status(), 302, "{}", resp.text().await.unwrap());
        let location = resp.headers()[header::LOCATION].to_str().unwrap().to_string();
        assert!(location.starts_with(&format!("{}signin?login=", gw.base)), "{location}");
        let login_id = query_of(&location)["login"].clone();
        // The sign-in front end resumes the login and gets the code.
        let status: Value = c
            .get(format!("{}auth/login/{login_id}", gw.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let code = status["code"].as_str().unwrap_or_else(|| panic!("{status}"));
        let tokens: Value = c
            .post(format!("{}oauth2/token", gw.base))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let access = tokens["access_token"].as_str().unwrap_or_else(|| panic!("{tokens}"));
        token_works_at_gateway(&gw, access, profile).await;

        // The admin client (a project admin, not a super admin) may not read the configuration.
        let r = c
            .get(format!("{}DomainConfiguration/{}", gw.fhir, domain["id"].as_str().unwrap()))
            .header(header::AUTHORIZATION, basic(ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    });
    drop(idp);
}

#[tokio::test]
async fn a_membership_that_requires_mfa_is_never_skipped() {
    let e = env().await;
    let idp = FakeIdp::start().await;
    let membership = e
        .seed_user("ivy", Some("ivy@clinic.test"), None, None)
        .await;
    let stored = e
        .state
        .store
        .read("ProjectMembership", &membership)
        .await
        .unwrap()
        .unwrap();
    let mut m = stored.content.clone();
    m["mfaRequired"] = json!(true);
    let rows = index_rows(&m);
    e.state
        .store
        .put(m, Some(e.project()), &rows, Some(&stored.version_id), false)
        .await
        .unwrap();
    e.state.refresh().await.unwrap();

    // The callback does not hand a code to the app: the front end must enrol MFA first.
    let client = e
        .client(
            Some(fake_idp_config(&idp, "json")),
            &["https://app.clinic.test/cb"],
        )
        .await;
    let verifier = "ivy-verifier-0123456789-0123456789-0123456789";
    let code = FakeIdp::code_for(&json!({"email": "ivy@clinic.test"}));
    let st = json!({
        "clientId": client,
        "codeChallenge": s256(verifier),
        "codeChallengeMethod": "S256",
        "redirectUri": "https://app.clinic.test/cb",
    });
    let r = e.get(&external_uri(Some(&code), Some(&st))).await;
    assert_eq!(r.status, 302, "{}", r.text);
    let location = r.location();
    assert!(
        location.starts_with("http://gw.test/signin?login="),
        "{location}"
    );
    let login = query_of(&location)["login"].clone();
    let r = e.get(&format!("/auth/login/{login}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let status = r.json();
    assert_eq!(status["login"], login.as_str());
    assert_eq!(status["mfaEnrollRequired"], true);
    assert!(status.get("code").is_none(), "{status}");

    // A token exchange has no MFA step: refused.
    let claims = b64url(&json!({"email": "ivy@clinic.test"}));
    let exchange_client = e
        .client(Some(fake_idp_config(&idp, &format!("json/{claims}"))), &[])
        .await;
    let r = exchange(
        &e,
        Some(&exchange_client),
        Some(GOOD_TOKEN),
        Some(ACCESS_TOKEN_TYPE),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.operation_outcome_text(), "MFA verification required");
}
