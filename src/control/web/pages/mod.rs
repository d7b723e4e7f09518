//! The server-rendered pages of the sign-in flow (`/oauth2/authorize`): plain HTML forms that
//! work without JavaScript, one small inline stylesheet, templates auto-escaped by minijinja
//! (every value is HTML-escaped unless a template marks it safe, which only the stylesheet is).
//!
//! Each page is sent with a Content-Security-Policy that allows nothing but that stylesheet
//! (by hash), `data:` images (the MFA QR code), and form posts to this server and to the
//! client's redirect URI (browsers apply `form-action` to the redirect that follows a post).

pub mod setpassword;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use minijinja::Environment;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

use crate::control::web::error::ApiError;

const CSS: &str = include_str!("style.css");

const TEMPLATES: [(&str, &str); 9] = [
    ("layout.html", include_str!("layout.html")),
    ("signin.html", include_str!("signin.html")),
    ("mfa.html", include_str!("mfa.html")),
    ("enroll.html", include_str!("enroll.html")),
    ("profile.html", include_str!("profile.html")),
    ("consent.html", include_str!("consent.html")),
    ("patient.html", include_str!("patient.html")),
    ("message.html", include_str!("message.html")),
    ("continue.html", include_str!("continue.html")),
];

static ENV: LazyLock<Result<Environment<'static>, String>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(env)
});

/// `'sha256-…'` of the inline stylesheet, for `style-src`.
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS.as_bytes()))
    )
});

/// A hidden form field.
#[derive(Debug, Clone, Serialize)]
pub struct Hidden {
    pub name: &'static str,
    pub value: String,
}

impl Hidden {
    pub fn new(name: &'static str, value: impl Into<String>) -> Hidden {
        Hidden {
            name,
            value: value.into(),
        }
    }
}

/// One option of a page's radio list (a profile, a patient): its value, its label and a detail
/// line under it.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub id: String,
    pub label: String,
    pub detail: String,
}

/// What every page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    pub title: &'static str,
    pub client_name: Option<String>,
    pub error: Option<String>,
    /// Where the form posts: the page's own URL, relative, so `/api/oauth2/authorize` works too.
    pub action: &'static str,
    pub hidden: Vec<Hidden>,
}

/// Renders `template` with `frame` and the page's own fields.
pub fn render(template: &str, frame: &Frame, page: &impl Serialize) -> Result<String, ApiError> {
    let env = ENV
        .as_ref()
        .map_err(|e| ApiError::internal("page templates", e))?;
    let t = env
        .get_template(template)
        .map_err(|e| ApiError::internal("page template", e))?;
    // Earlier maps win: the stylesheet cannot be overridden by a page's fields.
    let ctx = minijinja::value::merge_maps([
        minijinja::context! { css => CSS },
        minijinja::Value::from(minijinja::value::Serde(frame)),
        minijinja::Value::from(minijinja::value::Serde(page)),
    ]);
    t.render(ctx)
        .map_err(|e| ApiError::internal("rendering a page", e))
}

/// The policy of a page whose forms may lead (by redirect) to `redirect_uri`.
pub fn content_security_policy(redirect_uri: Option<&str>) -> String {
    let mut form_action = String::from("'self'");
    if let Some(target) = redirect_uri.and_then(origin_source) {
        form_action.push(' ');
        form_action.push_str(&target);
    }
    format!(
        "default-src 'none'; style-src {}; img-src data:; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'",
        *STYLE_HASH
    )
}

/// `csp` opened to Google Identity Services, whose script draws the "Sign in with Google"
/// button in a frame of its own: exactly its script, frame, calls and style sheet, and this
/// server's own script that hands the credential to the form.
pub fn with_google_sign_in(csp: &str) -> String {
    const GSI: &str = "https://accounts.google.com/gsi/";
    let csp = csp.replacen("style-src ", &format!("style-src {GSI}style "), 1);
    format!("{csp}; script-src 'self' {GSI}client; frame-src {GSI}; connect-src {GSI}")
}

/// A CSP source expression for the origin of `uri`: `https://app.example:8443`, or `myapp:` for
/// a private-use scheme (native apps). Nothing for what cannot be said safely in a header.
fn origin_source(uri: &str) -> Option<String> {
    let url = url::Url::parse(uri).ok()?;
    let source = match url.origin() {
        url::Origin::Tuple(..) => url.origin().ascii_serialization(),
        url::Origin::Opaque(_) => format!("{}:", url.scheme()),
    };
    source
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'\'')
        .then_some(source)
}

/// An HTML response with the page headers and any cookies to set.
pub fn html_response(status: StatusCode, html: String, csp: &str, cookies: &[String]) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

#[cfg(test)]
mod tests;
