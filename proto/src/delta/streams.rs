//! The `AVDELTA2` patch: bsdiff's blocks split into five streams, each its own zstd
//! frame, because each has its own statistics and mixing them costs ratio:
//!
//! | # | stream | content |
//! |---|---|---|
//! | 0 | control | per block: add length, copy length, zigzag seek (LEB128 varints) |
//! | 1 | gaps | per non-zero difference byte: zero bytes before it, one byte (255: see 2) |
//! | 2 | long gaps | for each gap byte 255: the gap minus 255 (varint) |
//! | 3 | values | the non-zero difference bytes |
//! | 4 | extra | the literal bytes |
//!
//! Difference bytes are mostly zero (code that moved but did not change), so they are
//! sent as where the non-zero ones are and what they are; that compresses far better
//! than the bytes themselves. Each frame's window is capped (`WINDOW_LOG`) so a gateway
//! decodes all five at once in about 9 MiB whatever the artifact's size.

use std::io::{self, Read, Write};

use super::patch::{Blocks, Positioned, Section};
use super::scan::{Block, Sink};
use super::Bounded;

/// Number of streams.
pub(crate) const STREAMS: usize = 5;

/// log2 of the largest zstd window of each stream: what a gateway must hold for it.
pub(crate) const WINDOW_LOG: [u32; STREAMS] = [20, 21, 18, 21, 22];

/// Collects a diff's blocks as the five raw streams.
#[derive(Default)]
pub(crate) struct Encoder {
    streams: [Vec<u8>; STREAMS],
    /// Zero difference bytes since the last non-zero one.
    zeros: u64,
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

impl Sink for Encoder {
    fn block(&mut self, block: Block, old: &[u8], new: &[u8], extra: &[u8]) {
        let [control, gaps, long, values, literal] = &mut self.streams;
        varint(control, block.add);
        varint(control, block.copy);
        varint(control, zigzag(block.seek));
        for (o, n) in old.iter().zip(new) {
            let d = n.wrapping_sub(*o);
            if d == 0 {
                self.zeros += 1;
                continue;
            }
            if self.zeros < 255 {
                gaps.push(self.zeros as u8);
            } else {
                gaps.push(255);
                varint(long, self.zeros - 255);
            }
            values.push(d);
            self.zeros = 0;
        }
        literal.extend_from_slice(extra);
    }
}

impl Encoder {
    /// Compresses each stream at `level` and writes their lengths (u64 LE each) then the
    /// frames to `out`. Each raw stream is freed once compressed.
    pub(crate) fn finish<W: Write>(self, level: i32, mut out: W) -> io::Result<W> {
        let mut frames = Vec::with_capacity(STREAMS);
        for (raw, window) in self.streams.into_iter().zip(WINDOW_LOG) {
            frames.push(compress(&raw, level, window)?);
        }
        for f in &frames {
            out.write_all(&(f.len() as u64).to_le_bytes())?;
        }
        for f in &frames {
            out.write_all(f)?;
        }
        Ok(out)
    }
}

/// One zstd frame of `data` at `level`, its window at most 2^`window_log` bytes.
pub(crate) fn compress(data: &[u8], level: i32, window_log: u32) -> io::Result<Vec<u8>> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), level)?;
    e.set_pledged_src_size(Some(data.len() as u64))?;
    e.include_contentsize(true)?;
    e.include_checksum(false)?;
    // A window larger than the data buys nothing; zstd's minimum is 2^10.
    let needed = (64 - (data.len() as u64).max(1).leading_zeros()).max(10);
    e.window_log(window_log.min(needed))?;
    e.write_all(data)?;
    e.finish()
}

/// A zstd frame reader, bounded in window and in output.
type Stream<'a, P> = Bounded<zstd::Decoder<'static, io::BufReader<Section<'a, P>>>>;

/// The blocks of an `AVDELTA2` patch, read from its five streams at once.
pub(crate) struct Streams<'a, P: ?Sized> {
    control: Stream<'a, P>,
    gaps: Stream<'a, P>,
    long: Stream<'a, P>,
    values: Stream<'a, P>,
    extra: Stream<'a, P>,
    /// Zero difference bytes before the next non-zero one (`u64::MAX`: no more).
    zeros: u64,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// A varint; `None` at a clean end of the stream.
fn read_varint(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8];
        if r.read(&mut b)? == 0 {
            return if shift == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let bits = u64::from(b[0] & 0x7f);
        if shift == 63 && bits > 1 {
            break;
        }
        n |= bits << shift;
        if b[0] & 0x80 == 0 {
            return Ok(Some(n));
        }
    }
    Err(invalid("varint overflows"))
}

impl<'a, P: Positioned + ?Sized> Streams<'a, P> {
    /// Opens the streams of a patch at `start` of `payload`, each allowed to expand to
    /// at most `limit` bytes.
    pub(crate) fn open(payload: &'a P, start: u64, limit: u64) -> Result<Self, super::DeltaError> {
        let mut lengths = [0u8; 8 * STREAMS];
        super::patch::read_exact_at(payload, &mut lengths, start).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => super::DeltaError::BadHeader,
            _ => super::DeltaError::Io(e),
        })?;
        let mut at = start + lengths.len() as u64;
        let total = payload.len()?;
        let mut open = |i: usize| -> Result<Stream<'a, P>, super::DeltaError> {
            let mut len = [0u8; 8];
            len.copy_from_slice(&lengths[i * 8..i * 8 + 8]);
            let len = u64::from_le_bytes(len);
            if at.checked_add(len).is_none_or(|end| end > total) {
                return Err(super::DeltaError::Corrupt(format!(
                    "stream {i} runs past the payload"
                )));
            }
            let section = Section::new(payload, at, len);
            at += len;
            Ok(Bounded {
                inner: super::decoder(section, WINDOW_LOG[i])?,
                left: limit,
                limit,
            })
        };
        let mut streams = Streams {
            control: open(0)?,
            gaps: open(1)?,
            long: open(2)?,
            values: open(3)?,
            extra: open(4)?,
            zeros: 0,
        };
        streams.zeros = streams.next_gap()?;
        if at != total {
            return Err(super::DeltaError::Corrupt(
                "bytes after the last stream".into(),
            ));
        }
        Ok(streams)
    }

    /// The zeros before the next non-zero difference byte, `u64::MAX` when none is left.
    fn next_gap(&mut self) -> io::Result<u64> {
        let mut b = [0u8];
        if self.gaps.read(&mut b)? == 0 {
            return Ok(u64::MAX);
        }
        if b[0] < 255 {
            return Ok(u64::from(b[0]));
        }
        let more = read_varint(&mut self.long)?.ok_or_else(|| invalid("long gap missing"))?;
        more.checked_add(255)
            .filter(|&g| g != u64::MAX)
            .ok_or_else(|| invalid("gap overflows"))
    }
}

impl<P: Positioned + ?Sized> Blocks for Streams<'_, P> {
    fn next(&mut self) -> io::Result<Option<Block>> {
        let Some(add) = read_varint(&mut self.control)? else {
            return Ok(None);
        };
        let mut word = || read_varint(&mut self.control)?.ok_or_else(|| invalid("truncated block"));
        let copy = word()?;
        let seek = unzigzag(word()?);
        Ok(Some(Block { add, copy, seek }))
    }

    fn diff(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut i = 0;
        while i < buf.len() {
            if self.zeros > 0 {
                let n = usize::try_from(self.zeros)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - i);
                buf[i..i + n].fill(0);
                i += n;
                if self.zeros != u64::MAX {
                    self.zeros -= n as u64;
                }
                continue;
            }
            let mut v = [0u8];
            self.values.read_exact(&mut v)?;
            if v[0] == 0 {
                return Err(invalid("zero in the values stream"));
            }
            buf[i] = v[0];
            i += 1;
            self.zeros = self.next_gap()?;
        }
        Ok(())
    }

    fn extra(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.extra.read_exact(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_zigzag_round_trip_and_overlong_ones_are_refused() -> io::Result<()> {
        for n in [0u64, 1, 127, 128, 255, 300, 1 << 35, u64::MAX] {
            let mut b = Vec::new();
            varint(&mut b, n);
            assert_eq!(read_varint(&mut b.as_slice())?, Some(n));
        }
        for n in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(n)), n);
        }
        let overlong = [0xffu8; 11];
        assert!(read_varint(&mut overlong.as_slice()).is_err());
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(read_varint(&mut too_big.as_slice()).is_err());
        assert!(read_varint(&mut [0x80u8].as_slice()).is_err());
        assert_eq!(read_varint(&mut [0u8; 0].as_slice())?, None);
        Ok(())
    }
}
