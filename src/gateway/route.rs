//! Which plane a request path belongs to (SPEC §1). Pure; the request is not yet authenticated.

/// Identity resources that live in fhirgate's store and are served by the control API.
pub const CONTROL_FHIR_TYPES: [&str; 10] = [
    "Project",
    "ProjectMembership",
    "User",
    "ClientApplication",
    "AccessPolicy",
    "Login",
    "JsonWebKey",
    "DomainConfiguration",
    "IdentityProvider",
    "UserSecurityRequest",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Proxied to the control API unchanged.
    Control,
    /// `GET /fhir/R4/metadata`: public, forwarded upstream.
    Metadata,
    /// Any other FHIR path; `rest` is what follows `/fhir/R4/` (still percent-encoded).
    Fhir { rest: String },
    /// Not a path fhirgate serves.
    NotFound,
    /// A path with dot segments, empty segments or encoded separators.
    BadPath,
}

impl Route {
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Control => "control",
            Route::Metadata => "metadata",
            Route::Fhir { .. } => "fhir",
            Route::NotFound => "not_found",
            Route::BadPath => "bad_path",
        }
    }
}

/// True when a raw path has a segment that could change meaning after normalisation.
fn is_unclean(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains('\\')
        || lower.contains("%00")
    {
        return true;
    }
    path.contains("//")
        || path.split('/').any(|seg| {
            let seg = seg.to_ascii_lowercase().replace("%2e", ".");
            seg == "." || seg == ".."
        })
}

pub fn route(method: &str, path: &str) -> Route {
    if !path.starts_with('/') || is_unclean(path) {
        return Route::BadPath;
    }
    let path = path
        .strip_prefix("/api")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    for prefix in ["/auth/", "/oauth2/", "/admin/", "/.well-known/"] {
        if path.starts_with(prefix) {
            return Route::Control;
        }
    }
    let Some(rest) = path.strip_prefix("/fhir/R4/") else {
        if path == "/fhir/R4" {
            return Route::Fhir {
                rest: String::new(),
            };
        }
        return Route::NotFound;
    };
    let first = rest.split('/').next().unwrap_or("");
    if CONTROL_FHIR_TYPES.contains(&first) || first == ".well-known" {
        return Route::Control;
    }
    if rest == "metadata" && (method == "GET" || method == "HEAD") {
        return Route::Metadata;
    }
    Route::Fhir {
        rest: rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(method: &str, path: &str, expected: Route) {
        assert_eq!(route(method, path), expected, "{method} {path}");
    }

    #[test]
    fn routes_follow_the_spec() {
        check("POST", "/oauth2/token", Route::Control);
        check("POST", "/api/oauth2/token", Route::Control);
        check("GET", "/auth/me", Route::Control);
        check("GET", "/.well-known/jwks.json", Route::Control);
        check(
            "GET",
            "/fhir/R4/.well-known/smart-configuration",
            Route::Control,
        );
        check("GET", "/fhir/R4/AccessPolicy/x", Route::Control);
        check("GET", "/fhir/R4/ProjectMembership", Route::Control);
        check(
            "POST",
            "/fhir/R4/ClientApplication/c1/$rotate-secret",
            Route::Control,
        );
        check("GET", "/fhir/R4/metadata", Route::Metadata);
        check(
            "POST",
            "/fhir/R4/metadata",
            Route::Fhir {
                rest: "metadata".into(),
            },
        );
        check(
            "GET",
            "/fhir/R4/Patient/p1",
            Route::Fhir {
                rest: "Patient/p1".into(),
            },
        );
        check(
            "POST",
            "/fhir/R4/",
            Route::Fhir {
                rest: String::new(),
            },
        );
        check("GET", "/somewhere", Route::NotFound);
    }

    #[test]
    fn tricky_paths_never_reach_a_plane() {
        check("GET", "/fhir/R4/Patient/../AccessPolicy", Route::BadPath);
        check(
            "GET",
            "/fhir/R4/Patient/%2e%2e/AccessPolicy",
            Route::BadPath,
        );
        check("GET", "/fhir/R4/Patient%2Fp1", Route::BadPath);
        check("GET", "/fhir/R4//Patient", Route::BadPath);
        check("GET", "/api/../fhir/R4/Patient", Route::BadPath);
        check("GET", "/fhir/R4/Patient/./p1", Route::BadPath);
        check("GET", "fhir/R4/Patient", Route::BadPath);
    }
}
