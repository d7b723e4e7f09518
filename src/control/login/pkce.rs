//! PKCE (RFC 7636): the parameter checks of a sign-in that starts a Login, the Login's PKCE
//! state, and the verifier check at code redemption.

use crate::state::ClientInfo;
use base64::Engine;

use crate::control::base::client_auth::is_public;
use crate::control::base::clients::client_flag;
use crate::control::web::error::ApiError;

/// Medplum's PKCE parameter checks of every sign-in that starts a Login (`/auth/login`,
/// `/auth/newuser`, external IdPs), skipped for `pkceOptional` clients.
pub(crate) fn check_client_pkce(
    client: Option<&ClientInfo>,
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(c) = client
        && is_public(c)
    {
        return check_public_pkce(challenge, method)
            .map_err(|text| ApiError::invalid("code_challenge_method", text));
    }
    if client.is_some_and(|c| client_flag(c, "pkceOptional")) {
        return Ok(());
    }
    check_pkce_params(challenge, method)
}

/// A public client proves nothing but its PKCE verifier, so it must send an S256 challenge
/// (SMART App Launch 2.2), whatever `pkceOptional` says.
pub(crate) fn check_public_pkce(
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<(), &'static str> {
    match (challenge, method) {
        (Some(_), Some("S256")) => Ok(()),
        _ => Err(PUBLIC_CLIENT_PKCE),
    }
}

/// Why a public client's request was refused.
pub(crate) const PUBLIC_CLIENT_PKCE: &str = "Public clients must use PKCE with S256";

fn check_pkce_params(challenge: Option<&str>, method: Option<&str>) -> Result<(), ApiError> {
    match (challenge, method) {
        (None, Some(_)) => Err(ApiError::invalid(
            "code_challenge",
            "Invalid code challenge",
        )),
        (Some(_), None) => Err(ApiError::invalid(
            "code_challenge_method",
            "Invalid code challenge method",
        )),
        (Some(_), Some(m)) if m != "plain" && m != "S256" => Err(ApiError::invalid(
            "code_challenge_method",
            "Invalid code challenge method",
        )),
        _ => Ok(()),
    }
}

/// A new Login's PKCE state: the challenge and its method, a bare challenge counting as plain.
pub(crate) fn pkce_state(
    challenge: Option<&str>,
    method: Option<&str>,
) -> (Option<String>, Option<String>) {
    // pkceOptional clients may send a bare challenge; Medplum then compares it as plain.
    match challenge {
        Some(c) => (
            Some(c.to_string()),
            Some(method.unwrap_or("plain").to_string()),
        ),
        None => (None, None),
    }
}

/// PKCE (RFC 7636): `plain` compares the strings, `S256` the unpadded base64url SHA-256 of the
/// verifier; both in constant time.
pub(crate) fn pkce_matches(method: &str, challenge: &str, verifier: &str) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let computed = match method {
        "plain" => verifier.to_string(),
        "S256" => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes())),
        _ => return false,
    };
    computed.len() == challenge.len() && bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_parameters() {
        assert!(check_pkce_params(None, None).is_ok());
        assert!(check_pkce_params(Some("x"), Some("S256")).is_ok());
        assert!(check_pkce_params(Some("x"), Some("plain")).is_ok());
        assert!(check_pkce_params(None, Some("S256")).is_err());
        assert!(check_pkce_params(Some("x"), None).is_err());
        assert!(check_pkce_params(Some("x"), Some("S512")).is_err());
    }

    #[test]
    fn pkce_plain_and_s256() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches("S256", challenge, verifier));
        assert!(!pkce_matches("S256", challenge, "wrong"));
        assert!(pkce_matches("plain", "xyz", "xyz"));
        assert!(!pkce_matches("plain", "xyz", "xyZ"));
        assert!(!pkce_matches("S512", challenge, verifier));
    }
}
