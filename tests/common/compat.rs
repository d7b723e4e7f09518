//! Runs the Node compatibility suites of `tests/compat/` (the unmodified `@medplum/core` SDK,
//! `openid-client`) against a running fhirgate: one JSON argument in, one JSON object out.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// `<repo>/tests/compat`.
pub fn compat_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

/// What a suite printed.
pub struct ScriptRun {
    /// The JSON object on the last line of stdout.
    pub result: Value,
    /// stderr, for failure messages.
    pub stderr: String,
    pub success: bool,
}

/// Runs `node <script> <input>` in `tests/compat` (node from `PATH`, or `$FHIRGATE_TEST_NODE`).
///
/// `@medplum/core` 5.x reads the global `WebSocket` when it loads: node 22+ has it, older
/// versions get `--experimental-websocket`.
pub fn run_script(script: &str, input: &Value) -> ScriptRun {
    let dir = compat_dir();
    for package in ["@medplum/core", "openid-client"] {
        assert!(
            dir.join("node_modules")
                .join(package)
                .join("package.json")
                .is_file(),
            "tests/compat/node_modules/{package} is missing: run scripts/setup (npm ci in tests/compat)"
        );
    }
    let node = std::env::var("FHIRGATE_TEST_NODE").unwrap_or_else(|_| "node".into());
    let mut command = Command::new(&node);
    if node_major(&node) < 22 {
        command.arg("--experimental-websocket");
    }
    let out = command
        .arg(script)
        .arg(input.to_string())
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{node} {script}` in {}: {e}", dir.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let result: Value = serde_json::from_str(last.trim()).unwrap_or_else(|e| {
        panic!("no JSON from tests/compat/{script} ({e}):\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    ScriptRun {
        result,
        stderr,
        success: out.status.success(),
    }
}

/// The major version of `node` (`v20.11.1` → 20).
fn node_major(node: &str) -> u32 {
    let out = Command::new(node)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{node} --version`: {e} (is node installed?)"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `{node} --version`: {text}"))
}
