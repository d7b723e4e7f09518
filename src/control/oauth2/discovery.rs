//! Discovery documents (docs/medplum-compat.md §2.19, docs/contract.md §2). Stricter than Medplum: the signing
//! algorithms are those of the keys fhirgate really uses, `revocation_endpoint` and
//! `end_session_endpoint` are advertised, response types are only `code`, and the SMART
//! configuration lists only `S256`.

use crate::state::State;
use axum::extract::State as AxState;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use crate::control::web::AppState;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;

const GRANT_TYPES: [&str; 4] = [
    "client_credentials",
    "authorization_code",
    "refresh_token",
    "urn:ietf:params:oauth:grant-type:token-exchange",
];

const AUTH_METHODS: [&str; 3] = [
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
];

/// Algorithms accepted in `private_key_jwt` client assertions: exactly `tokens::ASSERTION_ALGS`
/// (ES512 is not among them: the JWT library has no P-521).
const ASSERTION_ALGS: [&str; 5] = ["RS256", "RS384", "RS512", "ES256", "ES384"];

fn endpoint(state: &State, path: &str) -> String {
    format!("{}{path}", state.config.base_url)
}

/// The algorithms the keyring signs with (ES256, and RS256 for ID tokens).
fn signing_algs(state: &State) -> Vec<String> {
    let mut algs: Vec<String> = state
        .keyring()
        .signing_algs()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect();
    algs.sort();
    if algs.is_empty() {
        algs.push("ES256".into());
    }
    algs
}

pub fn openid_configuration_value(state: &State) -> Value {
    json!({
        "issuer": state.config.base_url,
        "authorization_endpoint": endpoint(state, "oauth2/authorize"),
        "token_endpoint": endpoint(state, "oauth2/token"),
        "userinfo_endpoint": endpoint(state, "oauth2/userinfo"),
        "jwks_uri": endpoint(state, ".well-known/jwks.json"),
        "introspection_endpoint": endpoint(state, "oauth2/introspect"),
        "revocation_endpoint": endpoint(state, "oauth2/revoke"),
        "end_session_endpoint": endpoint(state, "oauth2/logout"),
        "id_token_signing_alg_values_supported": signing_algs(state),
        "grant_types_supported": GRANT_TYPES,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "subject_types_supported": ["public"],
        "scopes_supported": ["openid", "profile", "email", "phone", "address", "offline_access"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "email", "name", "given_name", "family_name"],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGS,
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
        "code_challenge_methods_supported": ["S256", "plain"],
    })
}

pub async fn openid_configuration(AxState(state): AxState<AppState>) -> Response {
    ok_json(&openid_configuration_value(&state))
}

pub async fn jwks(AxState(state): AxState<AppState>) -> Response {
    ok_json(&state.keyring().jwks())
}

/// SMART App Launch 2.2 capabilities: exactly what works (no `permission-online`: an
/// `online_access` grant gets no refresh token).
const SMART_CAPABILITIES: [&str; 17] = [
    "authorize-post",
    "client-confidential-asymmetric",
    "client-confidential-symmetric",
    "client-public",
    "context-banner",
    "context-ehr-encounter",
    "context-ehr-patient",
    "context-standalone-patient",
    "context-style",
    "launch-ehr",
    "launch-standalone",
    "permission-offline",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "sso-openid-connect",
];

pub fn smart_configuration_value(state: &State) -> Value {
    json!({
        "issuer": state.config.base_url,
        "jwks_uri": endpoint(state, ".well-known/jwks.json"),
        "authorization_endpoint": endpoint(state, "oauth2/authorize"),
        "grant_types_supported": GRANT_TYPES,
        "token_endpoint": endpoint(state, "oauth2/token"),
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGS,
        "userinfo_endpoint": endpoint(state, "oauth2/userinfo"),
        "introspection_endpoint": endpoint(state, "oauth2/introspect"),
        "revocation_endpoint": endpoint(state, "oauth2/revoke"),
        "scopes_supported": [
            "openid", "fhirUser", "profile", "email", "offline_access",
            "launch", "launch/patient",
            "patient/*.rs", "user/*.cruds", "system/*.cruds"
        ],
        "response_types_supported": ["code"],
        // Each one is exercised by tests/smart.rs or tests/browser_smart.rs.
        "capabilities": SMART_CAPABILITIES,
        "code_challenge_methods_supported": ["S256"],
    })
}

pub async fn smart_configuration(AxState(state): AxState<AppState>) -> Response {
    ok_json(&smart_configuration_value(&state))
}

/// The SMART style sheet that token responses point at (`smart_style_url`).
pub async fn smart_styles() -> Response {
    let styles = json!({
        "color_background": "#edeae3",
        "color_error": "#9e2d2d",
        "color_highlight": "#69b5ce",
        "color_modal_backdrop": "",
        "color_success": "#498e49",
        "color_text": "#303030",
        "dim_border_radius": "6px",
        "dim_font_size": "13px",
        "dim_spacing_size": "20px",
        "font_family_body": "Georgia, Times, 'Times New Roman', serif",
        "font_family_heading": "'HelveticaNeue-Light', Helvetica, Arial, 'Lucida Grande', sans-serif"
    });
    ok_json(&styles)
}

/// RFC 9728 protected-resource metadata.
pub async fn protected_resource(
    AxState(state): AxState<AppState>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let resource = uri.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "resource")
            .map(|(_, v)| v.into_owned())
    });
    let resource = match resource {
        Some(r) if !r.starts_with(&state.config.base_url) => {
            return Err(ApiError::Text(
                StatusCode::BAD_REQUEST,
                "Invalid resource URL",
            ));
        }
        Some(r) => r,
        None => state.config.base_url.clone(),
    };
    let body = json!({
        "resource": resource,
        "issuer": state.config.base_url,
        "authorization_servers": [state.config.base_url],
        "scopes_supported": ["openid", "fhirUser", "profile", "email", "offline_access", "patient/*.rs", "user/*.cruds", "system/*.cruds"],
        "bearer_methods_supported": ["header"],
        "introspection_endpoint": endpoint(&state, "oauth2/introspect"),
    });
    Ok(ok_json(&body))
}
