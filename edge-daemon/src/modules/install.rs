//! The install pipeline, the same for fleet updates and offline bundles:
//!
//! signature (the edge's own trusted keys) → manifest rules → target → no downgrade →
//! payload received into `tmp/`, size bounded, sha256 checked → patch or decompress into
//! a new slot, result checked against the signed sha256 and size → fsync → switch
//! `state.json` atomically → remove what is no longer referenced.
//!
//! Any failure returns the reason (the caller NACKs with it), removes its temp files and
//! leaves the running module untouched.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use aviary_certs::TrustedKeys;
use aviary_proto::bundle::{BundleHeader, Encoding, PayloadInfo};
use aviary_proto::delta;
use aviary_proto::digest::Hasher;
use aviary_proto::manifest::{precedence, Manifest};

use super::receive::Receiving;
use super::slots::{io, sync_dir, ModuleState, Modules, Slot};
use super::InstallError;

/// A manifest whose signature and rules checked out on this edge.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The bytes as signed.
    pub manifest_bytes: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

/// What `check` found about an offered release.
#[derive(Debug)]
pub enum Verdict {
    /// Install it.
    Install(Box<Checked>),
    /// That exact version and artifact is current already.
    AlreadyInstalled(Slot),
}

/// Installs modules into a state dir.
pub struct Installer {
    modules: Modules,
    trusted: TrustedKeys,
    target: String,
}

impl Installer {
    /// An installer for `modules`, trusting `trusted`, on a node of `target` arch.
    pub fn new(modules: Modules, trusted: TrustedKeys, target: impl Into<String>) -> Installer {
        Installer {
            modules,
            trusted,
            target: target.into(),
        }
    }

    /// The module directories.
    pub fn modules(&self) -> &Modules {
        &self.modules
    }

    /// The manifest, if one of our trusted keys signed it and it is for this node's
    /// target. Everything an unsigned message names must match it before use.
    pub fn verify(
        &self,
        manifest_bytes: &[u8],
        signature: &[u8],
    ) -> Result<Manifest, InstallError> {
        self.trusted
            .verify(manifest_bytes, signature)
            .map_err(|e| InstallError::Signature(e.to_string()))?;
        let manifest = Manifest::parse(manifest_bytes).map_err(InstallError::Manifest)?;
        if manifest.target != self.target {
            return Err(InstallError::ForeignTarget {
                offered: manifest.target,
                node: self.target.clone(),
            });
        }
        Ok(manifest)
    }

    /// Checks an offer before any payload byte is read.
    pub fn check(&self, manifest_bytes: &[u8], signature: &[u8]) -> Result<Verdict, InstallError> {
        let manifest = self.verify(manifest_bytes, signature)?;
        let state = self.modules.state(&manifest.module)?;
        if let Some(current) = &state.current {
            let offered = manifest.semver();
            let running = aviary_proto::manifest::parse_version(&current.version)
                .map_err(InstallError::Manifest)?;
            match precedence(&offered, &running) {
                std::cmp::Ordering::Less => {
                    return Err(InstallError::Downgrade {
                        current: current.version.clone(),
                        offered: manifest.version,
                    })
                }
                std::cmp::Ordering::Equal if current.sha256 == manifest.sha256 => {
                    return Ok(Verdict::AlreadyInstalled(current.clone()))
                }
                std::cmp::Ordering::Equal => {
                    return Err(InstallError::VersionConflict {
                        version: manifest.version,
                        installed: current.sha256.clone(),
                    })
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        Ok(Verdict::Install(Box::new(Checked {
            manifest,
            manifest_bytes: manifest_bytes.to_vec(),
            signature: signature.to_vec(),
        })))
    }

    /// Refuses a payload declared larger than any payload of the signed artifact can be
    /// (`delta::max_payload_size`): the declared size is unsigned, so it alone must not
    /// decide how much a gateway stores. Call before the first byte is written.
    pub fn check_payload(&self, checked: &Checked, info: &PayloadInfo) -> Result<(), InstallError> {
        let artifact = checked.manifest.size;
        let max = delta::max_payload_size(artifact);
        if info.size > max {
            return Err(InstallError::PayloadOverSigned {
                declared: info.size,
                artifact,
                max,
            });
        }
        Ok(())
    }

    /// Receives a payload from `reader` into a temp file of `tmp/`: at most `info.size`
    /// bytes, with the declared sha256. The file is deleted when the handle drops.
    pub fn receive(
        &self,
        checked: &Checked,
        info: &PayloadInfo,
        mut reader: impl Read,
    ) -> Result<tempfile::NamedTempFile, InstallError> {
        self.check_payload(checked, info)?;
        let tmp = self.modules.tmp(&checked.manifest.module)?;
        let mut file = tempfile::Builder::new()
            .prefix("payload-")
            .tempfile_in(&tmp)
            .map_err(io(&tmp))?;
        let mut hasher = Hasher::new();
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).map_err(io(file.path()))?;
            if n == 0 {
                break;
            }
            received += n as u64;
            if received > info.size {
                return Err(InstallError::PayloadTooLarge {
                    declared: info.size,
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io(file.path()))?;
        }
        let found = hasher.finish();
        if received != info.size || Some(found) != info.digest() {
            return Err(InstallError::PayloadMismatch {
                declared: info.sha256.clone(),
                found: found.hex(),
                size: received,
            });
        }
        file.flush().map_err(io(file.path()))?;
        Ok(file)
    }

    /// The last step of a fleet update: verifies the received payload against what
    /// `checked` was offered with and installs it at `revision`. The received bytes are
    /// discarded either way; a failed install leaves no slot or temp file behind.
    pub fn complete(
        &self,
        checked: &Checked,
        receiving: Receiving,
        revision: u64,
    ) -> Result<Slot, InstallError> {
        let result = self
            .verify_payload(&receiving.info, receiving.path())
            .and_then(|()| self.install(checked, &receiving.info, receiving.path(), revision));
        receiving.discard();
        if result.is_err() {
            let _ = self.modules.clean(&checked.manifest.module);
        }
        result
    }

    /// Applies a received payload into a new slot and switches the module to it.
    pub fn install(
        &self,
        checked: &Checked,
        info: &PayloadInfo,
        payload: &Path,
        revision: u64,
    ) -> Result<Slot, InstallError> {
        let m = &checked.manifest;
        let state = self.modules.state(&m.module)?;
        let tmp = self.modules.tmp(&m.module)?;
        let staging = tempfile::Builder::new()
            .prefix("slot-")
            .tempdir_in(&tmp)
            .map_err(io(&tmp))?;
        let artifact = staging.path().join("artifact");
        match info.encoding {
            Encoding::FullZstd => {
                let input = BufReader::new(File::open(payload).map_err(io(payload))?);
                let out = File::create(&artifact).map_err(io(&artifact))?;
                let out = delta::apply_full(input, &m.digest(), m.size, BufWriter::new(out))
                    .map_err(|e| InstallError::from_delta(&artifact, e))?;
                let file = out
                    .into_inner()
                    .map_err(|e| InstallError::from_io(&artifact, e.into_error()))?;
                file.sync_all().map_err(io(&artifact))?;
            }
            Encoding::BsdiffZstd => {
                let base = info.base_sha256.clone().unwrap_or_default();
                let current = state
                    .current
                    .as_ref()
                    .filter(|c| c.sha256 == base)
                    .ok_or_else(|| InstallError::BaseMissing { base: base.clone() })?;
                let old_path = self.modules.artifact(&m.module, current);
                // Constant memory: the base is read at offsets, the patch streamed and
                // the result written as it is made (hashed on the way, checked at the end).
                let old = File::open(&old_path).map_err(io(&old_path))?;
                let input = File::open(payload).map_err(io(payload))?;
                let out = File::create(&artifact).map_err(io(&artifact))?;
                let (_, out) =
                    delta::apply_delta(&old, &input, &m.digest(), m.size, BufWriter::new(out))
                        .map_err(|e| InstallError::from_delta(&artifact, e))?;
                let file = out
                    .into_inner()
                    .map_err(|e| InstallError::from_io(&artifact, e.into_error()))?;
                file.sync_all().map_err(io(&artifact))?;
            }
        }
        set_mode(&artifact, if m.run.is_some() { 0o755 } else { 0o644 })?;
        for (name, bytes) in [
            ("manifest.json", &checked.manifest_bytes),
            ("manifest.sig", &checked.signature),
        ] {
            let path = staging.path().join(name);
            let mut f = File::create(&path).map_err(io(&path))?;
            f.write_all(bytes).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
        }
        // The slot appears with its final mode, never private and then opened.
        super::slots::make_passage(staging.path())?;
        sync_dir(staging.path())?;

        let slot = Slot {
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            id: format!("{}-{}", m.version, &m.sha256[..12]),
            runnable: m.run.is_some(),
        };
        let dest = self.modules.slot_dir(&m.module, &slot.id);
        if dest.exists() {
            // A leftover of an interrupted install that never became current.
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            // slots/ and the module's directory, on the way to the slot.
            super::slots::make_passage(parent)?;
            if let Some(module_dir) = parent.parent() {
                super::slots::make_passage(module_dir)?;
            }
        }
        let staged = staging.keep();
        if let Err(e) = std::fs::rename(&staged, &dest) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(InstallError::from_io(&dest, e));
        }
        if let Some(parent) = dest.parent() {
            sync_dir(parent)?;
        }
        // The switch: from here on the new version is the module.
        self.modules.write_state(
            &m.module,
            &ModuleState {
                current: Some(slot.clone()),
                previous: state.current.clone(),
                revision,
                rolled_back: false,
            },
        )?;
        self.modules.clean(&m.module)?;
        Ok(slot)
    }

    /// Switches back to the previous slot (no download); the current one becomes previous.
    /// With `version`, only if the previous slot holds that version (an ordered rollback);
    /// already at it is a no-op.
    pub fn rollback(
        &self,
        module: &str,
        version: Option<&str>,
        revision: u64,
    ) -> Result<Slot, InstallError> {
        let state = self.modules.state(module)?;
        if let (Some(v), Some(current)) = (version, &state.current) {
            if current.version == v {
                let mut state = state.clone();
                state.revision = revision;
                self.modules.write_state(module, &state)?;
                return Ok(current.clone());
            }
        }
        let previous = state
            .previous
            .clone()
            .filter(|p| version.is_none_or(|v| p.version == v))
            .ok_or_else(|| InstallError::NoPrevious(module.to_owned()))?;
        self.modules.write_state(
            module,
            &ModuleState {
                current: Some(previous.clone()),
                previous: state.current,
                revision,
                rolled_back: true,
            },
        )?;
        Ok(previous)
    }

    /// Checks a fully received payload file against its declared size and sha256.
    pub fn verify_payload(&self, info: &PayloadInfo, path: &Path) -> Result<(), InstallError> {
        let file = File::open(path).map_err(io(path))?;
        let (found, size) =
            aviary_proto::digest::hash_reader(BufReader::new(file)).map_err(io(path))?;
        if size > info.size {
            return Err(InstallError::PayloadTooLarge {
                declared: info.size,
            });
        }
        if size != info.size || Some(found) != info.digest() {
            return Err(InstallError::PayloadMismatch {
                declared: info.sha256.clone(),
                found: found.hex(),
                size,
            });
        }
        Ok(())
    }

    /// Installs an offline bundle with exactly the checks of a fleet update.
    pub fn apply_bundle(&self, path: &Path) -> Result<Outcome, InstallError> {
        let mut reader = BufReader::new(File::open(path).map_err(io(path))?);
        let header =
            BundleHeader::read(&mut reader).map_err(|e| InstallError::Bundle(e.to_string()))?;
        let checked = match self.check(&header.manifest, &header.signature)? {
            Verdict::AlreadyInstalled(slot) => return Ok(Outcome::AlreadyInstalled(slot)),
            Verdict::Install(checked) => checked,
        };
        let result = self
            .receive(&checked, &header.payload, reader)
            .and_then(|payload| self.install(&checked, &header.payload, payload.path(), 0));
        if result.is_err() {
            let _ = self.modules.clean(&checked.manifest.module);
        }
        result.map(Outcome::Installed)
    }
}

/// What an install did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Switched to this new slot.
    Installed(Slot),
    /// Nothing to do: this slot is current already.
    AlreadyInstalled(Slot),
}

fn set_mode(path: &Path, mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aviary_certs::ReleaseSigner;
    use aviary_proto::digest::Sha256;

    struct Fixture {
        dir: tempfile::TempDir,
        signer: ReleaseSigner,
        installer: Installer,
    }

    fn fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys)?;
        let paths = aviary_certs::generate_release_key(&keys)?;
        let signer = ReleaseSigner::load(&paths.private_key)?;
        let installer = Installer::new(
            Modules::open(&dir.path().join("state"))?,
            TrustedKeys::load(&keys)?,
            "x86_64",
        );
        Ok(Fixture {
            dir,
            signer,
            installer,
        })
    }

    fn manifest(module: &str, version: &str, artifact: &[u8]) -> Vec<u8> {
        Manifest {
            module: module.into(),
            version: version.into(),
            target: "x86_64".into(),
            sha256: Sha256::of(artifact).hex(),
            size: artifact.len() as u64,
            run: None,
        }
        .to_json()
    }

    fn full(artifact: &[u8]) -> Result<(PayloadInfo, Vec<u8>), Box<dyn std::error::Error>> {
        let bytes = delta::write_full(artifact, 3, Vec::new())?;
        Ok((PayloadInfo::of(Encoding::FullZstd, None, &bytes), bytes))
    }

    fn patch(old: &[u8], new: &[u8]) -> Result<(PayloadInfo, Vec<u8>), Box<dyn std::error::Error>> {
        let bytes = delta::write_delta(old, new, 3, Vec::new())?;
        Ok((
            PayloadInfo::of(Encoding::BsdiffZstd, Some(Sha256::of(old)), &bytes),
            bytes,
        ))
    }

    fn binary(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(seed) ^ (i / 300) as u8)
            .collect()
    }

    impl Fixture {
        fn offer(
            &self,
            manifest: &[u8],
            signature: &[u8],
            info: &PayloadInfo,
            payload: &[u8],
        ) -> Result<Outcome, InstallError> {
            match self.installer.check(manifest, signature)? {
                Verdict::AlreadyInstalled(s) => Ok(Outcome::AlreadyInstalled(s)),
                Verdict::Install(checked) => {
                    let file = self.installer.receive(&checked, info, payload)?;
                    let r = self.installer.install(&checked, info, file.path(), 1);
                    drop(file);
                    if r.is_err() {
                        self.installer.modules().clean(&checked.manifest.module)?;
                    }
                    r.map(Outcome::Installed)
                }
            }
        }

        fn signed_offer(
            &self,
            manifest: &[u8],
            info: &PayloadInfo,
            payload: &[u8],
        ) -> Result<Outcome, InstallError> {
            self.offer(manifest, &self.signer.sign(manifest), info, payload)
        }

        fn current(&self, module: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let state = self.installer.modules().state(module)?;
            let slot = state.current.ok_or("no current slot")?;
            Ok(std::fs::read(
                self.installer.modules().artifact(module, &slot),
            )?)
        }

        /// Files that no state names: temp files and unreferenced slots.
        fn strays(&self, module: &str) -> Result<Vec<String>, Box<dyn std::error::Error>> {
            let dir = self.dir.path().join("state/modules").join(module);
            let state = self.installer.modules().state(module)?;
            let keep: Vec<String> = [state.current, state.previous]
                .into_iter()
                .flatten()
                .map(|s| s.id)
                .collect();
            let mut out = Vec::new();
            if let Ok(tmp) = std::fs::read_dir(dir.join("tmp")) {
                for e in tmp {
                    out.push(e?.path().display().to_string());
                }
            }
            if let Ok(slots) = std::fs::read_dir(dir.join("slots")) {
                for e in slots {
                    let name = e?.file_name().to_string_lossy().into_owned();
                    if !keep.contains(&name) {
                        out.push(name);
                    }
                }
            }
            Ok(out)
        }
    }

    /// A fleet update's last step: a payload received in chunks is verified and installed
    /// by `complete`; a tampered one leaves nothing behind, neither slot nor received file.
    #[test]
    fn a_received_payload_is_completed_only_when_it_matches_its_offer(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let f = fixture()?;
        let v1 = binary(3, 200_000);
        let m = manifest("gateway", "1.0.0", &v1);
        let Verdict::Install(checked) = f.installer.check(&m, &f.signer.sign(&m))? else {
            return Err("not offered for install".into());
        };
        let (info, bytes) = full(&v1)?;
        let receive = |id: &str, bytes: &[u8]| -> Result<Receiving, InstallError> {
            let mut r =
                Receiving::open(f.installer.modules(), "gateway", "1.0.0", id, info.clone())?;
            for (i, chunk) in bytes.chunks(64 << 10).enumerate() {
                r.append((i * (64 << 10)) as u64, chunk)?;
            }
            Ok(r)
        };
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let refused = f
            .installer
            .complete(&checked, receive("t-1", &tampered)?, 5);
        assert!(refused.is_err(), "a tampered payload was installed");
        assert!(f.installer.modules().state("gateway")?.current.is_none());
        assert!(
            f.strays("gateway")?.is_empty(),
            "{:?}",
            f.strays("gateway")?
        );
        let slot = f.installer.complete(&checked, receive("t-2", &bytes)?, 6)?;
        assert_eq!(slot.version, "1.0.0");
        assert_eq!(f.current("gateway")?, v1);
        assert_eq!(f.installer.modules().state("gateway")?.revision, 6);
        assert!(
            f.strays("gateway")?.is_empty(),
            "{:?}",
            f.strays("gateway")?
        );
        Ok(())
    }

    #[test]
    fn a_full_install_then_a_delta_then_a_rollback_without_download(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let f = fixture()?;
        let v1 = binary(3, 300_000);
        let mut v2 = v1.clone();
        v2[1000..1400].copy_from_slice(&binary(7, 400));
        let (info, bytes) = full(&v1)?;
        let m1 = manifest("gateway", "1.0.0", &v1);
        assert!(matches!(
            f.signed_offer(&m1, &info, &bytes)?,
            Outcome::Installed(_)
        ));
        assert_eq!(f.current("gateway")?, v1);
        // Offered again: nothing to do.
        assert!(matches!(
            f.signed_offer(&m1, &info, &bytes)?,
            Outcome::AlreadyInstalled(_)
        ));

        let (info, bytes) = patch(&v1, &v2)?;
        assert!(
            bytes.len() < v2.len() / 20,
            "delta of {} bytes",
            bytes.len()
        );
        let m2 = manifest("gateway", "1.1.0-rc.1", &v2);
        f.signed_offer(&m2, &info, &bytes)?;
        assert_eq!(f.current("gateway")?, v2);
        let state = f.installer.modules().state("gateway")?;
        assert_eq!(state.previous.map(|s| s.version).as_deref(), Some("1.0.0"));
        assert!(
            f.strays("gateway")?.is_empty(),
            "{:?}",
            f.strays("gateway")?
        );

        let back = f.installer.rollback("gateway", Some("1.0.0"), 2)?;
        assert_eq!(back.version, "1.0.0");
        assert_eq!(f.current("gateway")?, v1);
        Ok(())
    }

    #[test]
    fn every_bad_offer_is_refused_with_its_reason_and_changes_nothing(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let f = fixture()?;
        let v1 = binary(3, 100_000);
        let (info, bytes) = full(&v1)?;
        f.signed_offer(&manifest("gateway", "1.0.0", &v1), &info, &bytes)?;

        let v2 = {
            let mut v = v1.clone();
            v[500..900].fill(9);
            v
        };
        let m2 = manifest("gateway", "2.0.0", &v2);
        let (delta_info, delta) = patch(&v1, &v2)?;
        let stranger = {
            let keys = f.dir.path().join("stranger");
            std::fs::create_dir(&keys)?;
            ReleaseSigner::load(&aviary_certs::generate_release_key(&keys)?.private_key)?
        };
        let mut tampered = m2.clone();
        let pos = tampered
            .windows(5)
            .position(|w| w == b"2.0.0")
            .ok_or("version")?;
        tampered[pos] = b'3';
        let mut flipped = delta.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        // The same flip with a payload digest that matches it (a compromised control
        // plane can recompute that): the patch or the signed result check must catch it.
        let flipped_info = PayloadInfo::of(Encoding::BsdiffZstd, Some(Sha256::of(&v1)), &flipped);
        let other_base = binary(5, 100_000);
        let (wrong_base_info, wrong_base) = patch(&other_base, &v2)?;
        let (impostor_info, impostor) = full(&binary(11, 1000))?;
        // A well-formed delta from the right base to bytes of the signed size that are
        // not the signed artifact: found only at the end of the streamed write.
        let mut forged_target = v2.clone();
        forged_target[v2.len() / 3] ^= 0x40;
        let (forged_info, forged) = patch(&v1, &forged_target)?;
        let evil = br#"{"module":"../evil","version":"9.0.0","target":"x86_64","sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":1}"#;
        let mut longer = delta.clone();
        longer.extend_from_slice(b"trailing");
        let old = manifest("gateway", "0.9.0", &binary(4, 10));
        let (old_info, old_payload) = full(&binary(4, 10))?;
        let arm = Manifest {
            target: "aarch64".into(),
            ..Manifest::parse(&m2)?
        }
        .to_json();
        // Sizes the payload claims must not size anything: a declared payload far past
        // what the signed artifact can need, and a delta header claiming 1 TiB.
        let oversized_info = PayloadInfo {
            size: delta::max_payload_size(v2.len() as u64) + 1,
            ..delta_info.clone()
        };
        let mut lying = delta.clone();
        lying[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let lying_info = PayloadInfo::of(Encoding::BsdiffZstd, Some(Sha256::of(&v1)), &lying);

        type Case<'a> = (
            &'a str,
            Vec<u8>,
            Vec<u8>,
            &'a PayloadInfo,
            &'a [u8],
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "tampered manifest",
                tampered.clone(),
                f.signer.sign(&m2),
                &delta_info,
                &delta,
                "signature",
            ),
            (
                "unknown key",
                m2.clone(),
                stranger.sign(&m2),
                &delta_info,
                &delta,
                "signature",
            ),
            (
                "flipped bit",
                m2.clone(),
                f.signer.sign(&m2),
                &delta_info,
                &flipped,
                "payload sha256",
            ),
            (
                "flipped bit, digest recomputed",
                m2.clone(),
                f.signer.sign(&m2),
                &flipped_info,
                &flipped,
                "",
            ),
            (
                "patch for another base",
                m2.clone(),
                f.signer.sign(&m2),
                &wrong_base_info,
                &wrong_base,
                "base",
            ),
            (
                "result mismatch",
                m2.clone(),
                f.signer.sign(&m2),
                &impostor_info,
                &impostor,
                "result",
            ),
            (
                "delta to other bytes of the signed size",
                m2.clone(),
                f.signer.sign(&m2),
                &forged_info,
                &forged,
                "result",
            ),
            (
                "module with ../",
                evil.to_vec(),
                f.signer.sign(evil),
                &delta_info,
                &delta,
                "module",
            ),
            (
                "payload bigger than declared",
                m2.clone(),
                f.signer.sign(&m2),
                &delta_info,
                &longer,
                "bigger",
            ),
            (
                "payload declared past the signed size",
                m2.clone(),
                f.signer.sign(&m2),
                &oversized_info,
                &delta,
                "the signed artifact is",
            ),
            (
                "delta header claiming 1 TiB",
                m2.clone(),
                f.signer.sign(&m2),
                &lying_info,
                &lying,
                "signed manifest says",
            ),
            (
                "downgrade",
                old.clone(),
                f.signer.sign(&old),
                &old_info,
                &old_payload,
                "downgrade",
            ),
            (
                "foreign target",
                arm.clone(),
                f.signer.sign(&arm),
                &delta_info,
                &delta,
                "aarch64",
            ),
        ];
        for (what, m, sig, info, payload, reason) in cases {
            let err = match f.offer(&m, &sig, info, payload) {
                Ok(o) => return Err(format!("{what}: accepted as {o:?}").into()),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(reason), "{what}: {err}");
            assert_eq!(f.current("gateway")?, v1, "{what}: running module changed");
            assert!(
                f.strays("gateway")?.is_empty(),
                "{what}: left {:?}",
                f.strays("gateway")?
            );
        }
        assert!(!f.dir.path().join("state/evil").exists());
        // And the good update still goes through afterwards.
        f.signed_offer(&m2, &delta_info, &delta)?;
        assert_eq!(f.current("gateway")?, v2);
        Ok(())
    }

    #[test]
    fn names_from_messages_and_state_files_never_leave_the_state_dir(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let f = fixture()?;
        let v1 = binary(3, 10_000);
        let (info, bytes) = full(&v1)?;
        f.signed_offer(&manifest("gateway", "1.0.0", &v1), &info, &bytes)?;
        let outside = f.dir.path().join("outside");
        std::fs::create_dir(&outside)?;
        std::fs::write(outside.join("precious"), b"x")?;

        // A rollback naming a path instead of a module.
        for name in ["../../outside", "..", "a/b", ""] {
            assert!(f.installer.rollback(name, None, 9).is_err(), "{name:?}");
        }
        assert!(!f.dir.path().join("state/state.json").exists());
        assert!(!f.dir.path().join("outside/state.json").exists());

        // A symlinked tmp (or slots) is removed, not emptied through.
        let tmp = f.dir.path().join("state/modules/gateway/tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::os::unix::fs::symlink(&outside, &tmp)?;
        f.installer.modules().clean("gateway")?;
        assert!(outside.join("precious").exists());
        assert!(!tmp.is_symlink());
        assert_eq!(f.current("gateway")?, v1);

        // A state.json naming a slot outside its module is corrupt, not followed; and
        // one damaged module does not hide the others.
        f.signed_offer(&manifest("other", "1.0.0", &v1), &info, &bytes)?;
        let state = f.dir.path().join("state/modules/other/state.json");
        let text = std::fs::read_to_string(&state)?;
        let id = f
            .installer
            .modules()
            .state("other")?
            .current
            .ok_or("no slot")?
            .id;
        std::fs::write(&state, text.replace(&id, "../../../outside"))?;
        let err = f
            .installer
            .modules()
            .state("other")
            .err()
            .ok_or("accepted")?;
        assert!(err.to_string().contains("not a file name"), "{err}");
        let listed: Vec<String> = f
            .installer
            .modules()
            .list()?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, ["gateway"]);
        Ok(())
    }
}
