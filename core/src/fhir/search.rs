//! Query strings and search parameters: strict `application/x-www-form-urlencoded` parsing, and
//! the resource types a search reaches beyond its own (`_include`, `_revinclude`, `_has`, chained
//! parameters, `_type`), which is what [`FhirOp::required_access`] reports at type level.

use super::request::{ANY_TYPE, FhirOp, Interaction, QueryParam, Search, Unclassifiable};
use super::types::is_resource_type;

/// Parses a raw query string (without `?`) into decoded parameters, in order.
///
/// Strict where `form_urlencoded` is lenient: an invalid percent escape, a value that is not
/// UTF-8 once decoded, an empty name, a control character (raw or decoded), a raw space or a raw
/// `#` is [`Unclassifiable::BadQuery`]. Empty pieces (`a=1&&b=2`) are skipped; `+` is a space.
pub fn parse_query(raw: &str) -> Result<Vec<QueryParam>, Unclassifiable> {
    parse_urlencoded(raw.as_bytes()).ok_or(Unclassifiable::BadQuery)
}

/// Same rules as [`parse_query`] for a form body; failures are [`Unclassifiable::BadBody`].
/// `query` (or a form body) with only the pairs `keep` accepts (decoded name and value), in
/// their order, re-encoded.
pub fn retain_pairs(query: &str, keep: impl Fn(&str, &str) -> bool) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if keep(&name, &value) {
            out.append_pair(&name, &value);
        }
    }
    out.finish()
}

pub fn parse_form_body(body: &[u8]) -> Result<Vec<QueryParam>, Unclassifiable> {
    parse_urlencoded(body).ok_or(Unclassifiable::BadBody)
}

fn parse_urlencoded(raw: &[u8]) -> Option<Vec<QueryParam>> {
    if raw
        .iter()
        .any(|&b| b == b'#' || b == b' ' || b.is_ascii_control())
    {
        return None;
    }
    let mut params = Vec::new();
    for piece in raw.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        let (name, value) = match piece.iter().position(|&b| b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &piece[piece.len()..]),
        };
        let name = decode_component(name)?;
        if name.is_empty() {
            return None;
        }
        let value = decode_component(value)?;
        params.push(QueryParam { name, value });
    }
    Some(params)
}

fn decode_component(raw: &[u8]) -> Option<String> {
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    let bytes = super::path::percent_decode_strict(&plus_as_space)?;
    let text = String::from_utf8(bytes).ok()?;
    if text.chars().any(char::is_control) {
        return None;
    }
    Some(text)
}

/// Resource types that `params` make a search touch besides the searched type, in first-seen
/// order without duplicates. [`ANY_TYPE`] (`"*"`) stands for "any type": an `_include` without a
/// target type, a chain without a type modifier, `_filter`, `_query`.
///
/// - `_include[:iterate]=Source:param:Target` → `Target` (no target, or `*` → `*`);
/// - `_revinclude[:iterate]=Source:param[:Target]` → `Source` (`*` → `*`);
/// - `_has:Type:ref:…` → `Type`, nested `_has` and chains in the remainder too;
/// - `ref:Type.param` → `Type`; `ref.param` → `*`; chains of several links → every link;
/// - `_type=A,B` → `A`, `B`; `_list` → `List`; `_filter`, `_query` → `*`.
///
/// Errors: [`Unclassifiable::UnknownType`] for a type name that is not a resource type,
/// [`Unclassifiable::BadQuery`] for a malformed `_include`, `_revinclude`, `_has` or chain.
pub fn referenced_types(params: &[QueryParam]) -> Result<Vec<String>, Unclassifiable> {
    let mut out = Vec::new();
    for param in params {
        param_types(param, &mut out)?;
    }
    Ok(out)
}

fn push_unique(out: &mut Vec<String>, ty: &str) {
    if !out.iter().any(|t| t == ty) {
        out.push(ty.to_string());
    }
}

fn param_types(param: &QueryParam, out: &mut Vec<String>) -> Result<(), Unclassifiable> {
    let (base, modifier) = match param.name.split_once(':') {
        Some((b, m)) => (b, Some(m)),
        None => (param.name.as_str(), None),
    };
    match base {
        "_include" | "_revinclude" => {
            if !matches!(modifier, None | Some("iterate") | Some("recurse")) {
                return Err(Unclassifiable::BadQuery);
            }
            include_types(base == "_revinclude", &param.value, out)
        }
        "_type" => {
            if modifier.is_some() {
                return Err(Unclassifiable::BadQuery);
            }
            for ty in param.value.split(',') {
                check_type(ty)?;
                push_unique(out, ty);
            }
            Ok(())
        }
        "_list" => {
            push_unique(out, "List");
            Ok(())
        }
        "_filter" | "_query" => {
            push_unique(out, ANY_TYPE);
            Ok(())
        }
        _ => name_types(&param.name, out),
    }
}

fn check_type(ty: &str) -> Result<(), Unclassifiable> {
    if ty.is_empty() {
        Err(Unclassifiable::BadQuery)
    } else if is_resource_type(ty) {
        Ok(())
    } else {
        Err(Unclassifiable::UnknownType)
    }
}

/// `Source:param[:Target]` or `*`.
fn include_types(rev: bool, value: &str, out: &mut Vec<String>) -> Result<(), Unclassifiable> {
    if value == "*" {
        push_unique(out, ANY_TYPE);
        return Ok(());
    }
    let parts: Vec<&str> = value.split(':').collect();
    let (source, param, target) = match parts.as_slice() {
        [s, p] => (*s, *p, None),
        [s, p, t] => (*s, *p, Some(*t)),
        _ => return Err(Unclassifiable::BadQuery),
    };
    if source != "*" {
        check_type(source)?;
    }
    if param.is_empty()
        || !param
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*')
    {
        return Err(Unclassifiable::BadQuery);
    }
    if let Some(t) = target {
        check_type(t)?;
    }
    let reached = if rev {
        source
    } else {
        target.unwrap_or(ANY_TYPE)
    };
    push_unique(out, if reached == "*" { ANY_TYPE } else { reached });
    Ok(())
}

/// A parameter name: `_has:…`, a chain `a[:T].b…`, or a plain name (with modifier).
fn name_types(name: &str, out: &mut Vec<String>) -> Result<(), Unclassifiable> {
    if let Some(rest) = name.strip_prefix("_has:") {
        let mut parts = rest.splitn(3, ':');
        let ty = parts.next().unwrap_or("");
        let reference = parts.next().unwrap_or("");
        let remainder = parts.next().unwrap_or("");
        check_type(ty)?;
        if reference.is_empty() || reference.contains('.') || remainder.is_empty() {
            return Err(Unclassifiable::BadQuery);
        }
        push_unique(out, ty);
        return name_types(remainder, out);
    }
    if name == "_has" {
        return Err(Unclassifiable::BadQuery);
    }
    let Some((link, rest)) = name.split_once('.') else {
        return Ok(());
    };
    if rest.is_empty() {
        return Err(Unclassifiable::BadQuery);
    }
    let (reference, modifier) = match link.split_once(':') {
        Some((r, m)) => (r, Some(m)),
        None => (link, None),
    };
    if reference.is_empty() {
        return Err(Unclassifiable::BadQuery);
    }
    match modifier {
        Some(m) if is_resource_type(m) => push_unique(out, m),
        Some(m) if m.starts_with(|c: char| c.is_ascii_uppercase()) => {
            return Err(Unclassifiable::UnknownType);
        }
        _ => push_unique(out, ANY_TYPE),
    }
    name_types(rest, out)
}

/// Type-level needs of a search: see [`Search::required_access`]. Parameters for which `skip`
/// is true are left out (`policy::decide` leaves out `_include` and `_revinclude`).
pub(crate) fn search_required_access(
    search: &Search,
    skip: impl Fn(&QueryParam) -> bool,
) -> Vec<(String, Interaction)> {
    let mut needs = Vec::new();
    match &search.resource_type {
        Some(ty) => needs.push((ty.clone(), Interaction::Search)),
        None => {
            if !search.params.iter().any(|p| p.name == "_type") {
                needs.push((ANY_TYPE.to_string(), Interaction::Search));
            }
        }
    }
    if let Some((owner, _)) = &search.compartment {
        needs.push((owner.clone(), Interaction::Read));
    }
    add_param_needs(search.params.iter().filter(|p| !skip(p)), &mut needs);
    dedup(needs)
}

/// Every type the parameters reach, as `Search`; a malformed list needs `*`.
fn add_param_needs<'a>(
    params: impl IntoIterator<Item = &'a QueryParam>,
    needs: &mut Vec<(String, Interaction)>,
) {
    let mut types = Vec::new();
    for param in params {
        if param_types(param, &mut types).is_err() {
            needs.push((ANY_TYPE.to_string(), Interaction::Search));
            return;
        }
    }
    needs.extend(types.into_iter().map(|t| (t, Interaction::Search)));
}

fn dedup(needs: Vec<(String, Interaction)>) -> Vec<(String, Interaction)> {
    let mut out: Vec<(String, Interaction)> = Vec::with_capacity(needs.len());
    for need in needs {
        if !out.contains(&need) {
            out.push(need);
        }
    }
    out
}

/// Type-level needs of an operation: see [`FhirOp::required_access`].
pub(crate) fn op_required_access(op: &FhirOp) -> Vec<(String, Interaction)> {
    let mut needs = Vec::new();
    match op {
        FhirOp::Read { resource_type, .. } => {
            needs.push((resource_type.clone(), Interaction::Read))
        }
        FhirOp::Vread { resource_type, .. } => {
            needs.push((resource_type.clone(), Interaction::Vread))
        }
        FhirOp::Create {
            resource_type,
            if_none_exist,
            ..
        } => {
            needs.push((resource_type.clone(), Interaction::Create));
            if let Some(criteria) = if_none_exist {
                needs.push((resource_type.clone(), Interaction::Search));
                add_param_needs(criteria, &mut needs);
            }
        }
        FhirOp::Update { resource_type, .. } | FhirOp::Patch { resource_type, .. } => {
            needs.push((resource_type.clone(), Interaction::Update));
        }
        FhirOp::ConditionalUpdate {
            resource_type,
            criteria,
            ..
        }
        | FhirOp::ConditionalPatch {
            resource_type,
            criteria,
            ..
        } => {
            needs.push((resource_type.clone(), Interaction::Update));
            needs.push((resource_type.clone(), Interaction::Search));
            add_param_needs(criteria, &mut needs);
        }
        FhirOp::Delete { resource_type, .. } => {
            needs.push((resource_type.clone(), Interaction::Delete))
        }
        FhirOp::ConditionalDelete {
            resource_type,
            criteria,
        } => {
            needs.push((resource_type.clone(), Interaction::Delete));
            needs.push((resource_type.clone(), Interaction::Search));
            add_param_needs(criteria, &mut needs);
        }
        FhirOp::Search(search) => return search_required_access(search, |_| false),
        FhirOp::History { resource_type, .. } => needs.push((
            resource_type
                .clone()
                .unwrap_or_else(|| ANY_TYPE.to_string()),
            Interaction::History,
        )),
        FhirOp::Capabilities
        | FhirOp::Operation { .. }
        | FhirOp::Bundle { .. }
        | FhirOp::GraphQl
        | FhirOp::Page { .. } => {}
    }
    dedup(needs)
}

#[cfg(test)]
mod tests;
