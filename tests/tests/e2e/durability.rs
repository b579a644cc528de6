//! `kill -9` of the control plane loses nothing that was acknowledged.

use std::time::Duration;

use aviary_proto::v1 as pb;
use aviary_tests::{eventually, ControlPlane, Edge, Workspace};

#[tokio::test]
async fn kill9_of_the_control_plane_keeps_nodes_weights_and_audit_and_daemons_reconnect(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let mut cp = ControlPlane::start(&ws, &[]).await?;
    let edges = [
        Edge::start(&ws, &cp, "gw-1", &[("region", "eu")], &[]).await?,
        Edge::start(&ws, &cp, "gw-2", &[("region", "us")], &[]).await?,
        Edge::start(&ws, &cp, "gw-3", &[("region", "us")], &[]).await?,
    ];
    let mut admin = ws.admin(&cp).await?;
    eventually(Duration::from_secs(15), "3 connected nodes", || {
        connected_nodes(&ws, &cp)
    })
    .await?;
    for (weight, selector) in [(100, ""), (0, "region=eu")] {
        admin
            .nodes
            .set_weight(pb::SetWeightRequest {
                module: "gateway".into(),
                weight,
                selector: selector.into(),
            })
            .await?;
    }
    edges[0].wait_weight("gateway", 0).await?;
    let before_nodes = admin
        .nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    let before_events = admin
        .audit
        .list_events(pb::ListEventsRequest::default())
        .await?
        .into_inner()
        .events;

    cp.kill9().await?;
    cp.restart().await?;
    let after_nodes = eventually(
        Duration::from_secs(30),
        "daemons to reconnect by themselves",
        || connected_nodes(&ws, &cp),
    )
    .await?;
    for (b, a) in before_nodes.iter().zip(&after_nodes) {
        assert_eq!(
            (&b.node_id, &b.labels, &b.weights),
            (&a.node_id, &a.labels, &a.weights)
        );
        assert_eq!(
            b.desired_revision, a.desired_revision,
            "{}: revision moved",
            a.node_id
        );
    }
    let mut admin = ws.admin(&cp).await?;
    let after_events = admin
        .audit
        .list_events(pb::ListEventsRequest::default())
        .await?
        .into_inner()
        .events;
    assert_eq!(&after_events[..before_events.len()], &before_events[..]);

    // No revision goes back: the next change is numbered above everything before.
    let max_before = before_nodes
        .iter()
        .map(|n| n.desired_revision)
        .max()
        .unwrap_or(0);
    admin
        .nodes
        .set_weight(pb::SetWeightRequest {
            module: "gateway".into(),
            weight: 7,
            selector: "region=us".into(),
        })
        .await?;
    for edge in &edges[1..] {
        let view = edge.wait_weight("gateway", 7).await?;
        assert!(
            view.revision > max_before,
            "revision {} is not above {max_before}",
            view.revision
        );
    }
    edges[0].wait_weight("gateway", 0).await?;
    Ok(())
}

/// All nodes once all 3 are connected. Connects afresh: the control plane may be restarting.
async fn connected_nodes(
    ws: &Workspace,
    cp: &ControlPlane,
) -> anyhow::Result<Option<Vec<pb::Node>>> {
    let mut admin = ws.admin(cp).await?;
    let nodes = admin
        .nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    Ok((nodes.iter().filter(|n| n.connected).count() == 3).then_some(nodes))
}
