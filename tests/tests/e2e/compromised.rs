//! A control plane that is compromised (or impersonated with its stolen key) sending a
//! daemon whatever it likes: every byte count the daemon allocates or writes is bounded
//! by the signed manifest, and every name it uses as a path is matched to one.

use std::time::Duration;

use aviary_certs::ReleaseSigner;
use aviary_proto::delta;
use aviary_proto::digest::Sha256;
use aviary_proto::manifest::Manifest;
use aviary_proto::v1 as pb;
use aviary_tests::fake_cp::FakeControlPlane;
use aviary_tests::{dir_bytes, peak_rss_kib, Edge, Workspace};
use pb::control_message::Kind;

const WAIT: Duration = Duration::from_secs(30);

fn artifact(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ (i / 997) as u8)
        .collect()
}

fn manifest(version: &str, data: &[u8]) -> Vec<u8> {
    Manifest {
        module: "gateway".into(),
        version: version.into(),
        target: "x86_64".into(),
        sha256: Sha256::of(data).hex(),
        size: data.len() as u64,
        run: None,
    }
    .to_json()
}

/// A module update for `manifest` with a payload the control plane describes as it likes.
fn update(
    signer: &ReleaseSigner,
    revision: u64,
    manifest: Vec<u8>,
    version: &str,
    payload: pb::Payload,
    transfer: &str,
) -> Kind {
    Kind::ModuleUpdate(pb::ModuleUpdate {
        revision,
        module: "gateway".into(),
        to_version: version.into(),
        signature: signer.sign(&manifest),
        manifest,
        payload: Some(payload),
        transfer_id: transfer.into(),
        ..Default::default()
    })
}

/// Issue 11, items 3 and 7: a fake control plane made a daemon take 1.06 GB of memory with
/// a delta header claiming 1 TiB, write 60 MB for a 300 KB artifact, and rewrite a
/// state.json outside its state dir through a rollback's module name.
#[tokio::test]
async fn a_fake_control_plane_cannot_size_buffers_files_or_paths_on_a_daemon() -> anyhow::Result<()>
{
    let ws = Workspace::new()?;
    let mut fake = FakeControlPlane::start(&ws).await?;
    let edge = Edge::start_via(&ws, &fake.url(), "gw-1", &[], &["--arch", "x86_64"]).await?;
    let pid = edge.pid().ok_or_else(|| anyhow::anyhow!("edge pid"))?;
    let signer = ReleaseSigner::load(&ws.pki.dir.join("release-signing.key"))?;

    // A genuine full install first: the base of the deltas below.
    let v1 = artifact(3, 300_000);
    let full = delta::write_full(v1.as_slice(), 3, Vec::new())?;
    let full_info = pb::Payload {
        encoding: pb::PayloadEncoding::FullZstd as i32,
        base_sha256: String::new(),
        size: full.len() as u64,
        sha256: Sha256::of(&full).hex(),
    };
    fake.offer_payload("t1", full);
    fake.send(
        update(&signer, 1, manifest("1.0.0", &v1), "1.0.0", full_info, "t1"),
        "n1",
    )
    .await?;
    assert_eq!(fake.answer("n1", WAIT).await?, Ok(1));
    let before = peak_rss_kib(pid)?;

    // 1. A payload declared 60 MB for a 300 KB artifact: refused before its first byte.
    let v2 = {
        let mut v = v1.clone();
        v[1000..3000].copy_from_slice(&artifact(7, 2000));
        v
    };
    let m2 = manifest("2.0.0", &v2);
    let big = vec![0u8; 60 << 20];
    let big_info = pb::Payload {
        encoding: pb::PayloadEncoding::FullZstd as i32,
        base_sha256: String::new(),
        size: big.len() as u64,
        sha256: Sha256::of(&big).hex(),
    };
    fake.offer_payload("t2", big);
    fake.send(
        update(&signer, 2, m2.clone(), "2.0.0", big_info, "t2"),
        "n2",
    )
    .await?;
    let refused = fake.answer("n2", WAIT).await?;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("the signed artifact is 300000 bytes")),
        "{refused:?}"
    );
    assert!(
        dir_bytes(&edge.state_dir) < 4 << 20,
        "the daemon wrote {} bytes",
        dir_bytes(&edge.state_dir)
    );

    // 2. A delta whose header claims a 1 TiB result: refused before patching, memory flat.
    let mut lying = delta::write_delta(&v1, &v2, 3, Vec::new())?;
    lying[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let lying_info = pb::Payload {
        encoding: pb::PayloadEncoding::BsdiffZstd as i32,
        base_sha256: Sha256::of(&v1).hex(),
        size: lying.len() as u64,
        sha256: Sha256::of(&lying).hex(),
    };
    fake.offer_payload("t3", lying);
    fake.send(update(&signer, 3, m2, "2.0.0", lying_info, "t3"), "n3")
        .await?;
    let refused = fake.answer("n3", WAIT).await?;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("signed manifest says")),
        "{refused:?}"
    );
    let after = peak_rss_kib(pid)?;
    assert!(
        after < before + (64 << 10),
        "peak RSS went from {before} KiB to {after} KiB"
    );

    // 3. A rollback naming a path instead of its signed module.
    let escape = ws.path("escape");
    let m1 = manifest("1.0.0", &v1);
    fake.send(
        Kind::ModuleUpdate(pb::ModuleUpdate {
            revision: 4,
            module: format!("../../../{}", escape.display()),
            to_version: "1.0.0".into(),
            signature: signer.sign(&m1),
            manifest: m1,
            rollback: true,
            ..Default::default()
        }),
        "n4",
    )
    .await?;
    let refused = fake.answer("n4", WAIT).await?;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("rollback names")),
        "{refused:?}"
    );
    assert!(!escape.exists());

    // The genuine version still runs.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(
        edge.state_dir.join("modules/gateway/state.json"),
    )?)?;
    assert_eq!(state["current"]["version"], "1.0.0");
    Ok(())
}
