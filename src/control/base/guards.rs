//! Checks that ask a service outside fhirgate, on the self-service endpoints: reCAPTCHA
//! (`/auth/newuser`, `/auth/resetpassword`; docs/medplum-compat.md §2.18) and the breached-password
//! range API (HaveIBeenPwned's k-anonymity protocol: only the first five hex digits of the
//! password's SHA-1 leave the process). Both are off until configured; the calls are
//! `outbound`'s.

use crate::state::State;
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};
use std::time::Duration;

use crate::control::base::outbound;
use crate::control::web::ControlState;
use crate::control::web::body::body_str;
use crate::control::web::error::ApiError;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A range answer lists about a thousand suffixes (~40 KB); padded answers stay well under this.
const MAX_BODY: usize = 512 * 1024;

/// The reCAPTCHA secret that applies to a request body: the server's own when the body names
/// no site key or the server's site key; else the secret of the project site (in `projectId`'s
/// project when given, else in any project) that has that key. `None`: no check.
fn recaptcha_secret(state: &State, body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let config = &state.config.recaptcha;
    let site_key = body_str(body, "recaptchaSiteKey").filter(|k| !k.is_empty());
    let Some(site_key) = site_key.filter(|k| Some(k) != config.site_key.as_ref()) else {
        return Ok(config.secret_key.as_ref().map(|s| s.0.clone()));
    };
    let project_id = body_str(body, "projectId").filter(|p| p != "new");
    let snap = state.snapshot();
    let site = snap
        .projects
        .values()
        .filter(|p| project_id.as_ref().is_none_or(|id| *id == p.id))
        .flat_map(|p| p.content["site"].as_array().into_iter().flatten())
        .find(|s| s["recaptchaSiteKey"].as_str() == Some(site_key.as_str()))
        .ok_or_else(|| ApiError::bad_request("Invalid recaptchaSiteKey"))?;
    match site["recaptchaSecretKey"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        Some(secret) => Ok(Some(secret.to_string())),
        None => Err(ApiError::bad_request("Invalid recaptchaSecretKey")),
    }
}

/// docs/medplum-compat.md §2.18: with a secret in force, the body's `recaptchaToken` must be present
/// and verified by the siteverify service.
pub async fn check_recaptcha(
    state: &ControlState,
    body: &Map<String, Value>,
    remote_ip: Option<&str>,
) -> Result<(), ApiError> {
    let Some(secret) = recaptcha_secret(state, body)? else {
        return Ok(());
    };
    let token = body_str(body, "recaptchaToken")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("Recaptcha token is required"))?;
    let failed = || ApiError::bad_request("Recaptcha failed");
    let mut form = vec![("secret", secret.as_str()), ("response", token.as_str())];
    if let Some(ip) = remote_ip {
        form.push(("remoteip", ip));
    }
    let resp = state
        .outbound
        .post(&state.config.recaptcha.verify_url)
        .timeout(TIMEOUT)
        .form(&form)
        .send()
        .await
        .map_err(|_| failed())?;
    if !resp.status().is_success() {
        return Err(failed());
    }
    let answer: Value = outbound::read_bounded(resp, MAX_BODY)
        .await
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(failed)?;
    if answer["success"] == Value::Bool(true) {
        Ok(())
    } else {
        Err(failed())
    }
}

/// Whether the range answer (`SUFFIX:COUNT` lines) lists `suffix` with a count above zero
/// (padding lines have count 0).
fn range_lists(answer: &str, suffix: &str) -> bool {
    answer.lines().any(|line| {
        line.trim().split_once(':').is_some_and(|(s, count)| {
            s.eq_ignore_ascii_case(suffix) && count.trim().parse::<u64>().is_ok_and(|c| c > 0)
        })
    })
}

/// Refuses a password that the configured range service lists as breached. An unreachable or
/// garbled service refuses too (503): a password that could not be checked is not accepted.
pub async fn check_not_breached(
    state: &ControlState,
    field: &str,
    password: &str,
) -> Result<(), ApiError> {
    let Some(base) = &state.config.pwned_passwords_url else {
        return Ok(());
    };
    let digest = hex::encode_upper(Sha1::digest(password.as_bytes()));
    let (prefix, suffix) = digest.split_at(5);
    let unavailable =
        || ApiError::Outcome(fhirgate_core::fhir::outcome::Stock::BreachCheckUnavailable.outcome());
    let resp = state
        .outbound
        .get(format!("{}/range/{prefix}", base.trim_end_matches('/')))
        .timeout(TIMEOUT)
        .header("add-padding", "true")
        .send()
        .await
        .map_err(|_| unavailable())?;
    if !resp.status().is_success() {
        return Err(unavailable());
    }
    let body = outbound::read_bounded(resp, MAX_BODY)
        .await
        .ok_or_else(unavailable)?;
    let answer = String::from_utf8(body).map_err(|_| unavailable())?;
    if range_lists(&answer, suffix) {
        return Err(ApiError::invalid(field, BREACHED));
    }
    Ok(())
}

pub const BREACHED: &str = "Password found in breach database";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_answers_are_read_by_suffix_and_count() {
        let answer = "0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n00D4F6E8FA6EECAD2A3AA415EEC418D38EC:2\r\nFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF:0";
        assert!(range_lists(answer, "00d4f6e8fa6eecad2a3aa415eec418d38ec"));
        assert!(range_lists(answer, "0018A45C4D1DEF81644B54AB7F969B88D65"));
        // Padding (count 0), absence and garbage are not listings.
        assert!(!range_lists(answer, "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"));
        assert!(!range_lists(answer, "1111111111111111111111111111111111A"));
        assert!(!range_lists("garbage\n:\n", "garbage"));
    }

    #[test]
    fn only_the_prefix_leaves() {
        // "password" is 5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8.
        let digest = hex::encode_upper(Sha1::digest(b"password"));
        assert_eq!(digest.split_at(5).0, "5BAA6");
    }
}
