//! FHIR search of the identity resources: the parameters of `index`, with `:not`, `:missing`
//! and `:exact`, `_count` and `_offset`, under the caller's policy per resource.

use crate::state::State;
use axum::body::Body;
use axum::extract::{Path, State as AxState};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use fhirgate_core::fhir::request::Interaction;
use serde_json::{Value, json};

use crate::control::base::access::Caller;
use crate::control::base::access::authenticate;
use crate::control::base::index::ParamKind;
use crate::control::base::index::index_rows;
use crate::control::base::index::param_kind;
use crate::control::base::index::value_matches;
use crate::control::base::resources::present::fhir_base;
use crate::control::base::resources::present::present;
use crate::control::fhir::TypeClass;
use crate::control::fhir::classify;
use crate::control::fhir::granting;
use crate::control::fhir::require_type;
use crate::control::fhir::unstored;
use crate::control::web::AppState;
use crate::control::web::body::MAX_BODY;
use crate::control::web::body::json_response;
use crate::control::web::body::media_type;
use crate::control::web::body::query_pairs;
use crate::control::web::body::read_body;
use crate::control::web::error::ApiError;
use crate::control::web::error::FHIR_JSON;

const DEFAULT_COUNT: usize = 20;

const MAX_COUNT: usize = 1000;

const SEARCH_CANDIDATES: i64 = 10_000;

pub async fn search(
    AxState(state): AxState<AppState>,
    Path(resource_type): Path<String>,
    caller: Caller,
    uri: Uri,
) -> Result<Response, ApiError> {
    let params: Vec<(String, String)> = query_pairs(&uri);
    run_search(&state, &caller, &resource_type, params).await
}

/// `POST /fhir/R4/<Type>/_search` with a form body; any other POST on an instance is refused.
/// The one handler that authenticates after reading its body (as Medplum does): the caller is
/// not an extractor here.
pub async fn post_search(
    AxState(state): AxState<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    parts: Parts,
    body: Body,
) -> Result<Response, ApiError> {
    if id != "_search" {
        return Err(ApiError::MethodNotAllowed);
    }
    if media_type(&parts.headers).as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(ApiError::bad_request("Unsupported content type"));
    }
    let bytes = read_body(body, MAX_BODY).await?;
    let mut params: Vec<(String, String)> = query_pairs(&parts.uri);
    params.extend(form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), v.into_owned())));
    let caller = authenticate(&state, &parts).await?;
    run_search(&state, &caller, &resource_type, params).await
}

/// One parsed search filter.
struct Filter {
    name: String,
    kind: ParamKind,
    modifier: Modifier,
    values: Vec<String>,
}

impl Filter {
    fn matches(&self, rows: &[(String, String)]) -> bool {
        let mut indexed = rows
            .iter()
            .filter(|(n, _)| *n == self.name)
            .map(|(_, v)| v.as_str());
        match self.modifier {
            Modifier::Missing(missing) => indexed.next().is_none() == missing,
            Modifier::Not => !indexed.any(|i| {
                self.values
                    .iter()
                    .any(|w| value_matches(self.kind, &self.name, i, w))
            }),
            Modifier::Exact => indexed.any(|i| self.values.iter().any(|w| i == w)),
            Modifier::None => indexed.any(|i| {
                self.values
                    .iter()
                    .any(|w| value_matches(self.kind, &self.name, i, w))
            }),
        }
    }

    /// The exact index values the store can narrow by (positive filters only).
    fn store_values(&self) -> Option<Vec<String>> {
        if self.modifier != Modifier::None {
            return None;
        }
        match self.kind {
            ParamKind::Reference if self.values.iter().all(|v| v.contains('/')) => {
                Some(self.values.clone())
            }
            ParamKind::Token if self.name == "email" => {
                Some(self.values.iter().map(|v| v.to_lowercase()).collect())
            }
            ParamKind::Token if self.values.iter().all(|v| !v.starts_with('|')) => {
                Some(self.values.clone())
            }
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Modifier {
    None,
    Not,
    Exact,
    Missing(bool),
}

struct SearchRequest {
    filters: Vec<Filter>,
    ids: Option<Vec<String>>,
    count: usize,
    offset: usize,
    summary_count: bool,
}

fn parse_search(
    resource_type: &str,
    params: &[(String, String)],
) -> Result<SearchRequest, ApiError> {
    let mut req = SearchRequest {
        filters: Vec::new(),
        ids: None,
        count: DEFAULT_COUNT,
        offset: 0,
        summary_count: false,
    };
    for (raw_name, value) in params {
        let (name, modifier) = match raw_name.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (raw_name.as_str(), None),
        };
        match name {
            "_count" => {
                req.count = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("Invalid _count: {value}")))?
                    .min(MAX_COUNT);
                continue;
            }
            "_offset" => {
                req.offset = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("Invalid _offset: {value}")))?;
                continue;
            }
            "_summary" => {
                req.summary_count = value == "count";
                continue;
            }
            "_id" => {
                req.ids = Some(value.split(',').map(str::to_string).collect());
                continue;
            }
            // Accepted and ignored: results are ordered by last update, totals are always exact.
            "_sort"
            | "_total"
            | "_format"
            | "_pretty"
            | "_elements"
            | "_medplum-prompt-basic-auth" => continue,
            _ => {}
        }
        let kind = param_kind(resource_type, name)
            .ok_or_else(|| ApiError::bad_request(format!("Unknown search parameter: {name}")))?;
        let modifier = match modifier {
            None => Modifier::None,
            Some("not") => Modifier::Not,
            Some("exact") => Modifier::Exact,
            Some("missing") => match value.as_str() {
                "true" => Modifier::Missing(true),
                "false" => Modifier::Missing(false),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "Invalid value for {raw_name}"
                    )));
                }
            },
            Some(m) => {
                return Err(ApiError::bad_request(format!(
                    "Unsupported search modifier: {m}"
                )));
            }
        };
        let values: Vec<String> = value
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect();
        if values.is_empty() && !matches!(modifier, Modifier::Missing(_)) {
            continue;
        }
        req.filters.push(Filter {
            name: name.to_string(),
            kind,
            modifier,
            values,
        });
    }
    Ok(req)
}

async fn run_search(
    state: &State,
    caller: &Caller,
    resource_type: &str,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let stored_type = match classify(resource_type) {
        TypeClass::Stored => true,
        TypeClass::Unstored => {
            unstored(caller, resource_type, Interaction::Search)?;
            false
        }
        TypeClass::Unknown => return Err(ApiError::not_found()),
    };
    let mut matches = Vec::new();
    let mut summary_count = false;
    let mut count = DEFAULT_COUNT;
    let mut offset = 0;
    if stored_type {
        require_type(caller, resource_type, Interaction::Search)?;
        let req = parse_search(resource_type, &params)?;
        summary_count = req.summary_count;
        count = req.count;
        offset = req.offset;
        let narrowing: Vec<(String, Vec<String>)> = req
            .filters
            .iter()
            .filter_map(|f| f.store_values().map(|v| (f.name.clone(), v)))
            .collect();
        let project = if caller.super_admin() {
            None
        } else {
            Some(caller.project_id())
        };
        let candidates = state
            .store
            .search(resource_type, &narrowing, project, SEARCH_CANDIDATES)
            .await?;
        for stored in candidates {
            if let Some(ids) = &req.ids
                && !ids.contains(&stored.id)
            {
                continue;
            }
            let rows = index_rows(&stored.content);
            if !req.filters.iter().all(|f| f.matches(&rows)) {
                continue;
            }
            let Some(entry) = granting(caller, &stored, Interaction::Search) else {
                continue;
            };
            let body = present(caller, stored.content.clone(), entry);
            matches.push((stored.id, body));
        }
    }
    let base = fhir_base(state);
    let total = matches.len();
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let self_url = if query.is_empty() {
        format!("{base}{resource_type}")
    } else {
        format!("{base}{resource_type}?{query}")
    };
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
    });
    if !summary_count {
        let entries: Vec<Value> = matches
            .into_iter()
            .skip(offset)
            .take(count)
            .map(|(id, resource)| json!({"fullUrl": format!("{base}{resource_type}/{id}"), "resource": resource, "search": {"mode": "match"}}))
            .collect();
        if offset.saturating_add(count) < total {
            let mut next: Vec<(String, String)> = params
                .iter()
                .filter(|(k, _)| k != "_offset" && k != "_count")
                .cloned()
                .collect();
            next.push(("_count".into(), count.to_string()));
            next.push(("_offset".into(), (offset + count).to_string()));
            let q: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(next.iter())
                .finish();
            if let Some(links) = bundle["link"].as_array_mut() {
                links
                    .push(json!({"relation": "next", "url": format!("{base}{resource_type}?{q}")}));
            }
        }
        bundle["entry"] = Value::Array(entries);
    }
    Ok(json_response(StatusCode::OK, FHIR_JSON, &bundle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_parameters_are_parsed_with_modifiers() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let req = parse_search(
            "ProjectMembership",
            &p(&[
                ("profile-type:not", "Patient,Practitioner"),
                ("_count", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(req.count, 5);
        assert_eq!(req.filters.len(), 1);
        let rows = vec![("profile-type".to_string(), "ClientApplication".to_string())];
        assert!(req.filters[0].matches(&rows));
        let rows = vec![("profile-type".to_string(), "Patient".to_string())];
        assert!(!req.filters[0].matches(&rows));
        assert!(parse_search("ProjectMembership", &p(&[("nonsense", "x")])).is_err());
        assert!(parse_search("ProjectMembership", &p(&[("profile:above", "x")])).is_err());
        assert!(parse_search("ProjectMembership", &p(&[("_count", "-1")])).is_err());
    }
}
