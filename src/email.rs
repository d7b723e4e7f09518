//! Outgoing e-mail (docs/medplum-compat.md §11): invitations and password resets. Through SMTP (lettre)
//! when `smtp_host` is configured; otherwise each message is written as an `.eml` file into
//! `<data_dir>/outbox/`, so that an operator without a mail server can still hand a new user
//! their link.
//!
//! Log lines name the subject, the recipient and, for the outbox, the file. Never the body: the
//! body carries the one-time link, which is as good as a password until it is used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{Config, Smtp, SmtpTls};

/// How long one SMTP conversation may take before the send counts as failed.
const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain-text message to one recipient.
#[derive(Clone, PartialEq, Eq)]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub body: String,
}

impl std::fmt::Debug for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Email")
            .field("to", &self.to)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// Where a message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Accepted by the SMTP server.
    Smtp,
    /// Written to this file in the outbox.
    Outbox(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    #[error("invalid address: {0}")]
    Address(String),
    #[error("cannot build the message: {0}")]
    Build(String),
    #[error("SMTP: {0}")]
    Smtp(String),
    #[error("outbox: {0}")]
    Outbox(String),
}

/// The outbox folder of a configuration.
pub fn outbox_dir(config: &Config) -> PathBuf {
    config.data_dir.join("outbox")
}

fn build(config: &Config, email: &Email) -> Result<Message, EmailError> {
    let from: Mailbox = config
        .mail_from
        .parse()
        .map_err(|e: lettre::address::AddressError| EmailError::Address(e.to_string()))?;
    let to: Mailbox = email
        .to
        .parse()
        .map_err(|e: lettre::address::AddressError| EmailError::Address(e.to_string()))?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(email.subject.clone())
        .header(ContentType::TEXT_PLAIN)
        .body(email.body.clone())
        .map_err(|e| EmailError::Build(e.to_string()))
}

/// Sends `email`, through SMTP when configured, else into the outbox.
pub async fn send(config: &Config, email: &Email) -> Result<Delivered, EmailError> {
    let message = build(config, email)?;
    let result = match &config.smtp {
        Some(smtp) => send_smtp(smtp, message).await.map(|()| Delivered::Smtp),
        None => write_outbox(&outbox_dir(config), message)
            .await
            .map(Delivered::Outbox),
    };
    match &result {
        Ok(Delivered::Smtp) => {
            tracing::info!(to = %email.to, subject = %email.subject, "e-mail sent through SMTP");
        }
        Ok(Delivered::Outbox(path)) => {
            tracing::info!(
                to = %email.to,
                subject = %email.subject,
                file = %path.display(),
                "no SMTP configured: e-mail written to the outbox"
            );
        }
        Err(e) => {
            tracing::warn!(to = %email.to, subject = %email.subject, error = %e, "e-mail not sent");
        }
    }
    result
}

async fn send_smtp(smtp: &Smtp, message: Message) -> Result<(), EmailError> {
    let smtp_error = |e: lettre::transport::smtp::Error| EmailError::Smtp(e.to_string());
    let builder = match smtp.tls {
        SmtpTls::StartTls => {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host).map_err(smtp_error)?
        }
        SmtpTls::Tls => {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(smtp_error)?
        }
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
    };
    let mut builder = builder.port(smtp.port).timeout(Some(SMTP_TIMEOUT));
    if let Some((user, password)) = &smtp.credentials {
        builder = builder.credentials(Credentials::new(user.clone(), password.0.clone()));
    }
    // One transport per message: messages are rare, and a pool would outlive the config it was
    // built from (several gateways can run in one process in tests).
    let transport = builder.build();
    // The whole conversation is bounded too, not only each socket operation.
    match tokio::time::timeout(SMTP_TIMEOUT * 3, transport.send(message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(smtp_error(e)),
        Err(_) => Err(EmailError::Smtp("timed out".into())),
    }
}

/// Each message is written under a hidden name and then renamed: whoever watches the outbox (an
/// operator's script, the tests) sees a whole message or none, never a file still being written.
async fn write_outbox(dir: &Path, message: Message) -> Result<PathBuf, EmailError> {
    let outbox_error =
        |path: &Path, e: std::io::Error| EmailError::Outbox(format!("{}: {e}", path.display()));
    create_private_dir(dir)
        .await
        .map_err(|e| outbox_error(dir, e))?;
    let id = uuid::Uuid::new_v4();
    let partial = dir.join(format!(".{id}.eml.partial"));
    let path = dir.join(format!("{id}.eml"));
    write_private_file(&partial, &message.formatted())
        .await
        .map_err(|e| outbox_error(&partial, e))?;
    if let Err(e) = tokio::fs::rename(&partial, &path).await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(outbox_error(&path, e));
    }
    Ok(path)
}

async fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).await?;
    file.write_all(bytes).await?;
    file.sync_all().await
}

/// The outbox holds live links: only the service's own user may read it.
async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::ConfigFile;

    fn config(dir: &Path, smtp_port: Option<u16>) -> Config {
        config_tls(dir, smtp_port, "none")
    }

    fn config_tls(dir: &Path, smtp_port: Option<u16>, tls: &str) -> Config {
        Config::from_file(ConfigFile {
            data_dir: Some(dir.to_path_buf()),
            smtp_host: smtp_port.map(|_| "127.0.0.1".to_string()),
            smtp_port,
            smtp_tls: smtp_port.map(|_| tls.to_string()),
            smtp_from: Some("fhirgate <no-reply@example.com>".into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn email() -> Email {
        Email {
            to: "Alice@Example.com".into(),
            subject: "Welcome".into(),
            body: "Your link: http://x/auth/setpassword/1/2\n".into(),
        }
    }

    #[tokio::test]
    async fn without_smtp_the_message_lands_in_the_outbox() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path(), None);
        let Delivered::Outbox(path) = send(&c, &email()).await.unwrap() else {
            panic!("expected the outbox");
        };
        assert_eq!(path.parent(), Some(outbox_dir(&c).as_path()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("Subject: Welcome"), "{text}");
        assert!(text.contains("To: Alice@Example.com"), "{text}");
        assert!(
            text.contains("From: fhirgate <no-reply@example.com>"),
            "{text}"
        );
        assert!(text.contains("http://x/auth/setpassword/1/2"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(outbox_dir(&c))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the message itself is private too");
        }
        let names: Vec<String> = std::fs::read_dir(outbox_dir(&c))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "no partial file is left behind: {names:?}");
        assert!(names[0].ends_with(".eml"), "{names:?}");
    }

    #[tokio::test]
    async fn an_unreachable_smtp_server_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Every transport security mode builds its transport and fails cleanly (no panic, no
        // fallback to the outbox).
        for tls in ["none", "starttls", "tls"] {
            let c = config_tls(tmp.path(), Some(port), tls);
            assert!(
                matches!(send(&c, &email()).await, Err(EmailError::Smtp(_))),
                "{tls}"
            );
            assert!(!outbox_dir(&c).exists());
        }
    }

    #[tokio::test]
    async fn a_bad_recipient_is_refused_before_sending() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path(), None);
        let mut e = email();
        e.to = "not an address".into();
        assert!(matches!(send(&c, &e).await, Err(EmailError::Address(_))));
    }
}
