//! Services of the contract whose implementation lands with later issues. They are served
//! so clients generated today see the whole API, and answer UNIMPLEMENTED saying when.

use aviary_proto::v1 as pb;
use pb::rollouts_server::Rollouts;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

fn rollouts() -> Status {
    Status::unimplemented(
        "aviary.v1.Rollouts arrives with deployments and canaries (issues 3 and 4)",
    )
}

/// `aviary.v1.Rollouts`, not yet implemented.
pub(crate) struct RolloutsApi;

#[tonic::async_trait]
impl Rollouts for RolloutsApi {
    async fn create_rollout(
        &self,
        _: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(rollouts())
    }
    async fn get_rollout(
        &self,
        _: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(rollouts())
    }
    async fn list_rollouts(
        &self,
        _: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        Err(rollouts())
    }
    async fn pause_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(rollouts())
    }
    async fn resume_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(rollouts())
    }
    async fn promote_rollout(
        &self,
        _: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(rollouts())
    }
    async fn abort_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(rollouts())
    }
    type WatchRolloutStream = ReceiverStream<Result<pb::Rollout, Status>>;
    async fn watch_rollout(
        &self,
        _: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        Err(rollouts())
    }
}
