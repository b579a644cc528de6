//! `aviary-sensors`: parse config, set up logging and metrics, serve until SIGTERM.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use aviary_sensors::{telemetry, Args};
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let config = match Args::parse().resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("aviary-sensors: {e}");
            return ExitCode::from(64);
        }
    };
    telemetry::init_logging(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aviary-sensors: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        if let Some(addr) = config.metrics_listen {
            if let Err(e) = telemetry::init_metrics(addr) {
                eprintln!("aviary-sensors: {e}");
                return ExitCode::FAILURE;
            }
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok(addr) = ready_rx.await {
                // One machine-readable line for scripts and tests that pass port 0.
                println!("listening on {addr}");
            }
        });
        match aviary_sensors::run(config, shutdown, Some(ready_tx)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aviary-sensors: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
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
