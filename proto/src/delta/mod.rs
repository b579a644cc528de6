//! The module payload formats of `Payload.encoding`, shared by the control plane (which
//! makes them) and the edge (which applies them).
//!
//! * `FULL_ZSTD`: the artifact, zstd-compressed.
//! * `BSDIFF_ZSTD`: an 80-byte header, then a bsdiff patch:
//!
//! ```text
//! "AVDELTA2" | base sha256 (32) | target sha256 (32) | target size (u64 LE) | streams
//! "AVDELTA3" | base sha256 (32) | target sha256 (32) | target size (u64 LE) | filter | streams
//! ```
//!
//!   `AVDELTA2` splits the patch into five zstd streams (`streams`). `AVDELTA3` is the
//!   same patch between two ELF executables whose calls were rewritten as offsets into
//!   `.text` before diffing (`filter`: the architecture and both `.text` regions); the older
//!   `AVDELTA1` (one zstd stream of bsdiff's interleaved blocks) is still applied, so
//!   bundles made before stay installable.
//!
//! Patches are made with bsdiff's matching over a 32-bit suffix array (`scan`,
//! `suffix`): about 5 bytes of memory per old byte plus both inputs. Applying either
//! format never trusts the payload and runs in constant memory: the old artifact is read
//! at offsets, the patch streams in and the result streams out through a hash
//! (`patch`). The base is checked before patching, every stream is bounded by the
//! declared size (a zstd bomb or a hostile patch cannot make work or output past it),
//! zstd windows are capped, and the result is checked against size and sha256.

mod filter;
mod patch;
mod scan;
mod streams;
mod suffix;

use std::io::{self, Read, Write};

use crate::digest::{Hasher, HashingWriter, Sha256};
pub use patch::Positioned;

/// First bytes of the deltas this version makes between files that are not executables
/// it knows.
pub const MAGIC: &[u8; 8] = b"AVDELTA2";
/// First bytes of the deltas this version makes between x86-64 or aarch64 ELF executables.
pub const MAGIC_CODE: &[u8; 8] = b"AVDELTA3";
/// First bytes of the single-stream deltas of earlier versions (still applied).
pub const MAGIC_V1: &[u8; 8] = b"AVDELTA1";
/// Length of the delta header.
pub const HEADER_LEN: usize = 8 + 32 + 32 + 8;
/// zstd level of payloads: built once, sent to thousands of nodes, so the slowest.
pub const LEVEL: i32 = 19;
/// log2 of the largest zstd window of a full payload (8 MiB): what a gateway holds to
/// decompress one, whatever the artifact's size.
pub const FULL_WINDOW_LOG: u32 = 23;

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
    /// The base is too large for a delta (4 GiB or more).
    #[error("base of {0} bytes is too large for a delta")]
    BaseTooLarge(u64),
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
    /// Format version: 1 (one stream), 2 (five streams) or 3 (five streams, calls
    /// rewritten).
    pub version: u8,
}

impl DeltaHeader {
    /// The 80 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(match self.version {
            1 => MAGIC_V1,
            3 => MAGIC_CODE,
            _ => MAGIC,
        });
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
        let version = match &buf[..8] {
            m if m == MAGIC => 2,
            m if m == MAGIC_CODE => 3,
            m if m == MAGIC_V1 => 1,
            _ => return Err(DeltaError::BadHeader),
        };
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
            version,
        })
    }
}

/// Writes the delta turning `old` into `new` to `out`, its streams compressed at
/// `level`. Memory: both inputs (copied once more for executables, whose calls are
/// rewritten; `write_delta_owned` rewrites in place), the suffix array (4 bytes per old
/// byte) and the raw streams (at most about `new`), then one stream's compressor at a
/// time.
pub fn write_delta<W: Write>(old: &[u8], new: &[u8], level: i32, out: W) -> Result<W, DeltaError> {
    if filter::Filter::detect(old, new).is_some() {
        return write_delta_owned(old.to_vec(), new.to_vec(), level, out);
    }
    encode(old, new, header(old, new, 2), None, level, out)
}

/// `write_delta` for inputs the caller hands over, rewritten in place.
pub fn write_delta_owned<W: Write>(
    mut old: Vec<u8>,
    mut new: Vec<u8>,
    level: i32,
    out: W,
) -> Result<W, DeltaError> {
    let Some(code) = filter::Filter::detect(&old, &new) else {
        return encode(&old, &new, header(&old, &new, 2), None, level, out);
    };
    let header = header(&old, &new, 3);
    filter::forward(code.arch, code.old, &mut old);
    filter::forward(code.arch, code.new, &mut new);
    encode(&old, &new, header, Some(code), level, out)
}

fn header(old: &[u8], new: &[u8], version: u8) -> DeltaHeader {
    DeltaHeader {
        base: Sha256::of(old),
        target: Sha256::of(new),
        target_size: new.len() as u64,
        version,
    }
}

fn encode<W: Write>(
    old: &[u8],
    new: &[u8],
    header: DeltaHeader,
    code: Option<filter::Filter>,
    level: i32,
    mut out: W,
) -> Result<W, DeltaError> {
    let mut encoder = streams::Encoder::default();
    if !scan::diff(old, new, &mut encoder) {
        return Err(DeltaError::BaseTooLarge(old.len() as u64));
    }
    out.write_all(&header.encode())?;
    if let Some(code) = code {
        out.write_all(&code.encode())?;
    }
    Ok(encoder.finish(level, out)?)
}

/// Applies the delta `payload` to `old`, writing the artifact the signed manifest names
/// (`sha256`, `size`) to `out`; returns the header and `out` once the result checked out.
///
/// Nothing the payload says sizes a buffer: a header naming another target or size is
/// refused before patching, the patch may not produce a byte past `size`, and zstd
/// windows are capped. Memory is constant: a few 64 KiB buffers and the capped windows.
/// On an error `out` holds a partial result that must be discarded.
pub fn apply_delta<P, Q, W>(
    old: &P,
    payload: &Q,
    sha256: &Sha256,
    size: u64,
    out: W,
) -> Result<(DeltaHeader, W), DeltaError>
where
    P: Positioned + ?Sized,
    Q: Positioned + ?Sized,
    W: Write,
{
    let mut head = [0u8; HEADER_LEN];
    patch::read_exact_at(payload, &mut head, 0).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => DeltaError::BadHeader,
        _ => DeltaError::Io(e),
    })?;
    let header = DeltaHeader::read(&mut head.as_slice())?;
    if header.target != *sha256 || header.target_size != size {
        return Err(DeltaError::HeaderMismatch {
            target: header.target,
            target_size: header.target_size,
            expected: *sha256,
            expected_size: size,
        });
    }
    let found = hash_at(old)?;
    if found != header.base {
        return Err(DeltaError::BaseMismatch {
            expected: header.base,
            found,
        });
    }
    // Every output byte comes from a stream, plus a few control bytes per block:
    // bounding the streams bounds the work of empty blocks, whatever the control says.
    let limit = patch_stream_limit(size);
    let mut writer = HashingWriter::new(out);
    let start = HEADER_LEN as u64;
    let applied = match header.version {
        1 => {
            let rest = payload.len()?.saturating_sub(start);
            let stream = Bounded {
                inner: decoder(patch::Section::new(payload, start, rest), FULL_WINDOW_LOG)?,
                left: limit,
                limit: size,
            };
            patch::apply(&mut patch::Interleaved(stream), old, size, &mut writer)
        }
        2 => {
            let mut streams = streams::Streams::open(payload, start, limit)?;
            patch::apply(&mut streams, old, size, &mut writer)
        }
        _ => {
            let mut record = [0u8; filter::RECORD_LEN];
            patch::read_exact_at(payload, &mut record, start)
                .map_err(|_| DeltaError::Corrupt("truncated filter record".into()))?;
            let code = filter::Filter::decode(&record)
                .ok_or_else(|| DeltaError::Corrupt("unknown architecture in filter".into()))?;
            let start = start + filter::RECORD_LEN as u64;
            let mut streams = streams::Streams::open(payload, start, limit)?;
            let old = filter::Rewritten::new(old, code.arch, code.old)?;
            let mut restore = filter::Restore::new(&mut writer, code.arch, code.new);
            patch::apply(&mut streams, &old, size, &mut restore)
                .and_then(|n| restore.finish().map(|_| n).map_err(patch::Fault::Output))
        }
    };
    applied.map_err(|fault| match fault {
        patch::Fault::Output(e) | patch::Fault::Base(e) => DeltaError::Io(e),
        patch::Fault::Patch(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            DeltaError::TooLarge(size)
        }
        patch::Fault::Patch(e) => corrupt(e),
    })?;
    let (out, found, written) = writer.finish();
    check(sha256, size, found, written)?;
    Ok((header, out))
}

/// The sha256 of everything in `src`, read in steps.
fn hash_at<P: Positioned + ?Sized>(src: &P) -> io::Result<Sha256> {
    let len = src.len()?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < len {
        let n = buf
            .len()
            .min(usize::try_from(len - at).unwrap_or(usize::MAX));
        patch::read_exact_at(src, &mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finish())
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

/// A zstd decoder whose window is at most 2^`window_log` bytes: a frame may ask for far
/// more, and a hostile one would get it otherwise.
fn decoder<R: Read>(
    input: R,
    window_log: u32,
) -> Result<zstd::Decoder<'static, io::BufReader<R>>, DeltaError> {
    let mut d = zstd::Decoder::new(input).map_err(corrupt)?;
    d.window_log_max(window_log).map_err(corrupt)?;
    Ok(d)
}

/// Compresses `artifact` as a `FULL_ZSTD` payload into `out`.
pub fn write_full<W: Write>(mut artifact: impl Read, level: i32, out: W) -> Result<W, DeltaError> {
    let mut encoder = zstd::Encoder::new(out, level)?;
    encoder.window_log(FULL_WINDOW_LOG)?;
    encoder.include_checksum(false)?;
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
        inner: decoder(payload, FULL_WINDOW_LOG)?,
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
mod tests;
