//! SHA-256 as Aviary writes it everywhere: 64 lowercase hex digits.

use std::io::{self, Read, Write};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Sha256 {
        let mut h = Hasher::new();
        h.update(data);
        h.finish()
    }

    /// Parses 64 hex digits (either case).
    pub fn parse_hex(s: &str) -> Option<Sha256> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Sha256(out))
    }

    /// 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sha256({})", self.hex())
    }
}

/// An incremental SHA-256 (ring's, the one crypto provider of the workspace).
pub struct Hasher(ring::digest::Context);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Hasher {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Sha256 {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        Sha256(out)
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

/// Hashes everything `reader` yields, and counts it.
pub fn hash_reader(mut reader: impl Read) -> io::Result<(Sha256, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((h.finish(), total))
}

/// A writer that hashes and counts what passes through to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
            written: 0,
        }
    }

    /// The inner writer, the digest and the byte count of everything written.
    pub fn finish(self) -> (W, Sha256, u64) {
        (self.inner, self.hasher.finish(), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_matches_the_known_digest_of_abc() {
        let d = Sha256::of(b"abc");
        assert_eq!(
            d.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Sha256::parse_hex(&d.hex()), Some(d));
        assert_eq!(Sha256::parse_hex(&d.hex().to_uppercase()), Some(d));
        assert_eq!(Sha256::parse_hex("ab"), None);
        assert_eq!(Sha256::parse_hex(&"g".repeat(64)), None);
    }
}
