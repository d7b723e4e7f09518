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

use super::path::{is_valid_id, is_valid_operation_name, parse_path};
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
    let segments = parse_path(parts.path)?;
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
    segments: &'a [String],
    query: Vec<QueryParam>,
    body: Body<'a>,
    /// `If-None-Exist` header, or `request.ifNoneExist` of a Bundle entry.
    if_none_exist: Option<&'a str>,
    in_bundle: bool,
}

fn route(input: &Input) -> Result<FhirOp, Unclassifiable> {
    let segments: Vec<&str> = input.segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
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
    let segments = parse_path(path)?;
    let query = parse_query(query)?;
    reject_method_param(&query)?;
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
mod tests {
    use super::super::request::Interaction;
    use super::*;
    use Unclassifiable::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn classify_raw(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<FhirRequest, Unclassifiable> {
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        classify(&RequestParts {
            method,
            path,
            query,
            headers,
            body,
        })
    }

    fn qp(name: &str, value: &str) -> QueryParam {
        QueryParam {
            name: name.to_string(),
            value: value.to_string(),
        }
    }

    fn qps(params: &[(&str, &str)]) -> Vec<QueryParam> {
        params.iter().map(|(n, v)| qp(n, v)).collect()
    }

    fn read(ty: &str, id: &str) -> FhirOp {
        FhirOp::Read {
            resource_type: ty.into(),
            id: id.into(),
        }
    }

    fn search(ty: &str, params: &[(&str, &str)]) -> FhirOp {
        FhirOp::Search(Search {
            resource_type: Some(ty.into()),
            compartment: None,
            params: qps(params),
            via_post: false,
        })
    }

    fn post_search(ty: Option<&str>, params: &[(&str, &str)]) -> FhirOp {
        FhirOp::Search(Search {
            resource_type: ty.map(str::to_string),
            compartment: None,
            params: qps(params),
            via_post: true,
        })
    }

    fn system_search(params: &[(&str, &str)]) -> FhirOp {
        FhirOp::Search(Search {
            resource_type: None,
            compartment: None,
            params: qps(params),
            via_post: false,
        })
    }

    fn compartment(owner: &str, id: &str, ty: &str, params: &[(&str, &str)]) -> FhirOp {
        FhirOp::Search(Search {
            resource_type: Some(ty.into()),
            compartment: Some((owner.into(), id.into())),
            params: qps(params),
            via_post: false,
        })
    }

    fn history(ty: Option<&str>, id: Option<&str>) -> FhirOp {
        FhirOp::History {
            resource_type: ty.map(str::to_string),
            id: id.map(str::to_string),
        }
    }

    fn op(name: &str, ty: Option<&str>, id: Option<&str>) -> FhirOp {
        FhirOp::Operation {
            name: name.into(),
            resource_type: ty.map(str::to_string),
            id: id.map(str::to_string),
        }
    }

    /// One row: method, URL (path after `/fhir/R4/` plus `?query`), headers, body, expected op.
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
        Result<FhirOp, Unclassifiable>,
    );

    type Headers<'a> = &'a [(&'a str, &'a str)];

    /// Method, URL, headers, body, expected `wants_non_json`.
    type FormatRow<'a> = (&'a str, &'a str, Headers<'a>, Option<&'a str>, bool);

    /// `(transaction, entries)` or the Bundle-level error.
    type BundleExpectation = Result<(bool, Vec<Result<FhirOp, Unclassifiable>>), Unclassifiable>;

    fn check(row: Row) {
        let (method, url, headers, body, expected) = row;
        let got = classify_raw(method, url, headers, body.map(str::as_bytes)).map(|r| r.op);
        assert_eq!(
            got, expected,
            "{method} {url:?} headers={headers:?} body={body:?}"
        );
    }

    #[test]
    fn routing_table() {
        let patient = r#"{"resourceType":"Patient","id":"p1","active":true}"#;
        let patient_json = json!({"resourceType":"Patient","id":"p1","active":true});
        let new_patient = json!({"resourceType":"Patient","active":true});
        let json_patch = r#"[{"op":"replace","path":"/active","value":false}]"#;
        let form: &[(&str, &str)] = &[("content-type", "application/x-www-form-urlencoded")];
        let table: Vec<Row> = vec![
            // Capabilities
            ("GET", "metadata", &[], None, Ok(FhirOp::Capabilities)),
            ("HEAD", "metadata", &[], None, Ok(FhirOp::Capabilities)),
            (
                "GET",
                "metadata?mode=full",
                &[],
                None,
                Ok(FhirOp::Capabilities),
            ),
            ("POST", "metadata", &[], None, Err(MethodNotAllowed)),
            ("DELETE", "metadata", &[], None, Err(MethodNotAllowed)),
            ("GET", "metadata/x", &[], None, Err(Unsupported)),
            // read / vread
            ("GET", "Patient/p1", &[], None, Ok(read("Patient", "p1"))),
            ("HEAD", "Patient/p1", &[], None, Ok(read("Patient", "p1"))),
            (
                "GET",
                "Patient/p1?_elements=name",
                &[],
                None,
                Ok(read("Patient", "p1")),
            ),
            (
                "GET",
                "Patient/a-b.c",
                &[],
                None,
                Ok(read("Patient", "a-b.c")),
            ),
            (
                "GET",
                "AccessPolicy/ap1",
                &[],
                None,
                Ok(read("AccessPolicy", "ap1")),
            ),
            (
                "GET",
                "Patient/p1/_history/3",
                &[],
                None,
                Ok(FhirOp::Vread {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    version: "3".into(),
                }),
            ),
            (
                "PUT",
                "Patient/p1/_history/3",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            (
                "DELETE",
                "Patient/p1/_history/3",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            ("GET", "Patient/p1/_history/3_", &[], None, Err(BadPath)),
            (
                "GET",
                "Patient/p1/_history/3/x",
                &[],
                None,
                Err(Unsupported),
            ),
            ("GET", "Patient/p_1", &[], None, Err(BadPath)),
            ("GET", "Patient/p@1", &[], None, Err(BadPath)),
            ("GET", "Patient/", &[], None, Err(BadPath)),
            ("POST", "Patient/p1", &[], None, Err(MethodNotAllowed)),
            // unknown types, letter case
            ("GET", "patient/p1", &[], None, Err(UnknownType)),
            ("GET", "PATIENT/p1", &[], None, Err(UnknownType)),
            ("GET", "Patients", &[], None, Err(UnknownType)),
            ("GET", "IdentityProvider/x", &[], None, Err(UnknownType)),
            ("GET", "Resource/x", &[], None, Err(UnknownType)),
            ("GET", "_foo", &[], None, Err(Unsupported)),
            // create
            (
                "POST",
                "Patient",
                &[],
                Some(patient),
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: Some(patient_json.clone()),
                    if_none_exist: None,
                }),
            ),
            (
                "POST",
                "Patient",
                &[],
                None,
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: None,
                }),
            ),
            (
                "POST",
                "Patient",
                &[],
                Some("  "),
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: None,
                }),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "identifier=http://h.org/mrn|MRN-1001")],
                Some(r#"{"resourceType":"Patient","active":true}"#),
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: Some(new_patient.clone()),
                    if_none_exist: Some(qps(&[("identifier", "http://h.org/mrn|MRN-1001")])),
                }),
            ),
            (
                "POST",
                "Patient",
                &[("If-None-Exist", "Patient?identifier=a%7Cb&active=true")],
                None,
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: Some(qps(&[("identifier", "a|b"), ("active", "true")])),
                }),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "?identifier=x")],
                None,
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: Some(qps(&[("identifier", "x")])),
                }),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "Observation?code=x")],
                None,
                Err(BadQuery),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "")],
                None,
                Err(BadQuery),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "_format=json")],
                None,
                Err(BadQuery),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "a=%zz")],
                None,
                Err(BadQuery),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "_method=GET")],
                None,
                Err(MethodOverride),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "a=1"), ("if-none-exist", "b=2")],
                None,
                Err(BadQuery),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "_has:Nope:subject:code=x")],
                None,
                Err(UnknownType),
            ),
            ("POST", "Patient", &[], Some("{"), Err(BadBody)),
            ("POST", "Patient", &[], Some("<Patient/>"), Err(BadBody)),
            ("POST", "Patient", &[], Some("[]"), Err(BadBody)),
            (
                "POST",
                "Patient",
                &[],
                Some(r#"{"active":true}"#),
                Err(BadBody),
            ),
            (
                "POST",
                "Patient",
                &[],
                Some(r#"{"resourceType":"Observation"}"#),
                Err(BadBody),
            ),
            (
                "POST",
                "Patient",
                &[],
                Some(r#"{"resourceType":"AccessPolicy"}"#),
                Err(BadBody),
            ),
            (
                "POST",
                "Patient",
                &[],
                Some(r#"{"resourceType":"Patient","resourceType":"AccessPolicy"}"#),
                Err(BadBody),
            ),
            (
                "POST",
                "Patient",
                &[],
                Some(r#"{"resourceType":"Patient","meta":{"a":1,"a":2}}"#),
                Err(BadBody),
            ),
            ("POST", "Patient", form, Some(""), Err(BadBody)),
            ("POST", "Patient", form, Some("name=x"), Err(BadBody)),
            (
                "POST",
                "Patient",
                &[("content-type", "application/fhir+json")],
                Some(patient),
                Ok(FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: Some(patient_json.clone()),
                    if_none_exist: None,
                }),
            ),
            // update
            (
                "PUT",
                "Patient/p1",
                &[],
                Some(patient),
                Ok(FhirOp::Update {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    resource: Some(patient_json.clone()),
                }),
            ),
            (
                "PUT",
                "Patient/p1",
                &[],
                Some(r#"{"resourceType":"Patient","active":true}"#),
                Ok(FhirOp::Update {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    resource: Some(new_patient.clone()),
                }),
            ),
            (
                "PUT",
                "Patient/p1",
                &[],
                None,
                Ok(FhirOp::Update {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    resource: None,
                }),
            ),
            ("PUT", "Patient/p2", &[], Some(patient), Err(BadBody)),
            (
                "PUT",
                "Patient/p1",
                &[],
                Some(r#"{"resourceType":"Patient","id":1}"#),
                Err(BadBody),
            ),
            ("PUT", "Observation/p1", &[], Some(patient), Err(BadBody)),
            ("PUT", "Patient/p1", &[], Some("not json"), Err(BadBody)),
            // conditional update
            (
                "PUT",
                "Patient?identifier=a%7Cb",
                &[],
                Some(patient),
                Ok(FhirOp::ConditionalUpdate {
                    resource_type: "Patient".into(),
                    criteria: qps(&[("identifier", "a|b")]),
                    resource: Some(patient_json.clone()),
                }),
            ),
            ("PUT", "Patient", &[], Some(patient), Err(MethodNotAllowed)),
            (
                "PUT",
                "Patient?_format=json",
                &[],
                Some(patient),
                Err(MethodNotAllowed),
            ),
            (
                "PUT",
                "Patient?identifier=x",
                &[],
                Some(r#"{"resourceType":"Observation"}"#),
                Err(BadBody),
            ),
            (
                "PUT",
                "Patient?subject:Nope.name=x",
                &[],
                Some(patient),
                Err(UnknownType),
            ),
            // patch
            (
                "PATCH",
                "Patient/p1",
                &[("content-type", "application/json-patch+json")],
                Some(json_patch),
                Ok(FhirOp::Patch {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    patch: Some(json!([{"op":"replace","path":"/active","value":false}])),
                }),
            ),
            (
                "PATCH",
                "Patient/p1",
                &[],
                Some(r#"{"resourceType":"Parameters","parameter":[]}"#),
                Ok(FhirOp::Patch {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    patch: Some(json!({"resourceType":"Parameters","parameter":[]})),
                }),
            ),
            (
                "PATCH",
                "Patient/p1",
                &[],
                None,
                Ok(FhirOp::Patch {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    patch: None,
                }),
            ),
            (
                "PATCH",
                "Patient/p1",
                &[],
                Some(r#"[{"op":"explode","path":"/a"}]"#),
                Err(BadBody),
            ),
            (
                "PATCH",
                "Patient/p1",
                &[],
                Some(r#"[{"op":"add"}]"#),
                Err(BadBody),
            ),
            (
                "PATCH",
                "Patient/p1",
                &[],
                Some(r#"{"resourceType":"Patient"}"#),
                Err(BadBody),
            ),
            ("PATCH", "Patient/p1", &[], Some("[1]"), Err(BadBody)),
            ("PATCH", "Patient/p1", &[], Some("[{"), Err(BadBody)),
            (
                "PATCH",
                "Patient?identifier=x",
                &[],
                Some(json_patch),
                Ok(FhirOp::ConditionalPatch {
                    resource_type: "Patient".into(),
                    criteria: qps(&[("identifier", "x")]),
                    patch: Some(json!([{"op":"replace","path":"/active","value":false}])),
                }),
            ),
            (
                "PATCH",
                "Patient",
                &[],
                Some(json_patch),
                Err(MethodNotAllowed),
            ),
            // delete
            (
                "DELETE",
                "Patient/p1",
                &[],
                None,
                Ok(FhirOp::Delete {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                }),
            ),
            (
                "DELETE",
                "Patient?identifier=x",
                &[],
                None,
                Ok(FhirOp::ConditionalDelete {
                    resource_type: "Patient".into(),
                    criteria: qps(&[("identifier", "x")]),
                }),
            ),
            ("DELETE", "Patient", &[], None, Err(MethodNotAllowed)),
            (
                "DELETE",
                "Patient?_count=1&_sort=name",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            (
                "DELETE",
                "Patient?_include:iterate=Patient:link:Patient",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            (
                "PATCH",
                "Patient?_total=accurate",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "_count=1")],
                None,
                Err(BadQuery),
            ),
            (
                "DELETE",
                "Patient?_pretty=true&_format=json",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            ("DELETE", "", &[], None, Err(MethodNotAllowed)),
            // search
            ("GET", "Patient", &[], None, Ok(search("Patient", &[]))),
            ("HEAD", "Patient", &[], None, Ok(search("Patient", &[]))),
            ("GET", "Patient?", &[], None, Ok(search("Patient", &[]))),
            (
                "GET",
                "Patient?name=Nguyen&_count=10",
                &[],
                None,
                Ok(search("Patient", &[("name", "Nguyen"), ("_count", "10")])),
            ),
            (
                "GET",
                "Patient?name=L%C3%A9a+T",
                &[],
                None,
                Ok(search("Patient", &[("name", "L\u{e9}a T")])),
            ),
            (
                "GET",
                "Patient?_has:Observation:subject:code=2345-7",
                &[],
                None,
                Ok(search(
                    "Patient",
                    &[("_has:Observation:subject:code", "2345-7")],
                )),
            ),
            (
                "GET",
                "Observation?subject:Patient.name=Nguyen",
                &[],
                None,
                Ok(search("Observation", &[("subject:Patient.name", "Nguyen")])),
            ),
            (
                "GET",
                "Observation?_include=Observation:subject:Patient",
                &[],
                None,
                Ok(search(
                    "Observation",
                    &[("_include", "Observation:subject:Patient")],
                )),
            ),
            (
                "GET",
                "Patient?_revinclude=Provenance:target",
                &[],
                None,
                Ok(search("Patient", &[("_revinclude", "Provenance:target")])),
            ),
            (
                "GET",
                "Observation?_include=Observation:subject:patient",
                &[],
                None,
                Err(UnknownType),
            ),
            ("GET", "Observation?_include=bad", &[], None, Err(BadQuery)),
            (
                "GET",
                "Patient?_has:Nope:subject:code=x",
                &[],
                None,
                Err(UnknownType),
            ),
            ("GET", "Patient?name=%zz", &[], None, Err(BadQuery)),
            ("GET", "Patient?name=%", &[], None, Err(BadQuery)),
            ("GET", "Patient?name=%C3", &[], None, Err(BadQuery)),
            ("GET", "Patient?=x", &[], None, Err(BadQuery)),
            ("GET", "Patient?name=a#b", &[], None, Err(BadQuery)),
            ("GET", "Patient/_search", &[], None, Err(MethodNotAllowed)),
            // POST _search: URL and form parameters merged, URL first
            (
                "POST",
                "Observation/_search",
                form,
                Some("code=http%3A%2F%2Floinc.org%7C8867-4"),
                Ok(post_search(
                    Some("Observation"),
                    &[("code", "http://loinc.org|8867-4")],
                )),
            ),
            (
                "POST",
                "Observation/_search?_count=5",
                form,
                Some("code=x&status=final"),
                Ok(post_search(
                    Some("Observation"),
                    &[("_count", "5"), ("code", "x"), ("status", "final")],
                )),
            ),
            (
                "POST",
                "Observation/_search",
                &[(
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                )],
                Some("code=x"),
                Ok(post_search(Some("Observation"), &[("code", "x")])),
            ),
            (
                "POST",
                "Observation/_search",
                &[],
                Some("code=x"),
                Ok(post_search(Some("Observation"), &[("code", "x")])),
            ),
            (
                "POST",
                "Observation/_search",
                &[],
                None,
                Ok(post_search(Some("Observation"), &[])),
            ),
            (
                "POST",
                "Observation/_search",
                &[("content-type", "application/json")],
                Some("{}"),
                Err(BadBody),
            ),
            (
                "POST",
                "Observation/_search",
                form,
                Some("code=%zz"),
                Err(BadBody),
            ),
            (
                "POST",
                "Observation/_search",
                form,
                Some("_method=DELETE"),
                Err(MethodOverride),
            ),
            (
                "POST",
                "Observation/_search",
                form,
                Some("subject:Nope.name=x"),
                Err(UnknownType),
            ),
            (
                "POST",
                "_search",
                form,
                Some("_type=Patient&name=x"),
                Ok(post_search(None, &[("_type", "Patient"), ("name", "x")])),
            ),
            ("POST", "_search", form, Some(""), Err(Unsupported)),
            ("GET", "_search", &[], None, Err(MethodNotAllowed)),
            // compartment search
            (
                "GET",
                "Patient/p1/Observation",
                &[],
                None,
                Ok(compartment("Patient", "p1", "Observation", &[])),
            ),
            (
                "GET",
                "Patient/p1/Observation?code=x",
                &[],
                None,
                Ok(compartment(
                    "Patient",
                    "p1",
                    "Observation",
                    &[("code", "x")],
                )),
            ),
            (
                "GET",
                "Encounter/e1/Observation",
                &[],
                None,
                Ok(compartment("Encounter", "e1", "Observation", &[])),
            ),
            ("GET", "Patient/p1/*", &[], None, Err(Unsupported)),
            ("GET", "Observation/o1/Patient", &[], None, Err(Unsupported)),
            ("GET", "Patient/p1/observation", &[], None, Err(UnknownType)),
            ("GET", "Patient/p1/_search", &[], None, Err(Unsupported)),
            (
                "POST",
                "Patient/p1/Observation",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            (
                "GET",
                "Patient/p1/Observation/_search",
                &[],
                None,
                Err(Unsupported),
            ),
            // system search
            (
                "GET",
                "?_type=Patient,Observation&name=x",
                &[],
                None,
                Ok(system_search(&[
                    ("_type", "Patient,Observation"),
                    ("name", "x"),
                ])),
            ),
            (
                "GET",
                "?_id=x",
                &[],
                None,
                Ok(system_search(&[("_id", "x")])),
            ),
            ("GET", "", &[], None, Err(Unsupported)),
            ("GET", "?", &[], None, Err(Unsupported)),
            ("GET", "?_type=patient", &[], None, Err(UnknownType)),
            ("GET", "?_type=", &[], None, Err(BadQuery)),
            // history
            (
                "GET",
                "Patient/p1/_history",
                &[],
                None,
                Ok(history(Some("Patient"), Some("p1"))),
            ),
            (
                "GET",
                "Observation/_history",
                &[],
                None,
                Ok(history(Some("Observation"), None)),
            ),
            ("GET", "_history", &[], None, Ok(history(None, None))),
            (
                "GET",
                "_history?_since=2024-01-01",
                &[],
                None,
                Ok(history(None, None)),
            ),
            ("POST", "_history", &[], None, Err(MethodNotAllowed)),
            (
                "DELETE",
                "Patient/_history",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            (
                "POST",
                "Patient/p1/_history",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            ("GET", "_history/1", &[], None, Err(Unsupported)),
            // operations
            (
                "GET",
                "Patient/p1/$everything",
                &[],
                None,
                Ok(op("everything", Some("Patient"), Some("p1"))),
            ),
            (
                "POST",
                "Patient/p1/$everything",
                &[],
                Some("{}"),
                Ok(op("everything", Some("Patient"), Some("p1"))),
            ),
            (
                "HEAD",
                "Patient/p1/$everything",
                &[],
                None,
                Ok(op("everything", Some("Patient"), Some("p1"))),
            ),
            (
                "GET",
                "ValueSet/$expand?url=x",
                &[],
                None,
                Ok(op("expand", Some("ValueSet"), None)),
            ),
            ("POST", "$export", &[], None, Ok(op("export", None, None))),
            (
                "GET",
                "CodeSystem/$validate-code",
                &[],
                None,
                Ok(op("validate-code", Some("CodeSystem"), None)),
            ),
            (
                "DELETE",
                "Patient/p1/$everything",
                &[],
                None,
                Err(MethodNotAllowed),
            ),
            ("PUT", "$export", &[], None, Err(MethodNotAllowed)),
            ("GET", "$", &[], None, Err(BadPath)),
            ("GET", "Patient/$1x", &[], None, Err(BadPath)),
            ("GET", "$export/x", &[], None, Err(Unsupported)),
            ("GET", "Nope/$export", &[], None, Err(UnknownType)),
            // GraphQL
            (
                "GET",
                "$graphql?query=%7BPatient(id:%22p1%22)%7Bid%7D%7D",
                &[],
                None,
                Ok(FhirOp::GraphQl),
            ),
            (
                "POST",
                "$graphql",
                &[("content-type", "application/json")],
                Some(r#"{"query":"{ PatientList { id } }"}"#),
                Ok(FhirOp::GraphQl),
            ),
            ("PUT", "$graphql", &[], None, Err(MethodNotAllowed)),
            (
                "GET",
                "Patient/$graphql",
                &[],
                None,
                Ok(op("graphql", Some("Patient"), None)),
            ),
            // methods
            ("OPTIONS", "Patient", &[], None, Err(MethodNotAllowed)),
            ("TRACE", "Patient/p1", &[], None, Err(MethodNotAllowed)),
            ("get", "Patient/p1", &[], None, Err(MethodNotAllowed)),
            ("", "Patient/p1", &[], None, Err(MethodNotAllowed)),
            // path tricks (cases 170, 171)
            ("GET", "Patient/../AccessPolicy", &[], None, Err(BadPath)),
            (
                "GET",
                "Observation%2F..%2FPatient%2Fp1",
                &[],
                None,
                Err(BadPath),
            ),
            ("GET", "Patient%2Fp1", &[], None, Err(BadPath)),
            ("GET", "Patient%2fp1", &[], None, Err(BadPath)),
            ("GET", "//Patient", &[], None, Err(BadPath)),
            ("GET", "Patient/p1/", &[], None, Err(BadPath)),
            ("GET", "Patient/./p1", &[], None, Err(BadPath)),
            (
                "GET",
                "Patient/%2e%2e/AccessPolicy",
                &[],
                None,
                Err(BadPath),
            ),
            ("GET", "Patient%5Cp1", &[], None, Err(BadPath)),
            ("GET", "Patient\\p1", &[], None, Err(BadPath)),
            ("GET", "Patient/p1%00", &[], None, Err(BadPath)),
            ("GET", "Patient/p1;x=y", &[], None, Err(BadPath)),
            (
                "DELETE",
                "Patient/../AccessPolicy/ap1",
                &[("x-http-method-override", "GET")],
                None,
                Err(BadPath),
            ),
            // method override (case 180)
            (
                "POST",
                "Observation/o1",
                &[("X-HTTP-Method-Override", "DELETE")],
                None,
                Err(MethodOverride),
            ),
            (
                "POST",
                "Observation/o1",
                &[("x-http-method-override", "DELETE")],
                None,
                Err(MethodOverride),
            ),
            (
                "GET",
                "Observation/o1",
                &[("x-http-method", "DELETE")],
                None,
                Err(MethodOverride),
            ),
            (
                "GET",
                "Observation/o1",
                &[("x-method-override", "GET")],
                None,
                Err(MethodOverride),
            ),
            (
                "POST",
                "Observation/o1?_method=DELETE",
                &[],
                None,
                Err(MethodOverride),
            ),
            (
                "GET",
                "Observation?_method=DELETE",
                &[],
                None,
                Err(MethodOverride),
            ),
            (
                "GET",
                "Observation?%5Fmethod=DELETE",
                &[],
                None,
                Err(MethodOverride),
            ),
        ];
        for row in table {
            check(row);
        }
    }

    fn check_format(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
        expected: bool,
    ) {
        let got = classify_raw(method, url, headers, body.map(str::as_bytes))
            .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
        assert_eq!(
            got.wants_non_json, expected,
            "{method} {url:?} headers={headers:?}"
        );
    }

    #[test]
    fn format_table() {
        let form: &[(&str, &str)] = &[("content-type", "application/x-www-form-urlencoded")];
        let table: Vec<FormatRow> = vec![
            ("GET", "Patient", &[], None, false),
            ("GET", "Patient?_format=json", &[], None, false),
            ("GET", "Patient?_format=JSON", &[], None, false),
            ("GET", "Patient?_format=application/json", &[], None, false),
            (
                "GET",
                "Patient?_format=application/fhir%2Bjson",
                &[],
                None,
                false,
            ),
            (
                "GET",
                "Patient?_format=application/fhir+json",
                &[],
                None,
                false,
            ),
            (
                "GET",
                "Patient?_format=application/json+fhir",
                &[],
                None,
                false,
            ),
            (
                "GET",
                "Patient?_format=application/fhir%2Bjson;fhirVersion=4.0",
                &[],
                None,
                false,
            ),
            ("GET", "Patient?_format=xml", &[], None, true),
            (
                "GET",
                "Patient?_format=application/fhir%2Bxml",
                &[],
                None,
                true,
            ),
            ("GET", "Patient?_format=text/turtle", &[], None, true),
            ("GET", "Patient?_format=ttl", &[], None, true),
            ("GET", "Patient?_format=html", &[], None, true),
            ("GET", "Patient?_format=", &[], None, true),
            ("GET", "Patient?_format=json&_format=xml", &[], None, true),
            ("GET", "Patient/p1?_format=xml", &[], None, true),
            ("GET", "metadata?_format=xml", &[], None, true),
            (
                "GET",
                "Patient",
                &[("accept", "application/fhir+json")],
                None,
                false,
            ),
            (
                "GET",
                "Patient",
                &[("accept", "application/json")],
                None,
                false,
            ),
            ("GET", "Patient", &[("accept", "*/*")], None, false),
            (
                "GET",
                "Patient",
                &[("accept", "application/fhir+json, */*;q=0.1")],
                None,
                false,
            ),
            (
                "GET",
                "Patient",
                &[("accept", "application/fhir+json;fhirVersion=4.0")],
                None,
                false,
            ),
            ("GET", "Patient", &[("accept", "")], None, false),
            (
                "GET",
                "Patient",
                &[("accept", "application/fhir+json, application/fhir+xml;q=0")],
                None,
                false,
            ),
            (
                "GET",
                "Patient",
                &[("accept", "application/fhir+xml")],
                None,
                true,
            ),
            (
                "GET",
                "Patient",
                &[("Accept", "application/fhir+xml")],
                None,
                true,
            ),
            (
                "GET",
                "Patient",
                &[("accept", "application/xml")],
                None,
                true,
            ),
            ("GET", "Patient", &[("accept", "text/turtle")], None, true),
            ("GET", "Patient", &[("accept", "application/*")], None, true),
            (
                "GET",
                "Patient",
                &[(
                    "accept",
                    "application/fhir+json, application/fhir+xml;q=0.5",
                )],
                None,
                true,
            ),
            (
                "GET",
                "Patient",
                &[("accept", "application/json"), ("accept", "text/html")],
                None,
                true,
            ),
            ("POST", "Patient/_search", form, Some("_format=xml"), true),
            ("POST", "Patient/_search", form, Some("_format=json"), false),
        ];
        for (method, url, headers, body, expected) in table {
            check_format(method, url, headers, body, expected);
        }
    }

    fn check_bundle(body: Value, expected: BundleExpectation) {
        let bytes = serde_json::to_vec(&body).expect("serialize");
        let got = classify_raw("POST", "", &[], Some(&bytes)).map(|r| r.op);
        let expected = expected.map(|(transaction, entries)| FhirOp::Bundle {
            transaction,
            entries: entries.into_iter().map(|op| BundleEntry { op }).collect(),
        });
        assert_eq!(got, expected, "bundle {body}");
    }

    fn entry(method: &str, url: &str) -> Value {
        json!({"request": {"method": method, "url": url}})
    }

    #[test]
    fn bundle_table() {
        let obs = json!({"resourceType":"Observation","status":"final","subject":{"reference":"Patient/p1"}});
        let patient = json!({"resourceType":"Patient","id":"p1"});
        // base64 of [{"op":"replace","path":"/active","value":false}]
        let patch_b64 = "W3sib3AiOiJyZXBsYWNlIiwicGF0aCI6Ii9hY3RpdmUiLCJ2YWx1ZSI6ZmFsc2V9XQ==";
        let table: Vec<(Value, BundleExpectation)> = vec![
            // case 111
            (
                json!({"resourceType":"Bundle","type":"batch","entry":[entry("GET","Patient/p1"), entry("GET","Observation/o1")]}),
                Ok((
                    false,
                    vec![Ok(read("Patient", "p1")), Ok(read("Observation", "o1"))],
                )),
            ),
            // case 110
            (
                json!({"resourceType":"Bundle","type":"transaction","entry":[
                    {"resource": patient, "request": {"method":"PUT","url":"Patient/p1"}},
                    {"fullUrl":"urn:uuid:7c2e1d4f-9a8b-4c3d-8e2f-1a0b9c8d7e62","resource": obs, "request": {"method":"POST","url":"Observation"}},
                ]}),
                Ok((
                    true,
                    vec![
                        Ok(FhirOp::Update {
                            resource_type: "Patient".into(),
                            id: "p1".into(),
                            resource: Some(patient.clone()),
                        }),
                        Ok(FhirOp::Create {
                            resource_type: "Observation".into(),
                            resource: Some(obs.clone()),
                            if_none_exist: None,
                        }),
                    ],
                )),
            ),
            (
                json!({"resourceType":"Bundle","type":"batch"}),
                Ok((false, vec![])),
            ),
            (
                json!({"resourceType":"Bundle","type":"batch","entry":[]}),
                Ok((false, vec![])),
            ),
            (
                json!({"resourceType":"Bundle","type":"batch","entry":[
                    entry("GET", "Patient?name=x&_include=Patient:organization:Organization"),
                    entry("GET", "Patient/p1/_history/2"),
                    entry("DELETE", "Patient?identifier=a%7Cb"),
                    entry("DELETE", "Patient/p1"),
                    entry("GET", "Patient/p1/Observation"),
                    entry("GET", "Patient/p1/$everything"),
                    entry("POST", "Patient/_search?name=x"),
                    entry("HEAD", "Patient/p1"),
                    entry("GET", "_history"),
                    entry("GET", "metadata"),
                ]}),
                Ok((
                    false,
                    vec![
                        Ok(search(
                            "Patient",
                            &[
                                ("name", "x"),
                                ("_include", "Patient:organization:Organization"),
                            ],
                        )),
                        Ok(FhirOp::Vread {
                            resource_type: "Patient".into(),
                            id: "p1".into(),
                            version: "2".into(),
                        }),
                        Ok(FhirOp::ConditionalDelete {
                            resource_type: "Patient".into(),
                            criteria: qps(&[("identifier", "a|b")]),
                        }),
                        Ok(FhirOp::Delete {
                            resource_type: "Patient".into(),
                            id: "p1".into(),
                        }),
                        Ok(compartment("Patient", "p1", "Observation", &[])),
                        Ok(op("everything", Some("Patient"), Some("p1"))),
                        Ok(post_search(Some("Patient"), &[("name", "x")])),
                        Ok(read("Patient", "p1")),
                        Ok(history(None, None)),
                        Ok(FhirOp::Capabilities),
                    ],
                )),
            ),
            // conditional create in a transaction, and entry-level failures
            (
                json!({"resourceType":"Bundle","type":"transaction","entry":[
                    {"resource": obs, "request": {"method":"POST","url":"Observation","ifNoneExist":"identifier=x"}},
                    {"resource": obs, "request": {"method":"PUT","url":"Observation/o1","ifNoneExist":"identifier=x"}},
                    {"resource": obs, "request": {"method":"POST","url":"Patient"}},
                    {"resource": {"resourceType":"Bundle","type":"batch"}, "request": {"method":"POST","url":"Bundle"}},
                    {"request": {"method":"POST","url":""}},
                    entry("GET", "http://evil.example/fhir/Patient/p1"),
                    entry("GET", "urn:uuid:1234"),
                    entry("GET", "/Patient/p1"),
                    entry("GET", "Patient/../AccessPolicy"),
                    entry("GET", "Patient%2Fp1"),
                    entry("GET", "patient/p1"),
                    entry("GET", "Patient?_method=DELETE"),
                    entry("GET", "Patient?name=%zz"),
                    entry("GET", "Patient/p1#x"),
                    entry("GET", ""),
                    entry("OPTIONS", "Patient"),
                    entry("get", "Patient/p1"),
                    {"request": {"url": "Patient/p1"}},
                    {"request": {"method": "GET"}},
                    {"request": "GET Patient/p1"},
                    "entry",
                    {"resource": patient},
                ]}),
                Ok((
                    true,
                    vec![
                        Ok(FhirOp::Create {
                            resource_type: "Observation".into(),
                            resource: Some(obs.clone()),
                            if_none_exist: Some(qps(&[("identifier", "x")])),
                        }),
                        Err(BadBody),
                        Err(BadBody),
                        Err(Unsupported),
                        Err(Unsupported),
                        Err(Unsupported),
                        Err(Unsupported),
                        Err(BadPath),
                        Err(BadPath),
                        Err(BadPath),
                        Err(UnknownType),
                        Err(MethodOverride),
                        Err(BadQuery),
                        Err(BadPath),
                        Err(Unsupported),
                        Err(MethodNotAllowed),
                        Err(MethodNotAllowed),
                        Err(BadBody),
                        Err(BadBody),
                        Err(BadBody),
                        Err(BadBody),
                        Err(BadBody),
                    ],
                )),
            ),
            // PATCH entries: Binary JSON Patch or Parameters
            (
                json!({"resourceType":"Bundle","type":"batch","entry":[
                    {"resource": {"resourceType":"Binary","contentType":"application/json-patch+json","data":patch_b64}, "request": {"method":"PATCH","url":"Patient/p1"}},
                    {"resource": {"resourceType":"Parameters","parameter":[]}, "request": {"method":"PATCH","url":"Patient/p1"}},
                    {"resource": {"resourceType":"Binary","contentType":"text/plain","data":patch_b64}, "request": {"method":"PATCH","url":"Patient/p1"}},
                    {"resource": {"resourceType":"Binary","contentType":"application/json-patch+json","data":"!!"}, "request": {"method":"PATCH","url":"Patient/p1"}},
                    {"resource": {"resourceType":"Patient"}, "request": {"method":"PATCH","url":"Patient/p1"}},
                    {"resource": {"resourceType":"Binary","contentType":"application/json-patch+json","data":"e30="}, "request": {"method":"PATCH","url":"Patient?identifier=x"}},
                ]}),
                Ok((
                    false,
                    vec![
                        Ok(FhirOp::Patch {
                            resource_type: "Patient".into(),
                            id: "p1".into(),
                            patch: Some(json!([{"op":"replace","path":"/active","value":false}])),
                        }),
                        Ok(FhirOp::Patch {
                            resource_type: "Patient".into(),
                            id: "p1".into(),
                            patch: Some(json!({"resourceType":"Parameters","parameter":[]})),
                        }),
                        Err(BadBody),
                        Err(BadBody),
                        Err(BadBody),
                        Err(BadBody),
                    ],
                )),
            ),
            (
                json!({"resourceType":"Bundle","type":"searchset"}),
                Err(BadBody),
            ),
            (
                json!({"resourceType":"Bundle","type":"collection","entry":[]}),
                Err(BadBody),
            ),
            (json!({"resourceType":"Bundle"}), Err(BadBody)),
            (
                json!({"resourceType":"Bundle","type":"batch","entry":{}}),
                Err(BadBody),
            ),
            (
                json!({"resourceType":"Patient","type":"batch"}),
                Err(BadBody),
            ),
            (json!([]), Err(BadBody)),
            (json!("batch"), Err(BadBody)),
        ];
        for (body, expected) in table {
            check_bundle(body, expected);
        }
    }

    #[test]
    fn bundle_body_errors() {
        let table: Vec<(Headers, Option<&[u8]>, Unclassifiable)> = vec![
            (&[], None, BadBody),
            (&[], Some(b""), BadBody),
            (&[], Some(b"{"), BadBody),
            (&[], Some(b"\xff\xfe"), BadBody),
            (
                &[],
                Some(br#"{"resourceType":"Bundle","type":"batch","type":"transaction"}"#),
                BadBody,
            ),
            (
                &[("content-type", "application/x-www-form-urlencoded")],
                Some(br#"{"resourceType":"Bundle","type":"batch"}"#),
                BadBody,
            ),
            (
                &[("content-type", "a"), ("content-type", "b")],
                Some(b"{}"),
                BadBody,
            ),
        ];
        for (headers, body, expected) in table {
            assert_eq!(
                classify_raw("POST", "", headers, body).map(|r| r.op),
                Err(expected),
                "{body:?}"
            );
        }
    }

    #[test]
    fn required_access_through_classify() {
        use Interaction::*;
        type Needs<'a> = Vec<(&'a str, Interaction)>;
        let table: Vec<(&str, &str, Headers, Needs)> = vec![
            ("GET", "Patient/p1", &[], vec![("Patient", Read)]),
            (
                "GET",
                "Patient?_has:Observation:subject:code=2345-7",
                &[],
                vec![("Patient", Search), ("Observation", Search)],
            ),
            (
                "GET",
                "Observation?subject:Patient.name=Nguyen",
                &[],
                vec![("Observation", Search), ("Patient", Search)],
            ),
            (
                "GET",
                "Observation?subject.name=Nguyen",
                &[],
                vec![("Observation", Search), ("*", Search)],
            ),
            (
                "GET",
                "Patient/p1/Observation",
                &[],
                vec![("Observation", Search), ("Patient", Read)],
            ),
            (
                "GET",
                "Observation/_history",
                &[],
                vec![("Observation", History)],
            ),
            ("GET", "_history", &[], vec![("*", History)]),
            (
                "POST",
                "Patient",
                &[("if-none-exist", "identifier=x")],
                vec![("Patient", Create), ("Patient", Search)],
            ),
            (
                "GET",
                "?_type=Patient,Observation",
                &[],
                vec![("Patient", Search), ("Observation", Search)],
            ),
            ("GET", "?name=x", &[], vec![("*", Search)]),
            ("GET", "Patient/p1/$everything", &[], vec![]),
        ];
        for (method, url, headers, expected) in table {
            let got = classify_raw(method, url, headers, None)
                .expect("classified")
                .op
                .required_access();
            let expected: Vec<_> = expected
                .into_iter()
                .map(|(t, i)| (t.to_string(), i))
                .collect();
            assert_eq!(got, expected, "{method} {url}");
        }
    }

    #[test]
    fn base64_decoder() {
        let table: &[(&str, Option<&[u8]>)] = &[
            ("", Some(b"")),
            ("e30=", Some(b"{}")),
            ("e30", Some(b"{}")),
            ("aGVsbG8=", Some(b"hello")),
            ("aGVs\nbG8=", Some(b"hello")),
            ("aGVsbA==", Some(b"hell")),
            ("_-8=", Some(&[0xff, 0xef])),
            ("a", None),
            ("e30=x", None),
            ("e3*0", None),
            ("e30===", None),
        ];
        for &(input, expected) in table {
            assert_eq!(decode_base64(input).as_deref(), expected, "{input:?}");
        }
    }

    #[test]
    fn strict_json() {
        assert_eq!(
            parse_json_strict(br#"{"a":[1,2.5,-3,true,null,"x"]}"#),
            Some(json!({"a":[1,2.5,-3,true,null,"x"]}))
        );
        assert_eq!(parse_json_strict(br#"{"a":1,"a":1}"#), None);
        assert_eq!(parse_json_strict(br#"[{"a":{"b":1,"b":2}}]"#), None);
        assert_eq!(parse_json_strict(b"{} x"), None);
        let deep = "[".repeat(100_000);
        assert_eq!(parse_json_strict(deep.as_bytes()), None);
    }

    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "X",
    ];

    fn method() -> impl Strategy<Value = &'static str> {
        prop::sample::select(&METHODS[..])
    }

    /// Path-like strings: FHIR-ish tokens joined with separators and escapes.
    fn path_like() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "Patient",
            "Observation",
            "p1",
            "_history",
            "1",
            "$everything",
            "$graphql",
            "metadata",
            "_search",
            "*",
            "..",
            ".",
            "%2F",
            "%2f",
            "%2e",
            "%5C",
            "%00",
            "%",
            "%zz",
            "AccessPolicy",
            "patient",
            "",
            ";",
            "\\",
            "é",
            "%C3%A9",
            "%ff",
        ]);
        prop::collection::vec(token, 0..6).prop_map(|ts| ts.join("/"))
    }

    fn body_like() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
            Just(Some(br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient/p1"}}]}"#.to_vec())),
            Just(Some(br#"{"resourceType":"Patient","id":"p1"}"#.to_vec())),
            Just(Some(br#"[{"op":"add","path":"/a","value":1}]"#.to_vec())),
            "[a-z_=&%+0-9]{0,20}".prop_map(|s| Some(s.into_bytes())),
        ]
    }

    fn headers_like() -> impl Strategy<Value = Vec<(String, String)>> {
        let name = prop::sample::select(vec![
            "accept",
            "content-type",
            "if-none-exist",
            "x-http-method-override",
            "x-other",
        ]);
        prop::collection::vec((name.prop_map(str::to_string), ".{0,20}"), 0..3)
    }

    fn run(
        method: &str,
        path: &str,
        query: &Option<String>,
        headers: &[(String, String)],
        body: &Option<Vec<u8>>,
    ) -> Result<FhirRequest, Unclassifiable> {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        classify(&RequestParts {
            method,
            path,
            query: query.as_deref(),
            headers: &headers,
            body: body.as_deref(),
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(
            method in ".{0,8}",
            path in ".{0,40}",
            query in proptest::option::of(".{0,40}"),
            headers in headers_like(),
            body in proptest::option::of(prop::collection::vec(any::<u8>(), 0..128)),
        ) {
            let _ = run(&method, &path, &query, &headers, &body);
        }

        #[test]
        fn never_panics_on_fhir_like_input(
            method in method(),
            path in path_like(),
            query in proptest::option::of("[a-zA-Z_:.=&%+0-9|,*]{0,30}"),
            headers in headers_like(),
            body in body_like(),
        ) {
            let _ = run(method, &path, &query, &headers, &body);
        }

        #[test]
        fn dirty_paths_are_always_errors(
            method in method(),
            prefix in path_like(),
            bad in prop::sample::select(vec!["..", "%2F", "%2f", "//", "/../", "%2e%2e", ".%2e"]),
            suffix in path_like(),
            query in proptest::option::of("[a-z_=&]{0,10}"),
            body in body_like(),
        ) {
            let path = format!("{prefix}{bad}{suffix}");
            prop_assert!(run(method, &path, &query, &[], &body).is_err(), "path {:?}", path);
        }

        #[test]
        fn classification_is_deterministic(
            method in method(),
            path in path_like(),
            query in proptest::option::of("[a-zA-Z_:.=&%+0-9|,]{0,30}"),
            headers in headers_like(),
            body in body_like(),
        ) {
            let first = run(method, &path, &query, &headers, &body);
            let second = run(method, &path, &query, &headers, &body);
            prop_assert_eq!(first, second);
        }

        #[test]
        fn bundle_entries_never_panic(
            entries in prop::collection::vec((method(), path_like(), "[a-z_=&%.:0-9]{0,12}"), 0..5),
            transaction in any::<bool>(),
        ) {
            let entries: Vec<Value> = entries
                .into_iter()
                .map(|(m, p, q)| json!({"request": {"method": m, "url": format!("{p}?{q}")}}))
                .collect();
            let body = json!({"resourceType": "Bundle", "type": if transaction { "transaction" } else { "batch" }, "entry": entries});
            let bytes = serde_json::to_vec(&body).expect("serialize");
            let got = classify_raw("POST", "", &[], Some(&bytes));
            let is_bundle = matches!(got, Ok(FhirRequest { op: FhirOp::Bundle { .. }, .. }));
            prop_assert!(is_bundle);
        }
    }
}
