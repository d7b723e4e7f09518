//! The command line: `serve`, `proxy`, `control`, and `policy check`.

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
    /// Validate AccessPolicy JSON files
    Check { files: Vec<PathBuf> },
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
    crate::obs::init_logging(config.json_logs);
    let running = start(config.clone(), planes).map_err(|e| e.to_string())?;
    print_welcome(&config, &running.bootstrap);
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

fn print_welcome(config: &Config, report: &crate::control::bootstrap::BootstrapReport) {
    let base = &config.base_url;
    println!("fhirgate is running");
    println!("  gateway      {}  (public base URL {base})", config.listen);
    println!("  control API  {}", config.control_listen);
    println!(
        "  metrics      {}  (/metrics, /healthz, /readyz)",
        config.metrics_listen
    );
    println!("  upstream     {}", config.upstream.base_url);
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

fn policy_check(files: Vec<PathBuf>) -> Result<(), String> {
    let mut failed = false;
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        match serde_json::from_str::<fhirgate_core::policy::model::AccessPolicy>(&text) {
            Err(e) => {
                failed = true;
                println!("{}: invalid JSON: {e}", f.display());
            }
            Ok(p) => match fhirgate_core::policy::effective::validate_policy(&p) {
                Ok(()) => println!("{}: ok", f.display()),
                Err(errors) => {
                    failed = true;
                    for e in errors {
                        println!("{}: {e}", f.display());
                    }
                }
            },
        }
    }
    if failed {
        Err("some policies are invalid".into())
    } else {
        Ok(())
    }
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
    }
}
