//! Project isolation on a shared upstream (docs/contract.md §3 "Projects and upstreams"). Pure.
//!
//! A project bound to an upstream it shares with other projects sees only its own resources:
//! every resource written through the gateway for it carries a project marker (a `meta.tag`
//! coding in [`PROJECT_TAG_SYSTEM`] whose code is the project id) that the caller can neither
//! set, change nor remove, and every returned resource must carry it. The default project on
//! such an upstream sees the data that predates fhirgate (no marker) and never another
//! project's. A project alone on its upstream, and the super-admin project, see it as it is.

use serde_json::{Map, Value, json};

use crate::fhir::request::QueryParam;

/// The `meta.tag` system of the project marker.
pub const PROJECT_TAG_SYSTEM: &str = "https://fhirgate.dev/fhir/CodeSystem/project";

/// What a project sees of its upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Isolation {
    /// The upstream as it is: a project alone on its upstream, or the super-admin project
    /// (which may also write markers, to move data into a project).
    #[default]
    None,
    /// The default project on an upstream shared with tagged projects: resources without a
    /// marker or with its own; writes lose any marker a client set.
    Unmarked { project: String },
    /// Only resources carrying this project's marker; writes are stamped with it.
    Tag { project: String },
}

impl Isolation {
    /// Whether resources must be checked one by one (nothing streams untouched).
    pub fn is_active(&self) -> bool {
        !matches!(self, Isolation::None)
    }

    pub fn label(&self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Unmarked { .. } => "unmarked",
            Isolation::Tag { .. } => "tag",
        }
    }

    /// Whether a returned resource belongs to the caller's view.
    pub fn admits(&self, resource: &Value) -> bool {
        match self {
            Isolation::None => true,
            Isolation::Tag { project } => markers(resource).any(|code| code == Some(project)),
            Isolation::Unmarked { project } => markers(resource).all(|code| code == Some(project)),
        }
    }

    /// The search parameters that narrow an upstream search to the caller's view, when FHIR
    /// search can say it (`_tag=system|project`); empty otherwise.
    pub fn narrowing(&self) -> Vec<QueryParam> {
        match self {
            Isolation::Tag { project } => vec![QueryParam {
                name: "_tag".into(),
                value: format!("{PROJECT_TAG_SYSTEM}|{project}"),
            }],
            _ => Vec::new(),
        }
    }

    /// Whether an upstream search narrowed by [`Self::narrowing`] returns exactly the caller's
    /// view, so that `Bundle.total` counts nothing of another project.
    pub fn narrows_exactly(&self) -> bool {
        !matches!(self, Isolation::Unmarked { .. })
    }

    /// Prepares a resource about to be written: markers the client set are removed, and a
    /// `Tag` project's own is added. `None` leaves the resource as sent.
    pub fn stamp(&self, resource: &mut Value) {
        let project = match self {
            Isolation::None => return,
            Isolation::Unmarked { .. } => None,
            Isolation::Tag { project } => Some(project),
        };
        let Some(obj) = resource.as_object_mut() else {
            return;
        };
        let meta = obj
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        let Some(meta) = meta.as_object_mut() else {
            return;
        };
        for key in ["tag", "security"] {
            if let Some(Value::Array(list)) = meta.get_mut(key) {
                list.retain(|c| {
                    c.get("system").and_then(Value::as_str) != Some(PROJECT_TAG_SYSTEM)
                });
            }
        }
        if let Some(project) = project {
            let tags = meta
                .entry("tag")
                .or_insert_with(|| Value::Array(Vec::new()));
            if !tags.is_array() {
                *tags = Value::Array(Vec::new());
            }
            if let Some(list) = tags.as_array_mut() {
                list.push(json!({"system": PROJECT_TAG_SYSTEM, "code": project}));
            }
        }
        if meta
            .get("tag")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
        {
            meta.remove("tag");
        }
        if meta
            .get("security")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
        {
            meta.remove("security");
        }
        if meta.is_empty() {
            obj.remove("meta");
        }
    }
}

/// The codes of the project markers on a resource (`None` for a marker without a code), in
/// `meta.tag` and `meta.security`.
fn markers(resource: &Value) -> impl Iterator<Item = Option<&String>> {
    let meta = resource.get("meta");
    ["tag", "security"]
        .into_iter()
        .filter_map(move |k| meta.and_then(|m| m.get(k)).and_then(Value::as_array))
        .flatten()
        .filter(|c| c.get("system").and_then(Value::as_str) == Some(PROJECT_TAG_SYSTEM))
        .map(|c| match c.get("code") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(project: &str) -> Value {
        json!({"resourceType": "Patient", "id": "x",
            "meta": {"tag": [{"system": "http://other", "code": "a"},
                             {"system": PROJECT_TAG_SYSTEM, "code": project}]}})
    }

    #[test]
    fn each_mode_admits_its_view() {
        let plain = json!({"resourceType": "Patient", "id": "x"});
        let a = Isolation::Tag {
            project: "a".into(),
        };
        let default = Isolation::Unmarked {
            project: "d".into(),
        };
        assert!(a.admits(&tagged("a")));
        assert!(!a.admits(&tagged("b")));
        assert!(!a.admits(&plain));
        assert!(default.admits(&plain));
        assert!(default.admits(&tagged("d")));
        assert!(!default.admits(&tagged("a")));
        let codeless = json!({"resourceType": "Patient",
            "meta": {"security": [{"system": PROJECT_TAG_SYSTEM}]}});
        assert!(!default.admits(&codeless));
        assert!(!a.admits(&codeless));
        assert!(Isolation::None.admits(&tagged("b")));
    }

    #[test]
    fn stamping_replaces_forged_markers() {
        let a = Isolation::Tag {
            project: "a".into(),
        };
        let mut forged = tagged("b");
        forged["meta"]["security"] = json!([{"system": PROJECT_TAG_SYSTEM, "code": "b"}]);
        a.stamp(&mut forged);
        assert!(a.admits(&forged));
        assert!(
            !Isolation::Tag {
                project: "b".into()
            }
            .admits(&forged)
        );
        assert_eq!(forged["meta"]["tag"][0]["system"], "http://other");
        assert!(forged["meta"].get("security").is_none());

        let mut plain = json!({"resourceType": "Patient"});
        a.stamp(&mut plain);
        assert_eq!(
            plain["meta"]["tag"],
            json!([{"system": PROJECT_TAG_SYSTEM, "code": "a"}])
        );

        let default = Isolation::Unmarked {
            project: "d".into(),
        };
        let mut claim = tagged("a");
        default.stamp(&mut claim);
        assert_eq!(
            claim["meta"]["tag"],
            json!([{"system": "http://other", "code": "a"}])
        );
        let mut bare = json!({"resourceType": "Patient"});
        default.stamp(&mut bare);
        assert!(bare.get("meta").is_none());

        let mut kept = tagged("b");
        Isolation::None.stamp(&mut kept);
        assert_eq!(kept, tagged("b"));
    }

    #[test]
    fn narrowing_names_the_marker() {
        let a = Isolation::Tag {
            project: "a".into(),
        };
        let n = a.narrowing();
        assert_eq!(n[0].name, "_tag");
        assert_eq!(n[0].value, format!("{PROJECT_TAG_SYSTEM}|a"));
        assert!(
            Isolation::Unmarked {
                project: "d".into()
            }
            .narrowing()
            .is_empty()
        );
        assert!(
            !Isolation::Unmarked {
                project: "d".into()
            }
            .narrows_exactly()
        );
    }
}
