//! `aviary-foreign-bench`: the edge daemon built for gateway CPUs. For each target it
//! prints the stripped release binaries' sizes (from `scripts/build-targets`), then runs
//! the daemon under qemu-user, connected to a native control plane and idle, and prints
//! its RSS and CPU — emulated figures: qemu's translator and code cache are in them, so
//! they bound a real board's from above rather than measure it. The native x86_64 daemon
//! idles beside it for scale.
//!
//! ```sh
//! scripts/build-targets                          # release binaries for every target
//! cargo build --release --bins
//! ./target/release/aviary-foreign-bench          # --idle 60s
//! ```
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::Context;
use aviary_tests::foreign::Foreign;
use aviary_tests::{bin, cpu_time, rss_kib, ControlPlane, Edge, Workspace};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Gateway builds: binary sizes, and the idle daemon under qemu")]
struct Args {
    /// How long each daemon idles while measured.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    idle: Duration,
    /// Build directory under target/TRIPLE/ to take binaries from.
    #[arg(long, default_value = "release")]
    profile: String,
    /// Small and quick (scripts/test): debug aarch64 daemon, 3 s.
    #[arg(long)]
    smoke: bool,
}

const TARGETS: [&str; 4] = [
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "armv7-unknown-linux-gnueabihf",
    "riscv64gc-unknown-linux-gnu",
];

/// Connected and idle for `idle`: (RSS KiB at the end, % of one core).
async fn idle_figures(program: Vec<String>, idle: Duration) -> anyhow::Result<(u64, f64)> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let edge = Edge::start_program(&ws, &cp.url(), "gw-bench", &[], &[], program).await?;
    edge.wait_connected().await?;
    let pid = edge.pid().context("edge pid")?;
    let (cpu0, start) = (cpu_time(pid)?, Instant::now());
    tokio::time::sleep(idle).await;
    let cpu = (cpu_time(pid)? - cpu0).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0;
    Ok((rss_kib(pid)?, cpu))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let targets: Vec<&str> = if args.smoke {
        args.idle = Duration::from_secs(3);
        args.profile = "debug".into();
        vec![Foreign::AARCH64.triple]
    } else {
        TARGETS.to_vec()
    };
    let target_dir = aviary_tests::bin_dir()
        .parent()
        .context("target dir")?
        .to_path_buf();
    println!(
        "aviary-foreign-bench: {} binaries, idle {:?} ({} cores; qemu figures are emulated)",
        args.profile,
        args.idle,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!("| target | aviary-edge | aviary-sensors | aviary | idle daemon RSS | idle CPU |");
    println!("|---|---|---|---|---|---|");
    for triple in targets {
        let dir = target_dir.join(triple).join(&args.profile);
        let size = |name: &str| {
            std::fs::metadata(dir.join(name))
                .map(|m| format!("{:.2} MiB", m.len() as f64 / 1024.0 / 1024.0))
                .unwrap_or_else(|_| "not built".into())
        };
        let program = match Foreign::by_triple(triple) {
            Some(cpu) => cpu.command(&args.profile, "aviary-edge").ok(),
            // The host: its build for this triple if there is one, else this build's.
            None => {
                let own = dir.join("aviary-edge");
                let exe = if own.exists() {
                    Some(own)
                } else {
                    bin("aviary-edge").ok()
                };
                exe.map(|e| vec![e.display().to_string()])
            }
        };
        let (rss, cpu) = match program {
            Some(program) => {
                let (rss, cpu) = idle_figures(program, args.idle).await?;
                let emulated = if Foreign::by_triple(triple).is_some() {
                    " (qemu)"
                } else {
                    ""
                };
                (
                    format!("{:.1} MiB{emulated}", rss as f64 / 1024.0),
                    format!("{cpu:.2}%{emulated}"),
                )
            }
            None => ("not built".into(), "-".into()),
        };
        println!(
            "| {triple} | {} | {} | {} | {rss} | {cpu} |",
            size("aviary-edge"),
            size("aviary-sensors"),
            size("aviary")
        );
    }
    Ok(())
}
