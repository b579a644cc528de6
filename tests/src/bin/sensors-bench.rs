//! Sensor stub benchmarks (issue 5), against the real `aviary-sensors` binary:
//!
//! 1. Throughput: `--subscribers-max` clients read a synthetic stream at `--speed 0` (as
//!    fast as they can) for `--seconds`; prints samples per second served and the stub's
//!    CPU.
//! 2. Pacing: `--subscribers` clients at `--rate-hz` (default 100 × 1 kHz) for
//!    `--seconds`; prints p50/p99/max inter-sample jitter as the clients see it
//!    (|arrival gap − period|), samples lost, and the stub's CPU in cores.
//!
//! The clients run in this process on the same machine, so their scheduling noise is in
//! the jitter figures too. `scripts/test` runs `--smoke` to keep it working.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::Context;
use aviary_proto::sensors::v1 as pb;
use aviary_tests::sensors::SensorStub;
use aviary_tests::sims::percentile;
use aviary_tests::{cpu_time, Workspace};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Sensor stub benchmarks (see the module docs)")]
struct Args {
    /// Paced subscribers.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Rate of each paced subscriber, Hz.
    #[arg(long, default_value_t = 1000.0)]
    rate_hz: f64,
    /// Unpaced (as fast as possible) subscribers for the throughput run.
    #[arg(long, default_value_t = 16)]
    subscribers_max: usize,
    /// Length of each measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Subscribers per HTTP/2 connection.
    #[arg(long, default_value_t = 10)]
    per_connection: usize,
    /// Small and quick (scripts/test).
    #[arg(long)]
    smoke: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.subscribers = 10;
        args.subscribers_max = 2;
        args.seconds = 1;
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "aviary-sensors-bench: {cores} cores, binaries from {}",
        aviary_tests::bin_dir().display()
    );
    throughput(&args).await?;
    pacing(&args).await?;
    Ok(())
}

/// Opens `n` clients, `per` to a connection.
async fn clients(
    stub: &SensorStub,
    n: usize,
    per: usize,
) -> anyhow::Result<Vec<pb::sensor_stub_client::SensorStubClient<tonic::transport::Channel>>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let client = stub.client().await?;
        for _ in 0..per.max(1) {
            if out.len() < n {
                out.push(client.clone());
            }
        }
    }
    Ok(out)
}

async fn throughput(args: &Args) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub = SensorStub::start(
        &ws,
        &["--mode", "synthetic", "--speed", "0", "--rate-hz", "1000"],
    )
    .await?;
    let pid = stub.pid().context("stub pid")?;
    let window = Duration::from_secs(args.seconds);
    let start = Instant::now() + Duration::from_millis(500);
    let tasks: Vec<_> = clients(&stub, args.subscribers_max, 1)
        .await?
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut stream = c
                    .stream_imu(pb::StreamImuRequest::default())
                    .await?
                    .into_inner();
                let mut counted = 0u64;
                while let Some(_s) = stream.message().await? {
                    let now = Instant::now();
                    if now >= start + window {
                        break;
                    }
                    if now >= start {
                        counted += 1;
                    }
                }
                Ok::<u64, anyhow::Error>(counted)
            })
        })
        .collect();
    tokio::time::sleep_until((start).into()).await;
    let cpu0 = cpu_time(pid)?;
    tokio::time::sleep(window).await;
    let cpu = cpu_time(pid)? - cpu0;
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    println!(
        "throughput: {} subscribers at --speed 0: {:.0} samples/s served ({:.2} cores of stub CPU)",
        args.subscribers_max,
        total as f64 / window.as_secs_f64(),
        cpu.as_secs_f64() / window.as_secs_f64()
    );
    Ok(())
}

async fn pacing(args: &Args) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let rate = args.rate_hz.to_string();
    let stub = SensorStub::start(&ws, &["--mode", "synthetic", "--rate-hz", &rate]).await?;
    let pid = stub.pid().context("stub pid")?;
    let period = 1.0 / args.rate_hz;
    let warmup = Duration::from_secs(1);
    let window = Duration::from_secs(args.seconds);
    let tasks: Vec<_> = clients(&stub, args.subscribers, args.per_connection)
        .await?
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut stream = c
                    .stream_imu(pb::StreamImuRequest::default())
                    .await?
                    .into_inner();
                let begin = Instant::now();
                let mut jitter_us = Vec::new();
                let mut lost = 0u64;
                let mut last: Option<(Instant, u64)> = None;
                let mut first: Option<(Instant, u64)> = None;
                while let Some(s) = stream.message().await? {
                    let now = Instant::now();
                    let since = now.duration_since(begin);
                    if since > warmup + window {
                        break;
                    }
                    if since > warmup && first.is_none() {
                        first = Some((now, s.seq));
                    }
                    if let Some((at, seq)) = last {
                        if since > warmup {
                            lost += s.seq - seq - 1;
                            let gap = now.duration_since(at).as_secs_f64();
                            jitter_us.push((gap - period).abs() * 1e6);
                        }
                    }
                    last = Some((now, s.seq));
                }
                // Drift: where the last sample arrived against where the rate puts it.
                let drift_us = match (first, last) {
                    (Some((t0, s0)), Some((t1, s1))) => {
                        (t1.duration_since(t0).as_secs_f64() - (s1 - s0) as f64 * period) * 1e6
                    }
                    _ => f64::NAN,
                };
                Ok::<(Vec<f64>, u64, f64), anyhow::Error>((jitter_us, lost, drift_us))
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let cpu0 = cpu_time(pid)?;
    tokio::time::sleep(window).await;
    let cpu = cpu_time(pid)? - cpu0;
    let mut all = Vec::new();
    let mut lost = 0;
    let mut drift = 0.0f64;
    for t in tasks {
        let (j, l, d) = t.await??;
        all.extend(j);
        lost += l;
        drift = drift.max(d.abs());
    }
    all.sort_by(f64::total_cmp);
    let status = stub.status().await?;
    println!(
        "pacing: {} subscribers × {} Hz for {} s: inter-sample jitter p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs over {} gaps; \
         worst drift {:.0} µs; {} samples lost, {} dropped by the stub; stub CPU {:.2} cores (target: p99 ≤ 1000 µs on ≤ 1 core)",
        args.subscribers,
        args.rate_hz,
        args.seconds,
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN),
        all.len(),
        drift,
        lost,
        status.samples_dropped,
        cpu.as_secs_f64() / window.as_secs_f64()
    );
    Ok(())
}
