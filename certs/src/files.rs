//! Key and certificate files written whole or not at all.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::CertsError;

/// Writes `bytes` to `path` with `mode` via a temp file, fsync and rename.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(CertsError::io(&tmp))?;
    file.write_all(bytes).map_err(CertsError::io(&tmp))?;
    file.sync_all().map_err(CertsError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(CertsError::io(path))?;
    Ok(())
}
