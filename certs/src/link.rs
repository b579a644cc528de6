//! The mTLS gRPC channel to the control plane (or the sensor stub), over the rustls
//! client config of `tls.rs`: used by the daemon, the `aviary` CLI, the fleet simulator
//! and the tests. TLS is done here (tokio-rustls, TLS 1.3, our CA only) rather than by
//! tonic, so a caller can pick the local source address: the simulator spreads thousands
//! of connections over 127.0.0.x.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{CertsError, TlsFiles};

/// Why a link could not be made or connected.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The URL is unusable.
    #[error("{url}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The client certificate or CA could not be loaded.
    #[error(transparent)]
    Certs(#[from] CertsError),
    /// The connection failed.
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// How to reach the control plane.
#[derive(Clone)]
pub struct Link {
    endpoint: Endpoint,
    addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    bind: Option<IpAddr>,
}

impl Link {
    /// Parses `https://HOST:PORT` and loads the client certificate.
    pub fn new(url: &str, files: &TlsFiles) -> Result<Link, LinkError> {
        Link::with_config(url, crate::client_config(files)?)
    }

    /// Like `new`, with a ready rustls client configuration.
    pub fn with_config(url: &str, config: rustls::ClientConfig) -> Result<Link, LinkError> {
        let bad = |reason: &str| LinkError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https:// (there is no plaintext port)"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = match bare.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => {
                ServerName::try_from(bare.to_owned()).map_err(|_| bad("invalid host name"))?
            }
        };
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad(&e.to_string()))?
            .connect_timeout(Duration::from_secs(10));
        Ok(Link {
            endpoint,
            addr: format!("{host}:{port}"),
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            bind: None,
        })
    }

    /// Connects from this local address (port chosen by the kernel).
    pub fn bind(mut self, ip: IpAddr) -> Link {
        self.bind = Some(ip);
        self
    }

    /// HTTP/2 keepalive: ping every `interval`, drop the link after `interval * 2` silence.
    pub fn keepalive(mut self, interval: Duration) -> Link {
        self.endpoint = self
            .endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(interval * 2)
            .keep_alive_while_idle(true);
        self
    }

    /// Opens one connection (TCP, then TLS 1.3 with the client certificate, then h2).
    pub async fn connect(&self) -> Result<Channel, LinkError> {
        let link = self.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let link = link.clone();
            async move {
                let tcp = link.tcp().await?;
                let tls = link
                    .connector
                    .connect(link.server_name.clone(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        Ok(self.endpoint.connect_with_connector(connector).await?)
    }

    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.addr).await?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            let attempt = async {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(ip) = self.bind {
                    socket.bind(SocketAddr::new(ip, 0))?;
                }
                let stream = socket.connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            };
            match attempt.await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}
