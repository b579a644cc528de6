//! Suffix arrays by induced sorting (SA-IS, Nong, Zhang and Chan 2009) with 32-bit
//! indices: 4 bytes per input byte, plus at most 2 for the recursion's buckets, where
//! bsdiff's qsufsort needs 16 (two `off_t` arrays).
//!
//! The recursion works inside the output array (the reduced string in its upper half,
//! the reduced suffix array in its lower), so memory is the output, one bit of type per
//! symbol and one bucket counter per distinct symbol.

/// A symbol of the string being sorted: bytes at the top level, names below it.
trait Symbol: Copy + Eq + Ord {
    fn index(self) -> usize;
}

impl Symbol for u8 {
    fn index(self) -> usize {
        usize::from(self)
    }
}

impl Symbol for u32 {
    fn index(self) -> usize {
        self as usize
    }
}

const EMPTY: u32 = u32::MAX;

/// The suffix array of `text`: the start of every suffix, in lexicographic order. `None`
/// when `text` is too long for 32-bit indices (4 GiB or more).
pub(crate) fn suffix_array(text: &[u8]) -> Option<Vec<u32>> {
    if text.len() >= EMPTY as usize {
        return None;
    }
    let mut sa = vec![0u32; text.len()];
    sais(text, 256, &mut sa);
    Some(sa)
}

/// S-type (true) or L-type (false) per position, one bit each.
struct Types(Vec<u64>);

impl Types {
    /// Classifies `s` against a virtual sentinel smaller than every symbol after its end.
    fn of<T: Symbol>(s: &[T]) -> Types {
        let mut bits = vec![0u64; s.len().div_ceil(64)];
        let mut next_s = false; // the last symbol is L: it is larger than the sentinel
        for i in (0..s.len().saturating_sub(1)).rev() {
            next_s = s[i] < s[i + 1] || (s[i] == s[i + 1] && next_s);
            if next_s {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        Types(bits)
    }

    fn s(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }

    /// Leftmost S: an S-type position after an L-type one.
    fn lms(&self, i: usize) -> bool {
        i > 0 && self.s(i) && !self.s(i - 1)
    }
}

/// Fills `bkt` with the start (or one past the end) of each symbol's bucket.
fn buckets<T: Symbol>(s: &[T], bkt: &mut [u32], ends: bool) {
    bkt.fill(0);
    for &c in s {
        bkt[c.index()] += 1;
    }
    let mut sum = 0u32;
    for b in bkt.iter_mut() {
        sum += *b;
        *b = if ends { sum } else { sum - *b };
    }
}

/// Sorts the suffixes of `s` (symbols below `k`) into `sa` (same length as `s`).
fn sais<T: Symbol>(s: &[T], k: usize, sa: &mut [u32]) {
    let n = s.len();
    match n {
        0 => return,
        1 => {
            sa[0] = 0;
            return;
        }
        _ => {}
    }
    let t = Types::of(s);
    let mut bkt = vec![0u32; k];

    // 1. LMS positions at the ends of their buckets, then induce: this sorts the LMS
    // substrings (not yet the suffixes).
    buckets(s, &mut bkt, true);
    sa.fill(EMPTY);
    for i in (1..n).rev() {
        if t.lms(i) {
            let c = s[i].index();
            bkt[c] -= 1;
            sa[bkt[c] as usize] = i as u32;
        }
    }
    induce(s, &t, sa, &mut bkt);

    // 2. Name the sorted LMS substrings; equal substrings share a name.
    let mut m = 0;
    for i in 0..n {
        let p = sa[i];
        if t.lms(p as usize) {
            sa[m] = p;
            m += 1;
        }
    }
    sa[m..].fill(EMPTY);
    let mut names = 0u32;
    let mut prev: Option<usize> = None;
    for i in 0..m {
        let p = sa[i] as usize;
        if prev.is_none_or(|q| !lms_equal(s, &t, q, p)) {
            names += 1;
            prev = Some(p);
        }
        // LMS positions are at least two apart, so p / 2 is unique per LMS.
        sa[m + p / 2] = names - 1;
    }
    let mut j = n;
    for i in (m..n).rev() {
        if sa[i] != EMPTY {
            j -= 1;
            sa[j] = sa[i];
        }
    }

    // 3. Sort the LMS suffixes: by recursion on the names unless they are all distinct.
    {
        let (lower, upper) = sa.split_at_mut(n - m);
        let reduced = &upper[..];
        let order = &mut lower[..m];
        if (names as usize) < m {
            sais(reduced, names as usize, order);
        } else {
            for (i, &name) in reduced.iter().enumerate() {
                order[name as usize] = i as u32;
            }
        }
    }
    // Map ranks of the reduced string back to positions in `s`.
    let mut j = n - m;
    for i in 1..n {
        if t.lms(i) {
            sa[j] = i as u32;
            j += 1;
        }
    }
    for i in 0..m {
        sa[i] = sa[n - m + sa[i] as usize];
    }
    sa[m..].fill(EMPTY);

    // 4. The sorted LMS suffixes at their bucket ends, then induce the rest.
    buckets(s, &mut bkt, true);
    for i in (0..m).rev() {
        let p = sa[i];
        sa[i] = EMPTY;
        let c = s[p as usize].index();
        bkt[c] -= 1;
        sa[bkt[c] as usize] = p;
    }
    induce(s, &t, sa, &mut bkt);
}

/// Induces L-type suffixes left to right from the LMS ones, then S-type right to left.
fn induce<T: Symbol>(s: &[T], t: &Types, sa: &mut [u32], bkt: &mut [u32]) {
    let n = s.len();
    buckets(s, bkt, false);
    // The suffix before the virtual sentinel comes first in its bucket.
    let last = s[n - 1].index();
    sa[bkt[last] as usize] = (n - 1) as u32;
    bkt[last] += 1;
    for i in 0..n {
        let p = sa[i];
        if p != EMPTY && p > 0 {
            let j = p as usize - 1;
            if !t.s(j) {
                let c = s[j].index();
                sa[bkt[c] as usize] = j as u32;
                bkt[c] += 1;
            }
        }
    }
    buckets(s, bkt, true);
    for i in (0..n).rev() {
        let p = sa[i];
        if p != EMPTY && p > 0 {
            let j = p as usize - 1;
            if t.s(j) {
                let c = s[j].index();
                bkt[c] -= 1;
                sa[bkt[c] as usize] = j as u32;
            }
        }
    }
}

/// Whether the LMS substrings at `a` and `b` are equal (symbols and types, up to and
/// including the next LMS position). One that runs into the sentinel is unique.
fn lms_equal<T: Symbol>(s: &[T], t: &Types, a: usize, b: usize) -> bool {
    let n = s.len();
    for d in 0.. {
        let (x, y) = (a + d, b + d);
        if x >= n || y >= n || s[x] != s[y] || t.s(x) != t.s(y) {
            return false;
        }
        if d > 0 && (t.lms(x) || t.lms(y)) {
            return t.lms(x) && t.lms(y);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(text: &[u8]) -> Vec<u32> {
        let mut sa: Vec<u32> = (0..text.len() as u32).collect();
        sa.sort_by(|&a, &b| text[a as usize..].cmp(&text[b as usize..]));
        sa
    }

    #[test]
    fn matches_a_naive_sort_on_edge_cases_and_random_text() {
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            b"a".to_vec(),
            b"aa".to_vec(),
            b"ab".to_vec(),
            b"ba".to_vec(),
            b"banana".to_vec(),
            b"mississippi".to_vec(),
            b"abracadabra abracadabra".to_vec(),
            vec![0; 100],
            vec![255; 77],
            (0..=255u8).collect(),
            (0..=255u8).rev().collect(),
            b"abababababababababababab".to_vec(),
        ];
        let mut x = 0x9e3779b97f4a7c15u64;
        for len in [2usize, 3, 10, 100, 1000, 5000] {
            for alphabet in [2u64, 3, 4, 17, 256] {
                cases.push(
                    (0..len)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x % alphabet) as u8
                        })
                        .collect(),
                );
            }
        }
        // Repeats of repeats: deep recursion.
        let mut rep = b"abcab".to_vec();
        for _ in 0..6 {
            let copy = rep.clone();
            rep.extend_from_slice(&copy);
            rep.push(b'a');
        }
        cases.push(rep);
        for text in cases {
            assert_eq!(
                suffix_array(&text),
                Some(naive(&text)),
                "{:?}",
                &text[..text.len().min(40)]
            );
        }
    }
}
