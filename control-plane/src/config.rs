//! `aviary-control-plane` configuration: flags, or the same keys in a TOML file given by
//! `--config`; flags win over the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use aviary_startup::{read_config, required};
pub use aviary_startup::{ConfigError, LogFormat};

use crate::fleet::FleetSettings;

/// Offline maintenance of a data dir (the control plane must be stopped: sled allows one
/// process at a time).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Maintenance {
    /// Reads every record, checks counters, the watermark and release blobs; exits 1 on
    /// any problem.
    Check {
        /// The data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// Accept data lost to damage: move the counters up to the watermark so nothing
        /// is numbered twice, and let the control plane start on what is left.
        #[arg(long)]
        accept_loss: bool,
    },
    /// Writes a checked copy of the store and the release blobs into a new directory.
    Backup {
        /// The data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restores a backup into a data dir that holds no store yet.
    Restore {
        /// The data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
    },
}

/// Command line of `aviary-control-plane` (every flag is also a key of the `--config` file).
#[derive(Parser, Debug, Default, serde::Deserialize)]
#[command(name = "aviary-control-plane", version, about = "Aviary control plane")]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// Offline work on a stopped control plane's data dir; without one, serve.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Maintenance>,
    /// TOML file with any of these flags as keys (e.g. `listen = "0.0.0.0:7443"`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address of the mTLS gRPC port (fleet and admin services).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Directory of the sled metadata store.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory with ca.pem, control-plane.pem and control-plane.key.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Address of the plain-HTTP Prometheus metrics port.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// How long edges keep weights without a control plane before dropping them to 0.
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub weight_ttl: Option<Duration>,
    /// New fleet streams admitted per second.
    #[arg(long)]
    pub admission_rate: Option<f64>,
    /// New fleet streams admitted at once.
    #[arg(long)]
    pub admission_burst: Option<f64>,
    /// Maximum fleet stream age (±10% jitter).
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub max_stream_age: Option<Duration>,
    /// HTTP/2 keepalive interval; a silent peer is dropped within 3 intervals.
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub keepalive: Option<Duration>,
    /// Largest message accepted from a client, in bytes.
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Largest release artifact accepted by `UploadRelease`, in bytes (default 512 MiB).
    #[arg(long)]
    pub max_release_bytes: Option<u64>,
    /// Memory all delta builds may hold at once, in bytes (default 2 GiB); a pair that
    /// needs more (≈ 9 × old + 2 × new) is sent in full.
    #[arg(long)]
    pub delta_memory_budget: Option<u64>,
    /// A delta not built within this is replaced by the full payload (default 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub delta_timeout: Option<Duration>,
    /// Bytes of built payloads (deltas and full) kept on disk under `payloads/`; the
    /// least recently used are deleted first (default 1 GiB).
    #[arg(long)]
    pub delta_cache_bytes: Option<u64>,
    /// Open connections one edge certificate may hold at once (default 8).
    #[arg(long)]
    pub max_connections_per_node: Option<usize>,
    /// Audit events kept: older ones beyond this count are deleted (default 1000000).
    #[arg(long)]
    pub audit_retention_events: Option<u64>,
    /// Audit events older than this are deleted (default 90d).
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub audit_retention_age: Option<Duration>,
    /// Lifetime of the node certificates enrollment issues (default 7d; at least 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub node_cert_ttl: Option<Duration>,
    /// Enroll calls taken per second, fleet-wide (default 50; bursts of twice that).
    #[arg(long)]
    pub enroll_rate: Option<f64>,
}

/// How much of the audit log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditRetention {
    /// Most events kept.
    pub events: u64,
    /// Oldest event kept.
    pub age: Duration,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC address.
    pub listen: SocketAddr,
    /// sled directory.
    pub data_dir: PathBuf,
    /// PKI directory.
    pub certs: PathBuf,
    /// Prometheus address.
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// TTL sent with weights.
    pub weight_ttl: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Fleet stream settings.
    pub fleet: FleetSettings,
    /// Largest release artifact accepted.
    pub max_release_bytes: u64,
    /// Delta builder limits.
    pub deltas: crate::deltas::DeltaSettings,
    /// Open connections per edge certificate.
    pub max_connections_per_node: usize,
    /// What of the audit log is kept.
    pub audit_retention: AuditRetention,
    /// Lifetime of enrolled node certificates.
    pub node_cert_ttl: Duration,
    /// Enroll calls per second.
    pub enroll_rate: f64,
}

impl Args {
    /// Reads `--config` (if any) under the flags.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file: Args = read_config(self.config.as_deref())?;
        let weight_ttl = self
            .weight_ttl
            .or(file.weight_ttl)
            .unwrap_or(Duration::from_secs(300));
        if weight_ttl.as_secs() == 0 || weight_ttl.as_secs() > u32::MAX as u64 {
            return Err(ConfigError("--weight-ttl must be at least 1s".into()));
        }
        let admission_rate = self
            .admission_rate
            .or(file.admission_rate)
            .unwrap_or(2000.0);
        let admission_burst = self
            .admission_burst
            .or(file.admission_burst)
            .unwrap_or(2000.0);
        if !(admission_rate > 0.0
            && admission_burst >= 1.0
            && admission_rate.is_finite()
            && admission_burst.is_finite())
        {
            return Err(ConfigError(
                "--admission-rate must be a finite number > 0 and --admission-burst one >= 1"
                    .into(),
            ));
        }
        let keepalive = self
            .keepalive
            .or(file.keepalive)
            .unwrap_or(Duration::from_secs(20));
        if keepalive < Duration::from_millis(100) {
            return Err(ConfigError("--keepalive must be at least 100ms".into()));
        }
        let max_release_bytes = self
            .max_release_bytes
            .or(file.max_release_bytes)
            .unwrap_or(512 << 20);
        if max_release_bytes == 0 {
            return Err(ConfigError("--max-release-bytes must be at least 1".into()));
        }
        let defaults = crate::deltas::DeltaSettings::default();
        let deltas = crate::deltas::DeltaSettings {
            memory_budget: self
                .delta_memory_budget
                .or(file.delta_memory_budget)
                .unwrap_or(defaults.memory_budget),
            timeout: self
                .delta_timeout
                .or(file.delta_timeout)
                .unwrap_or(defaults.timeout),
            cache_bytes: self
                .delta_cache_bytes
                .or(file.delta_cache_bytes)
                .unwrap_or(defaults.cache_bytes),
            ..defaults
        };
        let max_connections_per_node = self
            .max_connections_per_node
            .or(file.max_connections_per_node)
            .unwrap_or(8);
        if max_connections_per_node == 0 {
            return Err(ConfigError(
                "--max-connections-per-node must be at least 1".into(),
            ));
        }
        let audit_retention = AuditRetention {
            events: self
                .audit_retention_events
                .or(file.audit_retention_events)
                .unwrap_or(1_000_000),
            age: self
                .audit_retention_age
                .or(file.audit_retention_age)
                .unwrap_or(Duration::from_secs(90 * 24 * 3600)),
        };
        if audit_retention.events < 1000 || audit_retention.age < Duration::from_secs(60) {
            return Err(ConfigError(
                "--audit-retention-events must be at least 1000 and --audit-retention-age at least 1m"
                    .into(),
            ));
        }
        let node_cert_ttl = self
            .node_cert_ttl
            .or(file.node_cert_ttl)
            .unwrap_or(Duration::from_secs(7 * 86_400));
        if node_cert_ttl < Duration::from_secs(10) || node_cert_ttl > aviary_certs::LONG_LIVED {
            return Err(ConfigError(
                "--node-cert-ttl must be between 10s and 3650d".into(),
            ));
        }
        let enroll_rate = self.enroll_rate.or(file.enroll_rate).unwrap_or(50.0);
        if !(enroll_rate.is_finite() && enroll_rate > 0.0) {
            return Err(ConfigError(
                "--enroll-rate must be a finite number > 0".into(),
            ));
        }
        Ok(Config {
            node_cert_ttl,
            enroll_rate,
            max_release_bytes,
            deltas,
            max_connections_per_node,
            audit_retention,
            listen: required(self.listen.or(file.listen), "listen")?,
            data_dir: required(self.data_dir.or(file.data_dir), "data-dir")?,
            certs: required(self.certs.or(file.certs), "certs")?,
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            weight_ttl,
            keepalive,
            fleet: FleetSettings {
                admission_rate,
                admission_burst,
                max_stream_age: self
                    .max_stream_age
                    .or(file.max_stream_age)
                    .unwrap_or(Duration::from_secs(30 * 60)),
                hello_timeout: Duration::from_secs(10),
                max_message_bytes: self
                    .max_message_bytes
                    .or(file.max_message_bytes)
                    .unwrap_or(4 << 20),
                send_timeout: Duration::from_secs(30),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_missing_keys_are_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("cp.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\ndata-dir = \"/d\"\ncerts = \"/c\"\nweight-ttl = \"90s\"\n",
        )?;
        let args = Args::try_parse_from([
            "cp",
            "--config",
            file.to_str().unwrap_or_default(),
            "--listen",
            "127.0.0.1:2",
        ])?;
        let config = args.resolve()?;
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.weight_ttl, Duration::from_secs(90));

        let missing = Args::try_parse_from(["cp", "--listen", "127.0.0.1:2"])?.resolve();
        assert!(matches!(missing, Err(ConfigError(m)) if m.contains("--data-dir")));

        std::fs::write(&file, "listne = \"x\"\n")?;
        let typo =
            Args::try_parse_from(["cp", "--config", file.to_str().unwrap_or_default()])?.resolve();
        assert!(matches!(typo, Err(ConfigError(m)) if m.contains("listne")));
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\ndata-dir = \"/d\"\ncerts = \"/c\"\ndelta-timeout = \"9s\"\n",
        )?;
        let from_file =
            Args::try_parse_from(["cp", "--config", file.to_str().unwrap_or_default()])?
                .resolve()?;
        assert_eq!(from_file.deltas.timeout, Duration::from_secs(9));
        let tuned = Args::try_parse_from([
            "cp",
            "--config",
            file.to_str().unwrap_or_default(),
            "--delta-memory-budget",
            "1048576",
            "--delta-timeout",
            "5s",
        ])?
        .resolve()?;
        assert_eq!(tuned.deltas.memory_budget, 1 << 20);
        assert_eq!(tuned.deltas.timeout, Duration::from_secs(5));
        Ok(())
    }
}
