//! `aviary-sensors`: parse config, set up logging and metrics, serve until SIGTERM.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use aviary_sensors::{telemetry, Args, Config};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match aviary_startup::parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    aviary_startup::run(
        "aviary-sensors",
        args.resolve(),
        |c| c.log_format,
        tokio::runtime::Builder::new_multi_thread(),
        serve,
    )
}

async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), String> {
    if let Some(addr) = config.metrics_listen {
        telemetry::init_metrics(addr)?;
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok(addr) = ready_rx.await {
            // One machine-readable line for scripts and tests that pass port 0.
            println!("listening on {addr}");
        }
    });
    aviary_sensors::run(config, shutdown, Some(ready_tx))
        .await
        .map_err(|e| e.to_string())
}
