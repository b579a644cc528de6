//! Single flight, the cache and its restart, on real files.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn put(blobs: &Blobs, data: &[u8]) -> Result<Sha256, Box<dyn std::error::Error>> {
    let sha = Sha256::of(data);
    let mut w = blobs.writer(sha, data.len() as u64)?;
    w.write(data)?;
    w.finish()?;
    Ok(sha)
}

/// A 400 KB artifact and a version of it with 100 bytes changed.
fn pair() -> (Vec<u8>, Vec<u8>) {
    let v1: Vec<u8> = (0..400_000u32)
        .map(|i| (i % 253) as u8 ^ (i / 1000) as u8)
        .collect();
    let mut v2 = v1.clone();
    v2[10_000..10_100].fill(1);
    (v1, v2)
}

struct Setup {
    dir: tempfile::TempDir,
    blobs: Blobs,
    v1: Vec<u8>,
    v2: Vec<u8>,
    a: Sha256,
    b: Sha256,
}

fn setup() -> Result<Setup, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let blobs = Blobs::open(&dir.path().join("blobs"))?;
    let (v1, v2) = pair();
    let (a, b) = (put(&blobs, &v1)?, put(&blobs, &v2)?);
    Ok(Setup {
        dir,
        blobs,
        v1,
        v2,
        a,
        b,
    })
}

impl Setup {
    fn deltas(&self, settings: DeltaSettings) -> Result<Arc<Deltas>, ControlPlaneError> {
        Ok(Arc::new(Deltas::open(
            self.blobs.clone(),
            &self.dir.path().join("payloads"),
            settings,
        )?))
    }
}

#[tokio::test]
async fn deltas_are_built_once_cached_and_fall_back_to_full() -> TestResult {
    let s = setup()?;
    let deltas = s.deltas(DeltaSettings::default())?;
    let p = deltas.payload(Some(s.a), s.b).await?;
    assert_eq!(p.info.encoding, Encoding::BsdiffZstd);
    let bytes = std::fs::read(&p.path)?;
    assert_eq!(Sha256::of(&bytes).hex(), p.info.sha256);
    let (_, out) = delta::apply_delta(
        s.v1.as_slice(),
        bytes.as_slice(),
        &s.b,
        s.v2.len() as u64,
        Vec::new(),
    )?;
    assert_eq!(out, s.v2);
    let again = deltas.payload(Some(s.a), s.b).await?;
    assert_eq!(again.info, p.info);
    assert_eq!(deltas.delta_builds(), 1);

    // No base, an unknown base, or the same version: full.
    for from in [None, Some(Sha256::of(b"unknown")), Some(s.b)] {
        assert_eq!(
            deltas.payload(from, s.b).await?.info.encoding,
            Encoding::FullZstd
        );
    }
    // A budget too small for bsdiff: full, no build.
    let tight = Arc::new(Deltas::open(
        s.blobs.clone(),
        &s.dir.path().join("deltas2"),
        DeltaSettings {
            memory_budget: 1 << 20,
            ..DeltaSettings::default()
        },
    )?);
    assert_eq!(
        tight.payload(Some(s.a), s.b).await?.info.encoding,
        Encoding::FullZstd
    );
    assert_eq!(tight.delta_builds(), 0);
    Ok(())
}

/// Twenty requests at once (one per node of a rollout): one build, one payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_one_build() -> TestResult {
    let s = setup()?;
    let deltas = s.deltas(DeltaSettings::default())?;
    let asks: Vec<_> = (0..20)
        .map(|_| {
            let deltas = deltas.clone();
            let (a, b) = (s.a, s.b);
            tokio::spawn(async move { deltas.payload(Some(a), b).await })
        })
        .collect();
    let mut infos = Vec::new();
    for ask in asks {
        infos.push(ask.await??.info);
    }
    assert_eq!(deltas.delta_builds(), 1);
    assert!(infos.iter().all(|i| *i == infos[0]), "{infos:?}");
    assert_eq!(infos[0].encoding, Encoding::BsdiffZstd);
    Ok(())
}

/// A requester that gives up (timeout 0, or its task is dropped) does not stop the
/// build: the next request finds the delta cached, built once.
#[tokio::test]
async fn a_build_outlives_requesters_that_time_out_or_go_away() -> TestResult {
    let s = setup()?;
    let deltas = s.deltas(DeltaSettings {
        timeout: Duration::ZERO,
        ..DeltaSettings::default()
    })?;
    let first = deltas.payload(Some(s.a), s.b).await?;
    assert_eq!(first.info.encoding, Encoding::FullZstd, "no time to wait");
    let gone = tokio::spawn({
        let deltas = deltas.clone();
        let (a, b) = (s.a, s.b);
        async move { deltas.payload(Some(a), b).await }
    });
    gone.abort();
    let name = format!("delta-{}-{}", s.a.hex(), s.b.hex());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(deltas.state().cache.get(&name), Lookup::Ready(_)) {
        assert!(Instant::now() < deadline, "the delta never landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let later = deltas.payload(Some(s.a), s.b).await?;
    assert_eq!(later.info.encoding, Encoding::BsdiffZstd);
    assert_eq!(deltas.delta_builds(), 1);
    Ok(())
}

/// A restart keeps the cache; a cached payload corrupted on disk is rebuilt, never
/// served; leftovers of interrupted writes are removed.
#[tokio::test]
async fn the_cache_survives_a_restart_and_a_corrupt_entry_is_rebuilt() -> TestResult {
    let s = setup()?;
    let before = s
        .deltas(DeltaSettings::default())?
        .payload(Some(s.a), s.b)
        .await?;
    let dir = s.dir.path().join("payloads");
    std::fs::write(dir.join(".tmpXYZ"), b"half a payload")?;
    std::fs::write(dir.join("delta-orphan.zst"), b"no info")?;

    let reopened = s.deltas(DeltaSettings::default())?;
    assert!(!dir.join(".tmpXYZ").exists() && !dir.join("delta-orphan.zst").exists());
    let after = reopened.payload(Some(s.a), s.b).await?;
    assert_eq!(after.info, before.info);
    assert_eq!(reopened.delta_builds(), 0, "served from the cache");

    // Same size, one byte flipped: the check catches it and the delta is rebuilt.
    let mut bytes = std::fs::read(&after.path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&after.path, &bytes)?;
    drop(after);
    let again = s.deltas(DeltaSettings::default())?;
    let rebuilt = again.payload(Some(s.a), s.b).await?;
    assert_eq!(again.delta_builds(), 1);
    assert_eq!(rebuilt.info, before.info);
    assert_eq!(
        Sha256::of(&std::fs::read(&rebuilt.path)?).hex(),
        rebuilt.info.sha256
    );
    Ok(())
}

/// The cache holds at most its byte limit of unpinned payloads, evicting the least
/// recently used first and never a payload still held by a transfer.
#[tokio::test]
async fn the_cache_evicts_least_recently_used_payloads_but_not_held_ones() -> TestResult {
    let s = setup()?;
    let v3: Vec<u8> = s.v2.iter().rev().copied().collect();
    let c = put(&s.blobs, &v3)?;
    let probe = s.deltas(DeltaSettings::default())?;
    let one = probe.full(s.a).await?.info.size;
    drop(probe);
    std::fs::remove_dir_all(s.dir.path().join("payloads"))?;

    // Room for about two full payloads.
    let deltas = s.deltas(DeltaSettings {
        cache_bytes: one * 2 + one / 2,
        ..DeltaSettings::default()
    })?;
    let held = deltas.full(s.a).await?;
    drop(deltas.full(s.b).await?);
    drop(deltas.full(s.a).await?); // a is now more recent than b
    drop(deltas.full(c).await?); // over the limit: b goes, a is held anyway
    let cached = |sha: Sha256| {
        matches!(
            deltas.state().cache.get(&format!("full-{}", sha.hex())),
            Lookup::Ready(_)
        )
    };
    assert!(cached(s.a) && cached(c) && !cached(s.b));
    assert!(held.path.exists());
    assert!(!s
        .dir
        .path()
        .join(format!("payloads/full-{}.zst", s.b.hex()))
        .exists());

    // Nothing unpinned fits a zero limit, but a held payload stays until released.
    let none = s.deltas(DeltaSettings {
        cache_bytes: 0,
        ..DeltaSettings::default()
    })?;
    let held = none.full(s.a).await?;
    assert!(held.path.exists());
    drop(held);
    drop(none.full(s.b).await?);
    assert!(!s
        .dir
        .path()
        .join(format!("payloads/full-{}.zst", s.a.hex()))
        .exists());
    Ok(())
}
