//! An admin connection to the control plane: one mTLS channel, every admin service.

use std::path::Path;

use anyhow::Context;
use aviary_certs::Link;
use aviary_certs::TlsFiles;
use aviary_proto::v1 as pb;
use tonic::transport::Channel;

/// Clients of the admin services over one channel.
pub struct Admin {
    /// `aviary.v1.Nodes`.
    pub nodes: pb::nodes_client::NodesClient<Channel>,
    /// `aviary.v1.Audit`.
    pub audit: pb::audit_client::AuditClient<Channel>,
    /// `aviary.v1.Releases`.
    pub releases: pb::releases_client::ReleasesClient<Channel>,
    /// `aviary.v1.Rollouts`.
    pub rollouts: pb::rollouts_client::RolloutsClient<Channel>,
    /// `aviary.v1.Configs`.
    pub configs: pb::configs_client::ConfigsClient<Channel>,
    /// `aviary.v1.Identities`.
    pub identities: pb::identities_client::IdentitiesClient<Channel>,
    /// This invocation's request ids start with this (random, or `--request-id`).
    request_base: String,
    /// Mutations sent so far.
    calls: u32,
}

/// A random request-id base: 16 bytes of the OS's randomness, in hex.
fn random_base() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Unique enough for one caller's retries: the id is scoped to the caller.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..16].copy_from_slice(&(now ^ u128::from(std::process::id())).to_be_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `client.method(request)` through `retried` (the request is cloned for each try):
/// `call!(admin.rollouts, abort_rollout, request)`.
macro_rules! call {
    ($client:expr, $method:ident, $request:expr) => {{
        let (client, request) = ($client.clone(), $request);
        $crate::client::retried(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.$method(request).await }
        })
        .await
    }};
}
pub(crate) use call;

/// Calls `call` again (at most twice more, 0.5 then 1 s later) while the control plane is
/// unreachable. Safe for a mutation only with a request id: a try that did land is then
/// answered, not repeated.
pub async fn retried<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut wait = std::time::Duration::from_millis(500);
    for _ in 0..2 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other.map(tonic::Response::into_inner),
        }
    }
    call().await.map(tonic::Response::into_inner)
}

impl Admin {
    /// Connects to `url` as admin `name` (`admin` → admin.pem, else admin-NAME.pem).
    pub async fn connect(url: &str, certs: &Path, name: &str) -> anyhow::Result<Admin> {
        let stem = if name == "admin" {
            "admin".to_owned()
        } else {
            format!("admin-{name}")
        };
        let files = TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("{stem}.pem")),
            key: certs.join(format!("{stem}.key")),
        };
        let channel = Link::new(url, &files)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the control plane at {url}"))?;
        Ok(Admin {
            nodes: pb::nodes_client::NodesClient::new(channel.clone()),
            audit: pb::audit_client::AuditClient::new(channel.clone()),
            releases: pb::releases_client::ReleasesClient::new(channel.clone()),
            rollouts: pb::rollouts_client::RolloutsClient::new(channel.clone()),
            configs: pb::configs_client::ConfigsClient::new(channel.clone()),
            identities: pb::identities_client::IdentitiesClient::new(channel),
            request_base: random_base(),
            calls: 0,
        })
    }

    /// Makes this invocation's request ids `BASE-1`, `BASE-2`, ...: a command run again
    /// with the same base repeats the same ids, and its mutations are answered, not redone.
    pub fn set_request_base(&mut self, base: &str) {
        self.request_base = base.to_owned();
    }

    /// The request id of the next mutation.
    pub fn request_id(&mut self) -> String {
        self.calls += 1;
        format!("{}-{}", self.request_base, self.calls)
    }

    /// `Nodes/SetWeight`: `module` gets `weight` on the nodes `selector` matches.
    pub async fn set_weight(
        &mut self,
        module: &str,
        weight: u32,
        selector: &str,
    ) -> Result<pb::SetWeightResponse, tonic::Status> {
        let request = pb::SetWeightRequest {
            module: module.to_owned(),
            weight,
            selector: selector.to_owned(),
            request_id: self.request_id(),
        };
        call!(self.nodes, set_weight, request)
    }

    /// `Nodes/GetNode`.
    pub async fn node(&mut self, node_id: &str) -> Result<pb::Node, tonic::Status> {
        let request = pb::GetNodeRequest {
            node_id: node_id.to_owned(),
        };
        Ok(self.nodes.get_node(request).await?.into_inner())
    }

    /// Every node `selector` and `filter` match, page after page.
    pub async fn all_nodes(
        &mut self,
        selector: &str,
        filter: &str,
    ) -> Result<Vec<pb::Node>, tonic::Status> {
        let client = self.nodes.clone();
        all_pages(|page_token| {
            let mut client = client.clone();
            let (selector, filter) = (selector.to_owned(), filter.to_owned());
            async move {
                let request = pb::ListNodesRequest {
                    selector,
                    filter,
                    page_size: 0,
                    page_token,
                };
                let r = client.list_nodes(request).await?.into_inner();
                Ok((r.nodes, r.next_page_token))
            }
        })
        .await
    }

    /// Every rollout (of `module`, or all), newest first, page after page.
    pub async fn all_rollouts(&mut self, module: &str) -> Result<Vec<pb::Rollout>, tonic::Status> {
        let client = self.rollouts.clone();
        all_pages(|page_token| {
            let (mut client, module) = (client.clone(), module.to_owned());
            async move {
                let request = pb::ListRolloutsRequest {
                    module,
                    page_size: 0,
                    page_token,
                };
                let r = client.list_rollouts(request).await?.into_inner();
                Ok((r.rollouts, r.next_page_token))
            }
        })
        .await
    }

    /// Every release (of `module`, or all), page after page.
    pub async fn all_releases(&mut self, module: &str) -> Result<Vec<pb::Release>, tonic::Status> {
        let client = self.releases.clone();
        all_pages(|page_token| {
            let (mut client, module) = (client.clone(), module.to_owned());
            async move {
                let request = pb::ListReleasesRequest {
                    module,
                    page_size: 0,
                    page_token,
                };
                let r = client.list_releases(request).await?.into_inner();
                Ok((r.releases, r.next_page_token))
            }
        })
        .await
    }

    /// Every event `filter` keeps, oldest first, page after page.
    pub async fn all_events(
        &mut self,
        filter: pb::EventFilter,
    ) -> Result<Vec<pb::Event>, tonic::Status> {
        let client = self.audit.clone();
        all_pages(|page_token| {
            let (mut client, filter) = (client.clone(), filter.clone());
            async move {
                let request = pb::ListEventsRequest {
                    filter: Some(filter),
                    page_token,
                    ..Default::default()
                };
                let r = client.list_events(request).await?.into_inner();
                Ok((r.events, r.next_page_token))
            }
        })
        .await
    }

    /// Every live config layer (of `module`, or all), page after page.
    pub async fn all_configs(
        &mut self,
        module: &str,
    ) -> Result<Vec<pb::ConfigLayer>, tonic::Status> {
        let client = self.configs.clone();
        all_pages(|page_token| {
            let (mut client, module) = (client.clone(), module.to_owned());
            async move {
                let request = pb::ListConfigsRequest {
                    module,
                    page_size: 0,
                    page_token,
                };
                let r = client.list_configs(request).await?.into_inner();
                Ok((r.layers, r.next_page_token))
            }
        })
        .await
    }
}

/// Calls `page` with each `next_page_token` until the last page; every item in order.
async fn all_pages<T, Fut>(mut page: impl FnMut(String) -> Fut) -> Result<Vec<T>, tonic::Status>
where
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}
