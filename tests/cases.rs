//! The policy conformance corpus (`tests/cases/*.json`, format in its README), run end to end:
//! one named trial per case, through a real fhirgate in front of the real FHIR test upstream.
//! `cargo test --test cases -- 031` runs one case.
//!
//! Cases listed in `EXPECTED_FAILURES` are known gaps: they still run, and the runner reports a
//! failure if one of them starts passing, so the list only ever shrinks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use base64::Engine;
use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway};
use common::upstream::{FhirUpstream, http_request};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};

/// Known gaps, by file stem. Keep each with a reason.
const EXPECTED_FAILURES: &[(&str, &str)] = &[];

/// What legitimately differs when the upstream is HAPI FHIR (the test command's second pass,
/// `FHIRGATE_TEST_UPSTREAM=hapi`): per case, why, and the `expect` keys that replace the
/// corpus' there (a `status` replaces `status_in` and the other way round). Everything else the
/// case expects, its `not_ids` above all, still holds on HAPI.
const HAPI_DIFFERENCES: &[(&str, &str, &str)] = &[
    (
        "301-param-patient-defaults-to-client",
        "%patient becomes ClientApplication/<id>, a Medplum type: HAPI refuses the narrowed \
         search (HAPI-1250 unsupported resource type) instead of answering it empty",
        r#"{"status": 400, "total_max": null}"#,
    ),
    (
        "335-compartment-search-other-patient",
        "HAPI's JPA server has no compartment search URLs (Patient/p2/Observation): 400",
        r#"{"status": 400}"#,
    ),
    (
        "336-compartment-search-own-patient",
        "HAPI's JPA server has no compartment search URLs (Patient/p1/Observation): 400",
        r#"{"status": 400}"#,
    ),
    (
        "403-conditional-create-match-outside-criteria",
        "HAPI refuses a conditional create whose resource does not match its own If-None-Exist \
         (HAPI-0929; the case's Patient carries another MRN): 400, nothing created or revealed",
        r#"{"status": 400}"#,
    ),
    (
        "477-compartment-stamped-on-create",
        "meta.account is Medplum's element: HAPI does not keep it, so the stamped compartment is \
         lost and the new Patient falls outside its creator's _compartment criteria",
        r#"{"response_fields": {"meta.account.reference": null}}"#,
    ),
    (
        "479-compartment-search-sees-own-organization",
        "meta.account is Medplum's element: HAPI does not keep it, so no Patient is in \
         Organization/A's account compartment and the search finds none (never pb)",
        r#"{"ids": []}"#,
    ),
    (
        "480-transaction-create-sent-as-checked",
        "meta.account is Medplum's element: HAPI does not keep it, so the created Patient is \
         outside its creator's _compartment criteria and its entry answers 404",
        r#"{"entry_status": [404], "response_fields": {}}"#,
    ),
];

/// The case's expectation on this run's upstream: the corpus' own, with [`HAPI_DIFFERENCES`]
/// applied on the HAPI pass.
fn expectation(name: &str, expect: &Value) -> Value {
    let mut expect = expect.clone();
    if !common::upstream::on_hapi() {
        return expect;
    }
    let Some((_, _, changes)) = HAPI_DIFFERENCES.iter().find(|(n, _, _)| *n == name) else {
        return expect;
    };
    let changes: Value = serde_json::from_str(changes).expect("HAPI_DIFFERENCES holds JSON");
    for (key, value) in changes.as_object().into_iter().flatten() {
        match key.as_str() {
            "status" => drop(expect.as_object_mut().and_then(|o| o.remove("status_in"))),
            "status_in" => drop(expect.as_object_mut().and_then(|o| o.remove("status"))),
            _ => {}
        }
        if value.is_null() {
            expect.as_object_mut().and_then(|o| o.remove(key));
        } else {
            expect[key] = value.clone();
        }
    }
    expect
}

struct World {
    upstream: FhirUpstream,
    gateway: TestGateway,
    admin_token: String,
    project: String,
}

fn world() -> &'static Mutex<World> {
    static W: OnceLock<Mutex<World>> = OnceLock::new();
    W.get_or_init(|| {
        let upstream = FhirUpstream::start();
        // The test upstream builds its GraphQL schema on first use, which can take longer than
        // the gateway's 5 s upstream deadline on a busy machine: build it before any case runs.
        let warm = upstream.fhir("POST", "$graphql", Some(&serde_json::json!({"query": "{ PatientList { id } }"})));
        assert!(warm.status < 500, "GraphQL warm-up: {}", warm.status);
        let gateway = TestGateway::start(&upstream.base_url);
        let token = gateway_request(&gateway, "POST", "oauth2/token", &[("content-type", "application/x-www-form-urlencoded")], Some(format!("grant_type=client_credentials&client_id={ADMIN_CLIENT_ID}&client_secret={ADMIN_CLIENT_SECRET}").into_bytes()));
        let admin_token = token.1["access_token"].as_str().expect("admin token").to_string();
        let me = gateway_request(&gateway, "GET", "auth/me", &[("authorization", &format!("Bearer {admin_token}"))], None);
        let project = me.1["project"]["id"].as_str().expect("project").to_string();
        Mutex::new(World { upstream, gateway, admin_token, project })
    })
}

/// A raw request to the gateway, path sent byte for byte. Returns (status, JSON body or Null, headers).
fn gateway_request(
    gw: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (u16, Value, Vec<(String, String)>) {
    let authority = gw
        .base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let target = format!("/{path}");
    let resp = http_request(&authority, method, &target, headers, body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
    let text = resp.text();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    let hs = resp.headers.clone();
    (resp.status, json, hs)
}

fn admin(w: &World, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let auth = format!("Bearer {}", w.admin_token);
    let mut headers = vec![("authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/fhir+json"));
    }
    let (s, v, _) = gateway_request(
        &w.gateway,
        method,
        path,
        &headers,
        body.map(|b| b.to_string().into_bytes()),
    );
    (s, v)
}

/// Collects every resource in a response body (Bundles recursed; OperationOutcomes skipped).
fn resources(v: &Value, out: &mut Vec<Value>) {
    match v.get("resourceType").and_then(Value::as_str) {
        Some("OperationOutcome") | None => {}
        Some("Bundle") => {
            for e in v["entry"].as_array().into_iter().flatten() {
                if let Some(r) = e.get("resource") {
                    if r["resourceType"] == "Bundle" {
                        resources(r, out);
                    } else if r["resourceType"] != "OperationOutcome" {
                        out.push(r.clone());
                    }
                }
            }
        }
        Some(_) => out.push(v.clone()),
    }
}

fn all_ids(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            if let (Some(Value::String(id)), Some(Value::String(_))) =
                (o.get("id"), o.get("resourceType"))
            {
                out.insert(id.clone());
            }
            o.values().for_each(|x| all_ids(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| all_ids(x, out)),
        _ => {}
    }
}

/// Does the dot path exist anywhere in `v` (arrays traversed element by element)?
fn has_path(v: &Value, path: &[&str]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return !v.is_null();
    };
    match v {
        Value::Array(a) => a.iter().any(|x| has_path(x, path)),
        Value::Object(o) => o.get(*first).is_some_and(|x| has_path(x, rest)),
        _ => false,
    }
}

/// Value at a dot path with numeric array indexes; Null when absent.
fn at_path(v: &Value, path: &str) -> Value {
    let mut cur = v.clone();
    for seg in path.split('.') {
        cur = match (&cur, seg.parse::<usize>()) {
            (Value::Array(a), Ok(i)) => a.get(i).cloned().unwrap_or(Value::Null),
            (Value::Object(o), _) => o.get(seg).cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        };
    }
    cur
}

/// A case's placeholders in `text`: `${vid:Type/id}` is that fixture's stored version, `$target`
/// the on-behalf-of membership (when the case has one).
fn substitute(text: &str, versions: &HashMap<String, String>, target: Option<&str>) -> String {
    let mut out = text.to_string();
    for (k, v) in versions {
        out = out.replace(&format!("${{vid:{k}}}"), v);
    }
    if let Some(t) = target {
        out = out.replace("$target", &format!("ProjectMembership/{t}"));
    }
    out
}

/// The corpus writes `access[].policy` as a reference string; the wire form is a Reference.
fn access_entries(v: Option<&Value>) -> Value {
    let mut list = v.cloned().unwrap_or(json!([]));
    for a in list.as_array_mut().into_iter().flatten() {
        if let Some(s) = a.get("policy").and_then(Value::as_str).map(str::to_string) {
            a["policy"] = json!({"reference": s});
        }
    }
    list
}

fn status_ok(expect: &Value, status: u16) -> bool {
    if let Some(s) = expect.get("status").and_then(Value::as_u64) {
        return status as u64 == s;
    }
    if let Some(list) = expect.get("status_in").and_then(Value::as_array) {
        return list.iter().any(|s| s.as_u64() == Some(status as u64));
    }
    true
}

fn run_case(path: &Path) -> Result<(), String> {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let guard = world().lock().unwrap_or_else(|e| e.into_inner());
    let w = &*guard;
    w.upstream.reset();

    // Fixtures, with their version ids.
    let mut versions: HashMap<String, String> = HashMap::new();
    let mut types: BTreeSet<String> = BTreeSet::new();
    for f in case["fixtures"].as_array().into_iter().flatten() {
        let stored = w.upstream.put_resource(f);
        let key = format!(
            "{}/{}",
            f["resourceType"].as_str().unwrap_or(""),
            f["id"].as_str().unwrap_or("")
        );
        types.insert(f["resourceType"].as_str().unwrap_or("").to_string());
        versions.insert(
            key,
            stored["meta"]["versionId"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    let fixture_requests = w.upstream.requests().len();

    // Policies, under their own ids.
    for p in case["policies"].as_array().into_iter().flatten() {
        let id = p["id"].as_str().ok_or("policy without id")?;
        let (s, body) = admin(w, "PUT", &format!("fhir/R4/AccessPolicy/{id}"), Some(p));
        if !(200..300).contains(&s) {
            return Err(format!("storing policy {id}: {s} {body}"));
        }
    }

    // The caller: a client with the case's membership.
    let caller = &case["caller"];
    let (s, client) = admin(
        w,
        "POST",
        &format!("admin/projects/{}/client", w.project),
        Some(&json!({"name": "case caller"})),
    );
    if s != 201 {
        return Err(format!("creating client: {s} {client}"));
    }
    let client_id = client["id"].as_str().ok_or("client id")?.to_string();
    let secret = client["secret"]
        .as_str()
        .ok_or("client secret")?
        .to_string();
    let (_, found) = admin(
        w,
        "GET",
        &format!("fhir/R4/ProjectMembership?profile=ClientApplication/{client_id}"),
        None,
    );
    let mut membership = found["entry"][0]["resource"].clone();
    let mid = membership["id"]
        .as_str()
        .ok_or("membership id")?
        .to_string();
    membership["access"] = access_entries(caller.get("access"));
    if caller["access"].as_array().is_some_and(|a| !a.is_empty()) {
        membership.as_object_mut().map(|o| o.remove("accessPolicy"));
    }
    membership["admin"] = caller.get("admin").cloned().unwrap_or(json!(false));
    let (s, body) = admin(
        w,
        "POST",
        &format!("admin/projects/{}/members/{mid}", w.project),
        Some(&membership),
    );
    if s != 200 {
        return Err(format!("updating membership: {s} {body}"));
    }

    // On-behalf-of target.
    let mut target_membership = None;
    if let Some(t) = caller.get("target") {
        let email = format!("case-{}@example.com", uuid::Uuid::new_v4().simple());
        let (s, user) = admin(
            w,
            "POST",
            "fhir/R4/User",
            Some(
                &json!({"resourceType": "User", "firstName": "Case", "lastName": "Target", "email": email, "project": {"reference": format!("Project/{}", w.project)}}),
            ),
        );
        if s != 201 {
            return Err(format!("creating target user: {s} {user}"));
        }
        let m = json!({
            "resourceType": "ProjectMembership",
            "project": {"reference": format!("Project/{}", w.project)},
            "user": {"reference": format!("User/{}", user["id"].as_str().unwrap_or(""))},
            "profile": {"reference": t["profile"]},
            "access": access_entries(t.get("access")),
            "admin": t.get("admin").cloned().unwrap_or(json!(false)),
        });
        let (s, body) = admin(w, "POST", "fhir/R4/ProjectMembership", Some(&m));
        if s != 201 {
            return Err(format!("creating target membership: {s} {body}"));
        }
        target_membership = body["id"].as_str().map(str::to_string);
    }

    // Credentials.
    let ip = caller.get("ip").and_then(Value::as_str);
    let scope = caller
        .get("scope")
        .and_then(Value::as_str)
        .unwrap_or("openid");
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("client_id", &client_id)
        .append_pair("client_secret", &secret)
        .append_pair("scope", scope)
        .finish();
    let mut token_headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(ip) = ip {
        token_headers.push(("x-forwarded-for", ip));
    }
    let (ts, tbody, _) = gateway_request(
        &w.gateway,
        "POST",
        "oauth2/token",
        &token_headers,
        Some(form.into_bytes()),
    );
    let authorization = if ts == 200 {
        format!("Bearer {}", tbody["access_token"].as_str().unwrap_or(""))
    } else if ip.is_some() {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"))
        )
    } else {
        return Err(format!("token request failed: {ts} {tbody}"));
    };

    // The request, byte for byte.
    let req = &case["request"];
    let path_s = substitute(req["path"].as_str().unwrap_or(""), &versions, None);
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut has_ct = false;
    for (k, v) in req["headers"].as_object().into_iter().flatten() {
        let mut v = v.as_str().unwrap_or("").to_string();
        if v == "$target" {
            v = format!(
                "ProjectMembership/{}",
                target_membership.clone().unwrap_or_default()
            );
        }
        if k.eq_ignore_ascii_case("x-forwarded-for")
            && let Some(ip) = ip
        {
            v = format!("{v}, {ip}");
        }
        has_ct |= k.eq_ignore_ascii_case("content-type");
        headers.push((k.clone(), v));
    }
    if let Some(ip) = ip
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
    {
        headers.push(("x-forwarded-for".into(), ip.to_string()));
    }
    headers.push(("authorization".into(), authorization));
    let body = match &req["body"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone().into_bytes()),
        other => {
            if !has_ct {
                headers.push(("content-type".into(), "application/fhir+json".into()));
            }
            Some(other.to_string().into_bytes())
        }
    };
    let href: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let method = req["method"].as_str().unwrap_or("GET");

    // The permission check first: the same request, only asked about. It must send nothing
    // but reads upstream, and its verdict must be what the request then gets.
    let sent_before = w.upstream.requests().len();
    let mut check_headers = href.clone();
    check_headers.push(("x-fhirgate-check", "permission"));
    let (check_status, check, check_headers) = gateway_request(
        &w.gateway,
        method,
        &format!("fhir/R4/{path_s}"),
        &check_headers,
        body.clone(),
    );
    let check_sent: Vec<Value> = w
        .upstream
        .requests()
        .into_iter()
        .skip(sent_before)
        .collect();

    let decided = |route: &str, decision: &str| {
        fhirgate::obs::METRICS
            .requests
            .with_label_values(&[route, decision])
            .get()
    };
    let real_before = w.upstream.requests().len();
    let allowed_before = decided("fhir", "allow") + decided("fhir", "allow_bundle");
    let passed_before = decided("control", "pass");
    let (status, resp, _) = gateway_request(
        &w.gateway,
        method,
        &format!("fhir/R4/{path_s}"),
        &href,
        body,
    );
    // What the gateway decided (its own label, whatever the upstream then answered; a write or
    // operation it sent on was let through, whatever it made of the answer), or for the
    // identity types, which the control API serves, what that answered.
    let served = (200..300).contains(&status) || status == 304;
    let sent_on = w
        .upstream
        .requests()
        .into_iter()
        .skip(real_before)
        .any(|r| {
            let sent = r["method"].as_str().unwrap_or("");
            sent != "GET"
                && sent != "HEAD"
                && (sent == method || (method == "PATCH" && sent == "PUT"))
        });
    let gateway_allowed = if decided("control", "pass") > passed_before {
        served
    } else {
        sent_on || decided("fhir", "allow") + decided("fhir", "allow_bundle") > allowed_before
    };

    // Expectations.
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let expect = &expectation(name, &case["expect"]);
    let mut errors = Vec::new();
    if !status_ok(expect, status) {
        errors.push(format!(
            "status {status}, expected {}",
            expect
                .get("status")
                .or(expect.get("status_in"))
                .unwrap_or(&Value::Null)
        ));
    }
    let check = CheckAnswer::of(check_status, &check, &check_headers);
    check_agrees(status, gateway_allowed, &check, &check_sent, &mut errors);
    let mut found = Vec::new();
    resources(&resp, &mut found);
    if !(200..300).contains(&status) && !found.is_empty() {
        errors.push(format!("non-2xx response carries resources: {resp}"));
    }
    let ids: BTreeSet<String> = found
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    if (200..300).contains(&status) {
        if let Some(want) = expect.get("ids").and_then(Value::as_array) {
            let want: BTreeSet<String> = want
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            if want != ids {
                errors.push(format!("ids {ids:?}, expected {want:?}"));
            }
        }
        if let Some(within) = expect.get("ids_within").and_then(Value::as_array) {
            let within: BTreeSet<String> = within
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            if !ids.is_subset(&within) {
                errors.push(format!("ids {ids:?} not within {within:?}"));
            }
        }
        for (id, paths) in expect
            .get("present")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            match found.iter().find(|r| r["id"] == id.as_str()) {
                None => errors.push(format!("{id} missing (present)")),
                Some(r) => {
                    for p in paths
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        if !has_path(r, &p.split('.').collect::<Vec<_>>()) {
                            errors.push(format!("{id}.{p} missing"));
                        }
                    }
                }
            }
        }
        if let Some(max) = expect.get("total_max").and_then(Value::as_u64)
            && let Some(total) = resp.get("total").and_then(Value::as_u64)
            && total > max
        {
            errors.push(format!("total {total} > {max}"));
        }
        if let Some(list) = expect.get("entry_status").and_then(Value::as_array) {
            let entries = resp["entry"].as_array().cloned().unwrap_or_default();
            for (i, want) in list.iter().enumerate() {
                let got = entries
                    .get(i)
                    .and_then(|e| e["response"]["status"].as_str())
                    .and_then(|s| s.split(' ').next())
                    .and_then(|s| s.parse::<u64>().ok());
                let ok = match want {
                    Value::Array(a) => a.iter().any(|x| x.as_u64() == got),
                    x => x.as_u64() == got,
                };
                if !ok {
                    errors.push(format!("entry {i} status {got:?}, expected {want}"));
                }
            }
        }
    }
    // `{dot.path: value}` in the response body (a created resource as the upstream stored it).
    for (p, want) in expect
        .get("response_fields")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let got = at_path(&resp, p);
        if &got != want {
            errors.push(format!("response {p} = {got}, expected {want}"));
        }
    }
    // Every case: a Bundle's links and fullUrls point at the gateway, and the upstream's
    // address appears nowhere in the body.
    // HAPI's page links are on the base itself (`…/fhir/R4?_getpages=…`).
    let public_base = format!("{}fhir/R4", w.gateway.base);
    let upstream_authority = w.upstream.authority();
    if resp.to_string().contains(&upstream_authority) {
        errors.push(format!("the upstream address {upstream_authority} leaked"));
    }
    if resp["resourceType"] == "Bundle" {
        let urls = resp["link"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| &l["url"])
            .chain(
                resp["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| &e["fullUrl"]),
            );
        for url in urls.filter_map(Value::as_str) {
            let on_base = url
                .strip_prefix(&public_base)
                .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('?'));
            if !on_base {
                errors.push(format!("{url} does not point at the gateway"));
            }
        }
    }
    // The `next` page, fetched by the same caller, stays within these ids.
    if let Some(within) = expect.get("next_ids_within").and_then(Value::as_array) {
        let next = resp["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str());
        match next.and_then(|n| n.strip_prefix(w.gateway.base.as_str())) {
            None => errors.push(format!("no next link at the gateway: {}", resp["link"])),
            Some(path) => {
                let (s, page, _) = gateway_request(&w.gateway, "GET", path, &href, None);
                let mut found = Vec::new();
                resources(&page, &mut found);
                let within: BTreeSet<&str> = within.iter().filter_map(Value::as_str).collect();
                let outside: Vec<&str> = found
                    .iter()
                    .filter_map(|r| r["id"].as_str())
                    .filter(|id| !within.contains(id))
                    .collect();
                if s != 200 || !outside.is_empty() || found.is_empty() {
                    errors.push(format!("next page {s}: {outside:?} outside, {page}"));
                }
            }
        }
    }
    if let Some(not) = expect.get("not_ids").and_then(Value::as_array) {
        let mut every = BTreeSet::new();
        all_ids(&resp, &mut every);
        for n in not.iter().filter_map(Value::as_str) {
            if every.contains(n) {
                errors.push(format!("{n} appears in the response"));
            }
        }
    }
    for p in expect
        .get("absent")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let segs: Vec<&str> = p.split('.').collect();
        if found.iter().any(|r| has_path(r, &segs)) {
            errors.push(format!("{p} present in a returned resource"));
        }
    }
    for (id, paths) in expect
        .get("absent_in")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let Some(r) = found.iter().find(|r| r["id"] == id.as_str()) {
            for p in paths
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if has_path(r, &p.split('.').collect::<Vec<_>>()) {
                    errors.push(format!("{id}.{p} present"));
                }
            }
        }
    }
    let seen = w.upstream.requests();
    let after: Vec<&Value> = seen.iter().skip(fixture_requests).collect();
    for h in expect
        .get("upstream_headers_absent")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if after
            .iter()
            .any(|r| r["headers"].get(h.to_ascii_lowercase()).is_some())
        {
            errors.push(format!("upstream saw header {h}"));
        }
    }
    // `{header: value}`: some request the gateway sent upstream carried the header with that
    // value (`${vid:Type/id}` is the fixture's version, `$target` the on-behalf-of membership).
    for (h, want) in expect
        .get("upstream_headers")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let want = substitute(
            want.as_str().unwrap_or(""),
            &versions,
            Some(target_membership.as_deref().unwrap_or_default()),
        );
        let h = h.to_ascii_lowercase();
        if !after
            .iter()
            .any(|r| r["headers"].get(&h).and_then(Value::as_str) == Some(want.as_str()))
        {
            let got: Vec<&Value> = after.iter().map(|r| &r["headers"][&h]).collect();
            errors.push(format!("no upstream request had {h}: {want} (saw {got:?})"));
        }
    }
    // The request itself was forwarded (an upstream answer, not the gateway's).
    if expect.get("upstream_reached").and_then(Value::as_bool) == Some(true) {
        let target = path_s.split('?').next().unwrap_or("");
        if !after.iter().any(|r| {
            r["method"].as_str() == Some(method)
                && r["url"]
                    .as_str()
                    .is_some_and(|u| u.split('?').next().unwrap_or("").ends_with(target))
        }) {
            errors.push(format!("{method} {target} never reached the upstream"));
        }
    }
    if expect.get("upstream_unchanged").and_then(Value::as_bool) == Some(true) {
        for (key, vid) in &versions {
            let r = w.upstream.fhir("GET", key, None);
            if r.status != 200 {
                errors.push(format!("{key} is gone upstream"));
            } else if r.json()["meta"]["versionId"].as_str() != Some(vid.as_str()) {
                errors.push(format!("{key} changed upstream"));
            }
        }
        let mut all_types = types.clone();
        if let Some(t) = path_s
            .split(['/', '?'])
            .next()
            .filter(|t| !t.is_empty() && t.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        {
            all_types.insert(t.to_string());
        }
        if let Some(t) = req["body"].get("resourceType").and_then(Value::as_str) {
            all_types.insert(t.to_string());
        }
        for e in req["body"]["entry"].as_array().into_iter().flatten() {
            if let Some(t) = e["resource"]["resourceType"].as_str() {
                all_types.insert(t.to_string());
            }
        }
        for t in all_types.iter().filter(|t| *t != "Bundle") {
            let r = w.upstream.fhir("GET", &format!("{t}?_count=1000"), None);
            let mut rs = Vec::new();
            resources(&r.json(), &mut rs);
            for res in rs {
                let key = format!("{t}/{}", res["id"].as_str().unwrap_or(""));
                if !versions.contains_key(&key) {
                    errors.push(format!("{key} was created upstream"));
                }
            }
        }
    }
    for (key, fields) in expect
        .get("upstream_fields")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let r = w.upstream.fhir("GET", key, None).json();
        for (p, want) in fields.as_object().into_iter().flatten() {
            let got = at_path(&r, p);
            if &got != want {
                errors.push(format!("upstream {key}.{p} = {got}, expected {want}"));
            }
        }
    }
    for key in expect
        .get("upstream_deleted")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if w.upstream.fhir("GET", key, None).status == 200 {
            errors.push(format!("{key} still exists upstream"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\nresponse: {}", errors.join("\n"), resp))
    }
}

/// A permission check's answer: its verdict (from the body, or from the headers of a `HEAD`),
/// or the error it got.
#[derive(Debug)]
enum CheckAnswer {
    Verdict {
        allowed: bool,
        status: u64,
        body: Value,
    },
    Error(u16, Value),
}

impl CheckAnswer {
    fn of(status: u16, body: &Value, headers: &[(String, String)]) -> CheckAnswer {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if status != 200 {
            return CheckAnswer::Error(status, body.clone());
        }
        let part = |name: &str| {
            body["parameter"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let (allowed, verdict_status) = if body["resourceType"] == "Parameters" {
            (
                part("allowed")["valueBoolean"].as_bool(),
                part("status")["valueInteger"].as_u64(),
            )
        } else {
            (
                header("x-fhirgate-allowed").and_then(|v| v.parse().ok()),
                header("x-fhirgate-status").and_then(|v| v.parse().ok()),
            )
        };
        match (allowed, verdict_status) {
            (Some(allowed), Some(status)) => CheckAnswer::Verdict {
                allowed,
                status,
                body: body.clone(),
            },
            _ => CheckAnswer::Error(status, body.clone()),
        }
    }
}

/// The permission check of a case's request against what the gateway then did with it: allowed
/// exactly when the gateway let the request through, the same status when it refused (or when
/// the check learned the server's answer), an error of its own only where the request got that
/// same error, and nothing but reads sent upstream.
fn check_agrees(
    status: u16,
    gateway_allowed: bool,
    check: &CheckAnswer,
    sent: &[Value],
    errors: &mut Vec<String>,
) {
    for r in sent {
        let m = r["method"].as_str().unwrap_or("");
        if m != "GET" && m != "HEAD" {
            errors.push(format!(
                "the permission check sent {m} {} upstream",
                r["url"]
            ));
        }
    }
    match check {
        CheckAnswer::Error(check_status, body) => {
            if *check_status != status {
                errors.push(format!(
                    "permission check failed with {check_status} {body}, the request got {status}"
                ));
            }
        }
        CheckAnswer::Verdict {
            allowed,
            status: verdict_status,
            body,
        } => {
            // "Not there" and "not yours" are both 404, to a check as to the request.
            let both_not_found = !allowed && *verdict_status == 404 && status == 404;
            if *allowed != gateway_allowed && !both_not_found {
                errors.push(format!(
                    "permission check says allowed={allowed}, the gateway's decision was allowed={gateway_allowed} ({status}): {body}"
                ));
            } else if (!allowed || *verdict_status != 200) && *verdict_status != status as u64 {
                errors.push(format!(
                    "permission check says status {verdict_status}, the request got {status}: {body}"
                ));
            }
        }
    }
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/cases")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let trials = files
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("case")
                .to_string();
            let expected_failure = EXPECTED_FAILURES.iter().any(|(n, _)| *n == name);
            Trial::test(name, move || match (run_case(&path), expected_failure) {
                (Ok(()), false) => Ok(()),
                (Err(e), false) => Err(Failed::from(e)),
                (Err(_), true) => Ok(()),
                (Ok(()), true) => Err(Failed::from(
                    "listed in EXPECTED_FAILURES but passes: remove it from the list",
                )),
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
