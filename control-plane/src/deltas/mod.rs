//! Payloads for module transfers: a bsdiff+zstd delta from the artifact a node runs, or
//! the full artifact zstd-compressed.
//!
//! Each payload is built once, whatever the concurrency: the first request for a name
//! starts its build as a task of its own (so it outlives a requester that goes away) and
//! every later request joins it until it lands in the cache. A requester waits for a
//! delta at most `timeout` and then takes the full payload; the build goes on and serves
//! the next node. Delta builds run on tokio's blocking pool, at most `concurrency` at a
//! time and within a memory budget, so fleet streams never stall behind them. When a
//! delta does not fit the budget, fails, or is not smaller than the full payload, the
//! full payload is used. Built payloads are kept on disk in a byte-bounded LRU cache
//! (`cache`) that a restart keeps.

mod cache;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aviary_proto::bundle::{Encoding, PayloadInfo};
use aviary_proto::delta;
use aviary_proto::digest::Sha256;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use crate::blobs::Blobs;
use crate::error::ControlPlaneError;
use cache::{Cache, Lookup};

/// A payload on disk, ready to be streamed. While any clone lives the cache keeps its
/// file.
#[derive(Clone, Debug)]
pub(crate) struct Payload {
    /// What it is (encoding, base, size, sha256 of the payload bytes).
    pub info: PayloadInfo,
    /// The file.
    pub path: PathBuf,
    /// Counts the holders; the cache evicts only payloads nobody holds.
    pin: Arc<()>,
}

impl Payload {
    fn new(info: PayloadInfo, path: PathBuf) -> Payload {
        Payload {
            info,
            path,
            pin: Arc::new(()),
        }
    }
}

/// Limits of the delta builder.
#[derive(Clone, Debug)]
pub struct DeltaSettings {
    /// Builds running at once.
    pub concurrency: usize,
    /// Bytes all running builds may hold (bsdiff needs ≈ 9 × old + 2 × new).
    pub memory_budget: u64,
    /// Longer than this and the full payload is sent instead (the build goes on and is
    /// cached for the next node).
    pub timeout: Duration,
    /// Bytes of built payloads kept on disk; the least recently used go first.
    pub cache_bytes: u64,
}

impl Default for DeltaSettings {
    fn default() -> Self {
        DeltaSettings {
            concurrency: 2,
            memory_budget: 2 << 30,
            timeout: Duration::from_secs(120),
            cache_bytes: 1 << 30,
        }
    }
}

/// How a build ended, as every waiter sees it.
type Outcome = Result<Payload, String>;

/// What a build makes.
#[derive(Clone, Copy)]
enum Job {
    /// The full payload of an artifact.
    Full { to: Sha256 },
    /// The delta between two artifacts, needing `cost_kib` of the memory budget.
    Delta {
        from: Sha256,
        to: Sha256,
        cost_kib: u64,
    },
}

/// The cache and the builds in flight, behind one lock so a finished build moves from
/// one to the other at once.
struct State {
    cache: Cache,
    flights: HashMap<String, watch::Receiver<Option<Outcome>>>,
}

/// Makes and caches payloads.
pub(crate) struct Deltas {
    blobs: Blobs,
    settings: DeltaSettings,
    builds: Arc<Semaphore>,
    /// Budget in KiB permits (a semaphore counts u32-ish permits).
    memory: Arc<Semaphore>,
    state: Mutex<State>,
    /// Delta builds started by this process.
    delta_builds: AtomicU64,
}

fn io(context: &Path) -> impl FnOnce(std::io::Error) -> ControlPlaneError + '_ {
    move |source| ControlPlaneError::Io {
        context: context.display().to_string(),
        source,
    }
}

fn unavailable(e: impl std::fmt::Display) -> ControlPlaneError {
    ControlPlaneError::Unavailable(e.to_string())
}

/// Memory a delta build of `old` → `new` needs, in bytes: both inputs, the 32-bit
/// suffix array with its recursion (≤ 6 bytes per old byte), and the raw streams (at
/// most about `new`); the compressors run after the suffix array is freed.
fn build_cost(old: u64, new: u64) -> u64 {
    old.saturating_mul(7).saturating_add(new.saturating_mul(2))
}

impl Deltas {
    /// Caches under `dir` (created; payloads already there are kept), reading artifacts
    /// from `blobs`.
    pub(crate) fn open(
        blobs: Blobs,
        dir: &Path,
        settings: DeltaSettings,
    ) -> Result<Deltas, ControlPlaneError> {
        let cache = Cache::load(dir, settings.cache_bytes)?;
        let kib = usize::try_from(settings.memory_budget >> 10).unwrap_or(usize::MAX >> 4);
        Ok(Deltas {
            blobs,
            builds: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            memory: Arc::new(Semaphore::new(kib.min(Semaphore::MAX_PERMITS))),
            settings,
            state: Mutex::new(State {
                cache,
                flights: HashMap::new(),
            }),
            delta_builds: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every change is one
        // call), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The full payload of `to`.
    pub(crate) async fn full(self: &Arc<Self>, to: Sha256) -> Result<Payload, ControlPlaneError> {
        let name = format!("full-{}", to.hex());
        match self.obtain(&name, Job::Full { to }, None).await {
            Some(Ok(p)) => Ok(p),
            Some(Err(e)) => Err(ControlPlaneError::Unavailable(e)),
            None => Err(unavailable("full payload: no answer")),
        }
    }

    /// The best payload for a node running `from` (if anything) to receive `to`.
    pub(crate) async fn payload(
        self: &Arc<Self>,
        from: Option<Sha256>,
        to: Sha256,
    ) -> Result<Payload, ControlPlaneError> {
        let full = self.full(to).await?;
        let Some(from) = from.filter(|f| *f != to && self.blobs.path(f).is_file()) else {
            tracing::debug!(?from, %to, "no usable base: full payload");
            return Ok(full);
        };
        let (old_len, new_len) = (self.blobs.size(&from), self.blobs.size(&to));
        let cost_kib = build_cost(old_len, new_len) >> 10;
        if cost_kib.saturating_add(1) > self.settings.memory_budget >> 10 {
            tracing::info!(%from, %to, cost_kib, "delta over the memory budget: sending the full payload");
            return Ok(full);
        }
        let name = format!("delta-{}-{}", from.hex(), to.hex());
        let job = Job::Delta { from, to, cost_kib };
        match self.obtain(&name, job, Some(self.settings.timeout)).await {
            Some(Ok(delta)) if delta.info.size < full.info.size => Ok(delta),
            Some(Ok(delta)) => {
                tracing::info!(%from, %to, delta = delta.info.size, full = full.info.size, "delta not smaller: full payload");
                Ok(full)
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "delta build failed: sending the full payload");
                Ok(full)
            }
            None => {
                tracing::info!(%from, %to, "delta not ready in time: sending the full payload");
                Ok(full)
            }
        }
    }

    /// The cached payload `name`, or the outcome of its one build (started here unless
    /// one runs), waited on for at most `wait`: `None` when that ran out first.
    async fn obtain(
        self: &Arc<Self>,
        name: &str,
        job: Job,
        wait: Option<Duration>,
    ) -> Option<Outcome> {
        let kind = match job {
            Job::Full { .. } => "full",
            Job::Delta { .. } => "delta",
        };
        let mut rx = {
            let mut state = self.state();
            match state.cache.get(name) {
                Lookup::Ready(p) => {
                    metrics::counter!("aviary_delta_cache_hits_total", "encoding" => kind)
                        .increment(1);
                    return Some(Ok(p));
                }
                lookup => match state.flights.get(name) {
                    Some(rx) => {
                        metrics::counter!("aviary_delta_builds_joined_total", "encoding" => kind)
                            .increment(1);
                        rx.clone()
                    }
                    None => {
                        let unverified = match lookup {
                            Lookup::Unverified(p) => Some(p),
                            _ => None,
                        };
                        let (tx, rx) = watch::channel(None);
                        state.flights.insert(name.to_owned(), rx.clone());
                        self.spawn_build(name.to_owned(), job, unverified, tx);
                        rx
                    }
                },
            }
        };
        let done = async move {
            match rx.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone(),
                Err(_) => Some(Err(format!(
                    "the build of {kind} payload ended without an answer"
                ))),
            }
        };
        match wait {
            Some(limit) => tokio::time::timeout(limit, done).await.ok().flatten(),
            None => done.await,
        }
    }

    /// Runs the build of `name` as its own task, publishing the outcome on `tx` once the
    /// payload is in the cache.
    fn spawn_build(
        self: &Arc<Self>,
        name: String,
        job: Job,
        unverified: Option<Payload>,
        tx: watch::Sender<Option<Outcome>>,
    ) {
        let span = match job {
            Job::Full { to } => tracing::info_span!("payload_build", %to),
            Job::Delta { from, to, .. } => tracing::info_span!("delta_build", %from, %to),
        };
        let this = self.clone();
        let flight = Flight {
            deltas: self.clone(),
            name,
            rx: tx.subscribe(),
        };
        tokio::spawn(
            async move {
                let outcome = this.build(&flight.name, job, unverified).await;
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "payload build failed");
                }
                {
                    let mut state = this.state();
                    if let Ok(p) = &outcome {
                        state.cache.insert(flight.name.clone(), p.clone());
                    }
                    metrics::gauge!("aviary_delta_cache_bytes").set(state.cache.bytes() as f64);
                    state.flights.remove(&flight.name);
                }
                tx.send_replace(Some(outcome.map_err(|e| e.to_string())));
            }
            .instrument(span),
        );
    }

    /// Checks a payload cached by an earlier run or, when there is none or it fails the
    /// check, makes it.
    async fn build(
        self: &Arc<Self>,
        name: &str,
        job: Job,
        unverified: Option<Payload>,
    ) -> Result<Payload, ControlPlaneError> {
        if let Some(p) = unverified {
            let path = p.path.clone();
            let hashed = blocking(move || {
                let file = std::fs::File::open(&path).map_err(io(&path))?;
                aviary_proto::digest::hash_reader(std::io::BufReader::new(file)).map_err(io(&path))
            })
            .await;
            match hashed {
                Ok((sha, size)) if sha.hex() == p.info.sha256 && size == p.info.size => {
                    let kind = if matches!(job, Job::Full { .. }) {
                        "full"
                    } else {
                        "delta"
                    };
                    metrics::counter!("aviary_delta_cache_hits_total", "encoding" => kind)
                        .increment(1);
                    return Ok(p);
                }
                Ok(_) => tracing::warn!(payload = name, "cached payload is corrupt: rebuilding"),
                Err(e) => {
                    tracing::warn!(payload = name, error = %e, "cached payload unreadable: rebuilding")
                }
            }
            self.state().cache.discard(name);
        }
        let (data, info_path) = self.state().cache.paths(name);
        match job {
            Job::Full { to } => {
                let src = self.blobs.path(&to);
                blocking(move || {
                    let file = std::fs::File::open(&src).map_err(io(&src))?;
                    let bytes =
                        delta::write_full(std::io::BufReader::new(file), delta::LEVEL, Vec::new())
                            .map_err(|e| unavailable(format!("compress {}: {e}", src.display())))?;
                    let info = PayloadInfo::of(Encoding::FullZstd, None, &bytes);
                    store(&data, &info_path, &info, &bytes)
                })
                .await
            }
            Job::Delta { from, to, cost_kib } => {
                let permits = u32::try_from(cost_kib.max(1)).unwrap_or(u32::MAX);
                let _slot = self
                    .builds
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(unavailable)?;
                let _memory = self
                    .memory
                    .clone()
                    .acquire_many_owned(permits)
                    .await
                    .map_err(unavailable)?;
                self.delta_builds.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let (old_path, new_path) = (self.blobs.path(&from), self.blobs.path(&to));
                let built = blocking(move || {
                    let old = std::fs::read(&old_path).map_err(io(&old_path))?;
                    let new = std::fs::read(&new_path).map_err(io(&new_path))?;
                    let new_len = new.len() as u64;
                    let bytes = delta::write_delta_owned(old, new, delta::LEVEL, Vec::new())
                        .map_err(|e| unavailable(format!("delta {from} -> {to}: {e}")))?;
                    let info = PayloadInfo::of(Encoding::BsdiffZstd, Some(from), &bytes);
                    let saved = new_len.saturating_sub(info.size);
                    store(&data, &info_path, &info, &bytes).map(|p| (p, saved))
                })
                .await;
                metrics::histogram!("aviary_delta_build_seconds")
                    .record(started.elapsed().as_secs_f64());
                let (payload, saved) = built?;
                metrics::counter!("aviary_delta_bytes_saved_total").increment(saved);
                Ok(payload)
            }
        }
    }

    /// Delta builds this process started (each (from, to) pair once while cached).
    #[cfg(test)]
    fn delta_builds(&self) -> u64 {
        self.delta_builds.load(Ordering::Relaxed)
    }
}

/// A build in flight; dropping it (normally, or if the task panics) takes it out of the
/// map, so the next request starts a new one instead of waiting on a dead one.
struct Flight {
    deltas: Arc<Deltas>,
    name: String,
    rx: watch::Receiver<Option<Outcome>>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut state = self.deltas.state();
        if state
            .flights
            .get(&self.name)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            state.flights.remove(&self.name);
        }
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlPlaneError> + Send + 'static,
) -> Result<T, ControlPlaneError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| unavailable(format!("payload task: {e}")))?
}

/// Writes `bytes` to `data` and `info` to `info_path` (temp, fsync, rename; info last, so
/// an info file always names complete data).
fn store(
    data: &Path,
    info_path: &Path,
    info: &PayloadInfo,
    bytes: &[u8],
) -> Result<Payload, ControlPlaneError> {
    write_atomic(data, bytes)?;
    let meta = serde_json::to_vec(info).map_err(unavailable)?;
    write_atomic(info_path, &meta)?;
    Ok(Payload::new(info.clone(), data.to_owned()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ControlPlaneError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| ControlPlaneError::Io {
        context: path.display().to_string(),
        source: e.error,
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests;
