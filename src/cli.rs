//! The command line: `serve`, `proxy`, `control`, `policy check`, `policy explain`, `keys rotate`
//! and `keys list`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigFile};
use crate::server::{Planes, start};

#[derive(Debug, Parser)]
#[command(
    name = "fhirgate",
    version,
    about = "Authorization gateway for FHIR servers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway and the control API in one process (embedded SQLite by default)
    Serve(ServeArgs),
    /// Run only the gateway (data plane)
    Proxy(ServeArgs),
    /// Run only the control API
    Control(ServeArgs),
    /// AccessPolicy tools
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Signing keys: rotation and listing (on the store every instance shares)
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a new signing key: in every instance's JWKS at once, signing after
    /// `key_publish_delay`; the current keys retire when every token they signed has expired
    Rotate(RotateArgs),
    /// List the signing keys: signing, published (signs later), verifying (retires later)
    List(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub server: ServeArgs,
    /// This rotation's publish delay, instead of `key_publish_delay` (e.g. 0s, 5m)
    #[arg(long, value_name = "DURATION")]
    pub publish_delay: Option<String>,
    /// Retire the current keys this long after the new one starts to sign [default: the longest
    /// token lifetime + 1m]. `0s` retires them at once: for a compromised key (their tokens stop
    /// working)
    #[arg(long, value_name = "DURATION")]
    pub retire_after: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file; every key can also be set by flag or FHIRGATE_* variable
    #[arg(long, env = "FHIRGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: ConfigFile,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate AccessPolicy JSON files as `--policies-dir` loads them; exits non-zero when any
    /// file is invalid
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show the decision trace of one request under a membership built from policy files, or
    /// a stored one
    Explain(Box<ExplainArgs>),
}

/// `fhirgate policy explain --policy FILE [--param name=value …] METHOD PATH [--body FILE]`
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  fhirgate policy explain --policy policies/patient-compartment.json \\\n    --param patient=Patient/p1 GET 'Observation?code=1234-5'"
)]
pub struct ExplainArgs {
    /// AccessPolicy file of the membership (repeatable; each becomes one `access` entry)
    #[arg(
        long = "policy",
        value_name = "FILE",
        required_unless_present = "membership"
    )]
    pub policies: Vec<PathBuf>,
    /// A stored ProjectMembership id instead: its own access, parameters, admin flag and
    /// project, with the policies of the store (read from --store)
    #[arg(long, value_name = "ID", conflicts_with_all = ["policies", "params", "profile", "admin"])]
    pub membership: Option<String>,
    /// The store to read --membership from [default: the one `fhirgate serve` uses]
    #[arg(
        long,
        env = "FHIRGATE_STORE",
        value_name = "URL",
        requires = "membership"
    )]
    pub store: Option<String>,
    /// Policy parameter, given to every policy: `name=value`, or `name=Type/id` for a reference
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// The membership's profile [default: ClientApplication/explain]
    #[arg(long, value_name = "TYPE/ID")]
    pub profile: Option<String>,
    /// The membership is a project admin
    #[arg(long)]
    pub admin: bool,
    /// The token's SMART scope (omit for Basic auth, which is never narrowed)
    #[arg(long)]
    pub scope: Option<String>,
    /// Client address, checked against the IP rules
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<std::net::IpAddr>,
    /// Request header `name: value` (repeatable), e.g. `If-None-Exist: identifier=x`
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Request body (JSON; a form for `_search`)
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// HTTP method
    pub method: String,
    /// Path relative to /fhir/R4/, with the query (`Observation?code=x`)
    pub path: String,
}

impl ServeArgs {
    pub fn config(self) -> Result<Config, String> {
        let file = match &self.config {
            Some(p) => ConfigFile::load(p).map_err(|e| e.to_string())?,
            None => ConfigFile::default(),
        };
        Config::from_file(self.options.layered_over(file)).map_err(|e| e.to_string())
    }
}

fn serve(args: ServeArgs, planes: Planes) -> Result<(), String> {
    let config = args.config()?;
    let _log_writer = crate::obs::init_logging(config.log_format);
    let running = start(config.clone(), planes).map_err(|e| e.to_string())?;
    print_welcome(&config, planes, &running.bootstrap);
    running.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; }, None => std::future::pending::<()>().await } } => {},
        }
    });
    tracing::info!("shutting down");
    running.shutdown();
    Ok(())
}

fn print_welcome(
    config: &Config,
    planes: Planes,
    report: &crate::control::bootstrap::BootstrapReport,
) {
    let base = &config.base_url;
    println!("fhirgate is running");
    if planes.gateway {
        println!("  gateway      {}  (public base URL {base})", config.listen);
    }
    if planes.control {
        println!("  control API  {}", config.control_listen);
    } else {
        println!(
            "  control API  {}  (another instance: the gateway forwards to it)",
            config.control_url.url
        );
    }
    println!(
        "  metrics      {}  (/metrics, /healthz, /readyz)",
        config.metrics_listen
    );
    println!("  upstream     {}", config.upstream.base_url);
    if let Some(dir) = &config.policies_dir {
        println!("  policies     {}  (loaded, watched)", dir.display());
    }
    if let Some(secret) = &report.client_secret {
        let id = &report.client_id;
        println!();
        println!("Admin client created (the secret is shown only this once):");
        println!("  client_id     {id}");
        println!("  client_secret {secret}");
        println!();
        println!("Get a token:");
        println!(
            "  TOKEN=$(curl -s {base}oauth2/token -d grant_type=client_credentials -d client_id={id} -d client_secret={secret} | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')"
        );
        println!("Create and read a Patient through the gateway:");
        println!(
            "  curl -s -X POST {base}fhir/R4/Patient -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/fhir+json' -d '{{\"resourceType\":\"Patient\",\"name\":[{{\"family\":\"Smith\"}}]}}'"
        );
        println!("  curl -s {base}fhir/R4/Patient -H \"Authorization: Bearer $TOKEN\"");
    } else if report.created.contains(&"admin client") {
        println!(
            "Admin client created: {} (with the configured secret)",
            report.client_id
        );
    } else {
        println!("Admin client: {} (secret set earlier)", report.client_id);
    }
    if let Some(password) = &report.admin_password {
        println!();
        println!(
            "Admin user {} created with password {password} (shown only this once)",
            report.admin_email
        );
    }
}

fn unix_to_rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Runs `f` on the store of `config` (a runtime of its own; the CLI has none).
fn with_store<T>(
    config: &Config,
    f: impl AsyncFnOnce(&crate::store::Store) -> Result<T, String>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let store = crate::store::Store::open_with(&config.store_url, Some(2))
            .await
            .map_err(|e| format!("store: {e}"))?;
        f(&store).await
    })
}

fn keys_rotate(args: RotateArgs) -> Result<(), String> {
    let duration = |flag: &str, v: Option<String>| -> Result<Option<std::time::Duration>, String> {
        v.map(|s| {
            crate::config::parse_lifetime(&s)
                .ok_or_else(|| format!("--{flag}: `{s}` is not a duration like 0s, 60s, 1h"))
        })
        .transpose()
    };
    let opts = crate::state::keys::RotateOptions {
        publish_delay: duration("publish-delay", args.publish_delay)?,
        retire_after: duration("retire-after", args.retire_after)?,
    };
    let config = args.server.config()?;
    // The serving instances' key; a rotation never creates one.
    let source = match &config.key_encryption_key {
        crate::sealed::KekSource::File { path, .. } => crate::sealed::KekSource::File {
            path: path.clone(),
            create: false,
        },
        value => value.clone(),
    };
    let kek = crate::sealed::KeyEncryptionKey::load(&source).map_err(|e| e.to_string())?;
    let rotation = with_store(&config, async |store| {
        let now = crate::store::now_unix();
        crate::state::keys::verify_kek(store, &kek)
            .await
            .map_err(|e| e.to_string())?;
        crate::state::keys::deactivate_retired(store, now)
            .await
            .map_err(|e| format!("store: {e}"))?;
        crate::state::keys::rotate(store, &config, &kek, &opts)
            .await
            .map_err(|e| e.to_string())
    })?;
    let now = crate::store::now_unix();
    println!("new signing key {} (ES256)", rotation.kid);
    println!("new signing key {} (RS256, ID tokens)", rotation.rsa_kid);
    println!(
        "  in every JWKS now; signs from {} (in {} s)",
        unix_to_rfc3339(rotation.signs_from),
        (rotation.signs_from - now).max(0)
    );
    for kid in &rotation.retiring {
        println!("  retires {kid} at {}", unix_to_rfc3339(rotation.retire_at));
    }
    Ok(())
}

fn keys_list(args: ServeArgs) -> Result<(), String> {
    let config = args.config()?;
    let now = crate::store::now_unix();
    let keys = with_store(&config, async |store| {
        crate::state::keys::deactivate_retired(store, now)
            .await
            .map_err(|e| format!("store: {e}"))?;
        crate::state::keys::status(store, now)
            .await
            .map_err(|e| format!("store: {e}"))
    })?;
    if keys.is_empty() {
        println!("no signing keys yet (the first start of an instance creates one)");
    }
    for k in keys {
        let retire = k
            .retire_at
            .map(|t| format!("  retires {}", unix_to_rfc3339(t)))
            .unwrap_or_default();
        println!(
            "{}  {:<9}  signs from {}{retire}",
            k.kid,
            k.state,
            unix_to_rfc3339(k.signs_from)
        );
    }
    Ok(())
}

fn policy_check(files: Vec<PathBuf>) -> Result<(), String> {
    let mut failed = 0;
    for f in &files {
        match crate::policies_dir::read_policy_file(f) {
            Ok(p) => println!("{}: ok (AccessPolicy/{})", f.display(), p.id),
            Err(e) => {
                failed += 1;
                println!("{e}");
            }
        }
    }
    if failed > 0 {
        Err(format!(
            "{failed} of {} policy files are invalid",
            files.len()
        ))
    } else {
        Ok(())
    }
}

/// Builds the `explain` input from the flags and files.
pub fn explain_input(args: ExplainArgs) -> Result<crate::explain::ExplainInput, String> {
    let mut policies = Vec::new();
    for f in &args.policies {
        let file = crate::policies_dir::read_policy_file(f).map_err(|e| e.to_string())?;
        policies.push(file.policy);
    }
    let parameters = args
        .params
        .iter()
        .map(|p| crate::explain::parse_param(p))
        .collect::<Result<Vec<_>, _>>()?;
    let headers = args
        .headers
        .iter()
        .map(|h| crate::explain::parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    let body = match &args.body {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let stored = match &args.membership {
        Some(id) => {
            let (stored, stored_policies) = read_membership(args.store.as_deref(), id)?;
            policies = stored_policies;
            Some(stored)
        }
        None => None,
    };
    Ok(crate::explain::ExplainInput {
        policies,
        stored,
        parameters,
        profile: args.profile,
        admin: args.admin,
        scope: args.scope,
        ip: args.ip,
        method: args.method,
        path: args.path,
        headers,
        body,
    })
}

/// `ProjectMembership/<id>`, its project, and every stored AccessPolicy (the membership's
/// references are resolved among them, as the gateway's snapshot does).
fn read_membership(
    store_url: Option<&str>,
    id: &str,
) -> Result<
    (
        crate::explain::StoredMembership,
        Vec<fhirgate_core::policy::model::AccessPolicy>,
    ),
    String,
> {
    let config = Config::from_file(ConfigFile::default()).map_err(|e| e.to_string())?;
    let url = match store_url {
        Some(u) => u.to_string(),
        None => config.store_url.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let store = crate::store::Store::open(&url)
            .await
            .map_err(|e| format!("store {url}: {e}"))?;
        let found = store
            .read("ProjectMembership", id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("ProjectMembership/{id} is not in the store"))?;
        let membership: fhirgate_core::policy::model::ProjectMembership =
            serde_json::from_value(found.content)
                .map_err(|e| format!("ProjectMembership/{id}: {e}"))?;
        let project_id = membership
            .project
            .reference
            .as_deref()
            .and_then(|r| r.strip_prefix("Project/"))
            .ok_or_else(|| format!("ProjectMembership/{id} names no project"))?
            .to_string();
        // The project as the gateway sees it: its binding and isolation come from the whole
        // store (who else shares the upstream), as in the snapshot.
        let snap = crate::state::Snapshot::load(&store, &config, None, 0)
            .await
            .map_err(|e| e.to_string())?;
        let project = snap
            .projects
            .get(&project_id)
            .ok_or_else(|| format!("Project/{project_id} is not in the store"))?;
        // A membership's policy references resolve within its own project only.
        let policies = store
            .list("AccessPolicy")
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|p| p.project_id.as_deref() == Some(project_id.as_str()))
            .filter_map(|p| serde_json::from_value(p.content).ok())
            .collect();
        Ok((
            crate::explain::StoredMembership {
                membership,
                super_admin: project.super_admin,
                upstream: project.upstream.clone(),
                isolation: project.isolation.clone(),
                project_id,
            },
            policies,
        ))
    })
}

fn policy_explain(args: ExplainArgs) -> Result<(), String> {
    let input = explain_input(args)?;
    print!("{}", crate::explain::explain(&input)?);
    Ok(())
}

pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(a) => serve(a, Planes::BOTH),
        Command::Proxy(a) => serve(
            a,
            Planes {
                gateway: true,
                control: false,
            },
        ),
        Command::Control(a) => serve(
            a,
            Planes {
                gateway: false,
                control: true,
            },
        ),
        Command::Policy(PolicyCommand::Check { files }) => policy_check(files),
        Command::Policy(PolicyCommand::Explain(args)) => policy_explain(*args),
        Command::Keys(KeysCommand::Rotate(args)) => keys_rotate(args),
        Command::Keys(KeysCommand::List(args)) => keys_list(args),
    }
}
