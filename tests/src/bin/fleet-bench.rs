//! `aviary-fleet-bench`: fleet-scale figures for docs/perf.md, on real processes.
//!
//! For each N: a release control plane, N simulated nodes (aviary-fleet-sim, split over
//! processes), then: RSS growth per stream, idle CPU and the heartbeat write load, one
//! SetWeight to all N (commit → ACK latency), and a reconnect storm after `kill -9` (time
//! until every node holds a stream again, streams shed, errors). Finally the edge
//! daemon's own footprint.
//!
//! Run by hand: `cargo run --release -p aviary-tests --bin aviary-fleet-bench -- --nodes 1000,10000,19000`.
//! `scripts/test` runs `--smoke` (100 nodes, short windows) to keep it working.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use aviary_tests::sims::{now_ns, percentile, Event, Sims};
use aviary_tests::{bin, cpu_time, rss_kib, ControlPlane, Daemon, Edge, Workspace};
use clap::Parser;

/// Fleet benchmarks (see the module docs).
#[derive(Parser, Debug)]
#[command(name = "aviary-fleet-bench")]
struct Args {
    /// Fleet sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,19000")]
    nodes: Vec<usize>,
    /// Simulated nodes per simulator process (each holds one fd per node).
    #[arg(long, default_value_t = 5000)]
    per_process: usize,
    /// Seconds of idle measurement (CPU per held stream).
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Seconds the edge footprint is measured over.
    #[arg(long, default_value_t = 30)]
    edge_secs: u64,
    /// Small and quick: 100 nodes, 2 s windows (scripts/test).
    #[arg(long)]
    smoke: bool,
    /// Extra control-plane flags, e.g. `--cp-arg=--admission-rate=5000`.
    #[arg(long = "cp-arg", allow_hyphen_values = true)]
    cp_args: Vec<String>,
}

struct FleetFigures {
    nodes: usize,
    connect_secs: f64,
    rss_base_mib: f64,
    rss_per_stream_kib: f64,
    idle_cpu_pct: f64,
    /// Over the idle window: health reports (heartbeats) received, and node statuses
    /// written to the store, per second.
    heartbeats_per_s: f64,
    status_writes_per_s: f64,
    push_p50_ms: f64,
    push_p99_ms: f64,
    push_max_ms: f64,
    rpc_ms: f64,
    push_cpu: (Duration, Duration),
    storm_secs: f64,
    storm_shed: f64,
    storm_errors: BTreeMap<String, usize>,
    rss_after_storm_mib: f64,
    listing: Listing,
}

/// `ListNodes` page by page at the default page size, and `GetNode`, over the whole fleet.
struct Listing {
    pages: usize,
    max_page_bytes: usize,
    page_ms_p50: f64,
    page_ms_max: f64,
    full_ms: f64,
    get_node_ms_p50: f64,
    get_node_ms_p99: f64,
}

/// Lists every node a default page at a time, then times 200 `GetNode`s.
async fn listing(admin: &mut aviary_tests::Admin, nodes: usize) -> anyhow::Result<Listing> {
    use aviary_proto::v1 as pb;
    use prost::Message;
    let (mut token, mut seen, mut page_ms, mut max_page_bytes) = (String::new(), 0, Vec::new(), 0);
    let full = Instant::now();
    loop {
        let t = Instant::now();
        let request = pb::ListNodesRequest {
            page_token: token,
            ..Default::default()
        };
        let page = admin.nodes.list_nodes(request).await?.into_inner();
        page_ms.push(t.elapsed().as_secs_f64() * 1e3);
        max_page_bytes = max_page_bytes.max(page.encoded_len());
        seen += page.nodes.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let full_ms = full.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(seen == nodes, "listed {seen} of {nodes} nodes");
    let mut get_ms = Vec::with_capacity(200);
    for i in 0..200 {
        let t = Instant::now();
        admin.node(&format!("sim-{}", i * nodes / 200)).await?;
        get_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    page_ms.sort_by(f64::total_cmp);
    get_ms.sort_by(f64::total_cmp);
    Ok(Listing {
        pages: page_ms.len(),
        max_page_bytes,
        page_ms_p50: percentile(&page_ms, 50.0),
        page_ms_max: page_ms.last().copied().unwrap_or(f64::NAN),
        full_ms,
        get_node_ms_p50: percentile(&get_ms, 50.0),
        get_node_ms_p99: percentile(&get_ms, 99.0),
    })
}

async fn fleet(args: &Args, nodes: usize) -> anyhow::Result<FleetFigures> {
    let ws = Workspace::new()?;
    let cp_args: Vec<&str> = args.cp_args.iter().map(String::as_str).collect();
    let mut cp = ControlPlane::start(&ws, &cp_args).await?;
    let pid = cp.pid().context("cp pid")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_kib(pid)?;

    let started = Instant::now();
    let mut sims =
        Sims::start(&ws, &cp, nodes, args.per_process, &["--label", "bench=yes"]).await?;
    let mut up = HashSet::new();
    sims.until(Duration::from_secs(300), "every node to connect", |e| {
        if let Event::Up(i, _) = e {
            up.insert(*i);
        }
        up.len() == nodes
    })
    .await?;
    let connect_secs = started.elapsed().as_secs_f64();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib(pid)?;
    let cpu0 = cpu_time(pid)?;
    let (beats0, writes0) = (
        cp.metric("aviary_heartbeats_total").await.unwrap_or(0.0),
        cp.metric("aviary_store_status_writes_total")
            .await
            .unwrap_or(0.0),
    );
    let idle = Duration::from_secs(args.idle_secs);
    tokio::time::sleep(idle).await;
    let idle_cpu_pct = (cpu_time(pid)? - cpu0).as_secs_f64() / idle.as_secs_f64() * 100.0;
    let per_s = |v: f64| v / idle.as_secs_f64();
    let heartbeats_per_s =
        per_s(cp.metric("aviary_heartbeats_total").await.unwrap_or(0.0) - beats0);
    let status_writes_per_s = per_s(
        cp.metric("aviary_store_status_writes_total")
            .await
            .unwrap_or(0.0)
            - writes0,
    );

    // One SetWeight to all N: from just before the call (an upper bound on commit) to
    // each node's ACK as the simulator sends it.
    let mut admin = ws.admin(&cp).await?;
    let cp_cpu0 = cpu_time(pid)?;
    let sims_cpu0 = sims.cpu_time();
    let t0 = now_ns();
    admin.set_weight("gateway", 50, "bench=yes").await?;
    let rpc_ms = now_ns().saturating_sub(t0) as f64 / 1e6;
    let mut latencies = Vec::with_capacity(nodes);
    sims.until(
        Duration::from_secs(120),
        "every node to ACK the new weights",
        |e| {
            if let Event::Ack { at, .. } = e {
                latencies.push(at.saturating_sub(t0) as f64 / 1e6);
            }
            latencies.len() == nodes
        },
    )
    .await?;
    latencies.sort_by(f64::total_cmp);
    let push_cpu = (cpu_time(pid)? - cp_cpu0, sims.cpu_time() - sims_cpu0);
    let listing = listing(&mut admin, nodes).await?;

    // Reconnect storm.
    cp.kill9().await?;
    cp.restart().await?;
    let restarted = now_ns();
    let storm_start = Instant::now();
    let mut back = HashSet::new();
    let storm_errors = sims
        .until(
            Duration::from_secs(300),
            "every node to reconnect after kill -9",
            |e| {
                if let Event::Up(i, t) = e {
                    if *t >= restarted {
                        back.insert(*i);
                    }
                }
                back.len() == nodes
            },
        )
        .await?;
    let storm_secs = storm_start.elapsed().as_secs_f64();
    let storm_shed = cp.metric("aviary_streams_shed_total").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(cp.pid().context("cp pid")?)?;
    sims.stop().await;

    Ok(FleetFigures {
        nodes,
        connect_secs,
        rss_base_mib: rss0 as f64 / 1024.0,
        rss_per_stream_kib: rss1.saturating_sub(rss0) as f64 / nodes as f64,
        idle_cpu_pct,
        heartbeats_per_s,
        status_writes_per_s,
        push_p50_ms: percentile(&latencies, 50.0),
        push_p99_ms: percentile(&latencies, 99.0),
        push_max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        rpc_ms,
        push_cpu,
        storm_secs,
        storm_shed,
        storm_errors,
        rss_after_storm_mib: rss_after as f64 / 1024.0,
        listing,
    })
}

struct EdgeFigures {
    rss_kib: u64,
    cpu_pct: f64,
    binary_bytes: u64,
    assignments: u32,
}

async fn edge_footprint(secs: u64) -> anyhow::Result<EdgeFigures> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let edge = Edge::start(&ws, &cp, "gw-bench", &[], &[]).await?;
    let pid = edge.pid().context("edge pid")?;
    let mut admin = ws.admin(&cp).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_time(pid)?;
    let start = Instant::now();
    let mut assignments = 0;
    let mut peak = 0;
    // Weights streaming: a new assignment every second.
    while start.elapsed() < Duration::from_secs(secs) {
        assignments += 1;
        admin.set_weight("gateway", assignments % 101, "").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss_kib(pid)?);
    }
    let cpu_pct = (cpu_time(pid)? - cpu0).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0;
    let binary_bytes = std::fs::metadata(bin("aviary-edge")?)?.len();
    Ok(EdgeFigures {
        rss_kib: peak,
        cpu_pct,
        binary_bytes,
        assignments,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.nodes = vec![100];
        args.idle_secs = 2;
        args.edge_secs = 3;
    }
    let profile = if cfg!(debug_assertions) {
        "debug (figures not representative)"
    } else {
        "release"
    };
    println!(
        "aviary-fleet-bench: {} cores, {profile} binaries from {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        aviary_tests::bin_dir().display()
    );
    println!();
    println!("| N | connect all | CP RSS base | RSS/stream | idle CPU | SetWeight RPC | SetWeight→ACK p50 / p99 / max | storm: all synced | shed | errors | RSS after storm |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut last = None;
    let mut listings = Vec::new();
    let mut beats = Vec::new();
    for &n in &args.nodes {
        let f = fleet(&args, n).await?;
        let l = &f.listing;
        beats.push(format!(
            "| {} | {:.0} | {:.1} | {:.4} |",
            f.nodes,
            f.heartbeats_per_s,
            f.status_writes_per_s,
            f.status_writes_per_s / f.heartbeats_per_s.max(1.0)
        ));
        listings.push(format!(
            "| {} | {} | {:.0} KiB | {:.1} / {:.1} ms | {:.0} ms | {:.2} / {:.2} ms |",
            f.nodes,
            l.pages,
            l.max_page_bytes as f64 / 1024.0,
            l.page_ms_p50,
            l.page_ms_max,
            l.full_ms,
            l.get_node_ms_p50,
            l.get_node_ms_p99
        ));
        println!(
            "| {} | {:.1} s | {:.1} MiB | {:.1} KiB | {:.2}% | {:.0} ms | {:.0} / {:.0} / {:.0} ms | {:.1} s | {:.0} | {:?} | {:.1} MiB |",
            f.nodes, f.connect_secs, f.rss_base_mib, f.rss_per_stream_kib, f.idle_cpu_pct, f.rpc_ms,
            f.push_p50_ms, f.push_p99_ms, f.push_max_ms, f.storm_secs, f.storm_shed, f.storm_errors, f.rss_after_storm_mib,
        );
        println!(
            "  (push CPU: control plane {:.0} ms, simulators {:.0} ms)",
            f.push_cpu.0.as_secs_f64() * 1e3,
            f.push_cpu.1.as_secs_f64() * 1e3
        );
        last = Some(f);
    }
    println!();
    println!("| N | ListNodes pages (default size) | largest page | ms per page p50 / max | full listing | GetNode p50 / p99 |");
    println!("|---|---|---|---|---|---|");
    for row in &listings {
        println!("{row}");
    }
    println!();
    println!(
        "| N connected, idle | heartbeats received/s | node statuses written/s | writes per heartbeat |"
    );
    println!("|---|---|---|---|");
    for row in &beats {
        println!("{row}");
    }
    if let Some(f) = last {
        let mem_gib =
            (f.rss_base_mib * 1024.0 + f.rss_per_stream_kib * 100_000.0) / 1024.0 / 1024.0;
        let cpu = f.idle_cpu_pct / f.nodes as f64 * 100_000.0;
        println!();
        println!(
            "Projection for 100,000 nodes from the N={} run (linear in N; a projection, not a measurement): \
             RSS ≈ {:.2} GiB, idle CPU ≈ {:.0}% of one core.",
            f.nodes, mem_gib, cpu
        );
    }
    let e = edge_footprint(args.edge_secs).await?;
    println!();
    println!(
        "Edge daemon, connected, {} weight assignments over {} s: peak RSS {:.1} MiB, CPU {:.3}% of a core, binary {:.1} MiB ({}).",
        e.assignments, args.edge_secs, e.rss_kib as f64 / 1024.0, e.cpu_pct, e.binary_bytes as f64 / 1024.0 / 1024.0, profile
    );
    Ok(())
}
