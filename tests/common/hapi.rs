//! A real HAPI FHIR server as fhirgate's upstream: `tests/hapi` (HAPI's JPA server modules on an
//! in-memory H2 database, built with Maven by `scripts/setup`), started once by `scripts/test`
//! for every test binary (`FHIRGATE_TEST_HAPI=<port>`), or else once per test binary, on a free
//! loopback port. Each test takes a partition of its own (`/fhir/<partition>`), so tests never
//! see each other's data and need no reset.
//!
//! ```ignore
//! let upstream = common::hapi::partition();   // "http://127.0.0.1:PORT/fhir/t1a2b…"
//! let gw = TestGateway::start(&upstream);
//! ```
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

/// HAPI starts in 20–40 s on the 2-core machines (its first start on a fresh machine, while the
/// JVM's class data is cold, has taken 75 s).
const START_TIMEOUT: Duration = Duration::from_secs(240);

/// The running server. Never dropped: it exits when the test binary does, because it watches
/// the stdin pipe this process holds.
struct Hapi {
    port: u16,
    /// `None` when the server was started by the test command for every binary
    /// (`FHIRGATE_TEST_HAPI`).
    _child: Option<(Mutex<Child>, Mutex<ChildStdin>)>,
}

fn jar() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hapi/target/hapi-test-server-1.0.jar")
}

fn start() -> Hapi {
    let jar = jar();
    assert!(
        jar.is_file(),
        "{} is missing: run scripts/setup (it builds tests/hapi with Maven)",
        jar.display()
    );
    let mut child = Command::new("java")
        .args([
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xmx512m",
            "-jar",
        ])
        .arg(&jar)
        .arg("0")
        .env("HAPI_EXIT_ON_STDIN_CLOSE", "true")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run java -jar {}: {e}", jar.display()));
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("LISTENING ") {
                let port = rest.split_whitespace().next().and_then(|p| p.parse().ok());
                let _ = tx.send(port);
            }
        }
    });
    let port: u16 = match rx.recv_timeout(START_TIMEOUT) {
        Ok(Some(p)) => p,
        _ => {
            let _ = child.kill();
            panic!("HAPI did not start within {START_TIMEOUT:?}");
        }
    };
    Hapi {
        port,
        _child: Some((Mutex::new(child), Mutex::new(stdin))),
    }
}

/// Waits until the server answers (its first request loads more). Blocking, without a runtime:
/// the first test to need HAPI may be inside one (a shared gateway started from async code).
fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let authority = format!("127.0.0.1:{port}");
    loop {
        let answer = super::upstream::http_request(
            &authority,
            "GET",
            "/fhir/DEFAULT/metadata",
            &[("Accept", "application/fhir+json")],
            None,
        );
        if answer.is_ok_and(|r| r.status == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "HAPI does not answer http://{authority}/fhir/DEFAULT/metadata"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The server `scripts/test` started for all test binaries (`FHIRGATE_TEST_HAPI=<port>`), or one
/// of this binary's own. Partitions keep the binaries apart: each has its own id space.
fn shared() -> &'static Hapi {
    static HAPI: OnceLock<Hapi> = OnceLock::new();
    HAPI.get_or_init(|| {
        let hapi = match std::env::var("FHIRGATE_TEST_HAPI") {
            Ok(port) => Hapi {
                port: port
                    .parse()
                    .unwrap_or_else(|_| panic!("FHIRGATE_TEST_HAPI={port:?} is not a port")),
                _child: None,
            },
            Err(_) => start(),
        };
        wait_ready(hapi.port);
        hapi
    })
}

/// `http://127.0.0.1:PORT` of the shared HAPI server (started on first use). Call it outside
/// any runtime.
pub fn origin() -> String {
    format!("http://127.0.0.1:{}", shared().port)
}

/// A new, empty partition of the shared HAPI server; returns its FHIR base URL (no trailing
/// slash), which is what fhirgate's `upstream` is set to. Call it outside any runtime.
pub fn partition() -> String {
    let hapi = shared();
    let name = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let url = format!(
        "http://127.0.0.1:{}/fhir/DEFAULT/$partition-management-create-partition",
        hapi.port
    );
    let body = json!({"resourceType": "Parameters",
                      "parameter": [{"name": "name", "valueCode": name}]});
    let (status, text) = super::http::rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("creating a HAPI partition: {e}"));
        (resp.status(), resp.text().await.unwrap_or_default())
    });
    assert!(status.is_success(), "creating a HAPI partition: {text}");
    format!("http://127.0.0.1:{}/fhir/{name}", hapi.port)
}
