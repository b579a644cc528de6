//! The one start-up path of Aviary's three daemons (control plane, edge, sensor stub):
//! flags over a `--config` TOML file over defaults, exit 64 naming the bad key, logging,
//! the Prometheus exporter, and SIGTERM/SIGINT as a cancellation token. Each `main` is a
//! call to `run` with its own config type and serve function.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use metrics_exporter_prometheus::PrometheusBuilder;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// `sysexits.h` EX_USAGE: the command line or config file is wrong.
pub const EXIT_USAGE: u8 = 64;

/// Log output format (`--log-format`, `log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// A flag or config key that is missing or wrong; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The command line as `T` parses it; `--help` and `--version` print and exit 0, and any
/// other error (an unknown or malformed flag) prints and exits 64, like a bad key in the
/// `--config` file.
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        let usage = e.use_stderr();
        // Printing to a closed pipe is nothing to report.
        let _ = e.print();
        if usage {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// The keys of the `--config` file at `path` (all defaults without one); an unknown key
/// or a bad value is an error naming the file.
pub fn read_config<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("--config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("--config {}: {e}", path.display())))
}

/// `value`, or an error saying that `--flag` (or `flag` in the file) is required.
pub fn required<T>(value: Option<T>, flag: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError(format!("--{flag} (or `{flag}` in --config) is required")))
}

/// Durations in config files, written as for the flags (`90s`, `5m`, `7d`).
pub mod duration {
    use std::time::Duration;

    use serde::Deserialize;

    /// `#[serde(default, deserialize_with = "aviary_startup::duration::option")]`.
    pub fn option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Installs the tracing subscriber on stderr: `RUST_LOG` filters, `info` by default.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Serves Prometheus metrics from `builder` on `addr` (inside the runtime).
pub fn serve_metrics(addr: SocketAddr, builder: PrometheusBuilder) -> Result<(), String> {
    builder
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))
}

/// The gRPC reflection services (v1alpha for grpcurl 1.8, and v1) over the Aviary
/// contract, gRPC health and the `google.rpc` error details, as every Aviary server
/// offers them.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
    ),
    String,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aviary_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can show a refusal's details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    let v1 = builder()
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    Ok((v1alpha, v1))
}

/// The next TCP connection on `listener` (Nagle off), or `None` once `shutdown` is
/// cancelled. A failing accept (EMFILE and friends) backs off instead of spinning.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, addr)) => {
                let _ = tcp.set_nodelay(true);
                return Some((tcp, addr));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// A daemon's `main`: a bad `config` exits 64 with its message; otherwise logging in the
/// format `log_format` picks, the runtime `runtime` builds, and `serve` until it returns
/// (SIGTERM cancels its token). Errors are one line on stderr prefixed with `name`.
pub fn run<C, Fut>(
    name: &str,
    config: Result<C, ConfigError>,
    log_format: impl FnOnce(&C) -> LogFormat,
    mut runtime: tokio::runtime::Builder,
    serve: impl FnOnce(C, CancellationToken) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<(), String>>,
{
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(log_format(&config));
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match serve(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
    struct Keys {
        listen: Option<SocketAddr>,
        #[serde(deserialize_with = "duration::option")]
        keepalive: Option<Duration>,
        log_format: Option<LogFormat>,
    }

    #[test]
    fn a_config_file_reads_keys_and_names_itself_in_errors(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("aviary-startup-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "listen = \"127.0.0.1:1\"\nkeepalive = \"90s\"\nlog-format = \"json\"\n",
        )?;
        let keys: Keys = read_config(Some(&good))?;
        assert_eq!(keys.keepalive, Some(Duration::from_secs(90)));
        assert_eq!(keys.log_format, Some(LogFormat::Json));
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "lisen = \"x\"\n")?;
        let e = read_config::<Keys>(Some(&bad))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("--config ") && e.contains("lisen"), "{e}");
        std::fs::write(&bad, "keepalive = \"soon\"\n")?;
        assert!(read_config::<Keys>(Some(&bad)).is_err());
        let none: Keys = read_config(None)?;
        assert!(none.listen.is_none());
        let missing = required::<u8>(None, "listen").err().map(|e| e.to_string());
        assert_eq!(
            missing.as_deref(),
            Some("--listen (or `listen` in --config) is required")
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_bad_config_exits_64_before_anything_starts() {
        let code = run(
            "test",
            Err::<(), _>(ConfigError("--listen is required".into())),
            |_| LogFormat::Human,
            tokio::runtime::Builder::new_current_thread(),
            |_, _| async { Ok(()) },
        );
        assert_eq!(code, ExitCode::from(EXIT_USAGE));
    }
}
