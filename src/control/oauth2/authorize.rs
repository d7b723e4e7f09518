//! `GET|POST /oauth2/authorize` (medplum-auth.md §2.12) with fhirgate's own sign-in page: where
//! Medplum redirects to its web app, fhirgate answers the browser itself, with server-rendered
//! forms posting back to the same URL, one step at a time:
//!
//! 1. the authorization request is checked in Medplum's order: client, then redirect URI (plain
//!    text 400 until the redirect URI is trusted), then 302 errors to the client;
//! 2. an existing browser session (the `medplum-<clientId>` cookie; an `id_token_hint` must name
//!    the same Login) is reused: `prompt=none` gets a new code at once, otherwise the consent page;
//!    `prompt=none` without a session gets `login_required`;
//! 3. otherwise the sign-in page: e-mail and password (→ `login::password_login`), then MFA
//!    (enrolment when required), the profile choice when the user has several memberships, the
//!    scope consent (boxes may be unticked), and finally a code (`login::issue_code`) on a 302 to
//!    the redirect URI with `state`, plus the session cookie.
//!
//! Every form carries a CSRF token: a random value in the `fhirgate-csrf` cookie that the form
//! repeats, and — once a Login exists — whose hash is stored in that Login, so a form only
//! works for its own Login in its own browser. The session cookie holds `<loginId>.<secret>`;
//! the Login keeps only the secret's keyed hash.

use crate::state::{ClientInfo, State};
use crate::store::{LoginRecord, now_unix};
use crate::tokens::{hashes_equal, random_hex};
use axum::extract::{Request, State as AxState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::policy::scope::{ScopeContext, SmartScope};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

use crate::control::base::clients::registered_redirect_uris;
use crate::control::base::users::memberships_of;
use crate::control::login::flow::choose_profile;
use crate::control::login::flow::issue_code;
use crate::control::login::flow::password_login;
use crate::control::login::flow::scope_narrows;
use crate::control::login::flow::set_scope;
use crate::control::login::mfa::enroll_details;
use crate::control::login::mfa::ensure_secret;
use crate::control::login::mfa::login_enroll;
use crate::control::login::mfa::read_user;
use crate::control::login::mfa::verify_login;
use crate::control::login::state::CODE_LIFETIME;
use crate::control::login::state::LoginRequest;
use crate::control::login::state::code_hash;
use crate::control::login::state::extra_str;
use crate::control::login::state::flag;
use crate::control::login::state::get_login;
use crate::control::login::state::is_granted;
use crate::control::login::state::keys;
use crate::control::login::state::mfa_satisfied;
use crate::control::login::state::revoke;
use crate::control::login::state::set_extra;
use crate::control::web::AppState;
use crate::control::web::body::media_type;
use crate::control::web::body::read_body;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::control::web::pages;
use crate::control::web::pages::Frame;
use crate::control::web::pages::Hidden;
use fhirgate_core::fhir::path::is_valid_id;

/// Largest form the page accepts.
const MAX_FORM: usize = 64 * 1024;

/// A session is reused only this long after sign-in, unless `max_age` says otherwise.
const DEFAULT_MAX_AGE: i64 = 3600;

/// Lifetime of the `medplum-<clientId>` session cookie (Medplum: 1 h).
const SESSION_COOKIE_SECONDS: i64 = 3600;

/// The CSRF cookie lives as long as a sign-in may take.
const CSRF_COOKIE_SECONDS: i64 = 3600;

const CSRF_COOKIE: &str = "fhirgate-csrf";

/// Where the page's forms post: relative, so `/api/oauth2/authorize` posts to itself too.
const ACTION: &str = "authorize";

/// Extra keys of the Login this module owns (the shared ones are in `keys`).
mod page_keys {
    /// Keyed hash of the CSRF token of the browser that created the Login.
    pub const CSRF: &str = "csrf";
    /// The client's `state`, returned with the code.
    pub const STATE: &str = "authorizeState";
}

/// Fields of fhirgate's forms, not of the authorization request.
const PAGE_FIELDS: [&str; 9] = [
    "step", "csrf", "login", "grant", "decision", "token", "profile", "email", "password",
];

const TOO_MANY: &str = "Too many attempts. Wait a few minutes, then try again.";

const START_AGAIN: &str =
    "This sign-in is no longer valid. Go back to the application and sign in again.";

/// Query or form parameters, every value of every name.
#[derive(Debug, Default)]
struct Params(HashMap<String, Vec<String>>);

impl Params {
    fn parse(bytes: &[u8]) -> Params {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Params(map)
    }

    /// The value of a parameter given once and not empty.
    fn one(&self, name: &str) -> Option<&str> {
        match self.0.get(name).map(Vec::as_slice) {
            Some([v]) if !v.is_empty() => Some(v),
            _ => None,
        }
    }

    fn count(&self, name: &str) -> usize {
        self.0.get(name).map_or(0, Vec::len)
    }

    fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0.get(name).into_iter().flatten().map(String::as_str)
    }

    /// A parameter of the authorization request given twice (the page's own fields, such as
    /// the ticked scopes, may repeat).
    fn has_duplicates(&self) -> bool {
        self.0
            .iter()
            .any(|(k, v)| v.len() > 1 && !PAGE_FIELDS.contains(&k.as_str()))
    }
}

/// A checked authorization request.
#[derive(Debug, Clone)]
struct AuthRequest {
    client: ClientInfo,
    redirect_uri: String,
    scope: String,
    state: String,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    launch: Option<String>,
    aud: Option<String>,
    prompt: Vec<String>,
    max_age: i64,
    id_token_hint: Option<String>,
    login_hint: Option<String>,
}

/// Why an authorization request is refused.
#[derive(Debug)]
enum Refusal {
    /// Before the redirect URI is trusted: 400 plain text.
    Text(&'static str),
    /// After: a 302 to the client.
    Redirect(Redirect),
}

#[derive(Debug)]
struct Redirect {
    redirect_uri: String,
    error: &'static str,
    description: &'static str,
    state: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Text(t) => ApiError::Text(StatusCode::BAD_REQUEST, t).into_response(),
            Refusal::Redirect(r) => redirect(
                &r.redirect_uri,
                &[
                    ("error", r.error),
                    ("error_description", r.description),
                    ("state", &r.state),
                ],
                &[],
            ),
        }
    }
}

/// A 302 to `base` with `params` appended to its query.
fn redirect(base: &str, params: &[(&str, &str)], cookies: &[String]) -> Response {
    let location = match url::Url::parse(base) {
        Ok(mut u) => {
            {
                let mut q = u.query_pairs_mut();
                for (k, v) in params {
                    q.append_pair(k, v);
                }
            }
            u.to_string()
        }
        // Only checked URIs get here; refuse rather than send the browser somewhere odd.
        Err(_) => {
            return ApiError::Text(StatusCode::BAD_REQUEST, "Invalid redirect URI").into_response();
        }
    };
    let mut r = StatusCode::FOUND.into_response();
    let h = r.headers_mut();
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            h.insert(header::LOCATION, v);
        }
        Err(_) => {
            return ApiError::Text(StatusCode::BAD_REQUEST, "Invalid redirect URI").into_response();
        }
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

fn client_name(client: &ClientInfo) -> Option<String> {
    client
        .content
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Same scheme, host and port as the public base URL (`aud` check).
fn same_server(aud: &str, base_url: &str) -> bool {
    match (url::Url::parse(aud), url::Url::parse(base_url)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
        }
        _ => false,
    }
}

/// Medplum's checks, in Medplum's order (medplum-auth.md §2.12), plus RFC 6749's "no
/// parameter twice" and a well-formed `max_age`.
async fn check_request(state: &State, p: &Params) -> Result<AuthRequest, Refusal> {
    let snap = state.snapshot();
    let client = p
        .one("client_id")
        .and_then(|id| snap.clients.get(id))
        .filter(|c| c.active)
        .cloned()
        .ok_or(Refusal::Text("Client not found"))?;
    if p.count("redirect_uri") == 0
        || p.0
            .get("redirect_uri")
            .is_some_and(|v| v.iter().all(String::is_empty))
    {
        return Err(Refusal::Text("Missing redirect URI"));
    }
    let redirect_uri = p
        .one("redirect_uri")
        .ok_or(Refusal::Text("Invalid redirect URI"))?
        .to_string();
    if url::Url::parse(&redirect_uri).is_err()
        || !registered_redirect_uris(&client).contains(&redirect_uri.as_str())
    {
        return Err(Refusal::Text("Invalid redirect URI"));
    }
    let state_param = p.all("state").next().unwrap_or_default().to_string();
    let fail = |error: &'static str, description: &'static str| {
        Refusal::Redirect(Redirect {
            redirect_uri: redirect_uri.clone(),
            error,
            description,
            state: state_param.clone(),
        })
    };
    if p.has_duplicates() {
        return Err(fail("invalid_request", "Duplicate parameter"));
    }
    let scope = match p.one("scope") {
        Some(s) => s.to_string(),
        None => client
            .content
            .get("defaultScope")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default(),
    };
    if scope.trim().is_empty() {
        return Err(fail("invalid_request", "Missing scope"));
    }
    if p.one("response_type") != Some("code") {
        return Err(fail("unsupported_response_type", "Invalid response type"));
    }
    if p.count("request") > 0 {
        return Err(fail(
            "request_not_supported",
            "Unsupported request parameter",
        ));
    }
    let aud = p.one("aud").map(str::to_string);
    if let Some(a) = &aud
        && !same_server(a, &state.config.base_url)
    {
        return Err(fail("invalid_request", "Invalid audience"));
    }
    let code_challenge = p.one("code_challenge").map(str::to_string);
    let code_challenge_method = p.one("code_challenge_method").map(str::to_string);
    match (&code_challenge, code_challenge_method.as_deref()) {
        (Some(_), None) => return Err(fail("invalid_request", "Missing code challenge method")),
        (None, Some(_)) => return Err(fail("invalid_request", "Invalid code challenge")),
        (Some(_), Some(m)) if m != "S256" && m != "plain" => {
            return Err(fail("invalid_request", "Invalid code challenge method"));
        }
        _ => {}
    }
    let launch = p.one("launch").map(str::to_string);
    if let Some(l) = &launch {
        let exists =
            is_valid_id(l) && matches!(state.store.read("SmartAppLaunch", l).await, Ok(Some(_)));
        if !exists {
            return Err(fail("invalid_request", "Invalid launch"));
        }
    }
    let max_age = match p.one("max_age") {
        None => DEFAULT_MAX_AGE,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| fail("invalid_request", "Invalid max_age"))?
            // A client may ask for a fresher sign-in, never for an older session to count.
            .min(DEFAULT_MAX_AGE),
    };
    let prompt: Vec<String> = p
        .one("prompt")
        .map(|s| s.split_ascii_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    if prompt.len() > 1 && prompt.iter().any(|w| w == "none") {
        return Err(fail("invalid_request", "Invalid prompt"));
    }
    Ok(AuthRequest {
        client,
        redirect_uri,
        scope,
        state: state_param,
        nonce: p.one("nonce").map(str::to_string),
        code_challenge,
        code_challenge_method,
        launch,
        aud,
        prompt,
        max_age,
        id_token_hint: p.one("id_token_hint").map(str::to_string),
        login_hint: p.one("login_hint").map(str::to_string),
    })
}

impl AuthRequest {
    fn prompt(&self, word: &str) -> bool {
        self.prompt.iter().any(|w| w == word)
    }

    /// The request again, as hidden fields of the sign-in form.
    fn hidden(&self, csrf: &str) -> Vec<Hidden> {
        let mut h = vec![
            Hidden::new("step", "signin"),
            Hidden::new("csrf", csrf),
            Hidden::new("response_type", "code"),
            Hidden::new("client_id", self.client.id.clone()),
            Hidden::new("redirect_uri", self.redirect_uri.clone()),
            Hidden::new("scope", self.scope.clone()),
            Hidden::new("state", self.state.clone()),
        ];
        let optional = [
            ("nonce", &self.nonce),
            ("code_challenge", &self.code_challenge),
            ("code_challenge_method", &self.code_challenge_method),
            ("launch", &self.launch),
            ("aud", &self.aud),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                h.push(Hidden::new(name, v.clone()));
            }
        }
        h
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

fn set_cookie(state: &State, name: String, value: String, max_age: i64) -> String {
    cookie::Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .secure(state.config.base_url.starts_with("https:"))
        .same_site(cookie::SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(max_age))
        .build()
        .to_string()
}

fn session_cookie_name(client_id: &str) -> String {
    format!("medplum-{client_id}")
}

/// The browser's CSRF token: the one it has, or a new one.
fn csrf_token(parts: &Parts) -> String {
    cookie_value(&parts.headers, CSRF_COOKIE)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| random_hex(32))
}

/// The form repeats the browser's cookie (a cross-site post cannot read or set it).
fn csrf_matches(parts: &Parts, p: &Params) -> Option<String> {
    let cookie = cookie_value(&parts.headers, CSRF_COOKIE)?;
    let field = p.one("csrf")?;
    hashes_equal(&cookie, field).then(|| field.to_string())
}

pub async fn authorize(AxState(state): AxState<AppState>, req: Request) -> Response {
    match handle(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: &State, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let params = if parts.method == axum::http::Method::POST {
        let bytes = read_body(body, MAX_FORM).await?;
        if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(ApiError::Text(
                StatusCode::BAD_REQUEST,
                "Unsupported content type",
            ));
        }
        Params::parse(&bytes)
    } else {
        Params::parse(parts.uri.query().unwrap_or_default().as_bytes())
    };
    match params.one("step") {
        None if params.count("step") == 0 => start(state, &parts, &params).await,
        Some("signin") if parts.method == axum::http::Method::POST => {
            signin(state, &parts, &params).await
        }
        Some("resume") if parts.method == axum::http::Method::POST => {
            resume(state, &parts, &params).await
        }
        Some(step) if parts.method == axum::http::Method::POST => {
            continue_step(state, &parts, &params, step).await
        }
        _ => Ok(Refusal::Text("Invalid request").into_response()),
    }
}

/// The authorization request itself (GET, or POST without a step).
async fn start(state: &State, parts: &Parts, p: &Params) -> Result<Response, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let session = if request.prompt("login") {
        None
    } else {
        find_session(state, parts, &request).await?
    };
    if request.prompt("none") {
        let reopened = match session {
            Some(login) => reopen(state, &login, &request).await?,
            None => None,
        };
        return Ok(match reopened {
            Some((_, code)) => redirect(
                &request.redirect_uri,
                &[("code", &code), ("state", &request.state)],
                &[],
            ),
            None => Refusal::Redirect(Redirect {
                redirect_uri: request.redirect_uri.clone(),
                error: "login_required",
                description: "Login required",
                state: request.state.clone(),
            })
            .into_response(),
        });
    }
    let csrf = csrf_token(parts);
    if let Some(login) = session
        && scope_narrows(&login.scope, &request.scope)
    {
        // Nothing changes until the person answers: the consent form carries the request.
        return resume_consent_page(state, &request, &csrf, None, StatusCode::OK);
    }
    signin_page(state, &request, &csrf, None, "", StatusCode::OK)
}

/// The Login of an earlier sign-in of this browser for this client, if it may be reused:
/// tokens were issued from it, it is not revoked, it is recent enough for `max_age`, and its
/// membership is still active.
async fn find_session(
    state: &State,
    parts: &Parts,
    request: &AuthRequest,
) -> Result<Option<LoginRecord>, ApiError> {
    // Only the browser's session cookie is a session (SPEC §2): a token presented as
    // `id_token_hint` (which may have leaked) never stands in for one, and when given it must
    // name the cookie's own Login.
    let Some(value) = cookie_value(&parts.headers, &session_cookie_name(&request.client.id)) else {
        return Ok(None);
    };
    let Some((id, secret)) = value.split_once('.') else {
        return Ok(None);
    };
    if !is_valid_id(id) {
        return Ok(None);
    }
    if let Some(hint) = &request.id_token_hint {
        let hinted = state.keyring().verify(hint).ok().and_then(|c| c.login_id);
        if hinted.as_deref() != Some(id) {
            return Ok(None);
        }
    }
    let login = match state.store.login(id).await? {
        Some(l)
            if extra_str(&l, keys::COOKIE)
                .is_some_and(|h| hashes_equal(h, &state.hash_secret(secret))) =>
        {
            Some(l)
        }
        _ => None,
    };
    let Some(login) = login else {
        return Ok(None);
    };
    let now = now_unix();
    let snap = state.snapshot();
    let membership_active = login
        .membership_id
        .as_deref()
        .and_then(|m| snap.memberships.get(m))
        .is_some_and(|m| m.is_active());
    let usable = !login.revoked
        && is_granted(&login)
        && login.client_id.as_deref() == Some(request.client.id.as_str())
        && login.auth_method == "password"
        && login.auth_time.saturating_add(request.max_age) >= now
        && login.expires_at > now
        && membership_active
        && mfa_satisfied(&login);
    Ok(usable.then_some(login))
}

/// Gives a reused session a new code for this request (nonce, PKCE, launch, redirect URI and
/// state of the new request; `granted` cleared), with compare-and-swap on the old code so two
/// tabs cannot both reopen it. `None` when the Login changed in between.
async fn reopen(
    state: &State,
    login: &LoginRecord,
    request: &AuthRequest,
) -> Result<Option<(LoginRecord, String)>, ApiError> {
    let mut extra = match &login.extra {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let mut set = |k: &str, v: Option<String>| match v {
        Some(v) => {
            extra.insert(k.to_string(), Value::String(v));
        }
        None => {
            extra.remove(k);
        }
    };
    set(
        keys::NONCE,
        Some(
            request
                .nonce
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        ),
    );
    set(keys::CODE_CHALLENGE, request.code_challenge.clone());
    set(
        keys::CODE_CHALLENGE_METHOD,
        request.code_challenge_method.clone(),
    );
    set(keys::LAUNCH, request.launch.clone());
    set(keys::REDIRECT_URI, Some(request.redirect_uri.clone()));
    set(page_keys::STATE, Some(request.state.clone()));
    extra.insert(keys::GRANTED.into(), Value::Bool(false));
    extra.insert(
        keys::CODE_EXPIRES_AT.into(),
        Value::from(now_unix().saturating_add(CODE_LIFETIME)),
    );
    let extra = Value::Object(extra);
    let code = random_hex(16);
    let hash = code_hash(state, &code);
    if !state
        .store
        .set_login_code(&login.id, login.code.as_deref(), &hash, &extra)
        .await?
    {
        return Ok(None);
    }
    let mut updated = login.clone();
    updated.code = Some(hash);
    updated.extra = extra;
    Ok(Some((updated, code)))
}

/// `step=signin`: the e-mail and password form.
async fn signin(state: &State, parts: &Parts, p: &Params) -> Result<Response, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let email = p.one("email").unwrap_or_default().to_string();
    let Some(csrf) = csrf_matches(parts, p) else {
        let fresh = random_hex(32);
        return signin_page(
            state,
            &request,
            &fresh,
            Some("This form has expired. Please sign in again.".into()),
            &email,
            StatusCode::FORBIDDEN,
        );
    };
    let login_request = LoginRequest {
        email: email.clone(),
        password: p.one("password").unwrap_or_default().to_string(),
        client_id: Some(request.client.id.clone()),
        project_id: None,
        resource_type: None,
        scope: Some(request.scope.clone()),
        nonce: request.nonce.clone(),
        launch: request.launch.clone(),
        code_challenge: request.code_challenge.clone(),
        code_challenge_method: request.code_challenge_method.clone(),
        remember: false,
        redirect_uri: Some(request.redirect_uri.clone()),
        // The page is fhirgate's own: the client's allowed origins are about its own front end.
        origin: None,
        remote_address: client_ip(state, parts)?,
        user_agent: user_agent(&parts.headers),
    };
    let mut login = match password_login(state, &login_request).await {
        Ok(l) => l,
        Err(e) => {
            let message = match inline_message(&e) {
                // Which half was wrong is not the browser's business.
                Some(m) if m == "User not found" => "Email or password is invalid".to_string(),
                Some(m) => m,
                None => return Err(e),
            };
            return signin_page(
                state,
                &request,
                &csrf,
                Some(message),
                &email,
                StatusCode::BAD_REQUEST,
            );
        }
    };
    set_extra(
        &mut login,
        page_keys::STATE,
        Value::String(request.state.clone()),
    );
    bind_csrf(state, &mut login, &csrf).await?;
    next_step(state, login, &csrf).await
}

/// Stores the hash of the browser's CSRF token (and any other `extra` changes made in memory)
/// in the Login.
async fn bind_csrf(state: &State, login: &mut LoginRecord, csrf: &str) -> Result<(), ApiError> {
    let stored = get_login(state, &login.id).await?;
    set_extra(
        login,
        page_keys::CSRF,
        Value::String(state.hash_secret(csrf)),
    );
    if !state
        .store
        .update_login_extra_cas(&login.id, &stored.extra, &login.extra)
        .await?
    {
        return Err(ApiError::conflict("Login changed; try again"));
    }
    Ok(())
}

/// The steps after sign-in: the Login named by the form, in the browser that created it.
async fn continue_step(
    state: &State,
    parts: &Parts,
    p: &Params,
    step: &str,
) -> Result<Response, ApiError> {
    let login = match p.one("login") {
        Some(id) => get_login(state, id).await.ok(),
        None => None,
    };
    let now = now_unix();
    let Some(login) = login.filter(|l| !l.revoked && l.expires_at > now && !is_granted(l)) else {
        return message_page(None, START_AGAIN, StatusCode::BAD_REQUEST);
    };
    let bound = csrf_matches(parts, p).filter(|token| {
        extra_str(&login, page_keys::CSRF)
            .is_some_and(|h| hashes_equal(h, &state.hash_secret(token)))
    });
    let Some(csrf) = bound else {
        return message_page(
            login_client(state, &login).as_ref(),
            START_AGAIN,
            StatusCode::FORBIDDEN,
        );
    };
    let token = p.one("token").unwrap_or_default();
    match step {
        "mfa" => match verify_login(state, &login.id, token).await {
            Ok(l) => next_step(state, l, &csrf).await,
            Err(e) => step_error(state, login, &csrf, e).await,
        },
        "enroll" => match login_enroll(state, &login.id, token).await {
            Ok(l) => next_step(state, l, &csrf).await,
            Err(e) => step_error(state, login, &csrf, e).await,
        },
        "profile" => {
            let ip = client_ip(state, parts)?;
            let chosen = p.one("profile").unwrap_or_default();
            match choose_profile(state, &login, chosen, ip).await {
                Ok(l) => next_step(state, l, &csrf).await,
                Err(e) => step_error(state, login, &csrf, e).await,
            }
        }
        "consent" => consent(state, login, &csrf, p).await,
        _ => message_page(None, START_AGAIN, StatusCode::BAD_REQUEST),
    }
}

/// A failed step: the same page again with the message, or — when the Login is gone (too many
/// wrong codes revoke it) — a page saying to start again.
async fn step_error(
    state: &State,
    login: LoginRecord,
    csrf: &str,
    e: ApiError,
) -> Result<Response, ApiError> {
    let Some(message) = inline_message(&e) else {
        return Err(e);
    };
    let fresh = get_login(state, &login.id).await?;
    if fresh.revoked {
        let message = if matches!(e, ApiError::Outcome(Outcome::TooManyRequests)) {
            TOO_MANY.to_string()
        } else {
            format!("{message}. {START_AGAIN}")
        };
        return message_page(
            login_client(state, &fresh).as_ref(),
            &message,
            StatusCode::BAD_REQUEST,
        );
    }
    render_step(state, &fresh, csrf, Some(message), StatusCode::BAD_REQUEST).await
}

/// What the user sees for an error of the Login functions; `None` for errors that are ours.
fn inline_message(e: &ApiError) -> Option<String> {
    match e {
        ApiError::Outcome(Outcome::BadRequest(text)) => Some(text.clone()),
        ApiError::Outcome(Outcome::Conflict(text)) => Some(text.clone()),
        ApiError::Outcome(Outcome::TooManyRequests) => Some(TOO_MANY.to_string()),
        ApiError::Outcome(Outcome::NotFound) => Some("Not found".to_string()),
        ApiError::Invalid { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The ticked scopes of a consent form: each one asked for, at least one. `Err` is the message.
fn chosen_scopes<'a>(p: &'a Params, requested: &str) -> Result<Vec<&'a str>, &'static str> {
    let mut chosen: Vec<&str> = Vec::new();
    for word in p.all("grant") {
        if !requested.split_ascii_whitespace().any(|w| w == word) {
            return Err("Invalid scope");
        }
        if !chosen.contains(&word) {
            chosen.push(word);
        }
    }
    if chosen.is_empty() {
        return Err("Choose at least one permission, or deny access.");
    }
    Ok(chosen)
}

/// Where the page's Login goes back to: its redirect URI and the client's `state`.
fn return_to(login: &LoginRecord) -> Result<(String, String), ApiError> {
    let redirect_uri = extra_str(login, keys::REDIRECT_URI)
        .ok_or_else(|| ApiError::internal("sign-in page", "Login without redirect URI"))?
        .to_string();
    let client_state = extra_str(login, page_keys::STATE)
        .unwrap_or_default()
        .to_string();
    Ok((redirect_uri, client_state))
}

/// `step=consent`: the ticked scopes (a subset of those asked for), or a denial, which ends
/// the Login.
async fn consent(
    state: &State,
    login: LoginRecord,
    csrf: &str,
    p: &Params,
) -> Result<Response, ApiError> {
    let (redirect_uri, client_state) = return_to(&login)?;
    if p.one("decision") == Some("deny") {
        revoke(state, &login.id).await?;
        return Ok(denied(&redirect_uri, &client_state));
    }
    let chosen = match chosen_scopes(p, &login.scope) {
        Ok(c) => c,
        Err(message) => {
            return render_step(
                state,
                &login,
                csrf,
                Some(message.to_string()),
                StatusCode::BAD_REQUEST,
            )
            .await;
        }
    };
    match set_scope(state, &login, &chosen.join(" ")).await {
        Ok(l) => next_step(state, l, csrf).await,
        Err(e) => step_error(state, login, csrf, e).await,
    }
}

fn denied(redirect_uri: &str, client_state: &str) -> Response {
    redirect(
        redirect_uri,
        &[
            ("error", "access_denied"),
            ("error_description", "Access denied"),
            ("state", client_state),
        ],
        &[],
    )
}

/// `step=resume`: consent for a new request in an existing session. The session is looked up
/// again (it may have ended since the page was shown); then it gets a new code with the
/// chosen scopes. A denial leaves the session as it was.
async fn resume(state: &State, parts: &Parts, p: &Params) -> Result<Response, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let Some(csrf) = csrf_matches(parts, p) else {
        return message_page(Some(&request.client), START_AGAIN, StatusCode::FORBIDDEN);
    };
    let session = find_session(state, parts, &request)
        .await?
        .filter(|l| scope_narrows(&l.scope, &request.scope));
    let Some(session) = session else {
        return signin_page(
            state,
            &request,
            &csrf,
            Some("Your session has ended. Please sign in again.".into()),
            "",
            StatusCode::BAD_REQUEST,
        );
    };
    if p.one("decision") == Some("deny") {
        return Ok(denied(&request.redirect_uri, &request.state));
    }
    let chosen = match chosen_scopes(p, &request.scope) {
        Ok(c) => c,
        Err(message) => {
            return resume_consent_page(
                state,
                &request,
                &csrf,
                Some(message.to_string()),
                StatusCode::BAD_REQUEST,
            );
        }
    };
    let Some((login, _)) = reopen(state, &session, &request).await? else {
        return message_page(Some(&request.client), START_AGAIN, StatusCode::CONFLICT);
    };
    let mut login = set_scope(state, &login, &chosen.join(" ")).await?;
    set_extra(
        &mut login,
        page_keys::CSRF,
        Value::String(state.hash_secret(&csrf)),
    );
    finish(state, login).await
}

/// Consent is asked for anything beyond a plain sign-in.
fn needs_consent(login: &LoginRecord) -> bool {
    !flag(login, keys::SCOPE_GRANTED) && login.scope.split_ascii_whitespace().any(|w| w != "openid")
}

/// The next page for a Login, or — when it is ready — the code.
async fn next_step(state: &State, login: LoginRecord, csrf: &str) -> Result<Response, ApiError> {
    let ready = mfa_satisfied(&login) && login.membership_id.is_some() && !needs_consent(&login);
    if !ready {
        return render_step(state, &login, csrf, None, StatusCode::OK).await;
    }
    finish(state, login).await
}

/// The page a Login that is not ready needs next.
async fn render_step(
    state: &State,
    login: &LoginRecord,
    csrf: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let client = login_client(state, login);
    let redirect_uri = extra_str(login, keys::REDIRECT_URI);
    let frame = |title: &'static str, step: &'static str| Frame {
        title,
        client_name: client.as_ref().and_then(client_name),
        error: error.clone(),
        action: ACTION,
        hidden: vec![
            Hidden::new("step", step),
            Hidden::new("login", login.id.clone()),
            Hidden::new("csrf", csrf),
        ],
    };
    let csp = pages::content_security_policy(redirect_uri);
    let respond = |html: String| Ok(pages::html_response(status, html, &csp, &[]));
    let enrolling = flag(login, keys::MFA_ENROLL_REQUIRED);
    if !flag(login, keys::MFA_VERIFIED) && enrolling {
        let user = read_user(state, &login.user_ref)
            .await?
            .ok_or_else(|| ApiError::bad_request("User not found"))?;
        let user = ensure_secret(state, user).await?;
        let secret = user.secret().unwrap_or_default().to_string();
        let (_, qr) = enroll_details(user.email(), &secret)?;
        #[derive(Serialize)]
        struct Enroll {
            qr: String,
            secret: String,
        }
        return respond(pages::render(
            "enroll.html",
            &frame("Set up two-step verification", "enroll"),
            &Enroll { qr, secret },
        )?);
    }
    if !mfa_satisfied(login) {
        return respond(pages::render(
            "mfa.html",
            &frame("Two-step verification", "mfa"),
            &(),
        )?);
    }
    if login.membership_id.is_none() {
        let memberships = memberships_of(
            state,
            &login.user_ref,
            login.project_id.as_deref(),
            extra_str(login, keys::PROFILE_TYPE),
        )
        .await?;
        let snap = state.snapshot();
        #[derive(Serialize)]
        struct Choice {
            id: String,
            label: String,
            detail: String,
        }
        #[derive(Serialize)]
        struct Profiles {
            profiles: Vec<Choice>,
        }
        let profiles = memberships
            .iter()
            .filter(|(_, m)| m.is_active())
            .map(|(id, m)| {
                let reference = m.profile.reference.clone().unwrap_or_default();
                let project = m
                    .project
                    .type_and_id()
                    .and_then(|(_, pid)| snap.projects.get(pid))
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                Choice {
                    id: id.clone(),
                    label: m
                        .profile
                        .display
                        .clone()
                        .unwrap_or_else(|| reference.clone()),
                    detail: if project.is_empty() {
                        reference
                    } else {
                        format!("{reference} · {project}")
                    },
                }
            })
            .collect::<Vec<_>>();
        if profiles.is_empty() {
            return message_page(
                client.as_ref(),
                "Profile not active",
                StatusCode::BAD_REQUEST,
            );
        }
        return respond(pages::render(
            "profile.html",
            &frame("Choose a profile", "profile"),
            &Profiles { profiles },
        )?);
    }
    consent_page(
        state,
        client.as_ref(),
        &login.scope,
        redirect_uri.unwrap_or_default(),
        vec![
            Hidden::new("step", "consent"),
            Hidden::new("login", login.id.clone()),
            Hidden::new("csrf", csrf),
        ],
        csrf,
        error,
        status,
    )
}

/// The consent page of a signed-in person, whose answer comes back as the `resume` step.
fn resume_consent_page(
    state: &State,
    request: &AuthRequest,
    csrf: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let mut hidden = request.hidden(csrf);
    hidden[0] = Hidden::new("step", "resume");
    consent_page(
        state,
        Some(&request.client),
        &request.scope,
        &request.redirect_uri,
        hidden,
        csrf,
        error,
        status,
    )
}

#[allow(clippy::too_many_arguments)]
fn consent_page(
    state: &State,
    client: Option<&ClientInfo>,
    scope: &str,
    redirect_uri: &str,
    hidden: Vec<Hidden>,
    csrf: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct ScopeItem {
        value: String,
        label: String,
    }
    #[derive(Serialize)]
    struct Consent {
        scopes: Vec<ScopeItem>,
    }
    let mut scopes: Vec<ScopeItem> = Vec::new();
    for word in scope.split_ascii_whitespace() {
        if scopes.iter().any(|s| s.value == word) {
            continue;
        }
        scopes.push(ScopeItem {
            value: word.to_string(),
            label: describe_scope(word),
        });
    }
    let frame = Frame {
        title: "Allow access",
        client_name: client.and_then(client_name),
        error,
        action: ACTION,
        hidden,
    };
    let html = pages::render("consent.html", &frame, &Consent { scopes })?;
    let csp = pages::content_security_policy(Some(redirect_uri));
    Ok(pages::html_response(
        status,
        html,
        &csp,
        &[csrf_cookie(state, csrf)],
    ))
}

/// The code, on a 302 to the redirect URI with the client's `state`, and the session cookie
/// whose secret's hash the Login keeps.
async fn finish(state: &State, mut login: LoginRecord) -> Result<Response, ApiError> {
    let (redirect_uri, client_state) = return_to(&login)?;
    let secret = random_hex(32);
    set_extra(
        &mut login,
        keys::COOKIE,
        Value::String(state.hash_secret(&secret)),
    );
    let code = issue_code(state, &mut login).await?;
    let mut cookies = Vec::new();
    if let Some(client_id) = &login.client_id {
        cookies.push(set_cookie(
            state,
            session_cookie_name(client_id),
            format!("{}.{secret}", login.id),
            SESSION_COOKIE_SECONDS,
        ));
    }
    Ok(redirect(
        &redirect_uri,
        &[("code", &code), ("state", &client_state)],
        &cookies,
    ))
}

fn login_client(state: &State, login: &LoginRecord) -> Option<ClientInfo> {
    let id = login.client_id.as_deref()?;
    state.snapshot().clients.get(id).cloned()
}

fn csrf_cookie(state: &State, csrf: &str) -> String {
    set_cookie(
        state,
        CSRF_COOKIE.to_string(),
        csrf.to_string(),
        CSRF_COOKIE_SECONDS,
    )
}

fn signin_page(
    state: &State,
    request: &AuthRequest,
    csrf: &str,
    error: Option<String>,
    email: &str,
    status: StatusCode,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct SignIn {
        email: String,
        welcome: Option<String>,
    }
    let frame = Frame {
        title: "Sign in",
        client_name: client_name(&request.client),
        error,
        action: ACTION,
        hidden: request.hidden(csrf),
    };
    let email = if email.is_empty() {
        request.login_hint.clone().unwrap_or_default()
    } else {
        email.to_string()
    };
    let welcome = request
        .client
        .content
        .pointer("/signInForm/welcomeString")
        .and_then(Value::as_str)
        .map(str::to_string);
    let html = pages::render("signin.html", &frame, &SignIn { email, welcome })?;
    let csp = pages::content_security_policy(Some(&request.redirect_uri));
    Ok(pages::html_response(
        status,
        html,
        &csp,
        &[csrf_cookie(state, csrf)],
    ))
}

fn message_page(
    client: Option<&ClientInfo>,
    message: &str,
    status: StatusCode,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Message<'a> {
        message: &'a str,
    }
    let frame = Frame {
        title: "Sign-in stopped",
        client_name: client.and_then(client_name),
        error: None,
        action: ACTION,
        hidden: Vec::new(),
    };
    let html = pages::render("message.html", &frame, &Message { message })?;
    Ok(pages::html_response(
        status,
        html,
        &pages::content_security_policy(None),
        &[],
    ))
}

/// Words a person can judge a scope by.
fn describe_scope(word: &str) -> String {
    let fixed = match word {
        "openid" => Some("Confirm who you are"),
        "profile" => Some("See your name and profile"),
        "fhirUser" => Some("Know which health record is yours"),
        "email" => Some("See your e-mail address"),
        "phone" => Some("See your phone number"),
        "address" => Some("See your address"),
        "offline_access" | "offline" => Some("Stay connected when you are not using it"),
        "online_access" => Some("Stay connected while you use it"),
        "launch" => Some("Use the context it was launched in"),
        "launch/patient" => Some("Ask which patient to work with"),
        "launch/encounter" => Some("Ask which encounter to work with"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let Some(s) = SmartScope::parse(word) else {
        return format!("Use the permission “{word}”");
    };
    let mut verbs = Vec::new();
    if s.read {
        verbs.push("read");
    }
    if s.search {
        verbs.push("search");
    }
    if s.create {
        verbs.push("create");
    }
    if s.update {
        verbs.push("update");
    }
    if s.delete {
        verbs.push("delete");
    }
    let verbs = match verbs.as_slice() {
        [] => "use".to_string(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    let what = if s.resource_type == "*" {
        "all kinds of records".to_string()
    } else {
        format!("{} records", s.resource_type)
    };
    let whose = match s.context {
        ScopeContext::Patient => " of the patient",
        ScopeContext::User => " you can access",
        ScopeContext::System => "",
    };
    let mut text = format!("{} {what}{whose}", capitalise(&verbs));
    if let Some(c) = &s.criteria {
        text.push_str(&format!(" (only where {c})"));
    }
    text
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_keep_every_value() {
        assert!(!Params::parse(b"grant=a&grant=b&scope=a+b").has_duplicates());
        let p = Params::parse(b"a=1&b=&c=x&c=y");
        assert_eq!(p.one("a"), Some("1"));
        assert_eq!(p.one("b"), None);
        assert_eq!(p.one("c"), None);
        assert_eq!(p.count("c"), 2);
        assert!(p.has_duplicates());
        assert_eq!(p.all("c").collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn audience_must_be_this_server() {
        let base = "http://127.0.0.1:8080/";
        assert!(same_server("http://127.0.0.1:8080/fhir/R4", base));
        assert!(same_server("http://127.0.0.1:8080/", base));
        assert!(!same_server("http://127.0.0.1:9999/fhir/R4", base));
        assert!(!same_server("https://127.0.0.1:8080/", base));
        assert!(!same_server("http://evil.example/", base));
        assert!(!same_server("not a url", base));
    }

    #[test]
    fn scopes_are_described() {
        assert_eq!(describe_scope("openid"), "Confirm who you are");
        assert_eq!(
            describe_scope("patient/Observation.rs"),
            "Read and search Observation records of the patient"
        );
        assert_eq!(
            describe_scope("user/*.cruds"),
            "Read, search, create, update and delete all kinds of records you can access"
        );
        assert_eq!(
            describe_scope("patient/Condition.rs?category=health-concern"),
            "Read and search Condition records of the patient (only where category=health-concern)"
        );
        assert_eq!(describe_scope("custom"), "Use the permission “custom”");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; medplum-c1=l.s; fhirgate-csrf=abc"),
        );
        assert_eq!(cookie_value(&h, "medplum-c1").as_deref(), Some("l.s"));
        assert_eq!(cookie_value(&h, "fhirgate-csrf").as_deref(), Some("abc"));
        assert_eq!(cookie_value(&h, "nope"), None);
    }
}
