//! The OAuth form of `/oauth2/token`, `/oauth2/introspect` and `/oauth2/revoke`.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::{Map, Value};
use std::collections::HashMap;

use crate::control::web::body::media_type;
use crate::control::web::body::read_body;
use crate::control::web::error::ApiError;

/// Largest OAuth form the token endpoint reads.
const MAX_FORM: usize = 64 * 1024;

/// The parsed form. A parameter sent twice is refused (RFC 6749 §3.2).
pub(crate) struct TokenForm(HashMap<String, String>);

impl TokenForm {
    pub(crate) fn parse(bytes: &[u8]) -> Result<TokenForm, ApiError> {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(bytes) {
            if map.insert(k.into_owned(), v.into_owned()).is_some() {
                return Err(ApiError::oauth("Duplicate parameter"));
            }
        }
        Ok(TokenForm(map))
    }

    /// A form from parameters already parsed (e.g. a JSON body's strings).
    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> TokenForm {
        TokenForm(pairs.into_iter().collect())
    }

    /// A non-empty parameter.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// The token endpoint's form as an extractor: `application/x-www-form-urlencoded` only (plain
/// 400 otherwise), bounded, each parameter once.
pub(crate) struct OAuthForm(pub(crate) TokenForm);

impl<S: Send + Sync> FromRequest<S> for OAuthForm {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<OAuthForm, ApiError> {
        let (parts, body) = req.into_parts();
        if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(ApiError::Text(
                StatusCode::BAD_REQUEST,
                "Unsupported content type",
            ));
        }
        let bytes = read_body(body, MAX_FORM).await?;
        TokenForm::parse(&bytes).map(OAuthForm)
    }
}

/// The body as a token form (form or JSON), for `presented_client`.
pub(crate) fn as_form(body: &Map<String, Value>) -> TokenForm {
    TokenForm::from_pairs(body.iter().filter_map(|(k, v)| match v {
        Value::String(s) => Some((k.clone(), s.clone())),
        Value::Bool(b) => Some((k.clone(), b.to_string())),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_parameters_are_refused() {
        assert!(TokenForm::parse(b"grant_type=a&grant_type=b").is_err());
        let f = TokenForm::parse(b"grant_type=client_credentials&scope=").unwrap();
        assert_eq!(f.get("grant_type"), Some("client_credentials"));
        assert_eq!(f.get("scope"), None);
    }
}
