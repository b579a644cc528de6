//! The journal: the one path a durable change takes — persist, with its audit events, in
//! one store commit, then publish those events to watchers.
//!
//! Everything that writes goes through `Journal::commit`: the registry's mutations, the
//! catalog's uploads, and the refusals that `auth` and `listener` audit. Keeping it one
//! call is what lets it become one etcd transaction when replicas arrive
//! (ARCHITECTURE.md, "Replicas"): a `Change` already names every record it writes and
//! the revision it takes, so a replicated store can compare-and-swap on that revision
//! instead of relying on this process being the only writer.
//!
//! Invariant: an event is published only after the commit that holds it returned, so a
//! watcher never sees an event the store could lose.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::audit::{Event, EventFilter, NewEvent};
use crate::error::ControlPlaneError;
use crate::store::{Change, Store};

/// Commits changes with their audit events and publishes the events (see module docs).
pub(crate) struct Journal {
    store: Arc<dyn Store>,
    events: broadcast::Sender<Event>,
}

impl Journal {
    /// A journal over `store`.
    pub(crate) fn new(store: Arc<dyn Store>) -> Journal {
        Journal {
            store,
            events: broadcast::channel(1024).0,
        }
    }

    /// The store behind the journal, for reads.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Applies `change` atomically in the store, then publishes its audit events.
    pub(crate) async fn commit(&self, change: Change) -> Result<Vec<Event>, ControlPlaneError> {
        let store = self.store.clone();
        let stored = blocking(move || store.commit(change)).await??;
        for event in &stored {
            // No watcher is not an error: the event is stored either way.
            let _ = self.events.send(event.clone());
        }
        Ok(stored)
    }

    /// Records one audit event; `durable` flushes before returning. Returns its number.
    pub(crate) async fn audit(
        &self,
        event: NewEvent,
        durable: bool,
    ) -> Result<u64, ControlPlaneError> {
        let stored = self
            .commit(Change {
                events: vec![event],
                durable,
                ..Default::default()
            })
            .await?;
        Ok(stored.first().map_or(0, |e| e.seq))
    }

    /// Audit events as they are committed.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Stored audit events after `after_seq` matching `filter`, at most `limit`.
    pub(crate) async fn events(
        &self,
        after_seq: u64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, ControlPlaneError> {
        let store = self.store.clone();
        Ok(blocking(move || store.events(after_seq, &filter, limit)).await??)
    }
}

/// Runs store I/O off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ControlPlaneError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlPlaneError::Unavailable(format!("store task: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[tokio::test]
    async fn events_are_published_only_once_committed_and_read_back_in_order() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let journal = Journal::new(Arc::new(SledStore::open(dir.path())?));
        let mut live = journal.subscribe();
        let first = journal
            .audit(NewEvent::new("admin/a", "x.one", "t", "d"), true)
            .await?;
        let second = journal
            .audit(NewEvent::new("admin/a", "x.two", "t", "d"), false)
            .await?;
        assert!(second > first);
        assert_eq!(live.try_recv()?.action, "x.one");
        assert_eq!(live.try_recv()?.action, "x.two");
        let stored = journal.events(0, EventFilter::default(), 10).await?;
        let actions: Vec<_> = stored.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["x.one", "x.two"]);
        Ok(())
    }
}
