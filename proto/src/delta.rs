//! The module payload formats of `Payload.encoding`, shared by the control plane (which
//! makes them) and the edge (which applies them).
//!
//! * `FULL_ZSTD`: the artifact, zstd-compressed.
//! * `BSDIFF_ZSTD`: an 80-byte header, then a zstd-compressed bsdiff patch:
//!
//! ```text
//! "AVDELTA1" | base sha256 (32) | target sha256 (32) | target size (u64 LE) | zstd(bsdiff)
//! ```
//!
//! Applying either never trusts the payload: the base is checked before patching, the
//! decompressed stream is bounded by the declared size (a zstd bomb or a hostile patch
//! cannot grow memory past it), and the result is checked against size and sha256.

use std::io::{self, Read, Write};

use crate::digest::{HashingWriter, Sha256};

/// First bytes of every delta.
pub const MAGIC: &[u8; 8] = b"AVDELTA1";
/// Length of the delta header.
pub const HEADER_LEN: usize = 8 + 32 + 32 + 8;

/// Why a payload could not be made or applied.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The payload does not start with a delta header.
    #[error("not an aviary delta (bad magic or truncated header)")]
    BadHeader,
    /// The patch was made against another artifact than the one installed.
    #[error("delta is for base {expected}, but the installed artifact is {found}")]
    BaseMismatch {
        /// The base the delta names.
        expected: Sha256,
        /// The sha256 of the bytes offered as base.
        found: Sha256,
    },
    /// The stream is not valid zstd or bsdiff data.
    #[error("corrupt payload: {0}")]
    Corrupt(String),
    /// The delta's header names another result than the signed manifest.
    #[error("delta produces {target} ({target_size} bytes), the signed manifest says {expected} ({expected_size} bytes)")]
    HeaderMismatch {
        /// The target the header names.
        target: Sha256,
        /// The size the header claims.
        target_size: u64,
        /// The signed sha256.
        expected: Sha256,
        /// The signed size.
        expected_size: u64,
    },
    /// The payload expands past its declared size.
    #[error("payload expands past its declared size of {0} bytes")]
    TooLarge(u64),
    /// The result has another size or sha256 than declared.
    #[error("result is {found_size} bytes with sha256 {found}, expected {expected_size} bytes with {expected}")]
    ResultMismatch {
        /// Declared digest.
        expected: Sha256,
        /// Declared size.
        expected_size: u64,
        /// Digest of the result.
        found: Sha256,
        /// Size of the result.
        found_size: u64,
    },
}

/// The header of a `BSDIFF_ZSTD` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    /// sha256 of the artifact the patch applies to.
    pub base: Sha256,
    /// sha256 of the artifact the patch produces.
    pub target: Sha256,
    /// Size of the produced artifact.
    pub target_size: u64,
}

impl DeltaHeader {
    /// The 80 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..40].copy_from_slice(&self.base.0);
        out[40..72].copy_from_slice(&self.target.0);
        out[72..].copy_from_slice(&self.target_size.to_le_bytes());
        out
    }

    /// Reads and checks the header from the front of `r`.
    pub fn read(r: &mut impl Read) -> Result<DeltaHeader, DeltaError> {
        let mut buf = [0u8; HEADER_LEN];
        r.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => DeltaError::BadHeader,
            _ => DeltaError::Io(e),
        })?;
        if &buf[..8] != MAGIC {
            return Err(DeltaError::BadHeader);
        }
        let mut base = [0u8; 32];
        base.copy_from_slice(&buf[8..40]);
        let mut target = [0u8; 32];
        target.copy_from_slice(&buf[40..72]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&buf[72..]);
        Ok(DeltaHeader {
            base: Sha256(base),
            target: Sha256(target),
            target_size: u64::from_le_bytes(size),
        })
    }
}

/// Writes the delta turning `old` into `new` to `out`. bsdiff holds a suffix array of
/// `old` (8 bytes per byte) besides both inputs; the patch streams into zstd.
pub fn write_delta<W: Write>(
    old: &[u8],
    new: &[u8],
    level: i32,
    mut out: W,
) -> Result<W, DeltaError> {
    let header = DeltaHeader {
        base: Sha256::of(old),
        target: Sha256::of(new),
        target_size: new.len() as u64,
    };
    out.write_all(&header.encode())?;
    let mut encoder = zstd::Encoder::new(out, level)?;
    bsdiff::diff(old, new, &mut encoder)?;
    Ok(encoder.finish()?)
}

/// Applies a delta read from `delta` to `old`, producing the artifact the signed manifest
/// names (`sha256`, `size`); returns the checked result.
///
/// Nothing the payload says sizes a buffer: a header naming another target or size is
/// refused before patching, the patch may not produce a byte past `size`, and the zstd
/// window is bounded by what a stream of that size can need. Memory: `old` + `size` +
/// the window.
pub fn apply_delta(
    old: &[u8],
    mut delta: impl Read,
    sha256: &Sha256,
    size: u64,
) -> Result<(DeltaHeader, Vec<u8>), DeltaError> {
    let header = DeltaHeader::read(&mut delta)?;
    if header.target != *sha256 || header.target_size != size {
        return Err(DeltaError::HeaderMismatch {
            target: header.target,
            target_size: header.target_size,
            expected: *sha256,
            expected_size: size,
        });
    }
    let found = Sha256::of(old);
    if found != header.base {
        return Err(DeltaError::BaseMismatch {
            expected: header.base,
            found,
        });
    }
    let capacity = usize::try_from(size).map_err(|_| DeltaError::TooLarge(size))?;
    // Every output byte comes from the stream, plus 24 control bytes per block: bounding
    // the stream bounds the work of empty blocks, whatever the control words say.
    let limit = patch_stream_limit(size);
    let mut patch = Bounded {
        inner: decoder(delta, limit)?,
        left: limit,
        limit: size,
    };
    let mut new = Vec::with_capacity(capacity);
    patch_bounded(old, &mut patch, &mut new, capacity).map_err(|e| match e.kind() {
        io::ErrorKind::FileTooLarge => DeltaError::TooLarge(size),
        _ => corrupt(e),
    })?;
    check(sha256, size, Sha256::of(&new), new.len() as u64)?;
    Ok((header, new))
}

/// The most payload bytes an artifact of `size` signed bytes can need in either encoding:
/// zstd never grows data by more than a little, and a patch carries each output byte
/// once plus its control words. A receiver refuses a payload declared larger, so a
/// control plane cannot make a gateway store more than this for a signed artifact.
pub fn max_payload_size(size: u64) -> u64 {
    (HEADER_LEN as u64).saturating_add(patch_stream_limit(size))
}

/// The most bytes a patch stream (or a full payload's compressed stream) for an artifact
/// of `size` bytes may have.
fn patch_stream_limit(size: u64) -> u64 {
    size.saturating_add(size / 8).saturating_add(1 << 20)
}

/// A zstd decoder whose window is no larger than a stream of `limit` bytes can need, or
/// 8 MiB (what a streaming encoder at level 19 declares without knowing the input's
/// size): a frame may ask for far more, and a hostile one would get it otherwise.
fn decoder<R: Read>(
    input: R,
    limit: u64,
) -> Result<zstd::Decoder<'static, io::BufReader<R>>, DeltaError> {
    let mut d = zstd::Decoder::new(input).map_err(corrupt)?;
    let needed = 64 - limit.max(1).leading_zeros();
    let window_log = needed.clamp(23, 27);
    d.window_log_max(window_log).map_err(corrupt)?;
    Ok(d)
}

/// bsdiff's patch format, applied with the output capped at `max` bytes before any byte
/// is read for it: blocks of `mix_len`, `copy_len` (u64 LE), `seek` (sign and magnitude),
/// then `mix_len` bytes added to the old bytes at the cursor and `copy_len` literal bytes.
fn patch_bounded(
    old: &[u8],
    patch: &mut impl Read,
    new: &mut Vec<u8>,
    max: usize,
) -> io::Result<()> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut oldpos: usize = 0;
    loop {
        let mut control = [0u8; 24];
        if !read_block_start(patch, &mut control)? {
            return Ok(());
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&control[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let (mix, copy, seek) = (word(0), word(1), word(2));
        let len = mix
            .checked_add(copy)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| invalid("block length overflows"))?;
        if len > max - new.len() {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("patch output past {max} bytes"),
            ));
        }
        let mix = usize::try_from(mix).map_err(|_| invalid("mix length overflows"))?;
        let start = new.len();
        new.resize(start + len, 0);
        patch.read_exact(&mut new[start..])?;
        let base = oldpos
            .checked_add(mix)
            .and_then(|end| old.get(oldpos..end))
            .ok_or_else(|| invalid("patch reads past the base"))?;
        for (n, o) in new[start..start + mix].iter_mut().zip(base) {
            *n = n.wrapping_add(*o);
        }
        let magnitude = seek & (u64::MAX >> 1);
        let magnitude = usize::try_from(magnitude).map_err(|_| invalid("seek overflows"))?;
        let after_mix = oldpos + mix;
        oldpos = if seek >> 63 == 1 {
            after_mix.checked_sub(magnitude)
        } else {
            after_mix.checked_add(magnitude)
        }
        .ok_or_else(|| invalid("seek before the base"))?;
    }
}

/// Reads a block's 24 control bytes; `false` at a clean end of the patch.
fn read_block_start(r: &mut impl Read, control: &mut [u8; 24]) -> io::Result<bool> {
    let mut got = 0;
    while got < control.len() {
        match r.read(&mut control[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Compresses `artifact` as a `FULL_ZSTD` payload into `out`.
pub fn write_full<W: Write>(mut artifact: impl Read, level: i32, out: W) -> Result<W, DeltaError> {
    let mut encoder = zstd::Encoder::new(out, level)?;
    io::copy(&mut artifact, &mut encoder)?;
    Ok(encoder.finish()?)
}

/// Decompresses a `FULL_ZSTD` payload into `out`, checking it is `size` bytes with
/// digest `sha256`. Streams: memory stays at zstd's window whatever the size.
pub fn apply_full<W: Write>(
    payload: impl Read,
    sha256: &Sha256,
    size: u64,
    out: W,
) -> Result<W, DeltaError> {
    let mut limited = Bounded {
        inner: decoder(payload, size)?,
        left: size.saturating_add(1),
        limit: size,
    };
    let mut writer = HashingWriter::new(out);
    match io::copy(&mut limited, &mut writer) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            return Err(DeltaError::TooLarge(size))
        }
        Err(e) if e.kind() == io::ErrorKind::Other || e.kind() == io::ErrorKind::InvalidData => {
            return Err(corrupt(e))
        }
        Err(e) => return Err(DeltaError::Io(e)),
    }
    let (out, found, written) = writer.finish();
    if written > size {
        return Err(DeltaError::TooLarge(size));
    }
    check(sha256, size, found, written)?;
    Ok(out)
}

fn check(
    expected: &Sha256,
    expected_size: u64,
    found: Sha256,
    found_size: u64,
) -> Result<(), DeltaError> {
    if found != *expected || found_size != expected_size {
        return Err(DeltaError::ResultMismatch {
            expected: *expected,
            expected_size,
            found,
            found_size,
        });
    }
    Ok(())
}

fn corrupt(e: io::Error) -> DeltaError {
    DeltaError::Corrupt(e.to_string())
}

/// Fails with `FileTooLarge` once more than `left` bytes were asked for.
struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Only an error if the stream really has more.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("more than {} bytes", self.limit),
                )),
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Compressible, structured, like code: runs and repeats.
                ((x >> 59) as u8).wrapping_add((i / 64) as u8)
            })
            .collect()
    }

    #[test]
    fn a_delta_round_trips_and_is_smaller_than_the_full_payload() -> Result<(), DeltaError> {
        let old = sample(200_000, 1);
        let mut new = old.clone();
        new[1000..1100].copy_from_slice(&sample(100, 9));
        new.extend_from_slice(&sample(5000, 3));
        let delta = write_delta(&old, &new, 3, Vec::new())?;
        let full = write_full(new.as_slice(), 3, Vec::new())?;
        assert!(
            delta.len() * 4 < full.len(),
            "delta {} vs full {}",
            delta.len(),
            full.len()
        );
        let (header, out) =
            apply_delta(&old, delta.as_slice(), &Sha256::of(&new), new.len() as u64)?;
        assert_eq!(out, new);
        assert_eq!(header.target, Sha256::of(&new));
        let back = apply_full(
            full.as_slice(),
            &Sha256::of(&new),
            new.len() as u64,
            Vec::new(),
        )?;
        assert_eq!(back, new);
        Ok(())
    }

    #[test]
    fn a_delta_against_another_base_is_refused_before_patching() -> Result<(), DeltaError> {
        let old = sample(10_000, 1);
        let new = sample(10_000, 2);
        let delta = write_delta(&old, &new, 3, Vec::new())?;
        let other = sample(10_000, 3);
        assert!(matches!(
            apply_delta(
                &other,
                delta.as_slice(),
                &Sha256::of(&new),
                new.len() as u64
            ),
            Err(DeltaError::BaseMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn flipped_bits_truncation_and_bad_magic_are_errors_never_panics() -> Result<(), DeltaError> {
        let old = sample(50_000, 1);
        let mut new = old.clone();
        new[40_000..40_050].fill(7);
        let delta = write_delta(&old, &new, 3, Vec::new())?;
        let (signed, size) = (Sha256::of(&new), new.len() as u64);
        for i in (HEADER_LEN..delta.len()).step_by(7) {
            let mut bad = delta.clone();
            bad[i] ^= 0x40;
            // Some zstd frame-header bits (e.g. window size) do not change the output;
            // whatever is accepted must be exactly the signed result.
            if let Ok((_, out)) = apply_delta(&old, bad.as_slice(), &signed, size) {
                assert_eq!(out, new, "bit flip at {i} produced other bytes");
            }
        }
        for cut in [0, 10, HEADER_LEN, HEADER_LEN + 5, delta.len() - 1] {
            assert!(
                apply_delta(&old, &delta[..cut], &signed, size).is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut bad = delta.clone();
        bad[0] = b'X';
        assert!(matches!(
            apply_delta(&old, bad.as_slice(), &signed, size),
            Err(DeltaError::BadHeader)
        ));
        // A header that lies about the size is refused before anything is sized by it.
        for claim in [10u64, 1 << 40, u64::MAX] {
            let mut lying = delta.clone();
            lying[72..80].copy_from_slice(&claim.to_le_bytes());
            assert!(
                matches!(
                    apply_delta(&old, lying.as_slice(), &signed, size),
                    Err(DeltaError::HeaderMismatch { target_size, .. }) if target_size == claim
                ),
                "claim {claim}"
            );
        }
        Ok(())
    }

    /// A patch stream with the right header whose blocks produce more than the signed
    /// size: refused at the first block past it, never buffered.
    #[test]
    fn a_patch_cannot_produce_more_than_the_signed_size() -> Result<(), DeltaError> {
        let old = sample(1000, 1);
        let new = sample(1000, 2);
        let (signed, size) = (Sha256::of(&new), new.len() as u64);
        let header = DeltaHeader {
            base: Sha256::of(&old),
            target: signed,
            target_size: size,
        };
        for (mix, copy) in [
            (0u64, 1u64 << 40),
            (u64::MAX, 1),
            (1 << 62, 1 << 62),
            (0, 1001),
        ] {
            let mut patch = Vec::new();
            for w in [mix, copy, 0] {
                patch.extend_from_slice(&w.to_le_bytes());
            }
            patch.extend_from_slice(&[7u8; 2000]);
            let mut payload = header.encode().to_vec();
            payload.extend(zstd::encode_all(patch.as_slice(), 3)?);
            let err = apply_delta(&old, payload.as_slice(), &signed, size);
            assert!(
                matches!(
                    err,
                    Err(DeltaError::TooLarge(_)) | Err(DeltaError::Corrupt(_))
                ),
                "({mix}, {copy}): {err:?}"
            );
        }
        // Empty blocks forever end at the stream bound, not in a hang.
        let endless = vec![0u8; 24 * 200_000];
        let mut payload = header.encode().to_vec();
        payload.extend(zstd::encode_all(endless.as_slice(), 3)?);
        let err = apply_delta(&old, payload.as_slice(), &signed, size);
        assert!(matches!(err, Err(DeltaError::TooLarge(_))), "{err:?}");
        Ok(())
    }

    /// A zstd frame that asks for a 2 GiB window is refused instead of allocated.
    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused() -> Result<(), DeltaError> {
        let data = sample(4096, 5);
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1)?;
        encoder.window_log(31)?;
        encoder.long_distance_matching(true)?;
        encoder.write_all(&data)?;
        let frame = encoder.finish()?;
        let err = apply_full(frame.as_slice(), &Sha256::of(&data), 4096, Vec::new());
        assert!(matches!(err, Err(DeltaError::Corrupt(_))), "{err:?}");
        assert!(max_payload_size(4096) < 4096 * 2 + (2 << 20));
        Ok(())
    }

    #[test]
    fn a_full_payload_that_expands_past_its_size_is_refused() -> Result<(), DeltaError> {
        let data = vec![0u8; 1 << 20];
        let full = write_full(data.as_slice(), 3, Vec::new())?;
        let err = apply_full(full.as_slice(), &Sha256::of(&data), 1000, Vec::new());
        assert!(matches!(err, Err(DeltaError::TooLarge(1000))), "{err:?}");
        let err = apply_full(full.as_slice(), &Sha256::of(b"x"), 1 << 20, Vec::new());
        assert!(
            matches!(err, Err(DeltaError::ResultMismatch { .. })),
            "{err:?}"
        );
        Ok(())
    }
}
