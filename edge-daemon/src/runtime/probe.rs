//! HTTP and TCP probes of a module. An HTTP probe that fails below HTTP (refused, reset,
//! timed out, garbage) is followed by a TCP connect, so a report says "port closed" or
//! "HTTP failing" rather than just "failed".

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aviary_proto::manifest::ProbeTarget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// Nothing listens: connection refused or unreachable.
    PortClosed,
    /// The port accepts connections but HTTP does not work (wrong status, broken reply,
    /// no reply in time).
    HttpFailing(String),
    /// A TCP probe did not connect within its timeout.
    Timeout,
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeFailure::PortClosed => f.write_str("port closed"),
            ProbeFailure::HttpFailing(why) => write!(f, "HTTP failing: {why}"),
            ProbeFailure::Timeout => f.write_str("connect timed out"),
        }
    }
}

/// Runs one probe of `target` within `timeout`; the latency on success.
pub async fn probe(target: &ProbeTarget, timeout: Duration) -> Result<Duration, ProbeFailure> {
    let started = Instant::now();
    match target {
        ProbeTarget::Tcp(addr) => {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(started.elapsed()),
                Ok(Err(_)) => Err(ProbeFailure::PortClosed),
                Err(_) => Err(ProbeFailure::Timeout),
            }
        }
        ProbeTarget::Http {
            addr,
            path,
            expect_status,
        } => match tokio::time::timeout(timeout, http_status(*addr, path)).await {
            Ok(Ok(status)) if status == *expect_status => Ok(started.elapsed()),
            Ok(Ok(status)) => Err(ProbeFailure::HttpFailing(format!(
                "status {status}, expected {expect_status}"
            ))),
            Ok(Err(e)) => Err(tcp_verdict(*addr, timeout, e.to_string()).await),
            Err(_) => Err(tcp_verdict(*addr, timeout, "no answer in time".into()).await),
        },
    }
}

/// After an HTTP transport failure: is anything listening at all?
async fn tcp_verdict(addr: SocketAddr, timeout: Duration, http_error: String) -> ProbeFailure {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeFailure::HttpFailing(http_error),
        Ok(Err(_)) => ProbeFailure::PortClosed,
        Err(_) => ProbeFailure::HttpFailing(format!("{http_error}; TCP connect also timed out")),
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the status code of the reply.
async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: aviary-edge-probe\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need; read until it is complete (or 4 KiB).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u16>().ok()),
    ) {
        (Some(v), Some(status)) if v.starts_with("HTTP/1.") => Ok(status),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP reply: {:?}", line.lines().next().unwrap_or("")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve(reply: &'static [u8]) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        Ok(addr)
    }

    fn http(addr: SocketAddr) -> ProbeTarget {
        ProbeTarget::Http {
            addr,
            path: "/healthz".into(),
            expect_status: 200,
        }
    }

    #[tokio::test]
    async fn probes_tell_port_closed_from_http_failing() -> std::io::Result<()> {
        let t = Duration::from_millis(500);
        let ok = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await?;
        assert!(probe(&http(ok), t).await.is_ok());
        assert!(probe(&ProbeTarget::Tcp(ok), t).await.is_ok());

        let failing = serve(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await?;
        assert_eq!(
            probe(&http(failing), t).await,
            Err(ProbeFailure::HttpFailing("status 503, expected 200".into()))
        );
        let garbage = serve(b"SSH-2.0-OpenSSH\r\n").await?;
        assert!(matches!(
            probe(&http(garbage), t).await,
            Err(ProbeFailure::HttpFailing(_))
        ));

        // A port nobody listens on.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            l.local_addr()?
        };
        assert_eq!(probe(&http(closed), t).await, Err(ProbeFailure::PortClosed));
        assert_eq!(
            probe(&ProbeTarget::Tcp(closed), t).await,
            Err(ProbeFailure::PortClosed)
        );

        // Accepts but never answers: HTTP failing, not port closed.
        let silent = TcpListener::bind("127.0.0.1:0").await?;
        let silent_addr = silent.local_addr()?;
        let err = probe(&http(silent_addr), Duration::from_millis(200)).await;
        assert!(matches!(err, Err(ProbeFailure::HttpFailing(_))), "{err:?}");
        drop(silent);
        Ok(())
    }
}
