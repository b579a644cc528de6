//! `aviary-fleet-sim`: N simulated edge nodes in one process, each with its own identity
//! (minted in memory from the deployment CA) and its own mTLS connection and fleet stream,
//! speaking the real protocol: Hello; ACK every weight assignment and config at once;
//! receive module payloads chunk by chunk (edge-paced, as a daemon does) and ACK them
//! without running anything; roll back to the previous version when told; and, once a
//! module is installed, send a health report every `--health-interval` (probe failures
//! when it runs `--bad-version`).
//!
//! Reports on stdout, one event per line, for the benchmarks or a person:
//! `ready N` (identities minted), `up IDX UNIX_NS` (stream accepted), `ack IDX REV UNIX_NS`
//! (weights), `mod IDX VERSION ROLLBACK(0|1) UNIX_NS` (module update ACKed),
//! `err IDX CODE` (stream refused or ended; the node retries with full-jitter backoff).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aviary_certs::Link;
use aviary_edge::backoff::Backoff;
use aviary_proto::resource::Resource;
use aviary_proto::v1 as pb;
use aviary_tests::raw::{hello, RawStream};
use clap::Parser;
use tokio::sync::mpsc;

/// Simulates a fleet of edge nodes against a control plane.
#[derive(Parser, Debug)]
#[command(name = "aviary-fleet-sim")]
struct Args {
    /// Control plane URL.
    #[arg(long)]
    control_plane: String,
    /// PKI directory with ca.pem and ca.key (identities are minted in memory).
    #[arg(long)]
    certs: PathBuf,
    /// Number of nodes in this process.
    #[arg(long)]
    nodes: usize,
    /// Index of the first node (node ids are PREFIX + index).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Node id prefix.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Spread connections over this many source addresses 127.0.0.2, 127.0.0.3, ...
    #[arg(long, default_value_t = 8)]
    source_ips: u8,
    /// HTTP/2 keepalive interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    keepalive: Duration,
    /// Node label k=v (repeatable) sent in every Hello.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Health report interval of nodes with an installed module; nodes without one send
    /// an empty report every 10 intervals (0 = none).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    health_interval: Duration,
    /// Nodes running this version report failing probes.
    #[arg(long)]
    bad_version: Option<String>,
}

/// How a simulated node behaves, shared by all of them.
struct Behaviour {
    labels: Vec<(String, String)>,
    health_interval: Duration,
    bad_version: Option<String>,
}

/// One installed version.
#[derive(Clone)]
struct Installed {
    version: String,
    sha256: String,
}

/// What a simulated node keeps across its streams.
#[derive(Default)]
struct NodeState {
    weights: u64,
    /// module -> (current, previous, applied revision).
    modules: BTreeMap<String, (Installed, Option<Installed>, u64)>,
}

/// A payload being received.
struct Receiving {
    nonce: String,
    revision: u64,
    module: String,
    transfer_id: String,
    to: Installed,
    offset: u64,
    size: u64,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One fd per node plus a few: take the whole hard limit.
    rlimit::increase_nofile_limit(u64::MAX).context("raise the open-files limit")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let minter = aviary_certs::EdgeMinter::open(&args.certs)?;
    let roots = aviary_certs::ca_roots(&args.certs.join("ca.pem"))?;
    let labels: Vec<(String, String)> = args
        .labels
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let mut links = Vec::with_capacity(args.nodes);
    for i in args.first..args.first + args.nodes {
        let id = format!("{}{i}", args.prefix);
        let (cert, key) = minter.mint(&id)?;
        let key = rustls::pki_types::PrivateKeyDer::try_from(key).map_err(anyhow::Error::msg)?;
        let config = aviary_certs::client_config_with(roots.clone(), vec![cert.into()], key)?;
        let ip = Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % usize::from(args.source_ips.max(1))) as u8,
        );
        let link = Link::with_config(&args.control_plane, config)?
            .keepalive(args.keepalive)
            .bind(IpAddr::V4(ip));
        links.push((i, id, link));
    }

    let (tx, mut rx) = mpsc::channel::<String>(4096);
    let writer = tokio::task::spawn_blocking(move || {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        while let Some(line) = rx.blocking_recv() {
            let _ = writeln!(out, "{line}");
            if rx.is_empty() {
                let _ = out.flush();
            }
        }
    });
    tx.send(format!("ready {}", links.len())).await?;
    let behaviour = Arc::new(Behaviour {
        labels,
        health_interval: args.health_interval,
        bad_version: args.bad_version.clone(),
    });
    let mut nodes = tokio::task::JoinSet::new();
    for (i, id, link) in links {
        nodes.spawn(node(i, id, link, behaviour.clone(), tx.clone()));
    }
    drop(tx);
    while nodes.join_next().await.is_some() {}
    let _ = writer.await;
    Ok(())
}

async fn node(
    idx: usize,
    id: String,
    link: Link,
    behaviour: Arc<Behaviour>,
    out: mpsc::Sender<String>,
) {
    let label_refs: Vec<(&str, &str)> = behaviour
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut state = NodeState::default();
    loop {
        let mut hello = hello(&id, &label_refs, state.weights);
        for (name, (current, previous, revision)) in &state.modules {
            for (slot, m) in [("current", Some(current)), ("previous", previous.as_ref())] {
                let Some(m) = m else { continue };
                hello.modules.push(pb::ModuleStatus {
                    name: name.clone(),
                    version: m.version.clone(),
                    sha256: m.sha256.clone(),
                    state: pb::ModuleState::Installed as i32,
                    slot: slot.into(),
                    ..Default::default()
                });
            }
            hello.applied.push(pb::AppliedRevision {
                resource: Resource::Module(name.clone()).to_string(),
                revision: *revision,
            });
        }
        match RawStream::open(&link, hello).await {
            Ok(mut stream) => {
                backoff.reset();
                let _ = out.send(format!("up {idx} {}", now_ns())).await;
                let ended = serve(idx, &mut stream, &mut state, &behaviour, &out).await;
                let _ = out.send(format!("err {idx} {ended:?}")).await;
            }
            Err(status) => {
                let _ = out.send(format!("err {idx} {:?}", status.code())).await;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Answers one stream until it ends; returns how it ended.
async fn serve(
    idx: usize,
    stream: &mut RawStream,
    state: &mut NodeState,
    behaviour: &Behaviour,
    out: &mpsc::Sender<String>,
) -> tonic::Code {
    use pb::control_message::Kind;
    let mut receiving: Option<Receiving> = None;
    // Spread the fleet's reports over the interval rather than all on one tick.
    let every = behaviour.health_interval;
    let first = every.mul_f64(fastrand::f64());
    let mut health = tokio::time::interval_at(
        tokio::time::Instant::now() + first,
        every.max(Duration::from_millis(10)),
    );
    let mut ticks = 0u64;
    loop {
        let msg = tokio::select! {
            msg = stream.recv() => msg,
            _ = health.tick(), if !every.is_zero() => {
                ticks += 1;
                // As the daemon: with no module, an empty report every 10th tick is
                // the heartbeat.
                if state.modules.is_empty() && !ticks.is_multiple_of(10) {
                    continue;
                }
                if stream.send(pb::edge_message::Kind::Health(report(state, behaviour))).await.is_err() {
                    return tonic::Code::Cancelled;
                }
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => return tonic::Code::Ok,
            Err(status) => return status.code(),
        };
        let sent = match msg.kind {
            Some(Kind::Weights(w)) => {
                state.weights = w.revision;
                let r = stream.ack(&msg.nonce, w.revision).await;
                let _ = out
                    .send(format!("ack {idx} {} {}", w.revision, now_ns()))
                    .await;
                r
            }
            Some(Kind::Config(c)) => stream.ack(&msg.nonce, c.revision).await,
            Some(Kind::ModuleUpdate(u)) if u.rollback => {
                let Some((current, previous, revision)) = state.modules.get_mut(&u.module) else {
                    let r = stream
                        .nack(&msg.nonce, u.revision, "nothing to roll back to")
                        .await;
                    if r.is_err() {
                        return tonic::Code::Cancelled;
                    }
                    continue;
                };
                if let Some(prev) = previous.take() {
                    *previous = Some(std::mem::replace(current, prev));
                }
                *revision = u.revision;
                let version = current.version.clone();
                let r = stream.ack(&msg.nonce, u.revision).await;
                let _ = out
                    .send(format!("mod {idx} {version} 1 {}", now_ns()))
                    .await;
                r
            }
            Some(Kind::ModuleUpdate(u)) => {
                let payload = u.payload.unwrap_or_default();
                let Some(sha256) = std::str::from_utf8(&u.manifest)
                    .ok()
                    .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                    .and_then(|m| m["sha256"].as_str().map(str::to_owned))
                else {
                    let r = stream
                        .nack(&msg.nonce, u.revision, "manifest without sha256")
                        .await;
                    if r.is_err() {
                        return tonic::Code::Cancelled;
                    }
                    continue;
                };
                let r = receiving.insert(Receiving {
                    nonce: msg.nonce,
                    revision: u.revision,
                    module: u.module,
                    transfer_id: u.transfer_id,
                    to: Installed {
                        version: u.to_version,
                        sha256,
                    },
                    offset: 0,
                    size: payload.size,
                });
                stream.send(progress(r)).await
            }
            Some(Kind::Chunk(c)) => {
                let Some(r) = receiving
                    .as_mut()
                    .filter(|r| r.transfer_id == c.transfer_id)
                else {
                    continue;
                };
                r.offset = c.offset + c.data.len() as u64;
                if r.offset < r.size {
                    stream.send(progress(r)).await
                } else {
                    let Some(r) = receiving.take() else { continue };
                    let sent = stream.send(progress(&r)).await;
                    let previous = state.modules.remove(&r.module).map(|(current, ..)| current);
                    let version = r.to.version.clone();
                    state.modules.insert(r.module, (r.to, previous, r.revision));
                    let acked = sent.and(stream.ack(&r.nonce, r.revision).await);
                    let _ = out
                        .send(format!("mod {idx} {version} 0 {}", now_ns()))
                        .await;
                    acked
                }
            }
            Some(Kind::AbortTransfer(a)) => {
                if receiving
                    .as_ref()
                    .is_some_and(|r| r.transfer_id == a.transfer_id)
                {
                    receiving = None;
                }
                Ok(())
            }
            // The simulator's certificates are minted in memory and never renewed.
            Some(Kind::Certificate(_) | Kind::TrustBundle(_)) | None => Ok(()),
        };
        if sent.is_err() {
            return tonic::Code::Cancelled;
        }
    }
}

fn progress(r: &Receiving) -> pb::edge_message::Kind {
    pb::edge_message::Kind::Progress(pb::TransferProgress {
        transfer_id: r.transfer_id.clone(),
        module: r.module.clone(),
        offset: r.offset,
        size: r.size,
    })
}

/// Health of every installed module over the last interval, as a daemon reports it.
fn report(state: &NodeState, behaviour: &Behaviour) -> pb::HealthReport {
    pb::HealthReport {
        modules: state
            .modules
            .iter()
            .map(|(name, (current, ..))| {
                let bad = behaviour.bad_version.as_deref() == Some(current.version.as_str());
                pb::ModuleHealth {
                    module: name.clone(),
                    probe_successes: if bad { 0 } else { 5 },
                    probe_failures: if bad { 5 } else { 0 },
                    latency_p50_ms: 1.5,
                    latency_p99_ms: 4.0,
                    process_state: "running".into(),
                    restarts: 0,
                    log_matches: 0,
                    slot: "current".into(),
                    version: current.version.clone(),
                    detail: if bad {
                        "HTTP failing: 500".into()
                    } else {
                        String::new()
                    },
                }
            })
            .collect(),
    }
}
