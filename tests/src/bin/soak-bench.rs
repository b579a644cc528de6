//! `aviary-soak-bench`: a fleet under churn for a long time, to show that the control
//! plane's memory, descriptors and disk stay bounded.
//!
//! N simulated nodes (aviary-fleet-sim: real mTLS streams, health every second once a
//! module is installed) against one control plane whose streams end every
//! `--stream-age` (±10%), so the whole fleet reconnects continuously. Meanwhile a weight
//! change every `--weight-every` and a canary rollout of the next version every
//! `--rollout-every` (`canary 20% → pause 5 s → 100%`). Every `--sample` it prints the
//! control plane's RSS, open descriptors, data-dir size and audit sequence number, and
//! what happened since; at the end, how each grew over the second half of the run.
//!
//! Run by hand: `cargo build --release --bins && ./target/release/aviary-soak-bench`
//! (1,000 nodes, 30 minutes). `scripts/test` runs `--smoke` to keep it working.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use aviary_tests::sims::{Event, Sims};
use aviary_tests::{dir_bytes, rss_kib, ControlPlane, Workspace};
use clap::Parser;

/// Soak benchmark (see the module docs).
#[derive(Parser, Debug)]
#[command(name = "aviary-soak-bench")]
struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// How long to run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    duration: Duration,
    /// How often to print a row.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    sample: Duration,
    /// Fleet streams end after this (±10%): reconnect churn.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    stream_age: Duration,
    /// How often the weight changes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    weight_every: Duration,
    /// How often a rollout starts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
    rollout_every: Duration,
    /// Simulated nodes per simulator process.
    #[arg(long, default_value_t = 500)]
    per_process: usize,
    /// Small and quick (scripts/test): 40 nodes for 20 s.
    #[arg(long)]
    smoke: bool,
}

const MODULE: &str = "soak";

/// One printed row.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    disk: u64,
    audit_seq: u64,
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn upload(ws: &Workspace, cp: &ControlPlane, version: &str) -> anyhow::Result<()> {
    let file = ws.path(&format!("soak-{version}"));
    std::fs::write(
        &file,
        (0..4096).map(|_| fastrand::u8(..)).collect::<Vec<_>>(),
    )?;
    cp.upload_release(ws, MODULE, version, &file, "args = [\"--serve\"]\n")?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.nodes = 40;
        args.duration = Duration::from_secs(20);
        args.sample = Duration::from_secs(5);
        args.stream_age = Duration::from_secs(5);
        args.weight_every = Duration::from_secs(1);
        args.rollout_every = Duration::from_secs(8);
        args.per_process = 20;
    }
    let ws = Workspace::new()?;
    let age = format!("{}ms", args.stream_age.as_millis());
    let cp = ControlPlane::start(&ws, &["--max-stream-age", &age]).await?;
    let pid = cp.pid().context("control plane pid")?;
    let mut sims = Sims::start(&ws, &cp, args.nodes, args.per_process, &[]).await?;
    let mut up = std::collections::HashSet::new();
    sims.until(Duration::from_secs(300), "every node to connect", |e| {
        if let Event::Up(i, _) = e {
            up.insert(*i);
        }
        up.len() == args.nodes
    })
    .await?;
    println!(
        "aviary-soak-bench: {} nodes for {:?}, streams end every {:?} ±10%, a weight every {:?}, a rollout every {:?} ({} cores)",
        args.nodes,
        args.duration,
        args.stream_age,
        args.weight_every,
        args.rollout_every,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| t | CP RSS MiB | CP fds | data dir MiB | audit seq | reconnects | weights | rollouts done | streams ended |");
    println!("|---|---|---|---|---|---|---|---|---|");

    let mut admin = ws.admin(&cp).await?;
    let start = Instant::now();
    let mut weight_tick = tokio::time::interval(args.weight_every);
    let mut rollout_tick = tokio::time::interval(args.rollout_every);
    let mut sample_tick = tokio::time::interval(args.sample);
    let mut samples: Vec<Sample> = Vec::new();
    let (mut reconnects, mut weights, mut rollouts_done, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut audit_seq = 0;
    let mut version = 0u32;
    let mut current: Option<String> = None;
    loop {
        tokio::select! {
            event = sims.next() => match event {
                Some(Event::Up(..)) => reconnects += 1,
                Some(Event::Err(_)) => errors += 1,
                Some(_) => {}
                None => bail!("the simulators exited"),
            },
            _ = weight_tick.tick() => {
                let r = admin.set_weight(MODULE, fastrand::u32(0..=100), "").await?;
                audit_seq = audit_seq.max(r.event_seq);
                weights += 1;
            }
            _ = rollout_tick.tick() => {
                if let Some(id) = &current {
                    let r = admin.rollouts.get_rollout(pb::GetRolloutRequest { id: id.clone() })
                        .await?.into_inner();
                    if r.state == pb::RolloutState::Progressing as i32
                        || r.state == pb::RolloutState::Paused as i32 {
                        continue; // still going: the next tick tries again
                    }
                    if r.state == pb::RolloutState::Succeeded as i32 {
                        rollouts_done += 1;
                    }
                }
                version += 1;
                let v = format!("1.0.{version}");
                upload(&ws, &cp, &v)?;
                let steps = if version == 1 { Vec::new() } else {
                    use pb::step::Kind;
                    [
                        Kind::SetCanaryScale(pb::SetCanaryScale { percent: 20 }),
                        Kind::Pause(pb::Pause { seconds: 5 }),
                        Kind::SetCanaryScale(pb::SetCanaryScale { percent: 100 }),
                    ].into_iter().map(|k| pb::Step { kind: Some(k) }).collect()
                };
                let r = admin.rollouts.create_rollout(pb::CreateRolloutRequest {
                    module: MODULE.into(),
                    version: v,
                    steps,
                    ..Default::default()
                }).await?.into_inner();
                current = Some(r.id);
            }
            _ = sample_tick.tick() => {
                let s = Sample {
                    at: start.elapsed(),
                    rss_kib: rss_kib(pid)?,
                    fds: fds(pid),
                    disk: dir_bytes(&cp.data_dir),
                    audit_seq,
                };
                println!(
                    "| {:.0} s | {:.1} | {} | {:.2} | {} | {reconnects} | {weights} | {rollouts_done} | {errors} |",
                    s.at.as_secs_f64(),
                    s.rss_kib as f64 / 1024.0,
                    s.fds,
                    s.disk as f64 / f64::from(1u32 << 20),
                    s.audit_seq,
                );
                samples.push(s);
                if s.at >= args.duration {
                    break;
                }
            }
        }
    }
    // Growth after the warm-up (health windows filling, every stream reconnected): the
    // mean of the last quarter against the mean of the quarter before, since single
    // samples swing with whatever a rollout has in flight at that instant.
    let quarter = (samples.len() / 4).max(1);
    let last = &samples[samples.len().saturating_sub(quarter)..];
    let before = &samples[samples.len().saturating_sub(2 * quarter)..samples.len() - last.len()];
    let mean = |s: &[Sample], f: fn(&Sample) -> f64| {
        if s.is_empty() {
            0.0
        } else {
            s.iter().map(f).sum::<f64>() / s.len() as f64
        }
    };
    let rss = |s: &Sample| s.rss_kib as f64 / 1024.0;
    let disk = |s: &Sample| s.disk as f64 / f64::from(1u32 << 20);
    let fd = |s: &Sample| s.fds as f64;
    let growth = |f: fn(&Sample) -> f64| {
        let (a, b) = (mean(before, f), mean(last, f));
        if a > 0.0 {
            (b - a) * 100.0 / a
        } else {
            0.0
        }
    };
    let end = samples[samples.len() - 1];
    println!();
    println!(
        "third quarter → last quarter (means): RSS {:.1} → {:.1} MiB ({:+.1}%), fds {:.0} → {:.0}, data dir {:.2} → {:.2} MiB ({:+.1}%); peak RSS {:.1} MiB; {} audit events",
        mean(before, rss),
        mean(last, rss),
        growth(rss),
        mean(before, fd),
        mean(last, fd),
        mean(before, disk),
        mean(last, disk),
        growth(disk),
        samples.iter().map(rss).fold(0.0, f64::max),
        end.audit_seq
    );
    if !args.smoke && rollouts_done == 0 {
        bail!("no rollout completed");
    }
    sims.stop().await;
    Ok(())
}
