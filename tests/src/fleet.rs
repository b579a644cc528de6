//! A control plane with N daemons for one scenario, and the waits scenarios share: on a
//! node, on a rollout, on the versions daemons run.

use std::time::Duration;

use anyhow::Context;
use aviary_proto::v1 as pb;

use crate::{eventually, ControlPlane, Edge, Workspace};

/// How long a wait on the fleet may take before the scenario fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// A workspace, a control plane and daemons `gw-00`, `gw-01`, ... connected to it.
pub struct Fleet {
    /// PKI and temp dirs.
    pub ws: Workspace,
    /// The control plane.
    pub cp: ControlPlane,
    /// The daemons, in node-id order.
    pub edges: Vec<Edge>,
}

impl Fleet {
    /// `n` x86_64 daemons without labels.
    pub async fn start(n: usize) -> anyhow::Result<Fleet> {
        Fleet::start_with(n, |_| Vec::new(), &["--arch", "x86_64"]).await
    }

    /// `n` daemons with the labels `labels(i)` gives the i-th, and `extra` flags each.
    pub async fn start_with(
        n: usize,
        labels: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
        extra: &[&str],
    ) -> anyhow::Result<Fleet> {
        let ws = Workspace::new()?;
        let cp = ControlPlane::start(&ws, &[]).await?;
        let mut edges = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("gw-{i:02}");
            edges.push(Edge::start(&ws, &cp, &id, &labels(i), extra).await?);
        }
        Ok(Fleet { ws, cp, edges })
    }

    /// The daemons' node ids.
    pub fn node_ids(&self) -> Vec<String> {
        self.edges.iter().map(|e| e.node_id.clone()).collect()
    }

    /// `aviary ARGS` against this control plane.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cp.cli(&self.ws, args)
    }
}

impl ControlPlane {
    /// `Rollouts/GetRollout` as the default admin.
    pub async fn rollout(&self, ws: &Workspace, id: &str) -> anyhow::Result<pb::Rollout> {
        let mut admin = ws.admin(self).await?;
        let request = pb::GetRolloutRequest { id: id.into() };
        Ok(admin.rollouts.get_rollout(request).await?.into_inner())
    }

    /// Waits until rollout `id` passes `check` (`what` names the wait); returns it.
    pub async fn wait_rollout(
        &self,
        ws: &Workspace,
        id: &str,
        what: &str,
        check: impl Fn(&pb::Rollout) -> bool,
    ) -> anyhow::Result<pb::Rollout> {
        eventually(PATIENCE, &format!("rollout {id}: {what}"), || async {
            let r = self.rollout(ws, id).await?;
            Ok(check(&r).then_some(r))
        })
        .await
    }

    /// Waits until rollout `id` has ended (succeeded, failed or aborted); returns it.
    pub async fn wait_rollout_end(&self, ws: &Workspace, id: &str) -> anyhow::Result<pb::Rollout> {
        self.wait_rollout(ws, id, "to end", |r| !active(r)).await
    }

    /// Waits until node `id` is registered and passes `check`; returns it.
    pub async fn wait_node(
        &self,
        ws: &Workspace,
        id: &str,
        what: &str,
        check: impl Fn(&pb::Node) -> bool,
    ) -> anyhow::Result<pb::Node> {
        eventually(PATIENCE, &format!("node {id}: {what}"), || async {
            Ok(self.node(ws, id).await.ok().filter(|n| check(n)))
        })
        .await
    }

    /// The id of the rollout an `aviary -o json rollout create ...` printed.
    pub fn create_rollout(&self, ws: &Workspace, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-o", "json", "rollout", "create"];
        all.extend(args);
        let v: serde_json::Value = serde_json::from_str(&self.cli(ws, &all)?)?;
        Ok(v["id"].as_str().context("rollout id")?.to_owned())
    }
}

/// Progressing or paused.
pub fn active(r: &pb::Rollout) -> bool {
    [
        pb::RolloutState::Progressing as i32,
        pb::RolloutState::Paused as i32,
    ]
    .contains(&r.state)
}

/// Waits until every daemon runs the version `expect` names for its node id, as its
/// `module`'s state.json says.
pub async fn wait_versions(
    edges: &[Edge],
    module: &str,
    expect: impl Fn(&str) -> String,
) -> anyhow::Result<()> {
    for e in edges {
        let want = expect(&e.node_id);
        eventually(
            PATIENCE,
            &format!("{} to run {want}", e.node_id),
            || async {
                Ok((e.module_version(module).as_deref() == Some(want.as_str())).then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}
