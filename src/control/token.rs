//! `POST /oauth2/token` (medplum-auth.md §2.13, §3): form bodies only, client authentication by
//! body, `Authorization: Basic` (form-urldecoded, RFC 6749 §2.3.1) or a client assertion, and
//! the grants. Every error is `{error, error_description}`, except the plain-text
//! "Unsupported content type".
//!
//! Grants are dispatched by [`Grant`]; each one authenticates the client, creates or loads a
//! Login and hands it to [`issue_tokens`], which signs the tokens and shapes the response.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::{ApiError, client_ip, media_type, read_body};
use crate::obs::METRICS;
use crate::state::{ClientInfo, State};
use crate::store::{LoginRecord, now_unix};
use crate::tokens::{Claims, hashes_equal};

/// Token requests are small; anything bigger is refused before parsing.
const MAX_FORM: usize = 64 * 1024;
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// ID tokens live one hour, whatever the access token lifetime (medplum-auth.md §3.3).
const ID_TOKEN_LIFETIME: i64 = 3600;

/// The grant types of the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    ClientCredentials,
}

impl Grant {
    fn parse(s: &str) -> Option<Grant> {
        match s {
            "client_credentials" => Some(Grant::ClientCredentials),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// The parsed form. A parameter sent twice is refused (RFC 6749 §3.2).
pub(crate) struct TokenForm(HashMap<String, String>);

impl TokenForm {
    fn parse(bytes: &[u8]) -> Result<TokenForm, ApiError> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            if map.insert(k.into_owned(), v.into_owned()).is_some() {
                return Err(ApiError::oauth("Duplicate parameter"));
            }
        }
        Ok(TokenForm(map))
    }

    /// A non-empty parameter.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

pub async fn token(AxState(state): AxState<Arc<State>>, req: Request) -> Response {
    match handle(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_oauth().into_response(),
    }
}

async fn handle(state: &State, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(ApiError::Text(
            StatusCode::BAD_REQUEST,
            "Unsupported content type",
        ));
    }
    let bytes = read_body(body, MAX_FORM).await?;
    let form = TokenForm::parse(&bytes)?;
    let grant = form
        .get("grant_type")
        .ok_or_else(|| ApiError::oauth("Missing grant_type"))?;
    let grant = Grant::parse(grant).ok_or_else(|| ApiError::oauth("Unsupported grant_type"))?;
    let body = match grant {
        Grant::ClientCredentials => client_credentials(state, &parts, &form).await?,
    };
    METRICS
        .tokens_issued
        .with_label_values(&[grant.label()])
        .inc();
    Ok(token_response(&body))
}

fn token_response(body: &Value) -> Response {
    let mut r = (StatusCode::OK, axum::Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

// === client authentication ===

/// Client id and secret as presented (not yet checked).
#[derive(Debug, Default)]
pub(crate) struct PresentedClient {
    pub id: Option<String>,
    pub secret: Option<String>,
}

/// RFC 6749 §2.3.1: both halves of `client_secret_basic` are form-urlencoded.
fn form_urldecode(s: &str) -> Option<String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// `getClientIdAndSecret` (medplum-auth.md §2.13): a client assertion, else the `Authorization`
/// header (Basic only), else the body.
pub(crate) fn presented_client(
    parts: &Parts,
    form: &TokenForm,
) -> Result<PresentedClient, ApiError> {
    if let Some(kind) = form.get("client_assertion_type") {
        if kind != JWT_BEARER_ASSERTION {
            return Err(ApiError::oauth("Unsupported client assertion type"));
        }
        // private_key_jwt needs the client's remote JWKS; no client can register one yet, so
        // no assertion can verify.
        return Err(ApiError::oauth("Invalid client assertion"));
    }
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let bad = || ApiError::oauth("Invalid authorization header");
        let value = value.to_str().map_err(|_| bad())?;
        let encoded = value.strip_prefix("Basic ").ok_or_else(bad)?;
        let decoded = STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (id, secret) = match text.split_once(':') {
            Some((id, secret)) => (id, Some(secret)),
            None => (text.as_str(), None),
        };
        return Ok(PresentedClient {
            id: Some(form_urldecode(id).ok_or_else(bad)?),
            secret: secret
                .map(|s| form_urldecode(s).ok_or_else(bad))
                .transpose()?,
        });
    }
    Ok(PresentedClient {
        id: form.get("client_id").map(str::to_string),
        secret: form.get("client_secret").map(str::to_string),
    })
}

/// `validateClientIdAndSecret`: the secret must equal the client's secret or its retiring
/// secret. Both hashes are always compared.
pub(crate) fn check_client_secret(
    state: &State,
    client: &ClientInfo,
    secret: &str,
) -> Result<(), ApiError> {
    let Some(primary) = client.secret_hash.as_deref() else {
        return Err(ApiError::oauth("Invalid client"));
    };
    let presented = state.hash_secret(secret);
    let primary_ok = hashes_equal(primary, &presented);
    let retiring_ok = client
        .retiring_hash
        .as_deref()
        .is_some_and(|h| hashes_equal(h, &presented));
    if primary_ok | retiring_ok {
        Ok(())
    } else {
        Err(ApiError::oauth("Invalid secret"))
    }
}

// === grants ===

async fn client_credentials(
    state: &State,
    parts: &Parts,
    form: &TokenForm,
) -> Result<Value, ApiError> {
    let presented = presented_client(parts, form)?;
    let client_id = presented
        .id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::oauth("Missing client_id"))?;
    let secret = presented
        .secret
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::oauth("Missing client_secret"))?;
    let snap = state.snapshot();
    let client = snap
        .clients
        .get(&client_id)
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if !client.active {
        return Err(ApiError::oauth("Invalid client"));
    }
    check_client_secret(state, client, &secret)?;
    let (membership_id, membership) = snap
        .client_membership(client)
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    if !membership.is_active() {
        return Err(ApiError::oauth("Invalid client"));
    }
    let project_id = membership
        .project
        .type_and_id()
        .map(|(_, id)| id.to_string())
        .ok_or_else(|| ApiError::oauth("Invalid client"))?;
    let scope = form.get("scope").unwrap_or("openid").to_string();
    let ip = client_ip(state, parts)?;
    let policy = state
        .effective_policy(&snap, membership_id, Some(&scope))
        .ok_or_else(|| {
            ApiError::oauth("Cannot authenticate: Invalid access policy configuration")
        })?;
    if let Some(ip) = ip
        && !policy.check_ip(ip).is_allowed()
    {
        return Err(ApiError::oauth("IP address not allowed"));
    }
    let lifetime = access_token_lifetime(state, client);
    let now = now_unix();
    let profile = format!("ClientApplication/{}", client.id);
    let login = LoginRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_ref: profile.clone(),
        client_id: Some(client.id.clone()),
        membership_id: Some(membership_id.clone()),
        project_id: Some(project_id.clone()),
        scope,
        auth_method: "client".into(),
        auth_time: now,
        expires_at: now.saturating_add(lifetime.as_secs() as i64),
        revoked: false,
        remote_address: ip.map(|i| i.to_string()),
        code: None,
        refresh_secret: None,
        extra: json!({"granted": true, "userAgent": user_agent(parts)}),
    };
    state.store.insert_login(&login).await?;
    issue_tokens(
        state,
        &Issue {
            login: &login,
            sub: &client.id,
            profile: &profile,
            project_id: &project_id,
            client_id: Some(&client.id),
            lifetime,
            refresh_lifetime: None,
            email: None,
            patient: None,
            now,
        },
    )
}

fn user_agent(parts: &Parts) -> Option<String> {
    let ua = parts.headers.get(header::USER_AGENT)?.to_str().ok()?;
    Some(ua.chars().take(256).collect())
}

/// The client's `accessTokenLifetime`, else the configured default. Values are checked when a
/// client is saved; a stored value that does not parse falls back to the default.
pub(crate) fn access_token_lifetime(state: &State, client: &ClientInfo) -> Duration {
    match client.access_token_lifetime.as_deref() {
        Some(s) => crate::config::parse_lifetime(s).unwrap_or_else(|| {
            tracing::warn!(client = %client.id, "stored accessTokenLifetime is invalid; using the default");
            state.config.access_token_lifetime
        }),
        None => state.config.access_token_lifetime,
    }
}

// === issuance ===

/// What a grant hands to [`issue_tokens`].
pub(crate) struct Issue<'a> {
    /// The Login, already stored.
    pub login: &'a LoginRecord,
    /// User id, or the client id for client credentials.
    pub sub: &'a str,
    /// `Practitioner/…`, `ClientApplication/…`, …
    pub profile: &'a str,
    pub project_id: &'a str,
    pub client_id: Option<&'a str>,
    pub lifetime: Duration,
    /// Set when the Login carries a refresh secret.
    pub refresh_lifetime: Option<Duration>,
    /// Put in the ID token when the scope asks for `email`.
    pub email: Option<&'a str>,
    /// Patient context of the token response.
    pub patient: Option<&'a str>,
    pub now: i64,
}

/// Signs the access token (claims of medplum-auth.md §3.2), the ID token (§3.3) and, when the
/// Login has a refresh secret, the refresh token (§3.4); returns the response body of §3.5.
pub(crate) fn issue_tokens(state: &State, i: &Issue<'_>) -> Result<Value, ApiError> {
    let keyring = state.keyring();
    let issuer = state.config.base_url.clone();
    let login = i.login;
    let expires_in = i.lifetime.as_secs() as i64;
    let access = Claims {
        iss: issuer.clone(),
        iat: i.now,
        exp: i.now.saturating_add(expires_in),
        aud: i.client_id.map(str::to_string),
        client_id: i.client_id.map(str::to_string),
        login_id: Some(login.id.clone()),
        sub: Some(i.sub.to_string()),
        username: Some(i.sub.to_string()),
        scope: Some(login.scope.clone()),
        profile: Some(i.profile.to_string()),
        ..Default::default()
    };
    let id_claims = Claims {
        iss: issuer.clone(),
        iat: i.now,
        exp: i.now.saturating_add(ID_TOKEN_LIFETIME),
        aud: i.client_id.map(str::to_string),
        client_id: i.client_id.map(str::to_string),
        login_id: Some(login.id.clone()),
        sub: Some(i.sub.to_string()),
        fhir_user: Some(i.profile.to_string()),
        nonce: login
            .extra
            .get("nonce")
            .and_then(Value::as_str)
            .map(str::to_string),
        auth_time: Some(login.auth_time),
        email: if login.scope.contains("email") {
            i.email.map(str::to_string)
        } else {
            None
        },
        ..Default::default()
    };
    let sign = |c: &Claims| {
        keyring
            .sign(c)
            .map_err(|e| ApiError::internal("signing a token", e))
    };
    let access_token = sign(&access)?;
    let id_token = sign(&id_claims)?;
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": login.scope,
        "id_token": id_token,
        "access_token": access_token,
    });
    if let (Some(secret), Some(lifetime)) = (login.refresh_secret.as_deref(), i.refresh_lifetime) {
        let refresh = Claims {
            iss: issuer,
            iat: i.now,
            exp: i.now.saturating_add(lifetime.as_secs() as i64),
            aud: i.client_id.map(str::to_string),
            client_id: i.client_id.map(str::to_string),
            login_id: Some(login.id.clone()),
            refresh_secret: Some(secret.to_string()),
            ..Default::default()
        };
        body["refresh_token"] = Value::String(sign(&refresh)?);
    }
    body["project"] = json!({"reference": format!("Project/{}", i.project_id)});
    body["profile"] = json!({"reference": i.profile});
    if let Some(p) = i.patient {
        body["patient"] = Value::String(p.to_string());
    }
    body["smart_style_url"] = Value::String(format!(
        "{}fhir/R4/.well-known/smart-styles.json",
        state.config.base_url
    ));
    body["need_patient_banner"] = Value::Bool(i.patient.is_some());
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_urldecoded() {
        assert_eq!(form_urldecode("a%3Ab+c").as_deref(), Some("a:b c"));
        assert_eq!(form_urldecode("plain").as_deref(), Some("plain"));
        assert_eq!(form_urldecode("%FF"), None);
    }

    #[test]
    fn duplicate_parameters_are_refused() {
        assert!(TokenForm::parse(b"grant_type=a&grant_type=b").is_err());
        let f = TokenForm::parse(b"grant_type=client_credentials&scope=").unwrap();
        assert_eq!(f.get("grant_type"), Some("client_credentials"));
        assert_eq!(f.get("scope"), None);
    }
}
