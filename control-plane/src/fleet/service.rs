//! A hand-written tonic service for `aviary.v1.Fleet`: the generated one would encode every
//! message per stream, this one sends `ControlFrame`s through `FleetCodec`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use aviary_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::server::{NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::codec::{ControlFrame, FleetCodec};
use super::{session, Fleet};

/// `aviary.v1.Fleet` for tonic's router.
#[derive(Clone)]
pub(crate) struct FleetService {
    fleet: Arc<Fleet>,
}

impl FleetService {
    /// Serves fleet streams out of `fleet`.
    pub(crate) fn new(fleet: Arc<Fleet>) -> FleetService {
        FleetService { fleet }
    }
}

impl NamedService for FleetService {
    const NAME: &'static str = "aviary.v1.Fleet";
}

struct ConnectSvc(Arc<Fleet>);

impl StreamingService<pb::EdgeMessage> for ConnectSvc {
    type Response = ControlFrame;
    type ResponseStream = ReceiverStream<Result<ControlFrame, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<pb::EdgeMessage>>) -> Self::Future {
        Box::pin(session::open(self.0.clone(), request))
    }
}

impl<B> tower::Service<http::Request<B>> for FleetService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fleet = self.fleet.clone();
        if req.uri().path() != "/aviary.v1.Fleet/Connect" {
            return Box::pin(async {
                Ok(Status::unimplemented("aviary.v1.Fleet has only Connect").into_http())
            });
        }
        Box::pin(async move {
            let limit = fleet.settings.max_message_bytes;
            let mut grpc = tonic::server::Grpc::new(FleetCodec)
                .apply_max_message_size_config(Some(limit), None);
            Ok(grpc.streaming(ConnectSvc(fleet), req).await)
        })
    }
}
