//! `aviary-certs`: makes a deployment's PKI (DESIGN.md, "Command lines").
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Makes and extends an Aviary deployment's private PKI.
#[derive(Parser)]
#[command(name = "aviary-certs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the CA, control-plane and admin certificates and the release-signing key.
    Init {
        /// Directory to write into (created if missing; an existing PKI is never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the deployment.
        #[arg(long, default_value = "aviary.local")]
        trust_domain: String,
        /// DNS name or IP of the control plane (repeatable; default 127.0.0.1, localhost, ::1).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issues `edge-ID.pem` / `edge-ID.key` for one gateway.
    Edge {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The gateway's node id (letters, digits, '.', '_', '-').
        #[arg(long)]
        node_id: String,
    },
    /// CA rotation, one step at a time (a running control plane picks each up).
    Ca {
        /// The step.
        #[command(subcommand)]
        step: CaStep,
    },
    /// Issues `admin-NAME.pem` / `admin-NAME.key` for one operator.
    Admin {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The operator's name.
        #[arg(long)]
        name: String,
        /// How long the certificate is valid (e.g. `12h`, `90d`).
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum CaStep {
    /// 1. A new CA joins ca.pem and issues from now on; the old key stays as
    ///    ca-previous.key until `retire`.
    Rotate {
        /// The CA directory (the control plane's --certs).
        #[arg(long)]
        dir: PathBuf,
    },
    /// 2. The control plane's certificate, issued again by the new CA.
    Server {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// 3. Every CA but the issuing one leaves ca.pem (after `aviary ca status` shows no
    ///    node on an old one).
    Retire {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init {
            dir,
            trust_domain,
            sans,
        } => {
            let mut opts = aviary_certs::InitOptions {
                trust_domain,
                ..Default::default()
            };
            if !sans.is_empty() {
                opts.sans = sans;
            }
            aviary_certs::Pki::init(&dir, &opts).map(|pki| {
                println!(
                    "wrote CA, control-plane, admin and release-signing keys for {} to {}",
                    pki.trust_domain,
                    dir.display()
                )
            })
        }
        Command::Edge { dir, node_id } => aviary_certs::issue_edge(&dir, &node_id)
            .map(|p| println!("wrote {} and {}", p.cert.display(), p.key.display())),
        Command::Ca {
            step: CaStep::Rotate { dir },
        } => aviary_certs::ca::rotate(&dir).map(|fp| println!("new issuing CA {fp}")),
        Command::Ca {
            step: CaStep::Server { dir },
        } => aviary_certs::reissue_server(&dir)
            .map(|p| println!("wrote {} and {}", p.cert.display(), p.key.display())),
        Command::Ca {
            step: CaStep::Retire { dir },
        } => aviary_certs::ca::retire(&dir).map(|gone| {
            for fp in gone {
                println!("retired CA {fp}");
            }
        }),
        Command::Admin { dir, name, ttl } => aviary_certs::issue_admin(&dir, &name, ttl)
            .map(|p| println!("wrote {} and {}", p.cert.display(), p.key.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aviary-certs: {e}");
            ExitCode::FAILURE
        }
    }
}
