//! The classified form of a FHIR request. `classify` (in `classify.rs`) produces it from raw
//! request parts; `policy::decide` consumes it. Anything that cannot be put in this form is
//! `Unclassifiable` and therefore denied.

use serde_json::Value;

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

    /// Interactions a `readonly` entry still grants (medplum-auth.md §4.3).
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
    Read { resource_type: String, id: String },
    Vread { resource_type: String, id: String, version: String },
    Create { resource_type: String, resource: Option<Value>, if_none_exist: Option<Vec<QueryParam>> },
    Update { resource_type: String, id: String, resource: Option<Value> },
    ConditionalUpdate { resource_type: String, criteria: Vec<QueryParam>, resource: Option<Value> },
    /// `patch` carries the raw patch document (JSON Patch or FHIRPath Patch Parameters).
    Patch { resource_type: String, id: String, patch: Option<Value> },
    ConditionalPatch { resource_type: String, criteria: Vec<QueryParam>, patch: Option<Value> },
    Delete { resource_type: String, id: String },
    ConditionalDelete { resource_type: String, criteria: Vec<QueryParam> },
    Search(Search),
    /// Instance (`type` and `id`), type (`type` only) or system (neither) history.
    History { resource_type: Option<String>, id: Option<String> },
    /// `$name` at system, type or instance level.
    Operation { name: String, resource_type: Option<String>, id: Option<String> },
    /// A batch or transaction Bundle posted to the base; entries in order.
    Bundle { transaction: bool, entries: Vec<BundleEntry> },
    GraphQl,
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
