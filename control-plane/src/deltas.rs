//! Payloads for module transfers: a bsdiff+zstd delta from the artifact a node runs, or
//! the full artifact zstd-compressed. Each is made once per (from, to) pair and cached on
//! disk next to the blobs; builds run on tokio's blocking pool, at most `concurrency` at a
//! time and within a memory budget, so fleet streams never stall behind them. When a
//! delta cannot be made in time, does not fit the budget, or is not smaller than the full
//! payload, the full payload is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aviary_proto::bundle::{Encoding, PayloadInfo};
use aviary_proto::delta;
use aviary_proto::digest::Sha256;
use tokio::sync::Semaphore;

use crate::blobs::Blobs;
use crate::error::ControlPlaneError;

/// zstd level for payloads: good ratio, fast enough to build on demand.
const LEVEL: i32 = 9;

/// A payload on disk, ready to be streamed.
#[derive(Clone, Debug)]
pub(crate) struct Payload {
    /// What it is (encoding, base, size, sha256 of the payload bytes).
    pub info: PayloadInfo,
    /// The file.
    pub path: PathBuf,
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
}

impl Default for DeltaSettings {
    fn default() -> Self {
        DeltaSettings {
            concurrency: 2,
            memory_budget: 2 << 30,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Makes and caches payloads.
pub(crate) struct Deltas {
    blobs: Blobs,
    dir: PathBuf,
    settings: DeltaSettings,
    builds: Arc<Semaphore>,
    /// Budget in KiB permits (a semaphore counts u32-ish permits).
    memory: Arc<Semaphore>,
}

fn io(context: &Path) -> impl FnOnce(std::io::Error) -> ControlPlaneError + '_ {
    move |source| ControlPlaneError::Io {
        context: context.display().to_string(),
        source,
    }
}

/// Memory a bsdiff build of `old` → `new` needs, in bytes.
fn build_cost(old: u64, new: u64) -> u64 {
    old.saturating_mul(9).saturating_add(new.saturating_mul(2))
}

impl Deltas {
    /// Caches under `dir` (created), reading artifacts from `blobs`.
    pub(crate) fn open(
        blobs: Blobs,
        dir: &Path,
        settings: DeltaSettings,
    ) -> Result<Deltas, ControlPlaneError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let kib = usize::try_from(settings.memory_budget >> 10).unwrap_or(usize::MAX >> 4);
        Ok(Deltas {
            blobs,
            dir: dir.to_owned(),
            builds: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            memory: Arc::new(Semaphore::new(kib.min(Semaphore::MAX_PERMITS))),
            settings,
        })
    }

    fn cached(&self, name: &str) -> Option<Payload> {
        let path = self.dir.join(format!("{name}.zst"));
        let meta = std::fs::read(self.dir.join(format!("{name}.json"))).ok()?;
        let info: PayloadInfo = serde_json::from_slice(&meta).ok()?;
        (std::fs::metadata(&path).ok()?.len() == info.size).then_some(Payload { info, path })
    }

    /// Writes `bytes` as the cached payload `name` (temp, fsync, rename; info last).
    fn store(
        &self,
        name: &str,
        info: &PayloadInfo,
        bytes: &[u8],
    ) -> Result<Payload, ControlPlaneError> {
        let path = self.dir.join(format!("{name}.zst"));
        write_atomic(&path, bytes)?;
        let meta =
            serde_json::to_vec(info).map_err(|e| ControlPlaneError::Unavailable(e.to_string()))?;
        write_atomic(&self.dir.join(format!("{name}.json")), &meta)?;
        Ok(Payload {
            info: info.clone(),
            path,
        })
    }

    /// The full payload of `to`.
    pub(crate) async fn full(self: &Arc<Self>, to: Sha256) -> Result<Payload, ControlPlaneError> {
        let name = format!("full-{}", to.hex());
        if let Some(p) = self.cached(&name) {
            metrics::counter!("aviary_delta_cache_hits_total", "encoding" => "full").increment(1);
            return Ok(p);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let src = this.blobs.path(&to);
            let file = std::fs::File::open(&src).map_err(io(&src))?;
            let bytes = delta::write_full(std::io::BufReader::new(file), LEVEL, Vec::new())
                .map_err(|e| {
                    ControlPlaneError::Unavailable(format!("compress {}: {e}", src.display()))
                })?;
            let info = PayloadInfo::of(Encoding::FullZstd, None, &bytes);
            this.store(&name, &info, &bytes)
        })
        .await
        .map_err(|e| ControlPlaneError::Unavailable(format!("payload task: {e}")))?
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
        let name = format!("delta-{}-{}", from.hex(), to.hex());
        if let Some(p) = self.cached(&name) {
            metrics::counter!("aviary_delta_cache_hits_total", "encoding" => "delta").increment(1);
            return Ok(if p.info.size < full.info.size {
                p
            } else {
                full
            });
        }
        let (old_len, new_len) = (
            std::fs::metadata(self.blobs.path(&from))
                .map(|m| m.len())
                .unwrap_or(0),
            std::fs::metadata(self.blobs.path(&to))
                .map(|m| m.len())
                .unwrap_or(0),
        );
        let cost_kib = build_cost(old_len, new_len) >> 10;
        if cost_kib.saturating_add(1) > self.settings.memory_budget >> 10 {
            tracing::info!(%from, %to, cost_kib, "delta over the memory budget: sending the full payload");
            return Ok(full);
        }
        let permits = u32::try_from(cost_kib.max(1)).unwrap_or(u32::MAX);
        let this = self.clone();
        let span = tracing::info_span!("delta_build", %from, %to);
        let build = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _slot = this.builds.clone().acquire_owned().await;
                let _memory = this.memory.clone().acquire_many_owned(permits).await;
                let inner = this.clone();
                let started = Instant::now();
                let built = tokio::task::spawn_blocking(move || {
                    let old = std::fs::read(inner.blobs.path(&from))
                        .map_err(io(&inner.blobs.path(&from)))?;
                    let new =
                        std::fs::read(inner.blobs.path(&to)).map_err(io(&inner.blobs.path(&to)))?;
                    let bytes = delta::write_delta(&old, &new, LEVEL, Vec::new()).map_err(|e| {
                        ControlPlaneError::Unavailable(format!("delta {from} -> {to}: {e}"))
                    })?;
                    let info = PayloadInfo::of(Encoding::BsdiffZstd, Some(from), &bytes);
                    inner.store(&name, &info, &bytes)
                })
                .await
                .map_err(|e| ControlPlaneError::Unavailable(format!("delta task: {e}")))?;
                metrics::histogram!("aviary_delta_build_seconds")
                    .record(started.elapsed().as_secs_f64());
                built
            },
            span,
        ));
        match tokio::time::timeout(self.settings.timeout, build).await {
            Ok(Ok(Ok(delta))) if delta.info.size < full.info.size => {
                metrics::counter!("aviary_delta_bytes_saved_total")
                    .increment(new_len.saturating_sub(delta.info.size));
                Ok(delta)
            }
            Ok(Ok(Ok(delta))) => {
                tracing::info!(%from, %to, delta = delta.info.size, full = full.info.size, "delta not smaller: full payload");
                Ok(full)
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "delta build failed: sending the full payload");
                Ok(full)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "delta build task failed: sending the full payload");
                Ok(full)
            }
            Err(_) => {
                tracing::info!(%from, %to, "delta not ready in time: sending the full payload");
                Ok(full)
            }
        }
    }
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
mod tests {
    use super::*;

    fn put(blobs: &Blobs, data: &[u8]) -> Result<Sha256, Box<dyn std::error::Error>> {
        let sha = Sha256::of(data);
        let mut w = blobs.writer(sha, data.len() as u64)?;
        w.write(data)?;
        w.finish()?;
        Ok(sha)
    }

    #[tokio::test]
    async fn deltas_are_built_once_cached_and_fall_back_to_full(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let blobs = Blobs::open(&dir.path().join("blobs"))?;
        let v1: Vec<u8> = (0..400_000u32)
            .map(|i| (i % 253) as u8 ^ (i / 1000) as u8)
            .collect();
        let mut v2 = v1.clone();
        v2[10_000..10_100].fill(1);
        let (a, b) = (put(&blobs, &v1)?, put(&blobs, &v2)?);
        let deltas = Arc::new(Deltas::open(
            blobs.clone(),
            &dir.path().join("deltas"),
            DeltaSettings::default(),
        )?);

        let p = deltas.payload(Some(a), b).await?;
        assert_eq!(p.info.encoding, Encoding::BsdiffZstd);
        let bytes = std::fs::read(&p.path)?;
        assert_eq!(Sha256::of(&bytes).hex(), p.info.sha256);
        let (_, out) = delta::apply_delta(&v1, bytes.as_slice(), &b, v2.len() as u64)?;
        assert_eq!(out, v2);
        let again = deltas.payload(Some(a), b).await?;
        assert_eq!(again.info, p.info);

        // No base, an unknown base, or the same version: full.
        for from in [None, Some(Sha256::of(b"unknown")), Some(b)] {
            assert_eq!(
                deltas.payload(from, b).await?.info.encoding,
                Encoding::FullZstd
            );
        }
        // A budget too small for bsdiff: full, no build.
        let tight = Arc::new(Deltas::open(
            blobs,
            &dir.path().join("deltas2"),
            DeltaSettings {
                memory_budget: 1 << 20,
                ..DeltaSettings::default()
            },
        )?);
        assert_eq!(
            tight.payload(Some(a), b).await?.info.encoding,
            Encoding::FullZstd
        );
        Ok(())
    }
}
