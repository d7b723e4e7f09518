#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The first minutes of an operator (issue 16), with the real binary as a person runs it:
//! - a taken port (each listener in turn) stops `fhirgate serve` at once with a non-zero exit
//!   and one line naming the address, before a banner, a secret or a file is written;
//! - log lines are JSON when the output is not a terminal, readable text (with colours) on a
//!   terminal, and `--log-format text` writes no colour codes into a file;
//! - an idle instance stops as soon as it is told to, not after the whole grace period.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::gateway::free_port;

/// `fhirgate serve` on free loopback ports (unless `vars` set them) in `data`, in front of an
/// upstream nothing listens on, configured only by `FHIRGATE_*` variables.
fn serve(data: &Path, vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhirgate"));
    cmd.arg("serve").stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("FHIRGATE_") {
            cmd.env_remove(key);
        }
    }
    let gateway = free_port();
    cmd.env("FHIRGATE_DATA_DIR", data)
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{gateway}"))
        .env("FHIRGATE_BASE_URL", format!("http://127.0.0.1:{gateway}/"))
        .env(
            "FHIRGATE_CONTROL_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "FHIRGATE_METRICS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "FHIRGATE_UPSTREAM",
            format!("http://127.0.0.1:{}/fhir/R4", free_port()),
        )
        .env("FHIRGATE_THREADS", "1")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
    cmd
}

/// Runs `cmd` to its end (at most `limit`), with stdout and stderr as pipes.
fn run_to_end(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    (child.wait_with_output().unwrap(), elapsed)
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_taken_port_stops_the_start_with_one_line_and_nothing_written() {
    for (key, what) in [
        ("FHIRGATE_LISTEN", "gateway"),
        ("FHIRGATE_CONTROL_LISTEN", "control API"),
        ("FHIRGATE_METRICS_LISTEN", "metrics"),
    ] {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let cmd = serve(
            &data,
            &[
                (key, taken.clone()),
                ("FHIRGATE_ADMIN_PASSWORD", "a-password-to-spot".into()),
            ],
        );
        let (out, took) = run_to_end(cmd, Duration::from_secs(15));
        let text = text_of(&out);
        assert!(
            !out.status.success(),
            "{what}: exit {:?}: {text}",
            out.status
        );
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        let naming: Vec<&str> = text.lines().filter(|l| l.contains(&taken)).collect();
        assert_eq!(naming.len(), 1, "{what}: {text}");
        assert!(
            naming[0].contains(what) && naming[0].contains("in use"),
            "{what}: {}",
            naming[0]
        );
        assert!(!text.contains("fhirgate is running"), "{what}: {text}");
        assert!(
            !text.contains("client_secret") && !text.contains("a-password-to-spot"),
            "{what}: a secret was printed: {text}"
        );
        assert!(
            !data.exists(),
            "{what}: the data dir was created before the start failed"
        );
        drop(holder);
    }
}

/// Starts `cmd` with piped output, waits for the banner, stops it with SIGTERM and returns
/// (everything it printed, how long the stop took, the exit status).
fn start_then_stop(mut cmd: Command) -> (String, Duration, std::process::ExitStatus) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&seen).contains("Admin user") {
        assert!(
            Instant::now() < deadline,
            "no banner: {}",
            String::from_utf8_lossy(&seen)
        );
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.extend(chunk);
        }
    }
    let stopping = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopping.elapsed() < Duration::from_secs(20), "no stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = stopping.elapsed();
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.extend(chunk);
    }
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (
        format!("{}{err}", String::from_utf8_lossy(&seen)),
        took,
        status,
    )
}

#[test]
fn an_idle_instance_stops_at_once_and_logs_json_into_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    // The default grace period (5 s) applies; nothing is in flight.
    let (text, took, status) = start_then_stop(serve(tmp.path(), &[]));
    assert!(status.success(), "exit {status:?}: {text}");
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
    // Not a terminal: every log line is a JSON object, and pingora's startup chatter is gone.
    let logs: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!logs.is_empty(), "{text}");
    for line in &logs {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert!(v["level"].is_string(), "{line}");
        assert!(
            !v["target"].as_str().unwrap_or("").starts_with("pingora"),
            "{line}"
        );
    }
    // The upstream nothing listens on gets a word at start.
    assert!(
        logs.iter()
            .any(|l| l.contains("upstream FHIR server is not reachable")),
        "{text}"
    );
    assert!(text.contains("fhirgate is running"), "{text}");
}

#[test]
fn text_logs_carry_no_colour_codes_into_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (text, _, status) =
        start_then_stop(serve(tmp.path(), &[("FHIRGATE_LOG_FORMAT", "text".into())]));
    assert!(status.success(), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
    assert!(!text.lines().any(|l| l.starts_with('{')), "{text}");
    assert!(
        text.contains("upstream FHIR server is not reachable"),
        "{text}"
    );
}

#[test]
fn on_a_terminal_logs_are_readable_text() {
    // A pseudo-terminal (python's pty) stands for the operator's terminal.
    let tmp = tempfile::tempdir().unwrap();
    let cmd = serve(tmp.path(), &[]);
    let script = r#"
import os, pty, select, signal, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
out = b""
deadline = time.time() + 30
while time.time() < deadline and b"Admin user" not in out:
    ready, _, _ = select.select([fd], [], [], 0.2)
    if ready:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
os.kill(pid, signal.SIGTERM)
os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
"#;
    let mut py = Command::new("python3");
    py.arg("-c").arg(script).arg(cmd.get_program());
    py.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => py.env(k, v),
            None => py.env_remove(k),
        };
    }
    let out = py.output().expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("fhirgate is running"), "{text}");
    let log_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("INFO") || l.contains("WARN"))
        .collect();
    assert!(!log_lines.is_empty(), "{text}");
    assert!(
        log_lines.iter().all(|l| !l.trim_start().starts_with('{')),
        "JSON on a terminal: {text}"
    );
    assert!(
        text.contains('\u{1b}'),
        "no colours on a terminal: {text:?}"
    );
}
