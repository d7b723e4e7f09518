//! `Snapshot`: an immutable, fully built view of the identity store. Built off the request
//! path and swapped in whole; a request holds one `Arc<Snapshot>` from start to end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fhirgate_core::policy::model::{AccessPolicy, ProjectMembership};
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

/// `Project.systemSetting[name].valueString`.
fn system_setting<'a>(project: &'a Value, name: &str) -> Option<&'a str> {
    project
        .get("systemSetting")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(name))?
        .get("valueString")?
        .as_str()
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

#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub keyring: Arc<Keyring>,
    /// The kids of `keyring`, signer first.
    pub key_ids: Vec<String>,
    /// When the keyring changes next by the clock (a key starts to sign or retires).
    pub next_key_change: Option<i64>,
    pub projects: HashMap<String, ProjectInfo>,
    pub memberships: HashMap<String, Arc<ProjectMembership>>,
    /// `(project id, profile reference)` → membership id.
    pub membership_by_profile: HashMap<(String, String), String>,
    pub clients: HashMap<String, ClientInfo>,
    pub policies: HashMap<String, AccessPolicy>,
    /// The project each stored AccessPolicy belongs to: a membership's policy references
    /// resolve within its own project only.
    pub policy_projects: HashMap<String, Option<String>>,
    pub revoked_logins: HashSet<String>,
    /// The origins of every active client's redirect URIs, launch URI and `allowedOrigin`: the
    /// browser origins CORS admits unless `cors_origins` says otherwise.
    pub client_origins: HashSet<String>,
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
    /// The store as the planes see it. Without `kek` (the offline `policy explain`) the
    /// keyring stays empty.
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
        for m in store.list("ProjectMembership").await? {
            match serde_json::from_value::<ProjectMembership>(m.content) {
                Ok(pm) => {
                    if let (Some(project), Some(profile)) =
                        (pm.project.type_and_id(), pm.profile.reference.clone())
                    {
                        snap.membership_by_profile
                            .insert((project.1.to_string(), profile), m.id.clone());
                    }
                    snap.memberships.insert(m.id, Arc::new(pm));
                }
                Err(e) => {
                    tracing::error!(id = %m.id, error = %e, "stored membership is unreadable; it grants nothing")
                }
            }
        }
        let secrets: HashMap<String, (Option<String>, Option<String>)> = store
            .client_secrets()
            .await?
            .into_iter()
            .map(|(id, s, r)| (id, (s, r)))
            .collect();
        for c in store.list("ClientApplication").await? {
            let content = c.content;
            let (secret_hash, retiring_hash) = secrets.get(&c.id).cloned().unwrap_or_default();
            let status = content.get("status").and_then(Value::as_str);
            if matches!(status, None | Some("active")) {
                let urls = ["redirectUris", "allowedOrigin"]
                    .iter()
                    .filter_map(|k| content.get(*k))
                    .flat_map(|v| match v {
                        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                        Value::String(s) => vec![s.as_str()],
                        _ => Vec::new(),
                    })
                    .chain(content.get("launchUri").and_then(Value::as_str));
                snap.client_origins.extend(urls.filter_map(origin_of));
            }
            snap.clients.insert(
                c.id.clone(),
                ClientInfo {
                    id: c.id,
                    project_id: c.project_id,
                    active: matches!(status, None | Some("active")),
                    secret_hash,
                    retiring_hash,
                    access_token_lifetime: content
                        .get("accessTokenLifetime")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    content,
                },
            );
        }
        for p in store.list("AccessPolicy").await? {
            match serde_json::from_value::<AccessPolicy>(p.content) {
                Ok(ap) => {
                    snap.policy_projects.insert(p.id.clone(), p.project_id);
                    snap.policies.insert(p.id, ap);
                }
                Err(e) => {
                    tracing::error!(id = %p.id, error = %e, "stored AccessPolicy is unreadable; references to it grant nothing")
                }
            }
        }
        snap.revoked_logins = store
            .revoked_logins(now_unix())
            .await?
            .into_iter()
            .collect();
        Ok(snap)
    }

    /// The membership of a client application (`user == profile == ClientApplication/<id>`).
    pub fn client_membership(
        &self,
        client: &ClientInfo,
    ) -> Option<(&String, &Arc<ProjectMembership>)> {
        let project = client.project_id.as_ref()?;
        let id = self
            .membership_by_profile
            .get(&(project.clone(), format!("ClientApplication/{}", client.id)))?;
        self.memberships.get_key_value(id)
    }

    /// Resolves an `X-Medplum-On-Behalf-Of` value (docs/medplum-compat.md §6: `ProjectMembership/<id>`
    /// or a profile reference) to a membership id in `project_id`; `None` when it names nothing
    /// there. Both planes use it.
    pub fn on_behalf_of(&self, project_id: &str, value: &str) -> Option<String> {
        let value = value.trim();
        if let Some(id) = value.strip_prefix("ProjectMembership/") {
            let m = self.memberships.get(id)?;
            return (m.project.type_and_id()?.1 == project_id).then(|| id.to_string());
        }
        self.membership_by_profile
            .get(&(project_id.to_string(), value.to_string()))
            .cloned()
    }

    /// Builds the effective policy of a membership (docs/medplum-compat.md §4.2) with optional SMART
    /// scopes. `None` when the membership or its project is gone.
    pub fn effective_policy(
        &self,
        membership_id: &str,
        scope: Option<&str>,
    ) -> Option<fhirgate_core::policy::EffectivePolicy> {
        let membership = self.memberships.get(membership_id)?;
        let project_id = membership.project.type_and_id()?.1;
        let project = self.projects.get(project_id)?;
        let policy = fhirgate_core::policy::effective::effective(
            &fhirgate_core::policy::effective::EffectiveInputs {
                membership,
                policies: &ProjectPolicies {
                    snapshot: self,
                    project_id,
                },
                project_id,
                project_super_admin: project.super_admin,
                linked_projects: &[],
                scope,
            },
        );
        Some(policy.with_isolation(project.isolation.clone()))
    }
}

/// The snapshot's AccessPolicies as one project sees them: a policy of another project is not
/// found, whatever its id (a project admin chooses the ids of the policies it creates).
struct ProjectPolicies<'a> {
    snapshot: &'a Snapshot,
    project_id: &'a str,
}

impl fhirgate_core::policy::effective::PolicySource for ProjectPolicies<'_> {
    fn access_policy(&self, id: &str) -> Option<&AccessPolicy> {
        let owner = self.snapshot.policy_projects.get(id)?.as_deref();
        if owner == Some(self.project_id) {
            self.snapshot.policies.get(id)
        } else {
            None
        }
    }
}
