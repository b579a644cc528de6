//! Oversized messages are RESOURCE_EXHAUSTED, as in grpc-go and grpc-java and as operators'
//! tools expect. tonic reports them as OUT_OF_RANGE; this layer (for unary and server-
//! streaming calls, whose refusal is a trailers-only response) and `oversized` (for the
//! fleet stream, which reads its own messages) translate.

use std::task::{Context, Poll};

use tonic::codegen::BoxFuture;
use tower::{Layer, Service};

/// tonic's wording for a message over the decoding limit.
const TOO_LARGE: &str = "decoded message length too large";

/// Maps tonic's size-limit status to RESOURCE_EXHAUSTED; other statuses pass unchanged.
pub(crate) fn oversized(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains(TOO_LARGE) {
        tonic::Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

/// Installs `MessageLimits`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MessageLimitsLayer;

impl<S> Layer<S> for MessageLimitsLayer {
    type Service = MessageLimits<S>;

    fn layer(&self, inner: S) -> MessageLimits<S> {
        MessageLimits { inner }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub(crate) struct MessageLimits<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for MessageLimits<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(status) = tonic::Status::from_header_map(response.headers()) {
                if status.code() == tonic::Code::OutOfRange {
                    let mapped = oversized(status);
                    if mapped.code() == tonic::Code::ResourceExhausted {
                        let _ = mapped.add_header(response.headers_mut());
                    }
                }
            }
            Ok(response)
        })
    }
}
