//! Canary rollouts: scale steps over a stable hash of the nodes, pauses until promoted,
//! and a control-plane crash in the middle.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use aviary_proto::digest::Sha256;
use aviary_proto::v1 as pb;
use aviary_tests::{
    bin, eventually, wait_versions, ControlPlane, Daemon, Edge, Fleet, ProbeTarget, Workspace,
};

fn upload(ws: &Workspace, cp: &ControlPlane, version: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = format!("model weights {version}").into_bytes();
    let file = ws.path(&format!("model-{version}"));
    std::fs::write(&file, &bytes)?;
    let args = ws.release_args("upload", "model", version, "x86_64", &file);
    cp.cli(ws, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(bytes)
}

/// Uploads `model` 1.0.0 and 2.0.0, and rolls 1.0.0 out everywhere (the stable version
/// the canary scenarios start from).
async fn model_1_everywhere(
    ws: &Workspace,
    cp: &ControlPlane,
    edges: &[Edge],
) -> anyhow::Result<()> {
    upload(ws, cp, "1.0.0")?;
    upload(ws, cp, "2.0.0")?;
    let id = cp.create_rollout(ws, &["--module", "model", "--version", "1.0.0"])?;
    wait_versions(edges, "model", |_| "1.0.0".into()).await?;
    let r = cp.wait_rollout_end(ws, &id).await?;
    anyhow::ensure!(r.state == pb::RolloutState::Succeeded as i32, "{r:?}");
    Ok(())
}

/// The audit event of rollout `id`'s analysis.
async fn analysis_event(
    ws: &Workspace,
    cp: &ControlPlane,
    id: &str,
) -> anyhow::Result<aviary_proto::v1::Event> {
    let events = cp.events(ws, "rollout.analysis").await?;
    events
        .into_iter()
        .find(|e| e.target == format!("rollout/{id}"))
        .context("no analysis event")
}

/// 2.0.0 on the `canaries`, 1.0.0 elsewhere.
fn new_on(canaries: &[String], node: &str) -> String {
    if canaries.iter().any(|c| c == node) {
        "2.0.0"
    } else {
        "1.0.0"
    }
    .into()
}

/// Nodes a rollout's canary scale covers, computed as the control plane does: each node
/// has a stable bucket from sha256("ROLLOUT\0NODE"), and the ⌈percent × n ÷ 100⌉ nodes with
/// the smallest buckets are the canaries.
fn canaries(rollout: &str, nodes: &[String], percent: u32) -> Vec<String> {
    let mut by_bucket: Vec<(u64, &String)> = nodes
        .iter()
        .map(|n| {
            let d = Sha256::of(format!("{rollout}\0{n}").as_bytes());
            let v = u64::from_be_bytes([
                d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
            ]);
            (v % 10_000, n)
        })
        .collect();
    by_bucket.sort();
    let k = (percent as usize * nodes.len()).div_ceil(100);
    by_bucket
        .into_iter()
        .take(k)
        .map(|(_, n)| n.clone())
        .collect()
}

#[tokio::test]
async fn a_canary_rollout_goes_step_by_step_survives_a_crash_and_completes_when_promoted(
) -> anyhow::Result<()> {
    let Fleet { ws, mut cp, edges } =
        Fleet::start_with(10, |_| vec![("tier", "edge")], &["--arch", "x86_64"]).await?;
    let nodes: Vec<String> = edges.iter().map(|e| e.node_id.clone()).collect::<Vec<_>>();
    model_1_everywhere(&ws, &cp, &edges).await?;

    cp.cli(
        &ws,
        &[
            "nodes",
            "set-weight",
            "--module",
            "model",
            "--weight",
            "100",
        ],
    )?;
    let id = cp.create_rollout(
        &ws,
        &[
            "--module",
            "model",
            "--version",
            "2.0.0",
            "--selector",
            "tier=edge",
            "--step",
            "canary=20",
            "--step",
            "weight=10",
            "--step",
            "pause",
            "--step",
            "canary=50",
            "--step",
            "pause=1s",
        ],
    )?;

    // Step 1 scales to 20 %, step 2 holds until promoted.
    let paused = eventually(
        Duration::from_secs(30),
        "the rollout to pause at step 2",
        || async {
            let r = cp.rollout(&ws, &id).await?;
            Ok((r.state == pb::RolloutState::Paused as i32).then_some(r))
        },
    )
    .await?;
    assert_eq!(paused.current_step, 2, "{paused:?}");
    let at20 = canaries(&id, &nodes, 20);
    assert_eq!(paused.progress.map(|p| p.canaries), Some(at20.len() as u32));
    wait_versions(&edges, "model", |n| new_on(&at20, n)).await?;

    // The canaries carry the step's weight, the others the operator's; the rollout owns
    // the module's weights until it ends.
    for e in &edges {
        let want = if at20.contains(&e.node_id) { 10 } else { 100 };
        e.wait_weight("model", want).await?;
    }
    let refused = cp.cli(
        &ws,
        &["nodes", "set-weight", "--module", "model", "--weight", "0"],
    );
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("owns the weights")),
        "{refused:?}"
    );

    // A crash while paused: it comes back paused at the same step, nothing re-sent.
    cp.kill9().await?;
    cp.restart().await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = cp.rollout(&ws, &id).await?;
    assert_eq!(
        (r.state, r.current_step),
        (pb::RolloutState::Paused as i32, 2),
        "{r:?}"
    );
    wait_versions(&edges, "model", |n| new_on(&at20, n)).await?;

    // Promote: 50 %, a timed pause, then everyone.
    cp.cli(&ws, &["rollout", "promote", &id])?;
    // And a crash in the middle of the 50 % scale step: it resumes and finishes.
    eventually(Duration::from_secs(20), "the 50 % step", || async {
        let r = cp.rollout(&ws, &id).await?;
        Ok((r.current_step >= 3).then_some(()))
    })
    .await?;
    cp.kill9().await?;
    cp.restart().await?;
    let done = eventually(
        Duration::from_secs(30),
        "the rollout to succeed",
        || async {
            let r = cp.rollout(&ws, &id).await?;
            Ok((r.state == pb::RolloutState::Succeeded as i32).then_some(()))
        },
    )
    .await;
    if let Err(e) = done {
        bail!("{e}: {:?}\n{}", cp.rollout(&ws, &id).await?, cp.log());
    }
    wait_versions(&edges, "model", |_| "2.0.0".into()).await?;
    for e in &edges {
        e.wait_weight("model", 100).await?;
    }
    let at50 = canaries(&id, &nodes, 50);
    assert!(
        at20.iter().all(|n| at50.contains(n)),
        "20 % canaries stay canaries at 50 %"
    );

    // The audit log tells the story; watch prints the final state and ends.
    let events = cp.events(&ws, "rollout.").await?;
    let actions: Vec<&str> = events
        .iter()
        .filter(|e| e.target == format!("rollout/{id}"))
        .map(|e| e.action.as_str())
        .collect();
    for a in [
        "rollout.created",
        "rollout.step",
        "rollout.paused",
        "rollout.promoted",
        "rollout.succeeded",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    let watched = cp.cli(&ws, &["rollout", "watch", &id])?;
    assert!(watched.contains("SUCCEEDED"), "{watched}");
    Ok(())
}

fn upload_worker(
    ws: &Workspace,
    cp: &ControlPlane,
    version: &str,
    args: &str,
) -> anyhow::Result<()> {
    upload_worker_with(ws, cp, version, args, READY, "")
}

/// How long a good worker may take to become ready: generous, so a busy machine does not
/// turn a slow start into a refusal. Versions meant to fail use `FAILS_FAST`.
const READY: &str = "30s";
const FAILS_FAST: &str = "5s";

/// A worker release with `ready_timeout` whose run spec also carries `extra` (TOML).
fn upload_worker_with(
    ws: &Workspace,
    cp: &ControlPlane,
    version: &str,
    args: &str,
    ready_timeout: &str,
    extra: &str,
) -> anyhow::Result<()> {
    let file = ws.path(&format!("worker-{version}"));
    let o = Command::new(bin("aviary-sample-module")?)
        .args(["--stamp", version])
        .arg(&file)
        .output()?;
    if !o.status.success() {
        bail!("stamp: {}", String::from_utf8_lossy(&o.stderr));
    }
    let spec = ws.path(&format!("worker-{version}.toml"));
    std::fs::write(
        &spec,
        format!("args = [{args}]\nlog_patterns = [\"ERROR\"]\nready_timeout = \"{ready_timeout}\"\n{extra}"),
    )?;
    let mut args = ws.release_args("upload", "worker", version, "x86_64", &file);
    args.extend(["--run-spec".into(), spec.display().to_string()]);
    cp.cli(ws, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(())
}

/// `aviary rollout create --module worker --version V STEPS...`; returns the rollout id.
fn create_worker_rollout(
    ws: &Workspace,
    cp: &ControlPlane,
    version: &str,
    steps: &[&str],
) -> anyhow::Result<String> {
    let mut args = vec![
        "-o",
        "json",
        "rollout",
        "create",
        "--module",
        "worker",
        "--version",
        version,
    ];
    args.extend(steps);
    let v: serde_json::Value = serde_json::from_str(&cp.cli(ws, &args)?)?;
    Ok(v["id"].as_str().context("id")?.to_owned())
}

#[tokio::test]
async fn analysis_aborts_a_bad_canary_by_its_log_errors_and_passes_a_good_one() -> anyhow::Result<()>
{
    let Fleet { ws, cp, edges } = Fleet::start(10).await?;
    let nodes: Vec<String> = edges.iter().map(|e| e.node_id.clone()).collect::<Vec<_>>();
    upload_worker(&ws, &cp, "1.0.0", "\"--idle\"")?;
    upload_worker(&ws, &cp, "2.0.0", "\"--idle\", \"--log-errors\"")?;
    upload_worker(&ws, &cp, "3.0.0", "\"--idle\"")?;
    cp.cli(
        &ws,
        &[
            "nodes",
            "set-weight",
            "--module",
            "worker",
            "--weight",
            "100",
        ],
    )?;
    let first = cp.create_rollout(&ws, &["--module", "worker", "--version", "1.0.0"])?;
    cp.wait_rollout_end(&ws, &first).await?;

    let canary_steps = [
        "--step",
        "canary=30",
        "--step",
        "weight=10",
        "--step",
        "analysis=3s",
        "--max-log-matches",
        "0",
        "--min-reports",
        "2",
    ];
    let create = |version: &str| create_worker_rollout(&ws, &cp, version, &canary_steps);

    // The bad one logs errors: its analysis fails and it is aborted automatically.
    let bad = create("2.0.0")?;
    let r = cp.wait_rollout_end(&ws, &bad).await?;
    assert_eq!(r.state, pb::RolloutState::Aborted as i32, "{r:?}");
    assert!(r.message.contains("log-pattern match"), "{}", r.message);
    let canaries = canaries(&bad, &nodes, 30);
    assert!(!canaries.is_empty());
    wait_versions(&edges, "worker", |_| "1.0.0".into()).await?;
    for e in &edges {
        e.wait_weight("worker", 100).await?;
    }
    let judged = analysis_event(&ws, &cp, &bad).await?;
    assert!(
        judged.detail.contains("\"log_matches\"") && judged.detail.contains("aborted"),
        "the audit log holds the numbers: {}",
        judged.detail
    );

    // The good one passes and completes.
    let good = create("3.0.0")?;
    let r = cp.wait_rollout_end(&ws, &good).await?;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    wait_versions(&edges, "worker", |_| "3.0.0".into()).await?;
    Ok(())
}

#[tokio::test]
async fn offline_and_joining_nodes_catch_up_and_a_crash_during_analysis_resumes_it(
) -> anyhow::Result<()> {
    let Fleet {
        ws,
        mut cp,
        mut edges,
    } = Fleet::start(8).await?;
    upload_worker(&ws, &cp, "1.0.0", "\"--idle\"")?;
    upload_worker(&ws, &cp, "2.0.0", "\"--idle\"")?;
    let first = cp.create_rollout(&ws, &["--module", "worker", "--version", "1.0.0"])?;
    cp.wait_rollout_end(&ws, &first).await?;

    // Two nodes go offline before the rollout.
    edges[6].kill9().await?;
    edges[7].kill9().await?;
    let id = cp.create_rollout(
        &ws,
        &[
            "--module",
            "worker",
            "--version",
            "2.0.0",
            "--step",
            "canary=50",
            "--step",
            "analysis=3s",
            "--min-reports",
            "2",
            "--max-log-matches",
            "0",
            "--step",
            "canary=100",
        ],
    )?;
    // Kill the control plane in the middle of the analysis window.
    eventually(Duration::from_secs(30), "the analysis step", || async {
        let r = cp.rollout(&ws, &id).await?;
        Ok((r.current_step == 1).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cp.kill9().await?;
    cp.restart().await?;
    // A new node joins and the offline ones come back mid-rollout.
    edges.push(Edge::start(&ws, &cp, "gw-08", &[], &["--arch", "x86_64"]).await?);
    edges[6].restart().await?;
    edges[7].restart().await?;

    let r = cp.wait_rollout_end(&ws, &id).await?;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    wait_versions(&edges, "worker", |_| "2.0.0".into()).await?;
    // One judgement of the analysis step, and it passed: no step repeated or skipped.
    let events = cp.events(&ws, "rollout.analysis").await?;
    let judged: Vec<_> = events
        .iter()
        .filter(|e| e.target == format!("rollout/{id}"))
        .collect();
    assert_eq!(judged.len(), 1, "{judged:?}");
    assert!(judged[0].detail.contains("analysis passed"), "{judged:?}");
    Ok(())
}

#[tokio::test]
async fn failing_probes_and_a_crash_loop_each_abort_the_canary_automatically() -> anyhow::Result<()>
{
    let Fleet { ws, cp, edges } = Fleet::start(5).await?;
    upload_worker(&ws, &cp, "1.0.0", "\"--idle\"")?;
    // Ready by READY=1, but its TCP probe points at a closed port: every report fails.
    upload_worker_with(
        &ws,
        &cp,
        "2.0.0",
        "\"--idle\"",
        FAILS_FAST,
        "notify = true\n[[probe]]\ntcp = \"127.0.0.1:1\"\ninterval = \"200ms\"\n",
    )?;
    // Crashes at every start.
    upload_worker_with(&ws, &cp, "3.0.0", "\"--crash-at-start\"", FAILS_FAST, "")?;
    let create = |version: &str, steps: &[&str]| create_worker_rollout(&ws, &cp, version, steps);
    let first = create("1.0.0", &[])?;
    cp.wait_rollout_end(&ws, &first).await?;
    let steps = [
        "--step",
        "canary=40",
        "--step",
        "analysis=3s",
        "--max-error-rate",
        "0.1",
        "--min-reports",
        "2",
    ];
    // Each is refused where it runs (readiness never comes: the edge rolls the canary back
    // on its own and NACKs), and the engine aborts as soon as every canary answered.
    for (round, (version, reason)) in [
        ("2.0.0", "failed to install or start"),
        ("3.0.0", "failed to install or start"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = create(version, &steps)?;
        let r = match cp.wait_rollout_end(&ws, &id).await {
            Ok(r) => r,
            Err(e) => bail!("{version}: {e}; {:?}", cp.rollout(&ws, &id).await?),
        };
        assert_eq!(
            r.state,
            pb::RolloutState::Aborted as i32,
            "{version}: {r:?}"
        );
        assert!(r.message.contains(reason), "{version}: {}", r.message);
        wait_versions(&edges, "worker", |_| "1.0.0".into()).await?;
        let events = cp.events(&ws, "rollout.aborted").await?;
        let judged = events
            .iter()
            .find(|e| e.target == format!("rollout/{id}"))
            .with_context(|| format!("no abort event for {version}"))?;
        assert!(
            judged.detail.contains("2 of 2 canary node(s)"),
            "the audit log holds the numbers: {}",
            judged.detail
        );
        let nacks = cp.events(&ws, "fleet.nack").await?;
        // Two canaries per round, each refusal audited with the edge's reason.
        assert!(
            nacks.len() >= 2 * (round + 1)
                && nacks.iter().any(|e| e.detail.contains("port closed"))
                && nacks
                    .iter()
                    .all(|e| e.detail.contains("rolled back locally")),
            "the canaries' refusals are audited with their reasons: {nacks:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn canaries_failing_more_probes_than_the_stable_nodes_are_aborted_by_the_baseline_check(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, edges } = Fleet::start(4).await?;
    let nodes: Vec<String> = edges.iter().map(|e| e.node_id.clone()).collect::<Vec<_>>();
    // Each version's TCP probe has a target of its own; closing the canary's later makes
    // the canaries fail while the stable nodes stay healthy.
    let stable_target = ProbeTarget::start()?;
    let canary_target = ProbeTarget::start()?;
    for (version, target) in [("1.0.0", &stable_target), ("2.0.0", &canary_target)] {
        upload_worker_with(
            &ws,
            &cp,
            version,
            "\"--idle\"",
            READY,
            &format!(
                "notify = true\n[[probe]]\ntcp = \"{}\"\ninterval = \"200ms\"\n",
                target.addr
            ),
        )?;
    }
    let first = create_worker_rollout(&ws, &cp, "1.0.0", &[])?;
    cp.wait_rollout_end(&ws, &first).await?;
    let id = create_worker_rollout(
        &ws,
        &cp,
        "2.0.0",
        // The pause holds the analysis until the canaries' probe target is closed: on a
        // busy machine, waiting for their first passing probes took longer than a 4 s
        // window, which then judged two healthy canaries and promoted them.
        &[
            "--step",
            "canary=50",
            "--step",
            "pause",
            "--step",
            "analysis=4s",
            "--max-error-rate-vs-baseline",
            "0.3",
            "--min-reports",
            "2",
        ],
    )?;
    let canaries = canaries(&id, &nodes, 50);
    assert_eq!(canaries.len(), 2);
    // Both canaries installed and judged ready (ACKed): the analysis window is open.
    eventually(
        Duration::from_secs(30),
        "the canaries to install 2.0.0",
        || async {
            let r = cp.rollout(&ws, &id).await?;
            Ok((r.current_step >= 1).then_some(()))
        },
    )
    .await?;
    for e in edges.iter().filter(|e| canaries.contains(&e.node_id)) {
        assert_eq!(
            e.module_version("worker").as_deref(),
            Some("2.0.0"),
            "{}",
            e.node_id
        );
    }
    // An ACK means installed; ready comes after (slowly on a busy machine). Only a canary
    // that passed its probes as 2.0.0 may have its probe target closed: before that, it
    // would never become ready and roll back locally, which is another test.
    for c in &canaries {
        eventually(
            Duration::from_secs(30),
            &format!("{c} to run 2.0.0 with passing probes"),
            || async {
                let node = cp.node(&ws, c).await?;
                Ok(node
                    .module_rollouts
                    .iter()
                    .filter_map(|m| m.health.as_ref())
                    .any(|h| h.version == "2.0.0" && h.probe_successes > 0 && h.probe_failures == 0)
                    .then_some(()))
            },
        )
        .await?;
    }
    drop(canary_target);
    cp.cli(&ws, &["rollout", "promote", &id])?;
    let r = cp.wait_rollout_end(&ws, &id).await?;
    if r.state != pb::RolloutState::Aborted as i32 {
        let mut why = Vec::new();
        for n in &nodes {
            let node = cp.node(&ws, n).await?;
            why.extend(node.module_rollouts.iter().map(|m| format!("{n}: {m:?}")));
        }
        for e in edges.iter().filter(|e| canaries.contains(&e.node_id)) {
            why.push(format!("--- {} log:\n{}", e.node_id, e.log()));
        }
        bail!("{r:?}\n{}", why.join("\n"));
    }
    assert!(r.message.contains("stable nodes'"), "{}", r.message);
    for e in &edges {
        eventually(
            Duration::from_secs(20),
            &format!("{} back on 1.0.0", e.node_id),
            || async { Ok((e.module_version("worker").as_deref() == Some("1.0.0")).then_some(())) },
        )
        .await?;
    }
    let judged = analysis_event(&ws, &cp, &id).await?;
    assert!(
        judged.detail.contains("\"baseline\"") && judged.detail.contains("aborted"),
        "the audit log holds canary and baseline figures: {}",
        judged.detail
    );
    drop(stable_target);
    Ok(())
}

/// Issue 11, item 9: a canary rollout over a bad network: one node on a long path
/// (latency), one whose connection is cut mid-rollout, one behind a blackhole while the
/// canary step runs. Every node ends on the version its bucket gives it.
#[tokio::test]
async fn a_canary_rollout_over_a_slow_a_cut_and_a_blackholed_link_ends_right_everywhere(
) -> anyhow::Result<()> {
    use aviary_tests::proxy::{Mode, Proxy};
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--keepalive", "500ms"]).await?;
    let mut proxies = Vec::new();
    let mut edges = Vec::new();
    for i in 0..4 {
        let proxy = Proxy::start(cp.addr).await?;
        let url = format!("https://localhost:{}", proxy.addr.port());
        edges.push(
            Edge::start_via(
                &ws,
                &url,
                &format!("gw-{i}"),
                &[("tier", "edge")],
                &["--arch", "x86_64", "--keepalive", "500ms"],
            )
            .await?,
        );
        proxies.push(proxy);
    }
    proxies[0].set(Mode::Latency(Duration::from_millis(200)));
    model_1_everywhere(&ws, &cp, &edges).await?;

    proxies[2].set(Mode::Freeze);
    let id = cp.create_rollout(
        &ws,
        &[
            "--module",
            "model",
            "--version",
            "2.0.0",
            "--step",
            "canary=50",
            "--step",
            "pause",
        ],
    )?;
    proxies[1].cut();
    eventually(Duration::from_secs(30), "the pause step", || async {
        let r = cp.rollout(&ws, &id).await?;
        Ok((r.state == pb::RolloutState::Paused as i32).then_some(()))
    })
    .await?;
    let nodes: Vec<String> = edges.iter().map(|e| e.node_id.clone()).collect::<Vec<_>>();
    let half = canaries(&id, &nodes, 50);
    // The blackholed node is back before the check; the others never left.
    proxies[2].set(Mode::Pass);
    proxies[2].cut();
    wait_versions(&edges, "model", |n| new_on(&half, n)).await?;
    cp.cli(&ws, &["rollout", "promote", &id, "--full"])?;
    wait_versions(&edges, "model", |_| "2.0.0".into()).await?;
    eventually(
        Duration::from_secs(30),
        "the rollout to succeed",
        || async {
            let r = cp.rollout(&ws, &id).await?;
            Ok((r.state == pb::RolloutState::Succeeded as i32).then_some(()))
        },
    )
    .await?;
    Ok(())
}
