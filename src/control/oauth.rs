//! The OAuth endpoints around the token endpoint: `/oauth2/userinfo` (medplum-auth.md §2.14),
//! `/oauth2/introspect` (§2.17, RFC 7662), RFC 7009 `/oauth2/revoke`, and `/auth/revoke`
//! (§2.16, ending another session of the same user).
//!
//! Stricter than Medplum (SPEC §2): introspection requires client authentication and only
//! answers `active: true` for tokens of the introspecting client's project; a refresh token
//! whose secret was rotated out is inactive.

use std::sync::Arc;

use axum::extract::{Request, State as AxState};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use serde_json::{Map, Value, json};

use super::access::authenticate;
use super::error::outcome_response;
use super::login::{self, auth_body, body_str};
use super::token::{TokenForm, check_client_secret, has_word, presented_client};
use super::{ApiError, ok_json};
use crate::state::State;
use crate::store::LoginRecord;
use crate::tokens::{Claims, hashes_equal};

// === /oauth2/userinfo ===

/// `GET|POST /oauth2/userinfo`: claims about the caller, by the scope of its Login.
pub async fn userinfo(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    let profile_ref = caller.identity.profile.clone();
    // The ID token's `sub` (the User, or the client), not Medplum's profile id: OIDC Core
    // §5.3.2 requires the two to match, and certified relying parties (openid-client,
    // tests/compat_oidc.rs) refuse a userinfo answer whose `sub` differs. The profile stays
    // available as `profile` (scope `profile`) and as the ID token's `fhirUser`.
    let subject = caller
        .identity
        .user_ref
        .split_once('/')
        .map(|(_, id)| id.to_string())
        .unwrap_or_default();
    let mut out = Map::new();
    out.insert("sub".into(), Value::String(subject));
    // Basic auth has no Login and so no scope: `sub` alone.
    let scope = caller.identity.scope.clone().unwrap_or_default();
    let wants = |w: &str| has_word(&scope, w);
    if !(wants("profile") || wants("email") || wants("phone") || wants("address")) {
        return Ok(ok_json(&Value::Object(out)));
    }
    let profile = super::me::profile_resource(&state, &caller).await;
    let user = super::login::read_user(&state, &caller.identity.user_ref)
        .await?
        .map(|u| u.content);
    if wants("profile") {
        let name = profile
            .get("name")
            .and_then(Value::as_array)
            .and_then(|a| a.first());
        let given = name
            .and_then(|n| n.get("given"))
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let family = name
            .and_then(|n| n.get("family"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        out.insert("profile".into(), Value::String(profile_ref));
        out.insert(
            "name".into(),
            Value::String(name.map(format_human_name).unwrap_or_default()),
        );
        out.insert("given_name".into(), Value::String(given));
        out.insert("family_name".into(), Value::String(family.to_string()));
        out.insert("middle_name".into(), Value::String(String::new()));
        out.insert("locale".into(), Value::String("en-US".into()));
        out.insert(
            "birthdate".into(),
            profile
                .get("birthDate")
                .cloned()
                .unwrap_or_else(|| Value::String(String::new())),
        );
        if let Some(t) = profile
            .get("meta")
            .and_then(|m| m.get("lastUpdated"))
            .and_then(Value::as_str)
            .and_then(parse_instant)
        {
            out.insert("updated_at".into(), Value::from(t));
        }
        for k in [
            "website",
            "zoneinfo",
            "gender",
            "preferred_username",
            "picture",
            "nickname",
        ] {
            out.insert(k.into(), Value::String(String::new()));
        }
    }
    if wants("email") {
        match user
            .as_ref()
            .and_then(|u| u.get("email").and_then(Value::as_str).map(|e| (u, e)))
        {
            Some((u, email)) => {
                out.insert("email".into(), Value::String(email.to_string()));
                out.insert(
                    "email_verified".into(),
                    Value::Bool(
                        u.get("emailVerified")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                    ),
                );
            }
            None => {
                if let Some(e) = telecom(&profile, "email") {
                    out.insert("email".into(), Value::String(e));
                    out.insert("email_verified".into(), Value::Bool(false));
                }
            }
        }
    }
    if wants("phone")
        && let Some(p) = telecom(&profile, "phone")
    {
        out.insert("phone_number".into(), Value::String(p));
        out.insert("phone_number_verified".into(), Value::Bool(false));
    }
    if wants("address")
        && let Some(a) = profile
            .get("address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
    {
        out.insert("address".into(), json!({"formatted": format_address(a)}));
    }
    Ok(ok_json(&Value::Object(out)))
}

/// The first `telecom` value of a system (`email`, `phone`).
fn telecom(resource: &Value, system: &str) -> Option<String> {
    resource
        .get("telecom")?
        .as_array()?
        .iter()
        .find(|t| t.get("system").and_then(Value::as_str) == Some(system))?
        .get("value")?
        .as_str()
        .map(str::to_string)
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    match v.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Medplum's `formatHumanName`: prefix, given, family, suffix; or the `text`.
fn format_human_name(name: &Value) -> String {
    let mut parts = strings(name, "prefix");
    parts.extend(strings(name, "given"));
    parts.extend(strings(name, "family"));
    parts.extend(strings(name, "suffix"));
    let joined = parts
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if joined.is_empty() {
        name.get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    } else {
        joined
    }
}

/// Medplum's `formatAddress`: lines, then "city, state postalCode".
fn format_address(a: &Value) -> String {
    let mut parts = strings(a, "line");
    let mut locality = Vec::new();
    for k in ["city", "state", "postalCode"] {
        locality.extend(strings(a, k));
    }
    if !locality.is_empty() {
        parts.push(locality.join(", "));
    }
    let joined = parts.join(", ");
    if joined.is_empty() {
        a.get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    } else {
        joined
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` → unix seconds.
fn parse_instant(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

// === client authentication of /oauth2/introspect and /oauth2/revoke ===

/// RFC 6749 §5.2 `invalid_client`, 401.
fn invalid_client() -> ApiError {
    ApiError::OAuth {
        status: StatusCode::UNAUTHORIZED,
        error: "invalid_client",
        description: "Invalid client".into(),
    }
}

/// The body as a token form (form or JSON), for `presented_client`.
fn as_form(body: &Map<String, Value>) -> TokenForm {
    TokenForm::from_pairs(body.iter().filter_map(|(k, v)| match v {
        Value::String(s) => Some((k.clone(), s.clone())),
        Value::Bool(b) => Some((k.clone(), b.to_string())),
        _ => None,
    }))
}

/// Authenticates the calling client (assertion, Basic or body). A client with a secret must
/// present it (or a verified assertion); `public_ok` lets a client without a secret identify
/// itself by its id alone (RFC 7009 public clients). Returns the client id and its project.
async fn authenticate_client(
    state: &State,
    parts: &Parts,
    form: &TokenForm,
    public_ok: bool,
) -> Result<(String, Option<String>), ApiError> {
    let presented = presented_client(state, parts, form)
        .await
        .map_err(|_| invalid_client())?;
    let id = presented
        .id
        .filter(|s| !s.is_empty())
        .ok_or_else(invalid_client)?;
    let snap = state.snapshot();
    let client = snap.clients.get(&id).ok_or_else(invalid_client)?;
    if !client.active {
        return Err(invalid_client());
    }
    if !presented.assertion_verified {
        match presented.secret.as_deref().filter(|s| !s.is_empty()) {
            Some(secret) => {
                check_client_secret(state, client, secret).map_err(|_| invalid_client())?
            }
            None if public_ok && client.secret_hash.is_none() => {}
            None => return Err(invalid_client()),
        }
    }
    Ok((id, client.project_id.clone()))
}

/// A verified fhirgate token and its Login, when the token is still good: the Login exists, was
/// granted and is not revoked, and a refresh token's secret is the current one.
async fn live_token(state: &State, token: &str) -> Option<(Claims, LoginRecord)> {
    let claims = state.keyring().verify(token).ok()?;
    let login = state
        .store
        .login(claims.login_id.as_deref()?)
        .await
        .ok()??;
    if login.revoked || !login::is_granted(&login) {
        return None;
    }
    if let Some(secret) = claims.refresh_secret.as_deref() {
        let stored = login.refresh_secret.as_deref()?;
        if !hashes_equal(stored, &state.hash_secret(secret)) {
            return None;
        }
    }
    Some((claims, login))
}

// === /oauth2/introspect ===

/// `POST /oauth2/introspect` (RFC 7662): `{active: false}` for anything that is not a live
/// token of the calling client's project.
pub async fn introspect(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body).await?;
    let Some(token) = body_str(&body, "token") else {
        return Err(ApiError::Text(
            StatusCode::BAD_REQUEST,
            "Token to introspect must be provided",
        ));
    };
    let form = as_form(&body);
    let (_, client_project) = authenticate_client(&state, &parts, &form, false)
        .await
        .map_err(ApiError::into_oauth)?;
    let inactive = || ok_json(&json!({"active": false}));
    let Some((claims, login)) = live_token(&state, &token).await else {
        return Ok(inactive());
    };
    if client_project.is_none() || login.project_id != client_project {
        return Ok(inactive());
    }
    let snap = state.snapshot();
    let profile = login
        .membership_id
        .as_deref()
        .and_then(|m| snap.memberships.get(m))
        .and_then(|m| m.profile.reference.clone());
    let sub = claims.sub.clone().unwrap_or_else(|| {
        login
            .user_ref
            .split_once('/')
            .map(|(_, id)| id.to_string())
            .unwrap_or_default()
    });
    let mut out = json!({
        "active": true,
        "iat": claims.iat,
        "exp": claims.exp,
        "iss": claims.iss,
        "sub": sub,
        "scope": login.scope,
    });
    if let Some(c) = login.client_id.as_deref().or(claims.client_id.as_deref()) {
        out["client_id"] = Value::String(c.to_string());
    }
    if let Some(p) = profile.as_deref().and_then(|p| p.strip_prefix("Patient/")) {
        out["patient"] = Value::String(p.to_string());
    }
    Ok(ok_json(&out))
}

// === /oauth2/revoke ===

/// `POST /oauth2/revoke` (RFC 7009): revokes the Login of an access or refresh token issued to
/// the calling client. Answers 200 whatever the token was (§2.2).
pub async fn revoke_token(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = auth_body(&parts, body)
        .await
        .map_err(ApiError::into_oauth)?;
    let form = as_form(&body);
    let (client_id, _) = authenticate_client(&state, &parts, &form, true)
        .await
        .map_err(ApiError::into_oauth)?;
    let token = body_str(&body, "token").ok_or_else(|| ApiError::oauth("Missing token"))?;
    if let Some((_, login)) = live_token(&state, &token).await
        && login.client_id.as_deref() == Some(client_id.as_str())
    {
        login::revoke(&state, &login.id)
            .await
            .map_err(ApiError::into_oauth)?;
    }
    Ok((StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response())
}

// === /auth/revoke ===

/// `POST /auth/revoke {loginId}`: ends one of the caller's own sessions.
pub async fn auth_revoke(
    AxState(state): AxState<Arc<State>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = authenticate(&state, &parts).await?;
    let body = auth_body(&parts, body).await?;
    let login_id = body_str(&body, "loginId")
        .filter(|id| uuid::Uuid::parse_str(id).is_ok())
        .ok_or_else(|| ApiError::invalid("loginId", "Login ID is required."))?;
    let login = login::get_login(&state, &login_id).await?;
    // Someone else's session does not exist for this caller.
    if login.user_ref != caller.identity.user_ref {
        return Err(ApiError::not_found());
    }
    login::revoke(&state, &login.id).await?;
    Ok(outcome_response(&Outcome::AllOk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants() {
        assert_eq!(parse_instant("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_instant("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096)
        );
        assert_eq!(
            parse_instant("2024-02-29T13:34:56+01:00"),
            Some(1_709_210_096)
        );
        assert_eq!(parse_instant("yesterday"), None);
    }

    #[test]
    fn names_and_addresses() {
        assert_eq!(
            format_human_name(&json!({"given": ["Medplum"], "family": "Admin"})),
            "Medplum Admin"
        );
        assert_eq!(
            format_human_name(&json!({"prefix": ["Dr."], "given": ["A", "B"], "family": "C"})),
            "Dr. A B C"
        );
        assert_eq!(format_human_name(&json!({"text": "Ann"})), "Ann");
        assert_eq!(
            format_address(
                &json!({"line": ["1 Main St"], "city": "Springfield", "state": "IL", "postalCode": "62701"})
            ),
            "1 Main St, Springfield, IL, 62701"
        );
    }
}
