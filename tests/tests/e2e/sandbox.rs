//! The module sandbox the daemon applies itself: a module gets the devices, address
//! families, writable paths, executable memory and memory limit its signed run spec
//! names, and nothing else, even as root. These run where systemd is not PID 1, as on a
//! gateway without systemd, with the daemon holding only what the shipped unit gives it
//! (`Edge::start_as_unit`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use aviary_proto::v1 as pb;
use aviary_tests::{eventually, free_port, ControlPlane, Edge, Fleet, Workspace};

use crate::runtime::{deploy, get, refusal, settled, Hammer};

/// A module that tries what a module might want to do and prints one
/// `SANDBOX <tag> <what>=ok|denied` line each, then idles.
const PROBE_MODULE: &str = r#"#!/bin/sh
tag=$1 named=$2 other=$3 wdir=$4 state=$5 certs=$6
try() {
  what=$1; shift
  if "$@" >/dev/null 2>&1; then r=ok; else r=denied; fi
  echo "SANDBOX $tag $what=$r"
}
try named_device sh -c ': <>"$0"' "$named"
try other_device sh -c ': <>"$0"' "$other"
try dev_null sh -c 'echo x >/dev/null'
try list_dev ls /dev
try write_granted sh -c 'echo x >"$0/$1"' "$wdir" "$tag"
try write_elsewhere sh -c 'echo x >"$0/$1"' "$(dirname "$wdir")" "$tag"
try write_tmp sh -c 'echo x >"/tmp/aviary-sandbox-$0-$$"' "$tag"
try read_state ls "$state"
try read_certs ls "$certs"
try netlink /usr/bin/python3 -c 'import socket; socket.socket(16, socket.SOCK_RAW, 0)'
try inet /usr/bin/python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM)'
try mem_8m /usr/bin/python3 -c 'b = b"x" * (8 << 20)'
try mem_128m /usr/bin/python3 -c 'b = b"x" * (128 << 20)'
echo "SANDBOX $tag $(grep CapEff /proc/self/status | tr -d ' \t')"
echo "SANDBOX $tag done=ok"
while :; do sleep 3600; done
"#;

/// A Node.js module serving `GET /` with its version on the daemon's socket (fd 3), ending
/// gracefully on SIGTERM.
const NODE_MODULE: &str = r#"#!/usr/bin/node
'use strict';
const http = require('http');
const version = process.argv[2];
const server = http.createServer((req, res) => {
  const body = req.url === '/healthz' ? 'ok\n' : version + '\n';
  res.writeHead(200, {
    'content-type': 'text/plain',
    'content-length': Buffer.byteLength(body),
    connection: 'close',
  });
  res.end(body);
});
server.listen({ fd: 3 }, () => console.log(`node module ${version} serving`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
"#;

/// Device nodes made under `/dev` for one test (a `/dev/null`-style node: major 1,
/// minor 3), removed on drop.
struct TestDevices(Vec<PathBuf>);

impl TestDevices {
    /// Makes one node per name, `/dev/aviary-test-PID-NAME`.
    fn make(names: &[&str]) -> anyhow::Result<TestDevices> {
        let mut made = TestDevices(Vec::new());
        for name in names {
            let path = PathBuf::from(format!("/dev/aviary-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let status = std::process::Command::new("mknod")
                .args(["-m", "0666"])
                .arg(&path)
                .args(["c", "1", "3"])
                .status()?;
            anyhow::ensure!(
                status.success(),
                "mknod {} (tests run as root)",
                path.display()
            );
            made.0.push(path);
        }
        Ok(made)
    }
}

impl Drop for TestDevices {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The memory cgroup line of `pid`'s `/proc/PID/cgroup` (v1 `memory`, or v2's only one).
fn memory_cgroup(pid: u32) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find(|l| l.contains(":memory:") || l.starts_with("0::"))
        .map(str::to_owned)
        .context("no memory cgroup line")
}

/// The child of `parent` with `arg` among its arguments (a script module's shell).
fn child_with_arg(parent: u32, arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // The command name in ( ) may hold spaces: fields count from the last ')'.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        (ppid == parent && cmdline.split(|&b| b == 0).any(|a| a == arg.as_bytes())).then_some(pid)
    })
}

/// Writes `text` as an executable artifact in the workspace.
fn artifact(ws: &Workspace, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = ws.path(name);
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// The `SANDBOX tag what=result` lines of `log`, once `tag` printed `done`.
fn outcomes(log: &str, tag: &str) -> Option<BTreeMap<String, String>> {
    let mut seen = BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line.split("SANDBOX ").nth(1) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        if words.next() != Some(tag) {
            continue;
        }
        let Some((what, result)) = words.next().and_then(|w| w.split_once(['=', ':'])) else {
            continue;
        };
        seen.insert(what.to_owned(), result.to_owned());
    }
    seen.contains_key("done").then_some(seen)
}

/// Uploads and rolls out `module` with `spec` to `edge`; fails unless it succeeds.
async fn roll(
    ws: &Workspace,
    cp: &ControlPlane,
    edge: &Edge,
    module: &str,
    version: &str,
    artifact: &Path,
    spec: &str,
) -> anyhow::Result<()> {
    cp.upload_release(ws, module, version, artifact, spec)?;
    let mut admin = ws.admin(cp).await?;
    let r = settled(ws, cp, &deploy(&mut admin, module, version).await?).await?;
    anyhow::ensure!(
        r.state == pb::RolloutState::Succeeded as i32,
        "{r:?}\n{}",
        edge.log()
    );
    Ok(())
}

#[tokio::test]
async fn a_module_gets_the_devices_families_paths_and_memory_its_spec_names_and_nothing_else(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let edge = Edge::start_as_unit(&ws, &cp, "gw-1", &["--arch", "x86_64"]).await?;
    let devices = TestDevices::make(&["named", "other"])?;
    let (named, other) = (devices.0[0].display(), devices.0[1].display());
    let probe = artifact(&ws, "probe-module", PROBE_MODULE)?;
    let state = edge.state_dir.display();
    let certs = ws.pki.dir.display();
    let mut writable = Vec::new();
    for tag in ["boxed", "granted"] {
        let dir = ws.path(&format!("data-{tag}"));
        std::fs::create_dir(&dir)?;
        writable.push(dir);
    }
    let args = |tag: &str, wdir: &Path| {
        format!(
            "args = [\"{tag}\", \"{named}\", \"{other}\", \"{}\", \"{state}\", \"{certs}\"]\n",
            wdir.display()
        )
    };

    // Nothing granted: as root, yet Landlock and seccomp keep it to the base set.
    roll(
        &ws,
        &cp,
        &edge,
        "boxed",
        "1.0.0",
        &probe,
        &args("boxed", &writable[0]),
    )
    .await?;
    let granted_spec = format!(
        "{}devices = [\"{named}\"]\naddress_families = [\"AF_NETLINK\"]\nwritable = [\"{}\"]\nmemory_max = \"48M\"\n",
        args("granted", &writable[1]),
        writable[1].display()
    );
    roll(&ws, &cp, &edge, "granted", "1.0.0", &probe, &granted_spec).await?;

    let boxed = eventually(
        Duration::from_secs(60),
        "the boxed module's report",
        || async { Ok(outcomes(&edge.log(), "boxed")) },
    )
    .await?;
    let granted = eventually(
        Duration::from_secs(60),
        "the granted module's report",
        || async { Ok(outcomes(&edge.log(), "granted")) },
    )
    .await?;
    let expect = |seen: &BTreeMap<String, String>, rows: &[(&str, &str)]| {
        for (what, result) in rows {
            assert_eq!(
                seen.get(*what).map(String::as_str),
                Some(*result),
                "{what}: {seen:?}\n{}",
                edge.log()
            );
        }
    };
    let closed = [
        ("other_device", "denied"),
        ("dev_null", "ok"),
        ("list_dev", "denied"),
        ("write_elsewhere", "denied"),
        ("write_tmp", "denied"),
        ("read_state", "denied"),
        ("read_certs", "denied"),
        ("inet", "ok"),
        ("mem_8m", "ok"),
        ("CapEff", "0000000000000000"),
    ];
    expect(&boxed, &closed);
    expect(&granted, &closed);
    expect(
        &boxed,
        &[
            ("named_device", "denied"),
            ("write_granted", "denied"),
            ("netlink", "denied"),
            // No limit asked, none applied: the 128 MiB below fails by the limit alone.
            ("mem_128m", "ok"),
        ],
    );
    expect(
        &granted,
        &[
            ("named_device", "ok"),
            ("write_granted", "ok"),
            ("netlink", "ok"),
            ("mem_128m", "denied"),
        ],
    );
    assert!(writable[1].join("granted").exists());
    // The limit is a cgroup of the module's own where the daemon can make one (here:
    // root, a writable memory hierarchy), else RLIMIT_DATA; either way 128 MiB failed.
    let daemon = edge.pid().context("daemon gone")?;
    // The daemon held only the unit's capabilities (KILL, SETGID, SETUID, SETPCAP) and
    // no_new_privs, and still confined its modules.
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status"))?;
    assert!(status.contains("CapBnd:\t00000000000001e0"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let pid = child_with_arg(daemon, "granted").context("no granted module process")?;
    let cgroup = memory_cgroup(pid)?;
    if cgroup.contains("/aviary-granted-") {
        let boxed = child_with_arg(daemon, "boxed").context("no boxed module process")?;
        assert!(
            !memory_cgroup(boxed)?.contains("/aviary-"),
            "boxed has no limit"
        );
    } else {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max data size") && l.contains(&(48u64 << 20).to_string())),
            "neither a cgroup ({cgroup}) nor RLIMIT_DATA: {limits}"
        );
    }
    assert!(!writable[0].join("boxed").exists());

    // A spec naming a device this gateway lacks is refused, naming it; the running
    // version stays.
    let missing = format!("/dev/aviary-test-{}-absent", std::process::id());
    let spec = format!("{}devices = [\"{missing}\"]\n", args("boxed", &writable[0]));
    cp.upload_release(&ws, "boxed", "2.0.0", &probe, &spec)?;
    let mut admin = ws.admin(&cp).await?;
    deploy(&mut admin, "boxed", "2.0.0").await?;
    let refused = refusal(&ws, &cp, "gw-1").await?;
    assert!(
        refused
            .nack_error
            .contains(&format!("device {missing} named in the run spec")),
        "{refused:?}"
    );
    assert_eq!(refused.health.map(|h| h.version).as_deref(), Some("1.0.0"));
    Ok(())
}

#[tokio::test]
async fn a_nodejs_module_with_jit_serves_and_hot_swaps_and_one_without_jit_is_rolled_back(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    // The module runs as aviary-mod, which must pass through the workspace as through
    // /var/lib on a gateway.
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let edge = Edge::start_as_unit(&ws, &cp, "gw-1", &["--arch", "x86_64"]).await?;
    let node = artifact(&ws, "node-module.js", NODE_MODULE)?;
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let spec = |version: &str, jit: bool| {
        format!(
            "user = \"aviary-mod\"\nargs = [\"{version}\"]\nlisten = \"127.0.0.1:{port}\"\njit = {jit}\n\
             memory_max = \"256M\"\nready_timeout = \"60s\"\n\
             [[probe]]\nhttp = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"200ms\"\ntimeout = \"2s\"\n"
        )
    };
    roll(&ws, &cp, &edge, "web", "1.0.0", &node, &spec("1.0.0", true)).await?;
    assert_eq!(get(addr).await?, "1.0.0");

    let hammer = Hammer::start(addr, 4);
    hammer.wait_ok(20).await?;
    roll(&ws, &cp, &edge, "web", "2.0.0", &node, &spec("2.0.0", true)).await?;
    hammer.wait_version("2.0.0").await?;
    hammer.finish(40).await?;

    // V8 cannot start without writable-and-executable memory: the daemon rolls back.
    cp.upload_release(&ws, "web", "3.0.0", &node, &spec("3.0.0", false))?;
    let mut admin = ws.admin(&cp).await?;
    deploy(&mut admin, "web", "3.0.0").await?;
    let refused = refusal(&ws, &cp, "gw-1")
        .await
        .with_context(|| edge.log())?;
    assert!(
        refused.nack_error.contains("rolled back locally to 2.0.0"),
        "{refused:?}\n{}",
        edge.log()
    );
    assert!(edge.log().contains("V8_Fatal"), "{}", edge.log());
    assert_eq!(get(addr).await?, "2.0.0");
    Ok(())
}
