//! AccessPolicy criteria (`Type?param=value&…`): parsing, validation against the R4 search
//! parameter definitions, in-memory matching (medplum-auth.md §4.6) and the query parameters that
//! narrow an upstream search.
//!
//! STUB: the real implementation replaces this file; the public API below is the contract.

use serde_json::Value;

use crate::fhir::request::QueryParam;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CriteriaError {
    #[error("criteria must start with `{0}?`")]
    WrongType(String),
    #[error("unknown search parameter `{0}`")]
    UnknownParameter(String),
    #[error("unsupported criteria: {0}")]
    Unsupported(String),
}

/// A parsed, validated criteria string.
#[derive(Debug, Clone, PartialEq)]
pub struct Criteria {
    resource_type: String,
    params: Vec<QueryParam>,
}

impl Criteria {
    /// Parses `Type?a=b&c=d` for an entry whose `resourceType` is `entry_type` (`*` allowed:
    /// then the criteria must start with `*?`).
    pub fn parse(entry_type: &str, criteria: &str) -> Result<Criteria, CriteriaError> {
        let prefix = format!("{entry_type}?");
        let Some(query) = criteria.strip_prefix(&prefix) else {
            return Err(CriteriaError::WrongType(entry_type.to_string()));
        };
        let params = form_urlencoded::parse(query.as_bytes())
            .map(|(n, v)| QueryParam { name: n.into_owned(), value: v.into_owned() })
            .collect();
        Ok(Criteria { resource_type: entry_type.to_string(), params })
    }

    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// True when `resource` satisfies every filter.
    pub fn matches(&self, _resource: &Value) -> bool {
        false
    }

    /// Search parameters to append to an upstream search of `resource_type` so that the upstream
    /// only returns what these criteria allow.
    pub fn query_params(&self) -> &[QueryParam] {
        &self.params
    }
}
