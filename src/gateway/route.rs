//! Which plane a request path belongs to (docs/contract.md §1). Pure; the request is not yet authenticated.

use fhirgate_core::fhir::types::is_control_type;

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
    /// The metric and audit labels, in [`Route::index`] order.
    pub const LABELS: [&'static str; 5] = ["control", "metadata", "fhir", "not_found", "bad_path"];

    pub fn index(&self) -> usize {
        match self {
            Route::Control => 0,
            Route::Metadata => 1,
            Route::Fhir { .. } => 2,
            Route::NotFound => 3,
            Route::BadPath => 4,
        }
    }

    pub fn as_str(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// True when a raw path has a segment that could change meaning after normalisation. Runs on
/// every request, so it compares bytes in place instead of lowercasing or searching copies.
fn is_unclean(path: &str) -> bool {
    let bytes = path.as_bytes();
    let encoded = |code: &[u8]| {
        bytes
            .windows(code.len())
            .any(|w| w.eq_ignore_ascii_case(code))
    };
    let escapes = bytes.contains(&b'%');
    if escapes && (encoded(b"%2f") || encoded(b"%5c") || encoded(b"%00")) || bytes.contains(&b'\\')
    {
        return true;
    }
    bytes.windows(2).any(|w| w == b"//") || bytes.split(|&b| b == b'/').any(is_dot_segment)
}

/// `.` or `..`, each dot possibly percent-encoded (`%2e`, any case).
fn is_dot_segment(seg: &[u8]) -> bool {
    fn strip_dot(s: &[u8]) -> Option<&[u8]> {
        match s {
            [b'.', rest @ ..] => Some(rest),
            [b'%', b'2', e, rest @ ..] if e.eq_ignore_ascii_case(&b'e') => Some(rest),
            _ => None,
        }
    }
    let Some(rest) = strip_dot(seg) else {
        return false;
    };
    rest.is_empty() || strip_dot(rest).is_some_and(<[u8]>::is_empty)
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
    let first = rest.split_once('/').map_or(rest, |(first, _)| first);
    if is_control_type(first) || first == ".well-known" {
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

    /// `is_unclean` compares in place; it must agree with the plain rule it replaced (lowercase,
    /// decode `%2e`, look for `.`/`..` segments and encoded separators) on every short path.
    #[test]
    fn in_place_check_agrees_with_the_lowercasing_rule() {
        fn reference(path: &str) -> bool {
            let lower = path.to_ascii_lowercase();
            if ["%2f", "%5c", "\\", "%00"]
                .iter()
                .any(|c| lower.contains(c))
            {
                return true;
            }
            path.contains("//")
                || path.split('/').any(|seg| {
                    let seg = seg.to_ascii_lowercase().replace("%2e", ".");
                    seg == "." || seg == ".."
                })
        }
        let alphabet = ['.', '%', '2', 'e', 'E', 'f', '5', 'c', '0', '/', '\\'];
        let mut paths = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = paths
                .iter()
                .filter(|p| p.len() == paths.last().map_or(0, String::len))
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(longer);
        }
        for p in &paths {
            let path = format!("/fhir/R4/{p}");
            assert_eq!(is_unclean(&path), reference(&path), "{path:?}");
        }
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
