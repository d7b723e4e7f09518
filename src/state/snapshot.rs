//! `Snapshot`: the small tables both planes consult on every request — the signing keyring and
//! the projects (a few per tenant, not per identity) — built off the request path and swapped
//! in whole; a request holds one `Arc<Snapshot>` from start to end. The identities themselves
//! (memberships, clients, policies, Logins) are not here: `identities` reads them through
//! bounded caches, so the snapshot's size does not grow with them.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, DEFAULT_UPSTREAM};
use crate::store::{Store, StoreError, now_unix};
use crate::tokens::{Keyring, SigningKey};
use fhirgate_core::policy::isolation::Isolation;

use super::keys::{load_schedule, ring_at};

/// The store setting that names the default project (written by the first-run bootstrap).
pub const DEFAULT_PROJECT_SETTING: &str = "bootstrap.default_project";

#[derive(Debug, Clone)]
pub struct ProjectInfo {
    pub id: String,
    pub name: String,
    pub super_admin: bool,
    pub content: Value,
    /// The upstream binding it is bound to (`default`, or an operator-configured name; a name
    /// the operator has not configured makes every FHIR request of the project fail closed).
    pub upstream: String,
    /// What it sees of that upstream (see [`project_isolation`]).
    pub isolation: Isolation,
}

/// The Project system settings that bind it (writable by super admins only).
pub const UPSTREAM_SETTING: &str = "fhirgate-upstream";
pub const ISOLATION_SETTING: &str = "fhirgate-isolation";

/// The entry named `name` of a Project's `setting` or `systemSetting` list (`{name, value[x]}`).
fn named_setting<'a>(project: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    project
        .get(list)?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(name))
}

/// `Project.systemSetting[name].valueString`.
fn system_setting<'a>(project: &'a Value, name: &str) -> Option<&'a str> {
    named_setting(project, "systemSetting", name)?
        .get("valueString")?
        .as_str()
}

impl ProjectInfo {
    /// `Project.setting[name]`: the settings a project's admins keep (`allowedMfaMethods`, …).
    pub fn setting(&self, name: &str) -> Option<&Value> {
        named_setting(&self.content, "setting", name)
    }
}

/// What a project sees of its upstream (docs/contract.md §3). The super-admin project sees everything. A
/// project that shares its upstream with another (the super-admin project aside) sees only
/// its own marked resources (`tag`) — except the default project, which keeps the data that
/// predates fhirgate and sees unmarked resources and its own (`unmarked`). A project alone on
/// its upstream sees it as it is, unless its `fhirgate-isolation` setting says `tag`.
pub fn project_isolation(
    project: &ProjectInfo,
    is_default: bool,
    sharing: usize,
    requested: Option<&str>,
) -> Isolation {
    let id = project.id.clone();
    if project.super_admin {
        return Isolation::None;
    }
    match requested {
        Some("tag") => Isolation::Tag { project: id },
        _ if sharing <= 1 => Isolation::None,
        _ if is_default => Isolation::Unmarked { project: id },
        _ => Isolation::Tag { project: id },
    }
}

#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: String,
    pub project_id: Option<String>,
    /// `status` absent or `active`.
    pub active: bool,
    pub secret_hash: Option<String>,
    pub retiring_hash: Option<String>,
    pub access_token_lifetime: Option<String>,
    pub content: Value,
}

impl ClientInfo {
    pub fn new(
        id: String,
        project_id: Option<String>,
        content: Value,
        secret_hash: Option<String>,
        retiring_hash: Option<String>,
    ) -> ClientInfo {
        let status = content.get("status").and_then(Value::as_str);
        ClientInfo {
            id,
            project_id,
            active: matches!(status, None | Some("active")),
            secret_hash,
            retiring_hash,
            access_token_lifetime: content
                .get("accessTokenLifetime")
                .and_then(Value::as_str)
                .map(str::to_string),
            content,
        }
    }
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub keyring: Arc<Keyring>,
    /// The kids of `keyring`, signer first.
    pub key_ids: Vec<String>,
    /// When the keyring changes next by the clock (a key starts to sign or retires).
    pub next_key_change: Option<i64>,
    pub projects: HashMap<String, ProjectInfo>,
}

/// `scheme://host[:port]` of a URL, if it has one.
pub fn origin_of(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    match u.origin() {
        url::Origin::Tuple(..) => Some(u.origin().ascii_serialization()),
        url::Origin::Opaque(_) => None,
    }
}

impl Snapshot {
    /// The keyring and the projects as the store has them now. Without `kek` (the offline
    /// `policy explain`) the keyring stays empty.
    pub async fn load(
        store: &Store,
        config: &Config,
        kek: Option<&crate::sealed::KeyEncryptionKey>,
        version: u64,
    ) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot {
            version,
            ..Default::default()
        };
        let schedule = load_schedule(store).await?;
        let times: Vec<_> = schedule.iter().map(|(_, s)| s.clone()).collect();
        let (ring, next) = ring_at(&times, now_unix());
        snap.next_key_change = next;
        let keys: Vec<SigningKey> = ring
            .into_iter()
            .filter_map(|i| {
                let k = &schedule[i].0;
                match super::keys::open_key(kek?, k) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        tracing::error!(kid = %k.id, error = %e, "stored signing key is unusable");
                        None
                    }
                }
            })
            .collect();
        snap.key_ids = keys.iter().map(|k| k.kid.clone()).collect();
        snap.keyring = Arc::new(Keyring::new(config.base_url.clone(), keys));
        for p in store.list("Project").await? {
            let c = p.content;
            snap.projects.insert(
                p.id.clone(),
                ProjectInfo {
                    id: p.id,
                    name: c
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    super_admin: c
                        .get("superAdmin")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    upstream: system_setting(&c, UPSTREAM_SETTING)
                        .unwrap_or(DEFAULT_UPSTREAM)
                        .to_string(),
                    isolation: Isolation::None,
                    content: c,
                },
            );
        }
        let default_project = store.setting(DEFAULT_PROJECT_SETTING).await?;
        let mut sharing: HashMap<String, usize> = HashMap::new();
        for p in snap.projects.values().filter(|p| !p.super_admin) {
            *sharing.entry(p.upstream.clone()).or_default() += 1;
        }
        for p in snap.projects.values_mut() {
            let requested = system_setting(&p.content, ISOLATION_SETTING).map(str::to_string);
            let is_default = default_project.as_deref() == Some(p.id.as_str());
            let shared = sharing.get(&p.upstream).copied().unwrap_or(0);
            p.isolation = project_isolation(p, is_default, shared, requested.as_deref());
            if !config.upstream_names().any(|n| n == p.upstream) {
                tracing::error!(project = %p.id, upstream = %p.upstream, "project bound to an upstream that is not configured; its FHIR requests fail");
            }
        }
        Ok(snap)
    }
}
