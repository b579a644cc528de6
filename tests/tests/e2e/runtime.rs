//! Modules running under the edge daemon: hot swap through a daemon-owned socket under
//! load, and local rollback of a version that never becomes ready or crashes at start.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use aviary_tests::{
    bin, eventually, free_port, Admin, ControlPlane, Daemon, Edge, Fleet, Workspace,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts a rollout of `module` `version` to every node; its id.
pub(crate) async fn deploy(
    admin: &mut Admin,
    module: &str,
    version: &str,
) -> anyhow::Result<String> {
    Ok(admin
        .rollouts
        .create_rollout(pb::CreateRolloutRequest {
            module: module.into(),
            version: version.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

/// One `GET /` over a fresh connection: the version served.
pub(crate) async fn get(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("bad reply {text:?}");
    }
    Ok(text.lines().last().unwrap_or_default().trim().to_owned())
}

/// The sample module's run spec on a daemon-owned socket at `port`, probed every 200 ms.
pub(crate) fn spec(port: u16, extra_args: &str) -> String {
    format!(
        "args = [{extra_args}]\nlisten = \"127.0.0.1:{port}\"\nnotify = true\nready_timeout = \"5s\"\nlog_patterns = [\"ERROR\"]\n\
         [[probe]]\nhttp = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\n"
    )
}

/// Waits until `node` refuses the revision it is meant to run; its module status then.
pub(crate) async fn refusal(
    ws: &Workspace,
    cp: &ControlPlane,
    node: &str,
) -> anyhow::Result<pb::ModuleRollout> {
    eventually(
        Duration::from_secs(120),
        &format!("{node} to refuse its desired revision"),
        || async {
            let status = cp.node(ws, node).await?;
            Ok(status
                .module_rollouts
                .into_iter()
                .find(|m| m.nacked_revision > 0 && m.nacked_revision == m.desired_revision))
        },
    )
    .await
}

/// Clients that `GET /` a module over and over, counting what fails.
pub(crate) struct Hammer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    last: Arc<std::sync::Mutex<String>>,
    clients: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Hammer {
    /// Starts `n` clients of `addr`, each one request at a time on a fresh connection.
    pub(crate) fn start(addr: SocketAddr, n: usize) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let last = Arc::new(std::sync::Mutex::new(String::new()));
        let clients = (0..n)
            .map(|_| {
                let (stop, ok, last) = (stop.clone(), ok.clone(), last.clone());
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match get(addr).await {
                            Ok(v) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut last) = last.lock() {
                                    *last = v;
                                }
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    errors
                })
            })
            .collect();
        Hammer {
            stop,
            ok,
            last,
            clients,
        }
    }

    /// Waits until `n` requests have succeeded (the load is on before a swap starts).
    pub(crate) async fn wait_ok(&self, n: u64) -> anyhow::Result<()> {
        eventually(Duration::from_secs(60), "the load to start", || async {
            Ok((self.ok.load(Ordering::Relaxed) >= n).then_some(()))
        })
        .await
    }

    /// Waits until a reply names `version`.
    pub(crate) async fn wait_version(&self, version: &str) -> anyhow::Result<()> {
        eventually(
            Duration::from_secs(120),
            &format!("{version} to serve"),
            || async {
                let last = self.last.lock().map(|l| l.clone()).unwrap_or_default();
                Ok((last == version).then_some(()))
            },
        )
        .await
    }

    /// Stops the clients; fails if any request failed or fewer than `min_ok` succeeded.
    pub(crate) async fn finish(self, min_ok: u64) -> anyhow::Result<()> {
        // A little load after the swap too: the old process is gone by now.
        let after = self.ok.load(Ordering::Relaxed) + 10;
        self.wait_ok(after).await?;
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for c in self.clients {
            errors.extend(c.await?);
        }
        let ok = self.ok.load(Ordering::Relaxed);
        anyhow::ensure!(
            ok >= min_ok,
            "{ok} requests: too little load to mean anything"
        );
        anyhow::ensure!(
            errors.is_empty(),
            "requests failed across the swap: {errors:?}"
        );
        Ok(())
    }
}

/// Waits until rollout `id` has an outcome.
pub(crate) async fn settled(
    ws: &Workspace,
    cp: &ControlPlane,
    id: &str,
) -> anyhow::Result<pb::Rollout> {
    eventually(
        Duration::from_secs(120),
        &format!("rollout {id} to settle"),
        || async {
            let mut admin = ws.admin(cp).await?;
            let r = rollout_of(&mut admin, id).await?;
            Ok((r.state != pb::RolloutState::Progressing as i32).then_some(r))
        },
    )
    .await
}

async fn rollout_of(admin: &mut Admin, id: &str) -> anyhow::Result<pb::Rollout> {
    Ok(admin
        .rollouts
        .get_rollout(pb::GetRolloutRequest { id: id.into() })
        .await?
        .into_inner())
}

#[tokio::test]
async fn a_hot_swap_under_load_refuses_no_connection_and_a_bad_version_rolls_back_locally(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let edge = Edge::start(&ws, &cp, "gw-1", &[], &["--arch", "x86_64"]).await?;
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (v1, v2, v3) = (
        ws.sample_release("1.0.0")?,
        ws.sample_release("2.0.0")?,
        ws.sample_release("3.0.0")?,
    );
    cp.upload_release(&ws, "sample", "1.0.0", &v1, &spec(port, ""))?;
    cp.upload_release(&ws, "sample", "2.0.0", &v2, &spec(port, ""))?;
    cp.upload_release(
        &ws,
        "sample",
        "3.0.0",
        &v3,
        &spec(port, "\"--never-ready\""),
    )?;
    let mut admin = ws.admin(&cp).await?;

    let r1 = deploy(&mut admin, "sample", "1.0.0").await?;
    settled(&ws, &cp, &r1).await?;
    eventually(Duration::from_secs(30), "v1 to serve", || async {
        Ok(get(addr).await.ok().filter(|v| v == "1.0.0").map(|_| ()))
    })
    .await
    .with_context(|| edge.log())?;

    // Hammer the module through the daemon's socket while v2 replaces v1.
    let hammer = Hammer::start(addr, 4);
    hammer.wait_ok(10).await?;
    let r2 = deploy(&mut admin, "sample", "2.0.0").await?;
    hammer.wait_version("2.0.0").await?;
    settled(&ws, &cp, &r2).await?;
    hammer.finish(50).await?;

    // Health reports reach the control plane every second.
    let health = eventually(Duration::from_secs(10), "a health report of v2", || async {
        let node = cp.node(&ws, "gw-1").await?;
        Ok(node
            .module_rollouts
            .into_iter()
            .filter_map(|m| m.health)
            .find(|h| h.version == "2.0.0" && h.probe_successes > 0))
    })
    .await?;
    assert_eq!(health.process_state, "running");
    assert_eq!(health.probe_failures, 0, "{health:?}");
    assert!(health.latency_p99_ms > 0.0, "{health:?}");

    // v3 never becomes ready: the daemon kills it, v2 keeps serving, the node reports it.
    let r3 = deploy(&mut admin, "sample", "3.0.0").await?;
    let node = refusal(&ws, &cp, "gw-1")
        .await
        .with_context(|| edge.log())?;
    assert!(
        node.nack_error.contains("not ready")
            && node.nack_error.contains("rolled back locally to 2.0.0"),
        "{node:?}"
    );
    assert_eq!(
        get(addr).await.context("v2 after the failed swap")?,
        "2.0.0"
    );
    let r = settled(&ws, &cp, &r3).await?;
    assert_eq!(r.state, pb::RolloutState::Failed as i32, "{r:?}");
    assert_eq!(r.progress.map(|p| p.failed), Some(1), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn a_version_that_crashes_at_start_is_replaced_by_the_previous_one() -> anyhow::Result<()> {
    // No daemon-owned socket: the old process must stop before the new binds its port,
    // so a failed start brings the old one back.
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let edge = Edge::start(&ws, &cp, "gw-1", &[], &["--arch", "x86_64"]).await?;
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let own_port = |extra: &str| {
        format!(
            "args = [\"--port\", \"{port}\"{extra}]\nready_timeout = \"5s\"\n[[probe]]\ntcp = \"127.0.0.1:{port}\"\n"
        )
    };
    let (v1, v2) = (ws.sample_release("1.0.0")?, ws.sample_release("2.0.0")?);
    cp.upload_release(&ws, "plain", "1.0.0", &v1, &own_port(""))?;
    cp.upload_release(
        &ws,
        "plain",
        "2.0.0",
        &v2,
        &own_port(", \"--crash-at-start\""),
    )?;
    let mut admin = ws.admin(&cp).await?;
    let r1 = deploy(&mut admin, "plain", "1.0.0").await?;
    settled(&ws, &cp, &r1).await?;
    eventually(Duration::from_secs(30), "v1 to serve", || async {
        Ok(get(addr).await.ok().filter(|v| v == "1.0.0").map(|_| ()))
    })
    .await
    .with_context(|| edge.log())?;
    deploy(&mut admin, "plain", "2.0.0").await?;
    let nacked = eventually(
        Duration::from_secs(30),
        "the crash to be reported",
        || async {
            let node = cp.node(&ws, "gw-1").await?;
            Ok(node
                .module_rollouts
                .into_iter()
                .find(|m| m.nacked_revision > 0 && m.nacked_revision == m.desired_revision))
        },
    )
    .await?;
    assert!(
        nacked.nack_error.contains("exited during start"),
        "{nacked:?}"
    );
    eventually(Duration::from_secs(10), "v1 to serve again", || async {
        Ok(get(addr).await.ok().filter(|v| v == "1.0.0").map(|_| ()))
    })
    .await
    .with_context(|| edge.log())?;
    Ok(())
}

/// What `state.json` says runs, after checking the slot is complete and intact.
fn current_slot(edge: &Edge, module: &str) -> anyhow::Result<String> {
    let dir = edge.state_dir.join("modules").join(module);
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    let cur = &st["current"];
    let (id, version, sha) = (
        cur["id"].as_str().context("current id")?,
        cur["version"].as_str().context("current version")?,
        cur["sha256"].as_str().context("current sha256")?,
    );
    let bytes = std::fs::read(dir.join("slots").join(id).join("artifact"))?;
    assert_eq!(
        aviary_proto::digest::Sha256::of(&bytes).hex(),
        sha,
        "slot {id} is not the artifact state.json names"
    );
    Ok(version.to_owned())
}

/// Temp files and slots nothing refers to.
fn strays(edge: &Edge, module: &str) -> anyhow::Result<Vec<String>> {
    let dir = edge.state_dir.join("modules").join(module);
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    let keep: Vec<&str> = ["current", "previous"]
        .iter()
        .filter_map(|k| st[k]["id"].as_str())
        .collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("tmp"))?.flatten() {
        out.push(e.path().display().to_string());
    }
    for e in std::fs::read_dir(dir.join("slots"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name.as_str()) {
            out.push(name);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn kill9_of_the_daemon_during_installs_and_swaps_always_leaves_old_or_new(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let mut edge = Edge::start(&ws, &cp, "gw-1", &[], &["--arch", "x86_64"]).await?;
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let rounds = 6;
    for i in 0..=rounds {
        let v = format!("1.0.{i}");
        cp.upload_release(&ws, "sample", &v, &ws.sample_release(&v)?, &spec(port, ""))?;
    }
    let mut admin = ws.admin(&cp).await?;
    let r = deploy(&mut admin, "sample", "1.0.0").await?;
    settled(&ws, &cp, &r).await?;

    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 1..=rounds {
        let (old, new) = (format!("1.0.{}", i - 1), format!("1.0.{i}"));
        let r = deploy(&mut admin, "sample", &new).await?;
        // Somewhere in transfer, install, fsync, switch or swap.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
        edge.kill9().await?;
        let on_disk = current_slot(&edge, "sample")?;
        assert!(
            on_disk == old || on_disk == new,
            "seed {seed}, round {i}: state.json names {on_disk}, neither {old} nor {new}"
        );
        edge.restart().await?;
        // It serves what its state dir says, and then finishes the rollout.
        let served = eventually(
            Duration::from_secs(30),
            "the module to serve again",
            || async { Ok(get(addr).await.ok()) },
        )
        .await
        .with_context(|| format!("seed {seed}, round {i}:\n{}", edge.log()))?;
        assert!(
            served == old || served == new,
            "seed {seed}, round {i}: serves {served}"
        );
        settled(&ws, &cp, &r).await?;
        assert_eq!(
            current_slot(&edge, "sample")?,
            new,
            "seed {seed}, round {i}"
        );
        let left = strays(&edge, "sample")?;
        assert!(left.is_empty(), "seed {seed}, round {i}: left {left:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_bundle_applied_beside_a_running_daemon_is_picked_up_without_a_control_plane(
) -> anyhow::Result<()> {
    // No control plane at all: the daemon runs what its state dir holds.
    let ws = Workspace::new()?;
    let edge = Edge::start_via(
        &ws,
        "https://127.0.0.1:9",
        "gw-1",
        &[],
        &["--arch", "x86_64"],
    )
    .await?;
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let spec_file = ws.path("run.toml");
    std::fs::write(&spec_file, spec(port, ""))?;
    for version in ["1.0.0", "2.0.0"] {
        let file = ws.sample_release(version)?;
        let bundle = ws.path(&format!("sample-{version}.bundle"));
        let o = Command::new(bin("aviary")?)
            .args(ws.release_args("bundle", "sample", version, "x86_64", &file))
            .arg("--run-spec")
            .arg(&spec_file)
            .arg("--out")
            .arg(&bundle)
            .output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = Command::new(bin("aviary-edge")?)
            .args(["apply", "--arch", "x86_64", "--state-dir"])
            .arg(&edge.state_dir)
            .arg("--certs")
            .arg(&ws.pki.dir)
            .arg(&bundle)
            .output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        eventually(
            Duration::from_secs(20),
            &format!("{version} to serve"),
            || async { Ok(get(addr).await.ok().filter(|v| v == version).map(|_| ())) },
        )
        .await
        .with_context(|| edge.log())?;
    }
    Ok(())
}

/// Pids of the processes running an artifact of `module` installed by `edge`.
fn module_pids(edge: &Edge, module: &str) -> Vec<u32> {
    let slots = edge.state_dir.join("modules").join(module).join("slots");
    let slots = std::fs::canonicalize(&slots).unwrap_or(slots);
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(&slots).then_some(pid)
        })
        .collect()
}

/// uid and gid of a local user, from /etc/passwd.
fn passwd_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .with_context(|| format!("no user {user}: scripts/test creates it (useradd --system)"))
}

#[tokio::test]
async fn a_module_with_a_user_runs_as_that_user_with_no_other_groups() -> anyhow::Result<()> {
    let (uid, gid) = passwd_ids("aviary-mod")?;
    let ws = Workspace::new()?;
    // The workspace stands in for /var/lib: others may pass through it, as on a gateway.
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    // As the shipped unit starts it: its capabilities, no_new_privs and UMask=0077, so
    // everything the daemon makes is private unless it opens it on purpose.
    let edge = Edge::start_as_unit(&ws, &cp, "gw-1", &["--arch", "x86_64"]).await?;
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let v1 = ws.sample_release("1.0.0")?;
    let spec = format!("user = \"aviary-mod\"\n{}", spec(port, ""));
    cp.upload_release(&ws, "sample", "1.0.0", &v1, &spec)?;
    let mut admin = ws.admin(&cp).await?;
    let r = settled(&ws, &cp, &deploy(&mut admin, "sample", "1.0.0").await?).await?;
    assert_eq!(
        r.state,
        pb::RolloutState::Succeeded as i32,
        "{r:?}\n{}",
        edge.log()
    );
    assert_eq!(get(addr).await?, "1.0.0");

    let pids = module_pids(&edge, "sample");
    assert_eq!(pids.len(), 1, "{pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0]))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    // Real, effective, saved and filesystem ids all switched; root's groups are gone.
    assert_eq!(
        field("Uid:"),
        format!("{uid} {uid} {uid} {uid}"),
        "{status}"
    );
    assert_eq!(
        field("Gid:"),
        format!("{gid} {gid} {gid} {gid}"),
        "{status}"
    );
    assert_eq!(field("Groups:"), "", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    Ok(())
}
