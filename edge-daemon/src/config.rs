//! `aviary-edge` configuration: flags, or the same keys in a TOML file given by
//! `--config`; flags win over the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aviary_startup::{read_config, required};
pub use aviary_startup::{ConfigError, LogFormat};
use clap::{Parser, Subcommand};

/// Command line of `aviary-edge`.
#[derive(Parser, Debug)]
#[command(name = "aviary-edge", version, about = "Aviary edge daemon")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// One-shot commands; without one, the daemon runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Daemon flags.
    #[command(flatten)]
    pub args: Args,
}

/// One-shot commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Installs an offline bundle with the same checks as a fleet update.
    Apply {
        /// The daemon's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Directory with the trusted release keys.
        #[arg(long)]
        certs: PathBuf,
        /// The bundle file written by `aviary release bundle`.
        bundle: PathBuf,
        /// This node's architecture (default: this build's).
        #[arg(long)]
        arch: Option<String>,
    },
    /// Makes this gateway's key (in `--certs`, 0600), sends a CSR and writes the
    /// certificate the control plane issues; waits for an admin without a token.
    Enroll {
        /// Control plane URL, `https://HOST:PORT`.
        #[arg(long)]
        control_plane: String,
        /// Directory with ca.pem; the key and certificate are written here.
        #[arg(long)]
        certs: PathBuf,
        /// The node id to enroll as.
        #[arg(long)]
        node_id: String,
        /// A bootstrap token (`aviary enroll-token create`).
        #[arg(long)]
        enroll_token: Option<String>,
        /// Label `key=value` to show the approver (repeatable; never applied by itself).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

/// Daemon flags (every flag is also a key of the `--config` file).
#[derive(clap::Args, Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with any of these flags as keys.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Control plane URL, `https://HOST:PORT`.
    #[arg(long)]
    pub control_plane: Option<String>,
    /// Directory with ca.pem and edge-NODE_ID.pem/.key.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// This gateway's node id (must match its certificate).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Directory for weights, revisions and (later) module slots.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Node label `key=value` (repeatable); in the file, a table `[label]`.
    #[arg(long = "label", value_parser = parse_label)]
    #[serde(skip)]
    pub labels: Vec<(String, String)>,
    /// Labels in the config file.
    #[arg(skip)]
    pub label: BTreeMap<String, String>,
    /// Local HTTP address for `GET /v1/weights` (e.g. 127.0.0.1:7070).
    #[arg(long)]
    pub local_listen: Option<SocketAddr>,
    /// Address of the plain-HTTP Prometheus metrics port.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// HTTP/2 keepalive interval to the control plane.
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub keepalive: Option<Duration>,
    /// CPU architecture reported in the Hello (default: this build's).
    #[arg(long)]
    pub arch: Option<String>,
    /// Bootstrap token used to enroll when `--certs` has `ca.pem` but no certificate
    /// of this node (without one, the daemon waits for an admin's accept).
    #[arg(long)]
    pub enroll_token: Option<String>,
    /// Make a new key for every certificate renewal (the old one is deleted once the
    /// new certificate is written).
    #[arg(long)]
    #[serde(default)]
    pub rotate_key: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("label {text:?} is not key=value"))
}

/// Validated daemon configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Control plane URL.
    pub control_plane: String,
    /// PKI directory.
    pub certs: PathBuf,
    /// Node id.
    pub node_id: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Labels sent in the Hello.
    pub labels: BTreeMap<String, String>,
    /// Local HTTP address.
    pub local_listen: Option<SocketAddr>,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Architecture.
    pub arch: String,
    /// Bootstrap token for a first enrollment.
    pub enroll_token: Option<String>,
    /// A new key at each renewal.
    pub rotate_key: bool,
}

impl Args {
    /// Reads `--config` (if any) under the flags and validates the result.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file: Args = read_config(self.config.as_deref())?;
        let node_id = required(self.node_id.or(file.node_id), "node-id")?;
        aviary_certs::validate_name("node id", &node_id)
            .map_err(|e| ConfigError(format!("--node-id: {e}")))?;
        let mut labels = file.label;
        labels.extend(self.labels);
        let keepalive = self
            .keepalive
            .or(file.keepalive)
            .unwrap_or(Duration::from_secs(20));
        if keepalive < Duration::from_millis(100) {
            return Err(ConfigError("--keepalive must be at least 100ms".into()));
        }
        let arch = match self.arch.or(file.arch) {
            // Named by hand (a build for a base ABI running on a wider one); still only
            // a name releases can carry.
            Some(arch) if aviary_proto::arch::is_target(&arch) => arch,
            Some(arch) => {
                return Err(ConfigError(format!(
                    "arch {arch:?} is not one of {}",
                    aviary_proto::arch::TARGETS.join(", ")
                )))
            }
            None => aviary_proto::arch::host_target()
                .map_err(|e| ConfigError(e.to_string()))?
                .to_owned(),
        };
        Ok(Config {
            control_plane: required(self.control_plane.or(file.control_plane), "control-plane")?,
            certs: required(self.certs.or(file.certs), "certs")?,
            state_dir: required(self.state_dir.or(file.state_dir), "state-dir")?,
            node_id,
            labels,
            local_listen: self.local_listen.or(file.local_listen),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            keepalive,
            arch,
            enroll_token: self.enroll_token.or(file.enroll_token),
            rotate_key: self.rotate_key || file.rotate_key,
        })
    }
}
