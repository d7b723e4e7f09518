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
        | FhirOp::GraphQl => {}
    }
    dedup(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp(name: &str, value: &str) -> QueryParam {
        QueryParam {
            name: name.to_string(),
            value: value.to_string(),
        }
    }

    fn check_query(raw: &str, expected: Result<&[(&str, &str)], Unclassifiable>) {
        let expected = expected.map(|ps| ps.iter().map(|(n, v)| qp(n, v)).collect::<Vec<_>>());
        assert_eq!(parse_query(raw), expected, "query {raw:?}");
    }

    #[test]
    fn query_table() {
        use Unclassifiable::BadQuery;
        type Row<'a> = (&'a str, Result<&'a [(&'a str, &'a str)], Unclassifiable>);
        let table: Vec<Row> = vec![
            ("", Ok(&[])),
            ("a=1", Ok(&[("a", "1")])),
            ("a=1&b=2", Ok(&[("a", "1"), ("b", "2")])),
            ("a=1&&b=2&", Ok(&[("a", "1"), ("b", "2")])),
            ("a", Ok(&[("a", "")])),
            ("a=", Ok(&[("a", "")])),
            ("a=b=c", Ok(&[("a", "b=c")])),
            ("a=x+y", Ok(&[("a", "x y")])),
            ("a=x%2By", Ok(&[("a", "x+y")])),
            (
                "code=http%3A%2F%2Floinc.org%7C8867-4",
                Ok(&[("code", "http://loinc.org|8867-4")]),
            ),
            (
                "identifier=http://h.org/mrn|MRN-1",
                Ok(&[("identifier", "http://h.org/mrn|MRN-1")]),
            ),
            ("%5Fmethod=DELETE", Ok(&[("_method", "DELETE")])),
            ("name=%C3%A9", Ok(&[("name", "\u{e9}")])),
            ("name=\u{e9}", Ok(&[("name", "\u{e9}")])),
            ("a=1&a=2", Ok(&[("a", "1"), ("a", "2")])),
            ("=x", Err(BadQuery)),
            ("a=%", Err(BadQuery)),
            ("a=%4", Err(BadQuery)),
            ("a=%zz", Err(BadQuery)),
            ("a%=1", Err(BadQuery)),
            ("a=%ff", Err(BadQuery)),
            ("a=%00", Err(BadQuery)),
            ("a=%0A", Err(BadQuery)),
            ("a=x\0", Err(BadQuery)),
            ("a=x y", Err(BadQuery)),
            ("a=x#frag", Err(BadQuery)),
            ("a=x\ty", Err(BadQuery)),
        ];
        for (raw, expected) in table {
            check_query(raw, expected);
        }
    }

    #[test]
    fn form_body_errors_are_bad_body() {
        assert_eq!(parse_form_body(b"a=%zz"), Err(Unclassifiable::BadBody));
        assert_eq!(parse_form_body(b"a=\xff"), Err(Unclassifiable::BadBody));
        assert_eq!(parse_form_body(b"a=1"), Ok(vec![qp("a", "1")]));
    }

    fn check_refs(params: &[(&str, &str)], expected: Result<&[&str], Unclassifiable>) {
        let params: Vec<QueryParam> = params.iter().map(|(n, v)| qp(n, v)).collect();
        let expected = expected.map(|ts| ts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        assert_eq!(referenced_types(&params), expected, "params {params:?}");
    }

    #[test]
    fn referenced_types_table() {
        use Unclassifiable::{BadQuery, UnknownType};
        type Row<'a> = (
            &'a [(&'a str, &'a str)],
            Result<&'a [&'a str], Unclassifiable>,
        );
        let table: Vec<Row> = vec![
            (&[("name", "x")], Ok(&[])),
            (&[("name:exact", "x")], Ok(&[])),
            (&[("_count", "10"), ("_sort", "-date")], Ok(&[])),
            (
                &[("_include", "Observation:subject:Patient")],
                Ok(&["Patient"]),
            ),
            (&[("_include", "Observation:subject")], Ok(&["*"])),
            (&[("_include", "Observation:*")], Ok(&["*"])),
            (&[("_include", "*")], Ok(&["*"])),
            (&[("_include", "Observation:*:Patient")], Ok(&["Patient"])),
            (
                &[(
                    "_include:iterate",
                    "Patient:general-practitioner:Practitioner",
                )],
                Ok(&["Practitioner"]),
            ),
            (
                &[("_include:recurse", "Patient:link:Patient")],
                Ok(&["Patient"]),
            ),
            (
                &[("_include:foo", "Observation:subject:Patient")],
                Err(BadQuery),
            ),
            (&[("_include", "Observation")], Err(BadQuery)),
            (
                &[("_include", "Observation:subject:Patient:x")],
                Err(BadQuery),
            ),
            (&[("_include", "Observation::Patient")], Err(BadQuery)),
            (&[("_include", "observation:subject")], Err(UnknownType)),
            (
                &[("_include", "Observation:subject:patient")],
                Err(UnknownType),
            ),
            (&[("_revinclude", "Provenance:target")], Ok(&["Provenance"])),
            (
                &[("_revinclude", "Provenance:target:Patient")],
                Ok(&["Provenance"]),
            ),
            (
                &[("_revinclude:iterate", "Observation:subject")],
                Ok(&["Observation"]),
            ),
            (&[("_revinclude", "*:subject")], Ok(&["*"])),
            (&[("_revinclude", "Nope:target")], Err(UnknownType)),
            (
                &[("_has:Observation:subject:code", "x")],
                Ok(&["Observation"]),
            ),
            (
                &[("_has:Observation:subject:_has:AuditEvent:entity:type", "x")],
                Ok(&["Observation", "AuditEvent"]),
            ),
            (
                &[("_has:Observation:subject:performer:Practitioner.name", "x")],
                Ok(&["Observation", "Practitioner"]),
            ),
            (
                &[("_has:Observation:subject:subject:Patient.name", "x")],
                Ok(&["Observation", "Patient"]),
            ),
            (
                &[("_has:Observation:subject:focus.name", "x")],
                Ok(&["Observation", "*"]),
            ),
            (&[("_has:observation:subject:code", "x")], Err(UnknownType)),
            (&[("_has:Observation:subject", "x")], Err(BadQuery)),
            (&[("_has:Observation", "x")], Err(BadQuery)),
            (&[("_has", "x")], Err(BadQuery)),
            (&[("_has:Observation::code", "x")], Err(BadQuery)),
            (&[("subject:Patient.name", "Nguyen")], Ok(&["Patient"])),
            (&[("subject.name", "Nguyen")], Ok(&["*"])),
            (
                &[("subject:Patient.organization:Organization.name", "x")],
                Ok(&["Patient", "Organization"]),
            ),
            (
                &[("subject:Patient.organization.name", "x")],
                Ok(&["Patient", "*"]),
            ),
            (
                &[("subject:Patient._has:Observation:subject:code", "x")],
                Ok(&["Patient", "Observation"]),
            ),
            (&[("subject:Patient.name:exact", "x")], Ok(&["Patient"])),
            (&[("subject:patient.name", "x")], Ok(&["*"])),
            (&[("subject:Nope.name", "x")], Err(UnknownType)),
            (&[("subject.", "x")], Err(BadQuery)),
            (&[(".name", "x")], Err(BadQuery)),
            (
                &[("_type", "Patient,Observation")],
                Ok(&["Patient", "Observation"]),
            ),
            (&[("_type", "Patient,,Observation")], Err(BadQuery)),
            (&[("_type", "")], Err(BadQuery)),
            (&[("_type", "patient")], Err(UnknownType)),
            (&[("_list", "l1")], Ok(&["List"])),
            (&[("_filter", "name eq x")], Ok(&["*"])),
            (&[("_query", "q")], Ok(&["*"])),
            (
                &[
                    ("_include", "Observation:subject:Patient"),
                    ("_revinclude", "Provenance:target"),
                    ("_include", "Observation:performer:Patient"),
                ],
                Ok(&["Patient", "Provenance"]),
            ),
        ];
        for (params, expected) in table {
            check_refs(params, expected);
        }
    }

    fn search(
        ty: Option<&str>,
        compartment: Option<(&str, &str)>,
        params: &[(&str, &str)],
    ) -> Search {
        Search {
            resource_type: ty.map(str::to_string),
            compartment: compartment.map(|(t, i)| (t.to_string(), i.to_string())),
            params: params.iter().map(|(n, v)| qp(n, v)).collect(),
            via_post: false,
        }
    }

    fn check_access(op: FhirOp, expected: &[(&str, Interaction)]) {
        let expected: Vec<(String, Interaction)> =
            expected.iter().map(|(t, i)| (t.to_string(), *i)).collect();
        assert_eq!(op.required_access(), expected, "op {op:?}");
    }

    #[test]
    fn required_access_table() {
        use Interaction::*;
        let s = |t: &str| Some(t.to_string());
        let crit = |ps: &[(&str, &str)]| ps.iter().map(|(n, v)| qp(n, v)).collect::<Vec<_>>();
        let table: Vec<(FhirOp, Vec<(&str, Interaction)>)> = vec![
            (FhirOp::Capabilities, vec![]),
            (FhirOp::GraphQl, vec![]),
            (
                FhirOp::Read {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                },
                vec![("Patient", Read)],
            ),
            (
                FhirOp::Vread {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    version: "2".into(),
                },
                vec![("Patient", Vread)],
            ),
            (
                FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: None,
                },
                vec![("Patient", Create)],
            ),
            (
                FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: Some(crit(&[("identifier", "a|b")])),
                },
                vec![("Patient", Create), ("Patient", Search)],
            ),
            (
                FhirOp::Create {
                    resource_type: "Patient".into(),
                    resource: None,
                    if_none_exist: Some(crit(&[("_has:Observation:subject:code", "x")])),
                },
                vec![
                    ("Patient", Create),
                    ("Patient", Search),
                    ("Observation", Search),
                ],
            ),
            (
                FhirOp::Update {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    resource: None,
                },
                vec![("Patient", Update)],
            ),
            (
                FhirOp::Patch {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                    patch: None,
                },
                vec![("Patient", Update)],
            ),
            (
                FhirOp::ConditionalUpdate {
                    resource_type: "Patient".into(),
                    criteria: crit(&[("identifier", "a|b")]),
                    resource: None,
                },
                vec![("Patient", Update), ("Patient", Search)],
            ),
            (
                FhirOp::ConditionalPatch {
                    resource_type: "Patient".into(),
                    criteria: crit(&[("general-practitioner:Practitioner.name", "x")]),
                    patch: None,
                },
                vec![
                    ("Patient", Update),
                    ("Patient", Search),
                    ("Practitioner", Search),
                ],
            ),
            (
                FhirOp::Delete {
                    resource_type: "Patient".into(),
                    id: "p1".into(),
                },
                vec![("Patient", Delete)],
            ),
            (
                FhirOp::ConditionalDelete {
                    resource_type: "Patient".into(),
                    criteria: crit(&[("name", "x")]),
                },
                vec![("Patient", Delete), ("Patient", Search)],
            ),
            (
                FhirOp::Search(search(Some("Patient"), None, &[])),
                vec![("Patient", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Observation"),
                    None,
                    &[("_include", "Observation:subject:Patient")],
                )),
                vec![("Observation", Search), ("Patient", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Observation"),
                    None,
                    &[("_include", "Observation:subject")],
                )),
                vec![("Observation", Search), ("*", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Patient"),
                    None,
                    &[("_revinclude", "Provenance:target")],
                )),
                vec![("Patient", Search), ("Provenance", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Patient"),
                    None,
                    &[("_has:Observation:subject:code", "2345-7")],
                )),
                vec![("Patient", Search), ("Observation", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Observation"),
                    None,
                    &[("subject:Patient.name", "Nguyen")],
                )),
                vec![("Observation", Search), ("Patient", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Observation"),
                    None,
                    &[("subject.name", "Nguyen")],
                )),
                vec![("Observation", Search), ("*", Search)],
            ),
            (
                FhirOp::Search(search(
                    Some("Patient"),
                    None,
                    &[("_include", "Patient:link:Patient")],
                )),
                vec![("Patient", Search)],
            ),
            (
                FhirOp::Search(search(Some("Observation"), Some(("Patient", "p1")), &[])),
                vec![("Observation", Search), ("Patient", Read)],
            ),
            (
                FhirOp::Search(search(None, None, &[("_type", "Patient,Observation")])),
                vec![("Patient", Search), ("Observation", Search)],
            ),
            (
                FhirOp::Search(search(None, None, &[("_id", "x")])),
                vec![("*", Search)],
            ),
            (
                FhirOp::Search(search(Some("Patient"), None, &[("_include", "garbage")])),
                vec![("Patient", Search), ("*", Search)],
            ),
            (
                FhirOp::History {
                    resource_type: s("Patient"),
                    id: s("p1"),
                },
                vec![("Patient", History)],
            ),
            (
                FhirOp::History {
                    resource_type: s("Observation"),
                    id: None,
                },
                vec![("Observation", History)],
            ),
            (
                FhirOp::History {
                    resource_type: None,
                    id: None,
                },
                vec![("*", History)],
            ),
            (
                FhirOp::Operation {
                    name: "everything".into(),
                    resource_type: s("Patient"),
                    id: s("p1"),
                },
                vec![],
            ),
            (
                FhirOp::Bundle {
                    transaction: true,
                    entries: vec![],
                },
                vec![],
            ),
        ];
        for (op, expected) in table {
            check_access(op, &expected);
        }
    }
}
