//! Signature verification by libxmlsec1's `xmlsec1` program, one signature at a time (chosen
//! by XPath), against the IdP's certificates only: `--enabled-key-data key-name` keeps a key
//! or certificate inside the message from ever being used (the classic hole of xmlsec1's
//! defaults), and `--enabled-reference-uris same-doc` keeps it from fetching anything.
//! The Response goes in on stdin; nothing it prints is read, only its exit status.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::response::{SamlError, SignedPart};

/// The program, looked up on PATH.
const PROGRAM: &str = "xmlsec1";

/// A verification gives up after this long (a real one takes milliseconds).
const TIMEOUT: Duration = Duration::from_secs(3);

/// A sign-in waits this long for a free verification slot, then is told to try again.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many verifications run at once (each is a process).
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Verifies every part's signature against one of `certificates` (PEM).
pub async fn verify(
    xml: &str,
    parts: &[SignedPart],
    certificates: &[String],
) -> Result<(), SamlError> {
    let dir = tempfile::tempdir().map_err(|e| {
        tracing::error!(error = %e, "cannot make a directory for the IdP's certificates");
        SamlError::Unavailable("no temporary directory")
    })?;
    let mut cert_files = Vec::new();
    for (i, pem) in certificates.iter().enumerate() {
        let path = dir.path().join(format!("idp-{i}.pem"));
        std::fs::write(&path, pem).map_err(|e| {
            tracing::error!(error = %e, "cannot write the IdP's certificate");
            SamlError::Unavailable("no temporary directory")
        })?;
        cert_files.push(path);
    }
    for part in parts {
        let mut verified = false;
        for cert in &cert_files {
            if verify_one(xml, *part, cert).await? {
                verified = true;
                break;
            }
        }
        if !verified {
            return Err(SamlError::BadSignature);
        }
    }
    Ok(())
}

/// One signature against one certificate: `Ok(false)` when it does not verify.
async fn verify_one(
    xml: &str,
    part: SignedPart,
    cert: &std::path::Path,
) -> Result<bool, SamlError> {
    let _permit = match tokio::time::timeout(QUEUE_TIMEOUT, RUNNING.acquire()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err(SamlError::Unavailable("shutting down")),
        Err(_) => {
            tracing::warn!("every SAML verification slot is busy");
            return Err(SamlError::Unavailable(
                "too many sign-ins at once; try again",
            ));
        }
    };
    let mut child = Command::new(PROGRAM)
        .arg("--verify")
        .arg("--pubkey-cert-pem")
        .arg(cert)
        .args([
            "--enabled-key-data",
            "key-name",
            "--enabled-reference-uris",
            "same-doc",
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:protocol:Response",
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            "--node-xpath",
            part.signature_xpath(),
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            tracing::error!(error = %e, "cannot run xmlsec1 (install it: Debian's package xmlsec1)");
            SamlError::Unavailable("the xmlsec1 program is missing")
        })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or(SamlError::Unavailable("no pipe"))?;
    let run = async {
        // A failed write means xmlsec1 stopped reading: its exit status says why.
        let _ = stdin.write_all(xml.as_bytes()).await;
        drop(stdin);
        child.wait().await
    };
    match tokio::time::timeout(TIMEOUT, run).await {
        Ok(Ok(status)) => Ok(status.success()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "xmlsec1 failed");
            Err(SamlError::Unavailable("xmlsec1 failed"))
        }
        Err(_) => {
            tracing::warn!("xmlsec1 took too long to verify a SAML response");
            Err(SamlError::BadSignature)
        }
    }
}

/// Whether `xmlsec1` can be run here (for a clear answer when an IdP is configured). Once it
/// could, it is not asked again.
pub async fn available() -> bool {
    static FOUND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if FOUND.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    let found = Command::new(PROGRAM)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    FOUND.store(found, std::sync::atomic::Ordering::Relaxed);
    found
}
