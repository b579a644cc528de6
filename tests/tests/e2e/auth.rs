//! Who may call what: every refusal is PERMISSION_DENIED (or a failed handshake) and
//! lands in the audit log.

use std::sync::Arc;
use std::time::Duration;

use aviary_certs::TlsFiles;
use aviary_edge::link::Link;
use aviary_proto::v1 as pb;
use aviary_tests::raw::{hello, RawStream};
use aviary_tests::{eventually, ControlPlane, Workspace};
use tonic::Code;

fn edge_files(ws: &Workspace, id: &str) -> TlsFiles {
    TlsFiles {
        ca: ws.pki.ca_cert(),
        cert: ws.pki.edge(id).cert,
        key: ws.pki.edge(id).key,
    }
}

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

#[tokio::test]
async fn a_client_without_a_certificate_fails_the_handshake_and_is_audited() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ws.pki.ca_cert())? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(cp.addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server = rustls::pki_types::ServerName::try_from("localhost")?;
    // TLS 1.3 lets the client finish first; the server's refusal arrives on the first read.
    let refused = match connector.connect(server, tcp).await {
        Err(_) => true,
        Ok(mut tls) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate got an answer");
    audited(&ws, &cp, "auth.handshake_refused", "peer/127.0.0.1").await?;
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_and_audited() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    let other = Workspace::new()?;
    other.edge_cert("gw-1")?;
    let files = TlsFiles {
        ca: ws.pki.ca_cert(),
        ..edge_files(&other, "gw-1")
    };
    let result = RawStream::open(&Link::new(&cp.url(), &files)?, hello("gw-1", &[], 0)).await;
    assert!(
        result.is_err(),
        "a foreign certificate opened a fleet stream"
    );
    audited(&ws, &cp, "auth.handshake_refused", "peer/127.0.0.1").await?;
    Ok(())
}

#[tokio::test]
async fn a_hello_naming_another_node_is_denied_and_audited() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    ws.edge_cert("gw-1")?;
    let link = Link::new(&cp.url(), &edge_files(&ws, "gw-1"))?;
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
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    ws.edge_cert("gw-1")?;
    let channel = Link::new(&cp.url(), &edge_files(&ws, "gw-1"))?
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
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
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
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &[]).await?;
    ws.edge_cert("gw-1")?;
    let link = Link::new(&cp.url(), &edge_files(&ws, "gw-1"))?;
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    let mut admin = ws.admin(&cp).await?;
    let reply = admin
        .nodes
        .revoke_node(pb::RevokeNodeRequest {
            node_id: "gw-1".into(),
            reason: "stolen gateway".into(),
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
    let node = admin
        .nodes
        .get_node(pb::GetNodeRequest {
            node_id: "gw-1".into(),
        })
        .await?
        .into_inner();
    assert!(node.revoked && !node.connected);
    audited(&ws, &cp, "nodes.revoke", "stolen gateway").await?;
    audited(&ws, &cp, "auth.denied", "node gw-1 is revoked").await?;
    Ok(())
}
