//! Opaque page handles: servers that keep a search's results and hand out its further pages by
//! handle (HAPI FHIR: `[base]?_getpages=<id>&_getpagesoffset=20&_count=20`) instead of repeating
//! the query in the `next` link.
//!
//! Such a link carries none of the narrowing the gateway added to the first request, and the
//! handle is global to the server: anyone holding it reads the next page. So the gateway seals
//! every handle it hands out to the caller it hands it to (a keyed hash of the handle and the
//! caller, appended as [`SEAL_PARAM`]), and follows a handle only with a seal made for the
//! caller presenting it. The keyed hash lives with the gateway; this module finds handles in
//! links, adds seals and takes them off again.

use serde_json::Value;

use super::request::QueryParam;
use super::search::retain_pairs;

/// The query parameter naming a page handle.
pub const HANDLE_PARAM: &str = "_getpages";

/// [`HANDLE_PARAM`] and its `=`, spelled out so the scan of a body allocates nothing.
const HANDLE_NEEDLE: &[u8] = b"_getpages=";

/// The gateway's seal on a page link; never forwarded upstream.
pub const SEAL_PARAM: &str = "_fhirgate_seal";

/// The parameters a page request may carry: the handle, its seal, and what the server put in
/// the link beside them (offset, page id, page size, bundle type, includes, format). Anything
/// else could make the server do something else than hand out the page; whatever it returns is
/// checked resource by resource.
pub const PAGE_PARAMS: [&str; 10] = [
    HANDLE_PARAM,
    SEAL_PARAM,
    "_getpagesoffset",
    "_pageId",
    "_count",
    "_bundletype",
    "_include",
    "_revinclude",
    "_format",
    "_pretty",
];

/// The `_bundletype` values a page may ask for: the kinds of Bundle a search or a history
/// makes. Another (`batch-response`) would be filtered as answers to requests, totals and all.
pub const PAGE_BUNDLE_TYPES: [&str; 2] = ["searchset", "history"];

/// The handle and seal of a page request, when `params` name a handle.
pub fn page_request(params: &[QueryParam]) -> Option<(&str, Option<&str>)> {
    let handle = params.iter().find(|p| p.name == HANDLE_PARAM)?;
    let seal = params.iter().find(|p| p.name == SEAL_PARAM);
    Some((handle.value.as_str(), seal.map(|p| p.value.as_str())))
}

/// `query` without the seal, re-encoded; other pairs keep their order.
pub fn without_seal(query: &str) -> String {
    retain_pairs(query, |name, _| name != SEAL_PARAM)
}

/// Seals the page links of a search or history answer: each `link[].url` of the Bundle naming a
/// handle gets `&_fhirgate_seal=<seal(handle)>` (any seal already there is replaced). Only a
/// Bundle the server made for the request is sealed (`searchset` or `history`, at the top),
/// never one it stores: a stored Bundle's links are whatever its author wrote, and sealing them
/// would hand out seals for handles of the author's choosing. Callers seal only answers to
/// searches, histories, pages and read operations. Bodies naming no handle come back as they
/// were.
pub fn seal_links(body: Vec<u8>, seal: impl Fn(&str) -> String) -> Vec<u8> {
    if memchr::memmem::find(&body, HANDLE_NEEDLE).is_none() {
        return body;
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    if !seal_bundle(&mut value, &seal) {
        return body;
    }
    serde_json::to_vec(&value).unwrap_or(body)
}

/// [`seal_links`] on a parsed Bundle (an answer the gateway holds parsed anyway: a mediated one,
/// or a batch response's answer to a search entry); true when a link changed.
pub fn seal_bundle(bundle: &mut Value, seal: &impl Fn(&str) -> String) -> bool {
    let generated = matches!(
        bundle.get("type").and_then(Value::as_str),
        Some("searchset" | "history")
    );
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") || !generated {
        return false;
    }
    let mut changed = false;
    for link in bundle
        .get_mut("link")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let Some(url) = link.get("url").and_then(Value::as_str) else {
            continue;
        };
        if let Some(sealed) = seal_url(url, seal) {
            link["url"] = Value::String(sealed);
            changed = true;
        }
    }
    changed
}

/// `url` with its handle sealed, or `None` when it names no handle.
fn seal_url(url: &str, seal: &impl Fn(&str) -> String) -> Option<String> {
    let (base, query) = url.split_once('?')?;
    let handle = form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == HANDLE_PARAM)
        .map(|(_, v)| v.into_owned())?;
    let sealed = form_urlencoded::Serializer::new(without_seal(query))
        .append_pair(SEAL_PARAM, &seal(&handle))
        .finish();
    Some(format!("{base}?{sealed}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qp(name: &str, value: &str) -> QueryParam {
        QueryParam {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn the_needle_is_the_handle_parameter() {
        assert_eq!(HANDLE_NEEDLE, format!("{HANDLE_PARAM}=").as_bytes());
    }

    #[test]
    fn a_page_request_names_its_handle_and_seal() {
        assert_eq!(page_request(&[qp("_count", "2")]), None);
        assert_eq!(
            page_request(&[qp("_getpages", "h1"), qp("_getpagesoffset", "2")]),
            Some(("h1", None))
        );
        assert_eq!(
            page_request(&[qp("_fhirgate_seal", "s"), qp("_getpages", "h1")]),
            Some(("h1", Some("s")))
        );
    }

    #[test]
    fn the_seal_never_goes_upstream() {
        assert_eq!(
            without_seal("_getpages=h1&_fhirgate_seal=abc&_getpagesoffset=2"),
            "_getpages=h1&_getpagesoffset=2"
        );
        assert_eq!(without_seal("_getpages=h%201"), "_getpages=h+1");
        // However its name is spelled.
        assert_eq!(
            without_seal("_getpages=h1&_fhirgate%5Fseal=abc"),
            "_getpages=h1"
        );
    }

    #[test]
    fn page_links_are_sealed_and_others_left_alone() {
        let body = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [
                {"relation": "self", "url": "https://gw/fhir/R4/Patient?_count=2"},
                {"relation": "next", "url": "https://gw/fhir/R4?_getpages=h1&_getpagesoffset=2&_count=2&_fhirgate_seal=forged"}
            ],
            "entry": [{"resource": {"resourceType": "Patient", "id": "p1", "note": "_getpages=x"}}]
        });
        let out = seal_links(serde_json::to_vec(&body).unwrap(), |h| format!("S({h})"));
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["link"][0], body["link"][0]);
        assert_eq!(
            out["link"][1]["url"],
            "https://gw/fhir/R4?_getpages=h1&_getpagesoffset=2&_count=2&_fhirgate_seal=S%28h1%29"
        );
        assert_eq!(out["entry"], body["entry"]);

        let plain = serde_json::to_vec(&json!({"resourceType": "Bundle", "link": []})).unwrap();
        assert_eq!(seal_links(plain.clone(), |_| unreachable!()), plain);
        // Only a Bundle the server made: a stored one (any other type), or one inside an entry
        // (a stored Bundle found by a search), keeps its author's links unsealed.
        let nested = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": {"resourceType": "Bundle", "type": "searchset", "link": [
                {"relation": "next", "url": "https://gw/fhir/R4?_getpages=h2"}]}}]});
        let bytes = serde_json::to_vec(&nested).unwrap();
        assert_eq!(seal_links(bytes.clone(), |h| format!("S{h}")), bytes);
        let stored = json!({"resourceType": "Bundle", "type": "collection", "link": [
            {"relation": "next", "url": "x?_getpages=h3"}]});
        let bytes = serde_json::to_vec(&stored).unwrap();
        assert_eq!(seal_links(bytes.clone(), |h| format!("S{h}")), bytes);
        let mut history = json!({"resourceType": "Bundle", "type": "history", "link": [
            {"relation": "next", "url": "x?_getpages=h4"}]});
        assert!(seal_bundle(&mut history, &|h: &str| format!("S{h}")));
        assert_eq!(
            history["link"][0]["url"],
            "x?_getpages=h4&_fhirgate_seal=Sh4"
        );
        let not_json = b"_getpages=h1 {".to_vec();
        assert_eq!(seal_links(not_json.clone(), |_| "s".into()), not_json);
    }
}
