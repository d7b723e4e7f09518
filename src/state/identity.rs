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
}
