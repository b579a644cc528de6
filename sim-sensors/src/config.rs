//! `aviary-sensors` configuration: flags, or the same keys in a TOML file given by
//! `--config`; flags win over the file. Recordings are loaded and specs parsed here, so
//! a bad file or value stops the stub at start with a message naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aviary_startup::{read_config, required};
pub use aviary_startup::{ConfigError, LogFormat};
use clap::Parser;

use crate::faults::Faults;
use crate::recording::Recording;
use crate::synthetic::{AxisSpec, SignalSpec};

/// Highest rate a stream may ask for: far above any IMU, low enough that a typo
/// (1e9) is caught instead of pinning a core.
pub const MAX_RATE_HZ: f64 = 100_000.0;

/// Where samples come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Seeded sines, noise and constants.
    Synthetic,
    /// Recorded CSV files.
    Replay,
    /// Samples pushed with `InjectImu`.
    Bridge,
}

impl Mode {
    /// The name used on the command line and in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Synthetic => "synthetic",
            Mode::Replay => "replay",
            Mode::Bridge => "bridge",
        }
    }
}

/// Command line of `aviary-sensors` (every flag is also a key of the `--config` file).
#[derive(Parser, Debug, Default, serde::Deserialize)]
#[command(
    name = "aviary-sensors",
    version,
    about = "IMU sensor stub for hardware-in-the-loop rigs"
)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with any of these flags as keys (e.g. `mode = "replay"`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC address (plaintext unless --certs is given).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where samples come from.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Default samples per second of synthetic sensors (default 200).
    #[arg(long)]
    pub rate_hz: Option<f64>,
    /// Recording to replay (EuRoC or x-io CSV); repeat for more sensors, named by file stem.
    #[arg(long)]
    pub file: Vec<PathBuf>,
    /// Pacing: 1 = real time, 2 = twice as fast, 0 = as fast as the client reads.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Replay recordings forever (timestamps keep increasing across loops).
    #[arg(long = "loop")]
    #[serde(rename = "loop")]
    pub looping: bool,
    /// Seed of synthetic noise and faults (default 0); a request may choose its own.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sensor ids of synthetic and bridge mode (default `imu0`); the first is the default.
    #[arg(long)]
    pub sensor_id: Vec<String>,
    /// Synthetic signal of one axis, e.g. `gyro.z=sine:0.5:2:0+noise:0.01` (repeatable).
    #[arg(long)]
    pub axis: Vec<String>,
    /// Fault for every stream, e.g. `dropout_rate=0.01` or `gyro_bias=0.1,0,0` (repeatable).
    #[arg(long)]
    pub fault: Vec<String>,
    /// Samples queued per subscriber before the oldest are dropped (default 1024).
    #[arg(long)]
    pub queue_depth: Option<usize>,
    /// A subscriber whose queue stays full this long is disconnected (default 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "aviary_startup::duration::option")]
    pub subscriber_timeout: Option<Duration>,
    /// Open StreamImu calls allowed at once (default 1024).
    #[arg(long)]
    pub max_subscribers: Option<usize>,
    /// Serve mTLS with ca.pem and control-plane.pem/key from this directory.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Address of the plain-HTTP Prometheus metrics port.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The sensors a stub serves.
#[derive(Clone, Debug)]
pub enum Sensors {
    /// One signal, several ids (each with its own noise).
    Synthetic {
        /// Sensor ids.
        ids: Vec<String>,
        /// The waveforms.
        spec: Box<SignalSpec>,
        /// Default rate.
        rate_hz: f64,
    },
    /// One recording per sensor.
    Replay {
        /// The recordings.
        recordings: Vec<Arc<Recording>>,
        /// Loop forever.
        looping: bool,
    },
    /// Whatever is injected, under these ids.
    Bridge {
        /// Sensor ids.
        ids: Vec<String>,
    },
}

impl Sensors {
    /// The mode.
    pub fn mode(&self) -> Mode {
        match self {
            Sensors::Synthetic { .. } => Mode::Synthetic,
            Sensors::Replay { .. } => Mode::Replay,
            Sensors::Bridge { .. } => Mode::Bridge,
        }
    }

    /// Every sensor id, the default first.
    pub fn ids(&self) -> Vec<String> {
        match self {
            Sensors::Synthetic { ids, .. } | Sensors::Bridge { ids } => ids.clone(),
            Sensors::Replay { recordings, .. } => {
                recordings.iter().map(|r| r.name.clone()).collect()
            }
        }
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC address.
    pub listen: SocketAddr,
    /// What is served.
    pub sensors: Sensors,
    /// Pacing factor; 0 = unpaced.
    pub speed: f64,
    /// Default seed.
    pub seed: u64,
    /// Default faults.
    pub faults: Faults,
    /// Per-subscriber queue length.
    pub queue_depth: usize,
    /// Hung-subscriber deadline.
    pub subscriber_timeout: Duration,
    /// Concurrent subscriber limit.
    pub max_subscribers: usize,
    /// mTLS directory, if any.
    pub certs: Option<PathBuf>,
    /// Prometheus address.
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
}

fn pick<T>(flags: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flags.is_empty() {
        file
    } else {
        flags
    }
}

impl Args {
    /// Reads `--config` (if any) under the flags, loads recordings, parses specs.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file: Args = read_config(self.config.as_deref())?;
        let listen = required(self.listen.or(file.listen), "listen")?;
        let mode = self.mode.or(file.mode).ok_or_else(|| {
            ConfigError("--mode synthetic|replay|bridge (or `mode` in --config) is required".into())
        })?;
        let rate_hz = self.rate_hz.or(file.rate_hz).unwrap_or(200.0);
        if !(rate_hz > 0.0 && rate_hz <= MAX_RATE_HZ) {
            return Err(ConfigError(format!(
                "--rate-hz {rate_hz}: must be above 0 and at most {MAX_RATE_HZ}"
            )));
        }
        let speed = self.speed.or(file.speed).unwrap_or(1.0);
        if !(speed.is_finite() && (0.0..=1000.0).contains(&speed)) {
            return Err(ConfigError(format!(
                "--speed {speed}: must be between 0 (as fast as possible) and 1000"
            )));
        }
        let mut ids = pick(self.sensor_id, file.sensor_id);
        if ids.is_empty() {
            ids.push("imu0".into());
        }
        if let Some(bad) = ids.iter().find(|id| id.trim().is_empty()) {
            return Err(ConfigError(format!(
                "--sensor-id `{bad}`: must not be empty"
            )));
        }
        let files = pick(self.file, file.file);
        let axes = pick(self.axis, file.axis);
        let looping = self.looping || file.looping;
        let sensors = match mode {
            Mode::Replay => {
                if files.is_empty() {
                    return Err(ConfigError(
                        "--mode replay needs at least one --file CSV".into(),
                    ));
                }
                let mut recordings: Vec<Arc<Recording>> = Vec::new();
                for path in &files {
                    let r =
                        Recording::load(path).map_err(|e| ConfigError(format!("--file {e}")))?;
                    if recordings.iter().any(|o| o.name == r.name) {
                        return Err(ConfigError(format!(
                            "--file {}: another file already serves sensor `{}` (sensors are named by file stem)",
                            path.display(),
                            r.name
                        )));
                    }
                    recordings.push(Arc::new(r));
                }
                Sensors::Replay {
                    recordings,
                    looping,
                }
            }
            Mode::Synthetic => {
                let overrides = axes
                    .iter()
                    .map(|a| a.parse::<AxisSpec>())
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| ConfigError(format!("--axis {e}")))?;
                Sensors::Synthetic {
                    ids,
                    spec: Box::new(SignalSpec::with(&overrides)),
                    rate_hz,
                }
            }
            Mode::Bridge => Sensors::Bridge { ids },
        };
        if mode != Mode::Replay && !files.is_empty() {
            return Err(ConfigError(format!(
                "--file needs --mode replay (mode is {})",
                mode.as_str()
            )));
        }
        if mode != Mode::Synthetic && !axes.is_empty() {
            return Err(ConfigError(format!(
                "--axis needs --mode synthetic (mode is {})",
                mode.as_str()
            )));
        }
        let mut faults = Faults::default();
        for f in pick(self.fault, file.fault) {
            faults
                .set(&f)
                .map_err(|e| ConfigError(format!("--fault {e}")))?;
        }
        let queue_depth = self.queue_depth.or(file.queue_depth).unwrap_or(1024);
        if queue_depth == 0 {
            return Err(ConfigError("--queue-depth must be at least 1".into()));
        }
        let max_subscribers = self
            .max_subscribers
            .or(file.max_subscribers)
            .unwrap_or(1024);
        let subscriber_timeout = self
            .subscriber_timeout
            .or(file.subscriber_timeout)
            .unwrap_or(Duration::from_secs(10));
        if subscriber_timeout < Duration::from_millis(100) {
            return Err(ConfigError(
                "--subscriber-timeout must be at least 100ms".into(),
            ));
        }
        Ok(Config {
            listen,
            sensors,
            speed,
            seed: self.seed.or(file.seed).unwrap_or(0),
            faults,
            queue_depth,
            subscriber_timeout,
            max_subscribers,
            certs: self.certs.or(file.certs),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["aviary-sensors"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).expect("parses").resolve()
    }

    #[test]
    fn absurd_values_are_refused_with_the_flag() {
        for (args, part) in [
            (
                vec![
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    "synthetic",
                    "--rate-hz",
                    "0",
                ],
                "--rate-hz 0",
            ),
            (
                vec![
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    "synthetic",
                    "--rate-hz",
                    "1e9",
                ],
                "--rate-hz",
            ),
            (
                vec![
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    "synthetic",
                    "--speed=-1",
                ],
                "--speed",
            ),
            (
                vec!["--listen", "127.0.0.1:0", "--mode", "replay"],
                "needs at least one --file",
            ),
            (
                vec![
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    "synthetic",
                    "--axis",
                    "gyro.q=const:1",
                ],
                "--axis",
            ),
            (
                vec![
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    "synthetic",
                    "--fault",
                    "dropout_rate=3",
                ],
                "--fault",
            ),
            (vec!["--mode", "synthetic"], "--listen"),
            (
                vec![
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    "bridge",
                    "--file",
                    "x.csv",
                ],
                "--mode replay",
            ),
        ] {
            let err = resolve(&args).expect_err(part).to_string();
            assert!(err.contains(part), "{args:?}: {err}");
        }
    }

    #[test]
    fn toml_has_the_flag_keys_and_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sensors.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:0\"\nmode = \"synthetic\"\nrate-hz = 500.0\nsensor-id = [\"a\", \"b\"]\n\
             axis = [\"gyro.x=const:1\"]\nfault = [\"dropout_rate=0.5\"]\nsubscriber-timeout = \"2s\"\nseed = 9\n",
        )
        .expect("write");
        let config = resolve(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--rate-hz",
            "1000",
        ])
        .expect("valid");
        assert_eq!(config.seed, 9);
        assert_eq!(config.faults.dropout_rate, 0.5);
        assert_eq!(config.subscriber_timeout, Duration::from_secs(2));
        match config.sensors {
            Sensors::Synthetic { ids, rate_hz, spec } => {
                assert_eq!(ids, vec!["a", "b"]);
                assert_eq!(rate_hz, 1000.0);
                assert_eq!(spec.axes[0].constant, 1.0);
            }
            other => panic!("{other:?}"),
        }
    }
}
