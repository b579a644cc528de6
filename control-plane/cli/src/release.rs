//! `aviary release ...`: sign manifests with the offline release key, upload, list, get.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aviary_certs::ReleaseSigner;
use aviary_proto::arch::{host_target, is_target, TARGETS};
use aviary_proto::bundle::{BundleHeader, Encoding, PayloadInfo};
use aviary_proto::digest::hash_reader;
use aviary_proto::manifest::{Manifest, RunSpec};
use aviary_proto::v1 as pb;
use clap::{Args, Subcommand};
use pb::upload_release_request::Kind;
use tokio::io::AsyncReadExt;

use crate::{output, Admin, Format};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;
/// Whole-upload attempts when the connection fails (each restarts from byte 0; the
/// control plane keeps nothing of a broken upload).
const ATTEMPTS: u32 = 3;

/// `aviary release ...`
#[derive(Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Writes a signed manifest and its signature for an artifact (for grpcurl users and
    /// for signing on an offline machine).
    Sign {
        /// What to sign.
        #[command(flatten)]
        what: ManifestArgs,
        /// Private release key (release-signing.key).
        #[arg(long)]
        sign_key: PathBuf,
        /// Directory for MODULE-VERSION-TARGET.manifest.json and .sig.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Uploads an artifact: signs it here with --sign-key, or sends a manifest and
    /// signature made earlier with `release sign`.
    Upload {
        /// The artifact.
        #[command(flatten)]
        what: ManifestArgs,
        /// Private release key; signs the manifest before uploading.
        #[arg(long, conflicts_with_all = ["manifest", "signature"])]
        sign_key: Option<PathBuf>,
        /// A signed manifest from `release sign` (with --signature).
        #[arg(long, requires = "signature")]
        manifest: Option<PathBuf>,
        /// The manifest's signature file.
        #[arg(long, requires = "manifest")]
        signature: Option<PathBuf>,
        /// A file stored with the release, e.g. an SBOM (repeatable).
        #[arg(long = "attach")]
        attachments: Vec<PathBuf>,
    },
    /// Writes an offline bundle (signed manifest + payload) for `aviary-edge apply` on
    /// air-gapped sites; with --base, the payload is a delta from that artifact when smaller.
    Bundle {
        /// The artifact.
        #[command(flatten)]
        what: ManifestArgs,
        /// Private release key; signs the manifest.
        #[arg(long, conflicts_with_all = ["manifest", "signature"])]
        sign_key: Option<PathBuf>,
        /// A signed manifest from `release sign` (with --signature).
        #[arg(long, requires = "signature")]
        manifest: Option<PathBuf>,
        /// The manifest's signature file.
        #[arg(long, requires = "manifest")]
        signature: Option<PathBuf>,
        /// The artifact the site runs now: the bundle carries a delta from it.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Bundle file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Lists releases, newest version first.
    List {
        /// Only this module.
        #[arg(long)]
        module: Option<String>,
    },
    /// Shows one release; `--attachment NAME` writes that attachment to stdout.
    Get {
        /// Module.
        module: String,
        /// Version.
        version: String,
        /// Print this attachment's bytes instead.
        #[arg(long)]
        attachment: Option<String>,
    },
}

/// What a manifest says about an artifact.
#[derive(Args, Debug)]
pub struct ManifestArgs {
    /// Module name.
    #[arg(long)]
    pub module: Option<String>,
    /// SemVer version.
    #[arg(long)]
    pub version: Option<String>,
    /// The artifact file.
    #[arg(long)]
    pub file: PathBuf,
    /// Run spec TOML (absent: a file module, installed but never started).
    #[arg(long)]
    pub run_spec: Option<PathBuf>,
    /// Target architecture (default: this machine's).
    #[arg(long)]
    pub target: Option<String>,
}

impl ManifestArgs {
    /// Builds the manifest of `--file` (reads and hashes it).
    pub fn manifest(&self) -> anyhow::Result<Manifest> {
        let module = self.module.clone().context("--module is required")?;
        let version = self.version.clone().context("--version is required")?;
        let file = std::fs::File::open(&self.file)
            .with_context(|| format!("--file {}", self.file.display()))?;
        let (sha256, size) =
            hash_reader(file).with_context(|| format!("reading {}", self.file.display()))?;
        let run = match &self.run_spec {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--run-spec {}", path.display()))?;
                Some(
                    toml::from_str::<RunSpec>(&text)
                        .with_context(|| format!("--run-spec {}", path.display()))?,
                )
            }
            None => None,
        };
        let target = match self.target.clone() {
            Some(target) => target,
            None => host_target().context("--target")?.to_owned(),
        };
        if !is_target(&target) {
            bail!("--target {target}: one of {}", TARGETS.join(", "));
        }
        let manifest = Manifest {
            module,
            version,
            target,
            sha256: sha256.hex(),
            size,
            run,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}

/// Signs `manifest` with the key at `key`: the manifest bytes and their signature.
pub fn sign(manifest: &Manifest, key: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let signer = ReleaseSigner::load(key)?;
    let bytes = manifest.to_json();
    let signature = signer.sign(&bytes);
    Ok((bytes, signature))
}

/// Runs one `aviary release` command (`admin` is connected lazily: `sign` is offline).
pub async fn run(
    command: ReleaseCommand,
    format: Format,
    admin: impl std::future::Future<Output = anyhow::Result<Admin>>,
) -> anyhow::Result<()> {
    match command {
        ReleaseCommand::Sign {
            what,
            sign_key,
            out_dir,
        } => {
            let manifest = what.manifest()?;
            let (bytes, signature) = sign(&manifest, &sign_key)?;
            let stem = format!(
                "{}-{}-{}",
                manifest.module, manifest.version, manifest.target
            );
            let m_path = out_dir.join(format!("{stem}.manifest.json"));
            let s_path = out_dir.join(format!("{stem}.sig"));
            std::fs::write(&m_path, &bytes).with_context(|| m_path.display().to_string())?;
            std::fs::write(&s_path, &signature).with_context(|| s_path.display().to_string())?;
            println!("{}\n{}", m_path.display(), s_path.display());
            Ok(())
        }
        ReleaseCommand::Upload {
            what,
            sign_key,
            manifest,
            signature,
            attachments,
        } => {
            let (manifest_bytes, signature) = signed(&what, sign_key, manifest, signature)?;
            let parsed = Manifest::parse(&manifest_bytes)?;
            let mut attached = Vec::new();
            for path in &attachments {
                attached.push(attachment(path)?);
            }
            let mut admin = admin.await?;
            let release = upload(
                &mut admin,
                &what.file,
                &parsed,
                manifest_bytes,
                signature,
                attached,
            )
            .await?;
            output::release(format, &release)?;
            Ok(())
        }
        ReleaseCommand::Bundle {
            what,
            sign_key,
            manifest,
            signature,
            base,
            out,
        } => {
            let (manifest_bytes, signature) = signed(&what, sign_key, manifest, signature)?;
            let parsed = Manifest::parse(&manifest_bytes)?;
            let artifact = std::fs::read(&what.file)
                .with_context(|| format!("--file {}", what.file.display()))?;
            if aviary_proto::digest::Sha256::of(&artifact) != parsed.digest() {
                bail!(
                    "--file {} is not the artifact the manifest signs",
                    what.file.display()
                );
            }
            let full = aviary_proto::delta::write_full(
                artifact.as_slice(),
                aviary_proto::delta::LEVEL,
                Vec::new(),
            )?;
            let mut payload = (Encoding::FullZstd, None, full);
            let artifact_len = artifact.len();
            if let Some(base) = base {
                let old =
                    std::fs::read(&base).with_context(|| format!("--base {}", base.display()))?;
                let base_sha = aviary_proto::digest::Sha256::of(&old);
                let delta = aviary_proto::delta::write_delta_owned(
                    old,
                    artifact,
                    aviary_proto::delta::LEVEL,
                    Vec::new(),
                )?;
                if delta.len() < payload.2.len() {
                    payload = (Encoding::BsdiffZstd, Some(base_sha), delta);
                }
            }
            let (encoding, base_sha, bytes) = payload;
            let header = BundleHeader {
                manifest: manifest_bytes,
                signature,
                payload: PayloadInfo::of(encoding, base_sha, &bytes),
            };
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&out).with_context(|| format!("--out {}", out.display()))?,
            );
            header.write(&mut file)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            std::io::Write::flush(&mut file)?;
            println!(
                "{}: {} {}@{} for {}, payload {:?} of {} bytes (artifact {} bytes)",
                out.display(),
                if encoding == Encoding::BsdiffZstd {
                    "delta"
                } else {
                    "full"
                },
                parsed.module,
                parsed.version,
                parsed.target,
                encoding,
                bytes.len(),
                artifact_len
            );
            Ok(())
        }
        ReleaseCommand::List { module } => {
            let mut admin = admin.await?;
            let list = admin.all_releases(&module.unwrap_or_default()).await?;
            output::releases(format, list)?;
            Ok(())
        }
        ReleaseCommand::Get {
            module,
            version,
            attachment,
        } => {
            let mut admin = admin.await?;
            match attachment {
                Some(name) => {
                    let a = admin
                        .releases
                        .get_attachment(pb::GetAttachmentRequest {
                            module,
                            version,
                            name,
                        })
                        .await?
                        .into_inner();
                    use std::io::Write;
                    std::io::stdout().write_all(&a.data)?;
                }
                None => {
                    let r = admin
                        .releases
                        .get_release(pb::GetReleaseRequest { module, version })
                        .await?
                        .into_inner();
                    output::release(format, &r)?;
                }
            }
            Ok(())
        }
    }
}

/// The manifest and signature: signed here with `sign_key`, or read from files.
fn signed(
    what: &ManifestArgs,
    sign_key: Option<PathBuf>,
    manifest: Option<PathBuf>,
    signature: Option<PathBuf>,
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    match (sign_key, manifest, signature) {
        (Some(key), _, _) => sign(&what.manifest()?, &key),
        (None, Some(m), Some(s)) => Ok((
            std::fs::read(&m).with_context(|| format!("--manifest {}", m.display()))?,
            std::fs::read(&s).with_context(|| format!("--signature {}", s.display()))?,
        )),
        _ => bail!("pass --sign-key, or --manifest and --signature from `release sign`"),
    }
}

/// Reads an attachment and names its media type from its content.
fn attachment(path: &Path) -> anyhow::Result<pb::Attachment> {
    let data = std::fs::read(path).with_context(|| format!("--attach {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("--attach needs a file")?;
    let media_type = match serde_json::from_slice::<serde_json::Value>(&data) {
        Ok(doc) if doc.get("spdxVersion").is_some() => "application/spdx+json",
        Ok(doc) if doc.get("bomFormat").and_then(|v| v.as_str()) == Some("CycloneDX") => {
            "application/vnd.cyclonedx+json"
        }
        Ok(_) => "application/json",
        Err(_) => "application/octet-stream",
    };
    Ok(pb::Attachment {
        name,
        media_type: media_type.into(),
        data,
    })
}

/// Streams the upload; restarts it from scratch when the connection fails.
pub(crate) async fn upload(
    admin: &mut Admin,
    file: &Path,
    manifest: &Manifest,
    manifest_bytes: Vec<u8>,
    signature: Vec<u8>,
    attachments: Vec<pb::Attachment>,
) -> anyhow::Result<pb::Release> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let feeder = tokio::spawn(feed(
            tx,
            file.to_owned(),
            manifest.clone(),
            manifest_bytes.clone(),
            signature.clone(),
            attachments.clone(),
        ));
        let result = admin
            .releases
            .upload_release(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let fed = feeder.await.context("upload reader task")?;
        match result {
            Ok(reply) => {
                fed?;
                return Ok(reply.into_inner());
            }
            Err(status)
                if attempt < ATTEMPTS
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown
                    ) =>
            {
                eprintln!(
                    "upload interrupted ({}); restarting ({attempt}/{ATTEMPTS})",
                    status.message()
                );
                tokio::time::sleep(Duration::from_secs(attempt.into())).await;
            }
            Err(status) => {
                fed?;
                bail!("upload refused: {:?}: {}", status.code(), status.message());
            }
        }
    }
}

/// Produces metadata, chunks and attachments; checks the file did not change since it
/// was hashed, and draws a progress bar on a terminal.
async fn feed(
    tx: tokio::sync::mpsc::Sender<pb::UploadReleaseRequest>,
    file: PathBuf,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Vec<u8>,
    attachments: Vec<pb::Attachment>,
) -> anyhow::Result<()> {
    let send = |kind| pb::UploadReleaseRequest { kind: Some(kind) };
    let metadata = pb::UploadMetadata {
        manifest: manifest_bytes,
        signature,
    };
    if tx.send(send(Kind::Metadata(metadata))).await.is_err() {
        return Ok(()); // the call ended; its status says why
    }
    let mut f = tokio::fs::File::open(&file)
        .await
        .with_context(|| file.display().to_string())?;
    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut hasher = aviary_proto::digest::Hasher::new();
    let mut sent = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            let n = f.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        hasher.update(&buf);
        sent += filled as u64;
        if tx.send(send(Kind::Chunk(buf))).await.is_err() {
            return Ok(());
        }
        if progress {
            draw(&manifest, sent, started.elapsed());
        }
    }
    if progress {
        eprintln!();
    }
    if hasher.finish() != manifest.digest() || sent != manifest.size {
        bail!(
            "{} changed while uploading (now {sent} bytes); nothing was stored",
            file.display()
        );
    }
    for a in attachments {
        if tx.send(send(Kind::Attachment(a))).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn draw(m: &Manifest, sent: u64, elapsed: Duration) {
    let pct = (sent * 100).checked_div(m.size).unwrap_or(100);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rate = mib(sent) / elapsed.as_secs_f64().max(0.001);
    let width = 30;
    let done = (pct as usize * width / 100).min(width);
    eprint!(
        "\r{} {} [{}{}] {pct:>3}% {:.1}/{:.1} MiB {rate:.1} MiB/s",
        m.module,
        m.version,
        "#".repeat(done),
        " ".repeat(width - done),
        mib(sent),
        mib(m.size),
    );
}
