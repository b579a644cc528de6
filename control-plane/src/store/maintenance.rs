//! `aviary-control-plane check | backup | restore`: offline work on a data dir whose
//! control plane is stopped (sled allows one process; a running one holds the lock).
//!
//! A backup is a directory: `store.jsonl` (a header, every row of every tree as hex, and
//! a trailer with the row count and the sha256 of all lines before it) and `blobs/`
//! (the release artifacts and attachments the records name, by sha256). Restore checks
//! all of it before it writes anything, and only into a data dir without a store.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use aviary_proto::digest::hash_reader;

use super::trees::{Trees, TREES};
use super::watermark::{self, Watermark};
use super::{decode, StoreError};
use crate::hex::{decode as unhex, encode as hex};
use crate::release::ReleaseRecord;

/// Format name in a backup's header.
const FORMAT: &str = "aviary-backup/1";

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Rows per tree.
    pub rows: BTreeMap<String, u64>,
    /// The counters in the store.
    pub counters: String,
    /// The watermark, if any.
    pub watermark: Option<String>,
    /// Everything wrong, one line each; empty when the store is sound.
    pub problems: Vec<String>,
    /// Records already set aside in the quarantine tree.
    pub quarantined: u64,
}

/// What a backup holds.
#[derive(Debug, Default)]
pub struct BackupReport {
    /// Rows written or restored.
    pub rows: u64,
    /// Blob files copied.
    pub blobs: u64,
    /// Bytes of blob files.
    pub blob_bytes: u64,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::File {
        path: path.to_owned(),
        source,
    }
}

/// Opens sled, naming the likely cause when another process holds it.
fn open(dir: &Path) -> Result<Trees, StoreError> {
    if !dir.join("meta.sled").exists() {
        return Err(StoreError::File {
            path: dir.join("meta.sled"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no store here"),
        });
    }
    Trees::open(dir).map_err(|e| match e {
        StoreError::Sled(sled::Error::Io(io)) if io.kind() == std::io::ErrorKind::WouldBlock => {
            StoreError::Unavailable(
                "the store is locked by a running control plane: stop it first".into(),
            )
        }
        other => other,
    })
}

/// Reads every record, checks counters, watermark and the blobs releases name, and
/// reports; changes nothing unless `accept_loss`, which makes a store that is behind its
/// watermark usable again: the counters move up to the watermark (no revision or audit
/// number is handed out twice) and the watermark is rewritten.
pub fn check(dir: &Path, accept_loss: bool) -> Result<CheckReport, StoreError> {
    let trees = open(dir)?;
    let mut report = CheckReport::default();
    let mut counters = Watermark::default();
    match trees.counters() {
        Ok(c) => counters = c,
        Err(e) => report.problems.push(e.to_string()),
    }
    report.counters = counters.to_string();
    let mark = watermark::read(dir)?;
    report.watermark = mark.map(|m| m.to_string());
    for (name, tree) in trees.all() {
        let mut n = 0;
        for row in tree.iter() {
            let (k, v) = row?;
            n += 1;
            if let Err(e) = trees.decode_row(name, &k, &v) {
                report.problems.push(format!("{name}: {e}"));
            }
        }
        if name == "quarantine" {
            report.quarantined = n;
        }
        report.rows.insert(name.to_owned(), n);
    }
    if let Err(e) = trees.load_checked() {
        report.problems.push(e.to_string());
    }
    let blobs = dir.join("blobs").join("sha256");
    for (sha256, size) in referenced_blobs(&trees)? {
        let path = blobs.join(&sha256);
        match std::fs::File::open(&path).and_then(|f| hash_reader(BufReader::new(f))) {
            Ok((found, len)) if found.hex() == sha256 && len == size => {}
            Ok((found, len)) => report.problems.push(format!(
                "blob {sha256}: holds {len} bytes with sha256 {found}, expected {size} bytes"
            )),
            Err(e) => report.problems.push(format!("blob {sha256}: {e}")),
        }
    }
    if let Some(mark) = mark {
        if counters.behind(&mark) {
            if accept_loss {
                let up = counters.max(mark);
                trees.set_counters(up)?;
                watermark::write(dir, &up)?;
                report.counters = up.to_string();
            } else {
                report.problems.push(format!(
                    "the store holds {counters} but {mark} was committed: data was lost"
                ));
            }
        }
    }
    Ok(report)
}

/// The blobs (sha256 hex, size) that release records name.
fn referenced_blobs(trees: &Trees) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut out = BTreeMap::new();
    for (name, tree) in trees.all() {
        if name != "releases" {
            continue;
        }
        for row in tree.iter() {
            let (k, v) = row?;
            let Ok(r) = decode::<ReleaseRecord>(&k, &v) else {
                continue;
            };
            for a in r.artifacts.values() {
                out.insert(a.sha256.clone(), a.size);
            }
            for a in r.attachments.values() {
                out.insert(a.sha256.clone(), a.size);
            }
        }
    }
    Ok(out)
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    revision: u64,
    audit_seq: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    tree: String,
    key: String,
    value: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    rows: u64,
    sha256: String,
}

/// Writes a backup of the (stopped) control plane's data dir `dir` into the new
/// directory `out`. The store is checked first: a damaged store is not backed up.
pub fn backup(dir: &Path, out: &Path) -> Result<BackupReport, StoreError> {
    let report = check(dir, false)?;
    if let Some(p) = report.problems.first() {
        return Err(StoreError::Inconsistent(format!(
            "not backing up a damaged store ({} problem(s), first: {p}); see aviary-control-plane check",
            report.problems.len()
        )));
    }
    std::fs::create_dir(out).map_err(file_err(out))?;
    let trees = open(dir)?;
    let counters = trees.counters()?;
    let path = out.join("store.jsonl");
    let file = std::fs::File::create(&path).map_err(file_err(&path))?;
    let mut w = BufWriter::new(file);
    let mut hasher = aviary_proto::digest::Hasher::new();
    let mut line = |w: &mut BufWriter<std::fs::File>, text: String| -> Result<(), StoreError> {
        hasher.update(text.as_bytes());
        hasher.update(b"\n");
        writeln!(w, "{text}").map_err(file_err(&path))
    };
    line(
        &mut w,
        to_line(&Header {
            format: FORMAT.into(),
            revision: counters.revision,
            audit_seq: counters.audit_seq,
        })?,
    )?;
    let mut report = BackupReport::default();
    for (name, tree) in trees.all() {
        for row in tree.iter() {
            let (k, v) = row?;
            line(
                &mut w,
                to_line(&Row {
                    tree: name.to_owned(),
                    key: hex(&k),
                    value: hex(&v),
                })?,
            )?;
            report.rows += 1;
        }
    }
    let sha256 = hasher.finish().hex();
    writeln!(
        w,
        "{}",
        to_line(&Trailer {
            rows: report.rows,
            sha256
        })?
    )
    .map_err(file_err(&path))?;
    let file = w.into_inner().map_err(|e| StoreError::File {
        path: path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(file_err(&path))?;
    let blob_dir = out.join("blobs");
    std::fs::create_dir(&blob_dir).map_err(file_err(&blob_dir))?;
    for (sha256, size) in referenced_blobs(&trees)? {
        let from = dir.join("blobs").join("sha256").join(&sha256);
        let to = blob_dir.join(&sha256);
        std::fs::copy(&from, &to).map_err(file_err(&from))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(file_err(&to))?;
        report.blobs += 1;
        report.blob_bytes += size;
    }
    std::fs::File::open(out)
        .and_then(|d| d.sync_all())
        .map_err(file_err(out))?;
    Ok(report)
}

/// Restores a backup made by `backup` into `dir`, which must not hold a store. Every
/// line, the trailer's checksum and every blob's sha256 are checked before the store is
/// written; blobs are copied in under their sha256 names.
pub fn restore(dir: &Path, from: &Path) -> Result<BackupReport, StoreError> {
    if dir.join("meta.sled").exists() {
        return Err(StoreError::Inconsistent(format!(
            "{} already holds a store; restore into an empty data dir",
            dir.display()
        )));
    }
    let path = from.join("store.jsonl");
    let bad = |what: String| StoreError::Inconsistent(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(&path).map_err(file_err(&path))?;
    let mut lines = BufReader::new(file).lines();
    let mut hasher = aviary_proto::digest::Hasher::new();
    let mut next = |n: usize| -> Result<Option<String>, StoreError> {
        match lines.next() {
            None => Ok(None),
            Some(Err(e)) => Err(bad(format!("line {n}: {e}"))),
            Some(Ok(l)) => Ok(Some(l)),
        }
    };
    let first = next(1)?.ok_or_else(|| bad("empty".into()))?;
    let header: Header = serde_json::from_str(&first).map_err(|e| bad(format!("line 1: {e}")))?;
    if header.format != FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {FORMAT}",
            header.format
        )));
    }
    hasher.update(first.as_bytes());
    hasher.update(b"\n");
    let mut rows = Vec::new();
    let mut n = 1;
    let trailer = loop {
        n += 1;
        let line = next(n)?.ok_or_else(|| bad("no trailer: the backup is cut short".into()))?;
        if let Ok(t) = serde_json::from_str::<Trailer>(&line) {
            break t;
        }
        let row: Row = serde_json::from_str(&line).map_err(|e| bad(format!("line {n}: {e}")))?;
        let (Some(k), Some(v)) = (unhex(&row.key), unhex(&row.value)) else {
            return Err(bad(format!("line {n}: key or value is not hex")));
        };
        if !TREES.contains(&row.tree.as_str()) {
            return Err(bad(format!("line {n}: unknown tree {:?}", row.tree)));
        }
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
        rows.push((row.tree, k, v));
    };
    if trailer.rows != rows.len() as u64 || trailer.sha256 != hasher.finish().hex() {
        return Err(bad(
            "rows or checksum do not match the trailer: the backup is damaged".into(),
        ));
    }
    // Every blob the records name, checked before anything is written.
    let blobs = from.join("blobs");
    let mut needed = BTreeMap::new();
    for (tree, k, v) in &rows {
        if tree == "releases" {
            let r: ReleaseRecord = decode(k, v)?;
            for a in r.artifacts.values() {
                needed.insert(a.sha256.clone(), a.size);
            }
            for a in r.attachments.values() {
                needed.insert(a.sha256.clone(), a.size);
            }
        }
    }
    for (sha256, size) in &needed {
        let p = blobs.join(sha256);
        let (found, len) = std::fs::File::open(&p)
            .and_then(|f| hash_reader(BufReader::new(f)))
            .map_err(file_err(&p))?;
        if found.hex() != *sha256 || len != *size {
            return Err(bad(format!("blob {sha256} is damaged")));
        }
    }
    std::fs::create_dir_all(dir).map_err(file_err(dir))?;
    let to_dir: PathBuf = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&to_dir).map_err(file_err(&to_dir))?;
    let mut report = BackupReport::default();
    for (sha256, size) in &needed {
        let to = to_dir.join(sha256);
        let tmp = to_dir.join(format!("{sha256}.restoring"));
        std::fs::copy(blobs.join(sha256), &tmp).map_err(file_err(&tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(file_err(&tmp))?;
        std::fs::rename(&tmp, &to).map_err(file_err(&to))?;
        report.blobs += 1;
        report.blob_bytes += size;
    }
    let trees = Trees::open(dir)?;
    for (tree, k, v) in rows {
        trees.insert_row(&tree, &k, &v)?;
        report.rows += 1;
    }
    trees.flush()?;
    let counters = trees.counters()?;
    watermark::write(dir, &counters)?;
    let expected = Watermark {
        revision: header.revision,
        audit_seq: header.audit_seq,
    };
    if counters != expected {
        return Err(bad(format!(
            "restored {counters}, the header says {expected}"
        )));
    }
    Ok(report)
}

/// One JSON line of the backup file.
fn to_line<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Codec {
        key: "backup line".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::NewEvent;
    use crate::node::NodeRecord;
    use crate::store::{Change, SledStore, Store};

    #[test]
    fn a_damaged_or_cut_backup_is_refused_before_anything_is_written() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        {
            let store = SledStore::open(&data)?;
            store.commit(Change {
                nodes: vec![NodeRecord {
                    node_id: "gw-1".into(),
                    ..Default::default()
                }],
                revision: Some(3),
                events: vec![NewEvent::new("admin/a", "x", "node/gw-1", "")],
                durable: true,
                ..Default::default()
            })?;
        }
        let out = dir.path().join("backup");
        let made = backup(&data, &out)?;
        assert!(made.rows >= 3, "{made:?}");
        // Into a data dir with a store: refused.
        assert!(restore(&data, &out).is_err());
        let text = std::fs::read_to_string(out.join("store.jsonl"))?;
        let lines: Vec<&str> = text.lines().collect();
        // A record's JSON starts with `{` (7b); one changed byte of one row.
        let tampered = text.replacen("\"value\":\"7b", "\"value\":\"7c", 1);
        assert_ne!(tampered, text);
        let cut = lines[..lines.len() - 1].join("\n");
        for (what, body) in [("tampered", tampered), ("cut", cut)] {
            std::fs::write(out.join("store.jsonl"), &body)?;
            let target = dir.path().join(what);
            let err = restore(&target, &out)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!err.is_empty(), "{what} backup restored");
            assert!(
                !target.join("meta.sled").exists(),
                "{what}: a store was written"
            );
        }
        std::fs::write(out.join("store.jsonl"), &text)?;
        let good = dir.path().join("good");
        assert_eq!(restore(&good, &out)?.rows, made.rows);
        let report = check(&good, false)?;
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        Ok(())
    }
}
