//! E-mail for the tests: a real local SMTP sink (`tests/smtp_sink.py`, Python's aiosmtpd, run
//! with `python3` from PATH or `$FHIRGATE_TEST_PYTHON`) and readers for the messages it
//! received or fhirgate wrote to its outbox folder.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running SMTP sink. Dropping it stops the server.
pub struct SmtpSink {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_sink.py");
        let python =
            std::env::var("FHIRGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--dir")
            .arg(dir.path())
            // Held open for the child's whole life: it exits when this closes.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("sink stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).expect(
            "the SMTP sink prints LISTENING <port> (is aiosmtpd installed? run scripts/setup)",
        );
        let port = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!("the SMTP sink did not start (is aiosmtpd installed? run scripts/setup): {line:?}")
            });
        SmtpSink { port, dir, child }
    }

    /// The folder the sink writes each message to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<String> {
        read_eml_dir(self.dir.path())
    }

    /// Waits until at least `n` messages arrived (10 s at most) and returns them all.
    pub fn wait_for(&self, n: usize) -> Vec<String> {
        wait_for_messages(|| self.messages(), n)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<data_dir>/outbox/*.eml`, oldest first.
pub fn outbox(data_dir: &Path) -> Vec<String> {
    read_eml_dir(&data_dir.join("outbox"))
}

pub fn wait_for_outbox(data_dir: &Path, n: usize) -> Vec<String> {
    wait_for_messages(|| outbox(data_dir), n)
}

fn wait_for_messages(read: impl Fn() -> Vec<String>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = read();
        if got.len() >= n || Instant::now() > deadline {
            assert!(
                got.len() >= n,
                "expected {n} e-mails, got {}: {got:#?}",
                got.len()
            );
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_eml_dir(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|(_, p)| std::fs::read_to_string(p).ok())
        .collect()
}

/// The value of a header of a message.
pub fn header(message: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    message
        .lines()
        .take_while(|l| !l.is_empty())
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_string())
}

/// The body, with quoted-printable soft line breaks undone.
pub fn body(message: &str) -> String {
    let text = message.replace("\r\n", "\n");
    let body = text.split_once("\n\n").map(|(_, b)| b).unwrap_or("");
    if header(message, "Content-Transfer-Encoding")
        .is_some_and(|e| e.eq_ignore_ascii_case("quoted-printable"))
    {
        body.replace("=\n", "").replace("=3D", "=")
    } else {
        body.to_string()
    }
}

/// The first link of a message containing `part` (e.g. `/auth/setpassword/`).
pub fn link(message: &str, part: &str) -> Option<String> {
    body(message)
        .split_whitespace()
        .find(|w| w.starts_with("http") && w.contains(part))
        .map(str::to_string)
}

/// The (request id, secret) of a message's set-password link to the gateway at `base`.
pub fn set_password_ids(message: &str, base: &str) -> (String, String) {
    let link = link(message, "/auth/setpassword/").expect("a set-password link");
    let rest = link
        .strip_prefix(&format!("{base}auth/setpassword/"))
        .expect("a link to the gateway");
    let (id, secret) = rest.split_once('/').expect("<id>/<secret>");
    (id.to_string(), secret.to_string())
}
