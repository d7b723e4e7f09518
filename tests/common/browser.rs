//! Scripts in `tests/browser` that drive Debian's chromium (playwright-core): how the Rust
//! tests run them.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

/// What a browser script printed (its one JSON line), its stderr, and whether it exited 0.
pub struct ScriptRun {
    pub output: Value,
    pub stderr: String,
    pub success: bool,
}

/// Runs `node tests/browser/<script> <input>`, with `screenshotDir` set to
/// `target/test-output/<shots>/` (emptied first). Panics when a package of `packages` or
/// chromium is missing (`scripts/setup` installs both) or when the script prints no JSON.
pub fn run_script(script: &str, shots: &str, packages: &[&str], mut input: Value) -> ScriptRun {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/browser");
    for package in packages {
        assert!(
            dir.join("node_modules")
                .join(package)
                .join("package.json")
                .is_file(),
            "tests/browser/node_modules/{package} is missing: run scripts/setup"
        );
    }
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file(),
        "/usr/bin/chromium is missing: run scripts/setup (Debian package chromium)"
    );
    let shots = root.join("target/test-output").join(shots);
    let _ = std::fs::remove_dir_all(&shots);
    input["screenshotDir"] = json!(shots);
    let node = std::env::var("FHIRGATE_TEST_NODE").unwrap_or_else(|_| "node".into());
    let out = Command::new(node)
        .arg(script)
        .arg(input.to_string())
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("run node tests/browser/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let output: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON from {script} ({e}):\n{stdout}\n{stderr}"));
    ScriptRun {
        output,
        stderr,
        success: out.status.success(),
    }
}
