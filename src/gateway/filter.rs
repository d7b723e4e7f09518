//! Response handling: header rewrites (upstream URLs → the gateway's), and for responses that
//! need it, buffering the JSON body and filtering it with the policy at end of stream. Bodies
//! that cannot be filtered are never passed through: they are replaced (fail closed).

use bytes::Bytes;
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::fhir::outcome::Stock;
use fhirgate_core::fhir::page;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde_json::Value;

use crate::config::Config;
use crate::state::State;

use super::ctx::{FilterSpec, RequestCtx, ResponsePlan};

fn is_json(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ["application/fhir+json", "application/json"]
                .iter()
                .any(|json| {
                    ct.get(..json.len())
                        .is_some_and(|p| p.eq_ignore_ascii_case(json))
                })
        })
}

/// Rewrites an upstream URL (or anything starting with the upstream base) to the public base.
pub fn rewrite_url(config: &Config, upstream_base: &str, value: &str) -> String {
    match value.strip_prefix(upstream_base) {
        Some(rest) => format!("{}{}", config.public_fhir_base(), rest),
        None => value.to_string(),
    }
}

/// Header stage. Runs before any body chunk.
pub fn prepare_response(
    state: &State,
    resp: &mut ResponseHeader,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let config = &state.config;
    let upstream_base = ctx.binding(state).upstream.base_url.as_str();
    // Names, not strings: a name given as a string is parsed again on every lookup.
    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
        if let Some(v) = resp
            .headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .map(|v| rewrite_url(config, upstream_base, v))
        {
            resp.insert_header(name, v)?;
        }
    }
    let ResponsePlan::Buffer(spec) = &ctx.plan else {
        return Ok(());
    };
    let status = resp.status.as_u16();
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(());
    }
    let too_big = resp
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > config.max_response_buffer);
    let json = is_json(resp);
    let unfilterable = spec.policy.is_some() && (200..300).contains(&status) && !json;
    if too_big || unfilterable {
        let outcome = if too_big {
            Stock::UpstreamResponseTooLarge.outcome()
        } else {
            Stock::UpstreamNotJson.outcome()
        };
        let body = Bytes::from(outcome.to_bytes());
        resp.set_status(outcome.status())?;
        resp.insert_header("content-type", "application/fhir+json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.remove_header("transfer-encoding");
        resp.remove_header("etag");
        resp.remove_header("last-modified");
        ctx.replacement = Some(body);
        ctx.decision = "unfilterable";
        return Ok(());
    }
    if !json {
        return Ok(());
    }
    if ctx.metadata_kept.is_some() {
        ctx.metadata_kept = (status == 200).then(|| {
            super::metadata::KEPT_HEADERS
                .iter()
                .filter_map(|&name| {
                    let value = resp.headers.get(name)?.to_str().ok()?;
                    Some((name, value.to_string()))
                })
                .collect()
        });
    }
    resp.remove_header("content-length");
    resp.insert_header("transfer-encoding", "chunked")?;
    ctx.buffering = true;
    Ok(())
}

/// Body stage (synchronous, pure CPU): collect, then filter at end of stream.
pub fn body_chunk(
    state: &State,
    metadata: &super::metadata::MetadataCache,
    body: &mut Option<Bytes>,
    end: bool,
    ctx: &mut RequestCtx,
) -> Result<()> {
    if let Some(replacement) = &ctx.replacement {
        *body = if end { Some(replacement.clone()) } else { None };
        if end {
            ctx.replacement = None;
        }
        return Ok(());
    }
    if !ctx.buffering {
        return Ok(());
    }
    let config = &state.config;
    if let Some(chunk) = body.take() {
        if ctx.body.len() + chunk.len() > config.max_response_buffer {
            // Headers are gone already: abort the response rather than send part of it.
            ctx.body_overflow = true;
            return Error::e_explain(
                ErrorType::InternalError,
                "response exceeds the filtering buffer",
            );
        }
        ctx.body.extend_from_slice(&chunk);
    }
    if end {
        let raw = std::mem::take(&mut ctx.body);
        let kept = ctx.metadata_kept.take();
        let ResponsePlan::Buffer(spec) = &ctx.plan else {
            return Ok(());
        };
        let upstream_base = ctx.binding(state).upstream.base_url.as_str();
        if let (true, Some(headers)) = (spec.metadata, kept) {
            *body =
                Some(metadata.render(raw, headers, |raw| apply(config, upstream_base, spec, raw)));
            return Ok(());
        }
        let mut out = apply(config, upstream_base, spec, &raw);
        if spec.seal_pages {
            out = page::seal_links(out, ctx.page_sealer(state));
        }
        *body = Some(Bytes::from(out));
    }
    Ok(())
}

/// Filters a whole JSON body. Anything that cannot be parsed is replaced, never passed on.
pub fn apply(config: &Config, upstream_base: &str, spec: &FilterSpec, raw: &[u8]) -> Vec<u8> {
    if let (Some(policy), false, None) = (&spec.policy, spec.metadata, &spec.subset) {
        // Same result as below, without materialising what the policy does not change.
        use fhirgate_core::policy::filter::{Filtered, UrlRewrite, filter_bytes};
        let public = config.public_fhir_base();
        let rewrite = UrlRewrite {
            from: upstream_base,
            to: &public,
        };
        return match filter_bytes(policy, raw, spec.drop_total, Some(rewrite)) {
            Ok(Filtered::Visible(body)) => body,
            Ok(Filtered::Hidden) => Outcome::NotFound.to_bytes(),
            Err(_) => Stock::UpstreamMalformedJson.outcome().to_bytes(),
        };
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(raw) else {
        return Stock::UpstreamMalformedJson.outcome().to_bytes();
    };
    rewrite_urls(config, upstream_base, &mut value);
    if spec.metadata {
        advertise_oauth(config, &mut value);
    }
    if let Some(policy) = &spec.policy
        && !fhirgate_core::policy::filter::filter_value(policy, &mut value, spec.drop_total)
    {
        return Outcome::NotFound.to_bytes();
    }
    if let Some(subset) = &spec.subset {
        subset.apply_to_response(&mut value);
    }
    serde_json::to_vec(&value).unwrap_or_default()
}

/// Replaces the upstream base in every string (Bundle links, fullUrl, references).
pub fn rewrite_urls(config: &Config, upstream_base: &str, value: &mut Value) {
    match value {
        Value::String(s) if s.starts_with(upstream_base) => {
            *s = rewrite_url(config, upstream_base, s)
        }
        Value::Array(a) => a
            .iter_mut()
            .for_each(|v| rewrite_urls(config, upstream_base, v)),
        Value::Object(o) => o
            .values_mut()
            .for_each(|v| rewrite_urls(config, upstream_base, v)),
        _ => {}
    }
}

/// Makes the CapabilityStatement advertise fhirgate's OAuth endpoints (SMART `oauth-uris`).
fn advertise_oauth(config: &Config, value: &mut Value) {
    let base = &config.base_url;
    let security = serde_json::json!({
        "cors": true,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}], "text": "OAuth2 using SMART-on-FHIR profile"}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": format!("{base}oauth2/authorize")},
                {"url": "token", "valueUri": format!("{base}oauth2/token")},
                {"url": "introspect", "valueUri": format!("{base}oauth2/introspect")},
                {"url": "revoke", "valueUri": format!("{base}oauth2/revoke")}
            ]
        }]
    });
    if let Some(rest) = value.get_mut("rest").and_then(Value::as_array_mut) {
        for r in rest {
            if let Some(o) = r.as_object_mut() {
                o.insert("security".into(), security.clone());
            }
        }
    }
}
