//! `aviary.v1.Rollouts`: deployments without steps (everywhere at once) and aborts. Canary
//! steps, pause/resume/promote and watching arrive with the rollout engine (issue 4).

use std::sync::Arc;

use aviary_proto::v1 as pb;
use pb::rollouts_server::Rollouts;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::caller;
use crate::audit::timestamp;
use crate::catalog::Catalog;
use crate::deploy::{DeployState, Deployment};
use crate::error::ControlPlaneError;
use crate::registry::{DeployProgress, Registry};
use crate::selector::Selector;

/// The Rollouts service.
pub(crate) struct RolloutsApi {
    registry: Arc<Registry>,
    catalog: Arc<Catalog>,
}

impl RolloutsApi {
    /// Serves rollouts of `catalog` releases over `registry`'s nodes.
    pub(crate) fn new(registry: Arc<Registry>, catalog: Arc<Catalog>) -> RolloutsApi {
        RolloutsApi { registry, catalog }
    }
}

fn issue4(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} arrives with canary rollouts (issue 4); rollouts without steps deploy everywhere at once"
    ))
}

/// The wire form of a deployment.
fn view(d: &Deployment, p: DeployProgress) -> pb::Rollout {
    pb::Rollout {
        id: d.id.clone(),
        module: d.module.clone(),
        version: d.version.clone(),
        selector: d.selector.to_string(),
        state: match d.state {
            DeployState::Progressing => pb::RolloutState::Progressing,
            DeployState::Succeeded => pb::RolloutState::Succeeded,
            DeployState::Aborted => pb::RolloutState::Aborted,
            DeployState::Failed => pb::RolloutState::Failed,
        } as i32,
        current_step: 0,
        steps: Vec::new(),
        message: if p.skipped > 0 {
            format!(
                "{} ({} node(s) skipped: no artifact for their arch)",
                d.message, p.skipped
            )
        } else {
            d.message.clone()
        },
        created_at: Some(timestamp(d.created_ms)),
        updated_at: Some(timestamp(d.updated_ms)),
        progress: Some(pb::StepProgress {
            selected: p.selected,
            canaries: p.selected,
            installed: p.installed,
            healthy: p.installed,
            failed: p.failed,
        }),
    }
}

#[tonic::async_trait]
impl Rollouts for RolloutsApi {
    async fn create_rollout(
        &self,
        request: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let r = request.into_inner();
        if !r.steps.is_empty() {
            return Err(issue4("a rollout with canary steps"));
        }
        aviary_proto::manifest::validate_module_name(&r.module)
            .map_err(|e| ControlPlaneError::InvalidArgument(e.to_string()))?;
        aviary_proto::manifest::parse_version(&r.version)
            .map_err(|e| ControlPlaneError::InvalidArgument(e.to_string()))?;
        let selector = Selector::parse(&r.selector)?;
        if self.catalog.get(&r.module, &r.version).await?.is_none() {
            return Err(ControlPlaneError::FailedPrecondition(format!(
                "release {} {} is not uploaded (aviary release upload)",
                r.module, r.version
            ))
            .into());
        }
        let d = self
            .registry
            .create_deployment(&actor, &r.module, &r.version, selector)
            .await?;
        let (d, p) = self.registry.deployment(&d.id)?;
        Ok(Response::new(view(&d, p)))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let (d, p) = self.registry.deployment(&request.get_ref().id)?;
        Ok(Response::new(view(&d, p)))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let module = Some(request.get_ref().module.as_str()).filter(|m| !m.is_empty());
        let rollouts = self
            .registry
            .deployments(module)
            .into_iter()
            .rev()
            .map(|(d, p)| view(&d, p))
            .collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn pause_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(issue4("PauseRollout"))
    }

    async fn resume_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(issue4("ResumeRollout"))
    }

    async fn promote_rollout(
        &self,
        _: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(issue4("PromoteRollout"))
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let actor = caller(&request)?;
        let id = request.into_inner().id;
        self.registry
            .abort_deployment(&actor, &id, "aborted by operator")
            .await?;
        let (d, p) = self.registry.deployment(&id)?;
        Ok(Response::new(view(&d, p)))
    }

    type WatchRolloutStream = ReceiverStream<Result<pb::Rollout, Status>>;
    async fn watch_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        Err(issue4("WatchRollout"))
    }
}
