//! Daemons cross-built for the gateways' CPUs, run under qemu-user against the x86_64
//! control plane: what a node says it is, which artifact it gets, a delta from the
//! version it runs, a hot swap under load and a rollback on its own. The modules are
//! cross-built too (`aviary-sample-module` for aarch64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use aviary_proto::digest::Sha256;
use aviary_proto::v1 as pb;
use aviary_tests::foreign::{elf_machine, Foreign};
use aviary_tests::{eventually, free_port, ControlPlane, Edge, Fleet, Workspace};

use crate::runtime::{deploy, get, refusal, settled, spec, Hammer};

/// ELF `e_machine` of aarch64 and x86_64.
const EM_AARCH64: u16 = 0xB7;
const EM_X86_64: u16 = 0x3E;

/// The sample module cross-built for `cpu`, stamped as `version`.
fn foreign_sample(ws: &Workspace, cpu: Foreign, version: &str) -> anyhow::Result<PathBuf> {
    let out = ws.path(&format!("sample-{}-{version}", cpu.arch));
    aviary_sample_module::stamp(&cpu.bin("aviary-sample-module")?, version, &out)?;
    Ok(out)
}

/// What a node holds of one module: every slot's artifact, and the current one's.
struct Slots {
    all: Vec<Vec<u8>>,
    current: Option<Vec<u8>>,
}

fn slots(edge: &Edge, module: &str) -> anyhow::Result<Slots> {
    let dir = edge.state_dir.join("modules").join(module);
    let mut all = Vec::new();
    for slot in std::fs::read_dir(dir.join("slots"))?.flatten() {
        if let Ok(bytes) = std::fs::read(slot.path().join("artifact")) {
            all.push(bytes);
        }
    }
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    let current = state["current"]["id"]
        .as_str()
        .and_then(|id| std::fs::read(dir.join("slots").join(id).join("artifact")).ok());
    Ok(Slots { all, current })
}

async fn arch_of(ws: &Workspace, cp: &ControlPlane, node: &str) -> anyhow::Result<String> {
    eventually(
        Duration::from_secs(60),
        &format!("{node} to say hello"),
        || async {
            let n = cp.node(ws, node).await.ok();
            Ok(n.filter(|n| !n.arch.is_empty()).map(|n| n.arch))
        },
    )
    .await
}

#[tokio::test]
async fn an_aarch64_daemon_under_qemu_gets_its_own_artifact_a_delta_a_clean_swap_and_rolls_back(
) -> anyhow::Result<()> {
    let cpu = Foreign::AARCH64;
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    // No --arch: the daemon names itself from the target it was built for.
    let edge = Edge::start_foreign(&ws, &cp, "gw-arm64", &[], &[], cpu).await?;
    assert_eq!(arch_of(&ws, &cp, "gw-arm64").await?, "aarch64");

    // A two-target release of every version: the host build and the aarch64 build.
    let port = free_port()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut arm = Vec::new();
    for (version, args) in [("1.0.0", ""), ("2.0.0", ""), ("3.0.0", "\"--never-ready\"")] {
        let x86 = ws.sample_release(version)?;
        let a64 = foreign_sample(&ws, cpu, version)?;
        assert_eq!(elf_machine(&std::fs::read(&x86)?), Some(EM_X86_64));
        assert_eq!(elf_machine(&std::fs::read(&a64)?), Some(EM_AARCH64));
        cp.upload_release_for(&ws, "sample", version, "x86_64", &x86, &spec(port, args))?;
        cp.upload_release_for(&ws, "sample", version, "aarch64", &a64, &spec(port, args))?;
        arm.push(std::fs::read(&a64)?);
    }
    let mut admin = ws.admin(&cp).await?;

    let r1 = deploy(&mut admin, "sample", "1.0.0").await?;
    let r = settled(&ws, &cp, &r1).await.with_context(|| edge.log())?;
    assert_eq!(
        r.state,
        pb::RolloutState::Succeeded as i32,
        "{r:?}\n{}",
        edge.log()
    );
    eventually(Duration::from_secs(60), "1.0.0 to serve", || async {
        Ok(get(addr).await.ok().filter(|v| v == "1.0.0").map(|_| ()))
    })
    .await?;
    let current = slots(&edge, "sample")?.current;
    assert_eq!(
        current.as_deref().map(Sha256::of),
        Some(Sha256::of(&arm[0])),
        "gw-arm64 does not run the signed aarch64 artifact of 1.0.0"
    );

    // 2.0.0 replaces it under load: a bsdiff delta from the 1.0.0 it runs, no failed request.
    let full = cp
        .metric("aviary_transfer_bytes_total{encoding=\"full_zstd\"}")
        .await?;
    let hammer = Hammer::start(addr, 4);
    hammer.wait_ok(10).await?;
    let r2 = deploy(&mut admin, "sample", "2.0.0").await?;
    hammer.wait_version("2.0.0").await?;
    let r = settled(&ws, &cp, &r2).await?;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    hammer.finish(20).await?;
    let delta = cp
        .metric("aviary_transfer_bytes_total{encoding=\"bsdiff_zstd\"}")
        .await?;
    assert!(
        delta > 0.0,
        "2.0.0 did not travel as a delta:\n{}",
        cp.log()
    );
    assert!(
        delta < arm[1].len() as f64 / 10.0,
        "{delta} delta bytes for a {} byte artifact",
        arm[1].len()
    );
    assert_eq!(
        cp.metric("aviary_transfer_bytes_total{encoding=\"full_zstd\"}")
            .await?,
        full,
        "a full payload went out for 2.0.0"
    );
    let current = slots(&edge, "sample")?.current;
    assert_eq!(
        current.as_deref().map(Sha256::of),
        Some(Sha256::of(&arm[1]))
    );

    // 3.0.0 never becomes ready: the daemon goes back to 2.0.0 by itself.
    let r3 = deploy(&mut admin, "sample", "3.0.0").await?;
    let node = refusal(&ws, &cp, "gw-arm64")
        .await
        .with_context(|| edge.log())?;
    assert!(
        node.nack_error.contains("rolled back locally to 2.0.0"),
        "{node:?}"
    );
    assert_eq!(get(addr).await?, "2.0.0");
    let r = settled(&ws, &cp, &r3).await?;
    assert_eq!(r.state, pb::RolloutState::Failed as i32, "{r:?}");

    // Nothing built for another CPU ever reached the node's disk.
    let all = slots(&edge, "sample")?.all;
    assert!(!all.is_empty());
    for bytes in &all {
        assert_eq!(
            elf_machine(bytes),
            Some(EM_AARCH64),
            "a foreign artifact in a slot"
        );
    }
    Ok(())
}

#[tokio::test]
async fn armv7_and_riscv64_daemons_under_qemu_connect_and_serve_their_weights() -> anyhow::Result<()>
{
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let mut edges = Vec::new();
    for cpu in [Foreign::ARMV7, Foreign::RISCV64] {
        let node = format!("gw-{}", cpu.arch);
        let edge = Edge::start_foreign(&ws, &cp, &node, &[("cpu", cpu.arch)], &[], cpu).await?;
        assert_eq!(arch_of(&ws, &cp, &node).await?, cpu.arch);
        edges.push(edge);
    }
    let mut admin = ws.admin(&cp).await?;
    for (selector, weight) in [("cpu=armv7", 30), ("cpu=riscv64", 70)] {
        admin.set_weight("gateway", weight, selector).await?;
    }
    // GET /v1/weights from the emulated daemons, and their weights.json.
    edges[0].wait_weight("gateway", 30).await?;
    edges[1].wait_weight("gateway", 70).await?;
    Ok(())
}
