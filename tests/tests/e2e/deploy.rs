//! Deployments over the fleet stream: a real release pair (esbuild 0.24.1 → 0.24.2) goes
//! through upload, delta, transfer and install on three daemons; an abort sends nodes
//! back to their previous slot without a download; an offline node catches up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use aviary_proto::digest::Sha256;
use aviary_proto::v1 as pb;
use aviary_tests::{
    bin, eventually, peak_rss_kib, rss_kib, tools_dir, Admin, ControlPlane, Daemon, Edge, Fleet,
    Workspace,
};

fn pair() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = tools_dir().join("delta-pairs");
    let pair = (dir.join("esbuild-0.24.1"), dir.join("esbuild-0.24.2"));
    if !pair.0.exists() || !pair.1.exists() {
        bail!(
            "{} missing: scripts/test fetches the delta pairs",
            dir.display()
        );
    }
    Ok(pair)
}

fn upload(ws: &Workspace, cp: &ControlPlane, version: &str, file: &Path) -> anyhow::Result<()> {
    let o = Command::new(bin("aviary")?)
        .args(["--control-plane", &cp.url(), "--certs"])
        .arg(&ws.pki.dir)
        .args(ws.release_args("upload", "esbuild", version, "x86_64", file))
        .output()?;
    if !o.status.success() {
        bail!("upload {version}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// The artifact in an edge's current slot of `esbuild`, if any.
fn installed(edge: &Edge) -> Option<(String, Vec<u8>)> {
    let dir = edge.state_dir.join("modules/esbuild");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()?;
    let id = st["current"]["id"].as_str()?;
    let version = st["current"]["version"].as_str()?.to_owned();
    Some((
        version,
        std::fs::read(dir.join("slots").join(id).join("artifact")).ok()?,
    ))
}

async fn rollout(admin: &mut Admin, version: &str) -> anyhow::Result<String> {
    Ok(admin
        .rollouts
        .create_rollout(pb::CreateRolloutRequest {
            module: "esbuild".into(),
            version: version.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

async fn state_of(admin: &mut Admin, id: &str) -> anyhow::Result<pb::Rollout> {
    Ok(admin
        .rollouts
        .get_rollout(pb::GetRolloutRequest { id: id.into() })
        .await?
        .into_inner())
}

/// gw-1's module transfer (offset, size), while one runs.
async fn transfer_in_flight(
    ws: &Workspace,
    cp: &ControlPlane,
) -> anyhow::Result<Option<(u64, u64)>> {
    let node = cp.node(ws, "gw-1").await?;
    Ok(node
        .module_rollouts
        .iter()
        .filter_map(|m| m.transfer.as_ref())
        .map(|t| (t.offset, t.size))
        .next())
}

async fn wait_installed(edges: &[&Edge], version: &str, bytes: &[u8]) -> anyhow::Result<()> {
    for edge in edges {
        eventually(
            Duration::from_secs(60),
            &format!("{} to run {version}", edge.node_id),
            || async { Ok(installed(edge).filter(|(v, _)| v == version).map(|_| ())) },
        )
        .await?;
        let (_, got) = installed(edge).context("installed")?;
        assert_eq!(
            Sha256::of(&got),
            Sha256::of(bytes),
            "{}: bytes differ from the signed release",
            edge.node_id
        );
    }
    Ok(())
}

/// Waits until `node`'s inventory shows esbuild `version` (`sha256`) in `state`.
async fn runs(
    ws: &aviary_tests::Workspace,
    cp: &ControlPlane,
    node: &str,
    version: &str,
    sha256: &str,
    state: pb::ModuleState,
) -> anyhow::Result<pb::ModuleStatus> {
    eventually(
        Duration::from_secs(20),
        &format!("{node} to show {version} {state:?}"),
        || async {
            let n = cp.node(ws, node).await?;
            Ok(n.modules.into_iter().find(|m| {
                m.name == "esbuild"
                    && m.version == version
                    && m.sha256 == sha256
                    && m.state == state as i32
            }))
        },
    )
    .await
}

/// Each daemon's RSS now, with its peak RSS reset to it (`clear_refs` 5).
fn reset_peaks(edges: &[Edge]) -> anyhow::Result<Vec<u64>> {
    edges
        .iter()
        .map(|e| {
            let pid = e.pid().context("edge not running")?;
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
            rss_kib(pid)
        })
        .collect()
}

/// Installing a 10 MB binary, full or delta, took each daemon at most 16 MiB above what
/// it held before: payloads are streamed to disk and the new artifact written as made.
fn assert_memory_flat(edges: &[Edge], idle: &[u64]) -> anyhow::Result<()> {
    for (e, idle) in edges.iter().zip(idle) {
        let peak = peak_rss_kib(e.pid().context("edge not running")?)?;
        assert!(
            peak.saturating_sub(*idle) <= 16 * 1024,
            "{}: peak RSS {peak} KiB during the install, {idle} KiB before",
            e.node_id
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_real_release_reaches_three_daemons_as_a_delta_and_an_abort_goes_back_without_download(
) -> anyhow::Result<()> {
    let (v1, v2) = pair()?;
    let (v1_bytes, v2_bytes) = (std::fs::read(&v1)?, std::fs::read(&v2)?);
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let mut edges = Vec::new();
    for i in 1..=3 {
        edges.push(
            Edge::start(
                &ws,
                &cp,
                &format!("gw-{i}"),
                &[("region", "eu")],
                &["--arch", "x86_64"],
            )
            .await?,
        );
    }
    let mut admin = ws.admin(&cp).await?;
    upload(&ws, &cp, "0.24.1", &v1)?;
    upload(&ws, &cp, "0.24.2", &v2)?;

    // First install: no base on the nodes, so the full payload.
    let idle = reset_peaks(&edges)?;
    let r1 = rollout(&mut admin, "0.24.1").await?;
    wait_installed(&edges.iter().collect::<Vec<_>>(), "0.24.1", &v1_bytes).await?;
    assert_memory_flat(&edges, &idle)?;
    // Every node's inventory says so, with the artifact's sha256.
    let sha1 = aviary_proto::digest::Sha256::of(&v1_bytes).hex();
    let sha2 = aviary_proto::digest::Sha256::of(&v2_bytes).hex();
    for e in &edges {
        runs(
            &ws,
            &cp,
            &e.node_id,
            "0.24.1",
            &sha1,
            pb::ModuleState::Installed,
        )
        .await?;
    }
    eventually(Duration::from_secs(20), "rollout 1 to succeed", || async {
        let mut admin = ws.admin(&cp).await?;
        Ok(
            (state_of(&mut admin, &r1).await?.state == pb::RolloutState::Succeeded as i32)
                .then_some(()),
        )
    })
    .await?;
    let full_bytes = cp
        .metric("aviary_transfer_bytes_total{encoding=\"full_zstd\"}")
        .await?;
    assert!(full_bytes > 0.0);

    // One node goes offline; the others get 0.24.2 as a delta.
    edges[2].kill9().await?;
    let idle = reset_peaks(&edges[..2])?;
    let r2 = rollout(&mut admin, "0.24.2").await?;
    wait_installed(&[&edges[0], &edges[1]], "0.24.2", &v2_bytes).await?;
    assert_memory_flat(&edges[..2], &idle)?;
    let delta_bytes = cp
        .metric("aviary_transfer_bytes_total{encoding=\"bsdiff_zstd\"}")
        .await?;
    assert!(delta_bytes > 0.0, "no delta was sent:\n{}", cp.log());
    assert!(
        delta_bytes < 2.0 * 400_000.0,
        "{delta_bytes} delta bytes on the wire for two nodes of a {} byte binary",
        v2_bytes.len()
    );
    let r = state_of(&mut admin, &r2).await?;
    assert_eq!(
        r.state,
        pb::RolloutState::Progressing as i32,
        "gw-3 is offline: {r:?}"
    );
    assert_eq!(r.progress.map(|p| (p.selected, p.installed)), Some((3, 2)));

    // Abort: back to the previous slot, nothing downloaded.
    let before = cp.metric("aviary_transfer_bytes_total").await?;
    admin
        .rollouts
        .abort_rollout(pb::RolloutRef {
            id: r2.clone(),
            ..Default::default()
        })
        .await?;
    wait_installed(&[&edges[0], &edges[1]], "0.24.1", &v1_bytes).await?;
    for e in &edges[..2] {
        let m = runs(
            &ws,
            &cp,
            &e.node_id,
            "0.24.1",
            &sha1,
            pb::ModuleState::RolledBack,
        )
        .await?;
        assert_eq!(
            (m.slot.as_str(), m.previous_sha256.as_str()),
            ("previous", sha2.as_str())
        );
    }
    assert_eq!(
        cp.metric("aviary_transfer_bytes_total").await?,
        before,
        "a rollback downloaded bytes"
    );
    assert_eq!(
        state_of(&mut admin, &r2).await?.state,
        pb::RolloutState::Aborted as i32
    );

    // The offline node comes back and stays on 0.24.1; a new rollout takes all three to
    // 0.24.2, the delta built once and served from cache.
    edges[2].restart().await?;
    eventually(Duration::from_secs(20), "gw-3 to report", || async {
        let node = cp.node(&ws, "gw-3").await?;
        Ok(node
            .module_rollouts
            .iter()
            .any(|m| {
                m.module == "esbuild"
                    && m.acked_revision >= m.desired_revision
                    && m.desired_revision > 0
            })
            .then_some(()))
    })
    .await?;
    assert_eq!(
        installed(&edges[2]).map(|(v, _)| v).as_deref(),
        Some("0.24.1")
    );
    let r3 = rollout(&mut admin, "0.24.2").await?;
    // The rollout is durable before any node hears of it: a crash right after the
    // create loses nothing.
    let mut cp = cp;
    cp.kill9().await?;
    cp.restart().await?;
    wait_installed(&edges.iter().collect::<Vec<_>>(), "0.24.2", &v2_bytes).await?;
    eventually(Duration::from_secs(20), "rollout 3 to succeed", || async {
        let mut admin = ws.admin(&cp).await?;
        Ok(
            (state_of(&mut admin, &r3).await?.state == pb::RolloutState::Succeeded as i32)
                .then_some(()),
        )
    })
    .await?;
    assert!(cp.metric("aviary_delta_cache_hits_total").await? >= 1.0);
    for edge in &edges {
        let tmp = edge.state_dir.join("modules/esbuild/tmp");
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{}: left {left:?}", edge.node_id);
    }
    Ok(())
}

/// `log` without its terminal colour escapes (`ESC [ ... m`).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |m| &rest[i + m + 1..]);
    }
    out.push_str(rest);
    out
}

/// Twenty nodes ask for the same delta at once: one build runs, the other requests wait
/// on it, and every node receives the same payload bytes.
#[tokio::test]
async fn twenty_nodes_asking_at_once_share_one_delta_build() -> anyhow::Result<()> {
    let (v1, v2) = pair()?;
    let v2_bytes = std::fs::read(&v2)?;
    let fleet = Fleet::start(20).await?;
    let (ws, cp) = (&fleet.ws, &fleet.cp);
    let mut admin = ws.admin(cp).await?;
    upload(ws, cp, "0.24.1", &v1)?;
    upload(ws, cp, "0.24.2", &v2)?;
    let r1 = rollout(&mut admin, "0.24.1").await?;
    cp.wait_rollout_end(ws, &r1).await?;
    assert_eq!(cp.metric("aviary_delta_build_seconds_count").await?, 0.0);

    let r2 = rollout(&mut admin, "0.24.2").await?;
    let edges: Vec<&Edge> = fleet.edges.iter().collect();
    wait_installed(&edges, "0.24.2", &v2_bytes).await?;
    let done = cp.wait_rollout_end(ws, &r2).await?;
    assert_eq!(done.state, pb::RolloutState::Succeeded as i32, "{done:?}");
    assert_eq!(
        cp.metric("aviary_delta_build_seconds_count").await?,
        1.0,
        "one build for one (from, to) pair:\n{}",
        cp.log()
    );
    assert!(
        cp.metric("aviary_delta_builds_joined_total").await?
            + cp.metric("aviary_delta_cache_hits_total{encoding=\"delta\"}")
                .await?
            >= 19.0,
        "the other nineteen requests waited on the build or found it cached"
    );
    // The last payload each daemon was offered (0.24.2's), from its log: the one delta.
    let offered: Vec<String> = fleet
        .edges
        .iter()
        .map(|e| {
            plain(&e.log())
                .lines()
                .rev()
                .filter(|l| l.contains("receiving module payload"))
                .filter_map(|l| l.split("payload=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
                .next()
                .unwrap_or_default()
        })
        .collect();
    let cached = std::fs::read_dir(cp.data_dir.join("payloads"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("delta-"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".zst"))
        .map(|e| std::fs::read(e.path()))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(cached.len(), 1, "one delta on disk");
    let sha = Sha256::of(&cached[0]).hex();
    assert!(
        offered.iter().all(|o| *o == sha),
        "every node was offered delta {sha}: {offered:?}"
    );
    let sent = cp
        .metric("aviary_transfer_bytes_total{encoding=\"bsdiff_zstd\"}")
        .await?;
    // Wire bytes: the payload plus each chunk's framing (transfer id, offset).
    let once = 20.0 * cached[0].len() as f64;
    assert!(
        (once..once * 1.01).contains(&sent),
        "{sent} delta bytes on the wire; each of 20 nodes once is {once}"
    );
    Ok(())
}

#[tokio::test]
async fn a_weight_overtakes_a_transfer_and_a_cut_transfer_resumes_where_it_stopped(
) -> anyhow::Result<()> {
    use aviary_tests::proxy::{Mode, Proxy};
    let (v1, _) = pair()?;
    let v1_bytes = std::fs::read(&v1)?;
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let proxy = Proxy::start(cp.addr).await?;
    // A slow uplink (512 KiB/s: the 4 MB payload takes ~8 s), so the cut lands mid-transfer.
    proxy.set(Mode::Throttle(512 << 10));
    let edge = Edge::start_via(
        &ws,
        &format!("https://{}", proxy.addr),
        "gw-1",
        &[],
        &["--arch", "x86_64"],
    )
    .await?;
    upload(&ws, &cp, "0.24.1", &v1)?;
    let mut admin = ws.admin(&cp).await?;
    rollout(&mut admin, "0.24.1").await?;

    // A weight change in the middle of the transfer overtakes the rest of the payload:
    // control messages wait behind at most one chunk.
    eventually(Duration::from_secs(30), "the transfer to start", || async {
        Ok(transfer_in_flight(&ws, &cp).await?.filter(|(o, _)| *o > 0))
    })
    .await?;
    admin.set_weight("gateway", 42, "").await?;
    edge.wait_weight("gateway", 42).await?;
    let (offset, size) = transfer_in_flight(&ws, &cp)
        .await?
        .context("transfer still running")?;
    assert!(
        offset < size / 2,
        "the weight arrived only after {offset} of {size} payload bytes"
    );
    // The operator sees the transfer through the CLI (the throttle keeps it running).
    let json: serde_json::Value =
        serde_json::from_str(&cp.cli(&ws, &["-o", "json", "nodes", "get", "gw-1"])?)?;
    let transfer = &json["moduleRollouts"][0]["transfer"];
    assert!(
        // uint64 in proto3 JSON is a string.
        transfer["size"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            > 0
            && transfer["encoding"].is_string(),
        "{json}"
    );

    // Wait until the edge holds over 1.5 MiB (past its first fsynced checkpoint), then cut.
    let size = eventually(
        Duration::from_secs(30),
        "the transfer to pass 1.5 MiB",
        || async {
            let node = cp.node(&ws, "gw-1").await?;
            Ok(node
                .module_rollouts
                .iter()
                .filter_map(|m| m.transfer.as_ref())
                .find(|t| t.offset > 3 << 19)
                .map(|t| t.size))
        },
    )
    .await?;
    proxy.cut();
    let sent_before = cp.metric("aviary_transfer_bytes_total").await?;
    assert!(
        sent_before < size as f64,
        "the transfer finished before the cut"
    );
    proxy.set(Mode::Pass);

    wait_installed(&[&edge], "0.24.1", &v1_bytes)
        .await
        .with_context(|| {
            format!(
                "edge log:\n{}\ncontrol plane log:\n{}",
                edge.log(),
                cp.log()
            )
        })?;
    let sent_after = cp.metric("aviary_transfer_bytes_total").await?;
    let resent = sent_after - sent_before;
    // Restarting from zero would resend the whole payload; resuming from the edge's
    // last checkpoint (every MiB) resends at most the rest plus one chunk in flight.
    assert!(
        resent <= (size - (1 << 20)) as f64 + 128.0 * 1024.0,
        "{resent} bytes sent after the cut for a {size} byte payload: restarted from zero?"
    );
    assert!(
        edge.log().contains("receiving module payload"),
        "{}",
        edge.log()
    );
    Ok(())
}

#[tokio::test]
async fn an_edge_refuses_a_release_its_own_keys_did_not_sign_and_it_is_not_resent(
) -> anyhow::Result<()> {
    // The control plane trusts the deployment's release key; gw-2 trusts only another one,
    // as if the control plane had been compromised into serving someone else's code.
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    ws.edge_cert("gw-2")?;
    let own = ws.path("gw-2-certs");
    std::fs::create_dir_all(&own)?;
    for f in ["ca.pem", "edge-gw-2.pem", "edge-gw-2.key"] {
        std::fs::copy(ws.pki.dir.join(f), own.join(f))?;
    }
    aviary_certs::generate_release_key(&own)?;
    std::fs::remove_file(own.join("release-signing.key"))?;
    let good = Edge::start(&ws, &cp, "gw-1", &[], &["--arch", "x86_64"]).await?;
    let strict = Edge::start(
        &ws,
        &cp,
        "gw-2",
        &[],
        &[
            "--arch",
            "x86_64",
            "--certs",
            own.to_str().unwrap_or_default(),
        ],
    )
    .await?;
    let artifact = ws.path("tool");
    std::fs::write(&artifact, b"#!/bin/sh\necho tool\n")?;
    let o = Command::new(bin("aviary")?)
        .args(["--control-plane", &cp.url(), "--certs"])
        .arg(&ws.pki.dir)
        .args(ws.release_args("upload", "esbuild", "1.0.0", "x86_64", &artifact))
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut admin = ws.admin(&cp).await?;
    let id = rollout(&mut admin, "1.0.0").await?;

    wait_installed(&[&good], "1.0.0", &std::fs::read(&artifact)?).await?;
    let node = eventually(Duration::from_secs(20), "gw-2's NACK", || async {
        let node = cp.node(&ws, "gw-2").await?;
        Ok(node
            .module_rollouts
            .iter()
            .any(|m| m.nacked_revision > 0)
            .then_some(node))
    })
    .await?;
    let m = &node.module_rollouts[0];
    assert!(m.nack_error.contains("signature"), "{m:?}");
    // The reason reaches the operator through the CLI too, in both formats.
    let table = cp.cli(&ws, &["nodes", "get", "gw-2"])?;
    let line = table
        .lines()
        .find(|l| l.contains("module esbuild"))
        .unwrap_or_default();
    assert!(
        line.contains("refused") && line.contains("signature"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cp.cli(&ws, &["-o", "json", "nodes", "get", "gw-2"])?)?;
    let error = json["moduleRollouts"][0]["nackError"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("signature"), "{json}");
    assert!(
        installed(&strict).is_none(),
        "gw-2 installed code its keys did not sign"
    );
    // The rollout engine counts the answers on its next tick.
    let r = eventually(Duration::from_secs(10), "the rollout to end", || async {
        let mut admin = ws.admin(&cp).await?;
        let r = state_of(&mut admin, &id).await?;
        Ok((r.state != pb::RolloutState::Progressing as i32).then_some(r))
    })
    .await?;
    assert_eq!(
        r.progress.map(|p| (p.installed, p.failed)),
        Some((1, 1)),
        "{r:?}"
    );
    assert_eq!(r.state, pb::RolloutState::Failed as i32, "{r:?}");

    // Parked: the NACKed revision is not offered again, on this stream or after a reconnect.
    let sent = cp.metric("aviary_module_updates_sent_total").await?;
    let mut strict = strict;
    strict.restart().await?;
    // A barrier in the new stream: a weight change's ACK is handled after the stream's
    // opening offers (weights, then modules), so once it is recorded any resend of the
    // parked module update would already have been counted.
    let before = cp.node(&ws, "gw-2").await?.desired_revision;
    ws.admin(&cp).await?.set_weight("esbuild", 1, "").await?;
    cp.wait_node(&ws, "gw-2", "the new weights ACKed", |n| {
        n.desired_revision > before && n.acked_revision == n.desired_revision
    })
    .await?;
    assert_eq!(cp.metric("aviary_module_updates_sent_total").await?, sent);
    Ok(())
}

#[tokio::test]
async fn a_node_whose_arch_has_no_artifact_is_skipped_never_sent_a_foreign_binary(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let x86 = Edge::start(&ws, &cp, "gw-x86", &[], &["--arch", "x86_64"]).await?;
    let arm = Edge::start(&ws, &cp, "gw-arm", &[], &["--arch", "aarch64"]).await?;
    let artifact = ws.path("tool");
    std::fs::write(&artifact, b"an x86_64 build")?;
    upload(&ws, &cp, "1.0.0", &artifact)?;
    let mut admin = ws.admin(&cp).await?;
    let id = rollout(&mut admin, "1.0.0").await?;
    wait_installed(&[&x86], "1.0.0", &std::fs::read(&artifact)?).await?;
    let r = eventually(Duration::from_secs(20), "the rollout to settle", || async {
        let mut admin = ws.admin(&cp).await?;
        let r = state_of(&mut admin, &id).await?;
        Ok((r.state != pb::RolloutState::Progressing as i32).then_some(r))
    })
    .await?;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    assert!(r.message.contains("1 node(s) skipped"), "{r:?}");
    assert!(installed(&arm).is_none(), "gw-arm got a foreign binary");
    let node = cp.node(&ws, "gw-arm").await?;
    assert!(
        node.module_rollouts[0]
            .nack_error
            .contains("no artifact of esbuild 1.0.0 for aarch64"),
        "{node:?}"
    );
    Ok(())
}
