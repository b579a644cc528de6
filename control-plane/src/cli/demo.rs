//! `aviary demo`: a whole fleet on loopback in one process: fresh PKI, a control plane and
//! N edge daemons with region/tier labels, driven through the real admin API over mTLS.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::client::Admin;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const MODULE: &str = "gateway";

struct DemoEdge {
    node_id: String,
    region: &'static str,
    local: SocketAddr,
}

/// Runs the demo (see the module docs).
pub(crate) async fn run(nodes: usize, exit_when_done: bool) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 200 {
        bail!("--nodes must be between 1 and 200");
    }
    let dir = tempfile::Builder::new().prefix("aviary-demo-").tempdir()?;
    let pki_dir = dir.path().join("pki");
    let pki = aviary_certs::Pki::init(&pki_dir, &aviary_certs::InitOptions::default())?;
    println!(
        "▸ PKI for trust domain {} in {}",
        pki.trust_domain,
        pki_dir.display()
    );

    let shutdown = CancellationToken::new();
    let addr = start_control_plane(dir.path(), shutdown.clone()).await?;
    let url = format!("https://{addr}");
    println!("▸ control plane on {url} (mTLS, TLS 1.3)");

    let mut edges = Vec::new();
    for i in 0..nodes {
        let node_id = format!("gw-{:02}", i + 1);
        aviary_certs::issue_edge(&pki_dir, &node_id)?;
        let region = REGIONS[i % REGIONS.len()];
        let local = start_edge(dir.path(), &url, &node_id, region, shutdown.clone()).await?;
        edges.push(DemoEdge {
            node_id,
            region,
            local,
        });
    }
    println!(
        "▸ {nodes} edge daemons started in regions {}",
        REGIONS.join(", ")
    );

    let mut admin = Admin::connect(&url, &pki_dir, "admin").await?;
    wait_for("every daemon to connect", || async {
        let nodes = admin_nodes(&url, &pki_dir).await?;
        Ok(nodes.iter().filter(|n| n.connected).count() == edges.len())
    })
    .await?;

    set_weight(&mut admin, 100, "").await?;
    converge(&edges, |_| 100).await?;
    println!("▸ {MODULE} weight 100 everywhere: every daemon reports it");

    set_weight(&mut admin, 0, "region=eu-west").await?;
    let expected = |e: &DemoEdge| if e.region == "eu-west" { 0 } else { 100 };
    let elapsed = converge(&edges, expected).await?;
    println!(
        "▸ drained region eu-west: converged on every daemon in {} ms\n",
        elapsed.as_millis()
    );

    println!(
        "{:<8} {:<10} {:>7} {:>9}  (as each daemon serves it on GET /v1/weights)",
        "NODE", "REGION", "WEIGHT", "REVISION"
    );
    for edge in &edges {
        let view = aviary_edge::local_http::fetch_view(edge.local).await?;
        println!(
            "{:<8} {:<10} {:>7} {:>9}",
            edge.node_id,
            edge.region,
            view.weights.get(MODULE).copied().unwrap_or_default(),
            view.revision
        );
    }
    let events = admin
        .audit
        .list_events(pb::ListEventsRequest::default())
        .await?
        .into_inner()
        .events;
    println!("\n▸ audit log: {} events, the last:", events.len());
    for e in events.iter().rev().take(2).rev() {
        println!(
            "  #{} {} {} {} {}",
            e.seq, e.actor, e.action, e.target, e.detail
        );
    }
    let p = pki_dir.display();
    println!("\nExplore the running fleet:");
    println!("  grpcurl -cacert {p}/ca.pem -cert {p}/admin.pem -key {p}/admin.key {addr} list");
    println!("  grpcurl -cacert {p}/ca.pem -cert {p}/admin.pem -key {p}/admin.key {addr} aviary.v1.Nodes/ListNodes");
    println!("  aviary --control-plane {url} --certs {p} nodes list");

    if exit_when_done {
        // The demo checks itself: every node must have ended on its expected weight.
        for edge in &edges {
            let view = aviary_edge::local_http::fetch_view(edge.local).await?;
            if view.weights.get(MODULE).copied() != Some(expected(edge)) || !view.connected {
                bail!("demo check failed: {} reports {:?}", edge.node_id, view);
            }
        }
        println!("\ndemo OK");
    } else {
        println!("\nServing until Ctrl-C.");
        tokio::signal::ctrl_c().await?;
    }
    shutdown.cancel();
    // Give the daemons a moment to close their streams before the temp dir goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

async fn start_control_plane(
    dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let args = crate::config::Args {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        data_dir: Some(dir.join("control-plane")),
        certs: Some(dir.join("pki")),
        ..Default::default()
    };
    let config = args.resolve()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = crate::run(config, shutdown, Some(tx)).await {
            eprintln!("control plane: {e}");
        }
    });
    rx.await.context("the control plane did not start")
}

async fn start_edge(
    dir: &Path,
    url: &str,
    node_id: &str,
    region: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let mut args = aviary_edge::config::Args {
        control_plane: Some(url.to_owned()),
        certs: Some(dir.join("pki")),
        node_id: Some(node_id.to_owned()),
        state_dir: Some(dir.join("edges").join(node_id)),
        local_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Default::default()
    };
    args.labels = vec![
        ("region".into(), region.into()),
        ("tier".into(), "edge".into()),
    ];
    let config = args.resolve()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let id = node_id.to_owned();
    tokio::spawn(async move {
        if let Err(e) = aviary_edge::run(config, shutdown, Some(tx)).await {
            eprintln!("edge {id}: {e}");
        }
    });
    rx.await
        .context("an edge daemon did not start")?
        .local_addr
        .context("edge without a local port")
}

async fn admin_nodes(url: &str, pki: &Path) -> anyhow::Result<Vec<pb::Node>> {
    let mut admin = Admin::connect(url, pki, "admin").await?;
    Ok(admin
        .nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes)
}

async fn set_weight(admin: &mut Admin, weight: u32, selector: &str) -> anyhow::Result<()> {
    let reply = admin
        .nodes
        .set_weight(pb::SetWeightRequest {
            module: MODULE.into(),
            weight,
            selector: selector.into(),
        })
        .await?
        .into_inner();
    let scope = if selector.is_empty() {
        "all nodes"
    } else {
        selector
    };
    println!("$ aviary nodes set-weight --module {MODULE} --weight {weight} --selector '{selector}'   # {scope}: {} node(s)", reply.node_ids.len());
    Ok(())
}

/// Waits until every daemon serves its expected weight; returns how long it took.
async fn converge(
    edges: &[DemoEdge],
    expected: impl Fn(&DemoEdge) -> u32,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait_for("weights to converge", || async {
        for edge in edges {
            let view = aviary_edge::local_http::fetch_view(edge.local).await?;
            if view.weights.get(MODULE).copied() != Some(expected(edge)) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    Ok(start.elapsed())
}

async fn wait_for<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
