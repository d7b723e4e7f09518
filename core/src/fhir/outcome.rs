//! OperationOutcome bodies with the statuses and texts of docs/medplum-compat.md §0.1.

use serde_json::{Value, json};

/// The OperationOutcomes fhirgate itself answers with. The wire text lives here, nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unauthorized,
    Forbidden,
    NotFound,
    TooManyRequests,
    Gone,
    PreconditionFailed(String),
    Conflict(String),
    BadRequest(String),
    /// 422: well-formed, but refused by a rule (a policy that cannot be evaluated).
    Unprocessable(String),
    PayloadTooLarge(String),
    BadGateway(String),
    GatewayTimeout(String),
    ServiceUnavailable(String),
    Internal,
    AllOk,
}

impl Outcome {
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Unauthorized => 401,
            Outcome::Forbidden => 403,
            Outcome::NotFound => 404,
            Outcome::TooManyRequests => 429,
            Outcome::Gone => 410,
            Outcome::PreconditionFailed(_) => 412,
            Outcome::Conflict(_) => 409,
            Outcome::BadRequest(_) => 400,
            Outcome::Unprocessable(_) => 422,
            Outcome::PayloadTooLarge(_) => 413,
            Outcome::BadGateway(_) => 502,
            Outcome::GatewayTimeout(_) => 504,
            Outcome::ServiceUnavailable(_) => 503,
            Outcome::Internal => 500,
            Outcome::AllOk => 200,
        }
    }

    /// The text a client reads (`issue[0].details.text`).
    pub fn text(&self) -> &str {
        self.parts().3
    }

    pub fn to_json(&self) -> Value {
        let (id, severity, code, text) = self.parts();
        let mut v = json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "details": {"text": text}}]
        });
        if let (Some(id), Some(obj)) = (id, v.as_object_mut()) {
            obj.insert("id".into(), Value::String(id.into()));
        }
        v
    }

    /// Id, severity, issue code and text.
    fn parts(&self) -> (Option<&'static str>, &'static str, &'static str, &str) {
        match self {
            Outcome::Unauthorized => (Some("unauthorized"), "error", "login", "Unauthorized"),
            Outcome::Forbidden => (Some("forbidden"), "error", "forbidden", "Forbidden"),
            Outcome::NotFound => (Some("not-found"), "error", "not-found", "Not found"),
            Outcome::TooManyRequests => (
                Some("too-many-requests"),
                "error",
                "throttled",
                "Too Many Requests",
            ),
            Outcome::Gone => (Some("gone"), "error", "deleted", "Gone"),
            Outcome::PreconditionFailed(t) => {
                (Some("precondition-failed"), "error", "processing", t)
            }
            Outcome::Conflict(t) => (Some("conflict"), "error", "conflict", t),
            Outcome::BadRequest(t) | Outcome::Unprocessable(t) => (None, "error", "invalid", t),
            Outcome::PayloadTooLarge(t) => (None, "error", "too-costly", t),
            Outcome::BadGateway(t) => (None, "error", "transient", t),
            Outcome::GatewayTimeout(t) => (Some("server-timeout"), "error", "timeout", t),
            Outcome::ServiceUnavailable(t) => (None, "error", "transient", t),
            Outcome::Internal => (None, "error", "exception", "Internal server error"),
            Outcome::AllOk => (Some("ok"), "information", "informational", "All OK"),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }
}

/// Stock answers: the texts fhirgate words itself, the gateway's all and the control API's where
/// more than one place answers them. The table is [`Stock::outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stock {
    /// 413: a request body past the reader's bound.
    BodyTooLarge,
    /// 503: the store cannot be reached; nothing was read or written.
    StoreUnavailable,
    /// 503: a credential may be fine, but the store that would say so cannot be reached.
    CredentialStoreUnavailable,
    /// 503: a project is bound to an upstream this instance does not know.
    UpstreamNotConfigured,
    /// 503: the breached-password service did not answer (the check fails closed).
    BreachCheckUnavailable,
    /// 503: a one-time sign-in code could not be sent (mailer or SMS hook down).
    CodeNotSent,
    /// 504: the upstream did not answer in time.
    UpstreamTimedOut,
    /// 502: the upstream could not be reached.
    UpstreamUnavailable,
    /// 502: the upstream refused to give back a user's profile resource.
    ProfileUnreadable,
    /// 502: the upstream refused to create a user's profile resource.
    ProfileNotCreated,
    /// 412: an update named a version that is not the current one.
    VersionMismatch,
    /// 502: an upstream body past the buffer bound, where the policy needs it whole.
    UpstreamResponseTooLarge,
    /// 502: an upstream body the policy must filter is not JSON (fail closed).
    UpstreamNotJson,
    /// 502: an upstream body that says JSON and is not.
    UpstreamMalformedJson,
    /// 502: the upstream body ended early.
    UpstreamIncomplete,
    /// 502: the upstream failed in a way with no better word.
    UpstreamError,
    /// 502: an update is checked against the current version, and the upstream would not give it.
    CurrentVersionUnreadable,
    /// 400: the client's body could not be read.
    BodyUnreadable,
    /// 400: a write without a body.
    MissingBody,
    /// 400: a write whose body is not JSON.
    InvalidJson,
    /// 400: a PATCH in another format than JSON Patch.
    JsonPatchOnly,
    /// 400: an `Upgrade` request (the gateway decides every request itself).
    ProtocolUpgrade,
    /// 400: an `X-HTTP-Method-Override` (or alike) header.
    MethodOverride,
    /// 400: a trusted proxy sent an `X-Forwarded-For` that does not parse.
    InvalidForwardedFor,
    /// 400: dot segments, empty segments or encoded separators.
    InvalidPath,
    /// 400: pingora refused the request with no better word.
    BadRequest,
}

impl Stock {
    pub fn outcome(self) -> Outcome {
        match self {
            Stock::BodyTooLarge => Outcome::PayloadTooLarge("Request body too large".into()),
            Stock::StoreUnavailable => Outcome::ServiceUnavailable("Store unavailable".into()),
            Stock::CredentialStoreUnavailable => {
                Outcome::ServiceUnavailable("Credential store unavailable".into())
            }
            Stock::UpstreamNotConfigured => {
                Outcome::ServiceUnavailable("The project's upstream is not configured".into())
            }
            Stock::BreachCheckUnavailable => Outcome::ServiceUnavailable(
                "The breached-password check is unavailable; try again later".into(),
            ),
            Stock::CodeNotSent => Outcome::ServiceUnavailable(
                "The verification code could not be sent; try again later".into(),
            ),
            Stock::UpstreamTimedOut => Outcome::GatewayTimeout("Upstream timed out".into()),
            Stock::UpstreamUnavailable => Outcome::BadGateway("Upstream unavailable".into()),
            Stock::ProfileUnreadable => {
                Outcome::BadGateway("Could not read the profile from the FHIR server".into())
            }
            Stock::ProfileNotCreated => {
                Outcome::BadGateway("Could not create the profile in the FHIR server".into())
            }
            Stock::VersionMismatch => Outcome::PreconditionFailed("Version mismatch".into()),
            Stock::UpstreamResponseTooLarge => {
                Outcome::BadGateway("Upstream response too large to filter".into())
            }
            Stock::UpstreamNotJson => {
                Outcome::BadGateway("Upstream response is not JSON and cannot be filtered".into())
            }
            Stock::UpstreamMalformedJson => {
                Outcome::BadGateway("Upstream returned malformed JSON".into())
            }
            Stock::UpstreamIncomplete => Outcome::BadGateway("Upstream response incomplete".into()),
            Stock::UpstreamError => Outcome::BadGateway("Upstream error".into()),
            Stock::CurrentVersionUnreadable => {
                Outcome::BadGateway("Could not read the current version".into())
            }
            Stock::BodyUnreadable => Outcome::BadRequest("Could not read request body".into()),
            Stock::MissingBody => Outcome::BadRequest("Missing request body".into()),
            Stock::InvalidJson => Outcome::BadRequest("Invalid JSON".into()),
            Stock::JsonPatchOnly => Outcome::BadRequest("Only JSON Patch is supported".into()),
            Stock::ProtocolUpgrade => {
                Outcome::BadRequest("Protocol upgrade is not supported".into())
            }
            Stock::MethodOverride => Outcome::BadRequest("Method override is not allowed".into()),
            Stock::InvalidForwardedFor => {
                Outcome::BadRequest("Invalid X-Forwarded-For header".into())
            }
            Stock::InvalidPath => Outcome::BadRequest("Invalid path".into()),
            Stock::BadRequest => Outcome::BadRequest("Bad request".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_matches_medplum_shape() {
        let v = Outcome::Unauthorized.to_json();
        assert_eq!(v["id"], "unauthorized");
        assert_eq!(v["issue"][0]["code"], "login");
        assert_eq!(v["issue"][0]["details"]["text"], "Unauthorized");
        assert_eq!(Outcome::Unauthorized.status(), 401);
    }

    #[test]
    fn bad_request_has_no_id() {
        let v = Outcome::BadRequest("x".into()).to_json();
        assert!(v.get("id").is_none());
        assert_eq!(v["issue"][0]["details"]["text"], "x");
    }
}
