//! `aviary-edge`: parse config, set up logging and metrics, run the daemon until SIGTERM.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use aviary_edge::config::{Cli, Command, LogFormat};
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Apply {
        state_dir,
        certs,
        bundle,
        arch,
    }) = cli.command
    {
        return apply(&state_dir, &certs, &bundle, arch);
    }
    let config = match cli.args.resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("aviary-edge: {e}");
            return ExitCode::from(64);
        }
    };
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aviary-edge: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        if let Some(addr) = config.metrics_listen {
            let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install();
            if let Err(e) = installed {
                eprintln!("aviary-edge: --metrics-listen {addr}: {e}");
                return ExitCode::FAILURE;
            }
            describe_metrics();
        }
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            signals.cancel();
        });
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<aviary_edge::Ready>();
        tokio::spawn(async move {
            if let Ok(ready) = ready_rx.await {
                if let Some(addr) = ready.local_addr {
                    println!("local http on {addr}");
                }
            }
        });
        match aviary_edge::run(config, shutdown, Some(ready_tx)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aviary-edge: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(format: LogFormat) {
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

/// Help text for every metric the daemon exports (`promtool check metrics` wants it).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "aviary_edge_connected",
        "1 while the fleet stream to the control plane is up."
    );
    describe_gauge!(
        "aviary_edge_weights_revision",
        "Revision of the weights applied last."
    );
    describe_counter!("aviary_edge_nacks_total", "Assignments refused as invalid.");
    describe_counter!(
        "aviary_edge_installs_total",
        "Module versions installed from the fleet stream."
    );
    describe_counter!(
        "aviary_edge_reconnects_total",
        "Attempts to reopen the fleet stream."
    );
    describe_counter!(
        "aviary_edge_local_rollbacks_total",
        "New versions that never became ready and were rolled back on the gateway."
    );
    describe_counter!(
        "aviary_edge_unreadable_modules_total",
        "Modules left out because their state.json could not be read."
    );
}

/// `aviary-edge apply`: installs an offline bundle with the checks of a fleet update.
fn apply(
    state_dir: &std::path::Path,
    certs: &std::path::Path,
    bundle: &std::path::Path,
    arch: Option<String>,
) -> ExitCode {
    use aviary_edge::modules::{Installer, Modules, Outcome};
    let run = || -> Result<Outcome, String> {
        let trusted = aviary_certs::TrustedKeys::load(certs).map_err(|e| e.to_string())?;
        if trusted.is_empty() {
            return Err(format!(
                "{}: no release-signing.pub or trusted-release-keys/*.pub to verify with",
                certs.display()
            ));
        }
        let modules = Modules::open(state_dir).map_err(|e| e.to_string())?;
        let target = match arch {
            Some(arch) if aviary_proto::arch::is_target(&arch) => arch,
            Some(arch) => return Err(format!("--arch {arch:?} is not an architecture name")),
            None => aviary_proto::arch::host_target()
                .map_err(|e| e.to_string())?
                .to_owned(),
        };
        Installer::new(modules, trusted, target)
            .apply_bundle(bundle)
            .map_err(|e| e.to_string())
    };
    match run() {
        Ok(Outcome::Installed(slot)) => {
            println!("installed {} ({})", slot.version, slot.sha256);
            ExitCode::SUCCESS
        }
        Ok(Outcome::AlreadyInstalled(slot)) => {
            println!("already installed {} ({})", slot.version, slot.sha256);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aviary-edge apply: {e}");
            ExitCode::FAILURE
        }
    }
}
