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

/// The query parameter naming a page handle.
pub const HANDLE_PARAM: &str = "_getpages";

/// The gateway's seal on a page link; never forwarded upstream.
pub const SEAL_PARAM: &str = "_fhirgate_seal";

/// The parameters a page request may carry: the handle, its seal, and what the server put in
/// the link beside them (offset, page size, bundle type, format). Anything else could make the
/// server do something else than hand out the page.
pub const PAGE_PARAMS: [&str; 7] = [
    HANDLE_PARAM,
    SEAL_PARAM,
    "_getpagesoffset",
    "_count",
    "_bundletype",
    "_format",
    "_pretty",
];

/// The handle and seal of a page request, when `params` name a handle.
pub fn page_request(params: &[QueryParam]) -> Option<(&str, Option<&str>)> {
    let handle = params.iter().find(|p| p.name == HANDLE_PARAM)?;
    let seal = params.iter().find(|p| p.name == SEAL_PARAM);
    Some((handle.value.as_str(), seal.map(|p| p.value.as_str())))
}

/// `query` without the seal, re-encoded; other pairs keep their order.
pub fn without_seal(query: &str) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != SEAL_PARAM {
            out.append_pair(&name, &value);
        }
    }
    out.finish()
}

/// Seals every page link of a Bundle body: each `link[].url` naming a handle gets
/// `&_fhirgate_seal=<seal(handle)>` (any seal already there is replaced), in the Bundle and in
/// the Bundles its entries hold (a batch response's searches). Bodies naming no handle, or that
/// are not a JSON Bundle, come back as they were.
pub fn seal_links(body: Vec<u8>, seal: impl Fn(&str) -> String) -> Vec<u8> {
    let needle = format!("{HANDLE_PARAM}=");
    if memchr::memmem::find(&body, needle.as_bytes()).is_none() {
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

/// Seals the page links of `bundle` and of the Bundles in its entries; true when one changed.
fn seal_bundle(bundle: &mut Value, seal: &impl Fn(&str) -> String) -> bool {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
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
    for entry in bundle
        .get_mut("entry")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(resource) = entry.get_mut("resource") {
            changed |= seal_bundle(resource, seal);
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
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != SEAL_PARAM {
            out.append_pair(&name, &value);
        }
    }
    out.append_pair(SEAL_PARAM, &seal(&handle));
    Some(format!("{base}?{}", out.finish()))
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
        // A batch response: the searchset of an entry is sealed too.
        let batch = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": {"resourceType": "Bundle", "type": "searchset", "link": [
                {"relation": "next", "url": "https://gw/fhir/R4?_getpages=h2"}]}}]});
        let out = seal_links(serde_json::to_vec(&batch).unwrap(), |h| format!("S{h}"));
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out["entry"][0]["resource"]["link"][0]["url"],
            "https://gw/fhir/R4?_getpages=h2&_fhirgate_seal=Sh2"
        );
        let not_json = b"_getpages=h1 {".to_vec();
        assert_eq!(seal_links(not_json.clone(), |_| "s".into()), not_json);
    }
}
