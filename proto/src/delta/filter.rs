//! Branch targets rewritten before diffing, the cheap part of what Courgette and Zucchini
//! do. When code moves, every relative call into code that did not move changes, and
//! bsdiff sends each change as a difference byte; written as an offset from the start of
//! `.text`, such a call is the same in both versions. Only calls are rewritten
//! (x86-64 `call rel32`, aarch64 `bl imm26`): jumps are mostly local and lose more than
//! they gain (measured on esbuild).
//!
//! The rewrite is a bijection evaluated block by block (64 KiB from the start of the
//! region), so both ends agree on which bytes are instructions without a disassembler,
//! and the edge can rewrite any block of the old artifact it reads at an offset, and the
//! new artifact block by block as it is written: memory stays one block per side.
//! Bytes that only look like a call are rewritten too, harmlessly: the inverse restores
//! them exactly.

use std::cell::RefCell;
use std::io::{self, Write};

use super::patch::{read_exact_at, Positioned};

/// The rewrite restarts every `BLOCK` bytes of a region. Small, because the patch reads
/// the old artifact in many short runs and each needs its block rewritten.
const BLOCK: usize = 4096;
/// Rewritten blocks of the old artifact kept (direct-mapped): 64 KiB.
const SLOTS: usize = 16;
/// Length of the filter record in an `AVDELTA3` payload.
pub(crate) const RECORD_LEN: usize = 1 + 4 * 8;

/// Whose calls are rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    /// `E8` + rel32, its top byte 00 or FF (within ±16 MiB).
    X86_64,
    /// `BL`: opcode 100101, imm26 in words.
    Aarch64,
}

/// Bytes `start..start + len` of an artifact: its `.text`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    /// File offset of the first byte.
    pub start: u64,
    /// Its length.
    pub len: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// The rewrite of one payload: the architecture and both artifacts' code regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    pub arch: Arch,
    pub old: Region,
    pub new: Region,
}

impl Filter {
    /// The filter for two ELF executables of one architecture it knows, if they are.
    pub(crate) fn detect(old: &[u8], new: &[u8]) -> Option<Filter> {
        let (arch, old_text) = text(old)?;
        let (new_arch, new_text) = text(new)?;
        (arch == new_arch).then_some(Filter {
            arch,
            old: old_text,
            new: new_text,
        })
    }

    /// The record as stored after the header.
    pub(crate) fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[0] = match self.arch {
            Arch::X86_64 => 1,
            Arch::Aarch64 => 2,
        };
        let words = [self.old.start, self.old.len, self.new.start, self.new.len];
        for (i, w) in words.iter().enumerate() {
            out[1 + i * 8..9 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Parses a record; `None` for an architecture this version does not know. Regions
    /// are not trusted: one past the artifact only yields a result the hash refuses.
    pub(crate) fn decode(record: &[u8; RECORD_LEN]) -> Option<Filter> {
        let arch = match record[0] {
            1 => Arch::X86_64,
            2 => Arch::Aarch64,
            _ => return None,
        };
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&record[1 + i * 8..9 + i * 8]);
            u64::from_le_bytes(w)
        };
        Some(Filter {
            arch,
            old: Region {
                start: word(0),
                len: word(1),
            },
            new: Region {
                start: word(2),
                len: word(3),
            },
        })
    }
}

/// The architecture and `.text` of a little-endian ELF64 executable, bounds-checked.
fn text(elf: &[u8]) -> Option<(Arch, Region)> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let arch = match u16_at(0x12)? {
        0x3e => Arch::X86_64,
        0xb7 => Arch::Aarch64,
        _ => return None,
    };
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let entsize = usize::from(u16_at(0x3a)?);
    let count = usize::from(u16_at(0x3c)?);
    let names = usize::from(u16_at(0x3e)?);
    if entsize < 0x40 {
        return None;
    }
    // Offset of field `field` of section header `i`.
    let header = |i: usize, field: usize| {
        shoff
            .checked_add(i.checked_mul(entsize)?)?
            .checked_add(field)
    };
    let strtab = usize::try_from(u64_at(header(names, 0x18)?)?).ok()?;
    for i in 0..count {
        let name = strtab.checked_add(usize::try_from(u32_at(header(i, 0)?)?).ok()?)?;
        if elf.get(name..name.checked_add(6)?)? != b".text\0" || u32_at(header(i, 4)?)? != 1 {
            continue;
        }
        let region = Region {
            start: u64_at(header(i, 0x18)?)?,
            len: u64_at(header(i, 0x20)?)?,
        };
        return (region.end() <= elf.len() as u64 && region.len > 0).then_some((arch, region));
    }
    None
}

/// What an x86-64 instruction at some offset carries, if it is one that is rewritten.
enum X86 {
    /// `call rel32`: a target in `.text`, rewritten as an offset from the region's start.
    Call,
    /// A RIP-relative operand (`lea`/`mov`/… with REX and ModRM `00 reg 101`, or
    /// `call`/`jmp [rip+disp32]`) whose operand starts `k` bytes in and whose instruction
    /// is `len` bytes: data, rewritten as an offset from the start of the file.
    Rip { k: usize, len: usize },
}

/// Decides about offset `i`: what is there, and one past the last byte the decision read
/// (the operand of a match excluded, except the byte `Call` checks).
fn x86_at(data: &[u8], i: usize) -> (Option<X86>, usize) {
    let at = |n: usize| data.get(i + n).copied();
    match at(0) {
        Some(0xe8) => match at(4) {
            Some(0 | 0xff) => (Some(X86::Call), i + 1),
            Some(_) => (None, i + 5),
            None => (None, i + 1),
        },
        Some(0x48..=0x4f) => match at(1) {
            Some(0x8d | 0x8b | 0x89 | 0x3b | 0x39 | 0x03 | 0x2b | 0x33 | 0x85) => match at(2) {
                Some(m) if m & 0xc7 == 0x05 && i + 7 <= data.len() => {
                    (Some(X86::Rip { k: 3, len: 7 }), i + 3)
                }
                _ => (None, i + 3),
            },
            _ => (None, i + 2),
        },
        Some(0xff) => match at(1) {
            Some(0x15 | 0x25) if i + 6 <= data.len() => (Some(X86::Rip { k: 2, len: 6 }), i + 2),
            _ => (None, i + 2),
        },
        _ => (None, i + 1),
    }
}

/// Rewrites one block in place: `pos` is its offset from the start of the region,
/// `origin` the start of the region in the file.
fn block(arch: Arch, data: &mut [u8], pos: u64, origin: u64, forward: bool) {
    match arch {
        Arch::X86_64 => {
            // Both directions must make the same decisions, so a decision may only read
            // bytes no rewrite changes: an operand is rewritten only if no earlier
            // decision read any of it (`frontier`: one past the furthest byte read).
            let mut frontier = 0;
            let mut i = 0;
            while i < data.len() {
                let (found, read) = x86_at(data, i);
                let (k, len) = match found {
                    Some(X86::Call) => (1, 5),
                    Some(X86::Rip { k, len }) => (k, len),
                    None => (0, 0),
                };
                if found.is_none() || i + k < frontier || i + len > data.len() {
                    frontier = frontier.max(read).max(if k == 1 { i + 5 } else { i + k });
                    i += 1;
                    continue;
                }
                let mut word = [0u8; 4];
                word.copy_from_slice(&data[i + k..i + k + 4]);
                let v = u32::from_le_bytes(word);
                // Targets as offsets (wrapping on purpose: only low bits are kept).
                let after = pos + (i + len) as u64;
                let w = match found {
                    Some(X86::Call) => {
                        let w = if forward {
                            v.wrapping_add(after as u32)
                        } else {
                            v.wrapping_sub(after as u32)
                        } & 0x01ff_ffff;
                        // Sign-extended from bit 24, so the top byte is 00 or FF again
                        // and the inverse finds the same instruction.
                        if w & 0x0100_0000 != 0 {
                            w | 0xfe00_0000
                        } else {
                            w
                        }
                    }
                    _ => {
                        let after = origin.wrapping_add(after) as u32;
                        if forward {
                            v.wrapping_add(after)
                        } else {
                            v.wrapping_sub(after)
                        }
                    }
                };
                data[i + k..i + k + 4].copy_from_slice(&w.to_le_bytes());
                frontier = frontier.max(i + k);
                i += len;
            }
        }
        Arch::Aarch64 => {
            for (k, chunk) in data.chunks_exact_mut(4).enumerate() {
                let mut word = [0u8; 4];
                word.copy_from_slice(chunk);
                let v = u32::from_le_bytes(word);
                if v >> 26 != 0b100101 {
                    continue;
                }
                let at = ((pos + 4 * k as u64) / 4) as u32;
                let imm = if forward {
                    v.wrapping_add(at)
                } else {
                    v.wrapping_sub(at)
                } & 0x03ff_ffff;
                chunk.copy_from_slice(&((v & 0xfc00_0000) | imm).to_le_bytes());
            }
        }
    }
}

/// Rewrites the region of a whole artifact in memory (the encoder's side).
pub(crate) fn forward(arch: Arch, region: Region, data: &mut [u8]) {
    let start = usize::try_from(region.start).unwrap_or(usize::MAX);
    let end = usize::try_from(region.end())
        .unwrap_or(usize::MAX)
        .min(data.len());
    if start >= end {
        return;
    }
    for (k, chunk) in data[start..end].chunks_mut(BLOCK).enumerate() {
        block(arch, chunk, (k * BLOCK) as u64, region.start, true);
    }
}

/// A block of the old artifact, rewritten: its index and bytes.
type Cached = Option<(u64, Vec<u8>)>;

/// The old artifact as the encoder saw it: reads inside the region come back rewritten,
/// from a few cached blocks.
pub(crate) struct Rewritten<'a, P: ?Sized> {
    src: &'a P,
    arch: Arch,
    region: Region,
    /// Length of `src`, asked once: a file's costs a syscall, and reads are many.
    len: u64,
    /// Per slot, the block index cached and its rewritten bytes.
    cache: RefCell<Vec<Cached>>,
}

impl<'a, P: Positioned + ?Sized> Rewritten<'a, P> {
    /// `src` with `region` rewritten for `arch`.
    pub(crate) fn new(src: &'a P, arch: Arch, region: Region) -> io::Result<Self> {
        Ok(Rewritten {
            src,
            arch,
            region,
            len: src.len()?,
            cache: RefCell::new(vec![None; SLOTS]),
        })
    }
}

impl<P: Positioned + ?Sized> Positioned for Rewritten<'_, P> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = self.region.end().min(self.len);
        if offset < self.region.start || offset >= end {
            // Outside the region: as stored, up to where the region starts.
            let max = if offset < self.region.start {
                buf.len()
                    .min(usize::try_from(self.region.start - offset).unwrap_or(usize::MAX))
            } else {
                buf.len()
            };
            return self.src.read_at(&mut buf[..max], offset);
        }
        let index = (offset - self.region.start) / BLOCK as u64;
        let mut slots = self.cache.borrow_mut();
        let Some(cache) = slots.get_mut((index % SLOTS as u64) as usize) else {
            return Ok(0);
        };
        if cache.as_ref().is_none_or(|(i, _)| *i != index) {
            let from = self.region.start + index * BLOCK as u64;
            let n = usize::try_from((end - from).min(BLOCK as u64)).unwrap_or(BLOCK);
            let mut data = cache.take().map(|(_, d)| d).unwrap_or_default();
            data.resize(n, 0);
            read_exact_at(self.src, &mut data, from)?;
            block(
                self.arch,
                &mut data,
                index * BLOCK as u64,
                self.region.start,
                true,
            );
            *cache = Some((index, data));
        }
        let Some((_, data)) = cache.as_ref() else {
            return Ok(0);
        };
        let at = usize::try_from(offset - self.region.start - index * BLOCK as u64)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = buf.len().min(data.len() - at);
        buf[..n].copy_from_slice(&data[at..at + n]);
        Ok(n)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

/// Undoes the rewrite on the new artifact as it is written: bytes of the region are
/// held until their block is whole, everything else passes straight through.
pub(crate) struct Restore<W> {
    out: W,
    arch: Arch,
    region: Region,
    /// Offset of the next byte written.
    pos: u64,
    /// The region's current block, rewritten bytes so far.
    held: Vec<u8>,
}

impl<W: Write> Restore<W> {
    /// Writes to `out`, restoring `region` for `arch`.
    pub(crate) fn new(out: W, arch: Arch, region: Region) -> Self {
        Restore {
            out,
            arch,
            region,
            pos: 0,
            held: Vec::new(),
        }
    }

    fn release(&mut self) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let first = self.pos - self.held.len() as u64 - self.region.start;
        block(self.arch, &mut self.held, first, self.region.start, false);
        self.out.write_all(&self.held)?;
        self.held.clear();
        Ok(())
    }

    /// Writes what is held (the region may end short of a block, or the artifact short
    /// of the region) and returns the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.release()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Restore<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let (start, end) = (self.region.start, self.region.end());
        let n = if self.pos < start {
            let n = buf
                .len()
                .min(usize::try_from(start - self.pos).unwrap_or(usize::MAX));
            self.out.write_all(&buf[..n])?;
            n
        } else if self.pos >= end {
            self.out.write_all(buf)?;
            buf.len()
        } else {
            let in_block = ((self.pos - start) % BLOCK as u64) as usize;
            let to_block_end = (BLOCK - in_block) as u64;
            let room = to_block_end.min(end - self.pos);
            let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            self.held.extend_from_slice(&buf[..n]);
            self.pos += n as u64;
            if n as u64 == room {
                self.release()?;
            }
            return Ok(n);
        };
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len)
            .map(|_| match rng.u8(..12) {
                // Plenty of call opcodes, RIP-relative forms, and operands that look
                // like calls.
                0 => 0xe8,
                1 => 0xff,
                2 => 0,
                3 => 0x94,
                4 => 0x48,
                5 => 0x8d,
                6 => 0x05,
                7 => 0x15,
                _ => rng.u8(..),
            })
            .collect()
    }

    /// For both architectures and regions of every alignment: the rewrite read at any
    /// offset is the rewrite of the whole, and restoring it while writing in odd pieces
    /// gives the original bytes back.
    #[test]
    fn rewriting_is_undone_exactly_whatever_the_pieces() -> io::Result<()> {
        let data = noise(3 * BLOCK + 12_345, 7);
        for arch in [Arch::X86_64, Arch::Aarch64] {
            for region in [
                Region {
                    start: 0,
                    len: data.len() as u64,
                },
                Region {
                    start: 1001,
                    len: 2 * BLOCK as u64 + 3,
                },
                Region {
                    start: 4096,
                    len: u64::MAX / 2,
                },
            ] {
                let mut whole = data.clone();
                forward(arch, region, &mut whole);
                assert!(whole != data, "{arch:?} {region:?}: nothing rewritten");
                let reader = Rewritten::new(data.as_slice(), arch, region)?;
                let mut rng = fastrand::Rng::with_seed(3);
                for _ in 0..300 {
                    let at = rng.usize(..data.len());
                    let mut buf = vec![0u8; rng.usize(1..3 * BLOCK)];
                    let n = (buf.len()).min(data.len() - at);
                    read_exact_at(&reader, &mut buf[..n], at as u64)?;
                    assert!(buf[..n] == whole[at..at + n], "{arch:?} {region:?} at {at}");
                }
                let mut restore = Restore::new(Vec::new(), arch, region);
                let mut at = 0;
                while at < whole.len() {
                    let n = rng.usize(1..10_000).min(whole.len() - at);
                    restore.write_all(&whole[at..at + n])?;
                    at += n;
                }
                assert!(restore.finish()? == data, "{arch:?} {region:?}");
            }
        }
        Ok(())
    }

    /// A call into code that did not move is the same in both versions once rewritten.
    #[test]
    fn a_moved_call_to_code_that_stayed_is_rewritten_to_the_same_bytes() {
        let region = Region {
            start: 0,
            len: 4096,
        };
        let call_at = |at: usize, target: i64| {
            let mut code = vec![0x90u8; 4096];
            code[at] = 0xe8;
            let rel = (target - (at as i64 + 5)) as i32;
            code[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
            forward(Arch::X86_64, region, &mut code);
            code[at + 1..at + 5].to_vec()
        };
        assert_eq!(call_at(100, 16), call_at(612, 16));
        let bl_at = |at: usize, target: i64| {
            let mut code = vec![0u8; 4096];
            let imm = ((target - at as i64) / 4) as u32 & 0x03ff_ffff;
            code[at..at + 4].copy_from_slice(&(0x9400_0000 | imm).to_le_bytes());
            forward(Arch::Aarch64, region, &mut code);
            code[at..at + 4].to_vec()
        };
        assert_eq!(bl_at(400, 64), bl_at(2000, 64));
    }

    /// Truncated or lying ELF headers are not executables to rewrite.
    #[test]
    fn only_well_formed_elf_executables_are_recognised() {
        assert_eq!(text(b""), None);
        assert_eq!(text(b"\x7fELF\x02\x01"), None);
        let mut elf = vec![0u8; 0x40];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x12] = 0x3e;
        elf[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        elf[0x3a] = 0x40;
        elf[0x3c] = 2;
        assert_eq!(text(&elf), None);
        let own = std::fs::read("/proc/self/exe").unwrap_or_default();
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert!(matches!(text(&own), Some((Arch::X86_64, _))));
        }
    }
}
