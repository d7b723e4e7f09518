//! Real PostgreSQL for tests: one throwaway cluster per test binary (started on first use by
//! `scripts/pg-cluster` in a temp dir, on a free port, 127.0.0.1 only) and a fresh database per
//! caller, so tests stay independent and can run in parallel.
//!
//! No destructor runs for a static at process exit, so the cluster is stopped (and its directory
//! deleted) by the script's watchdog once this process is gone, however the process ends.
//!
//! The store's unit tests include this file too (`#[path]`), so it depends on std and tempfile only.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Set to `postgres` to run every `TestGateway` on a fresh PostgreSQL database.
pub const STORE_ENV: &str = "FHIRGATE_TEST_STORE";

struct Cluster {
    dir: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

/// Whether `FHIRGATE_TEST_STORE=postgres` asks for PostgreSQL everywhere.
pub fn requested() -> bool {
    match std::env::var(STORE_ENV) {
        Ok(v) => match v.as_str() {
            "postgres" | "postgresql" => true,
            "" | "sqlite" => false,
            other => panic!("{STORE_ENV}={other}: expected postgres or sqlite"),
        },
        Err(_) => false,
    }
}

/// With `FHIRGATE_TEST_STORE=postgres`, the PostgreSQL database of a test's data dir: created on
/// its first use and found again later (a restart on the same dir), like a SQLite file in it.
/// `None` when the test should keep its SQLite store.
pub fn store_for(data_dir: &Path) -> Option<String> {
    if !requested() {
        return None;
    }
    let marker = data_dir.join("test-postgres-store-url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return Some(url.trim().to_string());
    }
    let url = fresh_database();
    std::fs::create_dir_all(data_dir).expect("data dir");
    std::fs::write(&marker, &url).expect("write the store marker");
    Some(url)
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-cluster")
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn start() -> Result<Cluster, String> {
    let mut last_error = String::new();
    // The port is free when chosen but may be taken before the server binds it: try again.
    for _ in 0..3 {
        let dir = tempfile::Builder::new()
            .prefix("fhirgate-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let port = free_port()?;
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .arg(std::process::id().to_string())
            .output()
            .map_err(|e| format!("cannot run scripts/pg-cluster: {e}"))?;
        if out.status.success() {
            return Ok(Cluster { dir });
        }
        last_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let _ = std::fs::remove_dir_all(&dir);
    }
    Err(last_error)
}

/// Creates a new, empty database in this binary's cluster (starting the cluster on first use)
/// and returns its URL, `postgres://postgres@127.0.0.1:PORT/NAME`.
pub fn fresh_database() -> String {
    let cluster = match CLUSTER.get_or_init(start) {
        Ok(c) => c,
        Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
    };
    let name = format!(
        "fhirgate_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new("bash")
        .arg(script())
        .arg("createdb")
        .arg(&cluster.dir)
        .arg(&name)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/pg-cluster: {e}"));
    assert!(
        out.status.success(),
        "createdb {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A PostgreSQL cluster of its own, for a test that stops and starts the database under a
/// running fhirgate (the shared cluster must stay up for the other tests). Deleted when dropped,
/// or by the script's watchdog once this process is gone.
pub struct DedicatedCluster {
    dir: PathBuf,
    port: u16,
}

impl DedicatedCluster {
    pub fn start() -> DedicatedCluster {
        let mut last_error = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("fhirgate-pg-")
                .tempdir()
                .expect("temp dir")
                .keep();
            let port = free_port().expect("a free port");
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(&dir)
                .arg(port.to_string())
                .arg(std::process::id().to_string())
                .output()
                .expect("run scripts/pg-cluster");
            if out.status.success() {
                return DedicatedCluster { dir, port };
            }
            last_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("cannot start a dedicated PostgreSQL cluster: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` (`[a-z_][a-z0-9_]*`) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let out = Command::new("bash")
            .arg(script())
            .arg("createdb")
            .arg(&self.dir)
            .arg(name)
            .output()
            .expect("run scripts/pg-cluster");
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server (`pg_ctl stop -m fast`): every session is ended, and what was committed
    /// is on disk for the restart (an immediate stop would lose the last commits of this
    /// cluster, which runs with `synchronous_commit` off).
    pub fn stop(&self) {
        let out = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .arg("fast")
            .output()
            .expect("run scripts/pg-cluster");
        assert!(
            out.status.success(),
            "pg-cluster stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again, on the same port with the same data.
    pub fn restart(&self) {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&self.dir)
            .arg(self.port.to_string())
            .output()
            .expect("run scripts/pg-cluster");
        assert!(
            out.status.success(),
            "pg-cluster start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for DedicatedCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
