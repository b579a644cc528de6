//! The CLI speaks the contract: its `-o json` is byte for byte what grpcurl prints for the
//! same call, for every get and list; `-o yaml`, `-o name` and completion work.

use std::process::Command;

use anyhow::Context;
use aviary_tests::{bin, free_port, Daemon, Edge, Fleet};

use crate::tools::{grpcurl, run, tls_args};

#[tokio::test]
async fn the_cli_json_of_every_get_and_list_is_what_grpcurl_prints() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let mut edges = Vec::new();
    for (id, region) in [("gw-1", "eu"), ("gw-2", "us")] {
        let edge = Edge::start(&ws, &cp, id, &[("region", region)], &["--arch", "x86_64"]).await?;
        // Each node's module on its own port (two daemons, one machine).
        let port = free_port()?.port();
        let overlay = ws.path(&format!("{id}.toml"));
        std::fs::write(&overlay, format!("args = [\"--port\", \"{port}\"]\n"))?;
        let file = overlay.to_string_lossy().into_owned();
        cp.cli(
            &ws,
            &[
                "config", "set", "--module", "sample", "--node", id, "--file", &file,
            ],
        )?;
        edges.push(edge);
    }
    let v1 = ws.sample_release("1.0.0")?;
    cp.upload_release(&ws, "sample", "1.0.0", &v1, "ready_timeout = \"10s\"\n")?;
    let id = cp.create_rollout(&ws, &["--module", "sample", "--version", "1.0.0"])?;
    cp.wait_rollout_end(&ws, &id).await?;
    cp.cli(
        &ws,
        &[
            "nodes",
            "set-weight",
            "--module",
            "sample",
            "--weight",
            "40",
            "--selector",
            "region=eu",
        ],
    )?;
    // A still fleet: reports and heartbeats stop moving once the daemons are gone.
    for e in &mut edges {
        e.terminate().await?;
    }
    for e in &edges {
        cp.wait_node(&ws, &e.node_id, "offline", |n| !n.connected)
            .await?;
    }

    let g = grpcurl()?;
    let addr = cp.addr.to_string();
    let grpcurl = |method: &str, body: &str| {
        run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
            "-d",
            body,
            &addr,
            &format!("aviary.v1.{method}"),
        ]))
    };
    let pairs: [(&str, &str, &[&str]); 10] = [
        ("Nodes/ListNodes", "{}", &["nodes", "list"]),
        (
            "Nodes/ListNodes",
            r#"{"selector":"region=eu"}"#,
            &["nodes", "list", "--selector", "region=eu"],
        ),
        (
            "Nodes/GetNode",
            r#"{"nodeId":"gw-1"}"#,
            &["nodes", "get", "gw-1"],
        ),
        ("Releases/ListReleases", "{}", &["release", "list"]),
        (
            "Releases/GetRelease",
            r#"{"module":"sample","version":"1.0.0"}"#,
            &["release", "get", "sample", "1.0.0"],
        ),
        ("Rollouts/ListRollouts", "{}", &["rollout", "list"]),
        (
            "Rollouts/GetRollout",
            &format!(r#"{{"id":"{id}"}}"#),
            &["rollout", "get", &id],
        ),
        ("Configs/ListConfigs", "{}", &["config", "list"]),
        (
            "Configs/GetConfig",
            r#"{"module":"sample","nodeId":"gw-2"}"#,
            &["config", "get", "--module", "sample", "--node", "gw-2"],
        ),
        ("Audit/ListEvents", "{}", &["events"]),
    ];
    for (method, body, args) in pairs {
        let want = grpcurl(method, body)?;
        let mut cli = vec!["-o", "json"];
        cli.extend(args);
        let got = cp.cli(&ws, &cli)?;
        assert_eq!(
            got,
            want,
            "aviary {} differs from grpcurl {method}",
            args.join(" ")
        );
        assert!(want.len() > 20, "{method} said little: {want}");
    }
    // What the inventory says made it through both.
    let node: serde_json::Value =
        serde_json::from_str(&grpcurl("Nodes/GetNode", r#"{"nodeId":"gw-1"}"#)?)?;
    assert_eq!(node["modules"][0]["version"], "1.0.0", "{node}");
    assert_eq!(node["modules"][0]["health"], "HEALTH_UNKNOWN", "{node}");

    // YAML: the same document.
    let yaml = cp.cli(&ws, &["-o", "yaml", "nodes", "get", "gw-1"])?;
    assert!(yaml.starts_with("nodeId: gw-1\n"), "{yaml}");
    assert!(
        yaml.contains("\n  region: eu\n") && yaml.contains("  - name: sample\n"),
        "{yaml}"
    );
    // Names, as kubectl prints them.
    assert_eq!(
        cp.cli(&ws, &["-o", "name", "nodes", "list"])?,
        "node/gw-1\nnode/gw-2\n"
    );
    assert_eq!(
        cp.cli(&ws, &["-o", "name", "rollout", "list"])?,
        format!("rollout/{id}\n")
    );
    // Wide: more columns, and the module at a glance in both.
    let table = cp.cli(&ws, &["nodes", "list"])?;
    assert!(table.contains("sample 1.0.0 unknown"), "{table}");
    let wide = cp.cli(&ws, &["-o", "wide", "nodes", "list"])?;
    assert!(
        wide.contains("HEARTBEAT") && wide.contains("sample=40"),
        "{wide}"
    );
    Ok(())
}

#[test]
fn completion_scripts_parse_in_their_shells() -> anyhow::Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let script = run(Command::new(bin("aviary")?).args(["completion", shell]))?;
        assert!(script.contains("aviary"), "{shell}: {script}");
        if shell == "bash" {
            let checked = Command::new("bash")
                .args(["-n", "-c", &script])
                .output()
                .context("bash")?;
            assert!(
                checked.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }
    Ok(())
}
