//! Request ids where they enter (AIP-155): the id is checked, a recorded answer is
//! replayed, and calls that carry an id run one at a time, so a retry racing its first
//! try waits for it and then replays it.
//!
//! With replicas, the one-at-a-time lock is per process; the store's commit of the
//! record is what must refuse a second writer (an etcd transaction comparing the key's
//! create revision to 0).

use std::sync::Arc;

use aviary_certs::Identity;
use tokio::sync::{Mutex, MutexGuard};
use tonic::Status;

use crate::error::{bad_field, ControlPlaneError};
use crate::journal::{blocking, Journal};
use crate::requests::{check_id, RequestNote, RequestRecord};

/// The request ids of the admin API.
pub(crate) struct Requests {
    journal: Arc<Journal>,
    one_at_a_time: Mutex<()>,
}

/// How a mutation with a request id goes on.
pub(crate) enum Begin<'a> {
    /// No request id: run as usual.
    Untracked,
    /// First use: run, recording `note` with the mutation's commit; a retry waits for
    /// `_turn` until then.
    Fresh {
        /// What to record.
        note: RequestNote,
        /// Held until the call returns.
        _turn: MutexGuard<'a, ()>,
    },
    /// Answered before: this is what it said.
    Replay(RequestRecord),
}

impl Begin<'_> {
    /// The note to record with the mutation, if any.
    pub(crate) fn note(&self) -> Option<RequestNote> {
        match self {
            Begin::Fresh { note, .. } => Some(note.clone()),
            _ => None,
        }
    }
}

/// `request` encoded with its request id cleared (what a retry must repeat).
pub(crate) fn bare<M: prost::Message + Clone>(request: &M, clear: impl FnOnce(&mut M)) -> Vec<u8> {
    let mut m = request.clone();
    clear(&mut m);
    m.encode_to_vec()
}

/// A recorded answer of another kind than the method's (the digest covers the method, so
/// only a corrupt store says this).
pub(crate) fn mismatch(r: &RequestRecord) -> Status {
    Status::internal(format!("request id record answers {:?}", r.answered))
}

impl Requests {
    /// Request ids kept in `journal`'s store.
    pub(crate) fn new(journal: Arc<Journal>) -> Requests {
        Requests {
            journal,
            one_at_a_time: Mutex::new(()),
        }
    }

    /// Starts `caller`'s `method` call with request id `id`; `body` is the request with its
    /// id cleared, encoded. A recorded id with another body is refused.
    pub(crate) async fn begin(
        &self,
        caller: &Identity,
        id: &str,
        method: &str,
        body: Vec<u8>,
    ) -> Result<Begin<'_>, Status> {
        if id.is_empty() {
            return Ok(Begin::Untracked);
        }
        check_id(id).map_err(|e| bad_field("request_id", e))?;
        let note = RequestNote::new(&caller.to_string(), id, method, &body);
        let guard = self.one_at_a_time.lock().await;
        let store = self.journal.store().clone();
        let key = note.key.clone();
        let found = blocking(move || store.request(&key))
            .await?
            .map_err(ControlPlaneError::from)?;
        match found {
            None => Ok(Begin::Fresh { note, _turn: guard }),
            Some(r) if r.digest == note.digest => {
                metrics::counter!("aviary_requests_replayed_total").increment(1);
                Ok(Begin::Replay(r))
            }
            Some(_) => Err(bad_field(
                "request_id",
                format!("request_id {id:?} was already used for a different request"),
            )),
        }
    }
}
