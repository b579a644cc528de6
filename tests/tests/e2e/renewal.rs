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
