//! `aviary-delta-bench`: module payloads on real release pairs, side by side with the
//! anchors in one run on one machine. For each pair it prints the size of Aviary's delta
//! on the wire and in a bundle, of C bsdiff 4.3's patch, of `zstd --patch-from` at -19
//! and at --ultra -22, and of xdelta3 -9, each as a ratio to the smallest anchor; then
//! build and apply time and peak RSS for Aviary and C bsdiff/bspatch, every applied
//! result checked against the new release. Aviary's apply is `aviary-edge apply` of a
//! delta bundle, beside the same command applying a 1 KiB bundle (its idle footprint).
//!
//! ```sh
//! scripts/test                                   # installs the anchors and the pairs
//! cargo build --release --bins
//! ./target/release/aviary-delta-bench            # --pairs .tools/delta-pairs
//! ```
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use aviary_proto::delta;
use aviary_tests::{bin, tools_dir, Workspace};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Delta payloads against C bsdiff, zstd --patch-from and xdelta3")]
struct Args {
    /// Where `scripts/fetch-delta-pairs` put the release pairs (default .tools/delta-pairs).
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Small and quick (scripts/test): one synthetic 256 KiB pair.
    #[arg(long)]
    smoke: bool,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Subcommand)]
enum Child {
    /// Builds one delta as the control plane does, in a process of its own so that its
    /// peak RSS is the build's.
    #[command(hide = true)]
    Build {
        old: PathBuf,
        new: PathBuf,
        out: PathBuf,
    },
}

/// One release pair.
struct Pair {
    name: String,
    old: PathBuf,
    new: PathBuf,
}

/// What `/usr/bin/time` saw of one command.
#[derive(Clone, Copy)]
struct Run {
    seconds: f64,
    peak_kib: u64,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} s, {}", self.seconds, mb(self.peak_kib * 1024))
    }
}

/// Runs `cmd` under GNU time; fails with its stderr unless it succeeds.
fn timed(program: &Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<Run> {
    let report = tempfile::NamedTempFile::new()?;
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "-o"])
        .arg(report.path())
        .arg(program)
        .args(args)
        .output()
        .context("/usr/bin/time (Debian package `time`)")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(report.path())?;
    let mut fields = text.split_whitespace();
    let seconds = fields.next().and_then(|s| s.parse().ok());
    let peak_kib = fields.next().and_then(|s| s.parse().ok());
    match (seconds, peak_kib) {
        (Some(seconds), Some(peak_kib)) => Ok(Run { seconds, peak_kib }),
        _ => bail!("cannot read /usr/bin/time's report {text:?}"),
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

fn size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .len())
}

fn mb(bytes: u64) -> String {
    if bytes >= 1_000_000 {
        format!("{:.2} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} KB", bytes as f64 / 1e3)
    }
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<()> {
    if std::fs::read(a)? != std::fs::read(b)? {
        bail!("{} is not {}", a.display(), b.display());
    }
    Ok(())
}

/// A 256 KiB pair shaped like two builds of one program: code moved by an insertion,
/// addresses shifted by a few bytes, a new section.
fn synthetic_pair(dir: &Path) -> anyhow::Result<Pair> {
    let mut rng = fastrand::Rng::with_seed(16);
    let words: Vec<u32> = (0..64).map(|_| rng.u32(..)).collect();
    let old: Vec<u8> = (0..64 * 1024)
        .flat_map(|_| {
            words[rng.usize(..words.len())]
                .wrapping_add(rng.u32(..4))
                .to_le_bytes()
        })
        .collect();
    let mut new = old[..100_000].to_vec();
    new.extend((0..3_000).map(|_| rng.u8(..)));
    new.extend(old[100_000..].chunks(4).flat_map(|w| {
        let mut w = w.to_vec();
        w[0] = w[0].wrapping_add(12);
        w
    }));
    let (o, n) = (dir.join("synthetic-1"), dir.join("synthetic-2"));
    std::fs::write(&o, old)?;
    std::fs::write(&n, new)?;
    Ok(Pair {
        name: "synthetic".into(),
        old: o,
        new: n,
    })
}

/// Figures of one pair.
struct Figures {
    pair: String,
    old: u64,
    new: u64,
    wire: u64,
    bundle: u64,
    anchors: Vec<(&'static str, u64)>,
    build: Run,
    bsdiff: Run,
    apply: Run,
    apply_idle: Run,
    bspatch: Run,
}

fn measure(ws: &Workspace, pair: &Pair, anchors: &Path) -> anyhow::Result<Figures> {
    let dir = ws.path(&pair.name);
    std::fs::create_dir_all(&dir)?;
    let out = |name: &str| dir.join(name);
    let (old, new) = (pair.old.as_os_str(), pair.new.as_os_str());

    let payload = out("aviary.delta");
    let build = timed(
        &std::env::current_exe()?,
        &[os("build"), old, new, payload.as_os_str()],
    )?;

    let bundle = |version: &str, file: &Path, base: Option<&Path>| -> anyhow::Result<PathBuf> {
        let path = out(&format!("{version}.bundle"));
        ws.bundle(&pair.name, version, file, base, &path)?;
        Ok(path)
    };
    let base_bundle = bundle("1.0.0", &pair.old, None)?;
    let delta_bundle = bundle("2.0.0", &pair.new, Some(&pair.old))?;
    let tiny = out("tiny");
    std::fs::write(&tiny, [7u8; 1024])?;
    let tiny_bundle = bundle("0.0.1", &tiny, None)?;

    let bsdiff_patch = out("bsdiff.patch");
    let bsdiff = timed(
        &anchors.join("bsdiff"),
        &[old, new, bsdiff_patch.as_os_str()],
    )?;
    let bsdiff_new = out("bspatch.out");
    let bspatch = timed(
        &anchors.join("bspatch"),
        &[old, bsdiff_new.as_os_str(), bsdiff_patch.as_os_str()],
    )?;
    same_file(&bsdiff_new, &pair.new)?;

    let from = format!("--patch-from={}", pair.old.display());
    let zstd19 = out("zstd19.zst");
    let zstd22 = out("zstd22.zst");
    for (level, path) in [(&["-19"][..], &zstd19), (&["--ultra", "-22"][..], &zstd22)] {
        let o = Command::new("zstd")
            .args(["-q", "-f", "--long"])
            .args(level)
            .arg(&from)
            .arg(&pair.new)
            .arg("-o")
            .arg(path)
            .output()
            .context("zstd")?;
        if !o.status.success() {
            bail!("zstd: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
    }
    let xdelta = out("xdelta3.vcdiff");
    let o = Command::new(anchors.join("xdelta3"))
        .args(["-9", "-f", "-e", "-s"])
        .arg(&pair.old)
        .arg(&pair.new)
        .arg(&xdelta)
        .output()
        .context("xdelta3")?;
    if !o.status.success() {
        bail!("xdelta3: {}", String::from_utf8_lossy(&o.stderr).trim());
    }

    let edge = bin("aviary-edge")?;
    let apply = |state: &str, bundle: &Path| {
        let state = out(state);
        timed(
            &edge,
            &[
                os("apply"),
                os("--arch"),
                os("x86_64"),
                os("--state-dir"),
                state.as_os_str(),
                os("--certs"),
                ws.pki.dir.as_os_str(),
                bundle.as_os_str(),
            ],
        )
    };
    apply("state", &base_bundle)?;
    let applied = apply("state", &delta_bundle)?;
    let apply_idle = apply("idle-state", &tiny_bundle)?;
    let installed = installed(&out("state"), &pair.name)?;
    same_file(&installed, &pair.new)?;

    Ok(Figures {
        pair: pair.name.clone(),
        old: size(&pair.old)?,
        new: size(&pair.new)?,
        wire: size(&payload)?,
        bundle: size(&delta_bundle)?,
        anchors: vec![
            ("C bsdiff 4.3", size(&bsdiff_patch)?),
            ("zstd -19 --long --patch-from", size(&zstd19)?),
            ("zstd --ultra -22 --long --patch-from", size(&zstd22)?),
            ("xdelta3 -9", size(&xdelta)?),
        ],
        build,
        bsdiff,
        apply: applied,
        apply_idle,
        bspatch,
    })
}

/// The artifact `aviary-edge apply` made current for `module`.
fn installed(state: &Path, module: &str) -> anyhow::Result<PathBuf> {
    let dir = state.join("modules").join(module);
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    let id = st["current"]["id"].as_str().context("no current slot")?;
    Ok(dir.join("slots").join(id).join("artifact"))
}

fn child(build: Child) -> anyhow::Result<()> {
    let Child::Build { old, new, out } = build;
    let old = std::fs::read(&old).with_context(|| old.display().to_string())?;
    let new = std::fs::read(&new).with_context(|| new.display().to_string())?;
    let bytes = delta::write_delta_owned(old, new, delta::LEVEL, Vec::new())?;
    std::fs::write(&out, bytes).with_context(|| out.display().to_string())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(build) = args.child {
        return child(build);
    }
    let anchors = tools_dir().join("anchors/usr/bin");
    let ws = Workspace::new()?;
    let pairs = if args.smoke {
        vec![synthetic_pair(ws.dir.path())?]
    } else {
        let dir = args
            .pairs
            .unwrap_or_else(|| tools_dir().join("delta-pairs"));
        [
            ("esbuild", "0.24.1", "0.24.2"),
            ("ruff", "0.17.5", "0.17.6"),
        ]
        .into_iter()
        .map(|(name, a, b)| Pair {
            name: name.into(),
            old: dir.join(format!("{name}-{a}")),
            new: dir.join(format!("{name}-{b}")),
        })
        .collect()
    };
    println!(
        "aviary-delta-bench: payload level {}, {} cores",
        delta::LEVEL,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut all = Vec::new();
    for pair in &pairs {
        all.push(measure(&ws, pair, &anchors).with_context(|| pair.name.clone())?);
    }

    println!();
    println!("| pair | old → new | Aviary wire | Aviary bundle | C bsdiff 4.3 | zstd -19 --long | zstd --ultra -22 --long | xdelta3 -9 |");
    println!("|---|---|---|---|---|---|---|---|");
    for f in &all {
        let best = f.anchors.iter().map(|a| a.1).min().unwrap_or(1).max(1);
        let cell = |bytes: u64| format!("{} ({:.3}×)", mb(bytes), bytes as f64 / best as f64);
        let anchors: Vec<String> = f.anchors.iter().map(|a| cell(a.1)).collect();
        println!(
            "| {} | {} → {} | **{}** | **{}** | {} |",
            f.pair,
            mb(f.old),
            mb(f.new),
            cell(f.wire),
            cell(f.bundle),
            anchors.join(" | ")
        );
    }
    println!("\nRatios are to the smallest anchor of the row.");

    println!();
    println!(
        "| pair | Aviary build | C bsdiff build | Aviary apply (idle apply) | C bspatch apply |"
    );
    println!("|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {} | {} | {} ({}) | {} |",
            f.pair, f.build, f.bsdiff, f.apply, f.apply_idle, f.bspatch
        );
    }
    println!();
    // A process's own few MiB dominate below this; the budgets are about artifacts.
    for f in all.iter().filter(|f| f.old >= 8 << 20) {
        let budget = 9 * f.old + f.new;
        let build = f.build.peak_kib * 1024;
        let above = f.apply.peak_kib.saturating_sub(f.apply_idle.peak_kib) * 1024;
        println!(
            "{}: build peak {} = {:.2} × old ({} under 9 × old + new = {}); apply peak {} above idle ({} the 16 MiB bound)",
            f.pair,
            mb(build),
            build as f64 / f.old as f64,
            if build <= budget { "is" } else { "is NOT" },
            mb(budget),
            mb(above),
            if above <= 16 << 20 { "within" } else { "OVER" },
        );
    }
    Ok(())
}
