//! A fleet-protocol client that speaks `aviary.v1.Fleet` directly, with no daemon logic:
//! tests use it to act as a misbehaving or precisely-counting edge, the fleet simulator
//! to hold thousands of real streams cheaply.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use aviary_certs::Link;
use aviary_proto::resource::Resource;
use aviary_proto::v1 as pb;
use pb::control_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// One open fleet stream.
pub struct RawStream {
    tx: mpsc::Sender<pb::EdgeMessage>,
    inbound: Streaming<pb::ControlMessage>,
}

/// A Hello for `node_id` with `labels` and an applied weights revision.
pub fn hello(node_id: &str, labels: &[(&str, &str)], applied: u64) -> pb::Hello {
    pb::Hello {
        node_id: node_id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        arch: "x86_64".into(),
        daemon_version: "raw-test".into(),
        applied: vec![pb::AppliedRevision {
            resource: Resource::Weights.to_string(),
            revision: applied,
        }],
        ..Default::default()
    }
}

impl RawStream {
    /// Connects over `link` and sends `hello`; fails with the control plane's status.
    pub async fn open(link: &Link, hello: pb::Hello) -> Result<RawStream, tonic::Status> {
        let channel = link
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
        RawStream::open_on(channel, hello).await
    }

    /// Opens a stream on an existing channel.
    pub async fn open_on(
        channel: tonic::transport::Channel,
        hello: pb::Hello,
    ) -> Result<RawStream, tonic::Status> {
        let mut client = pb::fleet_client::FleetClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let msg = pb::EdgeMessage {
            kind: Some(pb::edge_message::Kind::Hello(hello)),
        };
        tx.send(msg)
            .await
            .map_err(|_| tonic::Status::internal("send hello"))?;
        let inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        Ok(RawStream { tx, inbound })
    }

    /// The next control message, `None` if none arrives within `wait`. Trust bundles
    /// (every stream starts with one) are skipped: the scenarios here are about desired
    /// state.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<pb::ControlMessage>> {
        match tokio::time::timeout(wait, self.recv()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(msg))) => Ok(Some(msg)),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(status)) => Err(status.into()),
        }
    }

    /// The next control message but a trust bundle, waiting as long as it takes; `None`
    /// when the stream ends.
    pub async fn recv(&mut self) -> Result<Option<pb::ControlMessage>, tonic::Status> {
        loop {
            match self.inbound.message().await? {
                Some(pb::ControlMessage {
                    kind: Some(Kind::TrustBundle(_)),
                    ..
                }) => continue,
                other => return Ok(other),
            }
        }
    }

    /// The next weight assignment and its nonce.
    pub async fn next_weights(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<(String, pb::WeightAssignment)> {
        let msg = self
            .next(wait)
            .await?
            .context("no weight assignment arrived")?;
        match msg.kind {
            Some(Kind::Weights(w)) => Ok((msg.nonce, w)),
            other => bail!("expected weights, got {other:?}"),
        }
    }

    /// How the stream ends: its final status (OK if it closed cleanly).
    pub async fn end(&mut self, wait: Duration) -> anyhow::Result<tonic::Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.message()).await {
                Err(_) => bail!("stream did not end within {wait:?}"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return Ok(tonic::Status::ok("")),
                Ok(Err(status)) => return Ok(status),
            }
        }
    }

    /// Sends any message.
    pub async fn send(&self, kind: pb::edge_message::Kind) -> anyhow::Result<()> {
        self.tx
            .send(pb::EdgeMessage { kind: Some(kind) })
            .await
            .map_err(|_| anyhow::anyhow!("outbound stream closed"))
    }

    /// ACKs `nonce` at `revision`.
    pub async fn ack(&self, nonce: &str, revision: u64) -> anyhow::Result<()> {
        self.send(pb::edge_message::Kind::Ack(pb::Ack {
            nonce: nonce.into(),
            revision,
        }))
        .await
    }

    /// NACKs `nonce` at `revision` with `error`.
    pub async fn nack(&self, nonce: &str, revision: u64, error: &str) -> anyhow::Result<()> {
        self.send(pb::edge_message::Kind::Nack(pb::Nack {
            rolled_back: false,
            nonce: nonce.into(),
            revision,
            error: error.into(),
        }))
        .await
    }
}
