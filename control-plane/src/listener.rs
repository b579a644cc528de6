//! Accepts TCP, completes the TLS 1.3 handshake, and hands tonic a connection that
//! carries the peer's verified `Identity`, or none when it showed no certificate.
//!
//! Invariant: every connection tonic sees either passed mTLS against the deployment CA
//! and names an Aviary identity, or presented no certificate at all (a gateway that has
//! not enrolled yet: `auth.rs` lets it call Enrollment and nothing else). A certificate
//! that does not verify fails the handshake. Handshake failures are counted and audited
//! (rate-limited, because an unauthenticated peer must not be able to flood the audit
//! log).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aviary_certs::Identity;
use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::transport::server::Connected;

use crate::admission::TokenBucket;
use crate::audit::NewEvent;
use crate::connections::{ConnGuard, Connections};
use crate::journal::Journal;

/// A slow or silent client must not hold a handshake slot for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An authenticated client must start its HTTP/2 session this soon after the handshake.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer without a certificate may only enroll, which takes one call: its connection
/// is closed after this long, so idle ones cannot hold the few slots they share.
const ANONYMOUS_MAX_AGE: Duration = Duration::from_secs(60);
/// What every HTTP/2 client sends first (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Who is at the other end of a connection, as tonic's `ConnectInfo`.
#[derive(Clone, Debug)]
pub(crate) struct PeerInfo {
    /// The verified identity from the client certificate; `None` without one.
    pub identity: Option<Identity>,
    /// The peer's socket address.
    pub addr: SocketAddr,
}

/// An authenticated TLS connection whose HTTP/2 session has started.
pub(crate) struct PeerConn {
    io: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Read to prove the session started; given to the HTTP/2 server first.
    preface: [u8; 24],
    replayed: usize,
    /// Ready when the connection must close (its identity was revoked).
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    _registered: ConnGuard,
}

impl PeerConn {
    fn check_closed(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the control plane (revoked, or past its age)",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for PeerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_closed(cx)?;
        if self.replayed < PREFACE.len() {
            let rest = &self.preface[self.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_closed(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_closed(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Registers an authenticated connection and waits for its HTTP/2 preface: a client that
/// never starts a session must not hold a descriptor forever.
async fn session(
    mut tls: TlsStream<TcpStream>,
    identity: Option<Identity>,
    addr: SocketAddr,
    connections: &Arc<Connections>,
) -> Result<PeerConn, String> {
    let registered = connections.register(identity.as_ref())?;
    if identity.is_none() {
        let close = registered.closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(ANONYMOUS_MAX_AGE) => close.cancel(),
                _ = close.cancelled() => {}
            }
        });
    }
    let who = identity
        .as_ref()
        .map_or_else(|| format!("peer/{addr}"), ToString::to_string);
    let mut preface = [0u8; 24];
    let read = tokio::time::timeout(PREFACE_TIMEOUT, tls.read_exact(&mut preface));
    let closed = registered.closed.clone();
    tokio::select! {
        r = read => match r {
            Ok(Ok(_)) if &preface == PREFACE => {}
            Ok(Ok(_)) => return Err(format!("{who}: not an HTTP/2 client")),
            Ok(Err(e)) => return Err(format!("{who}: closed before its HTTP/2 session: {e}")),
            Err(_) => {
                return Err(format!(
                    "{who}: no HTTP/2 session within {PREFACE_TIMEOUT:?} of the handshake"
                ))
            }
        },
        _ = closed.cancelled() => return Err(format!("{who}: revoked")),
    }
    Ok(PeerConn {
        io: tls,
        info: PeerInfo { identity, addr },
        preface,
        replayed: 0,
        closed: Box::pin(registered.closed.clone().cancelled_owned()),
        _registered: registered,
    })
}

/// Accepts connections until `shutdown`; authenticated ones go to `out`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    authority: Arc<crate::authority::Authority>,
    trust_domain: String,
    journal: Arc<Journal>,
    connections: Arc<Connections>,
    out: mpsc::Sender<Result<PeerConn, io::Error>>,
    shutdown: CancellationToken,
) {
    let trust_domain: Arc<str> = trust_domain.into();
    // At most 5 refused handshakes a second reach the audit log; all are counted.
    let audit_budget = Arc::new(TokenBucket::new(5.0, 20.0));
    while let Some((tcp, addr)) = aviary_startup::accept(&listener, &shutdown).await {
        // The certificates in force when the connection arrived (they reload).
        let acceptor = authority.current().acceptor.clone();
        let out = out.clone();
        let trust_domain = trust_domain.clone();
        let journal = journal.clone();
        let audit_budget = audit_budget.clone();
        let shutdown = shutdown.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = handshake => r,
            };
            let refused: Result<(), String> = match result {
                Err(_) => Err("tls handshake timed out".to_owned()),
                Ok(Err(e)) => Err(format!("tls handshake failed: {e}")),
                Ok(Ok(tls)) => {
                    // No certificate: a gateway come to enroll. One that verified must
                    // name an identity.
                    let identity = match tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                    {
                        None => Ok(None),
                        Some(cert) => Identity::from_cert_der(cert.as_ref(), &trust_domain)
                            .map(Some)
                            .map_err(|e| e.to_string()),
                    };
                    match identity {
                        Ok(identity) => match session(tls, identity, addr, &connections).await {
                            Ok(conn) => {
                                let _ = out.send(Ok(conn)).await;
                                return;
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(reason) = refused {
                metrics::counter!("aviary_handshakes_refused_total").increment(1);
                tracing::info!(peer = %addr, %reason, "connection refused");
                if !audit_budget.try_take() {
                    metrics::counter!("aviary_refusals_unaudited_total").increment(1);
                } else {
                    let event = NewEvent::new(
                        format!("peer/{addr}"),
                        "auth.handshake_refused",
                        "control-plane",
                        reason,
                    );
                    if let Err(e) = journal.audit(event, false).await {
                        tracing::warn!(error = %e, "could not audit refused handshake");
                    }
                }
            }
        });
    }
}
