//! One module's process, from activation to stop: the supervision state machine.
//!
//! ```text
//!   idle ──activate──► starting ──ready──► running ──exit──► backoff ──► starting
//!                          │                  │
//!                    not ready in time    activate(new version or run spec): hot swap
//!                          ▼
//!                  killed; the previous process keeps (or goes back to) serving
//! ```
//! Hot swap with a `listen` socket: the daemon owns the socket, the new process gets it
//! too, and the old one is stopped only after the new one passes its probes, so no
//! connection is refused. Without one: stop the old, start the new, probe it; if it never
//! becomes ready, start the old again.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aviary_proto::manifest::{ProbeTarget, RunSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};

use super::probe::probe;
use super::sandbox::Host;
use super::spawn;
use crate::backoff::Backoff;

/// How long a stopped module may take to exit after SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

/// What to run: a slot's artifact with its run spec.
#[derive(Clone, Debug)]
pub(super) struct Launch {
    /// Version (for logs and reports).
    pub version: String,
    /// Slot id.
    pub slot: String,
    /// The executable.
    pub artifact: PathBuf,
    /// The slot directory (default working dir).
    pub dir: PathBuf,
    /// How to run it.
    pub spec: RunSpec,
    /// What the daemon's kernel lets it confine modules with.
    pub host: Arc<Host>,
}

/// Figures the health reports carry.
#[derive(Debug, Default)]
pub struct Stats {
    /// Lines matching the run spec's log patterns.
    pub log_matches: AtomicU64,
    /// Restarts after crashes.
    pub restarts: AtomicU64,
    /// "running", "starting", "backoff", "stopped".
    pub state: Mutex<String>,
    /// Version and slot running.
    pub running: Mutex<Option<(String, String)>>,
    /// Probe results since the last report.
    pub window: Mutex<ProbeWindow>,
}

/// Probe results of one reporting window.
#[derive(Debug, Default, Clone)]
pub struct ProbeWindow {
    /// Probes that passed.
    pub successes: u64,
    /// Probes that failed.
    pub failures: u64,
    /// Latencies of the passing probes, in ms.
    pub latencies_ms: Vec<f64>,
    /// Why the last failing probe failed ("port closed", "HTTP failing: 503").
    pub detail: String,
}

impl Stats {
    /// The probe window so far; starts a new one.
    pub fn take_window(&self) -> ProbeWindow {
        self.window
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    fn record(&self, result: Result<Duration, String>) {
        if let Ok(mut w) = self.window.lock() {
            match result {
                Ok(latency) => {
                    w.successes += 1;
                    // Bounded: a report every interval empties it.
                    if w.latencies_ms.len() < 4096 {
                        w.latencies_ms.push(latency.as_secs_f64() * 1000.0);
                    }
                }
                Err(detail) => {
                    w.failures += 1;
                    w.detail = detail;
                }
            }
        }
    }

    fn set_state(&self, s: &str) {
        if let Ok(mut st) = self.state.lock() {
            *st = s.to_owned();
        }
    }
}

/// Commands to a module's supervisor task.
pub(super) enum Command {
    /// Run this (swap if something runs); the reply says whether it became ready.
    Activate(Box<Launch>, oneshot::Sender<Result<(), String>>),
}

struct Proc {
    child: Child,
    launch: Launch,
}

/// Runs the supervisor of module `name` until its command channel closes.
pub(super) async fn supervise(name: String, mut rx: mpsc::Receiver<Command>, stats: Arc<Stats>) {
    let mut current: Option<Proc> = None;
    let mut listener: Option<(String, TcpListener)> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut restart_at: Option<tokio::time::Instant> = None;
    // A crashed module's launch, waiting for its restart.
    let mut pending: Option<Launch> = None;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_probe) => {
                // Health probes of the running version, for the health reports.
                let interval = probe_round(current.as_ref(), &stats).await;
                next_probe = tokio::time::Instant::now() + interval;
            }
            cmd = rx.recv() => match cmd {
                Some(Command::Activate(launch, reply)) => {
                    restart_at = None;
                    pending = None;
                    let result = activate(&name, &mut current, &mut listener, *launch, &stats).await;
                    if result.is_ok() {
                        backoff.reset();
                    }
                    let _ = reply.send(result);
                }
                None => break,
            },
            status = wait(&mut current) => {
                let launch = current.take().map(|p| p.launch);
                tracing::warn!(module = %name, ?status, "module exited; restarting after backoff");
                stats.restarts.fetch_add(1, Ordering::Relaxed);
                stats.set_state("backoff");
                if let Some(launch) = launch {
                    restart_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                    pending = Some(launch);
                }
            }
            _ = sleep_until(restart_at) => {
                restart_at = None;
                if let Some(launch) = pending.take() {
                    match start(&name, &launch, listener.as_ref().map(|(_, l)| l), &stats).await {
                        Ok((child, _)) => {
                            stats.set_state("running");
                            current = Some(Proc { child, launch });
                        }
                        Err(e) => {
                            tracing::error!(module = %name, error = %e, "restart failed");
                            restart_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                            pending = Some(launch);
                        }
                    }
                }
            }
        }
    }
    if let Some(mut p) = current.take() {
        spawn::stop(&mut p.child, GRACE).await;
    }
    stats.set_state("stopped");
}

/// Runs every probe of the running version once; returns when to probe again.
async fn probe_round(current: Option<&Proc>, stats: &Stats) -> Duration {
    let Some(p) = current else {
        return Duration::from_secs(1);
    };
    let mut interval = Duration::from_secs(60);
    for spec in &p.launch.spec.probes {
        let (Ok(target), Ok(timeout), Ok(every)) = (spec.target(), spec.timeout(), spec.interval())
        else {
            continue;
        };
        interval = interval.min(every);
        stats.record(probe(&target, timeout).await.map_err(|e| e.to_string()));
    }
    if p.launch.spec.probes.is_empty() {
        Duration::from_secs(1)
    } else {
        interval
    }
}

async fn wait(current: &mut Option<Proc>) -> std::io::Result<std::process::ExitStatus> {
    match current {
        Some(p) => p.child.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts a process and tags its output lines into the daemon's log.
async fn start(
    name: &str,
    launch: &Launch,
    listener: Option<&TcpListener>,
    stats: &Arc<Stats>,
) -> Result<(Child, Option<UnixDatagram>), String> {
    let spawn::Started {
        mut child,
        notify,
        cgroup,
    } = spawn::start(
        &launch.host,
        name,
        &launch.artifact,
        &launch.spec,
        &launch.dir,
        listener,
    )
    .await
    .map_err(|e| e.to_string())?;
    let patterns = Arc::new(launch.spec.log_patterns.clone());
    let out = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    let err = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    // Stdout closes when the process and everything it forked are gone: then its cgroup
    // is empty and can be removed.
    let mut cgroup = Some(cgroup);
    for (stream, which) in [(out, "stdout"), (err, "stderr")] {
        let Some(stream) = stream else { continue };
        let (name, version) = (name.to_owned(), launch.version.clone());
        let (patterns, stats) = (patterns.clone(), stats.clone());
        let cgroup = cgroup.take();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if patterns.iter().any(|p| line.contains(p.as_str())) {
                    stats.log_matches.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(target: "module", module = %name, %version, stream = which, "{line}");
            }
            drop(cgroup);
        }));
    }
    Ok((child, notify))
}

/// Waits until `launch`'s probes all pass once (or, without probes, until it has stayed
/// up for a second), within its ready timeout. On a daemon-owned socket without
/// READY=1 the probes may be answered by the predecessor, so the new process must also
/// have stayed up for that second: a runtime that dies as it warms up (V8 refused
/// executable memory, say) is then caught before it is ACKed, not after.
async fn ready(
    child: &mut Child,
    notify: Option<UnixDatagram>,
    launch: &Launch,
) -> Result<(), String> {
    let deadline = Instant::now()
        + launch
            .spec
            .ready_timeout()
            .unwrap_or(Duration::from_secs(30));
    let shared_unnotified = launch.spec.listen.is_some() && notify.is_none();
    if let Some(socket) = notify {
        // The process itself says READY=1; probes alone cannot tell it from its
        // predecessor on a shared socket.
        let mut buf = [0u8; 4096];
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                status = child.wait() => {
                    return Err(match status {
                        Ok(s) => format!("exited during start ({s}) before READY=1"),
                        Err(e) => format!("lost the process during start: {e}"),
                    });
                }
                got = socket.recv(&mut buf) => {
                    let Ok(n) = got else { continue };
                    if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                        break;
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    return Err("not ready within its ready timeout: no READY=1 on NOTIFY_SOCKET".into());
                }
            }
        }
    }
    let targets: Vec<(ProbeTarget, Duration)> = launch
        .spec
        .probes
        .iter()
        .filter_map(|p| Some((p.target().ok()?, p.timeout().ok()?)))
        .collect();
    let alive_for = Instant::now() + Duration::from_secs(1);
    let mut last = String::from("no probe passed yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "exited during start ({status}); last probe: {last}"
            ));
        }
        if targets.is_empty() {
            if Instant::now() >= alive_for {
                return Ok(());
            }
        } else {
            let mut all = true;
            for (t, timeout) in &targets {
                if let Err(e) = probe(t, *timeout).await {
                    last = e.to_string();
                    all = false;
                    break;
                }
            }
            if all && (!shared_unnotified || Instant::now() >= alive_for) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready within its ready timeout: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn activate(
    name: &str,
    current: &mut Option<Proc>,
    listener: &mut Option<(String, TcpListener)>,
    launch: Launch,
    stats: &Arc<Stats>,
) -> Result<(), String> {
    if current
        .as_ref()
        .is_some_and(|p| p.launch.slot == launch.slot && p.launch.spec == launch.spec)
    {
        return Ok(()); // already running that slot with that run spec
    }
    // The daemon owns the socket across versions; a new address means a new socket.
    if let Some(addr) = &launch.spec.listen {
        if listener.as_ref().is_none_or(|(a, _)| a != addr) {
            let l = TcpListener::bind(addr.as_str()).map_err(|e| format!("listen {addr}: {e}"))?;
            *listener = Some((addr.clone(), l));
        }
    } else {
        *listener = None;
    }
    stats.set_state("starting");
    let shared = listener.as_ref().map(|(_, l)| l);
    if shared.is_some() || current.is_none() {
        // Hot swap (or first start): the old process keeps serving until the new is ready.
        let (mut child, notify) = start(name, &launch, shared, stats).await?;
        match ready(&mut child, notify, &launch).await {
            Ok(()) => {
                if let Some(mut old) = current.take() {
                    tracing::info!(module = %name, from = %old.launch.version, to = %launch.version, "swapped");
                    spawn::stop(&mut old.child, GRACE).await;
                }
                set_running(stats, &launch);
                *current = Some(Proc { child, launch });
                Ok(())
            }
            Err(e) => {
                let _ = child.kill().await;
                stats.set_state(if current.is_some() {
                    "running"
                } else {
                    "stopped"
                });
                Err(e)
            }
        }
    } else {
        // No shared socket: stop, start, probe; on failure bring the old one back.
        let Some(mut old) = current.take() else {
            return Err("nothing to swap".into());
        };
        spawn::stop(&mut old.child, GRACE).await;
        let attempt = match start(name, &launch, None, stats).await {
            Ok((mut child, notify)) => match ready(&mut child, notify, &launch).await {
                Ok(()) => Ok(child),
                Err(e) => {
                    let _ = child.kill().await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match attempt {
            Ok(child) => {
                set_running(stats, &launch);
                *current = Some(Proc { child, launch });
                Ok(())
            }
            Err(e) => {
                tracing::warn!(module = %name, error = %e, back_to = %old.launch.version, "new version not ready; starting the previous one again");
                if let Ok((child, _)) = start(name, &old.launch, None, stats).await {
                    set_running(stats, &old.launch);
                    *current = Some(Proc {
                        child,
                        launch: old.launch,
                    });
                }
                Err(e)
            }
        }
    }
}

fn set_running(stats: &Stats, launch: &Launch) {
    stats.set_state("running");
    if let Ok(mut r) = stats.running.lock() {
        *r = Some((launch.version.clone(), launch.slot.clone()));
    }
}
