//! People for tests, until invitations exist everywhere: users with a password and a membership
//! whose profile (Practitioner, Patient, RelatedPerson) is created in the real upstream, clients
//! with the settings sign-in tests need, and [`sign_in`], the PKCE sign-in over HTTP
//! (`/auth/login`, then `/oauth2/token`).
//!
//! Seeding writes straight to the running gateway's store, on the gateway's own runtime (the
//! store's connections belong to it), then refreshes its snapshot. The functions are plain
//! blocking calls, usable from inside or outside a test's runtime.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhirgate::control::bootstrap::hash_password;
use fhirgate::control::index::index_rows;
use fhirgate::state::State;
use serde_json::{Value, json};
use sha2::Digest;

use super::gateway::TestGateway;
use super::http::send;

/// Runs `f(state)` to completion on the gateway's runtime, from a thread of its own (so it
/// works whether or not the caller is inside a runtime).
pub fn on_gateway<T, F, Fut>(gw: &TestGateway, f: F) -> T
where
    T: Send,
    F: FnOnce(Arc<State>) -> Fut + Send,
    Fut: Future<Output = T>,
{
    let running = gw.running();
    let state = running.state.clone();
    std::thread::scope(|s| {
        s.spawn(move || running.block_on(f(state)).expect("the gateway runtime"))
            .join()
            .expect("seeding thread")
    })
}

/// The default project (where the admin client lives).
pub fn default_project(gw: &TestGateway) -> String {
    gw.running().bootstrap.default_project_id.clone()
}

/// The super-admin project.
pub fn super_admin_project(gw: &TestGateway) -> String {
    gw.running().bootstrap.super_admin_project_id.clone()
}

/// An e-mail address no other test uses: `<tag>-<12 random hex digits>@example.com`.
pub fn unique_email(tag: &str) -> String {
    format!(
        "{tag}-{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// What [`seed`] creates.
#[derive(Debug, Clone)]
pub struct UserSeed {
    pub email: String,
    pub password: String,
    /// `None`: the default project.
    pub project: Option<String>,
    /// `Practitioner`, `Patient` or `RelatedPerson`.
    pub profile_type: String,
    pub first_name: String,
    pub last_name: String,
    /// A project-scoped user (`User.project`), as invite makes for patients.
    pub project_scoped: bool,
    pub admin: bool,
    /// `AccessPolicy/<id>` of the membership.
    pub access_policy: Option<String>,
    /// `false` gives the membership `active: false`.
    pub active: bool,
    /// `User.mfaRequired` (enrolment forced at sign-in).
    pub mfa_required: bool,
    /// `User.mfaEnrolled` with this TOTP secret (base32).
    pub mfa_secret: Option<String>,
    /// No membership at all.
    pub no_membership: bool,
}

impl UserSeed {
    pub fn new(email: &str, password: &str) -> UserSeed {
        UserSeed {
            email: email.to_string(),
            password: password.to_string(),
            project: None,
            profile_type: "Practitioner".into(),
            first_name: "Test".into(),
            last_name: "User".into(),
            project_scoped: false,
            admin: false,
            access_policy: None,
            active: true,
            mfa_required: false,
            mfa_secret: None,
            no_membership: false,
        }
    }
}

/// What [`seed`] made.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub user_id: String,
    /// Empty when `no_membership`.
    pub membership_id: String,
    /// `Practitioner/<id>`, … (empty when `no_membership`).
    pub profile: String,
    pub project_id: String,
}

/// A user with password `password` and one membership in `project` (default project when
/// `None`) whose `profile_type` profile exists in the upstream; returns (user id, membership id).
pub fn seed_user(
    gw: &TestGateway,
    email: &str,
    password: &str,
    project: Option<&str>,
    profile_type: &str,
) -> (String, String) {
    let mut s = UserSeed::new(email, password);
    s.project = project.map(str::to_string);
    s.profile_type = profile_type.to_string();
    let seeded = seed(gw, &s);
    (seeded.user_id, seeded.membership_id)
}

/// Creates a profile resource in the upstream FHIR server; returns its id.
async fn create_upstream_profile(
    state: &State,
    resource_type: &str,
    first: &str,
    last: &str,
    email: &str,
) -> String {
    let url = format!("{}/{resource_type}", state.config.upstream.base_url);
    let body = json!({
        "resourceType": resource_type,
        "name": [{"given": [first], "family": last}],
        "telecom": [{"system": "email", "value": email}],
    });
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .expect("create the profile upstream");
    let status = resp.status();
    let created: Value = resp.json().await.expect("profile JSON");
    assert_eq!(status, 201, "upstream refused the profile: {created}");
    created["id"].as_str().expect("profile id").to_string()
}

/// Creates the user (and membership) of `s`.
pub fn seed(gw: &TestGateway, s: &UserSeed) -> Seeded {
    let project = s.project.clone().unwrap_or_else(|| default_project(gw));
    let s = s.clone();
    on_gateway(gw, move |state| async move {
        let user_id = uuid::Uuid::new_v4().to_string();
        let mut user = json!({
            "resourceType": "User",
            "id": user_id,
            "firstName": s.first_name,
            "lastName": s.last_name,
            "email": s.email.to_lowercase(),
            "passwordHash": hash_password(&s.password).expect("hash"),
        });
        if s.project_scoped {
            user["project"] = json!({"reference": format!("Project/{project}")});
        }
        if s.mfa_required {
            user["mfaRequired"] = Value::Bool(true);
        }
        if let Some(secret) = &s.mfa_secret {
            user["mfaSecret"] = Value::String(secret.clone());
            user["mfaEnrolled"] = Value::Bool(true);
        }
        state
            .store
            .put(
                user.clone(),
                s.project_scoped.then_some(project.as_str()),
                &index_rows(&user),
                None,
                true,
            )
            .await
            .expect("store the user");
        let (membership_id, profile) = if s.no_membership {
            (String::new(), String::new())
        } else {
            add_membership_inner(&state, &user_id, &project, &s).await
        };
        state.refresh().await.expect("refresh");
        Seeded {
            user_id,
            membership_id,
            profile,
            project_id: project,
        }
    })
}

async fn add_membership_inner(
    state: &State,
    user_id: &str,
    project: &str,
    s: &UserSeed,
) -> (String, String) {
    let profile_id = create_upstream_profile(
        state,
        &s.profile_type,
        &s.first_name,
        &s.last_name,
        &s.email,
    )
    .await;
    let profile = format!("{}/{profile_id}", s.profile_type);
    let membership_id = uuid::Uuid::new_v4().to_string();
    let mut m = json!({
        "resourceType": "ProjectMembership",
        "id": membership_id,
        "project": {"reference": format!("Project/{project}")},
        "user": {"reference": format!("User/{user_id}"), "display": s.email},
        "profile": {"reference": profile, "display": format!("{} {}", s.first_name, s.last_name)},
    });
    if s.admin {
        m["admin"] = Value::Bool(true);
    }
    if let Some(p) = &s.access_policy {
        m["accessPolicy"] = json!({"reference": p});
    }
    if !s.active {
        m["active"] = Value::Bool(false);
    }
    state
        .store
        .put(m.clone(), Some(project), &index_rows(&m), None, true)
        .await
        .expect("store the membership");
    (membership_id, profile)
}

/// Another membership for an existing user; returns (membership id, profile reference).
pub fn add_membership(gw: &TestGateway, user_id: &str, s: &UserSeed) -> (String, String) {
    let project = s.project.clone().unwrap_or_else(|| default_project(gw));
    let s = s.clone();
    let user_id = user_id.to_string();
    on_gateway(gw, move |state| async move {
        let out = add_membership_inner(&state, &user_id, &project, &s).await;
        state.refresh().await.expect("refresh");
        out
    })
}

/// A ClientApplication in `project` (default project when `None`) with `fields` merged in
/// (`redirectUris`, `pkceOptional`, `jwksUri`, `allowedOrigin`, `accessTokenLifetime`, …), its
/// secret and its membership (`accessPolicy` when given); returns (id, secret).
pub fn seed_client(
    gw: &TestGateway,
    project: Option<&str>,
    fields: Value,
    access_policy: Option<&str>,
) -> (String, String) {
    let membership = match access_policy {
        Some(p) => json!({"accessPolicy": {"reference": p}}),
        None => json!({}),
    };
    seed_client_with(gw, project, fields, membership)
}

/// A ClientApplication with an admin membership in the super admin project (nothing on the wire
/// creates one); returns its client-credentials access token.
pub async fn super_admin_token(gw: &TestGateway) -> String {
    let project = super_admin_project(gw);
    let (id, secret) = seed_client_with(gw, Some(&project), json!({}), json!({"admin": true}));
    gw.token(&id, &secret, None).await
}

/// A ClientApplication with an admin membership in `project`; returns (id, secret).
pub fn seed_admin_client(gw: &TestGateway, project: &str) -> (String, String) {
    seed_client_with(gw, Some(project), json!({}), json!({"admin": true}))
}

/// [`seed_client`] with `membership` merged into the client's membership.
fn seed_client_with(
    gw: &TestGateway,
    project: Option<&str>,
    fields: Value,
    membership: Value,
) -> (String, String) {
    let project = project
        .map(str::to_string)
        .unwrap_or_else(|| default_project(gw));
    on_gateway(gw, move |state| async move {
        let id = uuid::Uuid::new_v4().to_string();
        let secret = fhirgate::tokens::random_hex(32);
        let mut client = json!({"resourceType": "ClientApplication", "id": id, "name": "test app", "status": "active"});
        merge(&mut client, fields);
        state
            .store
            .put(
                client.clone(),
                Some(&project),
                &index_rows(&client),
                None,
                true,
            )
            .await
            .expect("store the client");
        state
            .store
            .set_client_secret(&id, Some(&state.hash_secret(&secret)), None)
            .await
            .expect("store the secret");
        let client_ref = format!("ClientApplication/{id}");
        let mut m = json!({
            "resourceType": "ProjectMembership",
            "id": uuid::Uuid::new_v4().to_string(),
            "project": {"reference": format!("Project/{project}")},
            "user": {"reference": client_ref},
            "profile": {"reference": client_ref},
        });
        merge(&mut m, membership);
        state
            .store
            .put(m.clone(), Some(&project), &index_rows(&m), None, true)
            .await
            .expect("store the client membership");
        state.refresh().await.expect("refresh");
        (id, secret)
    })
}

/// `extra`'s fields set on `target` (both JSON objects).
fn merge(target: &mut Value, extra: Value) {
    if let (Some(obj), Value::Object(extra)) = (target.as_object_mut(), extra) {
        obj.extend(extra);
    }
}

/// A project (not super admin) with `fields` merged in; returns its id.
pub fn seed_project(gw: &TestGateway, fields: Value) -> String {
    on_gateway(gw, move |state| async move {
        let id = uuid::Uuid::new_v4().to_string();
        let mut p = json!({"resourceType": "Project", "id": id, "name": "test project"});
        merge(&mut p, fields);
        state
            .store
            .put(p.clone(), Some(&id), &index_rows(&p), None, true)
            .await
            .expect("store the project");
        state.refresh().await.expect("refresh");
        id
    })
}

/// An AccessPolicy in `project` (default project when `None`); returns `AccessPolicy/<id>`.
pub fn seed_policy(gw: &TestGateway, project: Option<&str>, policy: Value) -> String {
    let project = project
        .map(str::to_string)
        .unwrap_or_else(|| default_project(gw));
    on_gateway(gw, move |state| async move {
        let id = uuid::Uuid::new_v4().to_string();
        let mut p = policy;
        p["resourceType"] = json!("AccessPolicy");
        p["id"] = json!(id);
        state
            .store
            .put(p.clone(), Some(&project), &index_rows(&p), None, true)
            .await
            .expect("store the policy");
        state.refresh().await.expect("refresh");
        format!("AccessPolicy/{id}")
    })
}

/// A PKCE pair `(verifier, S256 challenge)`.
pub fn pkce_pair() -> (String, String) {
    let verifier = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// A browser's authorization request of `client` at the sign-in page, with a fresh PKCE pair,
/// `state` `<tag>-state` and `nonce` `<tag>-nonce`; returns (URL, verifier).
pub fn authorize_url(
    gw: &TestGateway,
    client: &str,
    redirect_uri: &str,
    scope: &str,
    tag: &str,
) -> (String, String) {
    let (verifier, challenge) = pkce_pair();
    let mut url = url::Url::parse(&format!("{}oauth2/authorize", gw.base)).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", scope)
        .append_pair("state", &format!("{tag}-state"))
        .append_pair("nonce", &format!("{tag}-nonce"))
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    (url.to_string(), verifier)
}

/// A successful token response.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub id_token: String,
    pub body: Value,
}

impl TokenResponse {
    pub fn from_body(body: Value) -> TokenResponse {
        TokenResponse {
            access_token: body["access_token"]
                .as_str()
                .unwrap_or_else(|| panic!("no access_token in {body}"))
                .to_string(),
            refresh_token: body["refresh_token"].as_str().map(str::to_string),
            id_token: body["id_token"]
                .as_str()
                .unwrap_or_else(|| panic!("no id_token in {body}"))
                .to_string(),
            body,
        }
    }
}

/// The claims of a JWT, unverified (tests read what fhirgate signed).
pub fn jwt_claims(token: &str) -> Value {
    jwt_part(token, 1)
}

/// The header of a JWT, unverified.
pub fn jwt_header(token: &str) -> Value {
    jwt_part(token, 0)
}

fn jwt_part(token: &str, n: usize) -> Value {
    let part = token.split('.').nth(n).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

/// `POST /auth/login` with a JSON body; returns (status, body).
pub async fn auth_login(gw: &TestGateway, body: &Value) -> (u16, Value) {
    gw.post("auth/login", None, body).await
}

/// An unauthenticated JSON POST to the gateway; returns (status, body).
pub async fn post_json(gw: &TestGateway, path: &str, body: &Value) -> (u16, Value) {
    gw.post(path, None, body).await
}

/// `POST /oauth2/token` with a form; returns (status, body).
pub async fn token_request(gw: &TestGateway, form: &[(&str, &str)]) -> (u16, Value) {
    send(
        TestGateway::client()
            .post(format!("{}oauth2/token", gw.base))
            .form(form),
    )
    .await
}

/// Signs a user in over HTTP the way the SDK does: `/auth/login` with an S256 challenge (the
/// user must have exactly one membership, and no MFA), then the code with its verifier at
/// `/oauth2/token`. Panics unless both succeed.
pub async fn sign_in(
    gw: &TestGateway,
    email: &str,
    password: &str,
    client: Option<&str>,
    scope: &str,
) -> TokenResponse {
    let (verifier, challenge) = pkce_pair();
    let mut body = json!({
        "email": email,
        "password": password,
        "scope": scope,
        "codeChallenge": challenge,
        "codeChallengeMethod": "S256",
    });
    if let Some(c) = client {
        body["clientId"] = json!(c);
    }
    let (status, login) = auth_login(gw, &body).await;
    assert_eq!(status, 200, "/auth/login: {login}");
    let code = login["code"]
        .as_str()
        .unwrap_or_else(|| panic!("/auth/login gave no code: {login}"))
        .to_string();
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("code_verifier", verifier.as_str()),
    ];
    if let Some(c) = client {
        form.push(("client_id", c));
    }
    let (status, tokens) = token_request(gw, &form).await;
    assert_eq!(status, 200, "/oauth2/token: {tokens}");
    TokenResponse::from_body(tokens)
}
