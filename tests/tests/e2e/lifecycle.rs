//! Connections over time: keepalive, draining, stream age, systemd readiness.

use std::time::{Duration, Instant};

use aviary_proto::v1 as pb;
use aviary_tests::proxy::{Mode, Proxy};
use aviary_tests::raw::{hello, RawStream};
use aviary_tests::{bin, eventually, ControlPlane, Daemon, Edge, Fleet, Workspace};

async fn connected(ws: &Workspace, cp: &ControlPlane, id: &str) -> anyhow::Result<bool> {
    let node = ws
        .admin(cp)
        .await?
        .nodes
        .get_node(pb::GetNodeRequest { node_id: id.into() })
        .await?;
    Ok(node.get_ref().connected)
}

#[tokio::test]
async fn a_silent_peer_is_dropped_within_three_keepalive_intervals_on_both_sides(
) -> anyhow::Result<()> {
    let interval = Duration::from_millis(400);
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--keepalive", "400ms"]).await?;
    let proxy = Proxy::start(cp.addr).await?;
    let edge = Edge::start_via(
        &ws,
        &format!("https://{}", proxy.addr),
        "gw-1",
        &[],
        &["--keepalive", "400ms"],
    )
    .await?;
    eventually(Duration::from_secs(10), "gw-1 connected", || async {
        Ok(connected(&ws, &cp, "gw-1").await?.then_some(()))
    })
    .await?;

    proxy.set(Mode::Freeze);
    let frozen = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the control plane to drop the silent edge",
        || async { Ok((!connected(&ws, &cp, "gw-1").await?).then_some(())) },
    )
    .await?;
    let cp_noticed = frozen.elapsed();
    eventually(
        Duration::from_secs(10),
        "the edge to notice the silent control plane",
        || async { Ok((!edge.view().await?.connected).then_some(())) },
    )
    .await?;
    let edge_noticed = frozen.elapsed();
    // Three intervals, plus the polling and scheduling slack of a shared machine.
    let bound = interval * 3 + Duration::from_millis(700);
    assert!(cp_noticed <= bound, "control plane took {cp_noticed:?}");
    assert!(edge_noticed <= bound, "edge took {edge_noticed:?}");

    proxy.set(Mode::Pass);
    eventually(Duration::from_secs(20), "gw-1 to reconnect", || async {
        Ok((edge.view().await?.connected && connected(&ws, &cp, "gw-1").await?).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_the_control_plane_and_stops_the_daemon_cleanly() -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-raw")?;
    let mut stream = RawStream::open(&link, hello("gw-raw", &[], 0)).await?;
    let mut edge = Edge::start(&ws, &cp, "gw-1", &[], &[]).await?;
    eventually(Duration::from_secs(10), "gw-1 connected", || async {
        Ok(connected(&ws, &cp, "gw-1").await?.then_some(()))
    })
    .await?;

    let status = cp.terminate().await?;
    assert!(
        status.success(),
        "control plane exit: {status:?}\n{}",
        cp.log()
    );
    let end = stream.end(Duration::from_secs(5)).await?;
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"));

    let status = edge.terminate().await?;
    assert!(status.success(), "edge exit: {status:?}\n{}", edge.log());
    assert!(
        !edge.file_view()?.connected,
        "the daemon records that it is offline"
    );
    Ok(())
}

#[tokio::test]
async fn streams_are_recycled_at_their_maximum_age_and_the_edge_comes_straight_back(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--max-stream-age", "1s"]).await?;
    let link = ws.edge_link(&cp, "gw-raw")?;
    let mut stream = RawStream::open(&link, hello("gw-raw", &[], 0)).await?;
    let opened = Instant::now();
    let end = stream.end(Duration::from_secs(5)).await?;
    let age = opened.elapsed();
    assert_eq!(end.code(), tonic::Code::Ok);
    assert!(
        age >= Duration::from_millis(850) && age <= Duration::from_millis(1600),
        "age {age:?}"
    );

    let edge = Edge::start(&ws, &cp, "gw-1", &[], &[]).await?;
    eventually(
        Duration::from_secs(15),
        "the edge to be recycled and reconnect several times",
        || async { Ok((cp.metric("aviary_streams_admitted_total").await? >= 5.0).then_some(())) },
    )
    .await?;
    assert!(edge.view().await?.connected || connected(&ws, &cp, "gw-1").await?);
    Ok(())
}

#[tokio::test]
async fn the_daemon_tells_systemd_it_is_ready_and_feeds_the_watchdog() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    ws.edge_cert("gw-1")?;
    let socket_path = ws.path("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path)?;
    // systemd sets WATCHDOG_PID to the main process; `exec` keeps the shell's pid.
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(bin("aviary-edge")?)
        .args(["--control-plane", &cp.url(), "--certs"])
        .arg(&ws.pki.dir)
        .args(["--node-id", "gw-1", "--state-dir"])
        .arg(ws.path("edge-gw-1"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        let mut buf = [0u8; 512];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, socket.recv(&mut buf)).await??;
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    child.kill().await?;
    Ok(())
}
