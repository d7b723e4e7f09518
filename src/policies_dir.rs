//! Policies as files (docs/contract.md §3): every `*.json` file of `policies_dir` is an AccessPolicy, loaded
//! into the store at start and reloaded while running.
//!
//! - **Identity.** A file's policy is stored as `AccessPolicy/<id>` in the DEFAULT project, `<id>`
//!   being the file's `id` when it has one, else the file name without `.json`; either must be a
//!   FHIR id (`[A-Za-z0-9-.]{1,64}`). Two files with the same id are an error. A policy of that id
//!   that belongs to another project is never taken over.
//! - **Start.** Every file is read, parsed and validated (`validate_policy`, the same check as the
//!   control API) before anything is written; one bad file stops the start with its name and the
//!   reason (fail closed). Unchanged files write nothing: the stored content (without
//!   `meta.versionId`, `meta.lastUpdated` and `meta.project`) is compared first, so restarts do
//!   not create versions.
//! - **Reload.** [`PolicyWatcher::run`] polls the directory every second and compares file
//!   contents with what it saw last (not only modification times, which can be coarse). A changed
//!   or added file is validated and written in one store transaction; an invalid one is logged
//!   once with the reason and the stored version stays in force, so a policy is never
//!   half-applied. The snapshot is refreshed right after a write (and the change feed carries the
//!   write to every other instance).
//! - **Deletion.** Removing a file does NOT remove the stored policy: memberships that reference
//!   it would otherwise lose their access silently on a stray `rm` or a half-done checkout. The
//!   removal is logged; delete `AccessPolicy/<id>` through the API to retire it.
//! - Files whose name starts with `.` (editor lock and swap files, Kubernetes `..data`) and
//!   anything that is not a regular `*.json` file are ignored. Files over 1 MiB are refused.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fhirgate_core::fhir::path::is_valid_id;
use fhirgate_core::policy::effective::validate_policy;
use fhirgate_core::policy::model::AccessPolicy;
use serde_json::Value;

use crate::control::index::index_rows;
use crate::state::State;
use crate::store::{Store, StoreError};

/// Largest policy file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// How often the directory is polled.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// `meta` elements the store sets; they are not part of a file's content.
const STORE_META: [&str; 3] = ["versionId", "lastUpdated", "project"];

/// One policy file, read and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyFile {
    pub path: PathBuf,
    /// The stored id: the file's `id`, else its stem.
    pub id: String,
    pub policy: AccessPolicy,
    /// The JSON to store: the file's content with `id` set and store-owned `meta` removed.
    pub content: Value,
}

/// Why a policy file is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for PolicyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for PolicyFileError {}

/// Why the directory cannot be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum PoliciesDirError {
    #[error("{}: cannot list the directory: {reason}", path.display())]
    Dir { path: PathBuf, reason: String },
    #[error("invalid policy files (nothing was loaded): {}", list(.0))]
    Files(Vec<PolicyFileError>),
    #[error("{0}")]
    Store(String),
}

fn list(errors: &[PolicyFileError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn err(path: &Path, reason: impl Into<String>) -> PolicyFileError {
    PolicyFileError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `path` has the id `id` of the file `other`.
fn duplicate_id(path: &Path, id: &str, other: &Path) -> PolicyFileError {
    err(
        path,
        format!(
            "id `{id}` is also the id of {}; each file needs its own id",
            other.display()
        ),
    )
}

/// Removes the store-owned `meta` elements (and `meta` itself when nothing else is left).
pub fn normalize(content: &mut Value) {
    let Some(obj) = content.as_object_mut() else {
        return;
    };
    let empty = match obj.get_mut("meta").and_then(Value::as_object_mut) {
        Some(meta) => {
            for key in STORE_META {
                meta.remove(key);
            }
            meta.is_empty()
        }
        None => false,
    };
    if empty {
        obj.remove("meta");
    }
}

/// Parses and validates the bytes of the policy file `path` (the path only names it and gives
/// the id when the file has none).
pub fn parse_policy(path: &Path, bytes: &[u8]) -> Result<PolicyFile, PolicyFileError> {
    let mut content: Value =
        serde_json::from_slice(bytes).map_err(|e| err(path, format!("invalid JSON: {e}")))?;
    // A reader and serde would disagree on which of two equal keys counts: refuse the file.
    no_duplicate_keys(bytes).map_err(|e| err(path, format!("invalid JSON: {e}")))?;
    let Some(obj) = content.as_object_mut() else {
        return Err(err(path, "not a JSON object"));
    };
    if obj.get("resourceType").and_then(Value::as_str) != Some("AccessPolicy") {
        return Err(err(path, "resourceType must be `AccessPolicy`"));
    }
    let id = match obj.get("id") {
        Some(Value::String(id)) => {
            if !is_valid_id(id) {
                return Err(err(
                    path,
                    format!("id `{id}` is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})"),
                ));
            }
            id.clone()
        }
        Some(_) => return Err(err(path, "id must be a string")),
        None => {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if !is_valid_id(&stem) {
                return Err(err(
                    path,
                    format!(
                        "the file name `{stem}` is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}}); rename the file or set `id`"
                    ),
                ));
            }
            obj.insert("id".into(), Value::String(stem.clone()));
            stem
        }
    };
    normalize(&mut content);
    let policy: AccessPolicy = serde_json::from_value(content.clone())
        .map_err(|e| err(path, format!("not an AccessPolicy: {e}")))?;
    if let Err(errors) = validate_policy(&policy) {
        let reasons = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(err(path, reasons));
    }
    Ok(PolicyFile {
        path: path.to_path_buf(),
        id,
        policy,
        content,
    })
}

/// Walks a JSON document and fails on the first object with a repeated key.
fn no_duplicate_keys(bytes: &[u8]) -> Result<(), serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    NoDuplicates.deserialize(&mut de)?;
    de.end()
}

struct NoDuplicates;

impl<'de> serde::de::DeserializeSeed<'de> for NoDuplicates {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicates {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicates)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(A::Error::custom(format!("duplicate key `{key}`")));
            }
            map.next_value_seed(NoDuplicates)?;
        }
        Ok(())
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, PolicyFileError> {
    let meta = std::fs::metadata(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(
            path,
            format!("larger than {MAX_FILE_BYTES} bytes; refused"),
        ));
    }
    std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))
}

/// Reads, parses and validates one policy file (`policy check`, `policy explain`, the loader).
pub fn read_policy_file(path: &Path) -> Result<PolicyFile, PolicyFileError> {
    parse_policy(path, &read_bytes(path)?)
}

/// The policy files of `dir`, sorted: regular files (symlinks followed) named `*.json` whose name
/// does not start with `.`.
pub fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum UpsertError {
    #[error("AccessPolicy/{0} already exists outside the default project; choose another id")]
    Foreign(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("AccessPolicy/{0} kept changing while it was written; try again")]
    Contended(String),
}

/// Writes `file` as `AccessPolicy/<id>` of `project` unless the stored content is the same.
/// Concurrent writers (other instances loading the same directory) are detected with the
/// version check and retried.
pub async fn upsert(
    store: &Store,
    project: &str,
    file: &PolicyFile,
) -> Result<Upsert, UpsertError> {
    let index = index_rows(&file.content);
    for _ in 0..5 {
        let current = store.read("AccessPolicy", &file.id).await?;
        let result = match &current {
            Some(cur) => {
                if cur.project_id.as_deref() != Some(project) {
                    return Err(UpsertError::Foreign(file.id.clone()));
                }
                let mut stored = cur.content.clone();
                normalize(&mut stored);
                if stored == file.content {
                    return Ok(Upsert::Unchanged);
                }
                store
                    .put(
                        file.content.clone(),
                        Some(project),
                        &index,
                        Some(&cur.version_id),
                        false,
                    )
                    .await
                    .map(|_| Upsert::Updated)
            }
            None => store
                .put(file.content.clone(), Some(project), &index, None, true)
                .await
                .map(|_| Upsert::Created),
        };
        match result {
            Ok(done) => return Ok(done),
            Err(StoreError::VersionConflict | StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(UpsertError::Contended(file.id.clone()))
}

/// What one file looked like when it was last seen.
#[derive(Debug, Clone)]
struct Seen {
    bytes: Vec<u8>,
    /// The id it is stored under, when it was applied.
    applied_id: Option<String>,
}

/// Counts of one load or poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Changed files refused (invalid, duplicate id, store failure).
    pub refused: usize,
    pub removed: usize,
}

impl LoadReport {
    fn count(&mut self, u: Upsert) {
        match u {
            Upsert::Created => self.created += 1,
            Upsert::Updated => self.updated += 1,
            Upsert::Unchanged => self.unchanged += 1,
        }
    }

    fn wrote(&self) -> bool {
        self.created + self.updated > 0
    }
}

/// Watches one directory after [`load_at_start`].
#[derive(Debug)]
pub struct PolicyWatcher {
    dir: PathBuf,
    project: String,
    seen: tokio::sync::Mutex<HashMap<PathBuf, Seen>>,
}

/// Loads every policy file of `dir` into `project` (the default project). Fails, writing
/// nothing, when the directory cannot be listed or any file is invalid; ids must be unique.
/// Returns the watcher that keeps the directory applied.
pub async fn load_at_start(
    state: &State,
    dir: &Path,
    project: &str,
) -> Result<PolicyWatcher, PoliciesDirError> {
    let dir_error = |reason: String| PoliciesDirError::Dir {
        path: dir.to_path_buf(),
        reason,
    };
    let paths = policy_files(dir).map_err(|e| dir_error(e.to_string()))?;
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashMap::new();
    for path in paths {
        match read_bytes(&path).and_then(|b| parse_policy(&path, &b).map(|f| (f, b))) {
            Ok((file, bytes)) => {
                seen.insert(
                    path,
                    Seen {
                        bytes,
                        applied_id: Some(file.id.clone()),
                    },
                );
                files.push(file);
            }
            Err(e) => errors.push(e),
        }
    }
    let mut first_of: HashMap<&str, &Path> = HashMap::new();
    for f in &files {
        if let Some(other) = first_of.insert(&f.id, &f.path) {
            errors.push(duplicate_id(&f.path, &f.id, other));
        }
    }
    if !errors.is_empty() {
        return Err(PoliciesDirError::Files(errors));
    }
    if !files.is_empty() {
        let exists = state
            .store
            .read("Project", project)
            .await
            .map_err(|e| PoliciesDirError::Store(e.to_string()))?;
        if exists.is_none() {
            return Err(PoliciesDirError::Store(format!(
                "the default project ({project}) does not exist; policy files are stored in it"
            )));
        }
    }
    let mut report = LoadReport::default();
    for f in &files {
        let done = upsert(&state.store, project, f)
            .await
            .map_err(|e| PoliciesDirError::Store(format!("{}: {e}", f.path.display())))?;
        tracing::info!(file = %f.path.display(), id = %f.id, result = ?done, "policy file loaded");
        report.count(done);
    }
    tracing::info!(
        dir = %dir.display(),
        created = report.created,
        updated = report.updated,
        unchanged = report.unchanged,
        "policies_dir loaded"
    );
    Ok(PolicyWatcher {
        dir: dir.to_path_buf(),
        project: project.to_string(),
        seen: tokio::sync::Mutex::new(seen),
    })
}

/// One file as read by a poll.
struct Read {
    path: PathBuf,
    bytes: Result<Vec<u8>, PolicyFileError>,
}

fn read_dir_contents(dir: &Path) -> std::io::Result<Vec<Read>> {
    Ok(policy_files(dir)?
        .into_iter()
        .map(|path| {
            let bytes = read_bytes(&path);
            Read { path, bytes }
        })
        .collect())
}

impl PolicyWatcher {
    /// Polls every [`POLL_INTERVAL`] until `shutdown` fires.
    pub async fn run(
        self: Arc<Self>,
        state: Arc<State>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut dir_failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.poll(&state).await {
                        Ok(_) => dir_failing = false,
                        Err(e) => {
                            if !dir_failing {
                                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list policies_dir; the stored policies stay in force");
                            }
                            dir_failing = true;
                        }
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Applies what changed since the last look. Each changed file is applied whole or not at
    /// all; an invalid one is logged once and the stored version stays in force. Refreshes the
    /// snapshot when something was written.
    pub async fn poll(&self, state: &State) -> std::io::Result<LoadReport> {
        let dir = self.dir.clone();
        let reads = tokio::task::spawn_blocking(move || read_dir_contents(&dir))
            .await
            .map_err(std::io::Error::other)??;
        let mut seen = self.seen.lock().await;
        let mut report = LoadReport::default();

        let present: HashSet<&PathBuf> = reads.iter().map(|r| &r.path).collect();
        let gone: Vec<PathBuf> = seen
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(s) = seen.remove(&path)
                && let Some(id) = s.applied_id
            {
                tracing::info!(file = %path.display(), id = %id, "policy file removed; the stored AccessPolicy stays in force (delete it through the API to retire it)");
            }
            report.removed += 1;
        }

        for read in reads {
            let bytes = match read.bytes {
                Ok(b) => b,
                Err(e) => {
                    // Unreadable right now (replaced mid-poll, permissions): try again next time.
                    tracing::debug!(error = %e, "policy file unreadable this poll");
                    continue;
                }
            };
            let previous = seen.get(&read.path);
            if previous.is_some_and(|s| s.bytes == bytes) {
                continue;
            }
            let previous_id = previous.and_then(|s| s.applied_id.clone());
            let parsed = parse_policy(&read.path, &bytes).and_then(|f| {
                let clash = seen
                    .iter()
                    .find(|(p, s)| **p != read.path && s.applied_id.as_deref() == Some(&f.id));
                match clash {
                    Some((other, _)) => Err(duplicate_id(&read.path, &f.id, other)),
                    None => Ok(f),
                }
            });
            match parsed {
                Err(e) => {
                    tracing::error!(file = %e.path.display(), reason = %e.reason, "policy file refused; the previous version stays in force");
                }
                Ok(file) => match upsert(&state.store, &self.project, &file).await {
                    Ok(done) => {
                        tracing::info!(file = %file.path.display(), id = %file.id, result = ?done, "policy file applied");
                        report.count(done);
                        seen.insert(
                            read.path,
                            Seen {
                                bytes,
                                applied_id: Some(file.id),
                            },
                        );
                        continue;
                    }
                    Err(e @ UpsertError::Foreign(_)) => {
                        tracing::error!(file = %file.path.display(), error = %e, "policy file refused; the previous version stays in force");
                    }
                    Err(e) => {
                        // Transient: forget the bytes so the next poll tries again.
                        tracing::warn!(file = %file.path.display(), error = %e, "policy file not applied; retrying");
                        if let Some(s) = seen.get_mut(&read.path) {
                            s.bytes.clear();
                        }
                        report.refused += 1;
                        continue;
                    }
                },
            }
            // Refused: remember the bytes so the same content is reported once, and keep the id
            // the previous version was stored under.
            seen.insert(
                read.path,
                Seen {
                    bytes,
                    applied_id: previous_id,
                },
            );
            report.refused += 1;
        }
        drop(seen);
        if report.wrote()
            && let Err(e) = state.refresh().await
        {
            tracing::warn!(error = %e, "snapshot refresh after a policy reload failed; the change feed will catch up");
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
