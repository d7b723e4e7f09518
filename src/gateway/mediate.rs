//! Mediated exchanges: requests the gateway performs itself because the decision needs data the
//! request alone does not carry — writes (checked against the new and the current version, and
//! pinned with `If-Match`), reads whose single resource must be checked before a status is sent,
//! and batch/transaction Bundles. The exchange uses our own HTTP client; the result is written
//! to the client in one piece.

use bytes::Bytes;
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::outcome::Stock;
use fhirgate_core::fhir::page::seal_bundle;
use fhirgate_core::fhir::request::{FhirOp, Interaction, QueryParam};
use fhirgate_core::fhir::subset::strip_query;
use fhirgate_core::policy::decide::{
    Decision, Deny, Permit, ResponseNeed, WriteCheck, has_contains,
};
use fhirgate_core::policy::filter::{check_resource, filter_value};
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::Value;

use super::Gateway;
use super::authorize::Mediation;
use super::check;
use super::ctx::Mode;
use super::ctx::RequestCtx;
use super::filter::rewrite_urls;
use super::respond;

/// Request headers passed on to the upstream in a mediated exchange.
const PASSED_REQUEST_HEADERS: [&str; 7] = [
    "content-type",
    "if-match",
    "if-none-match",
    "if-none-exist",
    "if-modified-since",
    "prefer",
    "accept",
];
/// Response headers passed back to the client.
const PASSED_RESPONSE_HEADERS: [&str; 4] =
    ["etag", "last-modified", "location", "content-location"];

struct Upstream {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    is_json: bool,
}

enum Failure {
    Answer(Outcome, &'static str),
}

type Step<T> = std::result::Result<T, Failure>;

/// How a mediated exchange ended.
enum Done {
    /// The answer to write: status, headers, body.
    Answer(u16, Vec<(&'static str, String)>, Bytes),
    /// Check mode: every check passed and the request would be sent now; for a Bundle, its
    /// entries' denials.
    WouldSend(Vec<Option<Deny>>),
}

fn forbid(label: &'static str) -> Failure {
    Failure::Answer(Outcome::Forbidden, label)
}

impl Gateway {
    fn upstream_url(
        &self,
        ctx: &RequestCtx,
        path: &str,
        query: Option<&str>,
        extra: &[QueryParam],
    ) -> String {
        let base = &ctx.binding(&self.state).upstream.base_url;
        super::forward::upstream_target(base, path, query, extra)
    }

    async fn exchange(
        &self,
        ctx: &RequestCtx,
        session: &Session,
        method: http::Method,
        url: String,
        body: Option<Bytes>,
        overrides: &[(&str, String)],
    ) -> Step<Upstream> {
        // A permission check reads, never writes: the last line of defence.
        if ctx.mode == Mode::Check && method != http::Method::GET {
            return Err(Failure::Answer(Outcome::Forbidden, "check_would_write"));
        }
        let mut rb = self.http.request(method, url);
        let req = session.req_header();
        for name in PASSED_REQUEST_HEADERS {
            if overrides.iter().any(|(k, _)| *k == name) {
                continue;
            }
            if let Some(v) = req.headers.get(name) {
                rb = rb.header(name, v.as_bytes());
            }
        }
        // An empty override removes the client's header instead of sending an empty one.
        for (k, v) in overrides.iter().filter(|(_, v)| !v.is_empty()) {
            rb = rb.header(*k, v.as_str());
        }
        let binding = ctx.binding(&self.state);
        for (name, value) in super::forward::upstream_identity(ctx, &binding.upstream).headers() {
            rb = rb.header(name, value);
        }
        if let Some(ip) = ctx.client_ip {
            rb = rb.header("x-forwarded-for", ip.to_string());
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = rb.send().await.map_err(|e| {
            if e.is_timeout() {
                Failure::Answer(Stock::UpstreamTimedOut.outcome(), "upstream_timeout")
            } else {
                Failure::Answer(Stock::UpstreamUnavailable.outcome(), "upstream_error")
            }
        })?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let is_json = ct.contains("json");
        let headers = PASSED_RESPONSE_HEADERS
            .iter()
            .filter_map(|h| {
                resp.headers()
                    .get(*h)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| {
                        let base = binding.upstream.base_url.as_str();
                        (*h, super::filter::rewrite_url(&self.state.config, base, v))
                    })
            })
            .collect();
        let limit = self.state.config.max_response_buffer;
        if resp.content_length().is_some_and(|n| n as usize > limit) {
            return Err(Failure::Answer(
                Stock::UpstreamResponseTooLarge.outcome(),
                "too_large",
            ));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|_| Failure::Answer(Stock::UpstreamIncomplete.outcome(), "upstream_error"))?;
        if body.len() > limit {
            return Err(Failure::Answer(
                Stock::UpstreamResponseTooLarge.outcome(),
                "too_large",
            ));
        }
        Ok(Upstream {
            status,
            headers,
            body,
            is_json,
        })
    }

    /// Reads the current version of `Type/id` from the upstream: `None` when it does not exist.
    async fn current(
        &self,
        ctx: &RequestCtx,
        session: &Session,
        ty: &str,
        id: &str,
    ) -> Step<Option<Value>> {
        let url = format!(
            "{}/{}/{}",
            ctx.binding(&self.state).upstream.base_url,
            ty,
            id
        );
        let up = self
            .exchange(
                ctx,
                session,
                http::Method::GET,
                url,
                None,
                &[
                    ("accept", "application/fhir+json".into()),
                    ("if-none-match", String::new()),
                ],
            )
            .await?;
        match up.status {
            200 => serde_json::from_slice(&up.body).map(Some).map_err(|_| {
                Failure::Answer(Stock::UpstreamMalformedJson.outcome(), "upstream_error")
            }),
            404 | 410 => Ok(None),
            _ => Err(Failure::Answer(
                Stock::CurrentVersionUnreadable.outcome(),
                "upstream_error",
            )),
        }
    }
}

fn version_of(resource: &Value) -> Option<String> {
    resource
        .get("meta")?
        .get("versionId")?
        .as_str()
        .map(|v| format!("W/\"{v}\""))
}

fn parse_json(body: &Option<Bytes>) -> Step<Value> {
    let b = body
        .as_ref()
        .ok_or_else(|| Failure::Answer(Stock::MissingBody.outcome(), "bad_body"))?;
    serde_json::from_slice(b).map_err(|_| Failure::Answer(Stock::InvalidJson.outcome(), "bad_body"))
}

/// Write step of create/update/patch: the checks of docs/medplum-compat.md §4.5, stricter where the contract
/// says so. Returns the body to send and the `If-Match` to pin.
async fn prepare_write(
    gw: &Gateway,
    ctx: &RequestCtx,
    session: &Session,
    m: &Mediation,
) -> Step<(
    http::Method,
    String,
    Option<Bytes>,
    Vec<(&'static str, String)>,
)> {
    let policy = &m.policy;
    let req = session.req_header();
    let query = req.uri.query();
    match &m.op {
        FhirOp::Create {
            resource_type,
            if_none_exist,
            ..
        } => {
            // If-None-Exist makes the upstream search: where the caller's view is narrowed, the
            // probe is narrowed the same way (exactly, or it is refused), so a match or a miss
            // can only be about resources the caller may see.
            let mut probe_headers = Vec::new();
            if if_none_exist.is_some()
                && policy.instance_checks_needed(resource_type.as_str(), Interaction::Search)
            {
                // A probe the upstream cannot narrow exactly is refused.
                let Some(narrowed) = policy
                    .probe_narrowing(resource_type)
                    .filter(|n| gw.state.config.upstream_contains_search || !has_contains(n))
                else {
                    return Err(forbid("conditional_create_with_criteria"));
                };
                let original = req
                    .headers
                    .get("if-none-exist")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let mut value = original;
                for p in narrowed {
                    value.push('&');
                    value.push_str(
                        &form_urlencoded::Serializer::new(String::new())
                            .append_pair(&p.name, &p.value)
                            .finish(),
                    );
                }
                probe_headers.push(("if-none-exist", value));
            }
            let mut resource = parse_json(&m.body)?;
            policy
                .check_create(&mut resource)
                .map_err(|r| forbid(r.label()))?;
            let body = serde_json::to_vec(&resource).unwrap_or_default();
            probe_headers.push(("content-type", "application/fhir+json".into()));
            Ok((
                http::Method::POST,
                gw.upstream_url(ctx, resource_type, query, &[]),
                Some(Bytes::from(body)),
                probe_headers,
            ))
        }
        FhirOp::Update {
            resource_type, id, ..
        }
        | FhirOp::Patch {
            resource_type, id, ..
        } => {
            let current = gw.current(ctx, session, resource_type, id).await?;
            let mut new = match (&m.op, &current) {
                (FhirOp::Patch { .. }, None) => {
                    return Err(Failure::Answer(Outcome::NotFound, "not_found"));
                }
                (FhirOp::Patch { .. }, Some(cur)) => {
                    let patch_doc = parse_json(&m.body)?;
                    fhirgate_core::fhir::patch::apply_json_patch(cur, &patch_doc).map_err(|e| {
                        match e {
                            fhirgate_core::fhir::patch::PatchError::NotJsonPatch => {
                                Failure::Answer(Stock::JsonPatchOnly.outcome(), "bad_patch")
                            }
                            other => {
                                Failure::Answer(Outcome::BadRequest(other.to_string()), "bad_patch")
                            }
                        }
                    })?
                }
                _ => parse_json(&m.body)?,
            };
            // Checked as it will be stored: under the id of the path.
            if let Some(obj) = new.as_object_mut() {
                obj.insert("id".into(), Value::String(id.clone()));
            }
            let mut pin = Vec::new();
            match &current {
                Some(cur) => {
                    if policy.satisfied(cur, Interaction::Read).is_none()
                        && policy.satisfied(cur, Interaction::Update).is_none()
                    {
                        return Err(Failure::Answer(
                            Outcome::NotFound,
                            "current_outside_criteria",
                        ));
                    }
                    policy
                        .check_write(&mut new, Some(cur))
                        .map_err(|r| forbid(r.label()))?;
                    refuse_stale_if_match(session, cur)?;
                    if let Some(v) = version_of(cur) {
                        pin.push(("if-match", v));
                    }
                }
                None => {
                    // Update-as-create: a client's If-Match names a version that is not there.
                    if req.headers.contains_key("if-match") {
                        return Err(Failure::Answer(
                            Stock::VersionMismatch.outcome(),
                            "version_mismatch",
                        ));
                    }
                    policy
                        .check_write(&mut new, None)
                        .map_err(|r| forbid(r.label()))?;
                    pin.push(("if-none-match", "*".into()));
                }
            }
            pin.push(("content-type", "application/fhir+json".into()));
            let body = serde_json::to_vec(&new).unwrap_or_default();
            Ok((
                http::Method::PUT,
                gw.upstream_url(ctx, &format!("{resource_type}/{id}"), None, &[]),
                Some(Bytes::from(body)),
                pin,
            ))
        }
        FhirOp::Delete { resource_type, id } => {
            let current = gw.current(ctx, session, resource_type, id).await?;
            let Some(cur) = current else {
                return Err(Failure::Answer(Outcome::NotFound, "not_found"));
            };
            current_grants(policy, &cur, Interaction::Delete)?;
            refuse_stale_if_match(session, &cur)?;
            let pin = version_of(&cur)
                .map(|v| vec![("if-match", v)])
                .unwrap_or_default();
            Ok((
                http::Method::DELETE,
                gw.upstream_url(ctx, &format!("{resource_type}/{id}"), None, &[]),
                None,
                pin,
            ))
        }
        _ => Err(forbid("unsupported_write")),
    }
}

/// Checks a batch or transaction and returns the Bundle to send (denied batch entries removed)
/// and, per original entry, `None` when sent or `Some(deny)` when answered by the gateway.
fn prepare_bundle(m: &Mediation) -> Step<(Value, Vec<Option<Deny>>)> {
    let mut bundle = parse_json(&m.body)?;
    let transaction = matches!(
        m.op,
        FhirOp::Bundle {
            transaction: true,
            ..
        }
    );
    let FhirOp::Bundle { entries, .. } = &m.op else {
        return Err(forbid("not_bundle"));
    };
    let mut verdicts: Vec<Option<Deny>> = Vec::new();
    // The checked (stamped, readonly-stripped, id-less) resource of each allowed create: what
    // is sent is what was checked.
    let mut checked: Vec<Option<Value>> = Vec::new();
    for (decision, entry) in m.entries.iter().zip(entries) {
        let identity_type = entry
            .op
            .as_ref()
            .ok()
            .and_then(FhirOp::resource_type)
            .is_some_and(fhirgate_core::fhir::types::is_control_type);
        let (verdict, resource) = match decision {
            _ if identity_type => (Some(Deny::Forbidden("identity_type_upstream")), None),
            Decision::Deny(d) => (Some(d.clone()), None),
            Decision::Allow(p) => match bundle_entry_check(m, p, entry.op.as_ref().ok()) {
                Ok(resource) => (None, resource),
                Err(d) => (Some(d), None),
            },
        };
        verdicts.push(verdict);
        checked.push(resource);
    }
    if transaction && verdicts.iter().any(Option::is_some) {
        return Err(forbid("transaction_entry_denied"));
    }
    if let Some(list) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        for ((entry, resource), decision) in list.iter_mut().zip(checked).zip(&m.entries) {
            if let (Some(resource), Some(obj)) = (resource, entry.as_object_mut()) {
                obj.insert("resource".into(), resource);
            }
            // Entry results are checked whole: an entry's `_elements` / `_summary` would have
            // the upstream trim what the check reads, so the entry gets whole resources.
            if let Decision::Allow(p) = decision
                && p.response != ResponseNeed::Untouched
                && let Some(url) = entry.pointer_mut("/request/url")
                && let Some((path, query)) = url
                    .as_str()
                    .and_then(|u| u.split_once('?'))
                    .map(|(p, q)| (p.to_string(), strip_query(q)))
            {
                *url = Value::String(if query.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{query}")
                });
            }
        }
        let mut i = 0;
        list.retain(|_| {
            let keep = verdicts.get(i).is_none_or(Option::is_none);
            i += 1;
            keep
        });
    }
    Ok((bundle, verdicts))
}

/// Bundle entries cannot be checked against a current version atomically, so writes that need
/// instance checks are refused inside Bundles; creates are checked against the new resource,
/// which is returned to be sent in place of the client's.
fn bundle_entry_check(
    m: &Mediation,
    permit: &Permit,
    op: Option<&FhirOp>,
) -> Result<Option<Value>, Deny> {
    match (permit.write, op) {
        (
            WriteCheck::Create,
            Some(FhirOp::Create {
                resource: Some(r),
                resource_type,
                if_none_exist,
            }),
        ) => {
            // A conditional create probes existence: only allowed where nothing is hidden.
            if if_none_exist.is_some()
                && m.policy
                    .instance_checks_needed(resource_type.as_str(), Interaction::Search)
            {
                return Err(Deny::Forbidden("conditional_create_with_criteria"));
            }
            let mut resource = r.clone();
            m.policy
                .check_create(&mut resource)
                .map_err(|r| Deny::Forbidden(r.label()))?;
            Ok(Some(resource))
        }
        (WriteCheck::Create, _) => Err(Deny::Forbidden("create_without_body")),
        (
            WriteCheck::Update,
            Some(FhirOp::Update { resource_type, .. } | FhirOp::Patch { resource_type, .. }),
        )
        | (WriteCheck::Delete, Some(FhirOp::Delete { resource_type, .. })) => {
            let i = if permit.write == WriteCheck::Delete {
                Interaction::Delete
            } else {
                Interaction::Update
            };
            if m.policy.instance_checks_needed(resource_type.as_str(), i) {
                Err(Deny::Forbidden("bundle_write_with_criteria"))
            } else {
                Ok(None)
            }
        }
        (WriteCheck::None, _) => Ok(None),
        _ => Err(Deny::Forbidden("bundle_entry")),
    }
}

fn denied_entry(d: &Deny) -> Value {
    let (status, outcome) = match d {
        Deny::Forbidden(_) => ("403 Forbidden", Outcome::Forbidden),
        Deny::BadRequest(_, t) => ("400 Bad Request", Outcome::BadRequest(t.clone())),
    };
    serde_json::json!({"response": {"status": status, "outcome": outcome.to_json()}})
}

async fn run_inner(
    gw: &Gateway,
    session: &mut Session,
    ctx: &RequestCtx,
    m: Mediation,
) -> Step<Done> {
    let method = session.req_header().method.clone();
    let config = &gw.state.config;
    let checking = ctx.mode == Mode::Check;

    if let FhirOp::Bundle { .. } = &m.op {
        let (bundle, verdicts) = prepare_bundle(&m)?;
        if checking {
            return Ok(Done::WouldSend(verdicts));
        }
        if verdicts.iter().all(Option::is_some) {
            // Nothing left to send: the gateway answers every entry itself.
            let kind = if matches!(
                m.op,
                FhirOp::Bundle {
                    transaction: true,
                    ..
                }
            ) {
                "transaction-response"
            } else {
                "batch-response"
            };
            let entries: Vec<Value> = verdicts.iter().flatten().map(denied_entry).collect();
            let body =
                serde_json::json!({"resourceType": "Bundle", "type": kind, "entry": entries});
            return Ok(Done::Answer(
                200,
                Vec::new(),
                Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
            ));
        }
        let body = Bytes::from(serde_json::to_vec(&bundle).unwrap_or_default());
        let up = gw
            .exchange(
                ctx,
                session,
                http::Method::POST,
                gw.upstream_url(ctx, "", None, &[]),
                Some(body),
                &[("content-type", "application/fhir+json".into())],
            )
            .await?;
        let mut value: Value = serde_json::from_slice(&up.body).map_err(|_| {
            Failure::Answer(Stock::UpstreamMalformedJson.outcome(), "upstream_error")
        })?;
        rewrite_urls(
            config,
            &ctx.binding(&gw.state).upstream.base_url,
            &mut value,
        );
        if (200..300).contains(&up.status)
            && let Some(list) = value.get_mut("entry").and_then(Value::as_array_mut)
        {
            let mut sent = std::mem::take(list).into_iter();
            for v in &verdicts {
                match v {
                    Some(d) => list.push(denied_entry(d)),
                    None => list.push(sent.next().unwrap_or(Value::Null)),
                }
            }
        }
        filter_value(&m.policy, &mut value, true);
        // The answers to the batch's searches hand out page handles: sealed for the caller,
        // they page on outside the batch. Nothing else in the batch is sealed.
        if let (FhirOp::Bundle { entries, .. }, Some(list)) =
            (&m.op, value.get_mut("entry").and_then(Value::as_array_mut))
        {
            for (request, answer) in entries.iter().zip(list.iter_mut()) {
                if request.op.as_ref().is_ok_and(FhirOp::answers_with_pages)
                    && let Some(bundle) = answer.get_mut("resource")
                {
                    seal_bundle(bundle, &ctx.page_sealer(&gw.state));
                }
            }
        }
        return Ok(Done::Answer(
            up.status,
            up.headers,
            Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
        ));
    }

    let permit = m.permit.as_ref().ok_or_else(|| forbid("no_permit"))?;
    // Instance history and instance read operations (`$everything`) answer only for an
    // instance the caller may see: otherwise an empty answer and a 404 would tell them apart.
    let guarded = match &m.op {
        FhirOp::History {
            resource_type: Some(ty),
            id: Some(id),
        } => Some((ty, id, Interaction::History)),
        FhirOp::Operation {
            resource_type: Some(ty),
            id: Some(id),
            ..
        } => Some((ty, id, Interaction::Read)),
        _ => None,
    };
    if permit.guard_current
        && let Some((ty, id, interaction)) = guarded
    {
        let visible = gw
            .current(ctx, session, ty, id)
            .await?
            .is_some_and(|cur| m.policy.satisfied(&cur, interaction).is_some());
        if !visible {
            return Err(Failure::Answer(Outcome::NotFound, "outside_criteria"));
        }
    }
    let checked_read =
        permit.write == WriteCheck::None && permit.response == ResponseNeed::CheckResource;
    // A checked read needs the body even when the client only wants the headers.
    let method = if method == http::Method::HEAD && permit.response == ResponseNeed::CheckResource {
        http::Method::GET
    } else {
        method
    };
    let (method, url, body, overrides) = if permit.write != WriteCheck::None {
        if checking {
            // Every check of the write runs (without a body, those of the current version);
            // the write is never sent.
            match &m.body {
                None => check_without_body(gw, ctx, session, &m).await?,
                Some(_) => drop(prepare_write(gw, ctx, session, &m).await?),
            }
            return Ok(Done::WouldSend(Vec::new()));
        }
        prepare_write(gw, ctx, session, &m).await?
    } else if checking && (!checked_read || !matches!(method, http::Method::GET)) {
        // Nothing about the answer is checked before it is sent (a search is filtered entry by
        // entry), or the request is not a read (a conditional write is decided on the server's
        // answer): a check stops here.
        return Ok(Done::WouldSend(Vec::new()));
    } else {
        // A subset is taken here, after the checks: the upstream returns whole resources.
        let query = session.req_header().uri.query();
        let (query, body) = match &permit.subset {
            Some(_) => (
                query.map(strip_query),
                m.body
                    .as_ref()
                    .map(|b| Bytes::from(strip_query(&String::from_utf8_lossy(b)))),
            ),
            None => (query.map(str::to_string), m.body.clone()),
        };
        (
            method,
            gw.upstream_url(ctx, ctx.fhir_rest(), query.as_deref(), &permit.narrowing),
            body,
            // A 304 would confirm that an invisible resource exists and its version: ask for
            // the body and answer the condition here, after the check.
            if checked_read {
                vec![
                    ("if-none-match", String::new()),
                    ("if-modified-since", String::new()),
                ]
            } else {
                Vec::new()
            },
        )
    };
    let up = gw
        .exchange(ctx, session, method, url, body, &overrides)
        .await?;
    if up.body.is_empty() {
        return Ok(Done::Answer(up.status, up.headers, up.body));
    }
    if !up.is_json {
        if (200..300).contains(&up.status) {
            return Err(Failure::Answer(
                Stock::UpstreamNotJson.outcome(),
                "unfilterable",
            ));
        }
        return Ok(Done::Answer(
            up.status,
            Vec::new(),
            Bytes::from(Stock::UpstreamError.outcome().to_bytes()),
        ));
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(&up.body) else {
        return Err(Failure::Answer(
            Stock::UpstreamMalformedJson.outcome(),
            "upstream_error",
        ));
    };
    rewrite_urls(
        config,
        &ctx.binding(&gw.state).upstream.base_url,
        &mut value,
    );
    let visible = match permit.response {
        ResponseNeed::CheckResource
            if value.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome") =>
        {
            let i = if matches!(m.op, FhirOp::Vread { .. }) {
                Interaction::Vread
            } else {
                Interaction::Read
            };
            check_resource(&m.policy, &mut value, i)
                || binary_visible_through_context(gw, ctx, session, &m, &value).await?
        }
        _ => filter_value(&m.policy, &mut value, permit.drop_total),
    };
    if !visible {
        if permit.write != WriteCheck::None {
            // Written but not readable by the caller: say so without the content.
            return Ok(Done::Answer(up.status, up.headers, Bytes::new()));
        }
        return Err(Failure::Answer(Outcome::NotFound, "outside_criteria"));
    }
    if checked_read && up.status == 200 && not_modified(session, &up.headers) {
        return Ok(Done::Answer(304, up.headers, Bytes::new()));
    }
    if let Some(subset) = &permit.subset {
        subset.apply_to_response(&mut value);
    }
    // Paged answers (HAPI's `$everything` and `_history`) hand out page handles too.
    if m.op.answers_with_pages() {
        seal_bundle(&mut value, &ctx.page_sealer(&gw.state));
    }
    Ok(Done::Answer(
        up.status,
        up.headers,
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
    ))
}

/// The client's `If-None-Match` names the version the upstream answered with (weak compare).
fn not_modified(session: &Session, headers: &[(&'static str, String)]) -> bool {
    let Some(wanted) = session
        .req_header()
        .headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(etag) = headers.iter().find(|(k, _)| *k == "etag").map(|(_, v)| v) else {
        return false;
    };
    respond::etag_listed(wanted, etag)
}

/// A write the gateway pins to the version it checked answers 412 itself when the client's own
/// `If-Match` names another version: the upstream then gets the version the gateway checked,
/// never the client's, because servers differ on what they do with one they cannot parse (HAPI:
/// a 500 for a non-numeric version) or on a DELETE (HAPI ignores `If-Match` there).
fn refuse_stale_if_match(session: &Session, current: &Value) -> Step<()> {
    let Some(wanted) = session
        .req_header()
        .headers
        .get("if-match")
        .map(|v| v.to_str().unwrap_or(""))
    else {
        return Ok(());
    };
    // `*` matches a resource that exists, with or without a version.
    let any = wanted.split(',').any(|w| w.trim() == "*");
    if any || version_of(current).is_some_and(|v| respond::etag_listed(wanted, &v)) {
        return Ok(());
    }
    Err(Failure::Answer(
        Stock::VersionMismatch.outcome(),
        "version_mismatch",
    ))
}

/// FHIR's rule for `Binary`: one that does not satisfy the policy itself is readable when the
/// resource its `securityContext` points to is. Only reads; writes must satisfy the policy.
async fn binary_visible_through_context(
    gw: &Gateway,
    ctx: &RequestCtx,
    session: &Session,
    m: &Mediation,
    binary: &Value,
) -> Step<bool> {
    if binary.get("resourceType").and_then(Value::as_str) != Some("Binary") {
        return Ok(false);
    }
    let Some((ty, id)) = binary
        .get("securityContext")
        .and_then(|c| c.get("reference"))
        .and_then(Value::as_str)
        .and_then(|r| r.split_once('/'))
    else {
        return Ok(false);
    };
    if !fhirgate_core::fhir::types::is_resource_type(ty)
        || !fhirgate_core::fhir::path::is_valid_id(id)
        || ty == "Binary"
        || !m.policy.type_allows(ty, Interaction::Read, m.super_admin)
    {
        return Ok(false);
    }
    Ok(gw
        .current(ctx, session, ty, id)
        .await?
        .is_some_and(|target| m.policy.satisfied(&target, Interaction::Read).is_some()))
}

/// Runs a mediated exchange and answers the client. Returns the status written.
pub async fn run(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    m: Mediation,
) -> Result<u16> {
    ctx.upstream_started = Some(std::time::Instant::now());
    let result = run_inner(gw, session, ctx, m).await;
    ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
    if ctx.mode == Mode::Check {
        return answer_check(session, ctx, result).await;
    }
    match result {
        Ok(Done::WouldSend(_)) => Err(Error::explain(
            ErrorType::InternalError,
            "a served request stopped before it was sent",
        )),
        Ok(Done::Answer(status, headers, body)) => {
            let ct = if body.is_empty() {
                "application/fhir+json"
            } else {
                "application/fhir+json; charset=utf-8"
            };
            let headers = super::cors::with_cors(&headers, ctx.cors.as_ref());
            respond::write(session, status, ct, &headers, body).await?;
            Ok(status)
        }
        Err(Failure::Answer(outcome, label)) => {
            ctx.decision = label;
            let cors = super::cors::with_cors(&[], ctx.cors.as_ref());
            respond::outcome(session, &outcome, &cors).await
        }
    }
}

/// The check's answer: the verdict of what the exchange found.
async fn answer_check(
    session: &mut Session,
    ctx: &mut RequestCtx,
    result: Step<Done>,
) -> Result<u16> {
    let verdict = match result {
        Ok(Done::WouldSend(entries)) => {
            ctx.decision = "check_allowed";
            check::Verdict::allowed(&entries)
        }
        // A checked read was performed; the caller would get this status.
        Ok(Done::Answer(status, _, _)) if (200..300).contains(&status) || status == 304 => {
            ctx.decision = "check_allowed";
            check::Verdict::allowed(&[])
        }
        // Not there and not visible are one answer, as they are to a request.
        Ok(Done::Answer(404 | 410, _, _)) => {
            ctx.decision = "check_not_found";
            check::Verdict::denied(&Outcome::NotFound, "not_found")
        }
        Ok(Done::Answer(status, _, _)) => {
            ctx.decision = "check_allowed";
            check::Verdict::passed_on(status)
        }
        Err(Failure::Answer(outcome, label)) if check::is_verdict(outcome.status()) => {
            ctx.decision = label;
            check::Verdict::denied(&outcome, check::public_reason(&outcome, label))
        }
        Err(Failure::Answer(outcome, label)) => {
            ctx.decision = label;
            let cors = super::cors::with_cors(&[], ctx.cors.as_ref());
            return respond::outcome(session, &outcome, &cors).await;
        }
    };
    check::answer(session, ctx, verdict).await
}

/// A write asked about without its body (`$check-permission`): the checks that need only the
/// current version. A create is decided at type level; an update or patch needs a current
/// version the caller may update (or, for an update, none: it would create); a delete, what the
/// delete itself checks.
async fn check_without_body(
    gw: &Gateway,
    ctx: &RequestCtx,
    session: &Session,
    m: &Mediation,
) -> Step<()> {
    let (ty, id, patch) = match &m.op {
        FhirOp::Create { .. } => return Ok(()),
        FhirOp::Delete { .. } => return prepare_write(gw, ctx, session, m).await.map(|_| ()),
        FhirOp::Update {
            resource_type, id, ..
        } => (resource_type, id, false),
        FhirOp::Patch {
            resource_type, id, ..
        } => (resource_type, id, true),
        _ => return Err(forbid("unsupported_write")),
    };
    match gw.current(ctx, session, ty, id).await? {
        None if patch => Err(Failure::Answer(Outcome::NotFound, "not_found")),
        None => Ok(()),
        Some(cur) => current_grants(&m.policy, &cur, Interaction::Update),
    }
}

/// The current version a write acts on must grant `interaction`; one the caller cannot even
/// read is "not found" (its existence is not theirs to learn).
fn current_grants(
    policy: &fhirgate_core::policy::EffectivePolicy,
    current: &Value,
    interaction: Interaction,
) -> Step<()> {
    if policy.satisfied(current, interaction).is_some() {
        return Ok(());
    }
    if policy.satisfied(current, Interaction::Read).is_none() {
        return Err(Failure::Answer(
            Outcome::NotFound,
            "current_outside_criteria",
        ));
    }
    Err(forbid("current_outside_criteria"))
}
