//! Signed release uploads: the CLI path end to end, and every refusal leaving nothing
//! behind on the control plane.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use aviary_certs::ReleaseSigner;
use aviary_proto::digest::Sha256;
use aviary_proto::manifest::Manifest;
use aviary_proto::v1 as pb;
use aviary_tests::{eventually, Admin, ControlPlane, Daemon, Fleet, Workspace};
use pb::upload_release_request::Kind;

fn signing_key(ws: &Workspace) -> PathBuf {
    ws.pki.dir.join("release-signing.key")
}

fn manifest_for(data: &[u8], version: &str) -> Manifest {
    Manifest {
        module: "sample".into(),
        version: version.into(),
        target: "x86_64".into(),
        sha256: Sha256::of(data).hex(),
        size: data.len() as u64,
        run: None,
    }
}

/// Every file under the control plane's blob store (partial uploads included).
fn blob_files(cp: &ControlPlane) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for sub in ["sha256", "tmp"] {
        let dir = cp.data_dir.join("blobs").join(sub);
        for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            out.push(e?.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Uploads `data` with `manifest`/`signature` as raw messages, `chunk` bytes at a time.
async fn raw_upload(
    admin: &mut Admin,
    manifest: Vec<u8>,
    signature: Vec<u8>,
    data: &[u8],
) -> Result<pb::Release, tonic::Status> {
    let mut msgs = vec![pb::UploadReleaseRequest {
        kind: Some(Kind::Metadata(pb::UploadMetadata {
            manifest,
            signature,
        })),
    }];
    for chunk in data.chunks(64 * 1024) {
        msgs.push(pb::UploadReleaseRequest {
            kind: Some(Kind::Chunk(chunk.to_vec())),
        });
    }
    admin
        .releases
        .upload_release(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// What is wrong, manifest, signature, payload, and the status it must get.
type Case = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>, tonic::Code);

fn write(path: &Path, data: &[u8]) -> anyhow::Result<PathBuf> {
    std::fs::write(path, data)?;
    Ok(path.to_owned())
}

#[tokio::test]
async fn a_signed_upload_with_its_sbom_is_stored_listed_and_survives_kill9() -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let artifact: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = write(&ws.path("sample-1.0.0"), &artifact)?;
    let sbom = write(
        &ws.path("sbom.spdx.json"),
        br#"{"spdxVersion":"SPDX-2.3","name":"sample","packages":[]}"#,
    )?;
    let run_spec = write(
        &ws.path("run.toml"),
        b"args = [\"--port\", \"8080\"]\nlisten = \"127.0.0.1:8080\"\n[[probe]]\nhttp = \"http://127.0.0.1:8080/healthz\"\n",
    )?;
    let key = signing_key(&ws);
    let out = cp.cli(
        &ws,
        &[
            "-o",
            "json",
            "release",
            "upload",
            "--module",
            "sample",
            "--version",
            "1.0.0-rc.1+build.7",
            "--target",
            "x86_64",
            "--file",
            file.to_str().unwrap_or_default(),
            "--run-spec",
            run_spec.to_str().unwrap_or_default(),
            "--sign-key",
            key.to_str().unwrap_or_default(),
            "--attach",
            sbom.to_str().unwrap_or_default(),
        ],
    )?;
    let uploaded: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(uploaded["sha256"], Sha256::of(&artifact).hex());
    // uint64 in proto3 JSON is a string.
    assert_eq!(uploaded["size"], artifact.len().to_string());
    assert_eq!(uploaded["runnable"], true);
    assert_eq!(
        uploaded["attachments"],
        serde_json::json!(["sbom.spdx.json"])
    );
    // Stored content-addressed, nothing partial left.
    assert_eq!(
        blob_files(&cp)?
            .iter()
            .filter(|p| p.to_string_lossy().contains("blobs/tmp/"))
            .count(),
        0
    );
    let stored = std::fs::read(
        cp.data_dir
            .join("blobs/sha256")
            .join(Sha256::of(&artifact).hex()),
    )?;
    assert_eq!(stored, artifact);

    // Sign offline, upload elsewhere: a second version via --manifest/--signature.
    let v2 = write(&ws.path("sample-1.0.0b"), b"version two")?;
    let signed = cp.cli(
        &ws,
        &[
            "release",
            "sign",
            "--module",
            "sample",
            "--version",
            "1.0.0",
            "--file",
            v2.to_str().unwrap_or_default(),
            "--sign-key",
            key.to_str().unwrap_or_default(),
            "--out-dir",
            ws.dir.path().to_str().unwrap_or_default(),
        ],
    )?;
    let paths: Vec<&str> = signed.lines().collect();
    assert_eq!(paths.len(), 2, "{signed}");
    cp.cli(
        &ws,
        &[
            "release",
            "upload",
            "--file",
            v2.to_str().unwrap_or_default(),
            "--manifest",
            paths[0],
            "--signature",
            paths[1],
        ],
    )?;

    cp.kill9().await?;
    cp.restart().await?;
    // Newest by SemVer precedence first: 1.0.0 > 1.0.0-rc.1.
    let list: serde_json::Value =
        serde_json::from_str(&cp.cli(&ws, &["-o", "json", "release", "list"])?)?;
    let versions: Vec<&str> = list["releases"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["version"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(versions, ["1.0.0", "1.0.0-rc.1+build.7"]);
    let table = cp.cli(&ws, &["release", "get", "sample", "1.0.0-rc.1+build.7"])?;
    assert!(
        table.contains("sbom.spdx.json") && table.contains("service"),
        "{table}"
    );
    let sbom_back = cp.cli(
        &ws,
        &[
            "release",
            "get",
            "sample",
            "1.0.0-rc.1+build.7",
            "--attachment",
            "sbom.spdx.json",
        ],
    )?;
    assert_eq!(sbom_back.as_bytes(), std::fs::read(&sbom)?);

    let events = cp.events(&ws, "release.upload").await?;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].actor, "admin/admin");
    assert_eq!(events[0].target, "release/sample@1.0.0-rc.1+build.7");
    Ok(())
}

#[tokio::test]
async fn bad_uploads_are_refused_with_a_clear_status_and_leave_nothing_behind() -> anyhow::Result<()>
{
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--max-release-bytes", "100000"]).await?;
    let mut admin = ws.admin(&cp).await?;
    let signer = ReleaseSigner::load(&signing_key(&ws))?;
    let data = vec![7u8; 50_000];
    let good = manifest_for(&data, "1.0.0").to_json();
    let good_sig = signer.sign(&good);

    let other_pki = ws.path("other");
    std::fs::create_dir_all(&other_pki)?;
    let stranger =
        ReleaseSigner::load(&aviary_certs::generate_release_key(&other_pki)?.private_key)?;

    let mut tampered = good.clone();
    let at = tampered
        .windows(5)
        .position(|w| w == b"1.0.0")
        .context("version in manifest")?;
    tampered[at] = b'9';
    let big = vec![1u8; 200_000];
    let big_manifest = manifest_for(&big, "1.0.1").to_json();
    let short = manifest_for(&data[..1000], "1.0.2").to_json();

    let cases: Vec<Case> = vec![
        (
            "unknown signer",
            good.clone(),
            stranger.sign(&good),
            data.clone(),
            tonic::Code::PermissionDenied,
        ),
        (
            "tampered manifest",
            tampered.clone(),
            good_sig.clone(),
            data.clone(),
            tonic::Code::PermissionDenied,
        ),
        (
            "no signature",
            good.clone(),
            Vec::new(),
            data.clone(),
            tonic::Code::PermissionDenied,
        ),
        (
            "wrong sha256",
            good.clone(),
            good_sig.clone(),
            vec![8u8; 50_000],
            tonic::Code::InvalidArgument,
        ),
        (
            "truncated payload",
            good.clone(),
            good_sig.clone(),
            data[..49_000].to_vec(),
            tonic::Code::InvalidArgument,
        ),
        (
            "more bytes than declared",
            short.clone(),
            signer.sign(&short),
            data.clone(),
            tonic::Code::InvalidArgument,
        ),
        (
            "over --max-release-bytes",
            big_manifest.clone(),
            signer.sign(&big_manifest),
            big.clone(),
            tonic::Code::ResourceExhausted,
        ),
        (
            "not a manifest",
            b"{}".to_vec(),
            signer.sign(b"{}"),
            data.clone(),
            tonic::Code::InvalidArgument,
        ),
    ];
    for (what, manifest, sig, payload, code) in cases {
        let err = raw_upload(&mut admin, manifest, sig, &payload)
            .await
            .err()
            .with_context(|| format!("{what}: accepted"))?;
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}: no reason given");
        assert!(
            blob_files(&cp)?.is_empty(),
            "{what}: left {:?}",
            blob_files(&cp)?
        );
    }
    let list = admin
        .releases
        .list_releases(pb::ListReleasesRequest::default())
        .await?
        .into_inner();
    assert!(list.releases.is_empty(), "{list:?}");

    // The good one goes through; repeating it is a no-op; other bytes under the same
    // version are refused.
    let stored = raw_upload(&mut admin, good.clone(), good_sig.clone(), &data).await?;
    assert_eq!(stored.sha256, Sha256::of(&data).hex());
    raw_upload(&mut admin, good.clone(), good_sig.clone(), &data).await?;
    let other = vec![9u8; 50_000];
    let conflicting = manifest_for(&other, "1.0.0").to_json();
    let err = raw_upload(
        &mut admin,
        conflicting.clone(),
        signer.sign(&conflicting),
        &other,
    )
    .await
    .err()
    .context("conflicting version accepted")?;
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert_eq!(blob_files(&cp)?.len(), 1);

    // Refusals of signatures are audited.
    let refused = cp.events(&ws, "release.refused").await?;
    assert!(refused.len() >= 3, "{refused:?}");
    Ok(())
}

#[tokio::test]
async fn a_client_that_vanishes_mid_upload_leaves_nothing_and_can_start_over() -> anyhow::Result<()>
{
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let signer = ReleaseSigner::load(&signing_key(&ws))?;
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let manifest = manifest_for(&data, "2.0.0").to_json();
    let signature = signer.sign(&manifest);
    {
        let mut admin = ws.admin(&cp).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::UploadReleaseRequest {
            kind: Some(Kind::Metadata(pb::UploadMetadata {
                manifest: manifest.clone(),
                signature: signature.clone(),
            })),
        })
        .await?;
        tx.send(pb::UploadReleaseRequest {
            kind: Some(Kind::Chunk(data[..1_000_000].to_vec())),
        })
        .await?;
        let call = tokio::spawn(async move {
            admin
                .releases
                .upload_release(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        // The half-upload is on disk as a temp file...
        eventually(Duration::from_secs(10), "the partial upload", || async {
            Ok(blob_files(&cp)?
                .iter()
                .any(|p| p.to_string_lossy().contains("blobs/tmp/"))
                .then_some(()))
        })
        .await?;
        // ...until the client disappears with its connection.
        call.abort();
        drop(tx);
    }
    eventually(
        Duration::from_secs(10),
        "the partial upload to go",
        || async { Ok(blob_files(&cp)?.is_empty().then_some(())) },
    )
    .await?;
    let mut admin = ws.admin(&cp).await?;
    let stored = raw_upload(&mut admin, manifest, signature, &data).await?;
    assert_eq!(stored.size, data.len() as u64);
    assert_eq!(blob_files(&cp)?.len(), 1);
    Ok(())
}

/// Uploads with attachments sent after the chunks.
async fn upload_with(
    admin: &mut Admin,
    manifest: &Manifest,
    data: &[u8],
    attachments: &[(&str, &[u8])],
    signer: &ReleaseSigner,
) -> Result<pb::Release, tonic::Status> {
    let bytes = manifest.to_json();
    let mut msgs = vec![pb::UploadReleaseRequest {
        kind: Some(Kind::Metadata(pb::UploadMetadata {
            signature: signer.sign(&bytes),
            manifest: bytes,
        })),
    }];
    msgs.push(pb::UploadReleaseRequest {
        kind: Some(Kind::Chunk(data.to_vec())),
    });
    for (name, body) in attachments {
        msgs.push(pb::UploadReleaseRequest {
            kind: Some(Kind::Attachment(pb::Attachment {
                name: (*name).into(),
                media_type: "application/spdx+json".into(),
                data: body.to_vec(),
            })),
        });
    }
    admin
        .releases
        .upload_release(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// Issue 11, item 8: attachments of a refused upload were left in the blob store, and a
/// second target's upload silently replaced the first one's SBOM.
#[tokio::test]
async fn attachments_are_stored_with_their_artifact_only_and_never_replaced() -> anyhow::Result<()>
{
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let mut admin = ws.admin(&cp).await?;
    let signer = ReleaseSigner::load(&signing_key(&ws))?;
    let sbom = br#"{"spdxVersion":"SPDX-2.3","name":"sample"}"#;
    let other = br#"{"spdxVersion":"SPDX-2.3","name":"forged"}"#;
    let x86 = b"x86 artifact".to_vec();
    let manifest = manifest_for(&x86, "1.0.0");

    // Bytes that are not the signed artifact: refused, and the SBOM is not kept either.
    let before = blob_files(&cp)?;
    let err = upload_with(
        &mut admin,
        &manifest,
        b"other bytes!",
        &[("sbom.spdx.json", sbom)],
        &signer,
    )
    .await
    .err()
    .context("a mismatching artifact was stored")?;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(
        blob_files(&cp)?,
        before,
        "a refused upload left blobs behind"
    );

    upload_with(
        &mut admin,
        &manifest,
        &x86,
        &[("sbom.spdx.json", sbom)],
        &signer,
    )
    .await?;
    // Another target of the same release: the same SBOM is fine, other bytes are refused.
    let arm = b"arm artifact".to_vec();
    let arm_manifest = Manifest {
        target: "aarch64".into(),
        ..manifest_for(&arm, "1.0.0")
    };
    let err = upload_with(
        &mut admin,
        &arm_manifest,
        &arm,
        &[("sbom.spdx.json", other)],
        &signer,
    )
    .await
    .err()
    .context("an SBOM was replaced")?;
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("immutable"), "{}", err.message());
    let release = upload_with(
        &mut admin,
        &arm_manifest,
        &arm,
        &[("sbom.spdx.json", sbom)],
        &signer,
    )
    .await?;
    assert_eq!(release.artifacts.len(), 2);
    let stored = admin
        .releases
        .get_attachment(pb::GetAttachmentRequest {
            module: "sample".into(),
            version: "1.0.0".into(),
            name: "sbom.spdx.json".into(),
        })
        .await?
        .into_inner();
    assert_eq!(stored.data, sbom.to_vec());
    Ok(())
}
