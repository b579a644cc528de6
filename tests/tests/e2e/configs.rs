//! Runtime config layers: base → overlay (selector) → node, delivered on the fleet stream,
//! applied by swapping the module, refused (NACK) when the module cannot run with them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use aviary_proto::v1 as pb;
use aviary_tests::{eventually, free_port, http_get, ControlPlane, Edge, Fleet, Workspace};

/// The module's `GET /greeting` on `addr` (its `SAMPLE_GREETING`), if it answers.
async fn greeting(addr: SocketAddr) -> Option<String> {
    http_get(addr, "/greeting")
        .await
        .ok()
        .map(|b| b.trim().to_owned())
}

/// The node's view of `module`'s config, from GetNode.
async fn config_of(
    ws: &Workspace,
    cp: &ControlPlane,
    node: &str,
    module: &str,
) -> anyhow::Result<Option<pb::NodeConfig>> {
    Ok(cp
        .node(ws, node)
        .await?
        .configs
        .into_iter()
        .find(|c| c.module == module))
}

/// `aviary config set --module sample LAYER... --file` with `toml`.
fn set(ws: &Workspace, cp: &ControlPlane, layer: &[&str], toml: &str) -> anyhow::Result<String> {
    let file = ws.path(&format!("overlay-{}.toml", fastrand::u32(..)));
    std::fs::write(&file, toml)?;
    let mut args = vec!["config", "set", "--module", "sample"];
    args.extend_from_slice(layer);
    let file = file.to_string_lossy().into_owned();
    args.extend(["--file", &file]);
    cp.cli(ws, &args)
}

/// A node layer giving the module its own port and probe (three daemons, one machine).
fn own_port(port: u16, extra_args: &str) -> String {
    format!(
        "args = [\"--port\", \"{port}\"{extra_args}]\n[[probe]]\nhttp = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"200ms\"\n"
    )
}

#[tokio::test]
async fn an_overlay_reaches_exactly_its_selector_and_a_refused_config_leaves_the_old_one_running(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let nodes = [("gw-1", "eu"), ("gw-2", "eu"), ("gw-3", "us")];
    let mut edges = Vec::new();
    let mut ports = Vec::new();
    for (id, region) in nodes {
        edges.push(Edge::start(&ws, &cp, id, &[("region", region)], &["--arch", "x86_64"]).await?);
        ports.push(free_port()?.port());
    }
    let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));

    // Node layers first: each daemon learns its module's port before the module exists.
    for (i, (id, _)) in nodes.iter().enumerate() {
        let out = set(&ws, &cp, &["--node", id], &own_port(ports[i], ""))?;
        assert!(out.contains("covers 1 node"), "{out}");
    }
    let v1 = ws.sample_release("1.0.0")?;
    cp.upload_release(
        &ws,
        "sample",
        "1.0.0",
        &v1,
        "ready_timeout = \"10s\"\nlog_patterns = [\"ERROR\"]\noverlay_env = [\"SAMPLE_GREETING\"]\n",
    )?;
    // Variables the signed run spec does not list are refused by name (an allow-list).
    let refused = set(
        &ws,
        &cp,
        &["--selector", "region=eu"],
        "env = { SAMPLE_OTHER = \"x\", GCONV_PATH = \"/tmp\", SAMPLE_GREETING = \"ok\" }\n",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        refused.contains("env.GCONV_PATH, env.SAMPLE_OTHER") && refused.contains("overlay_env"),
        "{refused}"
    );
    cp.cli(
        &ws,
        &[
            "rollout",
            "create",
            "--module",
            "sample",
            "--version",
            "1.0.0",
        ],
    )?;
    for (i, edge) in edges.iter().enumerate() {
        eventually(
            Duration::from_secs(30),
            "the module to serve on its node's port",
            || async { Ok(greeting(addr(i)).await.filter(|g| g == "hello")) },
        )
        .await
        .with_context(|| edge.log())?;
    }
    let us_before = config_of(&ws, &cp, "gw-3", "sample")
        .await?
        .context("gw-3 config")?;

    // The eu overlay: exactly gw-1 and gw-2 swap to it; gw-3 is not even sent anything.
    let out = set(
        &ws,
        &cp,
        &["--selector", "region=eu"],
        "env = { SAMPLE_GREETING = \"hallo\" }\n",
    )?;
    assert!(out.contains("covers 2 node"), "{out}");
    for (i, edge) in edges.iter().enumerate().take(2) {
        eventually(
            Duration::from_secs(20),
            "the eu nodes to run the overlay",
            || async { Ok(greeting(addr(i)).await.filter(|g| g == "hallo")) },
        )
        .await
        .with_context(|| edge.log())?;
    }
    let c = eventually(Duration::from_secs(10), "gw-1 to acknowledge", || async {
        Ok(config_of(&ws, &cp, "gw-1", "sample")
            .await?
            .filter(|c| c.acked_revision == c.desired_revision))
    })
    .await?;
    assert_eq!(c.sources["env.SAMPLE_GREETING"], "selector region=eu (v1)");
    assert_eq!(c.sources["args"], "node gw-1 (v1)");
    assert_eq!(c.layers, ["selector region=eu (v1)", "node gw-1 (v1)"]);
    let overlay = c.overlay.context("merged overlay")?;
    assert_eq!(overlay.env["SAMPLE_GREETING"], "hallo");
    assert_eq!(greeting(addr(2)).await.as_deref(), Some("hello"));
    let us_after = config_of(&ws, &cp, "gw-3", "sample")
        .await?
        .context("gw-3 config")?;
    assert_eq!(
        us_after.desired_revision, us_before.desired_revision,
        "gw-3 was touched"
    );

    // The CLI shows the merge with the source of each value.
    let json = cp.cli(
        &ws,
        &[
            "-o", "json", "config", "get", "--module", "sample", "--node", "gw-2",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(
        v["sources"]["env.SAMPLE_GREETING"], "selector region=eu (v1)",
        "{v}"
    );
    assert_eq!(v["overlay"]["env"]["SAMPLE_GREETING"], "hallo", "{v}");

    // A probe port out of range never leaves the control plane.
    let err = set(
        &ws,
        &cp,
        &["--node", "gw-2"],
        "[[probe]]\ntcp = \"127.0.0.1:70000\"\n",
    )
    .expect_err("refused");
    assert!(format!("{err:#}").contains("probe.tcp"), "{err:#}");

    // A config the module cannot run with: gw-2 probes a port nobody listens on. The new
    // process never becomes ready, the old config keeps serving, the node NACKs, and the
    // revision is parked (not resent).
    let closed = free_port()?.port();
    let bad = format!(
        "args = [\"--port\", \"{}\"]\n[[probe]]\ntcp = \"127.0.0.1:{closed}\"\n",
        ports[1]
    );
    set(&ws, &cp, &["--node", "gw-2"], &bad)?;
    let refused = eventually(
        Duration::from_secs(30),
        "gw-2 to refuse its config",
        || async {
            Ok(config_of(&ws, &cp, "gw-2", "sample")
                .await?
                .filter(|c| c.nacked_revision > 0 && c.nacked_revision == c.desired_revision))
        },
    )
    .await
    .with_context(|| edges[1].log())?;
    assert!(
        refused.nack_error.contains("not ready")
            && refused.nack_error.contains("previous config keeps running"),
        "{refused:?}"
    );
    assert!(refused.acked_revision < refused.desired_revision);
    // The module binds its port itself here (no shared socket), so the old process may
    // be between restarts at the instant the NACK lands; it serves again within seconds.
    eventually(
        Duration::from_secs(10),
        "the old config to serve",
        || async { Ok((greeting(addr(1)).await.as_deref() == Some("hallo")).then_some(())) },
    )
    .await?;
    assert_eq!(http_get(addr(1), "/healthz").await?.trim(), "ok");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nacks = cp.events(&ws, "fleet.nack").await?;
    assert_eq!(
        nacks
            .iter()
            .filter(|e| e.detail.contains("config of sample"))
            .count(),
        1,
        "a refused config is parked, not resent: {nacks:?}"
    );

    // A good node layer replaces it; then the node restarts from its state dir with the
    // config it acknowledged, control plane or not.
    set(&ws, &cp, &["--node", "gw-2"], &own_port(ports[1], ""))?;
    eventually(
        Duration::from_secs(20),
        "gw-2 to take the fixed config",
        || async {
            Ok(config_of(&ws, &cp, "gw-2", "sample")
                .await?
                .filter(|c| c.acked_revision == c.desired_revision))
        },
    )
    .await?;
    edges[0].restart().await?;
    eventually(
        Duration::from_secs(20),
        "gw-1 to serve the overlay after a restart",
        || async { Ok(greeting(addr(0)).await.filter(|g| g == "hallo")) },
    )
    .await
    .with_context(|| edges[0].log())?;

    // Deleting the overlay takes its nodes back to the layers below.
    cp.cli(
        &ws,
        &[
            "config",
            "delete",
            "--module",
            "sample",
            "--selector",
            "region=eu",
        ],
    )?;
    eventually(
        Duration::from_secs(20),
        "gw-1 back to the default greeting",
        || async { Ok(greeting(addr(0)).await.filter(|g| g == "hello")) },
    )
    .await?;
    let set_events = cp.events(&ws, "configs.").await?;
    assert_eq!(set_events.len(), 7, "{set_events:?}");
    Ok(())
}
