//! Configuration: a TOML file (`ConfigFile`), every key overridable by a `FHIRGATE_…` environment
//! variable or a flag (clap reads both), validated into `Config`. Precedence: flag > env > file >
//! default. Invariant: every value the rest of the program reads has been checked here; a bad
//! value is a one-line error at start, never a panic later.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use serde::Deserialize;

use crate::password_policy::{self, PasswordPolicy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// How a value given by flag or env is layered over the file's: one that is set wins.
trait Layer {
    fn over(self, file: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn over(self, file: Self) -> Self {
        self.or(file)
    }
}

/// A list is set when it is not empty.
impl<T> Layer for Vec<T> {
    fn over(self, file: Self) -> Self {
        if self.is_empty() { file } else { self }
    }
}

/// Declares `ConfigFile` and its `layered_over`, so the merge names every field the struct has
/// (a new option cannot be forgotten there).
macro_rules! config_file {
    (
        $(#[$outer:meta])*
        pub struct ConfigFile {
            $( $(#[$m:meta])* pub $f:ident: $t:ty, )*
        }
    ) => {
        $(#[$outer])*
        pub struct ConfigFile {
            $( $(#[$m])* pub $f: $t, )*
        }

        impl ConfigFile {
            /// `self` (flags and env) wins over `file`.
            pub fn layered_over(self, file: ConfigFile) -> ConfigFile {
                ConfigFile {
                    $( $f: Layer::over(self.$f, file.$f), )*
                }
            }
        }
    };
}

config_file! {
/// Options shared by `serve`, `proxy` and `control`. Each is a flag, an env var, or a key of the
/// TOML file (same name with `_` instead of `-`).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Gateway listen address (all client traffic) [default: 0.0.0.0:8080]
    #[arg(long, env = "FHIRGATE_LISTEN")]
    pub listen: Option<String>,
    /// Control API listen address (internal) [default: 127.0.0.1:8081]
    #[arg(long, env = "FHIRGATE_CONTROL_LISTEN")]
    pub control_listen: Option<String>,
    /// Metrics and health listen address (/metrics, /healthz, /readyz) [default: 0.0.0.0:9090]
    #[arg(long, env = "FHIRGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Public base URL clients use, e.g. https://fhir.example.org/ [default: http://localhost:<listen port>/]
    #[arg(long, env = "FHIRGATE_BASE_URL")]
    pub base_url: Option<String>,
    /// FHIR base URL of the upstream server [default: http://127.0.0.1:8103/fhir/R4]
    #[arg(long, env = "FHIRGATE_UPSTREAM")]
    pub upstream: Option<String>,
    /// Authorization header value fhirgate presents to the upstream (e.g. "Bearer …" or "Basic …")
    #[arg(long, env = "FHIRGATE_UPSTREAM_AUTHORIZATION", hide_env_values = true)]
    pub upstream_authorization: Option<String>,
    /// Further FHIR upstreams a Project can be bound to, as NAME=URL, comma-separated. Only a super
    /// admin binds a project, by naming one in the Project's `fhirgate-upstream` system setting
    /// [default: none]
    #[arg(long, env = "FHIRGATE_UPSTREAMS", value_delimiter = ',')]
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Authorization header values presented to those upstreams, as NAME=VALUE, comma-separated
    #[arg(
        long,
        env = "FHIRGATE_UPSTREAM_AUTHORIZATIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub upstream_authorizations: Vec<String>,
    /// Upstream connect timeout in milliseconds [default: 1000]
    #[arg(long, env = "FHIRGATE_UPSTREAM_CONNECT_TIMEOUT_MS")]
    pub upstream_connect_timeout_ms: Option<u64>,
    /// Upstream read timeout in milliseconds [default: 30000]
    #[arg(long, env = "FHIRGATE_UPSTREAM_READ_TIMEOUT_MS")]
    pub upstream_read_timeout_ms: Option<u64>,
    /// Data directory for the embedded SQLite store and the mail outbox [default: ./data]
    #[arg(long, env = "FHIRGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store URL: sqlite://PATH or postgres://… [default: sqlite://<data-dir>/fhirgate.db]
    #[arg(long, env = "FHIRGATE_STORE")]
    pub store: Option<String>,
    /// The key-encryption key that seals signing keys and the client-secret hash key in the
    /// store: 32 bytes as base64. Every instance sharing a store needs the same one [default:
    /// read from key_encryption_key_file]
    #[arg(long, env = "FHIRGATE_KEY_ENCRYPTION_KEY", hide_env_values = true)]
    pub key_encryption_key: Option<String>,
    /// File holding the key-encryption key (base64) [default: <data-dir>/key-encryption-key,
    /// created with mode 0600 by the first start]
    #[arg(long, env = "FHIRGATE_KEY_ENCRYPTION_KEY_FILE")]
    pub key_encryption_key_file: Option<PathBuf>,
    /// Store connection pool size per process [default: 4 for SQLite, 16 for PostgreSQL]
    #[arg(long, env = "FHIRGATE_STORE_MAX_CONNECTIONS")]
    pub store_max_connections: Option<u32>,
    /// Comma-separated CIDRs whose X-Forwarded-For is believed [default: none]
    #[arg(long, env = "FHIRGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Access token lifetime, e.g. 1h, 30m, 3600s [default: 1h]
    #[arg(long, env = "FHIRGATE_ACCESS_TOKEN_LIFETIME")]
    pub access_token_lifetime: Option<String>,
    /// Refresh token lifetime [default: 2w]
    #[arg(long, env = "FHIRGATE_REFRESH_TOKEN_LIFETIME")]
    pub refresh_token_lifetime: Option<String>,
    /// Verified-token cache capacity (entries) [default: 100000]
    #[arg(long, env = "FHIRGATE_TOKEN_CACHE_CAPACITY")]
    pub token_cache_capacity: Option<u64>,
    /// Entries of each identity cache (memberships, clients, policies, effective policies):
    /// what bounds an instance's memory, whatever the number of identities [default: 100000]
    #[arg(long, env = "FHIRGATE_IDENTITY_CACHE_CAPACITY")]
    pub identity_cache_capacity: Option<u64>,
    /// Requests per minute per client address to /auth/* and /oauth2/* (0 = no limit) [default: 160]
    #[arg(long, env = "FHIRGATE_AUTH_RATE_LIMIT")]
    pub auth_rate_limit: Option<u32>,
    /// Comma-separated CIDRs that fetches chosen by a client record (a client's jwksUri, an
    /// identity provider's endpoints) may reach although they are internal (loopback, private,
    /// link-local) [default: none]
    #[arg(long, env = "FHIRGATE_OUTBOUND_ALLOW", value_delimiter = ',')]
    #[serde(default)]
    pub outbound_allow: Vec<String>,
    /// Failed credentials (Basic secrets, Bearer tokens) per minute per client address (IPv6: per
    /// /64) and per client id on FHIR paths before 429 (0 = no limit) [default: 30]
    #[arg(long, env = "FHIRGATE_CREDENTIAL_FAILURE_LIMIT")]
    pub credential_failure_limit: Option<u32>,
    /// Largest request body read by the gateway, in bytes [default: 16777216]
    #[arg(long, env = "FHIRGATE_MAX_REQUEST_BODY")]
    pub max_request_body: Option<usize>,
    /// Largest upstream response buffered for filtering, in bytes [default: 67108864]
    #[arg(long, env = "FHIRGATE_MAX_RESPONSE_BUFFER")]
    pub max_response_buffer: Option<usize>,
    /// Worker threads of the gateway [default: number of CPUs]
    #[arg(long, env = "FHIRGATE_THREADS")]
    pub threads: Option<usize>,
    /// Directory of AccessPolicy JSON files loaded at start and on change
    #[arg(long, env = "FHIRGATE_POLICIES_DIR")]
    pub policies_dir: Option<PathBuf>,
    /// Seconds to let in-flight requests finish on SIGTERM [default: 5]
    #[arg(long, env = "FHIRGATE_GRACE_PERIOD_SECONDS")]
    pub grace_period_seconds: Option<u64>,
    /// E-mail of the bootstrap super admin [default: admin@example.com]
    #[arg(long, env = "FHIRGATE_ADMIN_EMAIL")]
    pub admin_email: Option<String>,
    /// Password of the bootstrap super admin [default: generated, printed once]
    #[arg(long, env = "FHIRGATE_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Client id of the bootstrap admin ClientApplication [default: generated]
    #[arg(long, env = "FHIRGATE_ADMIN_CLIENT_ID")]
    pub admin_client_id: Option<String>,
    /// Secret of the bootstrap admin ClientApplication [default: generated, printed once]
    #[arg(long, env = "FHIRGATE_ADMIN_CLIENT_SECRET", hide_env_values = true)]
    pub admin_client_secret: Option<String>,
    /// Log format: json, text, or auto (text on a terminal, JSON lines otherwise) [default: auto]
    #[arg(long, env = "FHIRGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// SMTP server for invitation and password e-mails [default: none: each message is written to <data-dir>/outbox/ as an .eml file]
    #[arg(long, env = "FHIRGATE_SMTP_HOST")]
    pub smtp_host: Option<String>,
    /// SMTP port [default: 587 for starttls, 465 for tls, 25 for none]
    #[arg(long, env = "FHIRGATE_SMTP_PORT")]
    pub smtp_port: Option<u16>,
    /// SMTP user name (with smtp_password) [default: no authentication]
    #[arg(long, env = "FHIRGATE_SMTP_USERNAME")]
    pub smtp_username: Option<String>,
    /// SMTP password
    #[arg(long, env = "FHIRGATE_SMTP_PASSWORD", hide_env_values = true)]
    pub smtp_password: Option<String>,
    /// SMTP transport security: starttls, tls (implicit, "SMTPS") or none [default: starttls]
    #[arg(long, env = "FHIRGATE_SMTP_TLS")]
    pub smtp_tls: Option<String>,
    /// From address of e-mails, e.g. "Clinic <no-reply@clinic.example>" [default: no-reply@<host of base_url>]
    #[arg(long, env = "FHIRGATE_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// Open self-registration through /auth/newuser (true or false) [default: false]
    #[arg(long, env = "FHIRGATE_REGISTER_ENABLED")]
    pub register_enabled: Option<bool>,
    /// Browser origins allowed to call fhirgate (CORS), comma-separated `scheme://host[:port]`, or
    /// `*` for any origin (then without credentials) [default: the origins of the registered
    /// clients' redirect URIs, launch URIs and allowedOrigin]
    #[arg(long, env = "FHIRGATE_CORS_ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Also write every security event as a FHIR AuditEvent (IHE BALP shape) to the upstream
    /// of its project, readable by the project's admins (true or false) [default: false]
    #[arg(long, env = "FHIRGATE_AUDIT_EVENTS")]
    pub audit_events: Option<bool>,
    /// The upstreams search strings with `:contains` (true or false); with false, string
    /// criteria are checked by the gateway alone (HAPI with allow_contains_searches off)
    /// [default: true]
    #[arg(long, env = "FHIRGATE_UPSTREAM_CONTAINS_SEARCH")]
    pub upstream_contains_search: Option<bool>,
    /// Google client ids whose ID tokens sign people in (`POST /auth/google`, and the "Sign in
    /// with Google" button of the sign-in page, which uses the first), comma-separated; a
    /// Project's `site[].googleClientId` is accepted too [default: none]
    #[arg(long, env = "FHIRGATE_GOOGLE_CLIENT_IDS", value_delimiter = ',')]
    #[serde(default)]
    pub google_client_ids: Vec<String>,
    /// Where Google publishes the keys of its ID tokens [default: https://www.googleapis.com/oauth2/v3/certs]
    #[arg(long, env = "FHIRGATE_GOOGLE_JWKS_URL")]
    pub google_jwks_url: Option<String>,
    /// The issuer of Google ID tokens [default: https://accounts.google.com, also accounts.google.com]
    #[arg(long, env = "FHIRGATE_GOOGLE_ISSUER")]
    pub google_issuer: Option<String>,
    /// reCAPTCHA site key of the server's own sign-up and reset pages
    #[arg(long, env = "FHIRGATE_RECAPTCHA_SITE_KEY")]
    pub recaptcha_site_key: Option<String>,
    /// reCAPTCHA secret: when set, /auth/newuser and /auth/resetpassword need a verified recaptchaToken
    #[arg(long, env = "FHIRGATE_RECAPTCHA_SECRET_KEY")]
    pub recaptcha_secret_key: Option<String>,
    /// reCAPTCHA siteverify endpoint [default: https://www.google.com/recaptcha/api/siteverify]
    #[arg(long, env = "FHIRGATE_RECAPTCHA_VERIFY_URL")]
    pub recaptcha_verify_url: Option<String>,
    /// Breached-password range API (HaveIBeenPwned protocol, e.g. https://api.pwnedpasswords.com, or a mirror); new passwords it lists are refused [default: off]
    #[arg(long, env = "FHIRGATE_PWNED_PASSWORDS_URL")]
    pub pwned_passwords_url: Option<String>,
    /// Where one-time sign-in codes by SMS are posted, as JSON `{to, text, purpose}` (your SMS provider's adapter) [default: none: no SMS codes]
    #[arg(long, env = "FHIRGATE_SMS_HOOK_URL")]
    pub sms_hook_url: Option<String>,
    /// `Authorization` header value sent with each SMS hook call
    #[arg(long, env = "FHIRGATE_SMS_HOOK_AUTHORIZATION")]
    pub sms_hook_authorization: Option<String>,
    /// Shortest new password, in characters (8 to 72) [default: 8]
    #[arg(long, env = "FHIRGATE_PASSWORD_MIN_LENGTH")]
    pub password_min_length: Option<usize>,
    /// Lowest zxcvbn strength score a new password needs, 0 (off) to 4; common passwords and ones built from the user's name, e-mail address or project name score low [default: 3]
    #[arg(long, env = "FHIRGATE_PASSWORD_MIN_STRENGTH")]
    pub password_min_strength: Option<u8>,
    /// How far a SAML identity provider's clock may be from this server's when an assertion's time window is checked (0s to 5m) [default: 1m]
    #[arg(long, env = "FHIRGATE_SAML_CLOCK_SKEW")]
    pub saml_clock_skew: Option<String>,
    /// Where the gateway reaches the control API, e.g. http://control:8081 (host names are
    /// re-resolved every few seconds) [default: http://<control_listen>, loopback if it binds all addresses]
    #[arg(long, env = "FHIRGATE_CONTROL_URL")]
    pub control_url: Option<String>,
    /// How long a new signing key is published in the JWKS before it signs (`fhirgate keys rotate`) [default: 1m]
    #[arg(long, env = "FHIRGATE_KEY_PUBLISH_DELAY")]
    pub key_publish_delay: Option<String>,
    /// How long a verified token stays in the cache before its Login is read again [default: 1h]
    #[arg(long, env = "FHIRGATE_TOKEN_CACHE_TTL")]
    pub token_cache_ttl: Option<String>,
    /// How long an instance that cannot reach the store keeps serving already-verified credentials and policies; then 503 [default: 10m]
    #[arg(long, env = "FHIRGATE_STORE_OUTAGE_TTL")]
    pub store_outage_ttl: Option<String>,
}
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// Google sign-in (docs/medplum-compat.md §2.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Google {
    /// The server's own Google client ids (projects add theirs in `site[]`).
    pub client_ids: Vec<String>,
    pub jwks_url: String,
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
}

/// Google's own issuer, in both of the forms its ID tokens use.
const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];

fn google(f: &ConfigFile) -> Result<Google, ConfigError> {
    let jwks_url = match f.google_jwks_url.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => {
            http_url("google_jwks_url", url)?;
            url.to_string()
        }
        None => "https://www.googleapis.com/oauth2/v3/certs".into(),
    };
    let issuers = match f.google_issuer.as_deref().filter(|i| !i.is_empty()) {
        Some(issuer) => vec![issuer.to_string()],
        None => GOOGLE_ISSUERS.iter().map(|i| i.to_string()).collect(),
    };
    Ok(Google {
        client_ids: f
            .google_client_ids
            .iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect(),
        jwks_url,
        issuers,
    })
}

/// reCAPTCHA on the self-service endpoints (docs/medplum-compat.md §2.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recaptcha {
    pub site_key: Option<String>,
    /// When set, the check runs for bodies that use the server's own site key (or none).
    pub secret_key: Option<Secret>,
    pub verify_url: String,
}

/// The upstream FHIR server, split for pingora's `HttpPeer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// As configured, without a trailing slash: `http://127.0.0.1:8103/fhir/R4`.
    pub base_url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of the FHIR base, without trailing slash: `/fhir/R4`.
    pub base_path: String,
    /// `Authorization` value presented upstream.
    pub authorization: Option<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// The `Host` header the upstream expects (`host` or `host:port`).
    pub host_header: String,
}

/// `url` (the value of `key`) parsed as an http(s) URL with a host: the URL, whether it is
/// https, and the host without IPv6 brackets.
fn password_policy(
    min_length: Option<usize>,
    min_strength: Option<u8>,
) -> Result<PasswordPolicy, ConfigError> {
    let default = PasswordPolicy::default();
    let min_chars = min_length.unwrap_or(default.min_chars);
    if !(password_policy::MIN_CHARS..=password_policy::MAX_BYTES).contains(&min_chars) {
        return Err(invalid("password_min_length", "must be between 8 and 72"));
    }
    let min_strength = min_strength.unwrap_or(default.min_strength);
    if min_strength > password_policy::MAX_STRENGTH {
        return Err(invalid("password_min_strength", "must be between 0 and 4"));
    }
    Ok(PasswordPolicy {
        min_chars,
        min_strength,
    })
}

fn http_url(key: &'static str, url: &str) -> Result<(url::Url, bool, String), ConfigError> {
    let parsed = url::Url::parse(url).map_err(|e| invalid(key, e.to_string()))?;
    let tls = match parsed.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(invalid(key, format!("unsupported scheme `{other}`"))),
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid(key, "missing host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((parsed, tls, host))
}

impl Upstream {
    pub fn parse(url: &str, authorization: Option<String>) -> Result<Upstream, ConfigError> {
        let (parsed, tls, host) = http_url("upstream", url)?;
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| invalid("upstream", "missing port"))?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid("upstream", "must not have a query or fragment"));
        }
        let base_path = parsed.path().trim_end_matches('/').to_string();
        let default_port = if tls { 443 } else { 80 };
        let host_header = match parsed.port() {
            Some(p) if p != default_port => format!("{}:{p}", parsed.host_str().unwrap_or(&host)),
            _ => parsed.host_str().unwrap_or(&host).to_string(),
        };
        Ok(Upstream {
            base_url: url.trim_end_matches('/').to_string(),
            tls,
            host,
            port,
            base_path,
            authorization,
            connect_timeout: Duration::from_millis(1000),
            read_timeout: Duration::from_millis(30_000),
            host_header,
        })
    }
}

/// A list of CIDRs (a bare address is its own /32 or /128); blank entries are skipped.
fn cidrs(key: &'static str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| invalid(key, format!("`{s}` is not a CIDR")))
        })
        .collect()
}

/// The name of the global `upstream` among the bindings a Project can name.
pub const DEFAULT_UPSTREAM: &str = "default";

/// `NAME=URL` entries (and `NAME=VALUE` credentials) → named upstreams with the global one's
/// timeouts. Names are short identifiers; a credential must name a configured upstream, so a
/// typo cannot silently send a request without it.
fn named_upstreams(
    entries: &[String],
    authorizations: &[String],
    global: &Upstream,
) -> Result<std::collections::BTreeMap<String, Upstream>, ConfigError> {
    let split = |key: &'static str, entry: &str| -> Result<(String, String), ConfigError> {
        let (name, value) = entry
            .split_once('=')
            .ok_or_else(|| invalid(key, format!("`{entry}` is not NAME=VALUE")))?;
        let name = name.trim();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid || name == DEFAULT_UPSTREAM {
            return Err(invalid(
                key,
                format!(
                    "`{name}` is not a usable upstream name (letters, digits, - and _; not `default`)"
                ),
            ));
        }
        Ok((name.to_string(), value.trim().to_string()))
    };
    let mut credentials = std::collections::BTreeMap::new();
    for entry in authorizations.iter().filter(|e| !e.trim().is_empty()) {
        let (name, value) = split("upstream_authorizations", entry)?;
        credentials.insert(name, value);
    }
    let mut out = std::collections::BTreeMap::new();
    for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
        let (name, url) = split("upstreams", entry)?;
        let mut up = Upstream::parse(&url, credentials.remove(&name))
            .map_err(|e| invalid("upstreams", format!("{name}: {e}")))?;
        up.connect_timeout = global.connect_timeout;
        up.read_timeout = global.read_timeout;
        if out.insert(name.clone(), up).is_some() {
            return Err(invalid("upstreams", format!("`{name}` is named twice")));
        }
    }
    if let Some(name) = credentials.keys().next() {
        return Err(invalid(
            "upstream_authorizations",
            format!("`{name}` names no configured upstream"),
        ));
    }
    Ok(out)
}

/// Where the gateway reaches the control API: `http(s)://HOST:PORT`, HOST a name (resolved again
/// and again, so the control instance can move) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// As configured (or derived), without a trailing slash.
    pub url: String,
    pub tls: bool,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Result<ControlUrl, ConfigError> {
        let (parsed, tls, host) = http_url("control_url", url)?;
        // Control paths are forwarded unchanged, so the URL names a server, not a path on it.
        if parsed.path() != "/"
            || parsed.query().is_some()
            || parsed.fragment().is_some()
            || !parsed.username().is_empty()
        {
            return Err(invalid(
                "control_url",
                "must be scheme://host:port only (no path, query or credentials)",
            ));
        }
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| invalid("control_url", "missing port"))?;
        Ok(ControlUrl {
            url: url.trim_end_matches('/').to_string(),
            tls,
            host,
            port,
        })
    }

    /// The control listener of this host: `control_listen`, with an unspecified address
    /// (0.0.0.0, ::) replaced by loopback.
    pub fn local(listen: SocketAddr) -> ControlUrl {
        let addr = crate::net::local_address(listen);
        let ip = addr.ip();
        ControlUrl {
            url: format!("http://{addr}"),
            tls: false,
            host: ip.to_string(),
            port: listen.port(),
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which is required.
    StartTls,
    /// TLS from the first byte ("SMTPS").
    Tls,
    /// No encryption: only for a relay on the same host or a test sink.
    None,
}

/// The browser origins CORS admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// The origins of the registered clients (redirect URIs, launch URI, `allowedOrigin`).
    Registered,
    /// Exactly these (`scheme://host[:port]`, lower case).
    List(std::collections::BTreeSet<String>),
    /// Any origin, answered `*` and never with credentials.
    Any,
}

fn cors_origins(values: &[String]) -> Result<CorsOrigins, ConfigError> {
    let values: Vec<&str> = values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        return Ok(CorsOrigins::Registered);
    }
    if values == ["*"] {
        return Ok(CorsOrigins::Any);
    }
    let mut list = std::collections::BTreeSet::new();
    for v in values {
        let origin = url::Url::parse(v)
            .ok()
            .filter(|u| {
                matches!(u.scheme(), "http" | "https") && u.path() == "/" && !v.ends_with('/')
            })
            .map(|u| u.origin().ascii_serialization())
            .ok_or_else(|| {
                invalid(
                    "cors_origins",
                    format!("`{v}` is not an origin like https://app.example.com (or a lone *)"),
                )
            })?;
        list.insert(origin);
    }
    Ok(CorsOrigins::List(list))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// Text on a terminal, JSON lines otherwise (a file, a pipe, a log collector).
    Auto,
}

impl LogFormat {
    /// Whether lines are JSON, given whether standard output is a terminal.
    pub fn json(self, terminal: bool) -> bool {
        match self {
            LogFormat::Json => true,
            LogFormat::Text => false,
            LogFormat::Auto => !terminal,
        }
    }
}

/// A password that never shows up in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

/// The operator's SMS adapter: fhirgate posts `{to, text, purpose}` to `url`.
#[derive(Debug, Clone)]
pub struct SmsHook {
    pub url: String,
    pub authorization: Option<Secret>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The SMTP server e-mails go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// User name and password, when the server wants authentication.
    pub credentials: Option<(String, Secret)>,
}

impl Smtp {
    fn from_file(
        host: Option<String>,
        port: Option<u16>,
        username: Option<String>,
        password: Option<String>,
        tls: Option<String>,
    ) -> Result<Option<Smtp>, ConfigError> {
        let Some(host) = host.map(|h| h.trim().to_string()).filter(|h| !h.is_empty()) else {
            if port.is_some() || username.is_some() || password.is_some() || tls.is_some() {
                return Err(invalid("smtp_host", "required by the other smtp_ settings"));
            }
            return Ok(None);
        };
        let tls = match tls.as_deref().unwrap_or("starttls") {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            "none" => SmtpTls::None,
            other => {
                return Err(invalid(
                    "smtp_tls",
                    format!("`{other}` is not one of starttls, tls, none"),
                ));
            }
        };
        let port = port.unwrap_or(match tls {
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        });
        let credentials = match (username, password) {
            (Some(u), Some(p)) => Some((u, Secret(p))),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "smtp_username",
                    "smtp_username and smtp_password go together",
                ));
            }
        };
        Ok(Some(Smtp {
            host,
            port,
            tls,
            credentials,
        }))
    }
}

/// Bootstrap credentials made known in advance (for automation).
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    pub admin_email: String,
    pub admin_password: Option<String>,
    pub admin_client_id: Option<String>,
    pub admin_client_secret: Option<String>,
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Public base URL with a trailing slash.
    pub base_url: String,
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` derived from `base_url`, computed once.
    pub forwarded_proto: String,
    pub forwarded_host: String,
    pub upstream: Upstream,
    /// The named upstreams of `upstreams` (never `default`, which is `upstream`).
    pub named_upstreams: std::collections::BTreeMap<String, Upstream>,
    pub data_dir: PathBuf,
    pub store_url: String,
    /// Where the key-encryption key comes from (`crate::sealed`).
    pub key_encryption_key: crate::sealed::KekSource,
    /// `None`: the store's default for its dialect.
    pub store_max_connections: Option<u32>,
    pub trusted_proxies: Vec<IpNet>,
    /// Internal addresses that client-chosen fetches may reach anyway.
    pub outbound_allow: Vec<IpNet>,
    pub access_token_lifetime: Duration,
    pub refresh_token_lifetime: Duration,
    pub token_cache_capacity: u64,
    pub identity_cache_capacity: u64,
    /// Per client address and minute, on /auth/* and /oauth2/*; 0 disables the limit.
    pub auth_rate_limit: u32,
    pub credential_failure_limit: u32,
    pub max_request_body: usize,
    pub max_response_buffer: usize,
    pub threads: usize,
    pub policies_dir: Option<PathBuf>,
    pub grace_period_seconds: u64,
    pub bootstrap: Bootstrap,
    pub log_format: LogFormat,
    /// Where e-mail goes; `None`: the outbox folder `<data_dir>/outbox`.
    pub smtp: Option<Smtp>,
    /// The From mailbox of every e-mail (checked: it parses as a mailbox).
    pub mail_from: String,
    /// `/auth/newuser` is open (docs/medplum-compat.md §2.7 `registerEnabled`).
    pub register_enabled: bool,
    /// Security events are also written upstream as FHIR AuditEvents (`obs::trail`).
    pub audit_events: bool,
    /// The upstreams understand `:contains`; when not, string criteria never narrow upstream
    /// (`Permit::without_contains`).
    pub upstream_contains_search: bool,
    /// Which browser origins CORS admits.
    pub cors_origins: CorsOrigins,
    pub recaptcha: Recaptcha,
    pub google: Google,
    /// The breached-password range API's base URL; `None`: no check.
    pub pwned_passwords_url: Option<String>,
    /// What every new password must be (length and strength).
    pub password_policy: PasswordPolicy,
    /// Where SMS codes are posted; `None`: the `sms` MFA method is not offered.
    pub sms_hook: Option<SmsHook>,
    /// Where the gateway forwards control traffic.
    pub control_url: ControlUrl,
    /// A new signing key is in every JWKS this long before it signs.
    pub key_publish_delay: Duration,
    /// SAML: the clock skew allowed around an assertion's time window.
    pub saml_clock_skew: Duration,
    pub token_cache_ttl: Duration,
    /// Without the store for longer than this, authenticated requests get 503.
    pub store_outage_ttl: Duration,
}

/// Parses Medplum's duration form `^[0-9]+[smhdwy]$`.
pub fn parse_lifetime(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let digits = &s[..s.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 604_800,
        'y' => 31_536_000,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

fn addr(key: &'static str, v: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let s = v.unwrap_or(default);
    s.parse()
        .map_err(|_| invalid(key, format!("`{s}` is not an address like 127.0.0.1:8080")))
}

impl Config {
    /// The names a Project can be bound to: `default` and the configured `upstreams`.
    pub fn upstream_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(DEFAULT_UPSTREAM).chain(self.named_upstreams.keys().map(String::as_str))
    }

    pub fn from_file(f: ConfigFile) -> Result<Config, ConfigError> {
        let google_settings = google(&f)?;
        let listen = addr("listen", f.listen.as_deref(), "0.0.0.0:8080")?;
        let control_listen = addr(
            "control_listen",
            f.control_listen.as_deref(),
            "127.0.0.1:8081",
        )?;
        let metrics_listen = addr(
            "metrics_listen",
            f.metrics_listen.as_deref(),
            "0.0.0.0:9090",
        )?;
        let base_url: String = match f.base_url {
            Some(b) => {
                let u = url::Url::parse(&b).map_err(|e| invalid("base_url", e.to_string()))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(invalid("base_url", "must be an http(s) URL"));
                }
                format!("{}/", b.trim_end_matches('/'))
            }
            None => format!("http://localhost:{}/", listen.port()),
        };
        let mut upstream = Upstream::parse(
            f.upstream
                .as_deref()
                .unwrap_or("http://127.0.0.1:8103/fhir/R4"),
            f.upstream_authorization,
        )?;
        if let Some(ms) = f.upstream_connect_timeout_ms {
            upstream.connect_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = f.upstream_read_timeout_ms {
            upstream.read_timeout = Duration::from_millis(ms.max(1));
        }
        let named_upstreams = named_upstreams(&f.upstreams, &f.upstream_authorizations, &upstream)?;
        let data_dir = f.data_dir.unwrap_or_else(|| PathBuf::from("./data"));
        let store_url = f
            .store
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("fhirgate.db").display()));
        if !(store_url.starts_with("sqlite:")
            || store_url.starts_with("postgres://")
            || store_url.starts_with("postgresql://"))
        {
            return Err(invalid("store", "must start with sqlite: or postgres://"));
        }
        if f.store_max_connections == Some(0) {
            return Err(invalid("store_max_connections", "must be at least 1"));
        }
        let outbound_allow = cidrs("outbound_allow", &f.outbound_allow)?;
        let trusted_proxies = cidrs("trusted_proxies", &f.trusted_proxies)?;
        let lifetime = |key: &'static str, v: Option<String>, d: &str| {
            let s = v.unwrap_or_else(|| d.to_string());
            parse_lifetime(&s)
                .ok_or_else(|| invalid(key, format!("`{s}` is not a duration like 60s, 1h, 2w")))
        };
        let log_format = match f.log_format.as_deref().unwrap_or("auto") {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            "auto" => LogFormat::Auto,
            _ => return Err(invalid("log_format", "must be json, text or auto")),
        };
        if f.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1"));
        }
        if f.max_request_body == Some(0) || f.max_response_buffer == Some(0) {
            return Err(invalid(
                if f.max_request_body == Some(0) {
                    "max_request_body"
                } else {
                    "max_response_buffer"
                },
                "must be at least 1 byte",
            ));
        }
        if f.token_cache_capacity == Some(0) {
            return Err(invalid("token_cache_capacity", "must be at least 1"));
        }
        if f.identity_cache_capacity == Some(0) {
            return Err(invalid("identity_cache_capacity", "must be at least 1"));
        }
        let public = url::Url::parse(&base_url).map_err(|e| invalid("base_url", e.to_string()))?;
        let smtp = Smtp::from_file(
            f.smtp_host,
            f.smtp_port,
            f.smtp_username,
            f.smtp_password,
            f.smtp_tls,
        )?;
        let mail_from = match f.smtp_from {
            Some(from) => from,
            None => public
                .host_str()
                .map(|h| format!("no-reply@{h}"))
                .filter(|a| a.parse::<lettre::Address>().is_ok())
                .unwrap_or_else(|| "no-reply@localhost".into()),
        };
        if mail_from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(invalid(
                "smtp_from",
                format!("`{mail_from}` is not an address like \"Name <a@b.example>\""),
            ));
        }
        let recaptcha = Recaptcha {
            site_key: f.recaptcha_site_key.filter(|k| !k.is_empty()),
            secret_key: f.recaptcha_secret_key.filter(|k| !k.is_empty()).map(Secret),
            verify_url: match f.recaptcha_verify_url {
                Some(url) => {
                    http_url("recaptcha_verify_url", &url)?;
                    url
                }
                None => "https://www.google.com/recaptcha/api/siteverify".into(),
            },
        };
        let pwned_passwords_url = match f.pwned_passwords_url.filter(|u| !u.is_empty()) {
            Some(url) => {
                http_url("pwned_passwords_url", &url)?;
                Some(url)
            }
            None => None,
        };
        let password_policy = password_policy(f.password_min_length, f.password_min_strength)?;
        let saml_clock_skew = lifetime("saml_clock_skew", f.saml_clock_skew, "1m")?;
        if saml_clock_skew > Duration::from_secs(300) {
            return Err(invalid("saml_clock_skew", "must be at most 5m"));
        }
        let sms_hook = match f.sms_hook_url.filter(|u| !u.is_empty()) {
            Some(url) => {
                http_url("sms_hook_url", &url)?;
                Some(SmsHook {
                    url,
                    authorization: f
                        .sms_hook_authorization
                        .filter(|a| !a.is_empty())
                        .map(Secret),
                })
            }
            None => None,
        };
        let forwarded_proto = public.scheme().to_string();
        let forwarded_host = match (public.host_str(), public.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(invalid("base_url", "missing host")),
        };
        Ok(Config {
            listen,
            forwarded_proto,
            forwarded_host,
            control_listen,
            metrics_listen,
            base_url,
            upstream,
            named_upstreams,
            key_encryption_key: match (f.key_encryption_key, f.key_encryption_key_file) {
                (Some(value), _) => crate::sealed::KekSource::Value(value),
                (None, Some(path)) => crate::sealed::KekSource::File {
                    path,
                    create: false,
                },
                (None, None) => crate::sealed::KekSource::File {
                    path: data_dir.join("key-encryption-key"),
                    create: true,
                },
            },
            data_dir,
            store_url,
            store_max_connections: f.store_max_connections,
            trusted_proxies,
            outbound_allow,
            access_token_lifetime: lifetime(
                "access_token_lifetime",
                f.access_token_lifetime,
                "1h",
            )?,
            refresh_token_lifetime: lifetime(
                "refresh_token_lifetime",
                f.refresh_token_lifetime,
                "2w",
            )?,
            token_cache_capacity: f.token_cache_capacity.unwrap_or(100_000),
            identity_cache_capacity: f.identity_cache_capacity.unwrap_or(100_000),
            auth_rate_limit: f.auth_rate_limit.unwrap_or(160),
            credential_failure_limit: f.credential_failure_limit.unwrap_or(30),
            max_request_body: f.max_request_body.unwrap_or(16 << 20),
            max_response_buffer: f.max_response_buffer.unwrap_or(64 << 20),
            threads: f
                .threads
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(2)
                })
                .max(1),
            policies_dir: f.policies_dir,
            grace_period_seconds: f.grace_period_seconds.unwrap_or(5),
            bootstrap: Bootstrap {
                admin_email: f
                    .admin_email
                    .unwrap_or_else(|| "admin@example.com".into())
                    .to_lowercase(),
                admin_password: f.admin_password,
                admin_client_id: f.admin_client_id,
                admin_client_secret: f.admin_client_secret,
            },
            log_format,
            smtp,
            mail_from,
            register_enabled: f.register_enabled.unwrap_or(false),
            audit_events: f.audit_events.unwrap_or(false),
            upstream_contains_search: f.upstream_contains_search.unwrap_or(true),
            cors_origins: cors_origins(&f.cors_origins)?,
            recaptcha,
            google: google_settings,
            pwned_passwords_url,
            password_policy,
            sms_hook,
            control_url: match f.control_url.as_deref() {
                Some(u) => ControlUrl::parse(u)?,
                None => ControlUrl::local(control_listen),
            },
            key_publish_delay: lifetime("key_publish_delay", f.key_publish_delay, "1m")?,
            saml_clock_skew,
            token_cache_ttl: lifetime("token_cache_ttl", f.token_cache_ttl, "1h")?,
            store_outage_ttl: lifetime("store_outage_ttl", f.store_outage_ttl, "10m")?,
        })
    }

    /// The FHIR base URL clients see: `<base_url>fhir/R4`.
    pub fn public_fhir_base(&self) -> String {
        format!("{}fhir/R4", self.base_url)
    }
}

#[cfg(test)]
mod tests;
