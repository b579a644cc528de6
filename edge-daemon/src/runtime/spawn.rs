//! Starting and stopping module processes: the run spec's args, env, working dir and
//! user, stdout/stderr piped to the daemon, and a daemon-owned listening socket handed
//! over as fd 3 by systemd's `LISTEN_FDS` convention; confinement is `sandbox`'s.
//!
//! `LISTEN_PID` must be the module's own pid, known only after fork: the process is
//! started through `/bin/sh -c 'export LISTEN_PID=$$; exec "$0" "$@"'`, which execs the
//! module in place (same pid). This and `sandbox` are the daemon's only modules with
//! `unsafe`: the `prctl`/`dup2` in the child between fork and exec, and `kill(2)` for a
//! graceful SIGTERM.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use aviary_proto::manifest::RunSpec;
use tokio::process::{Child, Command};

use super::sandbox::{Confinement, Host, ModuleCgroup, SandboxError};

/// The fd a handed-over socket has in the module (`SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;

/// Why a module could not be started.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnError {
    /// The run spec names a user that does not exist here.
    #[error("user {0:?} is not in /etc/passwd")]
    NoSuchUser(String),
    /// The sandbox the run spec asks for cannot be built.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// fork/exec failed.
    #[error("cannot start {path}: {source}")]
    Exec {
        /// The executable.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// uid and gid of `user` from /etc/passwd (no NSS: gateways run with local users).
fn lookup_user(user: &str) -> Result<(u32, u32), SpawnError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == user)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .next()
        .ok_or_else(|| SpawnError::NoSuchUser(user.to_owned()))
}

/// A started module and, with `notify = true`, the socket its `READY=1` arrives on.
pub(super) struct Started {
    /// The process.
    pub child: Child,
    /// `NOTIFY_SOCKET` of this process (abstract, so nothing to clean up).
    pub notify: Option<tokio::net::UnixDatagram>,
    /// The memory cgroup of the process, to remove once it has exited.
    pub cgroup: Option<ModuleCgroup>,
}

/// A unique abstract unix datagram socket for one process's notifications.
fn notify_socket() -> std::io::Result<(String, tokio::net::UnixDatagram)> {
    use std::os::linux::net::SocketAddrExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("aviary-edge-{}-{n}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
    socket.set_nonblocking(true)?;
    Ok((
        format!("@{name}"),
        tokio::net::UnixDatagram::from_std(socket)?,
    ))
}

/// Spawns retried when the artifact is busy being written by a forked process (ETXTBSY).
const TEXT_BUSY_RETRIES: u64 = 5;

/// Starts `artifact` (of `module`, in slot directory `slot`) as `spec` says, in `slot`
/// unless the spec names a working dir, confined as [`super::sandbox`] says.
pub(super) async fn start(
    host: &Host,
    module: &str,
    artifact: &Path,
    spec: &RunSpec,
    slot: &Path,
    listener: Option<&TcpListener>,
) -> Result<Started, SpawnError> {
    let cwd = spec.working_dir.as_deref().map(Path::new).unwrap_or(slot);
    let (confinement, cgroup) = Confinement::prepare(host, module, spec, slot, cwd)?;
    let mut cmd = match listener {
        Some(_) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
                .arg(artifact);
            c
        }
        None => Command::new(artifact),
    };
    cmd.args(&spec.args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(&spec.env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(user) = &spec.user {
        let (uid, gid) = lookup_user(user)?;
        cmd.uid(uid).gid(gid);
    }
    if listener.is_some() {
        cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "listen");
    }
    in_child(&mut cmd, listener.map(|l| l.as_raw_fd()), confinement);
    let exec_error = |source| SpawnError::Exec {
        path: artifact.display().to_string(),
        source,
    };
    let notify = match spec.notify {
        Some(true) => {
            let (name, socket) = notify_socket().map_err(exec_error)?;
            cmd.env("NOTIFY_SOCKET", name);
            Some(socket)
        }
        _ => None,
    };
    // ETXTBSY: a process forked elsewhere in the daemon (another module's start) still
    // holds the write descriptor an install had open on this artifact when it forked,
    // until that child execs. It clears within moments; give it a few.
    let mut attempt = 0;
    let child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TEXT_BUSY_RETRIES => {
                attempt += 1;
                tracing::debug!(
                    module,
                    attempt,
                    "artifact busy (ETXTBSY); starting it again"
                );
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            }
            other => break other.map_err(exec_error)?,
        }
    };
    Ok(Started {
        child,
        notify,
        cgroup,
    })
}

/// In the child before exec: die with the daemon (a `kill -9` of the daemon must not
/// leave modules holding their sockets), make `listen_fd` the child's fd 3, and enter
/// the module's confinement last (after it, the child may do only what the spec grants).
#[allow(unsafe_code)]
fn in_child(cmd: &mut Command, listen_fd: Option<i32>, confinement: Confinement) {
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, dup2, fcntl, and the system calls of
    // `Confinement::enter`) on descriptors the parent keeps open for the whole spawn (the
    // listener outlives the call; the confinement is owned by the closure).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let Some(fd) = listen_fd else {
                return confinement.enter();
            };
            if fd == LISTEN_FD {
                // Already in place: just clear close-on-exec.
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                // dup2 leaves the new descriptor without FD_CLOEXEC.
                return Err(std::io::Error::last_os_error());
            }
            confinement.enter()
        });
    }
}

/// SIGTERM, then SIGKILL after `grace`; waits for the exit.
pub(super) async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        terminate(pid);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid, "module ignored SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

#[allow(unsafe_code)]
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child, not
    // yet reaped (we hold its `Child`), so the pid cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_from_passwd_and_unknown_ones_are_refused() {
        assert_eq!(lookup_user("root").ok(), Some((0, 0)));
        assert!(matches!(
            lookup_user("no-such-user-aviary"),
            Err(SpawnError::NoSuchUser(_))
        ));
    }

    /// An install's write descriptor still open on the artifact (here: ours, closed a
    /// moment later) makes exec fail with ETXTBSY; the start waits it out.
    #[tokio::test]
    async fn an_artifact_still_open_for_writing_starts_once_it_is_closed() -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let artifact = dir.path().join("artifact");
        let mut file = std::fs::File::create(&artifact)?;
        file.write_all(b"#!/bin/sh\nexit 0\n")?;
        std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o755))?;
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(file);
        });
        let host = Host::detect(&[]);
        let started = start(&host, "m", &artifact, &RunSpec::default(), dir.path(), None).await;
        closer
            .join()
            .map_err(|_| anyhow::anyhow!("closer panicked"))?;
        let mut started = started?;
        assert!(started.child.wait().await?.success());
        Ok(())
    }
}
