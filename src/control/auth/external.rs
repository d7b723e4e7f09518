//! External identity providers at `/auth/*` (docs/medplum-compat.md §2.1, §2.20): `POST /auth/method`,
//! the IdP's redirect back to `GET /auth/external`, and `POST /auth/exchange`, the legacy form of
//! the token exchange. The sign-in itself is `login::external`'s.

use crate::state::State;
use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::control::base::clients::match_redirect_uri;
use crate::control::base::clients::registered_redirect_uris;
use crate::control::base::domains::domain_configuration;
use crate::control::base::users::valid_email;
use crate::control::login::exchange::ACCESS_TOKEN_TYPE;
use crate::control::login::exchange::ExchangeRequest;
use crate::control::login::exchange::exchange;
use crate::control::login::exchange::respond;
use crate::control::login::external::ExternalLogin;
use crate::control::login::external::IdentityProvider;
use crate::control::login::external::claims_for_code;
use crate::control::login::external::client_idp;
use crate::control::login::external::external_login;
use crate::control::login::flow::issue_code;
use crate::control::login::state::ClientAsk;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::not_ready;
use crate::control::web::AppState;
use crate::control::web::body::AuthBody;
use crate::control::web::body::body_str;
use crate::control::web::body::ok_json;
use crate::control::web::body::query_pairs;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::control::web::error::required;

/// Express's `res.redirect`: 302 with a `Location`.
fn found(location: &str) -> Result<Response, ApiError> {
    let value = HeaderValue::from_str(location)
        .map_err(|_| ApiError::bad_request("Invalid redirect URI"))?;
    Ok((StatusCode::FOUND, [(header::LOCATION, value)]).into_response())
}

/// WHATWG `URLSearchParams.set` for each pair: replaces the first parameter of that name (and
/// drops the others), or appends it; the whole query is re-serialized form-style.
fn set_params(url: &mut url::Url, params: &[(&str, &str)]) {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (name, value) in params {
        let mut seen = false;
        pairs.retain_mut(|(k, v)| {
            if k != name {
                return true;
            }
            if seen {
                return false;
            }
            seen = true;
            *v = (*value).to_string();
            true
        });
        if !seen {
            pairs.push(((*name).to_string(), (*value).to_string()));
        }
    }
    url.query_pairs_mut().clear().extend_pairs(pairs);
}

/// Medplum's `isExternalAuth`: `{domain, authorizeUrl}` when the domain has an IdP.
pub(crate) async fn external_auth(state: &State, email: &str) -> Result<Option<Value>, ApiError> {
    let domain = email.split('@').nth(1).unwrap_or_default();
    let Some(config) = domain_configuration(state, domain).await? else {
        return Ok(None);
    };
    // A SAML domain signs in through fhirgate's sign-in page (`/oauth2/authorize`, single
    // sign-on), which no SDK front end can be sent to without its own authorization request:
    // the answer says so instead of naming a URL.
    if config.pointer("/identityProvider/saml").is_some() {
        return Ok(Some(json!({"domain": domain, "singleSignOn": "saml"})));
    }
    let Some(idp) = config
        .get("identityProvider")
        .and_then(IdentityProvider::from_value)
    else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("Failed to construct URL for the domain");
    let mut url = url::Url::parse(idp.authorize_url.as_deref().ok_or_else(bad)?).map_err(|_| {
        tracing::error!(domain = %domain, "the authorizeUrl of a DomainConfiguration is not a URL");
        bad()
    })?;
    let redirect_uri = format!("{}auth/external", state.config.base_url);
    set_params(
        &mut url,
        &[
            ("client_id", idp.client_id.as_deref().unwrap_or_default()),
            ("redirect_uri", &redirect_uri),
            ("response_type", "code"),
            ("scope", "openid profile email"),
        ],
    );
    Ok(Some(
        json!({"domain": domain, "authorizeUrl": url.to_string()}),
    ))
}

/// `POST /auth/method {email}`.
pub async fn method(
    AxState(state): AxState<AppState>,
    AuthBody(body): AuthBody,
) -> Result<Response, ApiError> {
    let email = body_str(&body, "email").unwrap_or_default();
    if !valid_email(&email) {
        return Err(ApiError::invalid(
            "email",
            "Valid email address is required",
        ));
    }
    let answer = external_auth(&state, &email)
        .await?
        .unwrap_or_else(|| json!({}));
    Ok(ok_json(&answer))
}

/// The sign-in state the front end sent to the IdP (Medplum's `ExternalAuthState`). Fields
/// that are not strings count as absent; `projectId` keeps "given but not a string" apart.
struct ExternalState {
    domain: Option<String>,
    project_id: Option<Value>,
    client_id: Option<String>,
    ask: ClientAsk,
}

impl ExternalState {
    fn parse(text: &str) -> Option<ExternalState> {
        let value: Value = serde_json::from_str(text).ok()?;
        let empty = Map::new();
        let obj = match &value {
            Value::Object(m) => m,
            // JSON, but not an object: every field is absent (as destructuring in Medplum).
            Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Array(_) => &empty,
            Value::Null => return None,
        };
        let s = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Some(ExternalState {
            domain: s("domain"),
            project_id: obj.get("projectId").cloned(),
            client_id: s("clientId"),
            ask: ClientAsk {
                scope: s("scope"),
                nonce: s("nonce"),
                launch: s("launch"),
                code_challenge: s("codeChallenge"),
                code_challenge_method: s("codeChallengeMethod"),
                redirect_uri: s("redirectUri"),
            },
        })
    }
}

/// `GET /auth/external?code&state`.
pub async fn external_callback(
    AxState(state): AxState<AppState>,
    parts: Parts,
) -> Result<Response, ApiError> {
    let query: Vec<(String, String)> = query_pairs(&parts.uri);
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let code = param("code").ok_or_else(|| ApiError::bad_request("Missing code"))?;
    let raw_state = param("state").ok_or_else(|| ApiError::bad_request("Missing state"))?;
    let st =
        ExternalState::parse(raw_state).ok_or_else(|| ApiError::bad_request("Invalid state"))?;

    let client = match &st.client_id {
        Some(id) => Some(required(
            state.identities.client(id).await,
            ApiError::not_found,
        )?),
        None => None,
    };
    let mut idp = client.as_deref().and_then(client_idp);
    if idp.is_none()
        && let Some(domain) = &st.domain
    {
        idp = domain_configuration(&state, domain).await?.and_then(|c| {
            c.get("identityProvider")
                .and_then(IdentityProvider::from_value)
        });
    }
    let idp = idp.ok_or_else(|| ApiError::bad_request("Identity provider not found"))?;

    let claims = claims_for_code(&state, &idp, code, st.ask.code_challenge.as_deref()).await?;
    let claim = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (email, external_id) = if idp.use_subject {
        let sub = claim("sub")
            .ok_or_else(|| ApiError::bad_request("External token does not contain subject"))?;
        (None, Some(sub))
    } else {
        let email = claim("email").map(|e| e.to_lowercase()).ok_or_else(|| {
            ApiError::bad_request("External token does not contain email address")
        })?;
        (Some(email), None)
    };
    if let Some(domain) = &st.domain
        && !email
            .as_deref()
            .is_some_and(|e| e.ends_with(&format!("@{domain}")))
    {
        return Err(ApiError::bad_request("Email address does not match domain"));
    }
    let mut project_id = match &st.project_id {
        Some(Value::String(p)) => Some(p.clone()),
        _ => None,
    };
    if let Some(c) = &client {
        if st.project_id.is_some() && project_id != c.project_id {
            return Err(ApiError::bad_request("Invalid project"));
        }
        project_id = c.project_id.clone();
    }

    let ip = client_ip(&state, &parts)?;
    let request = ExternalLogin {
        auth_method: "external",
        email,
        external_id,
        project_id,
        client: client.as_deref(),
        // The redirect URI is the front end's business here (below), not bound to the Login.
        ask: ClientAsk {
            redirect_uri: None,
            ..st.ask.clone()
        },
        remote_address: ip,
        user_agent: user_agent(&parts.headers),
        force_first_membership: false,
        membership_id: None,
        bind_redirect_uri: false,
        own_mfa: false,
    };
    let mut login = external_login(&state, &request).await?;

    // A Login that still needs a step (MFA enrolment a membership requires) goes to the
    // front end instead.
    if login.membership_id.is_some()
        && not_ready(&login).is_none()
        && let (Some(requested), Some(c)) = (&st.ask.redirect_uri, &client)
    {
        let target = match_redirect_uri(&registered_redirect_uris(c), requested)
            .ok_or_else(|| ApiError::bad_request("Invalid redirect URI"))?;
        let mut url =
            url::Url::parse(&target).map_err(|_| ApiError::bad_request("Invalid redirect URI"))?;
        let code = issue_code(&state, &mut login).await?;
        set_params(&mut url, &[("login", &login.id), ("code", &code)]);
        return found(url.as_str());
    }

    // The sign-in front end continues with `GET /auth/login/:login` (memberships, MFA, code).
    let flow = LoginFlow::of(&login);
    let page = if flow.ask.launch.is_some() {
        "oauth"
    } else {
        "signin"
    };
    let mut url = url::Url::parse(&state.config.base_url)
        .and_then(|b| b.join(page))
        .map_err(|e| ApiError::internal("the sign-in page URL", e))?;
    let nonce = flow.ask.nonce.unwrap_or_default();
    let mut params: Vec<(&str, &str)> = vec![
        ("login", &login.id),
        ("scope", &login.scope),
        ("nonce", &nonce),
    ];
    if let Some(c) = flow.ask.code_challenge.as_deref() {
        params.push(("code_challenge", c));
    }
    if let Some(m) = flow.ask.code_challenge_method.as_deref() {
        params.push(("code_challenge_method", m));
    }
    set_params(&mut url, &params);
    found(url.as_str())
}

/// `POST /auth/exchange {externalAccessToken, clientId}` (legacy form of the token exchange).
pub async fn exchange_legacy(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AuthBody(body): AuthBody<false>,
) -> Result<Response, ApiError> {
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    if s("externalAccessToken").is_none() {
        return Err(ApiError::invalid(
            "externalAccessToken",
            "Missing externalAccessToken",
        ));
    }
    if s("clientId").is_none() {
        return Err(ApiError::invalid("clientId", "Missing clientId"));
    }
    let req = ExchangeRequest {
        client_id: s("clientId"),
        client_secret: s("clientSecret"),
        subject_token: s("externalAccessToken"),
        subject_token_type: Some(ACCESS_TOKEN_TYPE),
        scope: s("scope"),
        nonce: s("nonce"),
        membership_id: None,
    };
    Ok(respond(exchange(&state, &parts, &req).await))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_params_are_set_like_urlsearchparams() {
        let mut u =
            url::Url::parse("https://idp.example.com/auth?a=1&client_id=x&client_id=y").unwrap();
        set_params(
            &mut u,
            &[("client_id", "c"), ("scope", "openid profile email")],
        );
        assert_eq!(
            u.as_str(),
            "https://idp.example.com/auth?a=1&client_id=c&scope=openid+profile+email"
        );
        let mut u = url::Url::parse("https://idp.example.com").unwrap();
        set_params(&mut u, &[("redirect_uri", "http://gw/auth/external")]);
        assert_eq!(
            u.as_str(),
            "https://idp.example.com/?redirect_uri=http%3A%2F%2Fgw%2Fauth%2Fexternal"
        );
    }

    #[test]
    fn states_parse_like_json_parse() {
        assert!(ExternalState::parse("not json").is_none());
        assert!(ExternalState::parse("null").is_none());
        let s = ExternalState::parse("\"just a string\"").unwrap();
        assert!(s.domain.is_none());
        let s = ExternalState::parse(r#"{"domain":"x.com","projectId":7,"clientId":""}"#).unwrap();
        assert_eq!(s.domain.as_deref(), Some("x.com"));
        assert_eq!(s.project_id, Some(json!(7)));
        assert!(s.client_id.is_none());
    }
}
