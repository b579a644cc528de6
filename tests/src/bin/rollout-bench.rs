//! `aviary-rollout-bench`: canary rollouts at fleet scale, on real processes.
//!
//! For each N: a release control plane and N simulated nodes (aviary-fleet-sim: they
//! receive payloads chunk by chunk, ACK installs and rollbacks, and report health every
//! second; nodes running the bad version report failing probes). Then:
//! 1. v1 everywhere at once: time until every node ACKed it; then, every node running
//!    it and reporting every second, the heartbeats received and statuses written per
//!    second (the store's heartbeat load).
//! 2. v2 (good) through `canary 10% → weight 50 → analysis W → canary 50% → 100%`: for
//!    each step, the time from its start until its last node ACKed.
//! 3. v3 (bad) through `canary 10% → analysis W`: the analysis fails, the rollout aborts,
//!    and every canary rolls back to v2. Reported: analysis start → last rollback ACK
//!    (target: W + 1 s) and abort decision → last rollback ACK.
//!
//! Run by hand: `cargo run --release -p aviary-tests --bin aviary-rollout-bench -- --nodes 10000,19000`.
//! `scripts/test` runs `--smoke` (100 nodes, 2 s windows) to keep it working.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use aviary_tests::sims::{now_ns, Event, Sims};
use aviary_tests::{ControlPlane, Workspace};
use clap::Parser;
use pb::step::Kind;

/// Rollout benchmarks (see the module docs).
#[derive(Parser, Debug)]
#[command(name = "aviary-rollout-bench")]
struct Args {
    /// Fleet sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,19000")]
    nodes: Vec<usize>,
    /// Simulated nodes per simulator process.
    #[arg(long, default_value_t = 5000)]
    per_process: usize,
    /// Analysis window, seconds.
    #[arg(long, default_value_t = 10)]
    window: u32,
    /// Small and quick: 100 nodes, 2 s windows (scripts/test).
    #[arg(long)]
    smoke: bool,
}

const MODULE: &str = "bench";
const BAD: &str = "3.0.0";

/// The audit events of rollout `id` as (commit time in unix ns, action, detail), once it
/// has ended: the control plane's own record of when each step was committed.
async fn transitions(
    ws: &Workspace,
    cp: &ControlPlane,
    id: &str,
) -> anyhow::Result<(pb::Rollout, Vec<(u128, String, String)>)> {
    let mut admin = ws.admin(cp).await?;
    let rollout = loop {
        let r = admin
            .rollouts
            .get_rollout(pb::GetRolloutRequest { id: id.into() })
            .await?
            .into_inner();
        if r.state != pb::RolloutState::Progressing as i32 {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let events = admin
        .audit
        .list_events(pb::ListEventsRequest {
            filter: Some(pb::EventFilter {
                rollout_id: id.into(),
                ..Default::default()
            }),
            after_seq: 0,
            limit: 0,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events
        .into_iter()
        .map(|e| {
            let t = e.time.unwrap_or_default();
            let ns = t.seconds as u128 * 1_000_000_000 + t.nanos as u128;
            (ns, e.action, e.detail)
        })
        .collect();
    Ok((rollout, events))
}

/// Commit time of the first event whose detail contains `needle`.
fn at(events: &[(u128, String, String)], needle: &str) -> anyhow::Result<u128> {
    events
        .iter()
        .find(|(_, _, d)| d.contains(needle))
        .map(|(t, ..)| *t)
        .with_context(|| format!("no audit event with {needle:?}: {events:?}"))
}

fn ms(from: u128, to: u128) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}

fn analysis(window: u32) -> Kind {
    Kind::Analysis(pb::Analysis {
        window_seconds: window,
        max_error_rate: 0.1,
        min_reports: 1,
        failure_limit: 1,
        ..Default::default()
    })
}

async fn create(
    ws: &Workspace,
    cp: &ControlPlane,
    version: &str,
    steps: Vec<Kind>,
) -> anyhow::Result<(String, u128)> {
    let mut admin = ws.admin(cp).await?;
    let t0 = now_ns();
    let r = admin
        .rollouts
        .create_rollout(pb::CreateRolloutRequest {
            module: MODULE.into(),
            version: version.into(),
            steps: steps
                .into_iter()
                .map(|k| pb::Step { kind: Some(k) })
                .collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((r.id, t0))
}

/// Bytes `pid` has caused to be written to storage (`write_bytes` of /proc/PID/io): the
/// store's pages and the log, not its sockets.
fn written_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/PID/io")
}

/// One step's figures: what it was, how many nodes it reached, and how long that took.
struct StepFigures {
    step: String,
    nodes: usize,
    reach_ms: f64,
}

struct Figures {
    nodes: usize,
    everywhere_ms: f64,
    steps: Vec<StepFigures>,
    canaries: usize,
    analysis_to_rollback_ms: f64,
    abort_to_rollback_ms: f64,
    rollback_target_ms: f64,
    heartbeats_per_s: f64,
    status_writes_per_s: f64,
    written_kib_per_s: f64,
}

async fn scenario(args: &Args, n: usize) -> anyhow::Result<Figures> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let mut sims = Sims::start(&ws, &cp, n, args.per_process, &["--bad-version", BAD]).await?;
    let mut up = HashSet::new();
    sims.until(Duration::from_secs(300), "every node to connect", |e| {
        if let Event::Up(i, _) = e {
            up.insert(*i);
        }
        up.len() == n
    })
    .await?;
    for v in ["1.0.0", "2.0.0", BAD] {
        let file = ws.path(&format!("bench-{v}"));
        // Small and incompressible: the figures are about the control plane, not bytes.
        std::fs::write(
            &file,
            (0..8192).map(|_| fastrand::u8(..)).collect::<Vec<_>>(),
        )?;
        cp.upload_release(&ws, MODULE, v, &file, "args = [\"--serve\"]\n")?;
    }

    // 1. Everywhere at once.
    let (_, t0) = create(&ws, &cp, "1.0.0", Vec::new()).await?;
    let mut last = 0;
    let mut count = 0;
    sims.until(Duration::from_secs(300), "v1 on every node", |e| {
        if let Event::Module { version, at, .. } = e {
            if version == "1.0.0" {
                count += 1;
                last = last.max(*at);
            }
        }
        count == n
    })
    .await
    .with_context(|| format!("{count} of {n} nodes installed v1"))?;
    let everywhere_ms = ms(t0, last);
    // Let the engine close the rollout (so v2 does not conflict with it), and the first
    // reports after the install settle each node's inventory.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Steady state: every node runs v1 and reports every second. What does that cost
    // the store?
    // (An older control plane has neither counter: its bytes written still compare.)
    let pid = cp.pid().context("cp pid")?;
    let counters = || async {
        anyhow::Ok((
            cp.metric("aviary_heartbeats_total")
                .await
                .unwrap_or(f64::NAN),
            cp.metric("aviary_store_status_writes_total")
                .await
                .unwrap_or(f64::NAN),
            written_bytes(pid)?,
        ))
    };
    let (beats0, writes0, bytes0) = counters().await?;
    let steady = Duration::from_secs(u64::from(args.window));
    tokio::time::sleep(steady).await;
    let (beats1, writes1, bytes1) = counters().await?;
    let heartbeats_per_s = (beats1 - beats0) / steady.as_secs_f64();
    let status_writes_per_s = (writes1 - writes0) / steady.as_secs_f64();
    let written_kib_per_s = (bytes1 - bytes0) as f64 / 1024.0 / steady.as_secs_f64();

    // 2. A good canary rollout, step by step.
    let plan = [
        (
            "canary 10%",
            Kind::SetCanaryScale(pb::SetCanaryScale { percent: 10 }),
        ),
        ("weight 50", Kind::SetWeight(pb::SetWeight { weight: 50 })),
        ("analysis", analysis(args.window)),
        (
            "canary 50%",
            Kind::SetCanaryScale(pb::SetCanaryScale { percent: 50 }),
        ),
        (
            "canary 100%",
            Kind::SetCanaryScale(pb::SetCanaryScale { percent: 100 }),
        ),
    ];
    let (id, _) = create(&ws, &cp, "2.0.0", plan.iter().map(|(_, k)| *k).collect()).await?;
    let mut installs = Vec::new();
    let mut weight_acks = Vec::new();
    sims.until(Duration::from_secs(600), "v2 on every node", |e| {
        match e {
            Event::Module { version, at, .. } if version == "2.0.0" => installs.push(*at),
            Event::Ack { at, .. } => weight_acks.push(*at),
            _ => {}
        }
        installs.len() == n
    })
    .await?;
    let (r, events) = transitions(&ws, &cp, &id).await?;
    if r.state != pb::RolloutState::Succeeded as i32 {
        bail!("v2 rollout ended as {r:?}");
    }
    // Each step from the commit that told the nodes (scale, weight) to its last ACK; the
    // analysis from its start to its judgement.
    let mut steps = Vec::new();
    let mut bounds = Vec::new();
    for (_, kind) in &plan {
        bounds.push(match kind {
            Kind::SetCanaryScale(c) => at(&events, &format!("canary scale {}%", c.percent))?,
            Kind::SetWeight(w) => at(&events, &format!("canary weight {}", w.weight))?,
            _ => at(&events, "canary weight")?,
        });
    }
    let judged = at(&events, "analysis passed")?;
    for (k, (name, kind)) in plan.iter().enumerate() {
        let start = bounds[k];
        // The weight and the analysis start together: end at the next later commit.
        let end = bounds[k + 1..]
            .iter()
            .copied()
            .find(|b| *b > start)
            .unwrap_or(u128::MAX);
        let within: Vec<u128> = match kind {
            Kind::SetWeight(_) => &weight_acks,
            _ => &installs,
        }
        .iter()
        .copied()
        .filter(|t| *t >= start && *t < end)
        .collect();
        let (nodes, reach_ms) = match kind {
            Kind::Analysis(_) => (0, ms(start, judged)),
            _ => (
                within.len(),
                within.iter().max().map_or(0.0, |t| ms(start, *t)),
            ),
        };
        steps.push(StepFigures {
            step: name.to_string(),
            nodes,
            reach_ms,
        });
    }

    // 3. A bad canary: analysis fails, the canaries roll back.
    let (id, _) = create(
        &ws,
        &cp,
        BAD,
        vec![
            Kind::SetCanaryScale(pb::SetCanaryScale { percent: 10 }),
            analysis(args.window),
        ],
    )
    .await?;
    let (mut bad, mut back) = (0usize, Vec::new());
    sims.until(
        Duration::from_secs(300),
        "every bad canary to roll back",
        |e| {
            if let Event::Module {
                version,
                rollback,
                at,
                ..
            } = e
            {
                if version == BAD {
                    bad += 1;
                } else if *rollback {
                    back.push(*at);
                }
            }
            bad > 0 && back.len() == bad
        },
    )
    .await?;
    let (r, events) = transitions(&ws, &cp, &id).await?;
    if r.state != pb::RolloutState::Aborted as i32 {
        bail!("v3 rollout ended as {r:?}");
    }
    let analysis_start = at(&events, "step 1 of 2 done")?;
    let aborted = at(&events, "aborted: analysis failed")?;
    let last_back = back.iter().copied().max().unwrap_or(0);
    sims.stop().await;
    Ok(Figures {
        nodes: n,
        everywhere_ms,
        steps,
        canaries: bad,
        analysis_to_rollback_ms: ms(analysis_start, last_back),
        abort_to_rollback_ms: ms(aborted, last_back),
        rollback_target_ms: f64::from(args.window) * 1000.0 + 1000.0,
        heartbeats_per_s,
        status_writes_per_s,
        written_kib_per_s,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.nodes = vec![100];
        args.window = 2;
    }
    let profile = if cfg!(debug_assertions) {
        "debug (figures not representative)"
    } else {
        "release"
    };
    println!(
        "aviary-rollout-bench: {} cores, {profile} binaries from {}, analysis window {} s",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        aviary_tests::bin_dir().display(),
        args.window,
    );
    for &n in &args.nodes {
        let f = scenario(&args, n).await?;
        println!();
        println!(
            "N = {}: v1 everywhere at once: {:.0} ms to the last ACK",
            f.nodes, f.everywhere_ms
        );
        println!(
            "steady state on v1 over {} s: {:.0} heartbeats/s received, {:.1} node statuses written/s ({:.4} per heartbeat), control plane wrote {:.1} KiB/s to storage",
            args.window,
            f.heartbeats_per_s,
            f.status_writes_per_s,
            f.status_writes_per_s / f.heartbeats_per_s.max(1.0),
            f.written_kib_per_s,
        );
        println!("| v2 step | nodes reached | start → last ACK |");
        println!("|---|---|---|");
        for s in &f.steps {
            println!("| {} | {} | {:.0} ms |", s.step, s.nodes, s.reach_ms);
        }
        println!(
            "v3 (bad) on {} canaries: analysis start → last rollback ACK {:.0} ms (target ≤ {:.0} ms: {}); abort → last rollback ACK {:.0} ms",
            f.canaries,
            f.analysis_to_rollback_ms,
            f.rollback_target_ms,
            if f.analysis_to_rollback_ms <= f.rollback_target_ms { "met" } else { "missed" },
            f.abort_to_rollback_ms,
        );
    }
    Ok(())
}
