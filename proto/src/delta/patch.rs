//! Applying a patch in constant memory: the old artifact is read with positioned reads,
//! the patch streams in, and the new artifact streams out; each step holds one 64 KiB
//! buffer whatever the sizes.

use std::io::{self, Read, Write};

use super::scan::Block;

/// Bytes read or written per step.
const STEP: usize = 64 * 1024;

/// Something read at offsets without moving a cursor (a file, or bytes in memory).
pub trait Positioned {
    /// Reads into `buf` from `offset`; fewer bytes only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Its length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether it holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl Positioned for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl Positioned for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(<[u8]>::len(self));
        let n = buf.len().min(<[u8]>::len(self) - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub(crate) fn read_exact_at<P: Positioned + ?Sized>(
    src: &P,
    mut buf: &mut [u8],
    mut offset: u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        match src.read_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `len` bytes of a positioned source from `start`, as a stream.
pub(crate) struct Section<'a, P: ?Sized> {
    src: &'a P,
    pos: u64,
    end: u64,
}

impl<'a, P: Positioned + ?Sized> Section<'a, P> {
    /// The bytes `start..start + len` of `src`.
    pub(crate) fn new(src: &'a P, start: u64, len: u64) -> Self {
        Section {
            src,
            pos: start,
            end: start.saturating_add(len),
        }
    }
}

impl<P: Positioned + ?Sized> Read for Section<'_, P> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let max = buf.len().min(left);
        if max == 0 {
            return Ok(0);
        }
        let n = self.src.read_at(&mut buf[..max], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The blocks of a patch and the bytes they carry, in order.
pub(crate) trait Blocks {
    /// The next block; `None` at the end of the patch.
    fn next(&mut self) -> io::Result<Option<Block>>;
    /// The next `buf.len()` difference bytes.
    fn diff(&mut self, buf: &mut [u8]) -> io::Result<()>;
    /// The next `buf.len()` literal bytes.
    fn extra(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Where applying went wrong.
pub(crate) enum Fault {
    /// The patch is corrupt or hostile (`FileTooLarge`: it produces too much).
    Patch(io::Error),
    /// The base could not be read.
    Base(io::Error),
    /// The output could not be written.
    Output(io::Error),
}

/// Applies `blocks` to `old`, writing at most `max` bytes to `out`; returns the count.
/// A block that would pass `max` fails with `FileTooLarge` before any of its bytes are
/// read, one that reads outside `old` with `InvalidData`.
pub(crate) fn apply<P: Positioned + ?Sized>(
    blocks: &mut impl Blocks,
    old: &P,
    max: u64,
    out: &mut impl Write,
) -> Result<u64, Fault> {
    let old_len = old.len().map_err(Fault::Base)?;
    let mut buf = vec![0u8; STEP];
    let mut base = vec![0u8; STEP];
    let (mut old_pos, mut written) = (0u64, 0u64);
    while let Some(block) = blocks.next().map_err(Fault::Patch)? {
        let len = block
            .add
            .checked_add(block.copy)
            .ok_or_else(|| Fault::Patch(invalid("block length overflows")))?;
        if len > max - written {
            return Err(Fault::Patch(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("patch output past {max} bytes"),
            )));
        }
        if old_pos
            .checked_add(block.add)
            .is_none_or(|end| end > old_len)
        {
            return Err(Fault::Patch(invalid("patch reads past the base")));
        }
        let mut left = block.add;
        while left > 0 {
            let n = STEP.min(usize::try_from(left).unwrap_or(STEP));
            blocks.diff(&mut buf[..n]).map_err(Fault::Patch)?;
            read_exact_at(old, &mut base[..n], old_pos).map_err(Fault::Base)?;
            for (b, o) in buf[..n].iter_mut().zip(&base[..n]) {
                *b = b.wrapping_add(*o);
            }
            out.write_all(&buf[..n]).map_err(Fault::Output)?;
            old_pos += n as u64;
            left -= n as u64;
        }
        let mut left = block.copy;
        while left > 0 {
            let n = STEP.min(usize::try_from(left).unwrap_or(STEP));
            blocks.extra(&mut buf[..n]).map_err(Fault::Patch)?;
            out.write_all(&buf[..n]).map_err(Fault::Output)?;
            left -= n as u64;
        }
        written += len;
        old_pos = old_pos
            .checked_add_signed(block.seek)
            .ok_or_else(|| Fault::Patch(invalid("seek before the base")))?;
    }
    Ok(written)
}

/// The `AVDELTA1` patch: one stream of blocks, each 24 control bytes (add and copy
/// lengths as u64 LE, the seek as sign and magnitude) followed by its difference and
/// literal bytes.
pub(crate) struct Interleaved<R>(pub R);

impl<R: Read> Blocks for Interleaved<R> {
    fn next(&mut self) -> io::Result<Option<Block>> {
        let mut control = [0u8; 24];
        let mut got = 0;
        while got < control.len() {
            match self.0.read(&mut control[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&control[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let magnitude =
            i64::try_from(word(2) & (u64::MAX >> 1)).map_err(|_| invalid("seek overflows"))?;
        Ok(Some(Block {
            add: word(0),
            copy: word(1),
            seek: if word(2) >> 63 == 1 {
                -magnitude
            } else {
                magnitude
            },
        }))
    }

    fn diff(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }

    fn extra(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }
}
