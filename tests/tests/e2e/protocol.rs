//! The fleet stream's contract, seen from a precisely-counting raw client: parked NACKs,
//! stale nonces, bad messages, admission control.

use std::time::Duration;

use aviary_certs::Link;
use aviary_certs::TlsFiles;
use aviary_proto::v1 as pb;
use aviary_tests::raw::{hello, RawStream};
use aviary_tests::{eventually, ControlPlane, Daemon, Fleet, Workspace};
use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Waits until the control plane has handled a stale ACK sent on `stream` now: everything
/// the stream's session did before it (its opening offers, earlier answers) is done.
async fn processed_after(cp: &ControlPlane, stream: &RawStream) -> anyhow::Result<()> {
    let before = cp.metric("aviary_stale_answers_total").await?;
    stream.ack("no-such-nonce", 0).await?;
    eventually(
        Duration::from_secs(10),
        "the stale answer handled",
        || async { Ok((cp.metric("aviary_stale_answers_total").await? > before).then_some(())) },
    )
    .await
}

async fn set_weight(ws: &Workspace, cp: &ControlPlane, weight: u32) -> anyhow::Result<()> {
    ws.admin(cp)
        .await?
        .nodes
        .set_weight(pb::SetWeightRequest {
            module: "gateway".into(),
            weight,
            selector: String::new(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_nacked_assignment_is_not_resent_until_the_desired_state_changes() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    set_weight(&ws, &cp, 10).await?;
    let (nonce, first) = stream.next_weights(Duration::from_secs(5)).await?;
    stream
        .nack(&nonce, first.revision, "this gateway cannot take weight 10")
        .await?;
    let sent = cp.metric("aviary_weight_assignments_sent_total").await?;
    assert_eq!(sent, 1.0);
    // Not resent on this stream: a stale answer sent after the NACK is handled after it
    // (one stream, in order), and by then nothing more was sent.
    processed_after(&cp, &stream).await?;
    assert_eq!(
        cp.metric("aviary_weight_assignments_sent_total").await?,
        sent
    );

    // A new stream that has applied nothing still does not get the parked revision: by
    // the time it handles its first answer, its opening offers are done.
    drop(stream);
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    processed_after(&cp, &stream).await?;
    assert_eq!(
        cp.metric("aviary_weight_assignments_sent_total").await?,
        sent,
        "the NACKed revision was resent"
    );
    let node = cp.node(&ws, "gw-1").await?;
    assert_eq!(node.nacked_revision, first.revision);
    assert!(node.nack_error.contains("cannot take weight 10"));

    // A new desired state is sent.
    set_weight(&ws, &cp, 20).await?;
    let (nonce, second) = stream.next_weights(Duration::from_secs(5)).await?;
    assert!(second.revision > first.revision);
    assert_eq!(second.weights.get("gateway"), Some(&20));
    stream.ack(&nonce, second.revision).await?;
    assert_eq!(
        cp.metric("aviary_weight_assignments_sent_total").await?,
        2.0
    );
    assert_eq!(cp.metric("aviary_nacks_total").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn answers_with_a_stale_nonce_are_ignored() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    set_weight(&ws, &cp, 10).await?;
    let (nonce, w) = stream.next_weights(Duration::from_secs(5)).await?;
    stream.nack("not-the-nonce", w.revision, "stale").await?;
    stream.ack(&format!("{nonce}0"), w.revision).await?;
    eventually(
        Duration::from_secs(5),
        "two stale answers counted",
        || async { Ok((cp.metric("aviary_stale_answers_total").await? == 2.0).then_some(())) },
    )
    .await?;
    let mut admin = ws.admin(&cp).await?;
    let node = admin.node("gw-1").await?;
    assert_eq!((node.acked_revision, node.nacked_revision), (0, 0));
    stream.ack(&nonce, w.revision).await?;
    eventually(Duration::from_secs(5), "the real ACK recorded", || async {
        let node = cp.node(&ws, "gw-1").await?;
        Ok((node.acked_revision == w.revision).then_some(()))
    })
    .await?;
    Ok(())
}

/// Sends raw bytes as gRPC messages, to produce what no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawBytes;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_unary(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

async fn raw_fleet(channel: tonic::transport::Channel, first: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Status::unavailable(e.to_string());
    }
    let path = http::uri::PathAndQuery::from_static("/aviary.v1.Fleet/Connect");
    let outbound = tokio_stream::iter(vec![first]).chain(tokio_stream::pending());
    match grpc
        .streaming(tonic::Request::new(outbound), path, RawCodec)
        .await
    {
        Err(status) => status,
        Ok(response) => {
            let mut inbound = response.into_inner();
            match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
                Ok(Err(status)) => status,
                other => Status::unknown(format!("stream stayed open: {other:?}")),
            }
        }
    }
}

use tokio_stream::StreamExt as _;

#[tokio::test]
async fn malformed_and_oversized_messages_are_refused_and_the_server_keeps_serving(
) -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--max-message-bytes", "4096"]).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f];

    // Fleet: bytes that are not an EdgeMessage, a first message that is not a Hello, a
    // Hello over the size limit.
    assert_eq!(
        raw_fleet(link.connect().await?, garbage.clone())
            .await
            .code(),
        Code::InvalidArgument
    );
    let ack = prost::Message::encode_to_vec(&pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Ack(pb::Ack {
            nonce: "1".into(),
            revision: 1,
        })),
    });
    assert_eq!(
        raw_fleet(link.connect().await?, ack).await.code(),
        Code::InvalidArgument
    );
    let mut big = hello("gw-1", &[], 0);
    big.daemon_version = "x".repeat(10_000);
    let status = RawStream::open(&link, big).await.err().map(|s| s.code());
    assert_eq!(status, Some(Code::ResourceExhausted));
    let bad_label = hello("gw-1", &[("region", "not a valid value!")], 0);
    assert_eq!(
        RawStream::open(&link, bad_label)
            .await
            .err()
            .map(|s| s.code()),
        Some(Code::InvalidArgument)
    );

    // Admin: unparsable and oversized requests, and values out of range.
    let admin_files = TlsFiles {
        ca: ws.pki.ca_cert(),
        cert: ws.pki.admin().cert,
        key: ws.pki.admin().key,
    };
    let channel = Link::new(&cp.url(), &admin_files)?.connect().await?;
    let status = raw_unary(channel.clone(), "/aviary.v1.Nodes/ListNodes", garbage)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::InvalidArgument));
    let huge = prost::Message::encode_to_vec(&pb::ListNodesRequest {
        selector: "a".repeat(2 << 20),
        ..Default::default()
    });
    let status = raw_unary(channel.clone(), "/aviary.v1.Nodes/ListNodes", huge)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::ResourceExhausted));
    let mut nodes = pb::nodes_client::NodesClient::new(channel);
    for (weight, selector) in [(101, ""), (5, "region in eu")] {
        let status = nodes
            .set_weight(pb::SetWeightRequest {
                module: "gateway".into(),
                weight,
                selector: selector.into(),
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(
            status,
            Some(Code::InvalidArgument),
            "weight {weight} selector {selector:?}"
        );
    }
    let status = nodes
        .set_weight(pb::SetWeightRequest {
            module: "../etc".into(),
            weight: 1,
            selector: String::new(),
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::InvalidArgument));

    // Still serving, and a well-behaved edge still gets in.
    assert!(nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .is_ok());
    RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    Ok(())
}

#[tokio::test]
async fn admission_control_sheds_excess_streams_with_unavailable() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp =
        ControlPlane::start(&ws, &["--admission-rate", "0.5", "--admission-burst", "2"]).await?;
    let mut links = Vec::new();
    for i in 0..6 {
        links.push((format!("gw-{i}"), ws.edge_link(&cp, &format!("gw-{i}"))?));
    }
    let attempts = links
        .iter()
        .map(|(id, link)| RawStream::open(link, hello(id, &[], 0)));
    let results = futures_util::future::join_all(attempts).await;
    let shed = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::Unavailable))
        .count();
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        (admitted, shed),
        (2, 4),
        "burst 2: two admitted, the rest shed"
    );
    assert_eq!(cp.metric("aviary_streams_shed_total").await?, 4.0);
    Ok(())
}

/// Labels are the control plane's: a Hello claiming others changes nothing the node
/// receives (the claim is recorded), and an admin's relabel sends a newer revision with
/// the weights of the new labels on the live stream.
#[tokio::test]
async fn a_relabelled_node_gets_a_new_revision_and_a_hello_claim_changes_nothing(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let mut admin = ws.admin(&cp).await?;
    for (weight, selector) in [(10, "region=eu"), (20, "region=us")] {
        admin.set_weight("gateway", weight, selector).await?;
    }
    let mut stream = RawStream::open(&link, hello("gw-1", &[("region", "eu")], 0)).await?;
    let (nonce, eu) = stream.next_weights(Duration::from_secs(5)).await?;
    assert_eq!(eu.weights.get("gateway"), Some(&10));
    stream.ack(&nonce, eu.revision).await?;
    drop(stream);

    // Claiming another region: nothing to send, the claim recorded.
    let sent = cp.metric("aviary_weight_assignments_sent_total").await?;
    let mut stream =
        RawStream::open(&link, hello("gw-1", &[("region", "us")], eu.revision)).await?;
    processed_after(&cp, &stream).await?;
    assert_eq!(
        cp.metric("aviary_weight_assignments_sent_total").await?,
        sent
    );
    let node = cp.node(&ws, "gw-1").await?;
    assert_eq!(node.labels.get("region").map(String::as_str), Some("eu"));
    assert_eq!(
        node.claimed_labels.get("region").map(String::as_str),
        Some("us")
    );

    // Moved by an admin: a newer revision, on the stream that is open.
    admin
        .identities
        .set_node_labels(pb::SetNodeLabelsRequest {
            node_id: "gw-1".into(),
            labels: [("region".to_owned(), "us".to_owned())].into(),
        })
        .await?;
    let (_, us) = stream.next_weights(Duration::from_secs(5)).await?;
    assert_eq!(us.weights.get("gateway"), Some(&20));
    assert!(
        us.revision > eu.revision,
        "{} is not newer than {}",
        us.revision,
        eu.revision
    );
    Ok(())
}

fn health(module: &str, p99: f64) -> pb::edge_message::Kind {
    pb::edge_message::Kind::Health(pb::HealthReport {
        modules: vec![pb::ModuleHealth {
            module: module.into(),
            probe_successes: 5,
            latency_p50_ms: 1.0,
            latency_p99_ms: p99,
            process_state: "running".into(),
            ..Default::default()
        }],
    })
}

/// Issue 11, item 1: one non-finite number used to brick the control plane for good (JSON
/// stores NaN as null, which it then refused to read back at every start).
#[tokio::test]
async fn non_finite_numbers_are_refused_where_they_enter_and_the_control_plane_restarts(
) -> anyhow::Result<()> {
    let Fleet { ws, mut cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let mut running = hello("gw-1", &[], 0);
    running.modules = vec![pb::ModuleStatus {
        name: "gateway".into(),
        version: "1.0.0".into(),
        ..Default::default()
    }];
    let stream = RawStream::open(&link, running.clone()).await?;
    stream.send(health("gateway", 12.5)).await?;
    let figures = eventually(Duration::from_secs(10), "the health report", || async {
        let Ok(node) = cp.node(&ws, "gw-1").await else {
            return Ok(None);
        };
        Ok(node
            .module_rollouts
            .iter()
            .find_map(|m| m.health.as_ref().map(|h| h.latency_p99_ms)))
    })
    .await?;
    assert_eq!(figures, 12.5);

    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        let mut stream = RawStream::open(&link, running.clone()).await?;
        stream.send(health("gateway", bad)).await?;
        let status = stream.end(Duration::from_secs(10)).await?;
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
        assert!(
            status.message().contains("latency_p99_ms"),
            "{bad}: {}",
            status.message()
        );
    }
    // The admin side: the API and the CLI name the value they refuse.
    let mut admin = ws.admin(&cp).await?;
    for (name, value) in [
        ("max_p99_latency_ms", f64::INFINITY),
        ("max_error_rate", f64::NAN),
    ] {
        let mut analysis = pb::Analysis {
            window_seconds: 10,
            ..Default::default()
        };
        match name {
            "max_p99_latency_ms" => analysis.max_p99_latency_ms = value,
            _ => analysis.max_error_rate = value,
        }
        let err = admin
            .rollouts
            .create_rollout(pb::CreateRolloutRequest {
                module: "gateway".into(),
                version: "1.0.0".into(),
                steps: vec![pb::Step {
                    kind: Some(pb::step::Kind::Analysis(analysis)),
                }],
                ..Default::default()
            })
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("{name} = {value} was accepted"))?;
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(name), "{}", err.message());
    }
    let cli = cp.cli(
        &ws,
        &[
            "rollout",
            "create",
            "--module",
            "gateway",
            "--version",
            "1.0.0",
            "--step",
            "analysis=10s",
            "--max-p99-ms",
            "inf",
        ],
    );
    let err = cli.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("--max-p99-ms") && err.contains("finite"),
        "{err}"
    );

    // Nothing poisoned the store: a stop writes every status, and the control plane comes
    // back serving the node with the last good report.
    cp.terminate().await?;
    cp.restart().await?;
    let node = cp.node(&ws, "gw-1").await?;
    let kept = node
        .module_rollouts
        .iter()
        .find_map(|m| m.health.as_ref().map(|h| h.latency_p99_ms));
    assert_eq!(kept, Some(12.5));
    Ok(())
}

/// Issue 11, item 4: health reports naming modules the node neither runs nor is meant to
/// run used to be kept (and persisted) without bound, until `GetNode` passed 4 MiB.
#[tokio::test]
async fn health_for_modules_a_node_does_not_run_is_dropped() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let link = ws.edge_link(&cp, "gw-1")?;
    let stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    for round in 0..20 {
        let modules = (0..256)
            .map(|i| pb::ModuleHealth {
                module: format!("m-{round}-{i}"),
                detail: "x".repeat(256),
                ..Default::default()
            })
            .collect();
        stream
            .send(pb::edge_message::Kind::Health(pb::HealthReport { modules }))
            .await?;
    }
    eventually(
        Duration::from_secs(10),
        "the reports to be dropped",
        || async {
            Ok((cp.metric("aviary_health_ignored_total").await? >= 20.0 * 256.0).then_some(()))
        },
    )
    .await?;
    let node = cp.node(&ws, "gw-1").await?;
    assert!(
        node.module_rollouts.is_empty(),
        "{:?}",
        node.module_rollouts.len()
    );
    // More modules than a node may have ends the stream with the reason.
    let mut stream = RawStream::open(&link, hello("gw-1", &[], 0)).await?;
    let modules = (0..257)
        .map(|i| pb::ModuleHealth {
            module: format!("m-{i}"),
            ..Default::default()
        })
        .collect();
    stream
        .send(pb::edge_message::Kind::Health(pb::HealthReport { modules }))
        .await?;
    let status = stream.end(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("256"), "{}", status.message());
    Ok(())
}
