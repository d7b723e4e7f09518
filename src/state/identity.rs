//! Who is calling, once authenticated: what `auth` produces and a kept `standing` is derived
//! from. Its own module so that both depend on it and not on each other.

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `None` for Basic auth (no Login is created).
    pub login_id: Option<String>,
    pub membership_id: String,
    pub project_id: String,
    /// `ClientApplication/…`, `Practitioner/…`, …
    pub profile: String,
    /// `User/…` or `ClientApplication/…`.
    pub user_ref: String,
    pub client_id: Option<String>,
    /// The Login's scope; `None` (Basic) never narrows by SMART scopes.
    pub scope: Option<String>,
    /// The patient of the token's SMART launch context (`patient/` scopes reach only it).
    pub patient: Option<String>,
    /// Unix seconds after which this identity must be re-established.
    pub expires_at: i64,
    /// `profile` and `project_id` as header values, made once per identity.
    pub caller_headers: CallerHeaders,
}

/// The caller as the upstream hears of it (`X-Fhirgate-Profile`, `X-Fhirgate-Project`), made
/// once per identity instead of on every forwarded request. `None` for a value that is not
/// header-safe: the forwarder then sends the text, and pingora refuses it there, as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerHeaders {
    pub profile: Option<http::HeaderValue>,
    pub project: Option<http::HeaderValue>,
}

impl CallerHeaders {
    pub fn new(profile: &str, project: &str) -> CallerHeaders {
        CallerHeaders {
            profile: http::HeaderValue::from_str(profile).ok(),
            project: http::HeaderValue::from_str(project).ok(),
        }
    }
}
