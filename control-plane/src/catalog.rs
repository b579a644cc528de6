//! The release catalog: checks uploads against the trusted release keys and the rules of
//! DESIGN.md, stores artifact bytes in `Blobs` and records in the store.
//!
//! Order of an upload, so that a refusal leaves nothing behind and a crash leaves no record
//! pointing at missing bytes: check metadata (manifest, signature, size limit, conflicts)
//! before reading any chunk → receive into a temp blob → check sha256 and size → move the
//! blob into place (fsync) → commit the record and its audit event (durable).

use std::sync::Arc;
use std::time::SystemTime;

use aviary_certs::{Identity, TrustedKeys};
use aviary_proto::digest::Sha256;
use aviary_proto::manifest::Manifest;

use crate::audit::NewEvent;
use crate::blobs::{BlobError, BlobWriter, Blobs};
use crate::error::ControlPlaneError;
use crate::journal::Journal;
use crate::release::{ArtifactRecord, AttachmentRecord, ReleaseRecord};
use crate::store::{Change, Store};

/// Largest attachment (an SBOM), in bytes; it travels in one message.
pub(crate) const MAX_ATTACHMENT_BYTES: usize = 3 << 20;
/// Attachments one upload may carry (each up to `MAX_ATTACHMENT_BYTES`, held in memory
/// until the artifact checks out).
pub(crate) const MAX_ATTACHMENTS: usize = 8;

/// The release catalog.
pub(crate) struct Catalog {
    store: Arc<dyn Store>,
    journal: Arc<Journal>,
    blobs: Blobs,
    trusted: TrustedKeys,
    max_release_bytes: u64,
    /// Serialises the check-and-insert of records (two uploads of one version race).
    commit: tokio::sync::Mutex<()>,
}

/// An upload whose metadata passed every check.
pub(crate) struct Accepted {
    /// The parsed manifest.
    pub manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Vec<u8>,
}

/// What `begin` decided.
pub(crate) enum Begin {
    /// New bytes to receive.
    Receive(Box<(Accepted, BlobWriter)>),
    /// This exact artifact is stored already: nothing to do.
    Stored(ReleaseRecord),
}

/// A received attachment, already stored as a blob.
pub(crate) struct ReceivedAttachment {
    name: String,
    record: AttachmentRecord,
    /// Held until the artifact checks out: a refused upload leaves no blob behind.
    data: bytes::Bytes,
}

fn blob_error(e: BlobError) -> ControlPlaneError {
    match e {
        BlobError::NoSpace => ControlPlaneError::ResourceExhausted(e.to_string()),
        BlobError::TooLong(_) | BlobError::Mismatch { .. } => {
            ControlPlaneError::InvalidArgument(e.to_string())
        }
        BlobError::Io(source) => ControlPlaneError::Io {
            context: "blob store".into(),
            source,
        },
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ControlPlaneError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlPlaneError::Unavailable(format!("blocking task: {e}")))
}

impl Catalog {
    /// A catalog over the journal's store, committing and auditing through it.
    pub(crate) fn new(
        journal: Arc<Journal>,
        blobs: Blobs,
        trusted: TrustedKeys,
        max_release_bytes: u64,
    ) -> Catalog {
        Catalog {
            store: journal.store().clone(),
            journal,
            blobs,
            trusted,
            max_release_bytes,
            commit: tokio::sync::Mutex::new(()),
        }
    }

    /// The blob store (payloads are built from it).
    pub(crate) fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    async fn refuse(
        &self,
        actor: &Identity,
        target: String,
        error: ControlPlaneError,
    ) -> ControlPlaneError {
        let event = NewEvent::new(
            actor.to_string(),
            "release.refused",
            target,
            error.to_string(),
        );
        if let Err(e) = self.journal.audit(event, false).await {
            tracing::warn!(error = %e, "could not audit a refused upload");
        }
        error
    }

    /// Checks an upload's metadata before any byte of it is read.
    pub(crate) async fn begin(
        &self,
        actor: &Identity,
        manifest_bytes: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<Begin, ControlPlaneError> {
        let manifest = Manifest::parse(&manifest_bytes)
            .map_err(|e| ControlPlaneError::InvalidArgument(e.to_string()))?;
        let what = format!("release/{}@{}", manifest.module, manifest.version);
        if let Err(e) = self.trusted.verify(&manifest_bytes, &signature) {
            let error = ControlPlaneError::PermissionDenied(format!(
                "manifest of {}@{} refused: {e}",
                manifest.module, manifest.version
            ));
            return Err(self.refuse(actor, what, error).await);
        }
        if manifest.size > self.max_release_bytes {
            let error = ControlPlaneError::ResourceExhausted(format!(
                "artifact of {} bytes is over the limit of {} bytes (--max-release-bytes)",
                manifest.size, self.max_release_bytes
            ));
            return Err(self.refuse(actor, what, error).await);
        }
        if let Some(existing) = self.get(&manifest.module, &manifest.version).await? {
            if let Err(error) = compatible(&existing, &manifest, &manifest_bytes) {
                return Err(self.refuse(actor, what, error).await);
            }
            if existing.artifacts.contains_key(&manifest.target) {
                return Ok(Begin::Stored(existing));
            }
        }
        let writer = self
            .blobs
            .writer(manifest.digest(), manifest.size)
            .map_err(blob_error)?;
        Ok(Begin::Receive(Box::new((
            Accepted {
                manifest,
                manifest_bytes,
                signature,
            },
            writer,
        ))))
    }

    /// Appends a chunk off the async runtime.
    pub(crate) async fn write(
        &self,
        mut writer: BlobWriter,
        data: bytes::Bytes,
    ) -> Result<BlobWriter, ControlPlaneError> {
        blocking(move || writer.write(&data).map(|()| writer))
            .await?
            .map_err(blob_error)
    }

    /// Validates one attachment (stored only by `finish`, with the artifact).
    pub(crate) fn attachment(
        &self,
        received: &[ReceivedAttachment],
        name: String,
        media_type: String,
        data: bytes::Bytes,
    ) -> Result<ReceivedAttachment, ControlPlaneError> {
        validate_attachment(&name, &media_type, &data)?;
        if received.len() >= MAX_ATTACHMENTS {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "at most {MAX_ATTACHMENTS} attachments per upload"
            )));
        }
        if received.iter().any(|a| a.name == name) {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "attachment {name} sent twice"
            )));
        }
        Ok(ReceivedAttachment {
            name,
            record: AttachmentRecord {
                media_type,
                sha256: Sha256::of(&data).hex(),
                size: data.len() as u64,
            },
            data,
        })
    }

    /// Checks the received bytes, moves them into place and commits the record.
    pub(crate) async fn finish(
        &self,
        actor: &Identity,
        accepted: Accepted,
        writer: BlobWriter,
        attachments: Vec<ReceivedAttachment>,
    ) -> Result<ReleaseRecord, ControlPlaneError> {
        let m = &accepted.manifest;
        let what = format!("release/{}@{}", m.module, m.version);
        let _guard = self.commit.lock().await;
        let existing = self.get(&m.module, &m.version).await?;
        // Attachments belong to the release, not to one target: another target's upload
        // may add one, never replace one with other bytes.
        if let Some(existing) = &existing {
            for a in &attachments {
                if let Some(old) = existing.attachments.get(&a.name) {
                    if old.sha256 != a.record.sha256 {
                        let error = ControlPlaneError::AlreadyExists(format!(
                            "attachment {} of {}@{} exists with other bytes (sha256 {}); attachments are immutable",
                            a.name, m.module, m.version, old.sha256
                        ));
                        return Err(self.refuse(actor, what, error).await);
                    }
                }
            }
        }
        if let Err(e) = blocking(move || writer.finish()).await? {
            return Err(self.refuse(actor, what, blob_error(e)).await);
        }
        for a in &attachments {
            let (blobs, data) = (self.blobs.clone(), a.data.clone());
            let (sha, size) = (Sha256::of(&data), a.record.size);
            blocking(move || {
                let mut w = blobs.writer(sha, size)?;
                w.write(&data)?;
                w.finish()
            })
            .await?
            .map_err(blob_error)?;
        }
        let mut record = match existing {
            Some(existing) => {
                compatible(&existing, m, &accepted.manifest_bytes)?;
                existing
            }
            None => ReleaseRecord {
                module: m.module.clone(),
                version: m.version.clone(),
                artifacts: Default::default(),
                attachments: Default::default(),
                created_at: SystemTime::now(),
            },
        };
        record.artifacts.insert(
            m.target.clone(),
            ArtifactRecord {
                sha256: m.sha256.clone(),
                size: m.size,
                manifest: accepted.manifest_bytes.clone(),
                signature: accepted.signature.clone(),
                runnable: m.run.is_some(),
            },
        );
        for a in attachments {
            record.attachments.insert(a.name, a.record);
        }
        let detail = format!(
            "{} artifact sha256 {} ({} bytes){}",
            m.target,
            m.sha256,
            m.size,
            if record.attachments.is_empty() {
                String::new()
            } else {
                format!(
                    ", attachments: {}",
                    record
                        .attachments
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        self.journal
            .commit(Change {
                releases: vec![record.clone()],
                events: vec![NewEvent::new(
                    actor.to_string(),
                    "release.upload",
                    what,
                    detail,
                )],
                durable: true,
                ..Default::default()
            })
            .await?;
        metrics::counter!("aviary_releases_uploaded_total").increment(1);
        Ok(record)
    }

    /// One release.
    pub(crate) async fn get(
        &self,
        module: &str,
        version: &str,
    ) -> Result<Option<ReleaseRecord>, ControlPlaneError> {
        let store = self.store.clone();
        let (module, version) = (module.to_owned(), version.to_owned());
        Ok(blocking(move || store.release(&module, &version)).await??)
    }

    /// Releases of `module` (all when `None`), newest version first by SemVer precedence.
    pub(crate) async fn list(
        &self,
        module: Option<String>,
    ) -> Result<Vec<ReleaseRecord>, ControlPlaneError> {
        let store = self.store.clone();
        let mut all = blocking(move || store.releases(module.as_deref())).await??;
        all.sort_by(|a, b| list_order((&a.module, &a.version), (&b.module, &b.version)));
        Ok(all)
    }

    /// The bytes of one attachment.
    pub(crate) async fn attachment_bytes(
        &self,
        module: &str,
        version: &str,
        name: &str,
    ) -> Result<(AttachmentRecord, Vec<u8>), ControlPlaneError> {
        let release = self
            .get(module, version)
            .await?
            .ok_or_else(|| ControlPlaneError::NotFound(format!("release {module}@{version}")))?;
        let record = release.attachments.get(name).cloned().ok_or_else(|| {
            ControlPlaneError::NotFound(format!("attachment {name:?} of {module}@{version}"))
        })?;
        let path = Sha256::parse_hex(&record.sha256)
            .map(|s| self.blobs.path(&s))
            .ok_or_else(|| ControlPlaneError::NotFound(format!("blob of {name:?}")))?;
        let data = tokio::fs::read(&path)
            .await
            .map_err(|source| ControlPlaneError::Io {
                context: format!("attachment {}", path.display()),
                source,
            })?;
        Ok((record, data))
    }
}

/// A second upload of a (module, version) may add a target, or repeat a stored artifact
/// byte for byte; anything else is a different release under a used version.
fn compatible(
    existing: &ReleaseRecord,
    manifest: &Manifest,
    manifest_bytes: &[u8],
) -> Result<(), ControlPlaneError> {
    if let Some(stored) = existing.artifacts.get(&manifest.target) {
        if stored.sha256 != manifest.sha256 || stored.manifest != manifest_bytes {
            return Err(ControlPlaneError::AlreadyExists(format!(
                "{}@{} for {} is already stored with sha256 {}; a version is immutable, \
                 upload under a new version",
                manifest.module, manifest.version, manifest.target, stored.sha256
            )));
        }
    }
    Ok(())
}

fn validate_attachment(name: &str, media_type: &str, data: &[u8]) -> Result<(), ControlPlaneError> {
    let bad = |m: String| Err(ControlPlaneError::InvalidArgument(m));
    if name.is_empty()
        || name.len() > 128
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return bad(format!(
            "attachment name {name:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'"
        ));
    }
    if media_type.is_empty() || media_type.len() > 128 {
        return bad(format!("attachment {name}: media_type is required"));
    }
    if data.len() > MAX_ATTACHMENT_BYTES {
        return bad(format!(
            "attachment {name}: {} bytes, at most {MAX_ATTACHMENT_BYTES}",
            data.len()
        ));
    }
    if media_type.ends_with("json") {
        let doc: serde_json::Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => return bad(format!("attachment {name} ({media_type}) is not JSON: {e}")),
        };
        let is_spdx = doc.get("spdxVersion").is_some_and(|v| v.is_string());
        let is_cyclonedx = doc.get("bomFormat").and_then(|v| v.as_str()) == Some("CycloneDX");
        match media_type {
            "application/spdx+json" if !is_spdx => {
                return bad(format!(
                    "attachment {name}: SPDX JSON needs \"spdxVersion\""
                ))
            }
            "application/vnd.cyclonedx+json" if !is_cyclonedx => {
                return bad(format!(
                    "attachment {name}: CycloneDX JSON needs \"bomFormat\": \"CycloneDX\""
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The order of `list`: by module, then newest version first by SemVer precedence.
pub(crate) fn list_order(a: (&str, &str), b: (&str, &str)) -> std::cmp::Ordering {
    let va = aviary_proto::manifest::parse_version(a.1).ok();
    let vb = aviary_proto::manifest::parse_version(b.1).ok();
    a.0.cmp(b.0).then_with(|| match (va, vb) {
        (Some(va), Some(vb)) => vb.cmp_precedence(&va).then_with(|| vb.build.cmp(&va.build)),
        _ => b.1.cmp(a.1),
    })
}
