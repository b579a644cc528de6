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
            configs: pb::configs_client::ConfigsClient::new(channel),
        })
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
        };
        Ok(self.nodes.set_weight(request).await?.into_inner())
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
