//! Search index rows of the identity resources: the `(name, value)` pairs the store matches
//! searches against. Reference values are full references (`Project/123`); tokens and strings
//! are stored as given, except e-mail addresses, which are lower-cased (Medplum matches them
//! exactly, lower-cased).

use serde_json::Value;

fn reference(v: &Value) -> Option<&str> {
    v.get("reference")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn string<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn push(rows: &mut Vec<(String, String)>, name: &str, value: &str) {
    let row = (name.to_string(), value.to_string());
    if !rows.contains(&row) {
        rows.push(row);
    }
}

fn identifiers(rows: &mut Vec<(String, String)>, resource: &Value) {
    for ident in resource
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(value) = string(ident, "value") {
            push(rows, "identifier", value);
            if let Some(system) = string(ident, "system") {
                push(rows, "identifier", &format!("{system}|{value}"));
            }
        }
    }
}

/// The browser origins an active client names: those of its redirect URIs, launch URI and
/// `allowedOrigin` (what CORS admits by default). None for a client that is not active.
fn client_origins(client: &Value) -> Vec<String> {
    if !matches!(
        client.get("status").and_then(Value::as_str),
        None | Some("active")
    ) {
        return Vec::new();
    }
    ["redirectUris", "allowedOrigin"]
        .iter()
        .filter_map(|k| client.get(*k))
        .flat_map(|v| match v {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => vec![s.as_str()],
            _ => Vec::new(),
        })
        .chain(client.get("launchUri").and_then(Value::as_str))
        .filter_map(crate::state::origin_of)
        .collect()
}

/// The version of [`index_rows`]: a store indexed by an older one is indexed again at start.
pub const INDEX_VERSION: &str = "3";

/// The index rows of one resource.
pub fn index_rows(resource: &Value) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match resource_type {
        "ProjectMembership" => {
            if let Some(p) = resource.get("project").and_then(reference) {
                push(&mut rows, "project", p);
            }
            if let Some(u) = resource.get("user").and_then(reference) {
                push(&mut rows, "user", u);
            }
            if let Some(p) = resource.get("profile").and_then(reference) {
                push(&mut rows, "profile", p);
                if let Some((ty, _)) = p.split_once('/') {
                    push(&mut rows, "profile-type", ty);
                }
            }
            if let Some(a) = resource.get("accessPolicy").and_then(reference) {
                push(&mut rows, "access-policy", a);
            }
            for access in resource
                .get("access")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(a) = access.get("policy").and_then(reference) {
                    push(&mut rows, "access-policy", a);
                }
            }
            if let Some(e) = string(resource, "externalId") {
                push(&mut rows, "external-id", e);
            }
            if let Some(u) = string(resource, "userName") {
                push(&mut rows, "user-name", u);
            }
            identifiers(&mut rows, resource);
        }
        "ClientApplication" | "AccessPolicy" => {
            if let Some(n) = string(resource, "name") {
                push(&mut rows, "name", n);
            }
            identifiers(&mut rows, resource);
            if resource_type == "ClientApplication" {
                for origin in client_origins(resource) {
                    push(&mut rows, "origin", &origin);
                }
            }
        }
        "User" => {
            if let Some(e) = string(resource, "email") {
                push(&mut rows, "email", &e.to_lowercase());
            }
            if let Some(p) = resource.get("project").and_then(reference) {
                push(&mut rows, "project", p);
            }
            if let Some(e) = string(resource, "externalId") {
                push(&mut rows, "external-id", e);
            }
            identifiers(&mut rows, resource);
        }
        "Project" => {
            if let Some(n) = string(resource, "name") {
                push(&mut rows, "name", n);
            }
            if let Some(o) = resource.get("owner").and_then(reference) {
                push(&mut rows, "owner", o);
            }
            // Medplum's `google-client-id` search parameter: Google sign-in finds the project
            // of a Google client id by it.
            for site in resource
                .get("site")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(g) = string(site, "googleClientId") {
                    push(&mut rows, "google-client-id", g);
                }
            }
            identifiers(&mut rows, resource);
        }
        _ => {}
    }
    rows
}

/// How a search parameter of an identity type matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `Type/id`, or a bare id matching any type.
    Reference,
    /// Exact, case-sensitive (`system|value` allowed for identifiers).
    Token,
    /// Case-insensitive prefix.
    String,
}

/// The search parameters of each identity type.
pub fn param_kind(resource_type: &str, name: &str) -> Option<ParamKind> {
    use ParamKind::*;
    let kind = match (resource_type, name) {
        (_, "identifier") => Token,
        ("ProjectMembership", "project" | "user" | "profile" | "access-policy") => Reference,
        ("ProjectMembership", "profile-type" | "external-id" | "user-name") => Token,
        ("ClientApplication" | "AccessPolicy" | "Project", "name") => String,
        ("Project", "owner") => Reference,
        ("User", "email") => Token,
        ("User", "project") => Reference,
        ("User", "external-id") => Token,
        _ => return None,
    };
    Some(kind)
}

/// Does one index value match one search value?
pub fn value_matches(kind: ParamKind, name: &str, indexed: &str, wanted: &str) -> bool {
    match kind {
        ParamKind::Reference => {
            indexed == wanted
                || (!wanted.contains('/') && indexed.rsplit('/').next() == Some(wanted))
        }
        ParamKind::Token if name == "email" => indexed == wanted.to_lowercase(),
        ParamKind::Token => match wanted.strip_prefix('|') {
            Some(code) => indexed == code,
            None => indexed == wanted,
        },
        ParamKind::String => indexed.to_lowercase().starts_with(&wanted.to_lowercase()),
    }
}

#[cfg(test)]
mod tests;
