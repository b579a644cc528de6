//! Short-lived node certificates: renewed on the fleet stream without dropping it, taken
//! back through enrollment after expiry, and never renewed for a revoked node.

use std::path::Path;
use std::time::{Duration, Instant};

use aviary_proto::v1 as pb;
use aviary_tests::{eventually, ControlPlane, Daemon, Edge, Workspace};

use crate::enrollment::create_token;

/// Audit events of `node` with `action`.
async fn node_events(
    cp: &ControlPlane,
    ws: &Workspace,
    node: &str,
    action: &str,
) -> anyhow::Result<Vec<pb::Event>> {
    let mut admin = ws.admin(cp).await?;
    Ok(admin
        .audit
        .list_events(pb::ListEventsRequest {
            filter: Some(pb::EventFilter {
                node_id: node.into(),
                action: action.into(),
                ..Default::default()
            }),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

/// Starts `node` with its own certs dir; it enrolls with `token`.
async fn enrolled_edge(
    ws: &Workspace,
    cp: &ControlPlane,
    node: &str,
    token: &str,
) -> anyhow::Result<(Edge, std::path::PathBuf)> {
    let certs = ws.gateway_certs(node)?;
    let arg = certs.display().to_string();
    let edge = Edge::start(
        ws,
        cp,
        node,
        &[],
        &["--certs", &arg, "--enroll-token", token],
    )
    .await?;
    Ok((edge, certs))
}

/// Unix ms when the certificate in `certs` for `node` ends.
fn not_after_ms(certs: &Path, node: &str) -> anyhow::Result<u64> {
    use rustls::pki_types::pem::PemObject;
    let der =
        rustls::pki_types::CertificateDer::from_pem_file(certs.join(format!("edge-{node}.pem")))?;
    Ok(aviary_certs::validity_ms(der.as_ref())?.1)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 20 daemons with 30-second certificates for 5 minutes (`AVIARY_RENEWAL_SECONDS`): each
/// renews at least 8 times (scaled to the run), no stream is dropped, no ACK is lost.
#[tokio::test]
async fn twenty_daemons_renew_thirty_second_certificates_without_dropping_a_stream(
) -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("AVIARY_RENEWAL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--node-cert-ttl", "30s"]).await?;
    let token = create_token(&cp, &ws, &["--uses", "20", "--ttl", "1h"])?;
    let mut edges = Vec::new();
    for i in 0..20 {
        edges.push(
            enrolled_edge(&ws, &cp, &format!("gw-{i:02}"), &token)
                .await?
                .0,
        );
    }
    for e in &edges {
        e.wait_connected().await?;
    }
    let start = Instant::now();
    let mut weight = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        weight += 1;
        let w = weight.to_string();
        cp.cli(
            &ws,
            &["nodes", "set-weight", "--module", "app", "--weight", &w],
        )?;
        tokio::time::sleep(Duration::from_secs(10).min(Duration::from_secs(seconds))).await;
    }
    for e in &edges {
        e.wait_weight("app", weight).await?;
    }
    let minimum = (seconds * 8 / 300).max(1) as usize;
    for e in &edges {
        let node = eventually(Duration::from_secs(30), "every ACK recorded", || async {
            let n = cp.node(&ws, &e.node_id).await?;
            Ok((n.acked_revision == n.desired_revision).then_some(n))
        })
        .await?;
        assert!(node.connected, "{} is not connected", e.node_id);
        let renewals = node_events(&cp, &ws, &e.node_id, "cert.renewed")
            .await?
            .len();
        assert!(
            renewals >= minimum,
            "{} renewed {renewals} times",
            e.node_id
        );
    }
    // One stream each, ever: none was dropped by a renewal.
    assert_eq!(cp.metric("aviary_streams_admitted_total").await?, 20.0);
    Ok(())
}

/// A daemon stopped past its certificate's end comes back through the policy it enrolled
/// under: with its token (one more use), or, enrolled by approval, with the same key.
#[tokio::test]
async fn a_daemon_stopped_past_its_expiry_enrolls_again_by_its_policy() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--node-cert-ttl", "10s"]).await?;
    let token = create_token(&cp, &ws, &["--uses", "2", "--ttl", "1h"])?;
    let (mut edge, certs) = enrolled_edge(&ws, &cp, "gw-t", &token).await?;
    edge.wait_connected().await?;
    edge.terminate().await?;
    let end = not_after_ms(&certs, "gw-t")?;
    eventually(
        Duration::from_secs(30),
        "the certificate to expire",
        || async { Ok((now_ms() > end + 1000).then_some(())) },
    )
    .await?;
    edge.restart().await?;
    edge.wait_connected().await?;
    assert!(not_after_ms(&certs, "gw-t")? > end);
    assert_eq!(
        node_events(&cp, &ws, "gw-t", "enroll.issued").await?.len(),
        2
    );
    let tokens = cp.cli(&ws, &["enroll-token", "list"])?;
    assert!(tokens.contains("2/2"), "{tokens}");
    Ok(())
}

/// A revoked node is refused at the handshake whatever certificate it holds, cannot
/// enroll again with its key, and its serials are listed.
#[tokio::test]
async fn a_revoked_node_is_refused_at_the_handshake_and_cannot_enroll_again() -> anyhow::Result<()>
{
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--node-cert-ttl", "1h"]).await?;
    let token = create_token(&cp, &ws, &["--uses", "5", "--ttl", "1h"])?;
    let (edge, certs) = enrolled_edge(&ws, &cp, "gw-r", &token).await?;
    edge.wait_connected().await?;
    cp.cli(&ws, &["nodes", "revoke", "gw-r"])?;
    eventually(Duration::from_secs(30), "the refused handshake", || async {
        Ok(cp
            .events(&ws, "auth.handshake_refused")
            .await?
            .iter()
            .any(|e| e.detail.contains("node gw-r is revoked"))
            .then_some(()))
    })
    .await?;
    let listed = cp.cli(&ws, &["-o", "json", "nodes", "revocations"])?;
    let v: serde_json::Value = serde_json::from_str(&listed)?;
    let serial = v["revocations"][0]["serials"][0]["serial"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(v["revocations"][0]["nodeId"], "gw-r");
    assert_eq!(serial.len(), 32, "{listed}");
    // Its key cannot come back by token either.
    let out = std::process::Command::new(aviary_tests::bin("aviary-edge")?)
        .args(["enroll", "--control-plane", &cp.url(), "--certs"])
        .arg(&certs)
        .args(["--node-id", "gw-r", "--enroll-token", &token])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    assert!(!node_events(&cp, &ws, "gw-r", "enroll.refused")
        .await?
        .is_empty());
    Ok(())
}

/// `aviary-certs ARGS...`, which must succeed; its stdout.
fn certs_tool(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(aviary_tests::bin("aviary-certs")?)
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "aviary-certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn cas_in(certs: &Path) -> usize {
    std::fs::read_to_string(certs.join("ca.pem"))
        .unwrap_or_default()
        .matches("BEGIN CERTIFICATE")
        .count()
}

/// A CA rotation over 20 connected daemons with 30-second certificates: the new CA
/// joins the bundle every gateway is sent, renewals move every node onto it, the old CA
/// is retired, and no stream is dropped on the way; the end state takes new handshakes.
#[tokio::test]
async fn a_ca_rotation_over_twenty_daemons_moves_every_node_to_the_new_ca() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let mut cp = ControlPlane::start(&ws, &["--node-cert-ttl", "30s"]).await?;
    let token = create_token(&cp, &ws, &["--uses", "20", "--ttl", "1h"])?;
    let mut edges = Vec::new();
    for i in 0..20 {
        edges.push(enrolled_edge(&ws, &cp, &format!("gw-{i:02}"), &token).await?);
    }
    for (e, _) in &edges {
        e.wait_connected().await?;
    }
    let pki = ws.pki.dir.display().to_string();
    let out = certs_tool(&["ca", "rotate", "--dir", &pki])?;
    let new_ca = out.trim().rsplit(' ').next().unwrap_or_default().to_owned();
    eventually(
        Duration::from_secs(60),
        "every gateway to trust both CAs",
        || async { Ok(edges.iter().all(|(_, c)| cas_in(c) == 2).then_some(())) },
    )
    .await?;
    certs_tool(&["ca", "server", "--dir", &pki])?;
    // The default admin certificate is the old CA's: one from the new CA for afterwards.
    certs_tool(&["admin", "--dir", &pki, "--name", "ops"])?;
    let status = |cp: &ControlPlane| -> anyhow::Result<serde_json::Value> {
        let out = cp.cli(&ws, &["--admin", "ops", "-o", "json", "ca", "status"])?;
        Ok(serde_json::from_str(&out)?)
    };
    eventually(
        Duration::from_secs(90),
        "every node on the new CA",
        || async {
            let s = status(&cp)?;
            Ok((s["issuingCa"] == new_ca.as_str()
                && s["nodesOnIssuingCa"] == 20
                && s["nodesOnOlderCa"].is_null())
            .then_some(()))
        },
    )
    .await?;
    certs_tool(&["ca", "retire", "--dir", &pki])?;
    eventually(
        Duration::from_secs(60),
        "every gateway to drop the old CA",
        || async { Ok(edges.iter().all(|(_, c)| cas_in(c) == 1).then_some(())) },
    )
    .await?;
    let s = status(&cp)?;
    assert_eq!(s["trustedCas"], serde_json::json!([new_ca]));
    // Not one stream was dropped by the rotation.
    assert_eq!(cp.metric("aviary_streams_admitted_total").await?, 20.0);
    // Each step was a reload, audited.
    let events = cp.cli(
        &ws,
        &[
            "--admin",
            "ops",
            "-o",
            "json",
            "events",
            "--action",
            "ca.reloaded",
        ],
    )?;
    assert!(events.matches("ca.reloaded").count() >= 3, "{events}");
    // New handshakes work on the new CA alone.
    cp.restart().await?;
    eventually(Duration::from_secs(60), "every node back", || async {
        let out = cp.cli(&ws, &["--admin", "ops", "-o", "json", "nodes", "list"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let connected = v["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["connected"] == true).count());
        Ok((connected == 20).then_some(()))
    })
    .await?;
    Ok(())
}

/// SIGHUP reloads the certificates too (and a reload is audited with its cause).
#[tokio::test]
async fn sighup_reloads_the_certificates() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let pid = cp.pid().ok_or_else(|| anyhow::anyhow!("not running"))?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    assert!(status.success());
    eventually(
        Duration::from_secs(30),
        "a ca.reloaded event for SIGHUP",
        || async {
            Ok(cp
                .events(&ws, "ca.reloaded")
                .await?
                .iter()
                .any(|e| e.detail.starts_with("SIGHUP"))
                .then_some(()))
        },
    )
    .await
}

/// With `--rotate-key`, each renewal is for a new key: the key file changes, the old key
/// is gone, and the stream stays up.
#[tokio::test]
async fn a_daemon_asked_to_rotate_its_key_renews_onto_a_new_one() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--node-cert-ttl", "12s"]).await?;
    let token = create_token(&cp, &ws, &["--uses", "1", "--ttl", "1h"])?;
    let certs = ws.gateway_certs("gw-k")?;
    let arg = certs.display().to_string();
    let edge = Edge::start(
        &ws,
        &cp,
        "gw-k",
        &[],
        &["--certs", &arg, "--enroll-token", &token, "--rotate-key"],
    )
    .await?;
    edge.wait_connected().await?;
    let key_path = certs.join("edge-gw-k.key");
    let (first, _) = aviary_certs::NodeKey::load_or_create(&key_path)?;
    eventually(
        Duration::from_secs(60),
        "a renewal onto a new key",
        || async {
            // The control plane records the renewal before the daemon has the
            // certificate and moves the key into place: wait for both.
            let renewed = node_events(&cp, &ws, "gw-k", "cert.renewed")
                .await?
                .iter()
                .any(|e| e.detail.contains("new key"));
            let (now, _) = aviary_certs::NodeKey::load_or_create(&key_path)?;
            Ok((renewed && now.fingerprint() != first.fingerprint()).then_some(()))
        },
    )
    .await?;
    // The old key is gone from the gateway's dir.
    for entry in std::fs::read_dir(&certs)? {
        let path = entry?.path();
        if path.to_string_lossy().contains(".key") {
            let (k, _) = aviary_certs::NodeKey::load_or_create(&path)?;
            assert_ne!(k.fingerprint(), first.fingerprint(), "{}", path.display());
        }
    }
    assert_eq!(cp.metric("aviary_streams_admitted_total").await?, 1.0);
    Ok(())
}
