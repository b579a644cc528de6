//! `aviary.v1.Audit`: list and follow the audit log.

use std::sync::Arc;

use aviary_proto::v1 as pb;
use pb::audit_server::Audit;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::page::Pager;
use super::views;
use crate::journal::Journal;

const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 10_000;

/// Implements `aviary.v1.Audit`.
pub(crate) struct AuditApi {
    journal: Arc<Journal>,
    pager: Arc<Pager>,
    shutdown: CancellationToken,
}

impl AuditApi {
    /// Serves the audit log of `journal`; watches end at `shutdown`.
    pub(crate) fn new(
        journal: Arc<Journal>,
        pager: Arc<Pager>,
        shutdown: CancellationToken,
    ) -> AuditApi {
        AuditApi {
            journal,
            pager,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Audit for AuditApi {
    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let req = req.into_inner();
        let query = format!("{:?}", req.filter);
        let want = self
            .pager
            .request("events", &query, req.page_size, &req.page_token, 1000)?;
        // `page_size` (or a token) pages; `limit` alone keeps its old meaning.
        let size = match (req.page_size, req.page_token.is_empty(), req.limit) {
            (0, true, 0) => DEFAULT_LIMIT as usize,
            (0, true, n) => n.min(MAX_LIMIT) as usize,
            _ => want.size,
        };
        let after_seq = match &want.after {
            Some(seq) => seq.parse::<u64>().unwrap_or(req.after_seq),
            None => req.after_seq,
        };
        let mut events = self
            .journal
            .events(after_seq, views::event_filter(req.filter), size + 1)
            .await?;
        let more = events.len() > size;
        events.truncate(size);
        let next_page_token = match events.last() {
            Some(last) if more => self.pager.token("events", &query, &last.seq.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventsResponse {
            events: events.into_iter().map(views::event).collect(),
            next_page_token,
        }))
    }

    type WatchEventsStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = req.into_inner();
        let filter = views::event_filter(req.filter);
        let journal = self.journal.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut live = journal.subscribe();
            let mut last = req.after_seq;
            loop {
                // Catch up from the store (also after falling behind the live feed).
                loop {
                    let page = match journal.events(last, filter.clone(), 500).await {
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
                        if tx.send(Ok(views::event(event))).await.is_err() {
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
                            if filter.matches(&event)
                                && tx.send(Ok(views::event(event))).await.is_err()
                            {
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
