//! `aviary-fleet-sim`: N simulated edge nodes in one process, each with its own identity
//! (minted in memory from the deployment CA) and its own mTLS connection and fleet stream,
//! speaking the real protocol: Hello, then ACK every weight assignment at once.
//!
//! Reports on stdout, one event per line, for `aviary-fleet-bench` or a person:
//! `ready N` (identities minted), `up IDX UNIX_NS` (stream accepted), `ack IDX REV UNIX_NS`,
//! `err IDX CODE` (stream refused or ended; the node retries with full-jitter backoff).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aviary_edge::backoff::Backoff;
use aviary_edge::link::Link;
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
    let labels = Arc::new(labels);
    let mut nodes = tokio::task::JoinSet::new();
    for (i, id, link) in links {
        nodes.spawn(node(i, id, link, labels.clone(), tx.clone()));
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
    labels: Arc<Vec<(String, String)>>,
    out: mpsc::Sender<String>,
) {
    let label_refs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut applied = 0;
    loop {
        match RawStream::open(&link, hello(&id, &label_refs, applied)).await {
            Ok(mut stream) => {
                backoff.reset();
                let _ = out.send(format!("up {idx} {}", now_ns())).await;
                let ended = loop {
                    match stream.recv().await {
                        Ok(Some(msg)) => {
                            if let Some(pb::control_message::Kind::Weights(w)) = msg.kind {
                                applied = w.revision;
                                if stream.ack(&msg.nonce, w.revision).await.is_err() {
                                    break tonic::Code::Cancelled;
                                }
                                let _ = out
                                    .send(format!("ack {idx} {} {}", w.revision, now_ns()))
                                    .await;
                            }
                        }
                        Ok(None) => break tonic::Code::Ok,
                        Err(status) => break status.code(),
                    }
                };
                let _ = out.send(format!("err {idx} {ended:?}")).await;
            }
            Err(status) => {
                let _ = out.send(format!("err {idx} {:?}", status.code())).await;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
