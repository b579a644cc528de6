//! The Debian packages as an operator installs them: `dpkg --root` into a throw-away
//! Debian (the minbase root `scripts/test` bootstraps), then upgrade and purge.
//! `scripts/test` builds the amd64 packages (`scripts/package`) before the suite.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use aviary_tests::{bin_dir, tools_dir};

/// A fresh copy of the bootstrapped Debian root, removed on drop.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> anyhow::Result<Root> {
        let tarball = tools_dir().join("debian-root.tar");
        if !tarball.exists() {
            bail!("{} missing: scripts/test bootstraps it", tarball.display());
        }
        let dir = tempfile::tempdir()?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir.path()))?;
        Ok(Root { dir })
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    fn dpkg(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("dpkg")
            .arg("--root")
            .arg(self.dir.path())
            .args(args))
    }

    fn passwd(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.path("/etc/passwd"))?)
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed: {text}");
    Ok(text)
}

/// The amd64 package of `name` that `scripts/package` left in target/debian.
fn deb(name: &str) -> anyhow::Result<PathBuf> {
    let dir = bin_dir()
        .parent()
        .map(|t| t.join("debian"))
        .context("target dir")?;
    let prefix = format!("{name}_");
    let found = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: scripts/test runs scripts/package", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with("_amd64.deb"))
        });
    found.with_context(|| format!("no {name}_*_amd64.deb in {}", dir.display()))
}

fn mode(path: &Path) -> anyhow::Result<(u32, u32, u32)> {
    let meta = std::fs::symlink_metadata(path).with_context(|| path.display().to_string())?;
    Ok((meta.permissions().mode() & 0o7777, meta.uid(), meta.gid()))
}

#[test]
fn the_packages_install_upgrade_and_purge_in_a_clean_debian() -> anyhow::Result<()> {
    let root = Root::new()?;
    let users_before = root.passwd()?;
    let debs = [
        deb("aviary-edge")?,
        deb("aviary-control-plane")?,
        deb("aviary-sensors")?,
    ];
    let mut install = vec!["-i"];
    install.extend(debs.iter().filter_map(|d| d.to_str()));
    root.dpkg(&install)?;

    for (file, want) in [
        ("/usr/bin/aviary-edge", 0o755),
        ("/usr/bin/aviary-control-plane", 0o755),
        ("/usr/bin/aviary", 0o755),
        ("/usr/bin/aviary-sensors", 0o755),
        ("/etc/aviary/edge.toml", 0o644),
        ("/etc/aviary/control-plane.toml", 0o644),
        ("/etc/aviary/sensors.toml", 0o644),
        ("/etc/aviary/certs", 0o750),
        ("/usr/share/aviary-sensors/imu/xio3_inertial.csv", 0o644),
        ("/usr/share/doc/aviary-sensors/imu/LICENSE", 0o644),
        ("/usr/share/doc/aviary-edge/copyright", 0o644),
    ] {
        assert_eq!(
            mode(&root.path(file))?,
            (want, 0, 0),
            "{file}: mode, uid, gid"
        );
    }
    for unit in ["aviary-edge", "aviary-control-plane", "aviary-sensors"] {
        let path = ["/lib/systemd/system", "/usr/lib/systemd/system"]
            .iter()
            .map(|d| root.path(&format!("{d}/{unit}.service")))
            .find(|p| p.exists())
            .with_context(|| format!("{unit}.service not installed"))?;
        assert_eq!(mode(&path)?.0, 0o644);
        // Enabled, so a configured gateway starts it at boot ...
        let wants = root.path(&format!(
            "/etc/systemd/system/multi-user.target.wants/{unit}.service"
        ));
        ensure!(wants.is_symlink(), "{unit} is not enabled");
    }
    // ... but only once it is configured: the daemons need their certificates.
    let edge_unit = std::fs::read_to_string(root.path("/lib/systemd/system/aviary-edge.service"))
        .or_else(|_| {
        std::fs::read_to_string(root.path("/usr/lib/systemd/system/aviary-edge.service"))
    })?;
    assert!(edge_unit.contains("ConditionPathExists=/etc/aviary/certs/ca.pem"));
    assert!(edge_unit.contains("ExecStart=/usr/bin/aviary-edge --config /etc/aviary/edge.toml"));

    let conffiles = root.dpkg(&["-s", "aviary-edge"])?;
    assert!(conffiles.contains("/etc/aviary/edge.toml"), "{conffiles}");
    // The edge runs as root with a bounded capability set (module users are the
    // operator's), the others as dynamic users: the packages add no accounts.
    assert_eq!(root.passwd()?, users_before);

    // The packaged binaries are the ones this build made, and they run.
    let version = run(Command::new(root.path("/usr/bin/aviary-edge")).arg("--version"))?;
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // An upgrade (the same version again) keeps an operator's edits to a conffile.
    let edited = "control-plane = \"https://cp.test:7443\"\n";
    std::fs::write(root.path("/etc/aviary/edge.toml"), edited)?;
    std::fs::write(root.path("/etc/aviary/certs/ca.pem"), "operator's CA")?;
    root.dpkg(&["--force-confold", "-i", debs[0].to_str().context("path")?])?;
    assert_eq!(
        std::fs::read_to_string(root.path("/etc/aviary/edge.toml"))?,
        edited
    );

    // Purge removes everything the packages made, and nothing the operator put there.
    std::fs::create_dir_all(root.path("/var/lib/aviary-edge/modules"))?;
    root.dpkg(&[
        "--purge",
        "aviary-edge",
        "aviary-control-plane",
        "aviary-sensors",
    ])?;
    for gone in [
        "/usr/bin/aviary-edge",
        "/usr/bin/aviary",
        "/etc/aviary/edge.toml",
        "/etc/aviary/sensors.toml",
        "/usr/share/aviary-sensors",
        "/var/lib/aviary-edge",
        "/etc/systemd/system/multi-user.target.wants/aviary-edge.service",
    ] {
        ensure!(!root.path(gone).exists(), "{gone} left after purge");
    }
    assert_eq!(
        std::fs::read_to_string(root.path("/etc/aviary/certs/ca.pem"))?,
        "operator's CA"
    );
    let status = Command::new("dpkg")
        .arg("--root")
        .arg(root.dir.path())
        .args(["-s", "aviary-edge"])
        .output()?;
    assert!(!status.status.success(), "aviary-edge still known to dpkg");
    Ok(())
}
