//! `aviary.v1.Audit`: list and follow the audit log.

use std::sync::Arc;

use aviary_proto::v1 as pb;
use pb::audit_server::Audit;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::audit::EventFilter;
use crate::registry::Registry;

const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 10_000;

/// Implements `aviary.v1.Audit`.
pub(crate) struct AuditApi {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

impl AuditApi {
    /// Serves the audit log of `registry`; watches end at `shutdown`.
    pub(crate) fn new(registry: Arc<Registry>, shutdown: CancellationToken) -> AuditApi {
        AuditApi { registry, shutdown }
    }
}

#[tonic::async_trait]
impl Audit for AuditApi {
    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let req = req.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let events = self
            .registry
            .events(req.after_seq, EventFilter::from(req.filter), limit as usize)
            .await?;
        Ok(Response::new(pb::ListEventsResponse {
            events: events.into_iter().map(Into::into).collect(),
        }))
    }

    type WatchEventsStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = req.into_inner();
        let filter = EventFilter::from(req.filter);
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut live = registry.subscribe_events();
            let mut last = req.after_seq;
            loop {
                // Catch up from the store (also after falling behind the live feed).
                loop {
                    let page = match registry.events(last, filter.clone(), 500).await {
                        Ok(page) => page,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    if page.is_empty() {
                        break;
                    }
                    for event in page {
                        last = event.seq;
                        if tx.send(Ok(event.into())).await.is_err() {
                            return;
                        }
                    }
                }
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        e = live.recv() => e,
                    };
                    match next {
                        Ok(event) if event.seq <= last => {}
                        Ok(event) => {
                            last = event.seq;
                            if filter.matches(&event) && tx.send(Ok(event.into())).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
