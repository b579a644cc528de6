//! Content-addressed files under `--data-dir/blobs`: release artifacts and attachments.
//!
//! Invariant: a file under `sha256/` is complete and fsynced, and its name is the sha256
//! of its bytes. Partial writes live only under `tmp/`
//! as unnamed-until-done temp files, which are removed when their writer is dropped and
//! swept at start-up, so a crash or a vanished client leaves nothing behind.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use aviary_proto::digest::{Hasher, Sha256};

/// The blob directory.
#[derive(Clone, Debug)]
pub(crate) struct Blobs {
    root: PathBuf,
}

/// Why a blob could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BlobError {
    /// The disk is full (or the quota is reached): nothing was kept.
    #[error("no space left for the upload on the control plane's disk")]
    NoSpace,
    /// More bytes than declared arrived.
    #[error("more than the declared {0} bytes")]
    TooLong(u64),
    /// The bytes are not the declared ones.
    #[error("received {size} bytes with sha256 {found}, but the manifest declares {expected_size} bytes with sha256 {expected}")]
    Mismatch {
        /// Declared digest.
        expected: Sha256,
        /// Declared size.
        expected_size: u64,
        /// Digest received.
        found: Sha256,
        /// Size received.
        size: u64,
    },
    /// Another I/O failure.
    #[error("blob store: {0}")]
    Io(#[from] io::Error),
}

fn io_error(e: io::Error) -> BlobError {
    if e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull {
        BlobError::NoSpace
    } else {
        BlobError::Io(e)
    }
}

impl Blobs {
    /// Opens (creating) `dir`, removing temp files a crash left behind.
    pub(crate) fn open(dir: &Path) -> io::Result<Blobs> {
        let blobs = Blobs {
            root: dir.to_owned(),
        };
        for sub in ["sha256", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut swept = 0;
        for entry in std::fs::read_dir(dir.join("tmp"))? {
            let entry = entry?;
            if std::fs::remove_file(entry.path()).is_ok() {
                swept += 1;
            }
        }
        if swept > 0 {
            tracing::info!(swept, "removed partial uploads left by an earlier run");
        }
        Ok(blobs)
    }

    /// Where the blob `sha256` lives (it may not exist).
    pub(crate) fn path(&self, sha256: &Sha256) -> PathBuf {
        self.root.join("sha256").join(sha256.hex())
    }

    /// The size of blob `sha256`, 0 when it does not exist.
    pub(crate) fn size(&self, sha256: &Sha256) -> u64 {
        std::fs::metadata(self.path(sha256)).map_or(0, |m| m.len())
    }

    /// Starts writing a blob of `expected_size` bytes with digest `expected`.
    pub(crate) fn writer(
        &self,
        expected: Sha256,
        expected_size: u64,
    ) -> Result<BlobWriter, BlobError> {
        let file = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.root.join("tmp"))
            .map_err(io_error)?;
        Ok(BlobWriter {
            file,
            hasher: Hasher::new(),
            written: 0,
            expected,
            expected_size,
            dest: self.path(&expected),
        })
    }
}

/// A blob being received: hashed and counted as it is written; dropped = deleted.
pub(crate) struct BlobWriter {
    file: tempfile::NamedTempFile,
    hasher: Hasher,
    written: u64,
    expected: Sha256,
    expected_size: u64,
    dest: PathBuf,
}

impl BlobWriter {
    /// Appends `data`; refuses to go past the declared size.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let after = self.written.saturating_add(data.len() as u64);
        if after > self.expected_size {
            return Err(BlobError::TooLong(self.expected_size));
        }
        self.file.write_all(data).map_err(io_error)?;
        self.hasher.update(data);
        self.written = after;
        Ok(())
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and digest, fsyncs, and moves the file to its content address.
    pub(crate) fn finish(self) -> Result<PathBuf, BlobError> {
        let found = self.hasher.finish();
        if found != self.expected || self.written != self.expected_size {
            return Err(BlobError::Mismatch {
                expected: self.expected,
                expected_size: self.expected_size,
                found,
                size: self.written,
            });
        }
        self.file.as_file().sync_all().map_err(io_error)?;
        self.file
            .persist(&self.dest)
            .map_err(|e| io_error(e.error))?;
        if let Some(dir) = self.dest.parent() {
            sync_dir(dir)?;
        }
        Ok(self.dest)
    }
}

/// fsync a directory so a rename into it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_lands_only_when_complete_and_correct() -> Result<(), BlobError> {
        let dir = tempfile::tempdir()?;
        let blobs = Blobs::open(dir.path())?;
        let data = b"hello artifact";
        let sha = Sha256::of(data);

        let mut w = blobs.writer(sha, data.len() as u64)?;
        w.write(&data[..5])?;
        drop(w); // a client that vanished
        assert_eq!(std::fs::read_dir(dir.path().join("tmp"))?.count(), 0);
        assert!(!blobs.path(&sha).exists());

        let mut w = blobs.writer(sha, data.len() as u64)?;
        assert!(matches!(w.write(&[0; 100]), Err(BlobError::TooLong(14))));
        w.write(b"hello artefact")?;
        assert!(matches!(w.finish(), Err(BlobError::Mismatch { .. })));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp"))?.count(), 0);

        let mut w = blobs.writer(sha, data.len() as u64)?;
        w.write(data)?;
        let path = w.finish()?;
        assert_eq!(std::fs::read(path)?, data);
        assert!(blobs.path(&sha).is_file());

        // Temp files of a crashed run are swept.
        std::fs::write(dir.path().join("tmp/upload-crashed"), b"partial")?;
        Blobs::open(dir.path())?;
        assert_eq!(std::fs::read_dir(dir.path().join("tmp"))?.count(), 0);
        Ok(())
    }
}
