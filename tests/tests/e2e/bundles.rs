//! Offline bundles for air-gapped sites: `aviary release bundle` on the release side,
//! `aviary-edge apply` on a gateway with no control plane, with real release binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context};
use aviary_proto::digest::Sha256;
use aviary_tests::{bin, tools_dir, Tmpfs, Workspace};

/// The esbuild 0.24.1 → 0.24.2 pair `scripts/test` fetches.
fn esbuild_pair() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = tools_dir().join("delta-pairs");
    let pair = (dir.join("esbuild-0.24.1"), dir.join("esbuild-0.24.2"));
    if !pair.0.exists() || !pair.1.exists() {
        bail!(
            "{} missing: scripts/test runs scripts/fetch-delta-pairs",
            dir.display()
        );
    }
    Ok(pair)
}

fn bundle(
    ws: &Workspace,
    version: &str,
    file: &Path,
    base: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let out = ws.path(&format!("esbuild-{version}.bundle"));
    ws.bundle("esbuild", version, file, base, &out)?;
    Ok(out)
}

fn apply(ws: &Workspace, state: &Path, bundle: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(bin("aviary-edge")?)
        .args(["apply", "--arch", "x86_64", "--state-dir"])
        .arg(state)
        .arg("--certs")
        .arg(&ws.pki.dir)
        .arg(bundle)
        .output()?)
}

fn installed(state: &Path) -> anyhow::Result<Vec<u8>> {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("modules/esbuild/state.json"))?)?;
    let id = st["current"]["id"].as_str().context("no current slot")?;
    Ok(std::fs::read(
        state
            .join("modules/esbuild/slots")
            .join(id)
            .join("artifact"),
    )?)
}

fn tmp_files(state: &Path) -> usize {
    std::fs::read_dir(state.join("modules/esbuild/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_gateway_without_control_plane_installs_a_delta_bundle_and_refuses_a_tampered_one(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let (old, new) = esbuild_pair()?;
    let state = ws.path("gateway-state");
    let b1 = bundle(&ws, "0.24.1", &old, None)?;
    let b2 = bundle(&ws, "0.24.2", &new, Some(&old))?;
    let new_bytes = std::fs::read(&new)?;
    let size = std::fs::metadata(&b2)?.len();
    assert!(
        size * 20 < new_bytes.len() as u64,
        "the delta bundle ({size} bytes) should be far smaller than the binary ({})",
        new_bytes.len()
    );

    let o = apply(&ws, &state, &b1)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A flipped bit in the payload, and a signature over other bytes, are refused.
    let mut tampered = std::fs::read(&b2)?;
    let at = tampered.len() - 1000;
    tampered[at] ^= 0x10;
    let t1 = ws.path("tampered-payload.bundle");
    std::fs::write(&t1, &tampered)?;
    let mut resigned = std::fs::read(&b2)?;
    let pos = resigned
        .windows(6)
        .position(|w| w == b"0.24.2")
        .context("version in bundle")?;
    resigned[pos + 5] = b'9';
    let t2 = ws.path("tampered-manifest.bundle");
    std::fs::write(&t2, &resigned)?;
    for (bad, reason) in [(&t1, "payload sha256"), (&t2, "signature")] {
        let o = apply(&ws, &state, bad)?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{} accepted", bad.display());
        assert!(stderr.contains(reason), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert_eq!(installed(&state)?, std::fs::read(&old)?, "module changed");
        assert_eq!(tmp_files(&state), 0);
    }

    let o = apply(&ws, &state, &b2)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = installed(&state)?;
    assert_eq!(Sha256::of(&got), Sha256::of(&new_bytes));
    // Going back to 0.24.1 from a bundle is a downgrade.
    let o = apply(&ws, &state, &b1)?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("downgrade"));
    assert!(!o.status.success());
    Ok(())
}

/// A small tmpfs as the gateway's state dir (root only; CI and this machine run tests
/// as root, and the mount is undone even when the test fails).
#[test]
fn a_full_disk_refuses_the_install_and_keeps_the_running_version() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let (old, new) = esbuild_pair()?;
    let state = ws.path("small-disk");
    let _fs = Tmpfs::mount(&state, "16m")?;
    let b1 = bundle(&ws, "0.24.1", &old, None)?;
    let o = apply(&ws, &state, &b1)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 10 MB installed; the next version cannot fit beside it.
    let b2 = bundle(&ws, "0.24.2", &new, Some(&old))?;
    let o = apply(&ws, &state, &b2)?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "installed on a full disk");
    assert!(stderr.contains("no space left"), "{stderr}");
    assert_eq!(installed(&state)?, std::fs::read(&old)?);
    assert_eq!(tmp_files(&state), 0, "temp files left on the full disk");
    let slots = std::fs::read_dir(state.join("modules/esbuild/slots"))?.count();
    assert_eq!(slots, 1, "a partial slot was left");
    Ok(())
}
