//! Gateway CPUs this machine does not have: binaries cross-built for them (by
//! `scripts/test`, through `scripts/build-targets`) and run under Debian's qemu-user.
//!
//! The daemon itself is started as `qemu-ARCH -L SYSROOT aviary-edge ...`. The modules it
//! starts are foreign executables too; the kernel hands those to qemu through
//! binfmt_misc, which `scripts/test` registers (with `/etc/qemu-binfmt/ARCH` pointing at
//! the cross toolchain's libraries, where Debian's qemu looks for them).

use std::path::PathBuf;

use anyhow::{bail, Context};

/// One foreign target.
#[derive(Clone, Copy, Debug)]
pub struct Foreign {
    /// The Rust target triple it is built for.
    pub triple: &'static str,
    /// What a daemon built for it calls its architecture.
    pub arch: &'static str,
    /// The qemu-user emulator.
    pub qemu: &'static str,
    /// Libraries of Debian's cross toolchain (the dynamic loader and libc).
    pub sysroot: &'static str,
}

impl Foreign {
    /// 64-bit ARM (arm64).
    pub const AARCH64: Foreign = Foreign {
        triple: "aarch64-unknown-linux-gnu",
        arch: "aarch64",
        qemu: "qemu-aarch64",
        sysroot: "/usr/aarch64-linux-gnu",
    };
    /// 32-bit ARMv7 with hard float (armhf).
    pub const ARMV7: Foreign = Foreign {
        triple: "armv7-unknown-linux-gnueabihf",
        arch: "armv7",
        qemu: "qemu-arm",
        sysroot: "/usr/arm-linux-gnueabihf",
    };
    /// 64-bit RISC-V (riscv64).
    pub const RISCV64: Foreign = Foreign {
        triple: "riscv64gc-unknown-linux-gnu",
        arch: "riscv64",
        qemu: "qemu-riscv64",
        sysroot: "/usr/riscv64-linux-gnu",
    };

    /// A binary cross-built for this target (unoptimised, as `scripts/test` builds it).
    pub fn bin(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.bin_in("debug", name)
    }

    /// A binary cross-built for this target in `dir` (`debug` or `release`).
    pub fn bin_in(&self, dir: &str, name: &str) -> anyhow::Result<PathBuf> {
        let target = crate::bin_dir()
            .parent()
            .map(|t| t.to_path_buf())
            .context("target dir")?;
        let path = target.join(self.triple).join(dir).join(name);
        if !path.exists() {
            let profile = if dir == "debug" { "dev" } else { dir };
            bail!(
                "{} missing: scripts/build-targets --profile {profile} {} builds it",
                path.display(),
                self.triple
            );
        }
        Ok(path)
    }

    /// The command line that runs `name` from `dir` under qemu: the emulator, its
    /// arguments and the binary.
    pub fn command(&self, dir: &str, name: &str) -> anyhow::Result<Vec<String>> {
        Ok(vec![
            self.qemu.to_owned(),
            "-L".to_owned(),
            self.sysroot.to_owned(),
            self.bin_in(dir, name)?.display().to_string(),
        ])
    }

    /// The targets by triple.
    pub fn by_triple(triple: &str) -> Option<Foreign> {
        [Foreign::AARCH64, Foreign::ARMV7, Foreign::RISCV64]
            .into_iter()
            .find(|f| f.triple == triple)
    }

    /// Fails unless the kernel runs this target's executables by itself (binfmt_misc),
    /// which a daemon under qemu needs to start its modules.
    pub fn check_binfmt(&self) -> anyhow::Result<()> {
        let exe = self.bin("aviary-edge")?;
        let out = std::process::Command::new(&exe).arg("--version").output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            other => bail!(
                "{} does not run by itself ({other:?}): register qemu-user with binfmt_misc \
                 (scripts/test does)",
                exe.display()
            ),
        }
    }
}

/// The ELF machine of an executable's bytes (`e_machine`), e.g. 0xB7 for aarch64.
pub fn elf_machine(bytes: &[u8]) -> Option<u16> {
    if bytes.get(..4)? != b"\x7fELF" {
        return None;
    }
    // Every target here is little-endian.
    Some(u16::from_le_bytes([*bytes.get(18)?, *bytes.get(19)?]))
}
