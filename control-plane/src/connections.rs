//! Open connections by identity: a cap per identity, so one certificate cannot use up
//! the open-files limit and lock the fleet out, one cap shared by every peer without a
//! certificate (they may only enroll), and a way to close every connection of an
//! identity at once (revocation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aviary_certs::Identity;
use tokio_util::sync::CancellationToken;

/// Connections open at once from peers without a client certificate: enough for a
/// factory line enrolling, too few to matter to the open-files limit.
const MAX_ANONYMOUS: usize = 128;

/// Each identity's open connections (by id) and the tokens that close them.
type Open = HashMap<Option<Identity>, Vec<(u64, CancellationToken)>>;

/// The connections of every identity.
#[derive(Debug)]
pub(crate) struct Connections {
    per_node: usize,
    per_admin: usize,
    /// Keyed `None` for peers without a client certificate.
    open: Mutex<Open>,
    next: std::sync::atomic::AtomicU64,
}

/// One registered connection; dropping it unregisters it.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    connections: Arc<Connections>,
    identity: Option<Identity>,
    id: u64,
    /// Cancelled when the connection must close.
    pub closed: CancellationToken,
}

impl Connections {
    /// At most `per_node` open connections for one edge identity, `per_admin` for one
    /// admin (operators run many tools at once; a gateway needs one, a few while an old
    /// connection times out).
    pub(crate) fn new(per_node: usize, per_admin: usize) -> Arc<Connections> {
        Arc::new(Connections {
            per_node: per_node.max(1),
            per_admin: per_admin.max(1),
            open: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection of `identity` (`None`: no client certificate), or says
    /// why not.
    pub(crate) fn register(
        self: &Arc<Self>,
        identity: Option<&Identity>,
    ) -> Result<ConnGuard, String> {
        let mut open = self.lock();
        let (cap, flag) = match identity {
            Some(Identity::Edge(_)) => (self.per_node, "--max-connections-per-node"),
            Some(_) => (self.per_admin, "the per-admin cap"),
            None => (MAX_ANONYMOUS, "the cap on peers without a certificate"),
        };
        let list = open.entry(identity.cloned()).or_default();
        if list.len() >= cap {
            let who = match identity {
                Some(i) => format!("{i} already holds"),
                None => "peers without a certificate already hold".to_owned(),
            };
            return Err(format!("{who} {} connections ({flag})", list.len()));
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let closed = CancellationToken::new();
        list.push((id, closed.clone()));
        metrics::gauge!("aviary_open_connections").increment(1.0);
        Ok(ConnGuard {
            connections: self.clone(),
            identity: identity.cloned(),
            id,
            closed,
        })
    }

    /// Closes every connection of `identity`; returns how many there were.
    pub(crate) fn close(&self, identity: &Identity) -> usize {
        let open = self.lock();
        let list = open
            .get(&Some(identity.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (_, token) in list {
            token.cancel();
        }
        list.len()
    }

    /// Open connections of `identity`.
    #[cfg(test)]
    pub(crate) fn count(&self, identity: &Identity) -> usize {
        self.lock().get(&Some(identity.clone())).map_or(0, Vec::len)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        if let Some(list) = open.get_mut(&self.identity) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                open.remove(&self.identity);
            }
        }
        metrics::gauge!("aviary_open_connections").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_per_identity_and_closing_all_of_one() {
        let c = Connections::new(2, 5);
        let gw = Identity::Edge("gw-1".into());
        let a = c.register(Some(&gw));
        let b = c.register(Some(&gw));
        assert!(a.is_ok() && b.is_ok());
        assert!(c.register(Some(&gw)).is_err());
        let other = c.register(Some(&Identity::Edge("gw-2".into())));
        assert!(other.is_ok());
        assert_eq!(c.close(&gw), 2);
        assert!(a.as_ref().is_ok_and(|g| g.closed.is_cancelled()));
        assert!(other.as_ref().is_ok_and(|g| !g.closed.is_cancelled()));
        drop(a);
        assert_eq!(c.count(&gw), 1);
        assert!(c.register(Some(&gw)).is_ok());
    }
}
