//! End-to-end harness: starts the real binaries on ephemeral loopback ports in temp dirs
//! with a PKI minted per test, and offers the waits and clients the scenarios need.
//! Also home of the raw fleet-protocol client shared by tests and the fleet simulator.
#![forbid(unsafe_code)]

pub mod fake_cp;
mod fleet;
pub mod foreign;
pub mod fuzz_targets;
pub mod proxy;
pub mod raw;
pub mod sensors;
pub mod sims;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aviary_certs::{InitOptions, Pki};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use aviary_cli::Admin;
pub use fleet::{active, wait_versions, Fleet};

/// Directory of the built binaries (`target/debug` next to the running test binary), or
/// `AVIARY_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AVIARY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Tests run from target/PROFILE/deps, bench binaries from target/PROFILE.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        dir
    }
}

/// Path of one of the workspace binaries; fails with the command that builds them.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} missing: run `cargo build --workspace --bins` (scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Tools `scripts/test` installs into `.tools/` (grpcurl, Python packages).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("AVIARY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools"))
}

/// Polls `check` every 20 ms until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback port (for the metrics listeners, which cannot report port 0 back).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// This build's daemon as the shipped unit starts it, as far as a process without
/// systemd can: the unit's `CapabilityBoundingSet=` (which is then all root holds),
/// `NoNewPrivileges=` and `UMask=`, read from the unit file itself. An executable and
/// its leading arguments.
fn edge_as_unit() -> anyhow::Result<Vec<String>> {
    let unit =
        std::fs::read_to_string(repo_root().join("edge-daemon/systemd/aviary-edge.service"))?;
    let setting = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
            .with_context(|| format!("no {key}= in the edge unit"))
    };
    let mut bounding = String::from("-all");
    for cap in setting("CapabilityBoundingSet")?.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .context("capability without CAP_")?;
        bounding.push_str(&format!(",+{}", name.to_ascii_lowercase()));
    }
    anyhow::ensure!(
        setting("NoNewPrivileges")? == "yes",
        "the unit sets no_new_privs"
    );
    Ok(vec![
        "setpriv".into(),
        "--bounding-set".into(),
        bounding,
        "--inh-caps".into(),
        "-all".into(),
        "--no-new-privs".into(),
        "--".into(),
        "/bin/sh".into(),
        "-c".into(),
        format!("umask {} && exec \"$0\" \"$@\"", setting("UMask")?),
        bin("aviary-edge")?.display().to_string(),
    ])
}

/// A loopback port for TCP probes that accepts and drops every connection until it is
/// dropped, then refuses. A listener nobody accepts on fills its backlog after a few
/// hundred probes and then times them out, which reads as a failing target.
pub struct ProbeTarget {
    /// Where the probes connect.
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProbeTarget {
    /// Binds an ephemeral loopback port and starts accepting.
    pub fn start() -> anyhow::Result<ProbeTarget> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                drop(conn);
            }
        });
        Ok(ProbeTarget {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ProbeTarget {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the blocked accept; the thread then drops the listener.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A temp dir with a fresh PKI in `pki/`, removed on drop.
pub struct Workspace {
    /// The temp dir.
    pub dir: tempfile::TempDir,
    /// The PKI in it.
    pub pki: Pki,
}

impl Workspace {
    /// Makes the dir and the PKI.
    pub fn new() -> anyhow::Result<Workspace> {
        let dir = tempfile::Builder::new().prefix("aviary-test-").tempdir()?;
        let pki = Pki::init(&dir.path().join("pki"), &InitOptions::default())?;
        Ok(Workspace { dir, pki })
    }

    /// A path inside the workspace.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh gateway's certs dir, as a factory image ships it: the deployment's
    /// `ca.pem` and `release-signing.pub`, no key and no certificate of its own.
    pub fn gateway_certs(&self, node_id: &str) -> anyhow::Result<PathBuf> {
        let dir = self.path(&format!("gateway-{node_id}-certs"));
        std::fs::create_dir_all(&dir)?;
        for f in ["ca.pem", "release-signing.pub"] {
            std::fs::copy(self.pki.dir.join(f), dir.join(f))?;
        }
        Ok(dir)
    }

    /// `release ACTION --module M --version V --target T --file F --sign-key KEY`: how every
    /// signed upload or bundle of the tests starts.
    pub fn release_args(
        &self,
        action: &str,
        module: &str,
        version: &str,
        target: &str,
        file: &Path,
    ) -> Vec<String> {
        let key = self.pki.dir.join("release-signing.key");
        [
            "release",
            action,
            "--module",
            module,
            "--version",
            version,
            "--target",
            target,
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([
            "--file".into(),
            file.display().to_string(),
            "--sign-key".into(),
            key.display().to_string(),
        ])
        .collect()
    }

    /// `aviary release bundle` of `file` as `module` `version` for x86_64 (a delta from
    /// `base` if given, when smaller), written to `out`.
    pub fn bundle(
        &self,
        module: &str,
        version: &str,
        file: &Path,
        base: Option<&Path>,
        out: &Path,
    ) -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(bin("aviary")?);
        cmd.args(self.release_args("bundle", module, version, "x86_64", file))
            .arg("--out")
            .arg(out);
        if let Some(base) = base {
            cmd.arg("--base").arg(base);
        }
        let o = cmd.output()?;
        if !o.status.success() {
            bail!("bundle: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(())
    }

    /// The certificate files of edge `node_id`.
    pub fn edge_files(&self, node_id: &str) -> aviary_certs::TlsFiles {
        let paths = self.pki.edge(node_id);
        aviary_certs::TlsFiles {
            ca: self.pki.ca_cert(),
            cert: paths.cert,
            key: paths.key,
        }
    }

    /// An mTLS link to `cp` as edge `node_id` (its certificate issued if need be).
    pub fn edge_link(
        &self,
        cp: &ControlPlane,
        node_id: &str,
    ) -> anyhow::Result<aviary_certs::Link> {
        self.edge_cert(node_id)?;
        Ok(aviary_certs::Link::new(
            &cp.url(),
            &self.edge_files(node_id),
        )?)
    }

    /// Issues an edge certificate for `node_id`.
    pub fn edge_cert(&self, node_id: &str) -> anyhow::Result<()> {
        aviary_certs::issue_edge(&self.pki.dir, node_id)?;
        Ok(())
    }

    /// An admin client over mTLS.
    pub async fn admin(&self, cp: &ControlPlane) -> anyhow::Result<Admin> {
        Admin::connect(&cp.url(), &self.pki.dir, "admin").await
    }

    /// The sample module stamped as `version` (a "release" of it), in the workspace.
    pub fn sample_release(&self, version: &str) -> anyhow::Result<PathBuf> {
        let out = self.path(&format!("sample-{version}"));
        let o = std::process::Command::new(bin("aviary-sample-module")?)
            .args(["--stamp", version])
            .arg(&out)
            .output()?;
        if !o.status.success() {
            bail!("stamp: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(out)
    }
}

/// Starts `program args`, waits for a stdout line starting with `prefix` and returns the
/// child and the rest of that line. Stderr goes to `log`.
async fn spawn_and_read(
    program: &Path,
    args: &[String],
    log: &Path,
    prefix: &str,
) -> anyhow::Result<(Child, String)> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok::<_, anyhow::Error>(rest.trim().to_owned());
            }
        }
        bail!("exited before printing {prefix:?}")
    };
    // Generous: a debug daemon under qemu on a loaded two-core machine starts slowly.
    let rest = match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(Ok(rest)) => rest,
        Ok(Err(e)) => bail!(
            "{}: {e}; log:\n{}",
            program.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        ),
        Err(_) => bail!(
            "{} did not start in 60s; log:\n{}",
            program.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, rest))
}

/// A process the harness started (killed when dropped: `kill_on_drop`).
pub struct Process(pub(crate) Option<Child>);

/// What the harness can do to any process it started.
#[allow(async_fn_in_trait)]
pub trait Daemon {
    /// Its process.
    fn process(&mut self) -> &mut Process;

    /// SIGKILL, no goodbye.
    async fn kill9(&mut self) -> anyhow::Result<()> {
        self.process().kill9().await
    }

    /// SIGTERM; returns the exit status.
    async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.process().terminate().await
    }
}

impl Process {
    /// Kills it (if running) and starts `program args` in its place, stderr to `log`,
    /// waiting for a stdout line starting with `prefix`.
    pub(crate) async fn respawn(
        &mut self,
        program: &[String],
        args: &[String],
        log: &Path,
        prefix: &str,
    ) -> anyhow::Result<()> {
        self.kill9().await?;
        let (exe, leading) = program.split_first().context("no program")?;
        let all: Vec<String> = leading.iter().chain(args).cloned().collect();
        let (child, _) = spawn_and_read(Path::new(exe), &all, log, prefix).await?;
        self.0 = Some(child);
        Ok(())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.0.as_ref().and_then(Child::id)
    }

    pub(crate) async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.0.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then up to 20 s for it to exit.
    pub(crate) async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.0.take().context("not running")?;
        let pid = child.id().context("already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .context("did not exit within 20s of SIGTERM")??)
    }
}

impl Daemon for ControlPlane {
    fn process(&mut self) -> &mut Process {
        &mut self.child
    }
}

impl Daemon for Edge {
    fn process(&mut self) -> &mut Process {
        &mut self.child
    }
}

/// A running `aviary-control-plane`.
pub struct ControlPlane {
    child: Process,
    /// The gRPC address.
    pub addr: SocketAddr,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its Prometheus address.
    pub metrics: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane in `ws` with extra flags.
    pub async fn start(ws: &Workspace, extra: &[&str]) -> anyhow::Result<ControlPlane> {
        let data_dir = ws.path("cp-data");
        let metrics = free_port()?;
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--certs".into(),
            ws.pki.dir.display().to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = ws.path("control-plane.log");
        let mut first = args.clone();
        first.extend(["--listen".into(), "127.0.0.1:0".into()]);
        let (child, addr) =
            spawn_and_read(&bin("aviary-control-plane")?, &first, &log, "listening on ").await?;
        Ok(ControlPlane {
            child: Process(Some(child)),
            addr: addr.parse()?,
            data_dir,
            metrics,
            args,
            log,
        })
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// `https://ADDR`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Starts again on the same address and data dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut args = self.args.clone();
        args.extend(["--listen".into(), self.addr.to_string()]);
        let program = [bin("aviary-control-plane")?.display().to_string()];
        let log = self.log.clone();
        self.child
            .respawn(&program, &args, &log, "listening on ")
            .await
    }

    /// `aviary --control-plane URL --certs PKI ARGS...`: its stdout, or its stderr as the
    /// error.
    pub fn cli(&self, ws: &Workspace, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new(bin("aviary")?)
            .args(["--control-plane", &self.url(), "--certs"])
            .arg(&ws.pki.dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("aviary {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Signs and uploads `file` as `module` `version` for x86_64 with `run_spec` (TOML)
    /// through `aviary release upload`.
    pub fn upload_release(
        &self,
        ws: &Workspace,
        module: &str,
        version: &str,
        file: &std::path::Path,
        run_spec: &str,
    ) -> anyhow::Result<()> {
        self.upload_release_for(ws, module, version, "x86_64", file, run_spec)
    }

    /// Like `upload_release`, as the artifact for `target` (another architecture's
    /// artifact of the same version adds to the release).
    pub fn upload_release_for(
        &self,
        ws: &Workspace,
        module: &str,
        version: &str,
        target: &str,
        file: &std::path::Path,
        run_spec: &str,
    ) -> anyhow::Result<()> {
        let spec = ws.path(&format!("{module}-{version}-{target}.toml"));
        std::fs::write(&spec, run_spec)?;
        let mut args = ws.release_args("upload", module, version, target, file);
        args.extend(["--run-spec".into(), spec.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli(ws, &args)
            .with_context(|| format!("upload {module} {version} for {target}"))?;
        Ok(())
    }

    /// `Nodes/GetNode` as the default admin.
    pub async fn node(&self, ws: &Workspace, id: &str) -> anyhow::Result<aviary_proto::v1::Node> {
        let mut admin = ws.admin(self).await?;
        Ok(admin
            .nodes
            .get_node(aviary_proto::v1::GetNodeRequest { node_id: id.into() })
            .await?
            .into_inner())
    }

    /// Audit events whose action starts with `action`.
    pub async fn events(
        &self,
        ws: &Workspace,
        action: &str,
    ) -> anyhow::Result<Vec<aviary_proto::v1::Event>> {
        let mut admin = ws.admin(self).await?;
        Ok(admin
            .audit
            .list_events(aviary_proto::v1::ListEventsRequest {
                filter: Some(aviary_proto::v1::EventFilter {
                    action: action.into(),
                    ..Default::default()
                }),
                after_seq: 0,
                limit: 0,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events)
    }

    /// The control plane's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One metric's value from `/metrics` (sum over label sets), 0 if absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = http_get(self.metrics, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            // An empty f64 sum is -0.0.
            + 0.0)
    }
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size of a process in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} for {pid}"))
}

/// Bytes of every file under `dir` (0 if it is gone).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // Linux reports in USER_HZ, 100 on every architecture Aviary targets.
    Ok(Duration::from_millis(ticks * 10))
}

/// A plain HTTP/1.1 GET on loopback; returns the body of a 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// A running `aviary-edge`.
pub struct Edge {
    child: Process,
    /// The program and its leading arguments (the daemon, or qemu and the daemon).
    program: Vec<String>,
    /// Its node id.
    pub node_id: String,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// Its local HTTP address.
    pub local: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
}

impl Edge {
    /// Issues a certificate for `node_id` and starts a daemon with `labels` and extra flags.
    pub async fn start(
        ws: &Workspace,
        cp: &ControlPlane,
        node_id: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Edge> {
        Edge::start_via(ws, &cp.url(), node_id, labels, extra).await
    }

    /// Like `start`, reaching the control plane at `url` (e.g. through a `Proxy`).
    pub async fn start_via(
        ws: &Workspace,
        url: &str,
        node_id: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Edge> {
        let program = vec![bin("aviary-edge")?.display().to_string()];
        Edge::start_program(ws, url, node_id, labels, extra, program).await
    }

    /// Like `start` without labels, holding only what the shipped unit gives the daemon
    /// (its capabilities, no_new_privs and umask).
    pub async fn start_as_unit(
        ws: &Workspace,
        cp: &ControlPlane,
        node_id: &str,
        extra: &[&str],
    ) -> anyhow::Result<Edge> {
        Edge::start_program(ws, &cp.url(), node_id, &[], extra, edge_as_unit()?).await
    }

    /// Like `start`, with the daemon cross-built for `cpu` and run under qemu.
    pub async fn start_foreign(
        ws: &Workspace,
        cp: &ControlPlane,
        node_id: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
        cpu: foreign::Foreign,
    ) -> anyhow::Result<Edge> {
        cpu.check_binfmt()?;
        let program = cpu.command("debug", "aviary-edge")?;
        Edge::start_program(ws, &cp.url(), node_id, labels, extra, program).await
    }

    /// Like `start_via`, running `program` (an executable and its leading arguments,
    /// e.g. qemu and a release daemon) instead of this build's daemon.
    pub async fn start_program(
        ws: &Workspace,
        url: &str,
        node_id: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
        program: Vec<String>,
    ) -> anyhow::Result<Edge> {
        let state_dir = ws.path(&format!("edge-{node_id}"));
        let mut args: Vec<String> = vec!["--control-plane".into(), url.to_owned()];
        // A test may give the daemon its own certs dir (other trusted release keys, or
        // none of its own yet: it enrolls).
        if !extra.contains(&"--certs") {
            ws.edge_cert(node_id)?;
            args.extend(["--certs".into(), ws.pki.dir.display().to_string()]);
        }
        args.extend([
            "--node-id".into(),
            node_id.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ]);
        for (k, v) in labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = ws.path(&format!("edge-{node_id}.log"));
        let mut first = args.clone();
        first.extend(["--local-listen".into(), "127.0.0.1:0".into()]);
        let (child, local) = spawn_edge(&program, &first, &log).await?;
        Ok(Edge {
            child: Process(Some(child)),
            program,
            node_id: node_id.into(),
            state_dir,
            local: local.parse()?,
            args,
            log,
        })
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The weights as `GET /v1/weights` serves them.
    pub async fn view(&self) -> anyhow::Result<aviary_edge::weights::View> {
        Ok(aviary_edge::local_http::fetch_view(self.local).await?)
    }

    /// The weights as `weights.json` holds them.
    pub fn file_view(&self) -> anyhow::Result<aviary_edge::weights::View> {
        let bytes = std::fs::read(self.state_dir.join("weights.json"))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Waits until both the HTTP view and the file show `module` at `weight`.
    pub async fn wait_weight(
        &self,
        module: &str,
        weight: u32,
    ) -> anyhow::Result<aviary_edge::weights::View> {
        eventually(
            Duration::from_secs(30),
            &format!("{} to report {module}={weight}", self.node_id),
            || async {
                let view = self.view().await?;
                let file = self.file_view()?;
                let ok = view.weights.get(module) == Some(&weight) && file == view;
                Ok(ok.then_some(view))
            },
        )
        .await
    }

    /// Waits until the daemon says it is connected to the control plane.
    pub async fn wait_connected(&self) -> anyhow::Result<()> {
        eventually(
            Duration::from_secs(60),
            &format!("{} to connect", self.node_id),
            || async { Ok(self.view().await?.connected.then_some(())) },
        )
        .await
    }

    /// Starts again with the same state dir and local port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut args = self.args.clone();
        args.extend(["--local-listen".into(), self.local.to_string()]);
        let (program, log) = (self.program.clone(), self.log.clone());
        self.child
            .respawn(&program, &args, &log, "local http on ")
            .await
    }

    /// The version in the current slot of `module`, as its state.json says.
    pub fn module_version(&self, module: &str) -> Option<String> {
        let path = self
            .state_dir
            .join("modules")
            .join(module)
            .join("state.json");
        let st: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        st["current"]["version"].as_str().map(str::to_owned)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `program` (the daemon, possibly behind qemu) with `args`; waits for its local
/// HTTP address.
async fn spawn_edge(
    program: &[String],
    args: &[String],
    log: &Path,
) -> anyhow::Result<(Child, String)> {
    let (exe, leading) = program.split_first().context("no program")?;
    let all: Vec<String> = leading.iter().chain(args).cloned().collect();
    spawn_and_read(Path::new(exe), &all, log, "local http on ").await
}

/// A tmpfs of a given size mounted at a directory (a disk that fills up), unmounted on
/// drop. Needs root, as the tests run in CI.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`16m`) at `dir`, creating it.
    pub fn mount(dir: &Path, size: &str) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()?;
        if !o.status.success() {
            bail!(
                "mounting a tmpfs for a disk-full test failed (needs root): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    /// Fills the file system with `filler` until a write fails; returns its path.
    pub fn fill(&self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0xa5u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
