//! The authorization step of the request path: authenticate → effective policy → IP rules →
//! on-behalf-of → classify → decide. Produces a `Verdict`; the gateway acts on it.

use std::sync::Arc;

use bytes::Bytes;
use fhirgate_core::fhir::classify::classify;
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::outcome::Stock;
use fhirgate_core::fhir::request::{FhirOp, RequestParts};
use fhirgate_core::policy::EffectivePolicy;
use fhirgate_core::policy::decide::{self, Decision, Deny, Permit, ResponseNeed};
use pingora::proxy::Session;

use super::Gateway;
use super::ctx::{FilterSpec, ResponsePlan};
use super::ctx::{RequestCtx, page_caller};
use super::names;
use super::names::Present;
use crate::state::standing::StandingError;
use crate::state::{AuthError, CacheUse};

pub enum Verdict {
    /// Forward through pingora (with `ctx.extra_query` and `ctx.plan` set).
    Forward,
    /// The gateway performs the exchange itself (writes, checked reads, Bundles).
    Mediate(Mediation),
    Deny(Outcome, &'static str),
    /// An admin asked for the decision trace (`X-Fhirgate-Explain`): answer it, forward nothing.
    Explain(serde_json::Value),
}

/// What a mediated request needs.
pub struct Mediation {
    pub policy: Arc<EffectivePolicy>,
    pub body: Option<Bytes>,
    pub op: FhirOp,
    pub permit: Option<Permit>,
    /// Entry decisions of a batch or transaction.
    pub entries: Vec<Decision>,
    pub super_admin: bool,
}

fn deny(d: &Deny) -> Verdict {
    match d {
        Deny::Forbidden(l) => Verdict::Deny(Outcome::Forbidden, l),
        Deny::BadRequest(l, t) => Verdict::Deny(Outcome::BadRequest(t.clone()), l),
    }
}

/// A store lookup failed while deciding: fail closed with 503.
fn store_down() -> Verdict {
    Verdict::Deny(
        Stock::CredentialStoreUnavailable.outcome(),
        "store_unavailable",
    )
}

async fn read_body(session: &mut Session, limit: usize) -> Result<Option<Bytes>, Outcome> {
    let mut buf = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(Stock::BodyTooLarge.outcome());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => return Err(Stock::BodyUnreadable.outcome()),
        }
    }
    Ok(if buf.is_empty() {
        None
    } else {
        Some(Bytes::from(buf))
    })
}

pub async fn authorize(gw: &Gateway, session: &mut Session, ctx: &mut RequestCtx) -> Verdict {
    let state = &gw.state;
    let req = session.req_header();
    if ctx.present.has(Present::UPGRADE) {
        return Verdict::Deny(Stock::ProtocolUpgrade.outcome(), "upgrade");
    }
    if ctx.present.has(Present::METHOD_OVERRIDE) {
        return Verdict::Deny(Stock::MethodOverride.outcome(), "method_override");
    }
    let auth_header = req
        .headers
        .get(names::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(failures) = &state.credential_failures
        && let Some(wait) = failures.retry_after(ctx.client_ip, auth_header)
    {
        ctx.retry_after = Some(wait.as_secs().max(1));
        return Verdict::Deny(Outcome::TooManyRequests, "credential_failures");
    }
    let (auth, cache) = state.authenticate_with_standing(auth_header).await;
    if let (
        Err(AuthError::Malformed | AuthError::InvalidToken | AuthError::InvalidClient),
        Some(f),
    ) = (&auth, &state.credential_failures)
    {
        f.record(ctx.client_ip, auth_header);
    }
    match cache {
        CacheUse::Hit => crate::obs::count_token_cache(true),
        CacheUse::Miss => crate::obs::count_token_cache(false),
        CacheUse::None => {}
    }
    let (identity, slot) = match auth {
        Ok(found) => found,
        Err(AuthError::StoreUnavailable) => return store_down(),
        Err(e) => return Verdict::Deny(Outcome::Unauthorized, e.as_str()),
    };
    ctx.identity = Some(identity.clone());
    let standing = match state.standing(&identity, &slot).await {
        Ok(standing) => standing,
        Err(StandingError::UpstreamUnbound) => {
            return Verdict::Deny(Stock::UpstreamNotConfigured.outcome(), "upstream_unbound");
        }
        Err(StandingError::MembershipGone) => {
            return Verdict::Deny(Outcome::Unauthorized, "membership_gone");
        }
        Err(StandingError::StoreUnavailable) => return store_down(),
    };
    ctx.upstream = Some(standing.binding.clone());
    let (caller_admin, super_admin) = (standing.admin, standing.super_admin);

    // On-behalf-of: admins only; the target's policy applies, with the caller's SMART scopes.
    let target;
    let mut membership_id = identity.membership_id.as_str();
    let mut policy = standing.policy.clone();
    let obo = ctx
        .present
        .has(Present::ON_BEHALF_OF)
        .then(|| {
            session
                .req_header()
                .headers
                .get(&names::X_MEDPLUM_ON_BEHALF_OF)
        })
        .flatten()
        .map(|v| v.to_str().map(str::to_string));
    if let Some(value) = obo {
        let Ok(value) = value else {
            return Verdict::Deny(Outcome::Forbidden, "on_behalf_of_invalid");
        };
        if !caller_admin {
            return Verdict::Deny(Outcome::Forbidden, "on_behalf_of_not_admin");
        }
        let found = match state
            .identities
            .on_behalf_of(&identity.project_id, &value)
            .await
        {
            Ok(Some(found)) => found,
            Ok(None) => return Verdict::Deny(Outcome::Forbidden, "on_behalf_of_unknown"),
            Err(_) => return store_down(),
        };
        target = found;
        ctx.on_behalf_of_profile = match state.identities.membership(&target).await {
            Ok(m) => m.and_then(|m| m.profile_ref().map(str::to_string)),
            Err(_) => return store_down(),
        };
        ctx.on_behalf_of = Some(format!("ProjectMembership/{target}"));
        membership_id = &target;
        policy = match state
            .effective_policy_in_context(
                &state.snapshot(),
                membership_id,
                identity.scope.as_deref(),
                identity.patient.as_deref(),
            )
            .await
        {
            Ok(Some(policy)) => policy,
            Ok(None) => return Verdict::Deny(Outcome::Unauthorized, "membership_gone"),
            Err(_) => return store_down(),
        };
    }

    // IP rules on every request, Bearer and Basic (docs/contract.md §2), from the caller's own
    // policy (and, on behalf of someone, the target's too).
    if let Some(ip) = ctx.client_ip {
        let blocked = !standing.policy.check_ip(ip).is_allowed()
            || (ctx.on_behalf_of.is_some() && !policy.check_ip(ip).is_allowed());
        if blocked {
            return Verdict::Deny(Outcome::Forbidden, "ip_blocked");
        }
    }

    let method = session.req_header().method.clone();
    let body = if matches!(
        method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    ) {
        match read_body(session, state.config.max_request_body).await {
            Ok(b) => b,
            Err(o) => return Verdict::Deny(o, "body"),
        }
    } else {
        None
    };
    let req = session.req_header();
    let rest = ctx.fhir_rest();
    // The credentials are not the classifier's business (and the longest value to check).
    let header_refs: smallvec::SmallVec<[(&str, &str); 8]> = req
        .headers
        .iter()
        .filter(|(k, _)| *k != names::AUTHORIZATION)
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let parts = RequestParts {
        method: method.as_str(),
        path: rest,
        query: req.uri.query(),
        headers: &header_refs,
        body: body.as_deref(),
    };
    let request = match classify(&parts) {
        Ok(r) => r,
        Err(e) => {
            use fhirgate_core::fhir::request::Unclassifiable as U;
            let label = match e {
                U::BadPath => "bad_path",
                U::MethodOverride => "method_override",
                U::UnknownType => "unknown_type",
                U::MethodNotAllowed => "method_not_allowed",
                U::BadBody => "bad_body",
                U::BadQuery => "bad_query",
                U::Unsupported => "unsupported",
            };
            let outcome = match e {
                U::UnknownType => Outcome::NotFound,
                U::Unsupported => Outcome::Forbidden,
                other => Outcome::BadRequest(other.to_string()),
            };
            return Verdict::Deny(outcome, label);
        }
    };
    ctx.resource_type = request.op.resource_type().map(str::to_string);
    if let Some(ty) = request.op.resource_type()
        && fhirgate_core::fhir::types::is_control_type(ty)
    {
        return Verdict::Deny(Outcome::Forbidden, "identity_type_upstream");
    }

    if let FhirOp::Bundle { .. } = &request.op {
        let entries = decide::decide_entries(&policy, &request.op, super_admin);
        ctx.decision = "allow_bundle";
        return Verdict::Mediate(Mediation {
            policy,
            body,
            op: request.op,
            permit: None,
            entries,
            super_admin,
        });
    }
    if let FhirOp::Page { handle, seal } = &request.op {
        let expected = state.page_seal(&page_caller(&identity, membership_id), handle);
        if !seal
            .as_deref()
            .is_some_and(|s| crate::tokens::hashes_equal(s, &expected))
        {
            return Verdict::Deny(Outcome::Forbidden, "page_handle_not_sealed_for_caller");
        }
    }
    let decision = decide::decide(&policy, &request, super_admin);
    if caller_admin && ctx.present.has(Present::EXPLAIN) {
        return Verdict::Explain(trace(&policy, &request, &decision, membership_id, ctx));
    }
    let permit = match decision {
        Decision::Allow(p) if !state.config.upstream_contains_search => p.without_contains(),
        Decision::Allow(p) => p,
        Decision::Deny(d) => return deny(&d),
    };
    ctx.decision = "allow";
    let mediated = body.is_some()
        || permit.write != decide::WriteCheck::None
        || permit.response == ResponseNeed::CheckResource
        || permit.guard_current;
    if mediated {
        return Verdict::Mediate(Mediation {
            policy,
            body,
            op: request.op,
            permit: Some(permit),
            entries: Vec::new(),
            super_admin,
        });
    }
    ctx.extra_query = permit.narrowing;
    ctx.plan = match permit.response {
        ResponseNeed::Untouched => ResponsePlan::Stream,
        _ => ResponsePlan::Buffer(Arc::new(FilterSpec {
            policy: Some(policy),
            metadata: false,
            drop_total: permit.drop_total,
            subset: permit.subset,
            seal_pages: request.op.answers_with_pages(),
            strip_seal: matches!(request.op, FhirOp::Page { .. }),
        })),
    };
    Verdict::Forward
}

/// The decision trace an admin gets instead of a forwarded request: what the request was
/// classified as, what it needs at type level and which entries grant it, and the decision.
fn trace(
    policy: &EffectivePolicy,
    request: &fhirgate_core::fhir::request::FhirRequest,
    decision: &Decision,
    membership_id: &str,
    ctx: &RequestCtx,
) -> serde_json::Value {
    use fhirgate_core::policy::decide::WriteCheck;
    use serde_json::json;
    let needs: Vec<serde_json::Value> = request
        .op
        .required_access()
        .into_iter()
        .map(|(ty, i)| {
            let granted_by: Vec<usize> = policy.entries_for(&ty, i).map(|e| e.index).collect();
            json!({"resourceType": ty, "interaction": i.as_str(), "grantedBy": granted_by})
        })
        .collect();
    let outcome = match decision {
        Decision::Allow(p) => json!({
            "allow": true,
            "narrowing": p.narrowing.iter().map(|q| format!("{}={}", q.name, q.value)).collect::<Vec<_>>(),
            "response": match p.response {
                ResponseNeed::Untouched => "streamed untouched",
                ResponseNeed::CheckResource => "single resource checked (invisible: 404) and redacted",
                ResponseNeed::FilterResources => "every resource checked, failing entries dropped, hidden fields removed",
            },
            "writeCheck": match p.write {
                WriteCheck::None => "none",
                WriteCheck::Create => "new resource must satisfy a create entry; readonly and hidden fields dropped",
                WriteCheck::Update => "current and new versions must satisfy update; written with If-Match",
                WriteCheck::Delete => "current version must satisfy delete; deleted with If-Match",
            },
            "dropTotal": p.drop_total,
        }),
        Decision::Deny(d) => json!({"allow": false, "reason": d.label()}),
    };
    json!({
        "membership": format!("ProjectMembership/{membership_id}"),
        "onBehalfOf": ctx.on_behalf_of,
        "clientIp": ctx.client_ip.map(|i| i.to_string()),
        "request": format!("{:?}", request.op).chars().take(2000).collect::<String>(),
        "wantsNonJson": request.wants_non_json,
        "needs": needs,
        "decision": outcome,
        "accessPolicy": policy.access_policy(),
        "project": {
            "upstream": ctx.upstream.as_ref().map(|b| b.name.as_str()),
            "isolation": policy.isolation().label(),
        },
    })
}
