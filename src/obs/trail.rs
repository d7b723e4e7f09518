//! The security trail as FHIR `AuditEvent`s (issue 10; IHE Basic Audit Log Patterns shape),
//! when `audit_events` is on. Every security event (`obs::security`) and every request the
//! gateway refuses an authenticated caller (403) becomes a [`TrailRecord`]; a writer per
//! instance turns them into AuditEvents and posts them in batches to the upstream of the
//! project they belong to, stamped with that project's marker, where the project's admins read
//! them (a `*` entry does not reach `AuditEvent`, see `core::policy::model::TRAIL_TYPES`).
//!
//! The JSON log line of each event is the lossless record; this copy is best effort with
//! bounded memory: a full queue or an upstream that stays down for three attempts drops a batch
//! and counts it in `fhirgate_audit_events_total{outcome="dropped"}`. Records are built from
//! typed fields only (labels, references, an address), so no secret or token reaches them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirgate_core::policy::isolation::Isolation;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::METRICS;
use crate::upstream_headers::UpstreamIdentity;

/// Where a project's AuditEvents go.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The FHIR base URL, without a trailing slash.
    pub base_url: String,
    pub authorization: Option<String>,
    /// Stamps the project's marker, so the project sees its own trail on a shared upstream.
    pub isolation: Isolation,
}

/// Finds the destination of a record's project (`None`: the default project's upstream); `None`
/// when this instance does not know the project.
pub type Resolver = Arc<dyn Fn(Option<&str>) -> Option<Destination> + Send + Sync>;

/// What kind of trail entry: BALP's authentication, change and alert patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailKind {
    /// Sign-in, MFA, tokens, logout, password and session events.
    Authentication,
    /// A change of an identity resource.
    Change(ChangeAction),
    /// Refresh-token reuse, a refused request.
    Alert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeAction {
    Create,
    Update,
    Delete,
}

/// One entry of the trail.
#[derive(Debug, Clone, PartialEq)]
pub struct TrailRecord {
    pub kind: TrailKind,
    /// The stable event label (`sign_in`, `request_denied`, …).
    pub event: &'static str,
    pub success: bool,
    pub reason: Option<&'static str>,
    pub actor: Option<String>,
    pub subject: Option<String>,
    pub project: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// A change's version ids of the subject: before, after.
    pub versions: (Option<String>, Option<String>),
    /// Unix milliseconds.
    pub recorded_ms: i64,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
type Sinks = Vec<(u64, mpsc::Sender<TrailRecord>)>;
static SINKS: Mutex<Sinks> = Mutex::new(Vec::new());
const QUEUE: usize = 10_000;
const BATCH: usize = 100;
const BATCH_WINDOW: Duration = Duration::from_millis(250);
const ATTEMPTS: u32 = 3;

fn count(outcome: &str, n: usize) {
    METRICS
        .audit_events
        .with_label_values(&[outcome])
        .inc_by(n as u64);
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whether any writer runs in this process (callers skip building records otherwise).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Hands a record to every writer of this process; never waits.
pub fn record(r: TrailRecord) {
    if !active() {
        return;
    }
    let sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
    for (_, tx) in sinks.iter() {
        if tx.try_send(r.clone()).is_err() {
            count("dropped", 1);
        }
    }
}

/// Records a request the gateway refused an authenticated caller (`reason`: the decision label).
pub fn record_denial(
    profile: &str,
    project: &str,
    resource_type: Option<&str>,
    reason: &'static str,
    client_ip: Option<IpAddr>,
) {
    record(TrailRecord {
        kind: TrailKind::Alert,
        event: "request_denied",
        success: false,
        reason: Some(reason),
        actor: Some(profile.to_string()),
        subject: resource_type.map(str::to_string),
        project: Some(project.to_string()),
        client_ip,
        versions: (None, None),
        recorded_ms: now_ms(),
    });
}

/// A writer's queue; dropping it stops the records.
pub struct Subscription {
    id: u64,
    pub rx: mpsc::Receiver<TrailRecord>,
}

pub fn subscribe() -> Subscription {
    let (tx, rx) = mpsc::channel(QUEUE);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
    sinks.push((id, tx));
    ACTIVE.store(true, Ordering::Relaxed);
    Subscription { id, rx }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
        sinks.retain(|(id, _)| *id != self.id);
        ACTIVE.store(!sinks.is_empty(), Ordering::Relaxed);
    }
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_SYSTEM: &str = "https://fhirgate.dev/fhir/CodeSystem/security-event";
const REFERENCE_SYSTEM: &str = "https://fhirgate.dev/fhir/reference";

/// A reference as an identifier: most subjects (`Login/…`, `ProjectMembership/…`) live in
/// fhirgate's store, not upstream, where a reference would dangle.
fn named(reference: &str) -> Value {
    json!({"identifier": {"system": REFERENCE_SYSTEM, "value": reference}, "display": reference})
}

fn rfc3339_millis(ms: i64) -> String {
    // Whole milliseconds, so the instant has a fraction of exactly three digits.
    let millis = ms.rem_euclid(1000);
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(|s| format!("{}.{millis:03}Z", s.trim_end_matches('Z')))
        .unwrap_or_default()
}

impl TrailRecord {
    /// The AuditEvent (R4) of this record.
    pub fn to_audit_event(&self) -> Value {
        let (type_coding, action, subtype) = match self.kind {
            TrailKind::Authentication => {
                let dcm = match self.event {
                    "sign_in" => Some(("110122", "Login")),
                    "logout" => Some(("110123", "Logout")),
                    _ => None,
                };
                (
                    json!({"system": DCM, "code": "110114", "display": "User Authentication"}),
                    "E",
                    dcm.map(
                        |(code, display)| json!({"system": DCM, "code": code, "display": display}),
                    ),
                )
            }
            TrailKind::Change(action) => {
                let (code, interaction) = match action {
                    ChangeAction::Create => ("C", "create"),
                    ChangeAction::Update => ("U", "update"),
                    ChangeAction::Delete => ("D", "delete"),
                };
                (
                    json!({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation"}),
                    code,
                    Some(
                        json!({"system": "http://hl7.org/fhir/restful-interaction", "code": interaction}),
                    ),
                )
            }
            TrailKind::Alert => (
                json!({"system": DCM, "code": "110113", "display": "Security Alert"}),
                "E",
                None,
            ),
        };
        let mut subtypes = vec![json!({"system": EVENT_SYSTEM, "code": self.event})];
        subtypes.extend(subtype);
        let outcome = match (self.success, self.kind) {
            (true, _) => "0",
            (false, TrailKind::Alert) => "8",
            (false, _) => "4",
        };
        let mut agent = json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "code": "PROV", "display": "healthcare provider"}]},
            "who": self.actor.as_deref().map_or_else(|| json!({"display": "unknown"}), named),
            "requestor": true
        });
        if let Some(ip) = self.client_ip {
            agent["network"] = json!({"address": ip.to_string(), "type": "2"});
        }
        let mut event = json!({
            "resourceType": "AuditEvent",
            "meta": {"profile": ["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.SecurityEvent"]},
            "type": type_coding,
            "subtype": subtypes,
            "action": action,
            "recorded": rfc3339_millis(self.recorded_ms),
            "outcome": outcome,
            "agent": [agent],
            "source": {
                "observer": {"display": "fhirgate"},
                "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]
            }
        });
        if let Some(reason) = self.reason {
            event["outcomeDesc"] = json!(reason);
        }
        let mut entities = Vec::new();
        if let Some(subject) = &self.subject {
            let mut entity = json!({"what": named(subject), "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"}});
            let details: Vec<Value> = [
                ("versionBefore", &self.versions.0),
                ("versionAfter", &self.versions.1),
            ]
            .into_iter()
            .filter_map(|(name, v)| v.as_ref().map(|v| json!({"type": name, "valueString": v})))
            .collect();
            if !details.is_empty() {
                entity["detail"] = Value::Array(details);
            }
            entities.push(entity);
        }
        if let Some(project) = &self.project {
            entities.push(json!({"what": named(&format!("Project/{project}")), "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3", "display": "Report"}}));
        }
        if !entities.is_empty() {
            event["entity"] = Value::Array(entities);
        }
        event
    }
}

/// Writes the records of `sub` until it closes or `shutdown` says so.
pub async fn run_writer(
    mut sub: Subscription,
    resolve: Resolver,
    client: reqwest::Client,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            r = sub.rx.recv() => match r { Some(r) => r, None => return },
            _ = shutdown.changed() => return,
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, sub.rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        let mut by_destination: HashMap<String, (Destination, Vec<Value>)> = HashMap::new();
        for r in &batch {
            let Some(dest) = resolve(r.project.as_deref()) else {
                // Another instance's project (several instances in one process, in tests).
                continue;
            };
            let mut event = r.to_audit_event();
            dest.isolation.stamp(&mut event);
            by_destination
                .entry(dest.base_url.clone())
                .or_insert_with(|| (dest.clone(), Vec::new()))
                .1
                .push(event);
        }
        for (dest, events) in by_destination.into_values() {
            post(&client, &dest, events).await;
        }
    }
}

async fn post(client: &reqwest::Client, dest: &Destination, events: Vec<Value>) {
    let n = events.len();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": events.into_iter().map(|e| json!({"resource": e, "request": {"method": "POST", "url": "AuditEvent"}})).collect::<Vec<_>>()
    });
    let body = bundle.to_string();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        let mut rb = client
            .post(format!("{}/", dest.base_url))
            .timeout(Duration::from_secs(10))
            .header("content-type", "application/fhir+json")
            .header("accept", "application/fhir+json")
            .body(body.clone());
        let credentials = UpstreamIdentity {
            authorization: dest.authorization.as_deref(),
            ..UpstreamIdentity::default()
        };
        for (name, value) in credentials.headers() {
            rb = rb.header(name, value);
        }
        match rb.send().await {
            Ok(resp) if resp.status().is_success() => {
                count("written", n);
                return;
            }
            Ok(resp) => {
                tracing::warn!(
                    status = resp.status().as_u16(),
                    attempt,
                    "the upstream refused a batch of AuditEvents"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot reach the upstream with a batch of AuditEvents");
            }
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    count("dropped", n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: TrailKind, event: &'static str, success: bool) -> TrailRecord {
        TrailRecord {
            kind,
            event,
            success,
            reason: (!success).then_some("bad_password"),
            actor: Some("Practitioner/p1".into()),
            subject: Some("User/u1".into()),
            project: Some("proj".into()),
            client_ip: Some("2001:db8::1".parse().unwrap()),
            versions: (Some("1".into()), Some("2".into())),
            recorded_ms: 1_764_892_800_123,
        }
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_764_892_800_123),
            "2025-12-05T00:00:00.123Z"
        );
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_failed_sign_in_is_a_user_authentication_event() {
        let e = record(TrailKind::Authentication, "sign_in", false).to_audit_event();
        assert_eq!(e["type"]["code"], "110114");
        assert_eq!(e["subtype"][0]["code"], "sign_in");
        assert_eq!(e["subtype"][1]["code"], "110122");
        assert_eq!(e["action"], "E");
        assert_eq!(e["outcome"], "4");
        assert_eq!(e["outcomeDesc"], "bad_password");
        assert_eq!(e["agent"][0]["requestor"], true);
        assert_eq!(
            e["agent"][0]["who"]["identifier"]["value"],
            "Practitioner/p1"
        );
        assert_eq!(e["agent"][0]["network"]["address"], "2001:db8::1");
        assert_eq!(e["entity"][0]["what"]["identifier"]["value"], "User/u1");
        assert_eq!(
            e["entity"][1]["what"]["identifier"]["value"],
            "Project/proj"
        );
        assert_eq!(e["recorded"], "2025-12-05T00:00:00.123Z");
        assert_eq!(e["source"]["observer"]["display"], "fhirgate");
    }

    #[test]
    fn changes_and_alerts() {
        let e = record(
            TrailKind::Change(ChangeAction::Delete),
            "resource_deleted",
            true,
        )
        .to_audit_event();
        assert_eq!(e["action"], "D");
        assert_eq!(e["type"]["code"], "rest");
        assert_eq!(e["subtype"][1]["code"], "delete");
        assert_eq!(e["entity"][0]["detail"][0]["type"], "versionBefore");
        assert_eq!(e["entity"][0]["detail"][1]["valueString"], "2");
        assert_eq!(e["outcome"], "0");
        assert!(e.get("outcomeDesc").is_none());
        let a = record(TrailKind::Alert, "refresh_token_reused", false).to_audit_event();
        assert_eq!(a["type"]["code"], "110113");
        assert_eq!(a["outcome"], "8");
    }

    #[tokio::test]
    async fn records_reach_every_subscriber_and_stop_when_it_goes() {
        let mut sub = subscribe();
        assert!(active());
        let r = record(TrailKind::Alert, "request_denied", false);
        super::record(r.clone());
        assert_eq!(sub.rx.recv().await, Some(r.clone()));
        drop(sub);
        // Other tests of this binary may subscribe meanwhile; this one has stopped receiving.
        super::record(r);
    }
}
