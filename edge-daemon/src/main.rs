//! `aviary-edge`: parse config, set up logging and metrics, run the daemon until SIGTERM.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use aviary_edge::config::{Cli, Command, Config};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match aviary_startup::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(Command::Apply {
        state_dir,
        certs,
        bundle,
        arch,
    }) = cli.command
    {
        return apply(&state_dir, &certs, &bundle, arch);
    }
    if let Some(Command::Enroll {
        control_plane,
        certs,
        node_id,
        enroll_token,
        labels,
    }) = cli.command
    {
        return enroll(aviary_edge::enroll::EnrollOptions {
            control_plane,
            certs,
            node_id,
            token: enroll_token,
            labels: labels.into_iter().collect(),
        });
    }
    aviary_startup::run(
        "aviary-edge",
        cli.args.resolve(),
        |c| c.log_format,
        tokio::runtime::Builder::new_current_thread(),
        serve,
    )
}

async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), String> {
    if let Some(addr) = config.metrics_listen {
        aviary_startup::serve_metrics(addr, PrometheusBuilder::new())?;
        describe_metrics();
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<aviary_edge::Ready>();
    tokio::spawn(async move {
        if let Ok(ready) = ready_rx.await {
            if let Some(addr) = ready.local_addr {
                println!("local http on {addr}");
            }
        }
    });
    aviary_edge::run(config, shutdown, Some(ready_tx))
        .await
        .map_err(|e| e.to_string())
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

/// `aviary-edge enroll`: enrolls, prints where the certificate went, exits.
fn enroll(opts: aviary_edge::enroll::EnrollOptions) -> ExitCode {
    if let Err(e) = aviary_certs::validate_name("node id", &opts.node_id) {
        eprintln!("aviary-edge enroll: --node-id: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aviary-edge enroll: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let result = runtime.block_on(async move {
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        aviary_edge::enroll::enroll(&opts, &shutdown)
            .await
            .map(|done| (done, opts))
    });
    match result {
        Ok((true, opts)) => {
            let (key, cert) = aviary_edge::enroll::identity_paths(&opts.certs, &opts.node_id);
            println!("enrolled: {} (key {})", cert.display(), key.display());
            ExitCode::SUCCESS
        }
        Ok((false, _)) => {
            eprintln!("aviary-edge enroll: interrupted before a certificate was issued");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("aviary-edge enroll: {e}");
            ExitCode::FAILURE
        }
    }
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
