//! The daemon's local HTTP port: `GET /v1/weights` for the gateway's own load balancer
//! or scripts, `GET /healthz` for liveness. Plain HTTP on purpose: bind it to loopback.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::weights::Weights;

/// Serves until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    weights: Arc<Weights>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "local http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let weights = weights.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = route(&req, &weights);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn route<B>(req: &Request<B>, weights: &Weights) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/weights") => (
            StatusCode::OK,
            Bytes::from(weights.snapshot().json.clone()),
            "application/json",
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, Bytes::from_static(b"ok\n"), "text/plain"),
        (_, "/v1/weights" | "/healthz") => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"only GET\n"),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found\n"),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Reads `GET /v1/weights` from a daemon's local port (for the demo, tests and scripts
/// that would rather not parse `weights.json`).
pub async fn fetch_view(addr: std::net::SocketAddr) -> std::io::Result<crate::weights::View> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /v1/weights HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.take(1 << 20).read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP header end".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(invalid(format!(
            "unexpected response: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    serde_json::from_str(body).map_err(|e| invalid(format!("bad weights JSON: {e}")))
}
