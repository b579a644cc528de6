//! A fake control plane: it holds the deployment's control-plane certificate (stolen, or
//! the real one compromised) and speaks the fleet protocol as a test scripts it, to show
//! what a daemon refuses whatever a control plane sends. Edge-paced transfers are served
//! from the payload the test gives; everything the daemon says comes back to the test.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use aviary_certs::TlsFiles;
use aviary_proto::v1 as pb;
use pb::control_message::Kind;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use crate::Workspace;

/// A running fake control plane; stops when dropped.
pub struct FakeControlPlane {
    /// Where daemons connect (`https://localhost:PORT`).
    pub addr: SocketAddr,
    to_edge: mpsc::Sender<pb::ControlMessage>,
    from_edge: mpsc::Receiver<pb::EdgeMessage>,
    payloads: Arc<Mutex<HashMap<String, bytes::Bytes>>>,
    _server: tokio::task::JoinHandle<()>,
}

struct Conn(TlsStream<TcpStream>);

impl Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The one fleet stream the fake serves at a time.
struct Fleet {
    outbox: Arc<tokio::sync::Mutex<mpsc::Receiver<pb::ControlMessage>>>,
    inbox: mpsc::Sender<pb::EdgeMessage>,
    payloads: Arc<Mutex<HashMap<String, bytes::Bytes>>>,
}

#[tonic::async_trait]
impl pb::fleet_server::Fleet for Fleet {
    type ConnectStream = ReceiverStream<Result<pb::ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::EdgeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (outbox, inbox, payloads) = (
            self.outbox.clone(),
            self.inbox.clone(),
            self.payloads.clone(),
        );
        tokio::spawn(async move {
            let mut outbox = outbox.lock().await;
            loop {
                tokio::select! {
                    msg = outbox.recv() => match msg {
                        Some(m) => if tx.send(Ok(m)).await.is_err() { return },
                        None => return,
                    },
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => {
                            // Edge-paced transfers: answer each progress report with the
                            // chunk at its offset.
                            if let Some(pb::edge_message::Kind::Progress(p)) = &m.kind {
                                let payload = payloads
                                    .lock()
                                    .map(|p| p.clone())
                                    .unwrap_or_default()
                                    .get(&p.transfer_id)
                                    .cloned();
                                if let Some(payload) = payload {
                                    let start = (p.offset as usize).min(payload.len());
                                    let end = (start + 64 * 1024).min(payload.len());
                                    if start < end {
                                        let chunk = pb::ControlMessage {
                                            nonce: String::new(),
                                            kind: Some(Kind::Chunk(pb::Chunk {
                                                transfer_id: p.transfer_id.clone(),
                                                offset: p.offset,
                                                data: payload.slice(start..end),
                                            })),
                                        };
                                        if tx.send(Ok(chunk)).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            if inbox.send(m).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FakeControlPlane {
    /// Serves with the workspace's control-plane certificate on an ephemeral port.
    pub async fn start(ws: &Workspace) -> anyhow::Result<FakeControlPlane> {
        let files = TlsFiles {
            ca: ws.pki.ca_cert(),
            cert: ws.pki.control_plane().cert,
            key: ws.pki.control_plane().key,
        };
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(aviary_certs::server_config(&files)?));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (to_edge, outbox) = mpsc::channel(64);
        let (inbox, from_edge) = mpsc::channel(1024);
        let payloads = Arc::new(Mutex::new(HashMap::new()));
        let fleet = Fleet {
            outbox: Arc::new(tokio::sync::Mutex::new(outbox)),
            inbox,
            payloads: payloads.clone(),
        };
        let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, io::Error>>(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, conn_tx) = (acceptor.clone(), conn_tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = conn_tx.send(Ok(Conn(tls))).await;
                    }
                });
            }
        });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::fleet_server::FleetServer::new(fleet))
                .serve_with_incoming(ReceiverStream::new(conn_rx))
                .await;
        });
        Ok(FakeControlPlane {
            addr,
            to_edge,
            from_edge,
            payloads,
            _server: server,
        })
    }

    /// `https://localhost:PORT`.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Sends a message on the daemon's stream.
    pub async fn send(&self, kind: Kind, nonce: &str) -> anyhow::Result<()> {
        self.to_edge
            .send(pb::ControlMessage {
                nonce: nonce.into(),
                kind: Some(kind),
            })
            .await
            .map_err(|_| anyhow::anyhow!("fake control plane stopped"))
    }

    /// Serves `payload` for transfer `id` as the daemon asks for it.
    pub fn offer_payload(&self, id: &str, payload: Vec<u8>) {
        if let Ok(mut p) = self.payloads.lock() {
            p.insert(id.to_owned(), payload.into());
        }
    }

    /// The daemon's answer (ACK or NACK) to `nonce`, waiting up to `wait`.
    pub async fn answer(
        &mut self,
        nonce: &str,
        wait: std::time::Duration,
    ) -> anyhow::Result<Result<u64, String>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.from_edge.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no answer to {nonce} within {wait:?}"))?
                .ok_or_else(|| anyhow::anyhow!("stream gone"))?;
            match msg.kind {
                Some(pb::edge_message::Kind::Ack(a)) if a.nonce == nonce => {
                    return Ok(Ok(a.revision))
                }
                Some(pb::edge_message::Kind::Nack(n)) if n.nonce == nonce => {
                    return Ok(Err(n.error))
                }
                _ => {}
            }
        }
    }
}
