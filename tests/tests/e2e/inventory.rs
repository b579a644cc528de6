//! The fleet inventory: what each node runs now, from installs, rollbacks and health
//! reports, without a reconnect, and the same after a control-plane kill -9.

use std::time::Duration;

use anyhow::Context;
use aviary_proto::v1 as pb;
use aviary_tests::{eventually, free_port, Admin, ControlPlane, Daemon, Edge, Fleet, Workspace};

use crate::runtime::{refusal, settled, spec};

/// `module` as `node` shows it, once `ok` holds for it.
async fn module_when(
    ws: &Workspace,
    cp: &ControlPlane,
    node: &str,
    what: &str,
    ok: impl Fn(&pb::ModuleStatus) -> bool,
) -> anyhow::Result<pb::ModuleStatus> {
    eventually(Duration::from_secs(60), what, || async {
        let n = cp.node(ws, node).await?;
        anyhow::ensure!(
            n.modules.len() <= 1,
            "one entry per module: {:?}",
            n.modules
        );
        Ok(n.modules.into_iter().find(|m| m.name == "sample" && ok(m)))
    })
    .await
}

async fn sha256(admin: &mut Admin, version: &str) -> anyhow::Result<String> {
    let r = admin
        .releases
        .get_release(pb::GetReleaseRequest {
            module: "sample".into(),
            version: version.into(),
        })
        .await?
        .into_inner();
    r.artifacts
        .iter()
        .find(|a| a.target == "x86_64")
        .map(|a| a.sha256.clone())
        .context("an x86_64 artifact")
}

/// Starts a rollout of the sample module's `version` to the nodes `selector` matches.
async fn to(admin: &mut Admin, version: &str, selector: &str) -> anyhow::Result<String> {
    Ok(admin
        .rollouts
        .create_rollout(pb::CreateRolloutRequest {
            module: "sample".into(),
            version: version.into(),
            selector: selector.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

fn state(m: &pb::ModuleStatus) -> pb::ModuleState {
    pb::ModuleState::try_from(m.state).unwrap_or_default()
}

fn health(m: &pb::ModuleStatus) -> pb::Health {
    pb::Health::try_from(m.health).unwrap_or_default()
}

#[tokio::test]
async fn get_node_shows_what_runs_after_a_rollout_an_abort_a_local_rollback_and_a_kill9(
) -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let mut edge = Edge::start(&ws, &cp, "gw-1", &[("role", "a")], &["--arch", "x86_64"]).await?;
    // Known to the control plane, then offline: a rollout that covers it cannot end.
    let mut gone = Edge::start(&ws, &cp, "gw-2", &[("role", "b")], &["--arch", "x86_64"]).await?;
    cp.wait_node(&ws, "gw-2", "connected", |n| n.connected)
        .await?;
    gone.terminate().await?;
    let port = free_port()?.port();
    for (version, args) in [
        ("1.0.0", ""),
        ("2.0.0", ""),
        ("3.0.0", "\"--never-ready\""),
        ("4.0.0", ""),
    ] {
        let file = ws.sample_release(version)?;
        cp.upload_release(&ws, "sample", version, &file, &spec(port, args))?;
    }
    let mut admin = ws.admin(&cp).await?;
    let sha1 = sha256(&mut admin, "1.0.0").await?;
    let sha2 = sha256(&mut admin, "2.0.0").await?;
    let sha3 = sha256(&mut admin, "3.0.0").await?;
    let sha4 = sha256(&mut admin, "4.0.0").await?;

    // A rollout: the new version, its sha256, running and healthy, no reconnect needed.
    let r1 = to(&mut admin, "1.0.0", "role=a").await?;
    settled(&ws, &cp, &r1).await?;
    let m = module_when(&ws, &cp, "gw-1", "1.0.0 running and healthy", |m| {
        m.version == "1.0.0"
            && state(m) == pb::ModuleState::Running
            && health(m) == pb::Health::Healthy
    })
    .await
    .with_context(|| edge.log())?;
    assert_eq!(
        (m.sha256.as_str(), m.slot.as_str()),
        (sha1.as_str(), "current")
    );
    assert!(m.since.is_some() && m.previous_version.is_empty(), "{m:?}");
    let r2 = to(&mut admin, "2.0.0", "role=a").await?;
    settled(&ws, &cp, &r2).await?;
    let m = module_when(&ws, &cp, "gw-1", "2.0.0 running", |m| {
        m.version == "2.0.0" && state(m) == pb::ModuleState::Running
    })
    .await?;
    assert_eq!(m.sha256, sha2);
    assert_eq!(
        (m.previous_version.as_str(), m.previous_sha256.as_str()),
        ("1.0.0", sha1.as_str())
    );
    let node = cp.node(&ws, "gw-1").await?;
    let beat = node.last_heartbeat.context("a heartbeat")?;
    let seen = node.last_seen.context("last seen")?;
    assert!(beat.seconds >= seen.seconds, "{beat:?} before {seen:?}");
    // The heartbeat moves while the node stays connected.
    eventually(Duration::from_secs(30), "the heartbeat to move", || async {
        let later = cp.node(&ws, "gw-1").await?.last_heartbeat;
        Ok(later.filter(|t| (t.seconds, t.nanos) > (beat.seconds, beat.nanos)))
    })
    .await?;

    // A version that never gets ready: the node goes back on its own, and says so.
    let r3 = to(&mut admin, "3.0.0", "role=a").await?;
    refusal(&ws, &cp, "gw-1")
        .await
        .with_context(|| edge.log())?;
    let m = module_when(&ws, &cp, "gw-1", "a local rollback to 2.0.0", |m| {
        state(m) == pb::ModuleState::RolledBack
    })
    .await?;
    assert_eq!(
        (m.version.as_str(), m.sha256.as_str()),
        ("2.0.0", sha2.as_str())
    );
    assert_eq!(m.slot, "previous", "{m:?}");
    assert_eq!(
        (m.previous_version.as_str(), m.previous_sha256.as_str()),
        ("3.0.0", sha3.as_str())
    );
    settled(&ws, &cp, &r3).await?;

    // Filters find it: on 2.0.0, rolled back, connected; none on 3.0.0.
    let listed = |filter: &'static str| {
        let admin = ws.admin(&cp);
        async move {
            let nodes = admin.await?.all_nodes("", filter).await?;
            anyhow::Ok(nodes.into_iter().map(|n| n.node_id).collect::<Vec<_>>())
        }
    };
    assert_eq!(listed("modules.sample.version = 2.0.0").await?, ["gw-1"]);
    assert_eq!(
        listed("modules.*.state = rolled_back AND connected = true").await?,
        ["gw-1"]
    );
    assert!(listed("modules.sample.version = 3.0.0").await?.is_empty());
    assert_eq!(listed("connected = false").await?, ["gw-2"]);

    // An aborted rollout: back to what the node ran before, by the control plane's word.
    // It covers gw-2 too, which is offline, so it is still in progress when aborted.
    let r4 = to(&mut admin, "4.0.0", "").await?;
    let again = module_when(&ws, &cp, "gw-1", "4.0.0 running", |m| {
        m.version == "4.0.0" && m.sha256 == sha4 && state(m) == pb::ModuleState::Running
    })
    .await;
    if let Err(e) = again {
        let n = cp.node(&ws, "gw-1").await?;
        anyhow::bail!("{e:#}: {n:#?}\n{}", edge.log());
    }
    admin
        .rollouts
        .abort_rollout(pb::RolloutRef {
            id: r4.clone(),
            ..Default::default()
        })
        .await?;
    let m = module_when(&ws, &cp, "gw-1", "the abort's rollback to 2.0.0", |m| {
        m.version == "2.0.0" && state(m) == pb::ModuleState::RolledBack
    })
    .await
    .with_context(|| edge.log())?;
    assert_eq!(
        (m.sha256.as_str(), m.slot.as_str()),
        (sha2.as_str(), "previous")
    );
    assert_eq!(m.previous_version, "4.0.0");

    // A restart: what it shows comes back from its store before the node reconnects
    // (the node is stopped first; a stop flushes the statuses).
    edge.terminate().await?;
    cp.terminate().await?;
    cp.restart().await?;
    let n = cp.node(&ws, "gw-1").await?;
    assert!(!n.connected);
    let m = n.modules.first().context("the module after a restart")?;
    assert_eq!(
        (m.version.as_str(), m.sha256.as_str(), state(m)),
        ("2.0.0", sha2.as_str(), pb::ModuleState::RolledBack)
    );
    assert_eq!(health(m), pb::Health::Unknown, "disconnected: {m:?}");
    assert!(n.last_heartbeat.is_some());

    // kill -9 may lose the last second of statuses (they are written in batches); the
    // node's Hello puts back what it runs, including that it went back.
    edge.restart().await?;
    cp.wait_node(&ws, "gw-1", "reconnected", |n| n.connected)
        .await?;
    cp.kill9().await?;
    cp.restart().await?;
    let m = module_when(&ws, &cp, "gw-1", "2.0.0 rolled back after a kill -9", |m| {
        m.version == "2.0.0" && state(m) == pb::ModuleState::RolledBack
    })
    .await
    .with_context(|| edge.log())?;
    assert_eq!(
        (m.sha256.as_str(), m.slot.as_str()),
        (sha2.as_str(), "previous")
    );
    assert_eq!(m.previous_version, "4.0.0");
    Ok(())
}
