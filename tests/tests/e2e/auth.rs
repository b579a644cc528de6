//! Who may call what: every refusal is PERMISSION_DENIED (or a failed handshake) and
//! lands in the audit log.

use std::sync::Arc;
use std::time::Duration;

use aviary_certs::Link;
use aviary_certs::TlsFiles;
use aviary_proto::v1 as pb;
use aviary_tests::raw::{hello, RawStream};
use aviary_tests::{eventually, ControlPlane, Fleet, Workspace};
use tonic::Code;

async fn audited(
    ws: &Workspace,
    cp: &ControlPlane,
    action: &str,
    detail_part: &str,
) -> anyhow::Result<()> {
    let admin = ws.admin(cp).await?;
    eventually(
        Duration::from_secs(5),
        &format!("an audit event {action} mentioning {detail_part:?}"),
        || async {
            let events = admin
                .audit
                .clone()
                .list_events(pb::ListEventsRequest {
                    filter: Some(pb::EventFilter {
                        action: action.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .events;
            Ok(events
                .iter()
                .any(|e| e.detail.contains(detail_part) || e.actor.contains(detail_part))
                .then_some(()))
        },
    )
    .await
}

/// A peer without a client certificate completes the handshake (a gateway that has not
/// enrolled yet has none) but every call except Enrollment is PERMISSION_DENIED and
/// audited; a certificate that does not verify still fails the handshake (below).
#[tokio::test]
async fn a_client_without_a_certificate_may_only_enroll_and_is_audited() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let config = aviary_certs::anonymous_client_config(aviary_certs::ca_roots(&ws.pki.ca_cert())?)?;
    let channel = Link::with_config(&cp.url(), config)?.connect().await?;
    let denied = pb::nodes_client::NodesClient::new(channel.clone())
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(denied, Some(Code::PermissionDenied));
    let stream = RawStream::open_on(channel.clone(), hello("gw-1", &[], 0)).await;
    assert!(
        stream.is_err(),
        "a peer without a certificate opened a fleet stream"
    );
    // Enrollment answers (here: the CSR is garbage, so INVALID_ARGUMENT, not DENIED).
    let enroll = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            node_id: "gw-1".into(),
            csr: vec![0; 16],
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(enroll, Some(Code::InvalidArgument));
    audited(&ws, &cp, "auth.denied", "needs a client certificate").await?;
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_and_audited() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let other = Workspace::new()?;
    other.edge_cert("gw-1")?;
    let files = TlsFiles {
        ca: ws.pki.ca_cert(),
        ..other.edge_files("gw-1")
    };
    let result = RawStream::open(&Link::new(&cp.url(), &files)?, hello("gw-1", &[], 0)).await;
    assert!(
        result.is_err(),
        "a foreign certificate opened a fleet stream"
    );
    audited(&ws, &cp, "auth.handshake_refused", "peer/127.0.0.1").await?;
    Ok(())
}

/// An expired or not-yet-valid certificate from the deployment's own CA fails the
/// handshake, and the refusal is audited with the reason.
#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused_at_the_handshake() -> anyhow::Result<()>
{
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let minter = aviary_certs::EdgeMinter::open(&ws.pki.dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    for (node, from, until, why) in [
        ("gw-old", now - 7200, now - 3600, "xpired"),
        ("gw-new", now + 3600, now + 7200, "valid"),
    ] {
        let (cert, key) = minter.mint_valid(node, from, until)?;
        let config = aviary_certs::client_config_with(
            aviary_certs::ca_roots(&ws.pki.ca_cert())?,
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(key.into()),
        )?;
        let result =
            RawStream::open(&Link::with_config(&cp.url(), config)?, hello(node, &[], 0)).await;
        assert!(result.is_err(), "{node}'s certificate opened a stream");
        audited(&ws, &cp, "auth.handshake_refused", why).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_hello_naming_another_node_is_denied_and_audited() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let err = RawStream::open(&link, hello("gw-2", &[], 0))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(Code::PermissionDenied));
    audited(&ws, &cp, "auth.denied", "certificate is for \"gw-1\"").await?;
    Ok(())
}

#[tokio::test]
async fn an_edge_certificate_cannot_call_admin_services() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    ws.edge_cert("gw-1")?;
    let channel = Link::new(&cp.url(), &ws.edge_files("gw-1"))?
        .connect()
        .await?;
    let err = pb::nodes_client::NodesClient::new(channel)
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(Code::PermissionDenied));
    audited(&ws, &cp, "auth.denied", "edge/gw-1").await?;
    Ok(())
}

#[tokio::test]
async fn an_admin_certificate_cannot_open_a_fleet_stream() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let admin = ws.pki.admin();
    let files = TlsFiles {
        ca: ws.pki.ca_cert(),
        cert: admin.cert,
        key: admin.key,
    };
    let err = RawStream::open(&Link::new(&cp.url(), &files)?, hello("admin", &[], 0))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(Code::PermissionDenied));
    audited(
        &ws,
        &cp,
        "auth.denied",
        "admin/admin may not open a fleet stream",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_revoked_node_is_cut_off_and_refused_from_then_on() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    let mut admin = ws.admin(&cp).await?;
    let reply = admin
        .nodes
        .revoke_node(pb::RevokeNodeRequest {
            node_id: "gw-1".into(),
            reason: "stolen gateway".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(reply.disconnected);
    let end = stream.end(Duration::from_secs(5)).await?;
    assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");

    let err = RawStream::open(&link, hello("gw-1", &[], 0))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(Code::PermissionDenied));
    let node = admin.node("gw-1").await?;
    assert!(node.revoked && !node.connected);
    audited(&ws, &cp, "nodes.revoke", "stolen gateway").await?;
    audited(&ws, &cp, "auth.denied", "node gw-1 is revoked").await?;
    Ok(())
}

/// A raw mTLS connection as edge `id` (the daemon's TLS settings), with the HTTP/2
/// preface sent or not.
async fn raw_tls(
    ws: &Workspace,
    cp: &ControlPlane,
    id: &str,
    preface: bool,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::AsyncWriteExt;
    ws.edge_cert(id)?;
    let config = aviary_certs::client_config(&ws.edge_files(id))?;
    let tcp = tokio::net::TcpStream::connect(cp.addr).await?;
    let server = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await?;
    if preface {
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tls.flush().await?;
    }
    Ok(tls)
}

/// Whether the server closes `tls` within `wait` (whatever frames it sends first).
async fn closed_within(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    wait: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(wait, read_to_end).await.is_ok()
}

/// Issue 11, item 6: authenticated connections that never started HTTP/2 stayed open
/// forever, revocation left them open, and one certificate could hold any number.
#[tokio::test]
async fn idle_connections_are_bounded_closed_without_a_session_and_closed_on_revocation(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--max-connections-per-node", "3"]).await?;
    // gw-1 registers with a fleet stream (one connection), then opens idle ones.
    let link = ws.edge_link(&cp, "gw-1")?;
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    let mut silent = raw_tls(&ws, &cp, "gw-1", false).await?;
    let mut held = vec![raw_tls(&ws, &cp, "gw-1", true).await?];
    // The cap counts the silent one too: the next is refused after its handshake.
    let mut over = raw_tls(&ws, &cp, "gw-1", true).await?;
    assert!(
        closed_within(&mut over, Duration::from_secs(10)).await,
        "a fourth connection of gw-1 was kept"
    );
    audited(
        &ws,
        &cp,
        "auth.handshake_refused",
        "already holds 3 connections",
    )
    .await?;
    // Another node is not affected by gw-1's cap.
    let mut other = raw_tls(&ws, &cp, "gw-2", true).await?;
    // No HTTP/2 session within the deadline: closed.
    assert!(
        closed_within(&mut silent, Duration::from_secs(30)).await,
        "a connection that never sent the HTTP/2 preface stayed open"
    );
    audited(&ws, &cp, "auth.handshake_refused", "no HTTP/2 session").await?;
    for tls in &mut held {
        assert!(!closed_within(tls, Duration::from_millis(200)).await);
    }
    // Revocation closes every connection of the node, idle or not.
    cp.cli(&ws, &["nodes", "revoke", "gw-1"])?;
    assert_eq!(
        stream.end(Duration::from_secs(10)).await?.code(),
        Code::PermissionDenied
    );
    for tls in &mut held {
        assert!(
            closed_within(tls, Duration::from_secs(10)).await,
            "a revoked node's idle connection stayed open"
        );
    }
    assert!(!closed_within(&mut other, Duration::from_millis(200)).await);
    Ok(())
}

/// Issue 11, item 6: one edge certificate wrote 45,950 refusal events in 20 s.
#[tokio::test]
async fn refused_calls_are_audited_within_a_budget_and_counted() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    ws.edge_cert("gw-1")?;
    let channel = Link::new(&cp.url(), &ws.edge_files("gw-1"))?
        .connect()
        .await?;
    let mut nodes = pb::nodes_client::NodesClient::new(channel);
    let started = std::time::Instant::now();
    for _ in 0..300 {
        let err = nodes
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .err();
        assert_eq!(err.map(|s| s.code()), Some(Code::PermissionDenied));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let audited = cp.events(&ws, "auth.denied").await?.len();
    let budget = 20.0 + 5.0 * (elapsed + 1.0);
    assert!(
        audited >= 1 && (audited as f64) <= budget,
        "{audited} refusals audited in {elapsed:.1}s (budget {budget:.0})"
    );
    let unaudited = cp.metric("aviary_refusals_unaudited_total").await?;
    assert_eq!(unaudited as usize + audited, 300);
    Ok(())
}
