//! Architecture names: what a node says it can run (`Hello.arch`) and what an artifact
//! was built for (`Manifest.target`). A node gets only artifacts of its own name, so a
//! name must say everything that decides whether a binary runs: instruction set,
//! byte order and the ABI where one architecture has incompatible ones (ARM float
//! calling conventions, x32, PowerPC SPE). The C library is not part of the name:
//! artifacts are expected to be static or built for the gateway's distribution.
//!
//! A build names itself from the Rust target triple it was compiled for (the `TARGET`
//! cargo gives `build.rs`), never from a guess at run time.

/// Every name a node or an artifact may carry, one for each binary-incompatible
/// architecture that Rust builds for Linux.
pub const TARGETS: [&str; 37] = [
    "x86_64",
    "x86_64-x32",
    "i686",
    "i586",
    "aarch64",
    "aarch64-ilp32",
    "aarch64_be",
    "aarch64_be-ilp32",
    "armv7",
    "armv7-softfloat",
    "armv6",
    "armv6-softfloat",
    "armv5te",
    "armv4t",
    "armeb",
    "riscv64",
    "riscv32",
    "loongarch64",
    "powerpc",
    "powerpc-spe",
    "powerpc64",
    "powerpc64le",
    "s390x",
    "sparc",
    "sparc64",
    "mips",
    "mipsel",
    "mips64",
    "mips64el",
    "mipsisa32r6",
    "mipsisa32r6el",
    "mipsisa64r6",
    "mipsisa64r6el",
    "m68k",
    "csky",
    "csky-hardfloat",
    "hexagon",
];

/// The Rust target triple this crate was compiled for.
pub const BUILD_TRIPLE: &str = env!("AVIARY_BUILD_TARGET");

/// A target triple with no Aviary architecture name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no architecture name for target {triple:?}: Aviary will not guess which artifacts it \
     can run (known: {})",
    TARGETS.join(", ")
)]
pub struct UnknownTarget {
    /// The triple that was not recognised.
    pub triple: String,
}

/// The name of the architecture this binary was built for.
pub fn host_target() -> Result<&'static str, UnknownTarget> {
    target_of_triple(BUILD_TRIPLE)
}

/// Whether `name` is one of [`TARGETS`].
pub fn is_target(name: &str) -> bool {
    TARGETS.contains(&name)
}

/// The architecture name for a Rust target triple (`arch-vendor-os[-env]` or
/// `arch-os-env`) whose OS is Linux.
pub fn target_of_triple(triple: &str) -> Result<&'static str, UnknownTarget> {
    let unknown = || UnknownTarget {
        triple: triple.to_owned(),
    };
    let parts: Vec<&str> = triple.split('-').collect();
    // `linux` is never first: the architecture is.
    let Some(os) = parts.iter().skip(1).position(|p| *p == "linux") else {
        return Err(unknown());
    };
    let arch = parts[0];
    // The environment (`gnueabihf`, `musl`, ...) follows the OS.
    let env = parts.get(os + 2).copied().unwrap_or("");
    let hard_float = env.ends_with("hf");
    let name = match arch {
        "x86_64" if env == "gnux32" => "x86_64-x32",
        "x86_64" => "x86_64",
        "i686" => "i686",
        "i586" => "i586",
        "aarch64" if env.ends_with("_ilp32") => "aarch64-ilp32",
        "aarch64" => "aarch64",
        "aarch64_be" if env.ends_with("_ilp32") => "aarch64_be-ilp32",
        "aarch64_be" => "aarch64_be",
        // thumbv7neon is ARMv7 with NEON, which every armv7 gateway Debian supports has.
        "armv7" | "thumbv7neon" if hard_float => "armv7",
        "armv7" | "thumbv7neon" => "armv7-softfloat",
        // Rust's plain `arm` targets are ARMv6 (the Raspberry Pi 1 and Zero).
        "arm" if hard_float => "armv6",
        "arm" => "armv6-softfloat",
        "armv5te" if !hard_float => "armv5te",
        "armv4t" if !hard_float => "armv4t",
        "armeb" if !hard_float => "armeb",
        "riscv64gc" | "riscv64a23" | "riscv64" => "riscv64",
        "riscv32gc" => "riscv32",
        "loongarch64" => "loongarch64",
        "powerpc" if env.ends_with("spe") => "powerpc-spe",
        "powerpc" => "powerpc",
        "powerpc64" => "powerpc64",
        "powerpc64le" => "powerpc64le",
        "s390x" => "s390x",
        "sparc" => "sparc",
        "sparc64" => "sparc64",
        "mips" => "mips",
        "mipsel" => "mipsel",
        "mips64" => "mips64",
        "mips64el" => "mips64el",
        "mipsisa32r6" => "mipsisa32r6",
        "mipsisa32r6el" => "mipsisa32r6el",
        "mipsisa64r6" => "mipsisa64r6",
        "mipsisa64r6el" => "mipsisa64r6el",
        "m68k" => "m68k",
        "csky" if hard_float => "csky-hardfloat",
        "csky" => "csky",
        "hexagon" => "hexagon",
        _ => return Err(unknown()),
    };
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_names_itself_from_its_triple() {
        let name = host_target().expect("the test build's own triple has a name");
        assert!(is_target(name), "{BUILD_TRIPLE} -> {name}");
    }

    #[test]
    fn gateway_triples_get_the_names_releases_use() {
        for (triple, name) in [
            ("x86_64-unknown-linux-gnu", "x86_64"),
            ("x86_64-unknown-linux-musl", "x86_64"),
            ("aarch64-unknown-linux-gnu", "aarch64"),
            ("armv7-unknown-linux-gnueabihf", "armv7"),
            ("thumbv7neon-unknown-linux-gnueabihf", "armv7"),
            ("armv7-unknown-linux-gnueabi", "armv7-softfloat"),
            ("arm-unknown-linux-gnueabihf", "armv6"),
            ("riscv64gc-unknown-linux-gnu", "riscv64"),
            ("x86_64-unknown-linux-gnux32", "x86_64-x32"),
            ("powerpc-unknown-linux-gnuspe", "powerpc-spe"),
            ("aarch64_be-unknown-linux-gnu_ilp32", "aarch64_be-ilp32"),
        ] {
            assert_eq!(target_of_triple(triple), Ok(name), "{triple}");
        }
    }

    #[test]
    fn what_it_cannot_name_it_refuses_by_name() {
        for triple in [
            "wasm32-wali-linux-musl",
            "armv5te-unknown-linux-gnueabihf",
            "x86_64-unknown-freebsd",
            "quantum9-unknown-linux-gnu",
            "",
        ] {
            let err = target_of_triple(triple).expect_err(triple);
            assert!(err.to_string().contains(&format!("{triple:?}")), "{err}");
            assert!(err.to_string().contains("will not guess"), "{err}");
        }
    }

    /// Every Linux target of the installed rustc either has a name in TARGETS or is one
    /// of the few refused on purpose; a rustc that adds an architecture fails this test
    /// instead of shipping a daemon that cannot start.
    #[test]
    fn every_linux_target_rustc_knows_is_named_or_refused_on_purpose() {
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let out = std::process::Command::new(rustc)
            .args(["--print", "target-list"])
            .output()
            .expect("rustc runs");
        assert!(out.status.success());
        let list = String::from_utf8(out.stdout).expect("utf-8");
        // WebAssembly under a Linux-like host interface: not a CPU a gateway has.
        let refused = ["wasm32-wali-linux-musl"];
        let mut named = std::collections::BTreeSet::new();
        let linux: Vec<&str> = list.lines().filter(|t| t.contains("-linux")).collect();
        assert!(linux.len() > 50, "{linux:?}");
        for triple in linux {
            match target_of_triple(triple) {
                Ok(name) => {
                    assert!(is_target(name), "{triple} -> {name} is not in TARGETS");
                    named.insert(name);
                }
                Err(e) => assert!(refused.contains(&triple), "{e}"),
            }
        }
        // And TARGETS names nothing no triple produces.
        for name in TARGETS {
            assert!(
                named.contains(name),
                "{name} in TARGETS but no triple maps to it"
            );
        }
    }
}
