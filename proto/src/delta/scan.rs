//! bsdiff's matching (Percival, "Naive differences of executable code", 2003): walk the
//! new file, find the longest match of each position in the old one through the suffix
//! array, and cut the new file into blocks of "old bytes plus a small difference" (which
//! compress to almost nothing when code moved but barely changed) and literal bytes.

use super::suffix;

/// One block of a patch: `add` bytes that are old bytes (from the old cursor) plus a
/// difference, then `copy` bytes taken literally, then the old cursor moves by `seek`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    /// Bytes formed as old + difference.
    pub add: u64,
    /// Literal bytes.
    pub copy: u64,
    /// Move of the old cursor after the block.
    pub seek: i64,
}

/// Receives the blocks of a diff in order, with the bytes each covers.
pub(crate) trait Sink {
    /// One block: `old` and `new` are its `add` bytes on each side, `extra` its literal
    /// bytes.
    fn block(&mut self, block: Block, old: &[u8], new: &[u8], extra: &[u8]);
}

/// Diffs `old` against `new` into `sink`; `false` when `old` is too large for 32-bit
/// suffix indices. The suffix array is the memory that counts: 4 bytes per old byte.
pub(crate) fn diff(old: &[u8], new: &[u8], sink: &mut impl Sink) -> bool {
    let Some(sa) = suffix::suffix_array(old) else {
        return false;
    };
    Matcher { old, new, sa: &sa }.run(sink);
    true
}

struct Matcher<'a> {
    old: &'a [u8],
    new: &'a [u8],
    sa: &'a [u32],
}

/// Length of the common prefix of `a` and `b`.
fn common(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Matcher<'_> {
    /// The position in old and the length of the longest match of `pattern`. The suffix
    /// sharing the longest prefix with it sorts next to where it would be inserted.
    fn longest(&self, pattern: &[u8]) -> (usize, usize) {
        if self.sa.is_empty() {
            return (0, 0);
        }
        let at = self
            .sa
            .partition_point(|&p| &self.old[p as usize..] < pattern);
        let mut best: Option<(usize, usize)> = None;
        for i in [at.checked_sub(1), Some(at)].into_iter().flatten() {
            if let Some(&p) = self.sa.get(i) {
                let len = common(&self.old[p as usize..], pattern);
                if best.is_none_or(|(_, l)| len > l) {
                    best = Some((p as usize, len));
                }
            }
        }
        best.unwrap_or((0, 0))
    }

    /// Whether old at `new_pos + offset` equals new at `new_pos`.
    fn same(&self, new_pos: usize, offset: isize) -> bool {
        new_pos
            .checked_add_signed(offset)
            .and_then(|o| self.old.get(o))
            .is_some_and(|&b| b == self.new[new_pos])
    }

    fn run(&self, sink: &mut impl Sink) {
        let (old, new) = (self.old, self.new);
        let (mut scan, mut len, mut pos) = (0usize, 0usize, 0usize);
        let (mut last_scan, mut last_pos, mut last_offset) = (0usize, 0usize, 0isize);
        while scan < new.len() {
            // Extend until the match found here is clearly better (by more than 8 bytes)
            // than continuing the previous block's alignment, or equal to it.
            // Signed: a mismatch behind the scored range may be subtracted before it is
            // counted.
            let mut old_score = 0isize;
            scan += len;
            let mut scored = scan;
            while scan < new.len() {
                (pos, len) = self.longest(&new[scan..]);
                while scored < scan + len {
                    if self.same(scored, last_offset) {
                        old_score += 1;
                    }
                    scored += 1;
                }
                let found = len as isize;
                if (found == old_score && len != 0) || found > old_score + 8 {
                    break;
                }
                if self.same(scan, last_offset) {
                    old_score -= 1;
                }
                scan += 1;
            }
            if len as isize == old_score && scan != new.len() {
                continue;
            }
            // How far the previous alignment reaches forward, scoring matches minus
            // mismatches, and how far the new one reaches back.
            let (mut score, mut best, mut forward) = (0isize, 0isize, 0usize);
            let mut i = 0;
            while last_scan + i < scan && last_pos + i < old.len() {
                if old[last_pos + i] == new[last_scan + i] {
                    score += 1;
                }
                i += 1;
                if score * 2 - i as isize > best * 2 - forward as isize {
                    best = score;
                    forward = i;
                }
            }
            let mut back = 0usize;
            if scan < new.len() {
                let (mut score, mut best) = (0isize, 0isize);
                let mut i = 1;
                while scan >= last_scan + i && pos >= i {
                    if old[pos - i] == new[scan - i] {
                        score += 1;
                    }
                    if score * 2 - i as isize > best * 2 - back as isize {
                        best = score;
                        back = i;
                    }
                    i += 1;
                }
            }
            // Where the two overlap, split at the point that keeps the most matches.
            if last_scan + forward > scan - back {
                let overlap = last_scan + forward - (scan - back);
                let (mut score, mut best, mut split) = (0isize, 0isize, 0usize);
                for i in 0..overlap {
                    if new[last_scan + forward - overlap + i]
                        == old[last_pos + forward - overlap + i]
                    {
                        score += 1;
                    }
                    if new[scan - back + i] == old[pos - back + i] {
                        score -= 1;
                    }
                    if score > best {
                        best = score;
                        split = i + 1;
                    }
                }
                forward = forward + split - overlap;
                back -= split;
            }
            let copy_end = scan - back;
            let next_pos = pos - back;
            sink.block(
                Block {
                    add: forward as u64,
                    copy: (copy_end - (last_scan + forward)) as u64,
                    seek: next_pos as i64 - (last_pos + forward) as i64,
                },
                &old[last_pos..last_pos + forward],
                &new[last_scan..last_scan + forward],
                &new[last_scan + forward..copy_end],
            );
            last_scan = copy_end;
            last_pos = next_pos;
            last_offset = pos as isize - scan as isize;
        }
    }
}
