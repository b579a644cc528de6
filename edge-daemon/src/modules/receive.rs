//! A module payload arriving in chunks over the fleet stream, kept across disconnects.
//!
//! The payload grows in `modules/NAME/tmp/transfer-ID.part`; every `SYNC_EVERY` bytes it
//! is fsynced and `transfer-ID.json` records that length. After a crash or a cut the
//! transfer resumes at the recorded length (anything after it may be torn and is cut
//! off), so a resumed payload is as good as a fresh one; the sha256 check at the end
//! covers both.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use aviary_proto::bundle::PayloadInfo;
use serde::{Deserialize, Serialize};

use super::slots::{io, Modules};
use super::InstallError;

/// fsync and record progress this often.
const SYNC_EVERY: u64 = 1 << 20;

/// What `transfer-ID.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartialRecord {
    /// Transfer id (from the control plane).
    pub transfer_id: String,
    /// Module.
    pub module: String,
    /// Version being received.
    pub to_version: String,
    /// Bytes known to be on disk.
    pub synced: u64,
}

/// A payload being received.
pub struct Receiving {
    /// The record (kept current at every sync).
    pub record: PartialRecord,
    /// What the payload must be.
    pub info: PayloadInfo,
    part: PathBuf,
    meta: PathBuf,
    file: File,
    len: u64,
}

/// Transfer ids become file names: only `[A-Za-z0-9._-]`.
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Receiving {
    /// Starts or resumes transfer `id` of `module` (validated by its manifest).
    pub fn open(
        modules: &Modules,
        module: &str,
        to_version: &str,
        id: &str,
        info: PayloadInfo,
    ) -> Result<Receiving, InstallError> {
        if !safe_id(id) {
            return Err(InstallError::Bundle(format!("transfer id {id:?} refused")));
        }
        let tmp = modules.tmp(module)?;
        let part = tmp.join(format!("transfer-{id}.part"));
        let meta = tmp.join(format!("transfer-{id}.json"));
        let synced = std::fs::read(&meta)
            .ok()
            .and_then(|b| serde_json::from_slice::<PartialRecord>(&b).ok())
            .filter(|r| r.transfer_id == id)
            .map_or(0, |r| r.synced);
        // Append mode: every write lands at the end, after the cut below.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io(&part))?;
        // Whatever came after the last sync may be torn: cut it off.
        let on_disk = file.metadata().map_err(io(&part))?.len();
        let len = synced.min(on_disk).min(info.size);
        file.set_len(len).map_err(io(&part))?;
        let mut r = Receiving {
            record: PartialRecord {
                transfer_id: id.to_owned(),
                module: module.to_owned(),
                to_version: to_version.to_owned(),
                synced: len,
            },
            info,
            part,
            meta,
            file,
            len,
        };
        r.save()?;
        Ok(r)
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before the first byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether every byte arrived.
    pub fn complete(&self) -> bool {
        self.len == self.info.size
    }

    /// The payload file.
    pub fn path(&self) -> &Path {
        &self.part
    }

    fn save(&mut self) -> Result<(), InstallError> {
        let bytes = serde_json::to_vec(&self.record).map_err(|e| InstallError::Corrupt {
            path: self.meta.clone(),
            reason: e.to_string(),
        })?;
        let tmp = self.meta.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.meta).map_err(io(&self.meta))
    }

    /// Appends a chunk that starts at `offset`. A chunk for another offset (a duplicate
    /// after a resume) is ignored; bytes past the declared size are refused.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> Result<bool, InstallError> {
        if offset != self.len {
            return Ok(false);
        }
        let after = self.len.saturating_add(data.len() as u64);
        if after > self.info.size {
            return Err(InstallError::PayloadTooLarge {
                declared: self.info.size,
            });
        }
        self.file.write_all(data).map_err(io(&self.part))?;
        self.len = after;
        if self.len - self.record.synced >= SYNC_EVERY || self.complete() {
            self.file.sync_data().map_err(io(&self.part))?;
            self.record.synced = self.len;
            self.save()?;
        }
        Ok(true)
    }

    /// Removes the transfer's files.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.part);
        let _ = std::fs::remove_file(&self.meta);
    }
}

/// Transfers held in part, for the Hello (the control plane resumes them).
pub fn partial_transfers(modules: &Modules) -> Vec<(PartialRecord, u64)> {
    let mut out = Vec::new();
    let Ok(installed) = std::fs::read_dir(modules.root()) else {
        return out;
    };
    for module in installed.flatten() {
        let Ok(tmp) = std::fs::read_dir(module.path().join("tmp")) else {
            continue;
        };
        for entry in tmp.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(r) = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<PartialRecord>(&b).ok())
                {
                    let synced = r.synced;
                    out.push((r, synced));
                }
            }
        }
    }
    out
}
