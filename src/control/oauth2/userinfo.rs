//! `GET|POST /oauth2/userinfo` (docs/medplum-compat.md §2.14): claims about the caller, by the scope of
//! its Login.

use axum::extract::State as AxState;
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::control::base::access::Caller;
use crate::control::base::resources::fields::joined_strings;
use crate::control::base::upstream::profile_resource;
use crate::control::base::users::read_user;
use crate::control::web::AppState;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;
use fhirgate_core::policy::scope::has_word;

/// `GET|POST /oauth2/userinfo`: claims about the caller, by the scope of its Login.
pub async fn userinfo(
    AxState(state): AxState<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
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
    let profile = profile_resource(&state, &caller).await;
    let user = read_user(&state, &caller.identity.user_ref)
        .await?
        .map(|u| u.content);
    if wants("profile") {
        let name = profile
            .get("name")
            .and_then(Value::as_array)
            .and_then(|a| a.first());
        let given = joined_strings(name.and_then(|n| n.get("given")));
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
    or_text(joined, name)
}

/// `joined`, or the value's own `text` when nothing was joined.
fn or_text(joined: String, value: &Value) -> String {
    if joined.is_empty() {
        value
            .get("text")
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
    or_text(parts.join(", "), a)
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
