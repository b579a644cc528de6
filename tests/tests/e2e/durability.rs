//! `kill -9` of the control plane loses nothing that was acknowledged.

use std::time::Duration;

use aviary_proto::v1 as pb;
use aviary_tests::{eventually, ControlPlane, Daemon, Edge, Fleet, Workspace};

#[tokio::test]
async fn kill9_of_the_control_plane_keeps_nodes_weights_and_audit_and_daemons_reconnect(
) -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
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
        admin.set_weight("gateway", weight, selector).await?;
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
    admin.set_weight("gateway", 7, "region=us").await?;
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

fn cp_tool(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(
        std::process::Command::new(aviary_tests::bin("aviary-control-plane")?)
            .args(args)
            .output()?,
    )
}

async fn set_weight(admin: &mut aviary_cli::Admin, weight: u32) -> Result<u64, tonic::Status> {
    Ok(admin.set_weight("gateway", weight, "").await?.event_seq)
}

/// Issue 11, item 5: a store that lost acknowledged data (a damaged file, or an older copy
/// in its place) used to come back silently older; edges then refused every revision as
/// older than the one they had applied.
#[tokio::test]
async fn a_store_that_went_back_refuses_to_start_and_a_restored_backup_serves_the_fleet(
) -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let edge = Edge::start(&ws, &cp, "gw-1", &[], &[]).await?;
    let mut admin = ws.admin(&cp).await?;
    set_weight(&mut admin, 10).await?;
    edge.wait_weight("gateway", 10).await?;
    cp.terminate().await?;
    let data = cp.data_dir.display().to_string();
    let backup = ws.path("backup");
    let o = cp_tool(&[
        "backup",
        "--data-dir",
        &data,
        "--out",
        &backup.display().to_string(),
    ])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    cp.restart().await?;
    let mut admin = ws.admin(&cp).await?;
    for w in [20, 30] {
        set_weight(&mut admin, w).await?;
    }
    let newest = edge.wait_weight("gateway", 30).await?;
    cp.terminate().await?;

    // The older copy of the store put back in place: refused, with the reason.
    let newer = ws.path("newer-meta.sled");
    std::fs::rename(cp.data_dir.join("meta.sled"), &newer)?;
    copy_dir(&backup_store(&ws)?, &cp.data_dir.join("meta.sled"))?;
    let refused = cp.restart().await;
    assert!(refused.is_err(), "an older store was served");
    assert!(
        cp.log().contains("behind what it acknowledged"),
        "{}",
        cp.log()
    );
    let o = cp_tool(&["check", "--data-dir", &data])?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && out.contains("data was lost"),
        "{out}"
    );

    // A restored backup (into an empty data dir) serves the fleet: the edge, which holds
    // a newer revision than the backup knew, is sent one above it, not refused as older.
    std::fs::remove_dir_all(&cp.data_dir)?;
    let o = cp_tool(&[
        "restore",
        "--data-dir",
        &data,
        "--from",
        &backup.display().to_string(),
    ])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cp_tool(&["check", "--data-dir", &data])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    cp.restart().await?;
    let back = edge.wait_weight("gateway", 10).await?;
    assert!(
        back.revision > newest.revision,
        "revision {} after the restore is not above the edge's {}",
        back.revision,
        newest.revision
    );
    let events = cp.events(&ws, "nodes.set_weight").await?;
    assert_eq!(events.len(), 1, "{events:?}");
    drop(newer);
    Ok(())
}

/// The backup's store, restored into a scratch dir (what an old copy of meta.sled is).
fn backup_store(ws: &Workspace) -> anyhow::Result<std::path::PathBuf> {
    let scratch = ws.path("scratch-restore");
    let o = cp_tool(&[
        "restore",
        "--data-dir",
        &scratch.display().to_string(),
        "--from",
        &ws.path("backup").display().to_string(),
    ])?;
    anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(scratch.join("meta.sled"))
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Issue 11, item 6: after one ENOSPC every later write failed until a restart, health
/// said SERVING, and an event of a failed write was listed and later renumbered.
#[tokio::test]
async fn a_full_disk_fails_writes_reports_not_serving_and_recovers_without_a_restart(
) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let ws = Workspace::new()?;
    let disk = aviary_tests::Tmpfs::mount(&ws.path("cp-data"), "16m")?;
    let mut cp = ControlPlane::start(&ws, &[]).await?;
    let mut admin = ws.admin(&cp).await?;
    let channel = aviary_certs::Link::new(
        &cp.url(),
        &aviary_certs::TlsFiles {
            ca: ws.pki.ca_cert(),
            cert: ws.pki.dir.join("admin.pem"),
            key: ws.pki.dir.join("admin.key"),
        },
    )?
    .connect()
    .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = |h: &tonic_health::pb::health_client::HealthClient<_>| {
        let mut h = h.clone();
        async move {
            Ok::<_, anyhow::Error>(
                h.check(tonic_health::pb::HealthCheckRequest {
                    service: "aviary.v1.Nodes".into(),
                })
                .await?
                .into_inner()
                .status,
            )
        }
    };
    assert_eq!(status(&health).await?, ServingStatus::Serving as i32);
    set_weight(&mut admin, 1).await?;

    let filler = disk.fill()?;
    let mut failed = None;
    for weight in 2..=90 {
        match set_weight(&mut admin, weight).await {
            Ok(_) => continue,
            Err(status) => {
                failed = Some((weight, status));
                break;
            }
        }
    }
    let (failed_weight, err) =
        failed.ok_or_else(|| anyhow::anyhow!("every write fit on a full disk"))?;
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("No space left"), "{}", err.message());
    eventually(Duration::from_secs(10), "NOT_SERVING", || async {
        Ok((status(&health).await? == ServingStatus::NotServing as i32).then_some(()))
    })
    .await?;
    assert_eq!(cp.metric("aviary_store_healthy").await?, 0.0);

    std::fs::remove_file(filler)?;
    eventually(Duration::from_secs(20), "SERVING again", || async {
        Ok((status(&health).await? == ServingStatus::Serving as i32).then_some(()))
    })
    .await?;
    let seq = set_weight(&mut admin, 99).await?;
    assert!(seq > 0);

    // Only what committed is in the log, each number once, also after a restart.
    let before = cp.events(&ws, "nodes.set_weight").await?;
    let failed_detail = format!("weight={failed_weight} ");
    assert!(
        before.iter().all(|e| !e.detail.starts_with(&failed_detail)),
        "the failed write's event was kept: {before:?}"
    );
    cp.kill9().await?;
    cp.restart().await?;
    let after = cp.events(&ws, "nodes.set_weight").await?;
    assert_eq!(before, after);
    let mut seqs: Vec<u64> = after.iter().map(|e| e.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), after.len());
    assert!(after
        .iter()
        .any(|e| e.seq == seq && e.detail.starts_with("weight=99 ")));
    Ok(())
}
