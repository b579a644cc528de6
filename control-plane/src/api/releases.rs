//! `aviary.v1.Releases`: signed uploads (metadata, then chunks and attachments), reads.

use std::sync::Arc;

use aviary_proto::v1 as pb;
use pb::releases_server::Releases;
use pb::upload_release_request::Kind;
use tonic::{Request, Response, Status, Streaming};

use super::page::Pager;
use super::{caller, views};
use crate::catalog::{list_order, Begin, Catalog};
use crate::error::ControlPlaneError;
use crate::limits::oversized;

/// The Releases service.
pub(crate) struct ReleasesApi {
    catalog: Arc<Catalog>,
    pager: Arc<Pager>,
}

impl ReleasesApi {
    /// Serves `catalog`.
    pub(crate) fn new(catalog: Arc<Catalog>, pager: Arc<Pager>) -> ReleasesApi {
        ReleasesApi { catalog, pager }
    }
}

fn invalid(m: &str) -> Status {
    Status::invalid_argument(m.to_owned())
}

#[tonic::async_trait]
impl Releases for ReleasesApi {
    async fn upload_release(
        &self,
        request: Request<Streaming<pb::UploadReleaseRequest>>,
    ) -> Result<Response<pb::Release>, Status> {
        let actor = caller(&request)?;
        let mut stream = request.into_inner();
        let first = stream.message().await.map_err(oversized)?;
        let Some(Kind::Metadata(meta)) = first.and_then(|m| m.kind) else {
            return Err(invalid(
                "the first message of an upload must be its metadata (manifest and signature)",
            ));
        };
        let (accepted, mut writer) = match self
            .catalog
            .begin(&actor, meta.manifest, meta.signature)
            .await?
        {
            // Identical artifact already stored: answer at once, the rest is redundant.
            Begin::Stored(record) => return Ok(Response::new(views::release(&record))),
            Begin::Receive(upload) => *upload,
        };
        let mut attachments = Vec::new();
        // A vanished client or a bad message returns here; dropping `writer` deletes the
        // partial file.
        while let Some(msg) = stream.message().await.map_err(oversized)? {
            match msg.kind {
                Some(Kind::Chunk(data)) => {
                    writer = self.catalog.write(writer, data.into()).await?;
                }
                Some(Kind::Attachment(a)) => {
                    let received = self.catalog.attachment(
                        &attachments,
                        a.name,
                        a.media_type,
                        a.data.into(),
                    )?;
                    attachments.push(received);
                }
                Some(Kind::Metadata(_)) => return Err(invalid("metadata may be sent only once")),
                None => return Err(invalid("UploadReleaseRequest without a kind")),
            }
        }
        tracing::debug!(bytes = writer.written(), "upload received");
        let record = self
            .catalog
            .finish(&actor, accepted, writer, attachments)
            .await?;
        Ok(Response::new(views::release(&record)))
    }

    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let r = request.into_inner();
        let record = self
            .catalog
            .get(&r.module, &r.version)
            .await?
            .ok_or_else(|| {
                ControlPlaneError::NotFound(format!("release {}@{}", r.module, r.version))
            })?;
        Ok(Response::new(views::release(&record)))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let req = request.into_inner();
        let want =
            self.pager
                .request("releases", &req.module, req.page_size, &req.page_token, 100)?;
        let module = Some(req.module.clone()).filter(|m| !m.is_empty());
        let releases = self.catalog.list(module).await?;
        let page = self.pager.page(
            "releases",
            &req.module,
            &want,
            releases,
            |r| format!("{}\0{}", r.module, r.version),
            |r, after| {
                let (m, v) = after.split_once('\0').unwrap_or((after, ""));
                list_order((&r.module, &r.version), (m, v)).is_gt()
            },
        );
        Ok(Response::new(pb::ListReleasesResponse {
            releases: page.items.iter().map(views::release).collect(),
            next_page_token: page.next,
        }))
    }

    async fn get_attachment(
        &self,
        request: Request<pb::GetAttachmentRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = request.into_inner();
        let (record, data) = self
            .catalog
            .attachment_bytes(&r.module, &r.version, &r.name)
            .await?;
        Ok(Response::new(pb::Attachment {
            name: r.name,
            media_type: record.media_type,
            data,
        }))
    }
}
