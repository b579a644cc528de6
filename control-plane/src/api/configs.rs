//! `aviary.v1.Configs`: runtime config layers of modules.

use std::sync::Arc;

use aviary_proto::overlay::RunOverlay;
use aviary_proto::v1 as pb;
use pb::configs_server::Configs;
use tonic::{Request, Response, Status};

use super::page::Pager;
use super::requests::{bare, mismatch, Begin, Requests};
use super::{caller, views};
use crate::catalog::Catalog;
use crate::error::bad_field;
use crate::layers::ConfigLayer;
use crate::registry::Registry;
use crate::requests::{Answered, RequestRecord};
use aviary_proto::manifest::{Manifest, RunSpec};

/// Implements `aviary.v1.Configs`.
pub(crate) struct ConfigsApi {
    registry: Arc<Registry>,
    catalog: Arc<Catalog>,
    pager: Arc<Pager>,
    requests: Arc<Requests>,
}

impl ConfigsApi {
    /// Serves the config layers of `registry`; overlays are checked against the run
    /// specs of the module's newest release in `catalog`.
    pub(crate) fn new(
        registry: Arc<Registry>,
        catalog: Arc<Catalog>,
        pager: Arc<Pager>,
        requests: Arc<Requests>,
    ) -> ConfigsApi {
        ConfigsApi {
            registry,
            catalog,
            pager,
            requests,
        }
    }

    /// Refuses variables the module's newest release does not let overlays set (the edge
    /// checks again against the release it runs; this is the early, clear error).
    async fn check_env(&self, module: &str, overlay: &RunOverlay) -> Result<(), Status> {
        let newest = self.catalog.list(Some(module.to_owned())).await?;
        let specs: Vec<RunSpec> = newest
            .first()
            .map(|r| {
                r.artifacts
                    .values()
                    .filter_map(|a| Manifest::parse(&a.manifest).ok()?.run)
                    .collect()
            })
            .unwrap_or_default();
        if specs.is_empty() {
            overlay.check_env(&RunSpec::default())
        } else {
            specs.iter().try_for_each(|spec| overlay.check_env(spec))
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// A config change's answer, replayed for a retried request id.
fn replayed(r: &RequestRecord) -> Result<Response<pb::SetConfigResponse>, Status> {
    let Answered::Config { node_ids, version } = &r.answered else {
        return Err(mismatch(r));
    };
    Ok(Response::new(pb::SetConfigResponse {
        node_ids: node_ids.clone(),
        version: *version,
        event_seq: r.event_seq,
    }))
}

fn required<'a>(what: &str, s: &'a str) -> Result<&'a str, Status> {
    if s.is_empty() {
        Err(bad_field(what, format!("{what} is required")))
    } else {
        Ok(s)
    }
}

#[tonic::async_trait]
impl Configs for ConfigsApi {
    async fn set_config(
        &self,
        req: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::SetConfigResponse>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        let body = bare(&req, |r| r.request_id.clear());
        let begun = self
            .requests
            .begin(&actor, &req.request_id, "SetConfig", body)
            .await?;
        if let Begin::Replay(r) = &begun {
            return replayed(r);
        }
        required("module", &req.module)?;
        let scope = views::scope_from(req.scope)?;
        let overlay = RunOverlay::from_proto(req.overlay.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_env(&req.module, &overlay).await?;
        let done = self
            .registry
            .change_config(&actor, &req.module, scope, Some(overlay), begun.note())
            .await?;
        Ok(Response::new(pb::SetConfigResponse {
            node_ids: done.node_ids,
            version: done.version,
            event_seq: done.event_seq,
        }))
    }

    async fn delete_config(
        &self,
        req: Request<pb::DeleteConfigRequest>,
    ) -> Result<Response<pb::SetConfigResponse>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        let body = bare(&req, |r| r.request_id.clear());
        let begun = self
            .requests
            .begin(&actor, &req.request_id, "DeleteConfig", body)
            .await?;
        if let Begin::Replay(r) = &begun {
            return replayed(r);
        }
        required("module", &req.module)?;
        let scope = views::scope_from(req.scope)?;
        let done = self
            .registry
            .change_config(&actor, &req.module, scope, None, begun.note())
            .await?;
        Ok(Response::new(pb::SetConfigResponse {
            node_ids: done.node_ids,
            version: done.version,
            event_seq: done.event_seq,
        }))
    }

    async fn list_configs(
        &self,
        req: Request<pb::ListConfigsRequest>,
    ) -> Result<Response<pb::ListConfigsResponse>, Status> {
        let req = req.into_inner();
        let want =
            self.pager
                .request("configs", &req.module, req.page_size, &req.page_token, 500)?;
        let module = (!req.module.is_empty()).then_some(req.module.as_str());
        // Merge order is (module, scope rank, seq): a key that sorts the same way.
        let key = |l: &ConfigLayer| format!("{}\0{}\0{:020}", l.module, l.scope.rank(), l.seq);
        let page = self.pager.page(
            "configs",
            &req.module,
            &want,
            self.registry.config_layers(module),
            key,
            |l, after| key(l).as_str() > after,
        );
        Ok(Response::new(pb::ListConfigsResponse {
            layers: page.items.iter().map(views::config_layer).collect(),
            next_page_token: page.next,
        }))
    }

    async fn get_config(
        &self,
        req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::NodeConfig>, Status> {
        let req = req.get_ref();
        let module = required("module", &req.module)?;
        let node_id = required("node_id", &req.node_id)?;
        Ok(Response::new(views::node_config(
            self.registry.node_config(module, node_id)?,
        )))
    }
}
