//! The authorization request of `/oauth2/authorize`: its parameters, the checks in Medplum's
//! order, and the refusals (plain text until the redirect URI is trusted, then 302s).

use crate::control::base::client_auth::is_public;
use crate::control::base::clients::registered_redirect_uris;
use crate::control::base::resources::fields::joined_strings;
use crate::control::login::pkce::PUBLIC_CLIENT_PKCE;
use crate::control::login::pkce::check_public_pkce;
use crate::control::login::state::ClientAsk;
use crate::control::web::body::media_type;
use crate::control::web::body::read_body;
use crate::control::web::error::ApiError;
use crate::control::web::pages::Hidden;
use crate::state::{ClientInfo, State};
use crate::store::LoginRecord;
use axum::extract::FromRequest;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::path::is_valid_id;
use serde_json::Value;
use std::collections::HashMap;

/// Largest form the page accepts.
const MAX_FORM: usize = 64 * 1024;

/// A session is reused only this long after sign-in, unless `max_age` says otherwise.
const DEFAULT_MAX_AGE: i64 = 3600;

/// Fields of fhirgate's forms, not of the authorization request.
const PAGE_FIELDS: [&str; 12] = [
    "step",
    "csrf",
    "login",
    "grant",
    "decision",
    "token",
    "profile",
    "email",
    "password",
    "credential",
    "q",
    "patient",
];

/// Query or form parameters, every value of every name.
#[derive(Debug, Default)]
pub(crate) struct Params(HashMap<String, Vec<String>>);

/// The parameters as an extractor: the query of a GET, the form of a POST (read first, then its
/// media type checked: plain 400 for anything but a form).
impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Params, ApiError> {
        let (parts, body) = req.into_parts();
        if parts.method != Method::POST {
            return Ok(Params::parse(
                parts.uri.query().unwrap_or_default().as_bytes(),
            ));
        }
        let bytes = read_body(body, MAX_FORM).await?;
        if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(ApiError::Text(
                StatusCode::BAD_REQUEST,
                "Unsupported content type",
            ));
        }
        Ok(Params::parse(&bytes))
    }
}

/// The form an IdP's page posts to the assertion consumer service: a SAML Response, base64,
/// may be larger than a sign-in form (group claims, certificates).
pub(crate) struct AcsForm(pub(crate) Params);

const MAX_ACS_FORM: usize = 256 * 1024;

impl<S: Send + Sync> FromRequest<S> for AcsForm {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<AcsForm, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(body, MAX_ACS_FORM).await?;
        if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(ApiError::Text(
                StatusCode::BAD_REQUEST,
                "Unsupported content type",
            ));
        }
        Ok(AcsForm(Params::parse(&bytes)))
    }
}

impl Params {
    pub(super) fn parse(bytes: &[u8]) -> Params {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Params(map)
    }

    /// The value of a parameter given once and not empty.
    pub(super) fn one(&self, name: &str) -> Option<&str> {
        match self.0.get(name).map(Vec::as_slice) {
            Some([v]) if !v.is_empty() => Some(v),
            _ => None,
        }
    }

    pub(super) fn count(&self, name: &str) -> usize {
        self.0.get(name).map_or(0, Vec::len)
    }

    pub(super) fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0.get(name).into_iter().flatten().map(String::as_str)
    }

    /// A parameter of the authorization request given twice (the page's own fields, such as
    /// the ticked scopes, may repeat).
    pub(super) fn has_duplicates(&self) -> bool {
        self.0
            .iter()
            .any(|(k, v)| v.len() > 1 && !PAGE_FIELDS.contains(&k.as_str()))
    }
}

/// A checked authorization request.
#[derive(Debug, Clone)]
pub(super) struct AuthRequest {
    pub(super) client: ClientInfo,
    pub(super) redirect_uri: String,
    pub(super) scope: String,
    pub(super) state: String,
    pub(super) nonce: Option<String>,
    pub(super) code_challenge: Option<String>,
    pub(super) code_challenge_method: Option<String>,
    pub(super) launch: Option<String>,
    pub(super) aud: Option<String>,
    pub(super) prompt: Vec<String>,
    pub(super) max_age: i64,
    pub(super) id_token_hint: Option<String>,
    pub(super) login_hint: Option<String>,
}

/// Why an authorization request is refused.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Before the redirect URI is trusted: 400 plain text.
    Text(&'static str),
    /// After: a 302 to the client.
    Redirect(Redirect),
    /// The store cannot say whether the client exists: 503.
    Unavailable,
}

#[derive(Debug)]
pub(super) struct Redirect {
    pub(super) redirect_uri: String,
    pub(super) error: &'static str,
    pub(super) description: &'static str,
    pub(super) state: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Text(t) => ApiError::Text(StatusCode::BAD_REQUEST, t).into_response(),
            Refusal::Unavailable => ApiError::Outcome(
                fhirgate_core::fhir::outcome::Stock::CredentialStoreUnavailable.outcome(),
            )
            .into_response(),
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
pub(super) fn redirect(base: &str, params: &[(&str, &str)], cookies: &[String]) -> Response {
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

pub(super) fn client_name(client: &ClientInfo) -> Option<String> {
    client
        .content
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// SMART App Launch 2.2: `aud` names the FHIR server the token is for, which is this server's
/// FHIR base URL (a trailing slash either way). Medplum accepts any URL of the same origin;
/// fhirgate does not, so a token asked for another resource server is never minted here.
pub(super) fn is_fhir_base(aud: &str, base_url: &str) -> bool {
    let fhir_base = format!("{base_url}fhir/R4");
    aud.strip_suffix('/').unwrap_or(aud) == fhir_base
}

/// Medplum's checks, in Medplum's order (docs/medplum-compat.md §2.12), plus RFC 6749's "no
/// parameter twice" and a well-formed `max_age`.
pub(super) async fn check_request(state: &State, p: &Params) -> Result<AuthRequest, Refusal> {
    let client = match p.one("client_id") {
        Some(id) => state
            .identities
            .client(id)
            .await
            .map_err(|_| Refusal::Unavailable)?,
        None => None,
    };
    let client = client
        .filter(|c| c.active)
        .map(|c| c.as_ref().clone())
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
        None => joined_strings(client.content.get("defaultScope")),
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
        && !is_fhir_base(a, &state.config.base_url)
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
    if is_public(&client)
        && check_public_pkce(code_challenge.as_deref(), code_challenge_method.as_deref()).is_err()
    {
        return Err(fail("invalid_request", PUBLIC_CLIENT_PKCE));
    }
    let launch = p.one("launch").map(str::to_string);
    if let Some(l) = &launch {
        // A launch context of the client's own project (an EHR of another project cannot hand
        // this app its patient).
        let exists = is_valid_id(l)
            && matches!(
                state.store.read("SmartAppLaunch", l).await,
                Ok(Some(launch)) if launch.project_id.is_some() && launch.project_id == client.project_id
            );
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
    /// What the app asked for, as every sign-in path carries it into the Login.
    pub(super) fn ask(&self) -> ClientAsk {
        ClientAsk {
            scope: Some(self.scope.clone()),
            nonce: self.nonce.clone(),
            launch: self.launch.clone(),
            code_challenge: self.code_challenge.clone(),
            code_challenge_method: self.code_challenge_method.clone(),
            redirect_uri: Some(self.redirect_uri.clone()),
        }
    }

    pub(super) fn prompt(&self, word: &str) -> bool {
        self.prompt.iter().any(|w| w == word)
    }

    /// The request again, as hidden fields of the sign-in form.
    pub(super) fn hidden(&self, csrf: &str) -> Vec<Hidden> {
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

pub(super) async fn login_client(state: &State, login: &LoginRecord) -> Option<ClientInfo> {
    let id = login.client_id.as_deref()?;
    let client = state.identities.client(id).await.ok().flatten()?;
    Some(client.as_ref().clone())
}
