//! `aviary-identity-bench`: what node identities cost the control plane at fleet size,
//! on a real control plane over real TLS.
//!
//! 1. Enrollment: N gateways enroll with one bootstrap token, each over its own TLS
//!    connection without a client certificate (as a factory line would), C at a time.
//!    Printed: enrollments per second and control-plane CPU per enrollment.
//! 2. Renewal: R of them open fleet streams with their new certificates; once all are
//!    up, each asks for a renewal on its stream. Printed: renewals per second, CPU per
//!    renewal, and what that means for N nodes at a 7-day and a 1-hour TTL (a node
//!    renews at two-thirds of its lifetime: N / (2/3 · TTL) renewals a second).
//!
//! Run by hand: `cargo run --release -p aviary-tests --bin aviary-identity-bench -- --nodes 19000`.
//! `scripts/test` runs `--smoke` (200 nodes) to keep it working.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aviary_certs::{Link, NodeKey};
use aviary_proto::v1 as pb;
use aviary_tests::raw::{hello, RawStream};
use aviary_tests::{cpu_time, ControlPlane, Workspace};
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use tokio::task::JoinSet;

/// Identity benchmarks (see the module docs).
#[derive(Parser, Debug)]
#[command(name = "aviary-identity-bench")]
struct Args {
    /// Gateways that enroll.
    #[arg(long, default_value_t = 19_000)]
    nodes: usize,
    /// Of those, how many renew (each holds a fleet stream).
    #[arg(long, default_value_t = 2_000)]
    renew: usize,
    /// Enrollments (and renewals) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Small and quick (scripts/test).
    #[arg(long)]
    smoke: bool,
}

/// Certificate lifetime on the benchmark's control plane: short, so renewals are allowed
/// (after a sixth of it) soon after enrollment; long enough for the last nodes enrolled
/// (the ones that renew) to open their streams before it ends.
const TTL: Duration = Duration::from_secs(60);

struct Enrolled {
    node: String,
    key: Arc<NodeKey>,
    cert: Vec<u8>,
}

async fn enroll_one(
    url: String,
    roots: Arc<rustls::RootCertStore>,
    node: String,
    token: String,
) -> anyhow::Result<Enrolled> {
    let key = NodeKey::generate()?;
    let csr = key.csr(&node, "aviary.local")?;
    let config = aviary_certs::anonymous_client_config(roots)?;
    let channel = Link::with_config(&url, config)?.connect().await?;
    let answer = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            node_id: node.clone(),
            csr,
            token,
            labels: Default::default(),
        })
        .await?
        .into_inner();
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(answer.certificate_pem.as_bytes())
        .context("no certificate issued")?;
    Ok(Enrolled {
        node,
        key: Arc::new(key),
        cert: cert.as_ref().to_vec(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.nodes = 200;
        args.renew = 100;
    }
    rlimit::increase_nofile_limit(u64::MAX).context("raise the open-files limit")?;
    let ws = Workspace::new()?;
    let ttl = format!("{}s", TTL.as_secs());
    let cp =
        ControlPlane::start(&ws, &["--node-cert-ttl", &ttl, "--enroll-rate", "1000000"]).await?;
    let pid = cp.pid().context("control plane not running")?;
    let mut admin = ws.admin(&cp).await?;
    let token = admin
        .identities
        .create_enroll_token(pb::CreateEnrollTokenRequest {
            labels: [("tier".to_owned(), "bench".to_owned())].into(),
            max_uses: u32::try_from(args.nodes)?,
            ttl_seconds: 3600,
        })
        .await?
        .into_inner()
        .secret;
    let roots = aviary_certs::ca_roots(&ws.pki.ca_cert())?;

    // 1. Enrollment.
    let cpu0 = cpu_time(pid)?;
    let start = Instant::now();
    let mut running = JoinSet::new();
    let mut enrolled = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        if running.len() >= args.concurrency {
            if let Some(r) = running.join_next().await {
                enrolled.push(r??);
            }
        }
        running.spawn(enroll_one(
            cp.url(),
            roots.clone(),
            format!("gw-{i:05}"),
            token.clone(),
        ));
    }
    while let Some(r) = running.join_next().await {
        enrolled.push(r??);
    }
    let took = start.elapsed();
    let cpu = cpu_time(pid)?.saturating_sub(cpu0);
    let issued_by = Instant::now();
    println!(
        "identity bench: {} nodes, {} at a time",
        args.nodes, args.concurrency
    );
    println!(
        "  enrollment (token, one TLS connection each): {:.0} /s, {:.2} ms control-plane CPU each ({:.1} s for all)",
        args.nodes as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / args.nodes as f64,
        took.as_secs_f64()
    );

    // 2. Renewal: streams first, then one renewal on each.
    let mut streams = Vec::with_capacity(args.renew);
    // The last ones enrolled: their certificates are the freshest.
    for e in enrolled.iter().rev().take(args.renew) {
        let config = aviary_certs::client_config_with(
            roots.clone(),
            vec![rustls::pki_types::CertificateDer::from(e.cert.clone())],
            e.key.tls_key(),
        )?;
        let link = Link::with_config(&cp.url(), config)?;
        let stream = RawStream::open(&link, hello(&e.node, &[], 0))
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", e.node, s.message()))?;
        streams.push((e.node.clone(), e.key.clone(), stream));
    }
    // Renewal opens a sixth into the certificate's life.
    let wait = (TTL / 6 + Duration::from_millis(500)).saturating_sub(issued_by.elapsed());
    tokio::time::sleep(wait).await;
    let cpu0 = cpu_time(pid)?;
    let start = Instant::now();
    let mut running = JoinSet::new();
    for (node, key, mut stream) in streams {
        running.spawn(async move {
            let csr = key.csr(&node, "aviary.local")?;
            stream
                .send(pb::edge_message::Kind::Renew(pb::CertificateRequest {
                    csr,
                }))
                .await?;
            loop {
                match stream.next(Duration::from_secs(60)).await? {
                    Some(pb::ControlMessage {
                        kind: Some(pb::control_message::Kind::Certificate(c)),
                        ..
                    }) => {
                        anyhow::ensure!(c.refused.is_empty(), "{node}: {}", c.refused);
                        return Ok::<_, anyhow::Error>(stream);
                    }
                    Some(_) => {}
                    None => anyhow::bail!("{node}: no certificate within 60 s"),
                }
            }
        });
    }
    let mut done = Vec::new();
    while let Some(r) = running.join_next().await {
        done.push(r??);
    }
    let took = start.elapsed();
    let cpu = cpu_time(pid)?.saturating_sub(cpu0);
    let per = cpu.as_secs_f64() / args.renew as f64;
    println!(
        "  renewal on the stream: {:.0} /s, {:.2} ms control-plane CPU each ({} streams)",
        args.renew as f64 / took.as_secs_f64(),
        per * 1000.0,
        args.renew
    );
    for (name, ttl) in [("7d", 7.0 * 86_400.0), ("1h", 3_600.0)] {
        let rate = args.nodes as f64 / (ttl * 2.0 / 3.0);
        println!(
            "  at {} nodes, TTL {name}: {rate:.2} renewals/s, {:.3}% of one core",
            args.nodes,
            rate * per * 100.0
        );
    }
    drop(done);
    Ok(())
}
