//! The classified form of a FHIR request. `classify` (in `classify.rs`) produces it from raw
//! request parts; `policy::decide` consumes it. Anything that cannot be put in this form is
//! `Unclassifiable` and therefore denied.

use serde_json::Value;

use super::outcome::Outcome;

/// Medplum's policy interaction vocabulary (`AccessPolicy.resource.interaction`). A FHIR `patch`
/// is an `Update` here, as in Medplum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    Read,
    Vread,
    Update,
    Delete,
    History,
    Create,
    Search,
}

impl Interaction {
    pub const ALL: [Interaction; 7] = [
        Interaction::Read,
        Interaction::Vread,
        Interaction::Update,
        Interaction::Delete,
        Interaction::History,
        Interaction::Create,
        Interaction::Search,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
            Interaction::History => "history",
            Interaction::Create => "create",
            Interaction::Search => "search",
        }
    }

    pub fn parse(s: &str) -> Option<Interaction> {
        Interaction::ALL.into_iter().find(|i| i.as_str() == s)
    }

    /// Interactions a `readonly` entry still grants (docs/medplum-compat.md §4.3).
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            Interaction::Read | Interaction::Vread | Interaction::History | Interaction::Search
        )
    }
}

/// Raw request parts, as the gateway sees them. `path` is the part after `/fhir/R4/`, still
/// percent-encoded and without the query; `query` is the raw query string without `?`.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Header names are lower-case.
    pub headers: &'a [(&'a str, &'a str)],
    /// The request body, when the gateway read it (writes, `_search`, Bundles).
    pub body: Option<&'a [u8]>,
}

/// One search parameter as sent: name (with modifier or chain, e.g. `subject:Patient.name`) and
/// the raw, already percent-decoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryParam {
    pub name: String,
    pub value: String,
}

/// A search, from `GET Type?…`, `POST Type/_search`, a compartment search or `GET /?_type=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// `None` for a system-level search (`GET [base]?_type=…`).
    pub resource_type: Option<String>,
    /// `Patient/p1/Observation` → `Some(("Patient", "p1"))`.
    pub compartment: Option<(String, String)>,
    pub params: Vec<QueryParam>,
    /// The search came as `POST …/_search` with a form body.
    pub via_post: bool,
}

/// What one FHIR request does.
#[derive(Debug, Clone, PartialEq)]
pub enum FhirOp {
    Capabilities,
    Read {
        resource_type: String,
        id: String,
    },
    Vread {
        resource_type: String,
        id: String,
        version: String,
    },
    Create {
        resource_type: String,
        resource: Option<Value>,
        if_none_exist: Option<Vec<QueryParam>>,
    },
    Update {
        resource_type: String,
        id: String,
        resource: Option<Value>,
    },
    ConditionalUpdate {
        resource_type: String,
        criteria: Vec<QueryParam>,
        resource: Option<Value>,
    },
    /// `patch` carries the raw patch document (JSON Patch or FHIRPath Patch Parameters).
    Patch {
        resource_type: String,
        id: String,
        patch: Option<Value>,
    },
    ConditionalPatch {
        resource_type: String,
        criteria: Vec<QueryParam>,
        patch: Option<Value>,
    },
    Delete {
        resource_type: String,
        id: String,
    },
    ConditionalDelete {
        resource_type: String,
        criteria: Vec<QueryParam>,
    },
    Search(Search),
    /// Instance (`type` and `id`), type (`type` only) or system (neither) history.
    History {
        resource_type: Option<String>,
        id: Option<String>,
    },
    /// `$name` at system, type or instance level.
    Operation {
        name: String,
        resource_type: Option<String>,
        id: Option<String>,
    },
    /// A batch or transaction Bundle posted to the base; entries in order.
    Bundle {
        transaction: bool,
        entries: Vec<BundleEntry>,
    },
    GraphQl,
    /// A further page of an earlier search, by the server's handle (`[base]?_getpages=<id>`),
    /// with the gateway's seal on it if the link came with one; see [`super::page`].
    Page {
        handle: String,
        seal: Option<String>,
    },
}

/// One entry of a batch or transaction request Bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleEntry {
    /// The entry as classified, or why it could not be.
    pub op: Result<FhirOp, Unclassifiable>,
}

/// A classified request.
#[derive(Debug, Clone, PartialEq)]
pub struct FhirRequest {
    pub op: FhirOp,
    /// The client asked for a non-JSON representation (`_format` or `Accept`).
    pub wants_non_json: bool,
    /// The client asked for part of each resource (`_elements`, `_summary`).
    pub subset: Option<crate::fhir::subset::Subset>,
}

/// Why a request could not be classified. Every variant leads to a denial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unclassifiable {
    #[error("path is not a clean FHIR path")]
    BadPath,
    #[error("method override is not allowed")]
    MethodOverride,
    #[error("unknown resource type")]
    UnknownType,
    #[error("method not allowed for this path")]
    MethodNotAllowed,
    #[error("malformed body")]
    BadBody,
    #[error("malformed query")]
    BadQuery,
    #[error("unsupported request")]
    Unsupported,
}

impl Unclassifiable {
    /// The denial's stable label (metrics, audit).
    pub fn label(&self) -> &'static str {
        match self {
            Unclassifiable::BadPath => "bad_path",
            Unclassifiable::MethodOverride => "method_override",
            Unclassifiable::UnknownType => "unknown_type",
            Unclassifiable::MethodNotAllowed => "method_not_allowed",
            Unclassifiable::BadBody => "bad_body",
            Unclassifiable::BadQuery => "bad_query",
            Unclassifiable::Unsupported => "unsupported",
        }
    }

    /// The answer: 404 for an unknown type, 403 for an unsupported request, otherwise 400 with
    /// the error's text.
    pub fn outcome(&self) -> Outcome {
        match self {
            Unclassifiable::UnknownType => Outcome::NotFound,
            Unclassifiable::Unsupported => Outcome::Forbidden,
            other => Outcome::BadRequest(other.to_string()),
        }
    }
}

/// The "any resource type" marker in [`FhirOp::required_access`]: the request may reach
/// resources of types that cannot be known from the request alone (an `_include` without a
/// target type, a chain without a type modifier, a system search without `_type`, system
/// history). A policy must allow the interaction for every type (a `*` entry) to grant it.
pub const ANY_TYPE: &str = "*";

impl FhirOp {
    /// What the request needs at TYPE level, as `(resource type, interaction)` pairs without
    /// duplicates; the type may be [`ANY_TYPE`]. Every pair must be allowed.
    ///
    /// - read → `(T, Read)`; vread → `(T, Vread)`; delete → `(T, Delete)`;
    /// - create → `(T, Create)`, plus `(T, Search)` with `If-None-Exist` (it probes existence);
    /// - update and patch → `(T, Update)`; their conditional forms add `(T, Search)`;
    /// - conditional delete → `(T, Delete)` + `(T, Search)`;
    /// - search → see [`Search::required_access`]; conditional criteria and `If-None-Exist`
    ///   also add the types their parameters reach (`_has`, chains);
    /// - history → `(T, History)`, system history → `(*, History)`;
    /// - `Capabilities`, `Operation` and `GraphQl` → nothing: the policy engine decides
    ///   operations by name;
    /// - `Bundle` → nothing: every entry is decided on its own;
    /// - `Page` → nothing: the seal is the permission, and every resource on the page is checked.
    pub fn required_access(&self) -> Vec<(String, Interaction)> {
        super::search::op_required_access(self)
    }

    /// The answer is a Bundle the server makes for the request, whose links may hold page handles
    /// to seal (`fhir::page`): searches, histories, pages and operations (`$everything`).
    pub fn answers_with_pages(&self) -> bool {
        matches!(
            self,
            FhirOp::Search(_)
                | FhirOp::History { .. }
                | FhirOp::Page { .. }
                | FhirOp::Operation { .. }
        )
    }

    /// The resource type named by the path (`None` at system level, for Bundles and GraphQL).
    /// For a compartment search it is the searched type, not the compartment owner.
    pub fn resource_type(&self) -> Option<&str> {
        match self {
            FhirOp::Read { resource_type, .. }
            | FhirOp::Vread { resource_type, .. }
            | FhirOp::Create { resource_type, .. }
            | FhirOp::Update { resource_type, .. }
            | FhirOp::ConditionalUpdate { resource_type, .. }
            | FhirOp::Patch { resource_type, .. }
            | FhirOp::ConditionalPatch { resource_type, .. }
            | FhirOp::Delete { resource_type, .. }
            | FhirOp::ConditionalDelete { resource_type, .. } => Some(resource_type),
            FhirOp::Search(search) => search.resource_type.as_deref(),
            FhirOp::History { resource_type, .. } | FhirOp::Operation { resource_type, .. } => {
                resource_type.as_deref()
            }
            FhirOp::Capabilities
            | FhirOp::Bundle { .. }
            | FhirOp::GraphQl
            | FhirOp::Page { .. } => None,
        }
    }
}

impl Search {
    /// What the search needs at TYPE level, without duplicates:
    /// - `(T, Search)` for the searched type; a system search needs `(X, Search)` for each
    ///   `_type` value, or `(*, Search)` without `_type`;
    /// - a compartment search (`Patient/p1/Observation`) also needs `(Patient, Read)`;
    /// - `(X, Search)` for every type the parameters reach: `_include` targets
    ///   (`Observation:subject:Patient` → Patient; no target → `*`), `_revinclude` sources
    ///   (`Provenance:target` → Provenance), `_has:X:…` (nested too), chains (`subject:X.name`
    ///   → X; `subject.name` → `*`), `_list` → List, `_filter`/`_query` → `*`.
    ///   Parameters that cannot be analysed add `(*, Search)`.
    pub fn required_access(&self) -> Vec<(String, Interaction)> {
        super::search::search_required_access(self, |_| false)
    }

    /// The types the parameters reach beyond the searched one; see
    /// [`search::referenced_types`](super::search::referenced_types).
    pub fn referenced_types(&self) -> Result<Vec<String>, Unclassifiable> {
        super::search::referenced_types(&self.params)
    }
}
