//! The gRPC face of the backend: thin tonic service implementations over
//! [`Core`]. `AgentService` accepts gzip- and zstd-compressed requests
//! (`grpc-encoding`; set up where the server is built, in `mod.rs`), with
//! the message size limit applied to the decompressed message.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::core::Core;
use crate::proto::{self, admin_service_server::AdminService, agent_service_server::AgentService};

fn auth<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

/// `uplink.v1.AgentService` over gRPC.
#[derive(Clone)]
pub struct Agents(pub Arc<Core>);

/// `uplink.v1.AdminService` over gRPC.
#[derive(Clone)]
pub struct Admin(pub Arc<Core>);

type FrameStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Agents {
    async fn enroll(
        &self,
        req: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        self.0.enroll(req.into_inner()).await.map(Response::new)
    }

    type SubscribeStream = FrameStream;

    async fn subscribe(
        &self,
        req: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let agent = self.0.authenticate_agent(auth(&req)).await?;
        let rx = self.0.subscribe(agent, req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn poll(
        &self,
        req: Request<proto::PollRequest>,
    ) -> Result<Response<proto::PollResponse>, Status> {
        let agent = self.0.authenticate_agent(auth(&req)).await?;
        self.0
            .poll(agent, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn report(
        &self,
        req: Request<proto::ReportRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        let agent = self.0.authenticate_agent(auth(&req)).await?;
        self.0
            .report(agent, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn push_metrics(
        &self,
        req: Request<proto::PushMetricsRequest>,
    ) -> Result<Response<proto::PushMetricsResponse>, Status> {
        let agent = self.0.authenticate_agent(auth(&req)).await?;
        self.0
            .push_metrics(agent, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn rotate_credential(
        &self,
        req: Request<proto::RotateCredentialRequest>,
    ) -> Result<Response<proto::RotateCredentialResponse>, Status> {
        let agent = self.0.authenticate_agent(auth(&req)).await?;
        self.0
            .rotate_credential(agent, req.into_inner())
            .await
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn revoke_agent(
        &self,
        req: Request<proto::RevokeAgentRequest>,
    ) -> Result<Response<proto::RevokeAgentResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0
            .revoke_agent(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_agents(
        &self,
        req: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0
            .list_agents(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_providers(
        &self,
        req: Request<proto::ListProvidersRequest>,
    ) -> Result<Response<proto::ListProvidersResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.list_providers().await.map(Response::new)
    }

    async fn create_provider(
        &self,
        req: Request<proto::CreateProviderRequest>,
    ) -> Result<Response<proto::CreateProviderResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0
            .create_provider(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn rotate_enrollment_token(
        &self,
        req: Request<proto::RotateEnrollmentTokenRequest>,
    ) -> Result<Response<proto::RotateEnrollmentTokenResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0
            .rotate_token(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn enqueue_command(
        &self,
        req: Request<proto::EnqueueCommandRequest>,
    ) -> Result<Response<proto::EnqueueCommandResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.enqueue(req.into_inner()).await.map(Response::new)
    }

    async fn get_command(
        &self,
        req: Request<proto::GetCommandRequest>,
    ) -> Result<Response<proto::GetCommandResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0
            .get_command(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_run(
        &self,
        req: Request<proto::CreateRunRequest>,
    ) -> Result<Response<proto::CreateRunResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.create_run(req.into_inner()).await.map(Response::new)
    }

    async fn list_runs(
        &self,
        req: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.list_runs(req.into_inner()).await.map(Response::new)
    }

    async fn get_run(
        &self,
        req: Request<proto::GetRunRequest>,
    ) -> Result<Response<proto::GetRunResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.get_run(req.into_inner()).await.map(Response::new)
    }

    async fn stop_run(
        &self,
        req: Request<proto::StopRunRequest>,
    ) -> Result<Response<proto::StopRunResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.stop_run(req.into_inner()).await.map(Response::new)
    }

    async fn get_run_logs(
        &self,
        req: Request<proto::GetRunLogsRequest>,
    ) -> Result<Response<proto::GetRunLogsResponse>, Status> {
        self.0.authenticate_admin(auth(&req))?;
        self.0.run_logs(req.into_inner()).await.map(Response::new)
    }
}
