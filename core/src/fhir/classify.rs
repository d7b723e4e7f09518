//! Classification of a raw FHIR request into a [`FhirRequest`].
//!
//! The rules are strict on purpose: whatever the gateway authorizes must be exactly what the
//! upstream will do, so anything ambiguous (a path an intermediary could normalise, a method
//! override, duplicate JSON keys, a non-JSON body, an unknown type) is [`Unclassifiable`] and
//! therefore denied.
//!
//! Routing (`T` a resource type, `id` a FHIR id, HEAD is routed like GET):
//!
//! | path                     | GET/HEAD                  | POST              | PUT               | PATCH            | DELETE             |
//! |--------------------------|---------------------------|-------------------|-------------------|------------------|--------------------|
//! | (base)                   | system search (needs a query) | batch/transaction | —             | —                | —                  |
//! | `metadata`               | capabilities              | —                 | —                 | —                | —                  |
//! | `_history`               | system history            | —                 | —                 | —                | —                  |
//! | `_search`                | —                         | system search     | —                 | —                | —                  |
//! | `$graphql`               | GraphQL                   | GraphQL           | —                 | —                | —                  |
//! | `$op`, `T/$op`, `T/id/$op` | operation               | operation         | —                 | —                | —                  |
//! | `T`                      | search                    | create            | conditional update | conditional patch | conditional delete |
//! | `T/_search`              | —                         | search (form)     | —                 | —                | —                  |
//! | `T/_history`             | type history              | —                 | —                 | —                | —                  |
//! | `T/id`                   | read                      | —                 | update            | patch            | delete             |
//! | `T/id/_history`          | instance history          | —                 | —                 | —                | —                  |
//! | `T/id/_history/vid`      | vread                     | —                 | —                 | —                | —                  |
//! | `C/id/T` (C a compartment) | compartment search      | —                 | —                 | —                | —                  |
//!
//! A "—" is [`Unclassifiable::MethodNotAllowed`]. Operation names are stored without the `$`.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use smallvec::SmallVec;

use super::path::{Segments, is_valid_id, is_valid_operation_name, parse_path};
use super::request::{
    BundleEntry, FhirOp, FhirRequest, QueryParam, RequestParts, Search, Unclassifiable,
};
use super::search::{parse_form_body, parse_query, referenced_types};
use super::types::{is_compartment_type, is_resource_type};

/// Headers that ask a server to treat the request as another method. Never honoured: their
/// presence alone refuses the request.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The query or form parameter that asks for another method. Refused like the headers.
pub const METHOD_OVERRIDE_PARAM: &str = "_method";

/// Parameters that shape or page a result but select nothing (compared without modifier, so
/// `_include:iterate` is one). Conditional writes and `If-None-Exist` need at least one other
/// parameter: `DELETE Patient?_count=1` would otherwise match every Patient.
pub const RESULT_PARAMS: [&str; 12] = [
    "_format",
    "_pretty",
    "_summary",
    "_elements",
    "_count",
    "_offset",
    "_sort",
    "_total",
    "_include",
    "_revinclude",
    "_contained",
    "_containedType",
];

const FORM_MEDIA_TYPE: &str = "application/x-www-form-urlencoded";

/// Classifies a request. Never panics; every input that is not a clean, understood FHIR request
/// is an [`Unclassifiable`].
///
/// Checks in order: path ([`parse_path`]) → method (`GET HEAD POST PUT PATCH DELETE`, exact
/// case) → method override headers → query ([`parse_query`]) and `_method` → header sanity
/// (at most one `If-None-Exist` and one `Content-Type`) → routing (see the module docs) → body.
pub fn classify(parts: &RequestParts) -> Result<FhirRequest, Unclassifiable> {
    let decoded = parse_path(parts.path)?;
    let segments = segment_refs(&decoded);
    let method = Method::parse(parts.method).ok_or(Unclassifiable::MethodNotAllowed)?;
    if parts.headers.iter().any(|(name, _)| {
        METHOD_OVERRIDE_HEADERS
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
    }) {
        return Err(Unclassifiable::MethodOverride);
    }
    let query = parse_query(parts.query.unwrap_or(""))?;
    reject_method_param(&query)?;
    let if_none_exist =
        single_header(parts.headers, "if-none-exist").ok_or(Unclassifiable::BadQuery)?;
    let content_type =
        single_header(parts.headers, "content-type").ok_or(Unclassifiable::BadBody)?;

    // A server may read a form body's parameters as the query's (HAPI does, for any POST): a
    // method override or a page handle there is refused as in the query.
    let form = match (content_type, parts.body) {
        (Some(ct), Some(body)) if media_type(ct) == FORM_MEDIA_TYPE => {
            let form = parse_form_body(body)?;
            reject_method_param(&form)?;
            refuse_page_handle(&form)?;
            Some(form)
        }
        _ => None,
    };
    let mut subset =
        crate::fhir::subset::requested(&query).map_err(|_| Unclassifiable::BadQuery)?;
    let mut wants_non_json = params_want_non_json(&query)
        || parts.headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && accept_wants_non_json(value)
        });

    let input = Input {
        method,
        segments: &segments,
        query,
        body: Body::Http {
            bytes: parts.body,
            content_type,
        },
        if_none_exist,
        in_bundle: false,
    };
    let op = route(&input)?;
    if !matches!(op, FhirOp::Page { .. }) {
        refuse_page_handle(&input.query)?;
    }
    // Only a search's form body is read for `_elements`/`_summary` (and taken after the checks):
    // elsewhere (an operation) the server would trim what the checks read.
    if !matches!(op, FhirOp::Search(_))
        && let Some(form) = &form
        && !matches!(crate::fhir::subset::requested(form), Ok(None))
    {
        return Err(Unclassifiable::Unsupported);
    }
    if let FhirOp::Search(search) = &op {
        wants_non_json |= params_want_non_json(&search.params);
        if let Some(s) =
            crate::fhir::subset::requested(&search.params).map_err(|_| Unclassifiable::BadQuery)?
        {
            subset = Some(s);
        }
    }
    Ok(FhirRequest {
        op,
        wants_non_json,
        subset,
    })
}

/// True when `value` (a `_format` value or a media type) names JSON: `json`,
/// `application/json`, `application/fhir+json`, `application/json+fhir` or `*/*`, ignoring case,
/// parameters (`;fhirVersion=4.0`) and a `+` decoded as a space.
pub fn is_json_format(value: &str) -> bool {
    let media = media_type(value).replace(' ', "+");
    matches!(
        media.as_str(),
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir" | "*/*"
    )
}

/// True when an `Accept` header value lists any media range other than a JSON form (ranges
/// with `q=0` are ignored). `*/*` counts as JSON; `application/*` does not.
pub fn accept_wants_non_json(value: &str) -> bool {
    value.split(',').any(|range| {
        let mut pieces = range.split(';');
        let media = pieces.next().unwrap_or("").trim();
        if media.is_empty() {
            return false;
        }
        let refused = pieces.any(|p| match p.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("q") => {
                v.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
            }
            _ => false,
        });
        !refused && !is_json_format(media)
    })
}

fn params_want_non_json(params: &[QueryParam]) -> bool {
    params
        .iter()
        .any(|p| p.name == "_format" && !is_json_format(&p.value))
}

fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn reject_method_param(params: &[QueryParam]) -> Result<(), Unclassifiable> {
    if params.iter().any(|p| p.name == METHOD_OVERRIDE_PARAM) {
        Err(Unclassifiable::MethodOverride)
    } else {
        Ok(())
    }
}

/// `Some(None)`: absent; `Some(Some(v))`: exactly one; `None`: repeated.
fn single_header<'a>(headers: &[(&'a str, &'a str)], name: &str) -> Option<Option<&'a str>> {
    let mut found = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v);
    let first = found.next();
    match found.next() {
        Some(_) => None,
        None => Some(first),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "HEAD" => Some(Method::Head),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "PATCH" => Some(Method::Patch),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    fn is_read(self) -> bool {
        matches!(self, Method::Get | Method::Head)
    }
}

enum Body<'a> {
    /// The HTTP request body, with its `Content-Type`.
    Http {
        bytes: Option<&'a [u8]>,
        content_type: Option<&'a str>,
    },
    /// A Bundle entry's `resource`.
    Entry(Option<&'a Value>),
}

struct Input<'a> {
    method: Method,
    segments: &'a [&'a str],
    query: Vec<QueryParam>,
    body: Body<'a>,
    /// `If-None-Exist` header, or `request.ifNoneExist` of a Bundle entry.
    if_none_exist: Option<&'a str>,
    in_bundle: bool,
}

/// The decoded segments as `&str`, for routing by slice patterns.
fn segment_refs<'a>(decoded: &'a Segments<'_>) -> SmallVec<[&'a str; 4]> {
    decoded.iter().map(|s| s.as_ref()).collect()
}

fn route(input: &Input) -> Result<FhirOp, Unclassifiable> {
    match input.segments {
        [] => route_base(input),
        [first, rest @ ..] if is_system_segment(first) => {
            if rest.is_empty() {
                route_system(first, input)
            } else {
                Err(Unclassifiable::Unsupported)
            }
        }
        [ty, rest @ ..] => {
            if !is_resource_type(ty) {
                return Err(Unclassifiable::UnknownType);
            }
            match rest {
                [] => route_type(ty, input),
                [second] => route_type_child(ty, second, input),
                [id, rest @ ..] => {
                    if !is_valid_id(id) {
                        return Err(Unclassifiable::BadPath);
                    }
                    match rest {
                        [third] => route_instance_child(ty, id, third, input),
                        ["_history", version] => route_vread(ty, id, version, input),
                        _ => Err(Unclassifiable::Unsupported),
                    }
                }
            }
        }
    }
}

fn is_system_segment(segment: &str) -> bool {
    segment == "metadata" || segment.starts_with('_') || segment.starts_with('$')
}

fn route_base(input: &Input) -> Result<FhirOp, Unclassifiable> {
    match input.method {
        Method::Get | Method::Head if !input.in_bundle => {
            match crate::fhir::page::page_request(&input.query) {
                Some(page) => page_op(page, &input.query),
                None => system_search(input.query.clone(), false),
            }
        }
        Method::Get | Method::Head => system_search(input.query.clone(), false),
        Method::Post if input.in_bundle => Err(Unclassifiable::Unsupported),
        Method::Post => classify_bundle(&input.body),
        Method::Put | Method::Patch | Method::Delete => Err(Unclassifiable::MethodNotAllowed),
    }
}

fn route_system(segment: &str, input: &Input) -> Result<FhirOp, Unclassifiable> {
    match segment {
        "metadata" if input.method.is_read() => Ok(FhirOp::Capabilities),
        "_history" if input.method.is_read() => Ok(FhirOp::History {
            resource_type: None,
            id: None,
        }),
        "_search" if input.method == Method::Post => {
            system_search(search_post_params(input)?, true)
        }
        "$graphql" if input.method.is_read() || input.method == Method::Post => Ok(FhirOp::GraphQl),
        "metadata" | "_history" | "_search" | "$graphql" => Err(Unclassifiable::MethodNotAllowed),
        op if op.starts_with('$') => operation(op, None, None, input),
        _ => Err(Unclassifiable::Unsupported),
    }
}

fn route_type(ty: &str, input: &Input) -> Result<FhirOp, Unclassifiable> {
    match input.method {
        Method::Get | Method::Head => type_search(ty, None, input.query.clone(), false),
        Method::Post => {
            let resource = resource_body(&input.body, ty, None)?;
            let if_none_exist = match input.if_none_exist {
                Some(raw) => Some(parse_if_none_exist(ty, raw)?),
                None => None,
            };
            Ok(FhirOp::Create {
                resource_type: ty.to_string(),
                resource,
                if_none_exist,
            })
        }
        Method::Put => {
            let criteria = conditional_criteria(input)?;
            let resource = resource_body(&input.body, ty, None)?;
            Ok(FhirOp::ConditionalUpdate {
                resource_type: ty.to_string(),
                criteria,
                resource,
            })
        }
        Method::Patch => {
            let criteria = conditional_criteria(input)?;
            let patch = patch_body(&input.body)?;
            Ok(FhirOp::ConditionalPatch {
                resource_type: ty.to_string(),
                criteria,
                patch,
            })
        }
        Method::Delete => {
            let criteria = conditional_criteria(input)?;
            Ok(FhirOp::ConditionalDelete {
                resource_type: ty.to_string(),
                criteria,
            })
        }
    }
}

fn route_type_child(ty: &str, segment: &str, input: &Input) -> Result<FhirOp, Unclassifiable> {
    match segment {
        "_search" if input.method == Method::Post => {
            type_search(ty, None, search_post_params(input)?, true)
        }
        "_history" if input.method.is_read() => Ok(FhirOp::History {
            resource_type: Some(ty.to_string()),
            id: None,
        }),
        "_search" | "_history" => Err(Unclassifiable::MethodNotAllowed),
        op if op.starts_with('$') => operation(op, Some(ty), None, input),
        id if !is_valid_id(id) => Err(Unclassifiable::BadPath),
        id => {
            let resource_type = ty.to_string();
            let id = id.to_string();
            match input.method {
                Method::Get | Method::Head => Ok(FhirOp::Read { resource_type, id }),
                Method::Put => {
                    let resource = resource_body(&input.body, ty, Some(&id))?;
                    Ok(FhirOp::Update {
                        resource_type,
                        id,
                        resource,
                    })
                }
                Method::Patch => {
                    let patch = patch_body(&input.body)?;
                    Ok(FhirOp::Patch {
                        resource_type,
                        id,
                        patch,
                    })
                }
                Method::Delete => Ok(FhirOp::Delete { resource_type, id }),
                Method::Post => Err(Unclassifiable::MethodNotAllowed),
            }
        }
    }
}

fn route_instance_child(
    ty: &str,
    id: &str,
    segment: &str,
    input: &Input,
) -> Result<FhirOp, Unclassifiable> {
    match segment {
        "_history" if input.method.is_read() => Ok(FhirOp::History {
            resource_type: Some(ty.to_string()),
            id: Some(id.to_string()),
        }),
        "_history" => Err(Unclassifiable::MethodNotAllowed),
        op if op.starts_with('$') => operation(op, Some(ty), Some(id), input),
        other if other == "*" || other.starts_with('_') => Err(Unclassifiable::Unsupported),
        target if is_resource_type(target) => {
            if !is_compartment_type(ty) {
                return Err(Unclassifiable::Unsupported);
            }
            if !input.method.is_read() {
                return Err(Unclassifiable::MethodNotAllowed);
            }
            type_search(target, Some((ty, id)), input.query.clone(), false)
        }
        _ => Err(Unclassifiable::UnknownType),
    }
}

fn route_vread(ty: &str, id: &str, version: &str, input: &Input) -> Result<FhirOp, Unclassifiable> {
    if !is_valid_id(version) {
        return Err(Unclassifiable::BadPath);
    }
    if !input.method.is_read() {
        return Err(Unclassifiable::MethodNotAllowed);
    }
    Ok(FhirOp::Vread {
        resource_type: ty.to_string(),
        id: id.to_string(),
        version: version.to_string(),
    })
}

fn operation(
    segment: &str,
    ty: Option<&str>,
    id: Option<&str>,
    input: &Input,
) -> Result<FhirOp, Unclassifiable> {
    let name = segment.strip_prefix('$').unwrap_or(segment);
    if !is_valid_operation_name(name) {
        return Err(Unclassifiable::BadPath);
    }
    if !(input.method.is_read() || input.method == Method::Post) {
        return Err(Unclassifiable::MethodNotAllowed);
    }
    Ok(FhirOp::Operation {
        name: name.to_string(),
        resource_type: ty.map(str::to_string),
        id: id.map(str::to_string),
    })
}

/// A page request carries its handle once, and nothing a server could read as more than
/// "that page" ([`crate::fhir::page::PAGE_PARAMS`]).
fn page_op(
    (handle, seal): (&str, Option<&str>),
    params: &[QueryParam],
) -> Result<FhirOp, Unclassifiable> {
    let once = |name: &str| params.iter().filter(|p| p.name == name).count() <= 1;
    let known = params
        .iter()
        .all(|p| crate::fhir::page::PAGE_PARAMS.contains(&p.name.as_str()));
    let bundle_type_ok = params
        .iter()
        .filter(|p| p.name == "_bundletype")
        .all(|p| crate::fhir::page::PAGE_BUNDLE_TYPES.contains(&p.value.as_str()));
    if !known
        || !bundle_type_ok
        || handle.is_empty()
        || !once(crate::fhir::page::HANDLE_PARAM)
        || !once(crate::fhir::page::SEAL_PARAM)
    {
        return Err(Unclassifiable::Unsupported);
    }
    Ok(FhirOp::Page {
        handle: handle.to_string(),
        seal: seal.map(str::to_string),
    })
}

/// A page handle anywhere but in a page request (`Patient?_getpages=…`, a batch entry, a POSTed
/// search) is refused: a server may hand out the page and ignore the rest of the query.
fn refuse_page_handle(params: &[QueryParam]) -> Result<(), Unclassifiable> {
    if params
        .iter()
        .any(|p| p.name == crate::fhir::page::HANDLE_PARAM)
    {
        return Err(Unclassifiable::Unsupported);
    }
    Ok(())
}

fn system_search(params: Vec<QueryParam>, via_post: bool) -> Result<FhirOp, Unclassifiable> {
    if params.is_empty() {
        return Err(Unclassifiable::Unsupported);
    }
    referenced_types(&params)?;
    Ok(FhirOp::Search(Search {
        resource_type: None,
        compartment: None,
        params,
        via_post,
    }))
}

fn type_search(
    ty: &str,
    compartment: Option<(&str, &str)>,
    params: Vec<QueryParam>,
    via_post: bool,
) -> Result<FhirOp, Unclassifiable> {
    referenced_types(&params)?;
    Ok(FhirOp::Search(Search {
        resource_type: Some(ty.to_string()),
        compartment: compartment.map(|(t, i)| (t.to_string(), i.to_string())),
        params,
        via_post,
    }))
}

/// URL parameters followed by the form body's (`POST …/_search`).
fn search_post_params(input: &Input) -> Result<Vec<QueryParam>, Unclassifiable> {
    let mut params = input.query.clone();
    if let Body::Http {
        bytes: Some(bytes),
        content_type,
    } = &input.body
        && !bytes.is_empty()
    {
        if let Some(ct) = content_type
            && media_type(ct) != FORM_MEDIA_TYPE
        {
            return Err(Unclassifiable::BadBody);
        }
        let form = parse_form_body(bytes)?;
        reject_method_param(&form)?;
        params.extend(form);
    }
    Ok(params)
}

fn has_selecting_param(params: &[QueryParam]) -> bool {
    params
        .iter()
        .any(|p| !RESULT_PARAMS.contains(&p.name.split(':').next().unwrap_or("")))
}

fn conditional_criteria(input: &Input) -> Result<Vec<QueryParam>, Unclassifiable> {
    if !has_selecting_param(&input.query) {
        return Err(Unclassifiable::MethodNotAllowed);
    }
    referenced_types(&input.query)?;
    Ok(input.query.clone())
}

/// `If-None-Exist: a=b&c=d`; a `?` or `T?` prefix (T the created type) is accepted.
fn parse_if_none_exist(ty: &str, raw: &str) -> Result<Vec<QueryParam>, Unclassifiable> {
    let raw = raw.trim();
    let query = match raw.split_once('?') {
        Some((prefix, query)) if prefix.is_empty() || prefix == ty => query,
        Some(_) => return Err(Unclassifiable::BadQuery),
        None => raw,
    };
    let params = parse_query(query)?;
    reject_method_param(&params)?;
    if !has_selecting_param(&params) {
        return Err(Unclassifiable::BadQuery);
    }
    referenced_types(&params)?;
    Ok(params)
}

fn is_form_content(body: &Body) -> bool {
    matches!(body, Body::Http { content_type: Some(ct), .. } if media_type(ct) == FORM_MEDIA_TYPE)
}

/// The JSON document of an HTTP body, `None` when absent or blank.
fn http_json(bytes: Option<&[u8]>) -> Result<Option<Value>, Unclassifiable> {
    match bytes {
        None => Ok(None),
        Some(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(None),
        Some(b) => parse_json_strict(b)
            .map(Some)
            .ok_or(Unclassifiable::BadBody),
    }
}

/// The resource of a create or update: a JSON object whose `resourceType` is `ty` and, for an
/// update, whose `id` (when present) is the path id.
fn resource_body(body: &Body, ty: &str, id: Option<&str>) -> Result<Option<Value>, Unclassifiable> {
    if is_form_content(body) {
        return Err(Unclassifiable::BadBody);
    }
    let value = match body {
        Body::Http { bytes, .. } => http_json(*bytes)?,
        Body::Entry(resource) => resource.cloned(),
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let object = value.as_object().ok_or(Unclassifiable::BadBody)?;
    if object.get("resourceType").and_then(Value::as_str) != Some(ty) {
        return Err(Unclassifiable::BadBody);
    }
    if let Some(expected) = id {
        match object.get("id") {
            None => {}
            Some(Value::String(actual)) if actual == expected => {}
            Some(_) => return Err(Unclassifiable::BadBody),
        }
    }
    Ok(Some(value))
}

/// A patch document: a JSON Patch array, or FHIRPath Patch `Parameters`. In a Bundle entry, a
/// JSON Patch comes as a `Binary` (`contentType` `application/json-patch+json`, base64 `data`).
fn patch_body(body: &Body) -> Result<Option<Value>, Unclassifiable> {
    if is_form_content(body) {
        return Err(Unclassifiable::BadBody);
    }
    let value = match body {
        Body::Http { bytes, .. } => http_json(*bytes)?,
        Body::Entry(None) => None,
        Body::Entry(Some(resource)) => Some(entry_patch(resource)?),
    };
    match value {
        None => Ok(None),
        Some(value) if is_valid_patch(&value) => Ok(Some(value)),
        Some(_) => Err(Unclassifiable::BadBody),
    }
}

fn entry_patch(resource: &Value) -> Result<Value, Unclassifiable> {
    let object = resource.as_object().ok_or(Unclassifiable::BadBody)?;
    match object.get("resourceType").and_then(Value::as_str) {
        Some("Parameters") => Ok(resource.clone()),
        Some("Binary") => {
            let content_type = object
                .get("contentType")
                .and_then(Value::as_str)
                .unwrap_or("");
            if media_type(content_type) != "application/json-patch+json" {
                return Err(Unclassifiable::BadBody);
            }
            let data = object
                .get("data")
                .and_then(Value::as_str)
                .ok_or(Unclassifiable::BadBody)?;
            let bytes = decode_base64(data).ok_or(Unclassifiable::BadBody)?;
            let patch = parse_json_strict(&bytes).ok_or(Unclassifiable::BadBody)?;
            if patch.is_array() {
                Ok(patch)
            } else {
                Err(Unclassifiable::BadBody)
            }
        }
        _ => Err(Unclassifiable::BadBody),
    }
}

const JSON_PATCH_OPS: [&str; 6] = ["add", "remove", "replace", "move", "copy", "test"];

fn is_valid_patch(value: &Value) -> bool {
    match value {
        Value::Array(ops) => ops.iter().all(|op| {
            op.get("op")
                .and_then(Value::as_str)
                .is_some_and(|o| JSON_PATCH_OPS.contains(&o))
                && op.get("path").and_then(Value::as_str).is_some()
        }),
        Value::Object(object) => {
            object.get("resourceType").and_then(Value::as_str) == Some("Parameters")
        }
        _ => false,
    }
}

/// Standard or URL-safe base64, padding optional, ASCII whitespace ignored.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 3);
    let mut buffer: u32 = 0;
    let mut bits: u32 = 0;
    let mut padding = 0usize;
    for b in input.bytes() {
        if b.is_ascii_whitespace() {
            continue;
        }
        if b == b'=' {
            padding += 1;
            continue;
        }
        if padding > 0 {
            return None;
        }
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((buffer >> bits) & 0xff) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    if bits >= 6 || padding > 2 {
        return None;
    }
    Some(out)
}

fn classify_bundle(body: &Body) -> Result<FhirOp, Unclassifiable> {
    let Body::Http { bytes, .. } = body else {
        return Err(Unclassifiable::Unsupported);
    };
    if is_form_content(body) {
        return Err(Unclassifiable::BadBody);
    }
    let value = http_json(*bytes)?.ok_or(Unclassifiable::BadBody)?;
    let object = value.as_object().ok_or(Unclassifiable::BadBody)?;
    if object.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Unclassifiable::BadBody);
    }
    let transaction = match object.get("type").and_then(Value::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        _ => return Err(Unclassifiable::BadBody),
    };
    let entries = match object.get("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries
            .iter()
            .map(|entry| BundleEntry {
                op: classify_entry(entry),
            })
            .collect(),
        Some(_) => return Err(Unclassifiable::BadBody),
    };
    Ok(FhirOp::Bundle {
        transaction,
        entries,
    })
}

/// One Bundle entry: `request.method`, `request.url` (relative to the base, with an optional
/// query), `request.ifNoneExist` (POST only) and `resource`.
fn classify_entry(entry: &Value) -> Result<FhirOp, Unclassifiable> {
    let entry = entry.as_object().ok_or(Unclassifiable::BadBody)?;
    let request = entry
        .get("request")
        .and_then(Value::as_object)
        .ok_or(Unclassifiable::BadBody)?;
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or(Unclassifiable::BadBody)?;
    let method = Method::parse(method).ok_or(Unclassifiable::MethodNotAllowed)?;
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or(Unclassifiable::BadBody)?;
    let resource = entry.get("resource").filter(|r| !r.is_null());
    if resource
        .and_then(|r| r.get("resourceType"))
        .and_then(Value::as_str)
        == Some("Bundle")
    {
        return Err(Unclassifiable::Unsupported);
    }
    if url.split(['/', '?']).next().unwrap_or("").contains(':') {
        // An absolute URL (`http://…`, `urn:…`): not relative to this base.
        return Err(Unclassifiable::Unsupported);
    }
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let decoded = parse_path(path)?;
    let segments = segment_refs(&decoded);
    let query = parse_query(query)?;
    reject_method_param(&query)?;
    refuse_page_handle(&query)?;
    let if_none_exist = match request.get("ifNoneExist") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if method == Method::Post => Some(s.as_str()),
        Some(_) => return Err(Unclassifiable::BadBody),
    };
    route(&Input {
        method,
        segments: &segments,
        query,
        body: Body::Entry(resource),
        if_none_exist,
        in_bundle: true,
    })
}

/// Parses JSON, refusing duplicate object keys anywhere (the gateway and the upstream could
/// otherwise see different documents). `None` on any error.
fn parse_json_strict(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice::<StrictValue>(bytes)
        .ok()
        .map(|v| v.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value without duplicate keys")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests;
