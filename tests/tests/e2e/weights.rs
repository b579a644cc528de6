//! Weights from an admin's SetWeight to every daemon's file and local HTTP port.

use std::time::Duration;

use aviary_proto::v1 as pb;
use aviary_tests::{bin, eventually, ControlPlane, Daemon, Edge, Fleet, Workspace};

/// Waits for `edge`'s gateway weight to fall to 0, then samples it for `hold` (several
/// TTLs): it must stay 0, disconnected, with the same expiry, however often the daemon
/// retries. Only contact with a control plane restarts the TTL, never a failed reconnect.
async fn stays_safe(edge: &Edge, hold: Duration) -> anyhow::Result<()> {
    let zero = edge.wait_weight("gateway", 0).await?;
    assert!(!zero.connected);
    let until = tokio::time::Instant::now() + hold;
    let mut samples = 0;
    while tokio::time::Instant::now() < until {
        let v = edge.view().await?;
        assert_eq!(
            (v.weights.get("gateway"), v.connected, &v.expires_at),
            (Some(&0), false, &zero.expires_at),
            "weights came back or the TTL restarted without contact"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(samples > 20, "only {samples} samples in {hold:?}");
    Ok(())
}

/// Waits for `edge`'s gateway weight to return to `weight`: after seconds of failed
/// attempts the daemon's full-jitter backoff may be near its 30 s cap.
async fn back_on(edge: &Edge, weight: u32) -> anyhow::Result<aviary_edge::weights::View> {
    eventually(Duration::from_secs(60), "the weights to return", || async {
        let v = edge.view().await?;
        Ok((v.weights.get("gateway") == Some(&weight)).then_some(v))
    })
    .await
}

/// gw-1 and gw-2 in region eu, gw-3 in us, all three connected.
async fn two_regions(ws: &Workspace, cp: &ControlPlane) -> anyhow::Result<[Edge; 3]> {
    let edges = [
        Edge::start(ws, cp, "gw-1", &[("region", "eu")], &[]).await?,
        Edge::start(ws, cp, "gw-2", &[("region", "eu")], &[]).await?,
        Edge::start(ws, cp, "gw-3", &[("region", "us")], &[]).await?,
    ];
    for e in &edges {
        cp.wait_node(ws, &e.node_id, "connected", |n| n.connected)
            .await?;
    }
    Ok(edges)
}

#[tokio::test]
async fn set_weight_reaches_every_daemon_and_the_audit_log_names_who() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    aviary_certs::issue_admin(&ws.pki.dir, "alice", aviary_certs::LONG_LIVED)?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let edges = two_regions(&ws, &cp).await?;
    let mut admin = ws.admin(&cp).await?;

    // Through the real CLI binary, as operator alice.
    let cli = |args: &[&str]| {
        std::process::Command::new(bin("aviary")?)
            .args([
                "--control-plane",
                &cp.url(),
                "--certs",
                &ws.pki.dir.display().to_string(),
                "--admin",
                "alice",
            ])
            .args(args)
            .output()
            .map_err(anyhow::Error::from)
    };
    let out = cli(&[
        "nodes",
        "set-weight",
        "--module",
        "gateway",
        "--weight",
        "30",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for edge in &edges {
        let view = edge.wait_weight("gateway", 30).await?;
        assert!(view.connected);
    }
    let out = cli(&[
        "nodes",
        "set-weight",
        "--module",
        "gateway",
        "--weight",
        "0",
        "--selector",
        "region=eu",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    edges[0].wait_weight("gateway", 0).await?;
    edges[1].wait_weight("gateway", 0).await?;
    let us = edges[2].wait_weight("gateway", 30).await?;

    // Set-based selectors list the same nodes through the API.
    for (selector, want) in [
        ("region in (us)", vec!["gw-3"]),
        ("region notin (us)", vec!["gw-1", "gw-2"]),
        ("region", vec!["gw-1", "gw-2", "gw-3"]),
        ("!region", vec![]),
    ] {
        let ids: Vec<String> = admin
            .all_nodes(selector, "")
            .await?
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(ids, want, "{selector}");
    }

    let node = admin.node("gw-3").await?;
    assert_eq!(node.weights.get("gateway"), Some(&30));
    assert_eq!(node.desired_revision, us.revision);
    eventually(Duration::from_secs(5), "gw-3's ACK", || async {
        let node = admin
            .nodes
            .clone()
            .get_node(pb::GetNodeRequest {
                node_id: "gw-3".into(),
            })
            .await?
            .into_inner();
        Ok((node.acked_revision == us.revision).then_some(()))
    })
    .await?;

    let events = admin
        .audit
        .list_events(pb::ListEventsRequest {
            filter: Some(pb::EventFilter {
                action: "nodes.set_weight".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| e.actor == "admin/alice" && e.target == "module/gateway"));
    assert!(
        events[1].detail.contains("selector=\"region=eu\"")
            && events[1].detail.contains("matched=2")
    );

    // The JSON output is for scripts: it parses and carries the same state.
    let out = cli(&["-o", "json", "nodes", "list", "--selector", "region=eu"])?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed["nodes"].as_array().map(Vec::len), Some(2));
    assert_eq!(listed["nodes"][0]["weights"]["gateway"], 0);
    Ok(())
}

#[tokio::test]
async fn daemon_restart_keeps_its_weights_even_without_a_control_plane() -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let mut edge = Edge::start(&ws, &cp, "gw-1", &[], &[]).await?;
    let mut admin = ws.admin(&cp).await?;
    cp.wait_node(&ws, "gw-1", "connected", |n| n.connected)
        .await?;
    admin.set_weight("gateway", 55, "").await?;
    let before = edge.wait_weight("gateway", 55).await?;

    cp.kill9().await?;
    edge.kill9().await?;
    edge.restart().await?;
    let after = edge.view().await?;
    assert_eq!(after.weights, before.weights);
    assert_eq!(after.revision, before.revision);
    assert!(!after.connected);
    assert!(
        after.expires_at.is_some(),
        "a disconnected daemon says when its weights expire"
    );
    Ok(())
}

#[tokio::test]
async fn weights_fall_to_zero_after_their_ttl_and_return_with_the_control_plane(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let mut cp = ControlPlane::start(&ws, &["--weight-ttl", "2s", "--keepalive", "500ms"]).await?;
    let edge = Edge::start(&ws, &cp, "gw-1", &[], &["--keepalive", "500ms"]).await?;
    let mut admin = ws.admin(&cp).await?;
    cp.wait_node(&ws, "gw-1", "connected", |n| n.connected)
        .await?;
    admin.set_weight("gateway", 40, "").await?;
    edge.wait_weight("gateway", 40).await?;

    cp.kill9().await?;
    // Kept while within the TTL...
    let held = eventually(
        Duration::from_secs(5),
        "the daemon to notice the outage",
        || async {
            let v = edge.view().await?;
            Ok((!v.connected).then_some(v))
        },
    )
    .await?;
    assert_eq!(held.weights.get("gateway"), Some(&40));
    // ...then fail safe, and stay safe however often the daemon retries: only contact
    // with a control plane restarts the TTL, never a failed reconnect.
    stays_safe(&edge, Duration::from_secs(8)).await?;

    cp.restart().await?;
    let back = back_on(&edge, 40).await?;
    assert!(back.connected);
    assert_eq!(back.revision, held.revision);
    Ok(())
}

#[tokio::test]
async fn watch_weights_streams_the_matching_nodes_as_their_weights_change() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let _edges = two_regions(&ws, &cp).await?;
    let mut admin = ws.admin(&cp).await?;
    // An upstream load balancer for region eu watches its nodes.
    let mut watch = admin
        .nodes
        .watch_weights(pb::WatchWeightsRequest {
            selector: "region=eu".into(),
        })
        .await?
        .into_inner();
    for (weight, selector) in [(40, ""), (5, "region=eu"), (70, "region=us")] {
        admin.set_weight("gateway", weight, selector).await?;
    }
    // Snapshot first, then every change; only eu nodes, and they end on 5.
    let mut last = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while last.len() < 2 || last.values().any(|w| *w != Some(5)) {
        let update = tokio::time::timeout_at(deadline, watch.message())
            .await
            .map_err(|_| anyhow::anyhow!("no weight 5 for both eu nodes; saw {last:?}"))??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        assert_ne!(update.node_id, "gw-3", "a us node reached an eu watch");
        last.insert(
            update.node_id.clone(),
            update.weights.get("gateway").copied(),
        );
    }
    assert_eq!(last.keys().collect::<Vec<_>>(), ["gw-1", "gw-2"]);
    Ok(())
}

/// Issue 11, items 2 and 9: a network that goes silent (a blackhole, not a dead control
/// plane) ends in fail-safe weights too, counted from the last contact, and they stay 0
/// however the daemon retries until the path comes back; a long path (latency) delivers.
#[tokio::test]
async fn weights_fail_safe_behind_a_blackholed_network_and_return_through_a_slow_one(
) -> anyhow::Result<()> {
    use aviary_tests::proxy::{Mode, Proxy};
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--weight-ttl", "2s", "--keepalive", "500ms"]).await?;
    let proxy = Proxy::start(cp.addr).await?;
    proxy.set(Mode::Latency(Duration::from_millis(150)));
    let url = format!("https://localhost:{}", proxy.addr.port());
    let edge = Edge::start_via(&ws, &url, "gw-1", &[], &["--keepalive", "500ms"]).await?;
    let mut admin = ws.admin(&cp).await?;
    cp.wait_node(&ws, "gw-1", "connected", |n| n.connected)
        .await?;
    admin.set_weight("gateway", 40, "").await?;
    let before = edge.wait_weight("gateway", 40).await?;

    proxy.set(Mode::Freeze);
    stays_safe(&edge, Duration::from_secs(6)).await?;

    // The path comes back slow: the daemon reconnects through it and the weights return.
    proxy.set(Mode::Latency(Duration::from_millis(150)));
    proxy.cut();
    let back = back_on(&edge, 40).await?;
    assert!(back.connected);
    assert_eq!(back.revision, before.revision);
    Ok(())
}
