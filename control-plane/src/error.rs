//! The control plane's error type and its one mapping to gRPC status codes.

/// Everything a control-plane operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// Field `field` of the request is malformed (a `BadRequest` field violation).
    #[error("{message}")]
    BadField {
        /// The request field, as the proto names it (`selector`, `steps[2]`).
        field: String,
        /// Why it is refused.
        message: String,
    },
    /// The request conflicts with the state of a named thing (an `ErrorInfo` with a
    /// stable `reason` and what is in the way in its metadata).
    #[error("{message}")]
    Conflict {
        /// Stable, UPPER_SNAKE: `ROLLOUT_IN_PROGRESS`, `RELEASE_NOT_UPLOADED`, ...
        reason: &'static str,
        /// For people.
        message: String,
        /// What is in the way (`rollout_id`, `module`, ...).
        metadata: Vec<(&'static str, String)>,
    },
    /// A node, event or other named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The caller's identity may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named thing exists already with other content.
    #[error("{0}")]
    AlreadyExists(String),
    /// A size or space limit refuses the request.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request conflicts with the current state (e.g. a rollout owns the module).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Overloaded or shutting down; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The metadata store failed; nothing was acknowledged.
    #[error("store: {0}")]
    Store(#[from] crate::store::error::StoreError),
    /// TLS or PKI files could not be loaded.
    #[error("certificates: {0}")]
    Certs(#[from] aviary_certs::CertsError),
    /// A socket could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The `ErrorInfo.domain` of every Aviary refusal.
pub(crate) const ERROR_DOMAIN: &str = "aviary";

/// A refusal of `code` with `google.rpc` details: an `ErrorInfo` always (`reason`, in the
/// Aviary domain, with `metadata`), plus whatever `more` adds.
pub(crate) fn refusal(
    code: tonic::Code,
    message: impl Into<String>,
    reason: &str,
    metadata: Vec<(&'static str, String)>,
    more: impl FnOnce(&mut tonic_types::ErrorDetails),
) -> tonic::Status {
    use tonic_types::StatusExt;
    let metadata: std::collections::HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let mut details = tonic_types::ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    more(&mut details);
    tonic::Status::with_error_details(code, message, details)
}

/// `INVALID_ARGUMENT` naming `field` in a `BadRequest` field violation.
pub(crate) fn bad_field(field: &str, message: impl Into<String>) -> tonic::Status {
    let message = message.into();
    let description = message.clone();
    refusal(
        tonic::Code::InvalidArgument,
        message,
        "INVALID_FIELD",
        vec![("field", field.to_owned())],
        |d| {
            d.add_bad_request_violation(field, description);
        },
    )
}

impl From<ControlPlaneError> for tonic::Status {
    fn from(e: ControlPlaneError) -> tonic::Status {
        use tonic::Code;
        use ControlPlaneError::*;
        let plain = |code, reason: &str, m: &str| refusal(code, m, reason, Vec::new(), |_| ());
        match &e {
            InvalidArgument(m) => plain(Code::InvalidArgument, "INVALID_ARGUMENT", m),
            BadField { field, message } => bad_field(field, message.clone()),
            Conflict {
                reason,
                message,
                metadata,
            } => refusal(
                Code::FailedPrecondition,
                message.clone(),
                reason,
                metadata.clone(),
                |_| (),
            ),
            NotFound(what) => {
                // "node gw-1", "rollout r-7", "release gateway@1.2.0": kind, then name.
                let (kind, name) = what.split_once(' ').unwrap_or(("resource", what));
                let message = e.to_string();
                let description = message.clone();
                refusal(Code::NotFound, message, "NOT_FOUND", Vec::new(), |d| {
                    d.set_resource_info(kind, name, "", description);
                })
            }
            PermissionDenied(m) => plain(Code::PermissionDenied, "PERMISSION_DENIED", m),
            FailedPrecondition(m) => plain(Code::FailedPrecondition, "FAILED_PRECONDITION", m),
            AlreadyExists(m) => plain(Code::AlreadyExists, "ALREADY_EXISTS", m),
            ResourceExhausted(m) => plain(Code::ResourceExhausted, "RESOURCE_EXHAUSTED", m),
            Unavailable(m) => plain(Code::Unavailable, "UNAVAILABLE", m),
            // The disk failed: nothing was acknowledged, and a retry may succeed.
            Store(s) if s.is_io() => {
                tracing::error!(error = %e, "store unavailable");
                tonic::Status::unavailable(format!("{e}; nothing was changed, retry later"))
            }
            Store(_) | Certs(_) | Io { .. } | Transport(_) => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn every_refusal_carries_error_info_and_its_own_details() {
        let s = tonic::Status::from(ControlPlaneError::BadField {
            field: "selector".into(),
            message: "selector term \"x\" is not key=value".into(),
        });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let d = s.get_error_details();
        let v = d
            .bad_request()
            .map(|b| b.field_violations.clone())
            .unwrap_or_default();
        assert_eq!(v.first().map(|v| v.field.as_str()), Some("selector"));

        let s = tonic::Status::from(ControlPlaneError::Conflict {
            reason: "ROLLOUT_IN_PROGRESS",
            message: "rollout r-3 of gateway 1.1.0 is in progress".into(),
            metadata: vec![("rollout_id", "r-3".into())],
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let info = s.get_error_details().error_info().cloned();
        assert_eq!(
            info.as_ref().map(|i| i.reason.as_str()),
            Some("ROLLOUT_IN_PROGRESS")
        );
        assert_eq!(info.as_ref().map(|i| i.domain.as_str()), Some(ERROR_DOMAIN));
        assert_eq!(
            info.and_then(|i| i.metadata.get("rollout_id").cloned())
                .as_deref(),
            Some("r-3")
        );

        let s = tonic::Status::from(ControlPlaneError::NotFound("node gw-9".into()));
        assert_eq!(s.message(), "node gw-9 not found");
        let r = s.get_error_details().resource_info().cloned();
        assert_eq!(
            r.map(|r| (r.resource_type, r.resource_name)),
            Some(("node".to_owned(), "gw-9".to_owned()))
        );

        let s = tonic::Status::from(ControlPlaneError::Unavailable("busy".into()));
        let reason = s.get_error_details().error_info().map(|i| i.reason.clone());
        assert_eq!(reason.as_deref(), Some("UNAVAILABLE"));
    }
}
