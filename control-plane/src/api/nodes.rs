//! `aviary.v1.Nodes`: the registry, manual weights, revocation and the weights watch.

use std::sync::Arc;

use aviary_proto::v1 as pb;
use pb::nodes_server::Nodes;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::page::Pager;
use super::requests::{bare, mismatch, Begin, Requests};
use super::{caller, views};
use crate::connections::Connections;
use crate::error::bad_field;
use crate::filter::NodeFilter;
use crate::registry::Registry;
use crate::requests::Answered;
use crate::selector::Selector;

/// Implements `aviary.v1.Nodes`.
pub(crate) struct NodesApi {
    registry: Arc<Registry>,
    connections: Arc<Connections>,
    pager: Arc<Pager>,
    requests: Arc<Requests>,
    shutdown: CancellationToken,
}

impl NodesApi {
    /// Serves the nodes of `registry`; watches end at `shutdown`.
    pub(crate) fn new(
        registry: Arc<Registry>,
        connections: Arc<Connections>,
        pager: Arc<Pager>,
        requests: Arc<Requests>,
        shutdown: CancellationToken,
    ) -> NodesApi {
        NodesApi {
            registry,
            connections,
            pager,
            requests,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Nodes for NodesApi {
    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let req = req.into_inner();
        let selector = Selector::parse(&req.selector)?;
        let filter = NodeFilter::parse(&req.filter)?;
        let query = format!("{selector}\0{filter}");
        let want = self
            .pager
            .request("nodes", &query, req.page_size, &req.page_token, 500)?;
        // One more than the page: whether another page follows.
        let nodes =
            self.registry
                .list_after(&selector, &filter, want.after.as_deref(), want.size + 1);
        let page = self.pager.page(
            "nodes",
            &query,
            &want,
            nodes,
            |n| n.record.node_id.clone(),
            |n, after| n.record.node_id.as_str() > after,
        );
        Ok(Response::new(pb::ListNodesResponse {
            nodes: page.items.into_iter().map(views::node).collect(),
            next_page_token: page.next,
        }))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = &req.get_ref().node_id;
        if id.is_empty() {
            return Err(bad_field("node_id", "node_id is required"));
        }
        Ok(Response::new(views::node(self.registry.get(id)?)))
    }

    async fn set_weight(
        &self,
        req: Request<pb::SetWeightRequest>,
    ) -> Result<Response<pb::SetWeightResponse>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        let body = bare(&req, |r| r.request_id.clear());
        let begun = self
            .requests
            .begin(&actor, &req.request_id, "SetWeight", body)
            .await?;
        if let Begin::Replay(r) = &begun {
            let Answered::Weight { node_ids } = &r.answered else {
                return Err(mismatch(r));
            };
            return Ok(Response::new(pb::SetWeightResponse {
                node_ids: node_ids.clone(),
                event_seq: r.event_seq,
            }));
        }
        let selector = Selector::parse(&req.selector)?;
        let (node_ids, event_seq) = self
            .registry
            .set_weight(&actor, &req.module, req.weight, selector, begun.note())
            .await?;
        Ok(Response::new(pb::SetWeightResponse {
            node_ids,
            event_seq,
        }))
    }

    async fn revoke_node(
        &self,
        req: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        if req.node_id.is_empty() {
            return Err(bad_field("node_id", "node_id is required"));
        }
        let body = bare(&req, |r| r.request_id.clear());
        let begun = self
            .requests
            .begin(&actor, &req.request_id, "RevokeNode", body)
            .await?;
        if let Begin::Replay(r) = &begun {
            let Answered::Revoked { disconnected } = r.answered else {
                return Err(mismatch(r));
            };
            return Ok(Response::new(pb::RevokeNodeResponse { disconnected }));
        }
        let reason = if req.reason.is_empty() {
            "revoked".to_owned()
        } else {
            req.reason.chars().take(1024).collect()
        };
        let disconnected = self
            .registry
            .revoke(&actor, &req.node_id, &reason, begun.note())
            .await?;
        // Every connection of the node, not only its fleet stream: an idle one would
        // otherwise stay open on a revoked certificate. A moment later, so the stream's
        // PERMISSION_DENIED reaches the daemon first (its calls are refused from now on).
        let identity = aviary_certs::Identity::Edge(req.node_id.clone());
        let connections = self.connections.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            connections.close(&identity);
        });
        Ok(Response::new(pb::RevokeNodeResponse { disconnected }))
    }

    type WatchWeightsStream = ReceiverStream<Result<pb::NodeWeights, Status>>;

    async fn watch_weights(
        &self,
        req: Request<pb::WatchWeightsRequest>,
    ) -> Result<Response<Self::WatchWeightsStream>, Status> {
        let selector = Selector::parse(&req.get_ref().selector)?;
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            // Subscribe before the snapshot so no change falls between the two.
            let mut updates = registry.subscribe_weights();
            'snapshot: loop {
                for w in registry.weights_snapshot(&selector) {
                    if tx.send(Ok(views::node_weights(w))).await.is_err() {
                        return;
                    }
                }
                loop {
                    let update = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        u = updates.recv() => u,
                    };
                    match update {
                        Ok(w) => {
                            let matches = registry
                                .labels(&w.node_id)
                                .is_some_and(|l| selector.matches(&l));
                            if matches && tx.send(Ok(views::node_weights(w))).await.is_err() {
                                return;
                            }
                        }
                        // Too slow to keep up: start over from a fresh snapshot.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue 'snapshot,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
