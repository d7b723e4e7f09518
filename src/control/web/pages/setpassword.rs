//! The set-password page the invite and reset e-mails link to (`/auth/setpassword/:id/:secret`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;

use crate::control::web::error::ApiError;

pub(crate) enum PageView<'a> {
    Form {
        id: &'a str,
        secret: &'a str,
        error: Option<&'a str>,
    },
    Done,
    Used,
    Expired,
    Invalid,
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · fhirgate</title>
<style>
body{font-family:system-ui,sans-serif;background:#f4f6f8;color:#1b1f23;margin:0}
main{max-width:26rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002}
h1{font-size:1.4rem;margin-top:0}
label{display:block;font-weight:600;margin:1rem 0 .3rem}
input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;font-size:1rem;border:1px solid #8a949e;border-radius:4px}
input:focus,button:focus,a:focus{outline:3px solid #1f6feb;outline-offset:2px}
button{margin-top:1.5rem;width:100%;padding:.7rem;font-size:1rem;background:#1f6feb;color:#fff;border:0;border-radius:4px;cursor:pointer}
.hint{color:#4a545e;font-size:.9rem;margin:.3rem 0 0}
.error{color:#a40e26;background:#ffebe9;border:1px solid #ff8182;padding:.6rem;border-radius:4px}
</style>
</head>
<body>
<main>
<h1>{{ title }}</h1>
{% if view == "form" %}
{% if error %}<p class="error" role="alert" id="form-error">{{ error }}</p>{% endif %}
<form method="post" action="{{ base }}auth/setpassword">
<input type="hidden" name="id" value="{{ id }}">
<input type="hidden" name="secret" value="{{ secret }}">
<label for="password">New password</label>
<input type="password" id="password" name="password" autocomplete="new-password" required minlength="8" aria-describedby="password-hint{% if error %} form-error{% endif %}"{% if error %} aria-invalid="true"{% endif %} autofocus>
<p class="hint" id="password-hint">At least 8 characters.</p>
<label for="confirmPassword">Confirm new password</label>
<input type="password" id="confirmPassword" name="confirmPassword" autocomplete="new-password" required minlength="8">
<button type="submit">Set password</button>
</form>
{% else %}
<p{% if view != "done" %} role="alert"{% endif %}>{{ message }}</p>
{% endif %}
</main>
</body>
</html>
"#;

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    // `.html` names are auto-escaped: ids, secrets and error texts cannot inject markup.
    if let Err(e) = env.add_template("setpassword.html", PAGE) {
        tracing::error!(error = %e, "set-password page template is invalid");
    }
    env
});

pub(crate) fn page(status: StatusCode, base: &str, view: PageView<'_>) -> Response {
    let (kind, title, message) = match &view {
        PageView::Form { .. } => ("form", "Set your password", ""),
        PageView::Done => (
            "done",
            "Password set",
            "Your password has been set. You can now sign in with your e-mail address and the new password.",
        ),
        PageView::Used => (
            "used",
            "Link already used",
            "This link has already been used. Ask for a new password reset e-mail if you still need to set your password.",
        ),
        PageView::Expired => (
            "expired",
            "Link expired",
            "This link has expired. Ask for a new password reset e-mail.",
        ),
        PageView::Invalid => (
            "invalid",
            "Invalid link",
            "This link is not valid. Check that you copied the whole link from the e-mail.",
        ),
    };
    let (id, secret, error) = match view {
        PageView::Form { id, secret, error } => (id, secret, error),
        _ => ("", "", None),
    };
    let html = TEMPLATES.get_template("setpassword.html").and_then(|t| {
        t.render(minijinja::context! {
            view => kind, title => title, message => message, base => base,
            id => id, secret => secret, error => error,
        })
    });
    match html {
        Ok(html) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            html,
        )
            .into_response(),
        Err(e) => ApiError::internal("rendering the set-password page", e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_what_it_shows() {
        let r = page(
            StatusCode::OK,
            "http://h/",
            PageView::Form {
                id: "\"><script>",
                secret: "s",
                error: Some("<b>x</b>"),
            },
        );
        assert_eq!(r.status(), StatusCode::OK);
        let html = futures_body(r);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>x</b>"), "{html}");
        assert!(html.contains("&lt;b&gt;x&lt;"), "{html}");
        // The base URL is escaped too (`/` as `&#x2f;`, which the browser decodes).
        assert!(
            html.contains(r#"action="http:&#x2f;&#x2f;h&#x2f;auth/setpassword""#),
            "{html}"
        );
        assert!(html.contains(r#"<label for="password">"#), "{html}");
    }

    fn futures_body(r: Response) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let bytes = rt
            .block_on(axum::body::to_bytes(r.into_body(), 1 << 20))
            .unwrap_or_else(|e| panic!("body: {e}"));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
