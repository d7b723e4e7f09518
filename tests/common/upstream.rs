//! The real FHIR upstream of the end-to-end tests: Medplum's in-memory FHIR server
//! (`tests/upstream/server.mjs`, run with node), started on a free port per test.
//!
//! ```ignore
//! let upstream = FhirUpstream::start();
//! upstream.put_resource(&json!({"resourceType": "Patient", "id": "p1"}));
//! // ... point fhirgate at upstream.base_url, send requests through it ...
//! let seen = upstream.requests(); // what reached the upstream
//! ```
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the server may take to print `LISTENING <port>` (it loads the FHIR definitions
/// first: about 3 s on the 2-core machines).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket timeout of the helper's own HTTP requests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `tests/upstream/server.mjs`. Dropping it kills the server.
pub struct FhirUpstream {
    /// `http://127.0.0.1:PORT/fhir/R4` (no trailing slash).
    pub base_url: String,
    pub port: u16,
    child: Child,
}

/// True in the test command's second pass (`FHIRGATE_TEST_UPSTREAM=hapi`): every
/// [`FhirUpstream`] is then a fresh partition of a real HAPI FHIR server (`tests/common/hapi.rs`)
/// behind `tests/upstream/hapi-proxy.mjs`, which records requests and answers `/__reset` like
/// `server.mjs`. Tests declare what legitimately differs on HAPI with this, never skip.
pub fn on_hapi() -> bool {
    std::env::var("FHIRGATE_TEST_UPSTREAM").is_ok_and(|v| v == "hapi")
}

/// The directory of the node project (`<repo>/tests/upstream`).
pub fn upstream_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("upstream")
}

impl FhirUpstream {
    /// Starts the server on a free port and waits until it listens (30 s at most).
    ///
    /// Panics with instructions when `tests/upstream/node_modules` is missing (run
    /// `scripts/test`, which installs it) or when node cannot start the server. The node binary
    /// is `node` from `PATH`, or `$FHIRGATE_TEST_NODE`.
    pub fn start() -> FhirUpstream {
        let dir = upstream_dir();
        let marker = dir.join("node_modules/@medplum/fhir-router/package.json");
        if !marker.is_file() {
            panic!(
                "{} is missing: the FHIR test upstream is not installed. Run `scripts/test` \
                 (the repository's test command; it runs `npm ci` in tests/upstream), or \
                 `scripts/setup` and then cargo test.",
                dir.join("node_modules").display()
            );
        }
        let node = std::env::var("FHIRGATE_TEST_NODE").unwrap_or_else(|_| "node".to_string());
        let mut command = Command::new(&node);
        if on_hapi() {
            // The second pass: HAPI FHIR behind a recording proxy with this server's protocol.
            command
                .arg("hapi-proxy.mjs")
                .args(["--hapi", &super::hapi::origin()]);
        } else {
            command.arg("server.mjs");
        }
        let mut child = command
            .args(["--port", "0", "--exit-on-stdin-close"])
            .current_dir(&dir)
            // Held open by `child` for its whole life: the server exits when it closes, so a
            // test binary that dies without running Drop leaves no server behind.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `{node} server.mjs` in {}: {e} (is node installed? scripts/test \
                     expects node and npm on PATH)",
                    dir.display()
                )
            });

        let stderr_log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&stderr_log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[fhir-upstream] {line}");
                    if let Ok(mut log) = log.lock() {
                        log.push_str(&line);
                        log.push('\n');
                    }
                }
            });
        }

        let stdout = child.stdout.take().expect("child stdout is piped");
        let (tx, rx) = mpsc::channel::<u16>();
        std::thread::spawn(move || read_listening_line(stdout, tx));

        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(port) => break port,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!(
                            "the FHIR test upstream (node server.mjs) exited with {status} before \
                             listening; its stderr:\n{}",
                            stderr_text(&stderr_log)
                        );
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "the FHIR test upstream (node server.mjs) did not print `LISTENING \
                             <port>` within {START_TIMEOUT:?}; its stderr:\n{}",
                            stderr_text(&stderr_log)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.kill();
                    let status = child.wait();
                    std::thread::sleep(Duration::from_millis(200));
                    panic!(
                        "the FHIR test upstream (node server.mjs) closed its stdout without \
                         printing `LISTENING <port>` (exit: {status:?}); its stderr:\n{}",
                        stderr_text(&stderr_log)
                    );
                }
            }
        };

        FhirUpstream {
            base_url: format!("http://127.0.0.1:{port}/fhir/R4"),
            port,
            child,
        }
    }

    /// `host:port` of the server, e.g. for a gateway's upstream setting.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Absolute URL of a FHIR path relative to the base: `url("Patient/p1")`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path.trim_start_matches('/'))
    }

    /// Forgets the recorded requests and empties the FHIR repository.
    pub fn reset(&self) {
        let response = self.request("POST", "/__reset", &[], None);
        assert_eq!(
            response.status,
            200,
            "POST /__reset failed: {}",
            response.text()
        );
    }

    /// Every request the server received since it started (or since the last `reset`), oldest
    /// first, as recorded by it: `{seq, time, method, url, headers, body?}` with lower-case
    /// header names and `url` as sent (path and query, e.g. `/fhir/R4/Patient/p1`).
    pub fn requests(&self) -> Vec<Value> {
        let response = self.request("GET", "/__requests", &[], None);
        assert_eq!(
            response.status,
            200,
            "GET /__requests failed: {}",
            response.text()
        );
        match response.json() {
            Value::Array(items) => items,
            other => panic!("GET /__requests did not return an array: {other}"),
        }
    }

    /// A raw HTTP/1.1 request to the server, `target` being the path and query from the root
    /// (`/fhir/R4/Patient/p1`). Panics on I/O errors.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        http_request(&self.authority(), method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target} to the FHIR test upstream failed: {e}"))
    }

    /// A FHIR request straight to the upstream (bypassing fhirgate), `path` relative to the base
    /// (`Patient/p1`, `Patient?name=x`); a body is sent as `application/fhir+json`.
    pub fn fhir(&self, method: &str, path: &str, body: Option<&Value>) -> HttpResponse {
        let target = format!("/fhir/R4/{}", path.trim_start_matches('/'));
        let bytes = body.map(|b| b.to_string().into_bytes());
        let mut headers = vec![("Accept", "application/fhir+json")];
        if bytes.is_some() {
            headers.push(("Content-Type", "application/fhir+json"));
        }
        self.request(method, &target, &headers, bytes.as_deref())
    }

    /// Stores a fixture with its own id (`PUT [type]/[id]`, creating or replacing it) and returns
    /// the stored resource (with `meta.versionId`). Panics unless the server accepts it.
    pub fn put_resource(&self, resource: &Value) -> Value {
        let resource_type = resource["resourceType"]
            .as_str()
            .unwrap_or_else(|| panic!("fixture has no resourceType: {resource}"));
        let id = resource["id"]
            .as_str()
            .unwrap_or_else(|| panic!("fixture has no id: {resource}"));
        let response = self.fhir("PUT", &format!("{resource_type}/{id}"), Some(resource));
        assert!(
            response.status == 200 || response.status == 201,
            "PUT {resource_type}/{id} to the FHIR test upstream: {} {}",
            response.status,
            response.text()
        );
        response.json()
    }
}

impl Drop for FhirUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_listening_line(stdout: ChildStdout, tx: mpsc::Sender<u16>) {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return, // drops tx: the waiting side sees Disconnected
            Ok(_) => {
                if let Some(port) = line
                    .trim()
                    .strip_prefix("LISTENING ")
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                    break;
                }
            }
        }
    }
    // Keep draining so the server can never block on a full pipe.
    let mut sink = Vec::new();
    let _ = reader.read_to_end(&mut sink);
}

fn stderr_text(log: &Arc<Mutex<String>>) -> String {
    log.lock().map(|s| s.clone()).unwrap_or_default()
}

/// A response of [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics (showing the body) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// A minimal blocking HTTP/1.1 client (one request per connection, `Connection: close`), enough
/// for tests: `authority` is `host:port`, `target` the path and query.
pub fn http_request(
    authority: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let _ = stream.set_nodelay(true);

    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("host") {
        head.push_str(&format!("Host: {authority}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !has("connection") {
        head.push_str("Connection: close\r\n");
    }
    if let Some(body) = body
        && !has("content-length")
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    stream.flush()?;

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method.eq_ignore_ascii_case("HEAD"))
}

fn invalid(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

fn parse_response(raw: &[u8], head_request: bool) -> std::io::Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of response headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| invalid("non-UTF-8 headers"))?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line: {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };

    let body = if head_request || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        decode_chunked(rest)?
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < length {
            return Err(invalid(format!(
                "body shorter than Content-Length ({} < {length})",
                rest.len()
            )));
        }
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| invalid("bad chunk"))?;
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(invalid("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
