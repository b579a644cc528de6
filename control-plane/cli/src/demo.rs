//! `aviary demo`: a whole fleet on loopback in one process: fresh PKI, a control plane and
//! N edge daemons with region/tier labels, driven through the real admin API over mTLS:
//! weights drain a region, then a signed sample module is deployed and hot-swapped to its
//! next version as a delta.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::client::Admin;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const MODULE: &str = "gateway";

struct DemoEdge {
    node_id: String,
    region: &'static str,
    local: SocketAddr,
}

/// Runs the demo (see the module docs).
pub(crate) async fn run(
    nodes: usize,
    exit_when_done: bool,
    sample_module: Option<PathBuf>,
) -> anyhow::Result<()> {
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
        // The first node also runs the sample module (one port on this one host).
        let local =
            start_edge(dir.path(), &url, &node_id, region, i == 0, shutdown.clone()).await?;
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
    let imu = start_sensor_stub(shutdown.clone()).await?;
    println!("▸ sensor stub on http://{imu} (synthetic IMU, 100 Hz, seed 7)");
    let sample = deploy_sample(&mut admin, dir.path(), sample_module.clone(), imu).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let reading = loop {
        let r = http_get_path(sample, "/imu").await?;
        if r.starts_with("samples ") {
            break r;
        }
        if Instant::now() > deadline {
            bail!("the sample module read nothing from the sensor stub: {r}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("▸ the sample module reads the stub: GET http://{sample}/imu → {reading}");
    let (bad, good) = canary_demo(&mut admin, dir.path(), sample_module).await?;

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
    println!("  grpcurl -plaintext -d '{{}}' {imu} aviary.sensors.v1.SensorStub/StreamImu");

    if exit_when_done {
        // The demo checks itself: every node must have ended on its expected weight.
        for edge in &edges {
            let view = aviary_edge::local_http::fetch_view(edge.local).await?;
            if view.weights.get(MODULE).copied() != Some(expected(edge)) || !view.connected {
                bail!("demo check failed: {} reports {:?}", edge.node_id, view);
            }
        }
        let serving = http_get_body(sample).await?;
        if serving != "1.1.0" {
            bail!("demo check failed: the sample module serves {serving:?}, not 1.1.0");
        }
        if bad != pb::RolloutState::Aborted as i32 || good != pb::RolloutState::Succeeded as i32 {
            bail!("demo check failed: the bad canary ended {bad}, the good one {good}");
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

/// The sensor stub the sample module reads, in this process (synthetic, 100 Hz).
async fn start_sensor_stub(shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    use clap::Parser;
    let config = aviary_sensors::Args::try_parse_from([
        "aviary-sensors",
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "synthetic",
        "--rate-hz",
        "100",
        "--seed",
        "7",
    ])?
    .resolve()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = aviary_sensors::run(config, shutdown, Some(tx)).await {
            eprintln!("sensor stub: {e}");
        }
    });
    Ok(rx.await?)
}

async fn start_control_plane(
    dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let args = aviary_control_plane::config::Args {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        data_dir: Some(dir.join("control-plane")),
        certs: Some(dir.join("pki")),
        ..Default::default()
    };
    let config = args.resolve()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = aviary_control_plane::run(config, shutdown, Some(tx)).await {
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
    runs_sample: bool,
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
    if runs_sample {
        args.labels.push(("role".into(), "sample".into()));
    }
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
    Ok(admin.all_nodes("", "").await?)
}

async fn set_weight(admin: &mut Admin, weight: u32, selector: &str) -> anyhow::Result<()> {
    let reply = admin.set_weight(MODULE, weight, selector).await?;
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

/// Uploads two signed versions of the sample module, deploys 1.0.0 to the `role=sample`
/// node, then 1.1.0 (a delta, hot-swapped); returns where it serves.
async fn deploy_sample(
    admin: &mut Admin,
    dir: &Path,
    sample_module: Option<PathBuf>,
    imu: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    use aviary_proto::manifest::{Manifest, ProbeSpec, RunSpec};
    let (exe, args) = match sample_module {
        Some(path) => (path, Vec::new()),
        None => (std::env::current_exe()?, vec!["sample-module".to_owned()]),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let run = RunSpec {
        args,
        env: [("SAMPLE_IMU".to_owned(), format!("http://{imu}"))].into(),
        overlay_env: vec!["SAMPLE_GREETING".into()],
        listen: Some(listen.clone()),
        notify: Some(true),
        probes: vec![ProbeSpec {
            http: Some(format!("http://{listen}/healthz")),
            interval: Some("1s".into()),
            ..ProbeSpec::default()
        }],
        ..RunSpec::default()
    };
    let signer = aviary_certs::ReleaseSigner::load(&dir.join("pki/release-signing.key"))?;
    let mut full_size = 0;
    for version in ["1.0.0", "1.1.0"] {
        let file = dir.join(format!("sample-{version}"));
        aviary_sample_module::stamp(&exe, version, &file)?;
        let bytes = std::fs::read(&file)?;
        full_size = bytes.len();
        let manifest = Manifest {
            module: "sample".into(),
            version: version.into(),
            target: aviary_proto::arch::host_target()?.into(),
            sha256: aviary_proto::digest::Sha256::of(&bytes).hex(),
            size: bytes.len() as u64,
            run: Some(run.clone()),
        };
        let manifest_bytes = manifest.to_json();
        let signature = signer.sign(&manifest_bytes);
        crate::release::upload(
            admin,
            &file,
            &manifest,
            manifest_bytes,
            signature,
            Vec::new(),
        )
        .await?;
    }
    println!(
        "\n▸ released sample 1.0.0 and 1.1.0 ({:.1} MB each), manifests signed with the release key",
        full_size as f64 / 1e6
    );
    for version in ["1.0.0", "1.1.0"] {
        println!(
            "$ aviary rollout create --module sample --version {version} --selector role=sample"
        );
        let id = admin
            .rollouts
            .create_rollout(pb::CreateRolloutRequest {
                module: "sample".into(),
                version: version.into(),
                selector: "role=sample".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .id;
        let deadline = Instant::now() + Duration::from_secs(60);
        let r = loop {
            let r = admin
                .rollouts
                .get_rollout(pb::GetRolloutRequest { id: id.clone() })
                .await?
                .into_inner();
            if r.state != pb::RolloutState::Progressing as i32 {
                break r;
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for rollout {id}: {}", r.message);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if r.state != pb::RolloutState::Succeeded as i32 {
            bail!(
                "rollout {} of sample {version} ended {:?}: {}",
                r.id,
                r.state,
                r.message
            );
        }
        let serving = http_get_body(listen.parse()?).await?;
        println!(
            "▸ {} succeeded: gw-01 serves sample {serving} on http://{listen}/",
            r.id
        );
    }
    // What crossed the fleet stream: the payloads the control plane built and cached.
    let payloads = dir.join("control-plane/payloads");
    let mut full = 0;
    let mut delta = 0;
    for entry in std::fs::read_dir(&payloads)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") {
            continue;
        }
        let info: aviary_proto::bundle::PayloadInfo =
            serde_json::from_slice(&std::fs::read(entry.path())?)?;
        match info.encoding {
            aviary_proto::bundle::Encoding::FullZstd => full = full.max(info.size),
            aviary_proto::bundle::Encoding::BsdiffZstd => delta = info.size,
        }
    }
    println!(
        "▸ 1.0.0 went as the full artifact zstd-compressed ({:.1} MB); 1.1.0 as a bsdiff delta of {:.1} KB \
         ({:.2}% of the {:.1} MB artifact), hot-swapped on a shared socket",
        full as f64 / 1e6,
        delta as f64 / 1e3,
        delta as f64 * 100.0 / full_size as f64,
        full_size as f64 / 1e6
    );
    Ok(listen.parse()?)
}

/// A canary rollout of a bad worker version (it logs errors: analysis aborts it), then of
/// a good one that goes all the way. Returns both final states.
async fn canary_demo(
    admin: &mut Admin,
    dir: &Path,
    sample_module: Option<PathBuf>,
) -> anyhow::Result<(i32, i32)> {
    use aviary_proto::manifest::{Manifest, RunSpec};
    let (exe, base) = match sample_module {
        Some(path) => (path, Vec::new()),
        None => (std::env::current_exe()?, vec!["sample-module".to_owned()]),
    };
    let signer = aviary_certs::ReleaseSigner::load(&dir.join("pki/release-signing.key"))?;
    let release = |version: &'static str, extra: &'static [&'static str]| {
        let mut args = base.clone();
        args.push("--idle".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        let file = dir.join(format!("worker-{version}"));
        let run = RunSpec {
            args,
            log_patterns: vec!["ERROR".into()],
            ..RunSpec::default()
        };
        (file, version, run)
    };
    let releases = [
        release("1.0.0", &[]),
        release("2.0.0", &["--log-errors"]),
        release("3.0.0", &[]),
    ];
    for (file, version, run) in &releases {
        aviary_sample_module::stamp(&exe, version, file)?;
        let bytes = std::fs::read(file)?;
        let manifest = Manifest {
            module: "worker".into(),
            version: (*version).into(),
            target: aviary_proto::arch::host_target()?.into(),
            sha256: aviary_proto::digest::Sha256::of(&bytes).hex(),
            size: bytes.len() as u64,
            run: Some(run.clone()),
        };
        let manifest_bytes = manifest.to_json();
        let signature = signer.sign(&manifest_bytes);
        crate::release::upload(
            admin,
            file,
            &manifest,
            manifest_bytes,
            signature,
            Vec::new(),
        )
        .await?;
    }
    println!(
        "\n▸ released worker 1.0.0, 2.0.0 (logs ERROR lines) and 3.0.0, a module on every node"
    );
    let create = |version: &str, steps: Vec<pb::Step>| pb::CreateRolloutRequest {
        module: "worker".into(),
        version: version.into(),
        steps,
        progress_deadline_seconds: 60,
        ..Default::default()
    };
    let step = |kind| pb::Step { kind: Some(kind) };
    let canary = || {
        use pb::step::Kind;
        vec![
            step(Kind::SetCanaryScale(pb::SetCanaryScale { percent: 20 })),
            step(Kind::SetWeight(pb::SetWeight { weight: 10 })),
            step(Kind::Analysis(pb::Analysis {
                window_seconds: 3,
                max_log_matches: 0,
                min_reports: 2,
                failure_limit: 1,
                ..Default::default()
            })),
            step(Kind::SetCanaryScale(pb::SetCanaryScale { percent: 100 })),
        ]
    };
    let mut outcomes = Vec::new();
    for (version, steps, cli) in [
        ("1.0.0", Vec::new(), String::new()),
        ("2.0.0", canary(), " --step canary=20 --step weight=10 --step analysis=3s --max-log-matches 0 --step canary=100".into()),
        ("3.0.0", canary(), " (same steps)".into()),
    ] {
        println!("$ aviary rollout create --module worker --version {version}{cli}");
        let id = admin
            .rollouts
            .create_rollout(create(version, steps))
            .await?
            .into_inner()
            .id;
        let mut stream = admin
            .rollouts
            .watch_rollout(pb::RolloutRef {
                id: id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(90);
        while let Some(r) = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .context("rollout took too long")??
        {
            if !version.starts_with('1') {
                let p = r.progress.unwrap_or_default();
                println!(
                    "    {} step {}/{}  canaries {}/{}  installed {}  {}",
                    crate::output::state_name(r.state),
                    (r.current_step as usize + 1).min(r.steps.len()),
                    r.steps.len(),
                    p.canaries,
                    p.selected,
                    p.installed,
                    r.message.chars().take(110).collect::<String>()
                );
            }
            last = Some(r);
        }
        let r = last.context("no rollout state")?;
        println!("▸ {} ended {}", r.id, crate::output::state_name(r.state));
        outcomes.push(r.state);
    }
    Ok((outcomes[1], outcomes[2]))
}

/// The body of `GET /` at `addr` (the sample module's version), trimmed.
async fn http_get_body(addr: SocketAddr) -> anyhow::Result<String> {
    http_get_path(addr, "/").await
}

/// The body of `GET path` at `addr`, trimmed.
async fn http_get_path(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned())
}
