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
            // From a file: the script is longer than one argument may be.
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("aviary.bash");
            std::fs::write(&file, &script)?;
            let checked = Command::new("bash")
                .arg("-n")
                .arg(&file)
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

#[tokio::test]
async fn a_retried_mutation_with_its_request_id_lands_once_even_across_a_kill9(
) -> anyhow::Result<()> {
    use aviary_proto::v1 as pb;
    use tonic_types::StatusExt;

    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let artifact = ws.path("model.bin");
    std::fs::write(&artifact, b"model 1")?;
    for version in ["1.0.0", "1.1.0"] {
        let args = ws.release_args("upload", "model", version, "x86_64", &artifact);
        cp.cli(&ws, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    let create = |version: &str| pb::CreateRolloutRequest {
        module: "model".into(),
        version: version.into(),
        steps: vec![pb::Step {
            kind: Some(pb::step::Kind::Pause(pb::Pause { seconds: 0 })),
        }],
        request_id: "create-1".into(),
        ..Default::default()
    };
    let mut admin = ws.admin(&cp).await?;
    let first = admin
        .rollouts
        .create_rollout(create("1.0.0"))
        .await?
        .into_inner();
    let again = admin
        .rollouts
        .create_rollout(create("1.0.0"))
        .await?
        .into_inner();
    assert_eq!(
        again.id, first.id,
        "the retry is answered with the first rollout"
    );

    // The same id for another request is refused, naming the field.
    let refused = admin
        .rollouts
        .create_rollout(create("1.1.0"))
        .await
        .expect_err("another request under the same id");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let fields: Vec<String> = refused
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["request_id"], "{refused:?}");

    // A crash right after: the id was committed with the rollout.
    cp.kill9().await?;
    cp.restart().await?;
    let mut admin = ws.admin(&cp).await?;
    let after = admin
        .rollouts
        .create_rollout(create("1.0.0"))
        .await?
        .into_inner();
    assert_eq!(after.id, first.id);
    assert_eq!(cp.events(&ws, "rollout.created").await?.len(), 1);

    // The CLI: a command run again with the same --request-id is answered, not redone
    // (a second abort without one is refused: the rollout is no longer in progress).
    let abort = [
        "--request-id",
        "ops-42",
        "-o",
        "json",
        "rollout",
        "abort",
        first.id.as_str(),
    ];
    let once: serde_json::Value = serde_json::from_str(&cp.cli(&ws, &abort)?)?;
    let twice: serde_json::Value = serde_json::from_str(&cp.cli(&ws, &abort)?)?;
    assert_eq!(once["state"], "ROLLOUT_STATE_ABORTED");
    assert_eq!(once, twice);
    assert!(cp
        .cli(&ws, &["rollout", "abort", first.id.as_str()])
        .is_err());
    assert_eq!(cp.events(&ws, "rollout.aborted").await?.len(), 1);

    // SetWeight: the retry gets the first answer, audit number included.
    let weight = pb::SetWeightRequest {
        module: "model".into(),
        weight: 30,
        request_id: "w-1".into(),
        ..Default::default()
    };
    let w1 = admin.nodes.set_weight(weight.clone()).await?.into_inner();
    let w2 = admin.nodes.set_weight(weight).await?.into_inner();
    assert_eq!(w1, w2);
    assert_eq!(cp.events(&ws, "nodes.set_weight").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_context_names_the_control_plane_and_the_environment_still_wins() -> anyhow::Result<()> {
    let Fleet {
        ws,
        cp,
        edges: _edges,
    } = Fleet::start(1).await?;
    cp.wait_node(&ws, "gw-00", "registered", |_| true).await?;
    let config = ws.path("aviary-config.toml");
    let aviary = |args: &[&str], env: &[(&str, &str)]| -> anyhow::Result<std::process::Output> {
        let mut cmd = Command::new(bin("aviary")?);
        for var in [
            "AVIARY_CONTROL_PLANE",
            "AVIARY_CERTS",
            "AVIARY_ADMIN",
            "AVIARY_CONTEXT",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AVIARY_CONFIG", &config).envs(env.iter().copied());
        Ok(cmd.args(args).output()?)
    };
    let pki = ws.pki.dir.to_string_lossy().into_owned();
    let url = cp.url();
    let set = aviary(
        &["context", "set", "lab", "--url", &url, "--certs-dir", &pki],
        &[],
    )?;
    assert!(set.status.success(), "{set:?}");
    // A context nobody can reach, made current: the environment beats it.
    let dead = aviary(
        &[
            "context",
            "set",
            "dead",
            "--url",
            "https://127.0.0.1:1",
            "--certs-dir",
            &pki,
        ],
        &[],
    )?;
    assert!(dead.status.success(), "{dead:?}");
    assert!(aviary(&["context", "use", "lab"], &[])?.status.success());
    let listed = aviary(&["-o", "name", "nodes", "list"], &[])?;
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "node/gw-00\n",
        "{listed:?}"
    );
    let table = String::from_utf8(aviary(&["context", "list"], &[])?.stdout)?;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with('*') && l.contains("lab")),
        "{table}"
    );

    assert!(aviary(&["context", "use", "dead"], &[])?.status.success());
    assert!(
        !aviary(&["nodes", "list"], &[])?.status.success(),
        "the dead one is current"
    );
    let by_env = aviary(
        &["-o", "name", "nodes", "list"],
        &[("AVIARY_CONTROL_PLANE", &url)],
    )?;
    assert!(by_env.status.success(), "{by_env:?}");
    let by_flag = aviary(&["--context", "lab", "-o", "name", "nodes", "list"], &[])?;
    assert!(by_flag.status.success(), "{by_flag:?}");
    let unknown = aviary(&["--context", "nope", "nodes", "list"], &[])?;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no context \"nope\""));
    Ok(())
}
