//! What a module process may touch: exactly what its signed run spec grants.
//!
//! The daemon applies this itself, between fork and exec, so it holds on gateways
//! without systemd and does not depend on the unit's settings:
//!
//! * `no_new_privs`, and for a module that runs as root an empty capability bounding
//!   set, so nothing it execs gains privileges;
//! * Landlock (where the kernel has it): the whole tree read-only except the daemon's
//!   state and certificates (hidden) and `/dev` (only the five pseudo-devices of
//!   `PrivateDevices=` plus the spec's `devices`); the spec's `writable` paths writable;
//! * a seccomp filter: sockets only of AF_UNIX, AF_INET, AF_INET6 and the spec's
//!   `address_families`; no io_uring (it would open sockets past the filter); and unless
//!   the spec says `jit`, no writable-and-executable memory, as `MemoryDenyWriteExecute=`;
//! * `memory_max` as a memory cgroup of its own where the daemon can make one (cgroup v2
//!   delegated to it, or a v1 memory hierarchy it may write), else as `RLIMIT_DATA`.
//!
//! Everything that allocates or opens files happens in [`Confinement::prepare`], in the
//! daemon; [`Confinement::enter`] runs in the forked child and only makes system calls.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aviary_proto::manifest::RunSpec;
use aviary_proto::sandbox::{address_family, BASE_ADDRESS_FAMILIES};

/// Devices every module may open, as under systemd's `PrivateDevices=yes`.
const PSEUDO_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Why a module's confinement could not be prepared; the module does not start.
#[derive(Debug, thiserror::Error)]
pub(super) enum SandboxError {
    /// A device or writable path the spec grants is not there.
    #[error("{what} {path} named in the run spec: {source}")]
    Missing {
        /// "device" or "writable path".
        what: &'static str,
        /// The path.
        path: String,
        /// Why it cannot be opened.
        source: std::io::Error,
    },
    /// The kernel refused to build the Landlock ruleset or the module's cgroup.
    #[error("cannot confine the module: {0}")]
    Kernel(String),
}

/// What this daemon's kernel and privileges allow, found once at start.
#[derive(Debug)]
pub struct Host {
    /// Paths no module may read: the daemon's state and certificates.
    hidden: Vec<PathBuf>,
    /// Landlock ABI version, 0 without Landlock.
    landlock_abi: i32,
    /// The seccomp audit architecture, if this process may install filters.
    seccomp_arch: Option<u32>,
    /// Where module memory cgroups go, if the daemon may make them.
    cgroups: Option<CgroupRoot>,
}

/// A directory the daemon may create memory cgroups in.
#[derive(Debug)]
struct CgroupRoot {
    dir: PathBuf,
    /// The limit file: `memory.max` (v2) or `memory.limit_in_bytes` (v1).
    limit_file: &'static str,
}

impl Host {
    /// Probes Landlock and memory cgroups; `hidden` (the state dir, the certificates)
    /// stays unreadable to modules. Logs what will not be enforced here.
    pub fn detect(hidden: &[&Path]) -> Host {
        let landlock_abi = landlock_abi();
        if landlock_abi < 1 {
            tracing::warn!(
                "this kernel has no Landlock: modules are not kept from files and devices \
                 beyond their users' permissions"
            );
        }
        let seccomp_arch = AUDIT_ARCH.filter(|_| seccomp_works());
        if seccomp_arch.is_none() {
            tracing::warn!(
                arch = std::env::consts::ARCH,
                "no seccomp filter here (architecture or emulator): modules' address \
                 families and executable memory are not restricted"
            );
        }
        let cgroups = CgroupRoot::find();
        match &cgroups {
            Some(root) => {
                tracing::debug!(dir = %root.dir.display(), "module memory limits as cgroups")
            }
            None => tracing::info!(
                "no writable memory cgroup: a run spec's memory_max is applied as RLIMIT_DATA"
            ),
        }
        Host {
            hidden: hidden
                .iter()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
                .collect(),
            landlock_abi,
            seccomp_arch,
            cgroups,
        }
    }
}

/// A module's confinement, prepared in the daemon and entered in the child.
pub(super) struct Confinement {
    ruleset: Option<OwnedFd>,
    filter: Vec<libc::sock_filter>,
    cgroup_procs: Option<File>,
    data_limit: Option<u64>,
}

/// A module's memory cgroup; removed when the process is gone.
#[derive(Debug)]
pub(super) struct ModuleCgroup {
    dir: PathBuf,
}

impl Drop for ModuleCgroup {
    fn drop(&mut self) {
        // Fails while a forked grandchild lingers; the next start's sweep retries.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::debug!(dir = %self.dir.display(), "cgroup not removed: {e}");
        }
    }
}

impl Confinement {
    /// Builds what `spec` grants for an artifact in `slot` run in `cwd`.
    pub(super) fn prepare(
        host: &Host,
        module: &str,
        spec: &RunSpec,
        slot: &Path,
        cwd: &Path,
    ) -> Result<(Confinement, Option<ModuleCgroup>), SandboxError> {
        let ruleset = if host.landlock_abi >= 1 {
            Some(ruleset(host, spec, slot, cwd)?)
        } else {
            None
        };
        let families: Vec<i32> = BASE_ADDRESS_FAMILIES
            .iter()
            .map(|&(_, n)| n)
            .chain(
                spec.address_families
                    .iter()
                    .filter_map(|f| address_family(f)),
            )
            .collect();
        let filter = host
            .seccomp_arch
            .map(|arch| seccomp_filter(arch, &families, spec.jit))
            .unwrap_or_default();
        // validate() already refused a bad size; a spec without one has no limit.
        let memory_max = spec.memory_max().ok().flatten();
        let (cgroup, cgroup_procs, data_limit) = match (memory_max, &host.cgroups) {
            (Some(bytes), Some(root)) => {
                let (cg, procs) = root.create(module, bytes)?;
                (Some(cg), Some(procs), None)
            }
            (Some(bytes), None) => (None, None, Some(bytes)),
            (None, _) => (None, None, None),
        };
        Ok((
            Confinement {
                ruleset,
                filter,
                cgroup_procs,
                data_limit,
            },
            cgroup,
        ))
    }

    /// In the child between fork and exec (after the uid switch): joins the cgroup,
    /// sets limits, drops privileges, restricts itself. Only system calls: nothing here
    /// may allocate or take a lock.
    #[allow(unsafe_code)]
    pub(super) fn enter(&self) -> std::io::Result<()> {
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: every call below is a plain system call on values this struct owns and
        // keeps alive (fds, the filter buffer); none allocates or locks, so they are safe
        // between fork and exec.
        unsafe {
            if let Some(procs) = &self.cgroup_procs {
                // "0" is the writing process; the fd was opened by the daemon, whose
                // credentials the kernel checks.
                check(libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) as libc::c_long)?;
            }
            if let Some(bytes) = self.data_limit {
                let limit = libc::rlimit {
                    rlim_cur: bytes as libc::rlim_t,
                    rlim_max: bytes as libc::rlim_t,
                };
                check(libc::setrlimit(libc::RLIMIT_DATA, &limit) as libc::c_long)?;
            }
            if libc::getuid() == 0 {
                // Root execs get every capability in the bounding set: empty it.
                for cap in 0..=63 {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            if let Some(ruleset) = &self.ruleset {
                check(libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    ruleset.as_raw_fd(),
                    0,
                ))?;
            }
            if !self.filter.is_empty() {
                let prog = libc::sock_fprog {
                    len: self.filter.len() as libc::c_ushort,
                    filter: self.filter.as_ptr().cast_mut(),
                };
                check(libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                    0,
                    0,
                ) as libc::c_long)?;
            }
        }
        Ok(())
    }
}

// Landlock (linux/landlock.h): access rights by the ABI version that introduced them.
const LL_EXECUTE: u64 = 1 << 0;
const LL_WRITE_FILE: u64 = 1 << 1;
const LL_READ_FILE: u64 = 1 << 2;
const LL_READ_DIR: u64 = 1 << 3;
/// Every right of ABI 1 (bits 0-12: execute ... make_sym).
const LL_ABI1: u64 = (1 << 13) - 1;
const LL_REFER: u64 = 1 << 13;
const LL_TRUNCATE: u64 = 1 << 14;
const LL_IOCTL_DEV: u64 = 1 << 15;
/// The rights that apply to a file that is not a directory.
const LL_FILE: u64 = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV;
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

#[allow(unsafe_code)]
fn landlock_abi() -> i32 {
    // SAFETY: with the VERSION flag the kernel reads no attribute; it returns the ABI.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// The rights this kernel's Landlock knows (and so restricts).
fn handled(abi: i32) -> u64 {
    let mut h = LL_ABI1;
    if abi >= 2 {
        h |= LL_REFER;
    }
    if abi >= 3 {
        h |= LL_TRUNCATE;
    }
    if abi >= 5 {
        h |= LL_IOCTL_DEV;
    }
    h
}

/// The Landlock ruleset of one module.
#[allow(unsafe_code)]
fn ruleset(host: &Host, spec: &RunSpec, slot: &Path, cwd: &Path) -> Result<OwnedFd, SandboxError> {
    let handled = handled(host.landlock_abi);
    let attr = RulesetAttr {
        handled_access_fs: handled,
    };
    // SAFETY: attr is a valid landlock_ruleset_attr prefix of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(SandboxError::Kernel(format!(
            "landlock_create_ruleset: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let read = LL_READ_FILE | LL_READ_DIR | LL_EXECUTE;
    let mut hidden = host.hidden.clone();
    hidden.push(PathBuf::from("/dev"));
    let mut readable = Vec::new();
    visible(Path::new("/"), &hidden, &mut readable);
    for path in readable.iter().map(PathBuf::as_path).chain([slot, cwd]) {
        // Entries can vanish between listing and opening; what is gone needs no rule.
        let _ = allow(&ruleset, path, read & handled);
    }
    for dev in PSEUDO_DEVICES {
        let _ = allow(
            &ruleset,
            Path::new(dev),
            (LL_READ_FILE | LL_WRITE_FILE) & handled,
        );
    }
    for dev in &spec.devices {
        let rights = LL_READ_FILE | LL_WRITE_FILE | LL_IOCTL_DEV;
        allow(&ruleset, Path::new(dev), rights & handled).map_err(|source| {
            SandboxError::Missing {
                what: "device",
                path: dev.clone(),
                source,
            }
        })?;
    }
    for path in &spec.writable {
        allow(&ruleset, Path::new(path), handled).map_err(|source| SandboxError::Missing {
            what: "writable path",
            path: path.clone(),
            source,
        })?;
    }
    Ok(ruleset)
}

/// Adds `rights` beneath `path` (a file gets only the rights files have).
#[allow(unsafe_code)]
fn allow(ruleset: &OwnedFd, path: &Path, rights: u64) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: c is NUL-terminated; O_PATH opens nothing for reading or writing.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_dir = File::from(fd.try_clone()?).metadata()?.is_dir();
    let attr = PathBeneathAttr {
        allowed_access: if is_dir { rights } else { rights & LL_FILE },
        parent_fd: fd.as_raw_fd(),
    };
    // SAFETY: attr is a packed landlock_path_beneath_attr; both fds are open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Collects the largest subtrees of `dir` that hold nothing in `hidden`: a rule on each
/// makes everything readable but those. Only ancestors of hidden paths are listed.
fn visible(dir: &Path, hidden: &[PathBuf], out: &mut Vec<PathBuf>) {
    if hidden.iter().any(|h| h == dir) {
        return;
    }
    if !hidden.iter().any(|h| h.starts_with(dir)) {
        out.push(dir.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // A symlink leads somewhere that gets (or does not get) its own rule.
        if entry.file_type().is_ok_and(|t| !t.is_symlink()) {
            visible(&entry.path(), hidden, out);
        }
    }
}

impl CgroupRoot {
    /// The daemon's own memory cgroup, if it may make children in it. On cgroup v2 the
    /// daemon first moves itself into a `daemon` leaf: v2 allows processes only in
    /// leaves of a cgroup whose controllers are enabled for its children (systemd's
    /// `Delegate=` convention).
    fn find() -> Option<CgroupRoot> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        for line in own.lines() {
            let mut f = line.splitn(3, ':');
            let (hierarchy, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let path = path.trim_start_matches('/');
            if hierarchy == "0" && controllers.is_empty() {
                let Some(mount) = cgroup_mount(&mounts, "cgroup2", None) else {
                    continue;
                };
                if let Some(root) = v2_root(&mount.join(path)) {
                    return Some(root);
                }
            } else if controllers.split(',').any(|c| c == "memory") {
                let mount = cgroup_mount(&mounts, "cgroup", Some("memory"))?;
                let dir = mount.join(path);
                if writable(&dir) {
                    return Some(CgroupRoot {
                        dir,
                        limit_file: "memory.limit_in_bytes",
                    });
                }
            }
        }
        None
    }

    /// A fresh cgroup for one process of `module` limited to `bytes`, and its
    /// `cgroup.procs` for the child to join.
    fn create(&self, module: &str, bytes: u64) -> Result<(ModuleCgroup, File), SandboxError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .dir
            .join(format!("aviary-{module}-{}-{n}", std::process::id()));
        let kernel = |what: &str, e: std::io::Error| SandboxError::Kernel(format!("{what}: {e}"));
        std::fs::create_dir(&dir).map_err(|e| kernel("cgroup", e))?;
        let cgroup = ModuleCgroup { dir };
        std::fs::write(cgroup.dir.join(self.limit_file), bytes.to_string())
            .map_err(|e| kernel(self.limit_file, e))?;
        // A limit a module can swap past is no limit on a gateway's flash: where the
        // kernel accounts swap, it counts too (v1: memory+swap; v2: no swap at all).
        let swap = match self.limit_file {
            "memory.max" => ("memory.swap.max", "0".to_owned()),
            _ => ("memory.memsw.limit_in_bytes", bytes.to_string()),
        };
        if cgroup.dir.join(swap.0).exists() {
            std::fs::write(cgroup.dir.join(swap.0), swap.1).map_err(|e| kernel(swap.0, e))?;
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.dir.join("cgroup.procs"))
            .map_err(|e| kernel("cgroup.procs", e))?;
        Ok((cgroup, procs))
    }
}

/// The daemon's delegated v2 cgroup `dir`, set up for module children.
fn v2_root(dir: &Path) -> Option<CgroupRoot> {
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    if !controllers.split_whitespace().any(|c| c == "memory") || !writable(dir) {
        return None;
    }
    let enabled = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.subtree_control"))
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "memory"))
    };
    if !enabled(dir) {
        let leaf = dir.join("daemon");
        let moved = std::fs::create_dir_all(&leaf)
            .and_then(|()| std::fs::write(leaf.join("cgroup.procs"), "0"))
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.subtree_control"))?
                    .write_all(b"+memory")
            });
        if let Err(e) = moved {
            tracing::info!(dir = %dir.display(), "cannot delegate memory to modules: {e}");
            return None;
        }
    }
    Some(CgroupRoot {
        dir: dir.to_path_buf(),
        limit_file: "memory.max",
    })
}

/// The mount point of a cgroup file system of `fstype` (with controller `option`).
fn cgroup_mount(mountinfo: &str, fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split(' ').nth(4)?;
        let mut after = after.split(' ');
        let (fs, _source, options) = (after.next()?, after.next()?, after.next()?);
        let has_option = option.is_none_or(|o| options.split(',').any(|x| x == o));
        (fs == fstype && has_option).then(|| PathBuf::from(mount_point))
    })
}

#[allow(unsafe_code)]
fn writable(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is NUL-terminated; access(2) only checks.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Whether this process may install a seccomp filter. qemu-user refuses one (EINVAL) so
/// that an emulated program cannot filter the emulator's own system calls; a module
/// started with one would then not start at all. The probe filter allows everything and
/// binds only a throwaway thread.
#[allow(unsafe_code)]
fn seccomp_works() -> bool {
    let probe = std::thread::spawn(|| {
        let allow = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: allow.as_ptr().cast_mut(),
        };
        // SAFETY: prctl on this thread only, with a filter that outlives the call.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                && libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                    0,
                    0,
                ) == 0
        }
    });
    probe.join().unwrap_or(false)
}

// seccomp (linux/audit.h, linux/seccomp.h): the filter checks the architecture first, so
// a 32-bit syscall table on a 64-bit kernel cannot be used to get around it.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(target_arch = "arm")]
const AUDIT_ARCH: Option<u32> = Some(0x4000_0028);
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00F3);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
)))]
const AUDIT_ARCH: Option<u32> = None;

#[cfg(target_arch = "arm")]
const SYS_MMAP: libc::c_long = libc::SYS_mmap2;
#[cfg(not(target_arch = "arm"))]
const SYS_MMAP: libc::c_long = libc::SYS_mmap;

/// Offset of the low 32 bits of syscall argument `i` in `struct seccomp_data`.
const fn arg_low(i: u32) -> u32 {
    if cfg!(target_endian = "little") {
        16 + 8 * i
    } else {
        16 + 8 * i + 4
    }
}

/// A classic BPF program under construction, with forward jumps to labels.
#[derive(Default)]
struct Bpf {
    code: Vec<libc::sock_filter>,
    /// (instruction, label, whether the true branch) still to patch.
    jumps: Vec<(usize, usize, bool)>,
    labels: Vec<usize>,
}

/// The next instruction, or a label.
#[derive(Clone, Copy)]
enum To {
    Next,
    Label(usize),
}

impl Bpf {
    fn stmt(&mut self, code: u32, k: u32) {
        self.code.push(libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn jump(&mut self, op: u32, k: u32, jt: To, jf: To) {
        let at = self.code.len();
        for (to, is_true) in [(jt, true), (jf, false)] {
            if let To::Label(l) = to {
                self.jumps.push((at, l, is_true));
            }
        }
        self.stmt(libc::BPF_JMP | op | libc::BPF_K, k);
    }

    fn label(&mut self) -> usize {
        self.labels.push(usize::MAX);
        self.labels.len() - 1
    }

    fn here(&mut self, label: usize) {
        self.labels[label] = self.code.len();
    }

    fn finish(mut self) -> Vec<libc::sock_filter> {
        for (at, label, is_true) in self.jumps {
            // Programs here are a few dozen instructions: every offset fits a u8.
            let offset = (self.labels[label] - at - 1) as u8;
            if is_true {
                self.code[at].jt = offset;
            } else {
                self.code[at].jf = offset;
            }
        }
        self.code
    }
}

/// The seccomp filter of a module allowed socket `families`, and W+X memory if `jit`.
fn seccomp_filter(arch: u32, families: &[i32], jit: bool) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_ALU, BPF_AND, BPF_JEQ, BPF_JSET, BPF_LD, BPF_RET, BPF_W};
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA);
    let mut b = Bpf::default();
    let [kill, allow, socket, mmap, mprotect, shmat, eacces, enosys] =
        std::array::from_fn(|_| b.label());
    b.stmt(BPF_LD | BPF_W | BPF_ABS, 4); // arch
    b.jump(BPF_JEQ, arch, To::Next, To::Label(kill));
    b.stmt(BPF_LD | BPF_W | BPF_ABS, 0); // nr
    if cfg!(target_arch = "x86_64") {
        // The x32 ABI shares the architecture; its numbers have this bit set.
        b.jump(BPF_JSET, 0x4000_0000, To::Label(enosys), To::Next);
    }
    let nr = |n: libc::c_long| n as u32;
    b.jump(BPF_JEQ, nr(libc::SYS_socket), To::Label(socket), To::Next);
    b.jump(
        BPF_JEQ,
        nr(libc::SYS_socketpair),
        To::Label(socket),
        To::Next,
    );
    b.jump(
        BPF_JEQ,
        nr(libc::SYS_io_uring_setup),
        To::Label(enosys),
        To::Next,
    );
    if !jit {
        b.jump(BPF_JEQ, nr(SYS_MMAP), To::Label(mmap), To::Next);
        b.jump(
            BPF_JEQ,
            nr(libc::SYS_mprotect),
            To::Label(mprotect),
            To::Next,
        );
        b.jump(
            BPF_JEQ,
            nr(libc::SYS_pkey_mprotect),
            To::Label(mprotect),
            To::Next,
        );
        b.jump(BPF_JEQ, nr(libc::SYS_shmat), To::Label(shmat), To::Next);
    }
    b.stmt(BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);

    b.here(socket);
    b.stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(0));
    for &f in families {
        b.jump(BPF_JEQ, f as u32, To::Label(allow), To::Next);
    }
    b.stmt(BPF_RET | libc::BPF_K, errno(libc::EAFNOSUPPORT));

    // systemd's MemoryDenyWriteExecute=: no mapping both writable and executable, no
    // making memory executable later, no executable SysV shared memory.
    let wx = (libc::PROT_WRITE | libc::PROT_EXEC) as u32;
    b.here(mmap);
    b.stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(2));
    b.stmt(BPF_ALU | BPF_AND | libc::BPF_K, wx);
    b.jump(BPF_JEQ, wx, To::Label(eacces), To::Label(allow));
    b.here(mprotect);
    b.stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(2));
    b.jump(
        BPF_JSET,
        libc::PROT_EXEC as u32,
        To::Label(eacces),
        To::Label(allow),
    );
    b.here(shmat);
    b.stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(2));
    b.jump(
        BPF_JSET,
        libc::SHM_EXEC as u32,
        To::Label(eacces),
        To::Label(allow),
    );

    b.here(allow);
    b.stmt(BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    b.here(eacces);
    b.stmt(BPF_RET | libc::BPF_K, errno(libc::EACCES));
    b.here(enosys);
    b.stmt(BPF_RET | libc::BPF_K, errno(libc::ENOSYS));
    b.here(kill);
    b.stmt(BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ancestors_of_hidden_paths_are_split() {
        let root = tempfile::tempdir().expect("tempdir");
        for d in ["a/secret", "a/open", "b"] {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        let hidden = [root.path().join("a/secret")];
        let mut out = Vec::new();
        visible(root.path(), &hidden, &mut out);
        out.sort();
        assert_eq!(out, vec![root.path().join("a/open"), root.path().join("b")]);
    }

    #[test]
    fn cgroup_mounts_are_found_by_type_and_controller() {
        let mountinfo = "\
35 24 0:30 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory
36 24 0:31 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw
37 24 0:32 / /sys/fs/cgroup/pids rw,relatime shared:16 - cgroup cgroup rw,pids";
        assert_eq!(
            cgroup_mount(mountinfo, "cgroup", Some("memory")),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            cgroup_mount(mountinfo, "cgroup2", None),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup_mount(mountinfo, "cgroup", Some("cpu")), None);
    }

    #[test]
    fn every_jump_of_the_filter_lands_inside_it() {
        for jit in [false, true] {
            let f = seccomp_filter(0xC000_003E, &[1, 2, 10, 29], jit);
            for (i, insn) in f.iter().enumerate() {
                if u32::from(insn.code) & 0x07 == libc::BPF_JMP {
                    assert!(i + 1 + usize::from(insn.jt.max(insn.jf)) < f.len(), "{i}");
                }
            }
            let last = f.last().map(|i| i.k);
            assert_eq!(last, Some(libc::SECCOMP_RET_KILL_PROCESS));
        }
    }
}
