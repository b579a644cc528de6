//! `aviary-control-plane`: parse config, set up logging and metrics, serve until SIGTERM.

use std::process::ExitCode;

use aviary_control_plane::config::{Args, Config, Maintenance};
use aviary_control_plane::maintenance;
use aviary_control_plane::telemetry;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match aviary_startup::parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    if let Some(command) = &args.command {
        return maintain(command);
    }
    // Before the runtime starts any thread.
    limit_malloc_arenas();
    // Blocking work (store commits, payload chunk reads, delta builds) queues for a
    // bounded pool: tokio's default of 512 threads grew to 120+ during a fleet-wide
    // rollout, each thread with its own stack and a share of malloc's arenas.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.max_blocking_threads(64);
    aviary_startup::run(
        "aviary-control-plane",
        args.resolve(),
        |c| c.log_format,
        runtime,
        serve,
    )
}

async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), String> {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-files limit");
    }
    if let Some(addr) = config.metrics_listen {
        telemetry::init_metrics(addr)?;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(tracing::Instrument::instrument(
        trim_malloc(shutdown.clone()),
        tracing::info_span!("malloc_trim"),
    ));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok(addr) = ready_rx.await {
            // One machine-readable line for scripts and tests that pass port 0.
            println!("listening on {addr}");
        }
    });
    aviary_control_plane::run(config, shutdown, Some(ready_tx))
        .await
        .map_err(|e| e.to_string())
}

/// `check`, `backup` and `restore`: one line per finding, exit 1 when anything is wrong.
fn maintain(command: &Maintenance) -> ExitCode {
    match command {
        Maintenance::Check {
            data_dir,
            accept_loss,
        } => match maintenance::check(data_dir, *accept_loss) {
            Ok(report) => {
                let rows: Vec<String> = report
                    .rows
                    .iter()
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect();
                println!("rows: {}", rows.join(", "));
                println!("counters: {}", report.counters);
                match &report.watermark {
                    Some(w) => println!("watermark: {w}"),
                    None => println!("watermark: none"),
                }
                if report.quarantined > 0 {
                    println!(
                        "quarantined records: {} (kept in the quarantine tree)",
                        report.quarantined
                    );
                }
                for p in &report.problems {
                    println!("problem: {p}");
                }
                if report.problems.is_empty() {
                    println!("ok");
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("aviary-control-plane check: {e}");
                ExitCode::FAILURE
            }
        },
        Maintenance::Backup { data_dir, out } => match maintenance::backup(data_dir, out) {
            Ok(r) => {
                println!(
                    "backed up {} rows and {} blobs ({} bytes) into {}",
                    r.rows,
                    r.blobs,
                    r.blob_bytes,
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("aviary-control-plane backup: {e}");
                ExitCode::FAILURE
            }
        },
        Maintenance::Restore { data_dir, from } => match maintenance::restore(data_dir, from) {
            Ok(r) => {
                println!(
                    "restored {} rows and {} blobs ({} bytes) into {}",
                    r.rows,
                    r.blobs,
                    r.blob_bytes,
                    data_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("aviary-control-plane restore: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// glibc gives busy threads arenas of their own, up to 8 per core, and memory freed in one
/// seldom returns to the system: in the soak benchmark (1,000 nodes, a rollout of 1,000
/// transfers every 3 minutes) the control plane held under half the RSS with two arenas
/// (docs/perf.md). `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        set_arena_max(2);
    }
}

/// Gives the pages malloc holds free back to the system once a minute. A rollout's burst
/// of transfers (or a stall that queues work) raises the heap's high-water mark, and
/// glibc returns only the top of a heap by itself: without this the soak benchmark's RSS
/// ratcheted up at each burst and never came down (docs/perf.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_malloc(shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let started = std::time::Instant::now();
        // It walks every arena under its lock: not on a runtime worker.
        let released = tokio::task::spawn_blocking(malloc_trim)
            .await
            .unwrap_or(false);
        tracing::debug!(released, took = ?started.elapsed(), "malloc_trim");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn malloc_trim() -> bool {
    // SAFETY: malloc_trim takes the allocator's own locks; it has no preconditions.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(n: i32) {
    // SAFETY: mallopt only tunes glibc's allocator; it is called once, before the runtime
    // or any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
}
