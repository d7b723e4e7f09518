//! The FHIR answer of a stored identity resource: what the caller may see of it (hidden fields,
//! never a secret), its `ETag` and `Location`.

use crate::state::State;
use crate::store::StoredResource;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhirgate_core::policy::compiled::CompiledEntry;
use serde_json::Value;

use crate::control::base::access::Caller;
use crate::control::web::error::FHIR_JSON;

/// The FHIR base URL of the control API's own resources.
pub(crate) fn fhir_base(state: &State) -> String {
    format!("{}fhir/R4/", state.config.base_url)
}

/// Removes what must never be serialized.
pub(crate) fn strip_secrets(resource: &mut Value) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    match obj.get("resourceType").and_then(Value::as_str) {
        Some("ClientApplication") => {
            obj.remove("secret");
            obj.remove("retiringSecret");
            remove_idp_secret(obj);
        }
        Some("DomainConfiguration") => remove_idp_secret(obj),
        Some("User") => {
            obj.remove("passwordHash");
            obj.remove("mfaSecret");
        }
        _ => {}
    }
}

/// `identityProvider.clientSecret`: fhirgate's own secret at the identity provider, used by the
/// control API only; never read back by anyone.
fn remove_idp_secret(obj: &mut serde_json::Map<String, Value>) {
    if let Some(idp) = obj
        .get_mut("identityProvider")
        .and_then(Value::as_object_mut)
    {
        idp.remove("clientSecret");
    }
}

/// The resource as the caller may see it: hidden fields of the granting entry removed, secrets
/// stripped.
pub(crate) fn present(caller: &Caller, mut content: Value, entry: &CompiledEntry) -> Value {
    caller.policy.redact(&mut content, entry);
    strip_secrets(&mut content);
    content
}

fn etag(version: &str) -> String {
    format!("W/\"{version}\"")
}

pub(crate) fn resource_response(
    state: &State,
    status: StatusCode,
    stored: &StoredResource,
    body: &Value,
) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body.to_string(),
    )
        .into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag(&stored.version_id)) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::CREATED {
        let location = format!(
            "{}{}/{}/_history/{}",
            fhir_base(state),
            stored.resource_type,
            stored.id,
            stored.version_id
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            h.insert(header::LOCATION, v);
        }
    }
    r
}
