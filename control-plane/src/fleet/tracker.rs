//! One stream's offer / ACK / NACK / park state for every resource it carries, free of
//! I/O: the session asks it what to send and tells it what was sent and answered.
//!
//! Per resource (weights, each module, each module's config):
//! * a revision is offered unless the node applied it, refused it (parked), or was
//!   already offered it on this stream;
//! * each send takes a fresh stream-local nonce and makes the resource's older nonces
//!   stale: an answer counts only with the latest nonce of its resource;
//! * an ACK makes the revision applied; a NACK parks it until the desired state moves
//!   to another revision (parked revisions come from the registry too, so a NACK holds
//!   across streams).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use aviary_proto::resource::Resource;

use crate::registry::Answer;

/// An answer to the latest send of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answered {
    /// The resource.
    pub resource: Resource,
    /// The revision the send carried.
    pub revision: u64,
    /// When that revision was committed (for `aviary_propagation_seconds`).
    pub committed_at: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
struct State {
    applied: Option<u64>,
    offered: Option<u64>,
    parked: Option<u64>,
}

#[derive(Debug)]
struct Sent {
    resource: Resource,
    revision: u64,
    committed_at: Instant,
}

/// The per-resource state of one stream (see module docs).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    resources: HashMap<Resource, State>,
    /// Latest nonce per resource, and what it carried.
    outstanding: HashMap<String, Sent>,
    next_nonce: u64,
}

impl Tracker {
    /// A tracker for a node that says it `applied` these revisions and was refused (by
    /// the registry's record) the `parked` ones.
    pub(crate) fn new(applied: &BTreeMap<Resource, u64>, parked: &BTreeMap<Resource, u64>) -> Self {
        let mut t = Tracker::default();
        for (r, rev) in applied {
            t.entry(r).applied = Some(*rev);
        }
        for (r, rev) in parked {
            t.entry(r).parked = Some(*rev);
        }
        t
    }

    fn entry(&mut self, r: &Resource) -> &mut State {
        self.resources.entry(r.clone()).or_default()
    }

    /// Whether `revision` of `r` should be offered now.
    pub(crate) fn wants(&self, r: &Resource, revision: u64) -> bool {
        let s = self.resources.get(r).copied().unwrap_or_default();
        ![s.applied, s.offered, s.parked].contains(&Some(revision))
    }

    /// Records that `revision` of `r` is being offered (a module update may still be
    /// planned before it is sent).
    pub(crate) fn offer(&mut self, r: &Resource, revision: u64) {
        self.entry(r).offered = Some(revision);
    }

    /// Forgets an offer that never reached the node (superseded while it was planned, or
    /// its transfer aborted), so the resource is offered again.
    pub(crate) fn withdraw(&mut self, r: &Resource) {
        self.entry(r).offered = None;
    }

    /// Records a send of `revision` of `r` and returns its nonce; the resource's older
    /// nonces go stale.
    pub(crate) fn sent(&mut self, r: Resource, revision: u64, committed_at: Instant) -> String {
        self.offer(&r, revision);
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        self.outstanding.retain(|_, s| s.resource != r);
        self.outstanding.insert(
            nonce.clone(),
            Sent {
                resource: r,
                revision,
                committed_at,
            },
        );
        nonce
    }

    /// Takes the node's answer to `nonce`: `None` when it is stale (not the latest send of
    /// its resource, or answered already).
    pub(crate) fn answer(&mut self, nonce: &str, answer: &Answer) -> Option<Answered> {
        let sent = self.outstanding.remove(nonce)?;
        let state = self.entry(&sent.resource);
        match answer {
            Answer::Ack => state.applied = Some(sent.revision),
            Answer::Nack(_) => state.parked = Some(sent.revision),
        }
        Some(Answered {
            resource: sent.resource,
            revision: sent.revision,
            committed_at: sent.committed_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(m: &str) -> Resource {
        Resource::Module(m.into())
    }

    #[test]
    fn a_revision_is_offered_once_unless_applied_or_parked() {
        let applied = [(Resource::Weights, 4)].into();
        let parked = [(module("a"), 7)].into();
        let mut t = Tracker::new(&applied, &parked);
        assert!(!t.wants(&Resource::Weights, 4), "applied per the Hello");
        assert!(t.wants(&Resource::Weights, 5));
        assert!(!t.wants(&module("a"), 7), "parked per the registry");
        assert!(t.wants(&module("a"), 8));
        let nonce = t.sent(Resource::Weights, 5, Instant::now());
        assert!(!t.wants(&Resource::Weights, 5), "offered on this stream");
        assert!(t.answer(&nonce, &Answer::Ack).is_some());
        t.withdraw(&Resource::Weights);
        assert!(!t.wants(&Resource::Weights, 5), "applied once ACKed");
        assert!(t.wants(&Resource::Weights, 6));
    }

    #[test]
    fn only_the_latest_nonce_of_a_resource_counts_and_only_once() {
        let mut t = Tracker::default();
        let first = t.sent(Resource::Config("a".into()), 1, Instant::now());
        let other = t.sent(module("a"), 3, Instant::now());
        let second = t.sent(Resource::Config("a".into()), 2, Instant::now());
        assert_eq!(t.answer(&first, &Answer::Ack), None, "stale");
        let got = t.answer(&second, &Answer::Ack);
        assert_eq!(
            got.map(|a| (a.resource, a.revision)),
            Some((Resource::Config("a".into()), 2))
        );
        assert_eq!(t.answer(&second, &Answer::Ack), None, "answered twice");
        assert!(
            t.answer(&other, &Answer::Ack).is_some(),
            "other resources keep theirs"
        );
        assert_eq!(t.answer("no-such-nonce", &Answer::Ack), None);
    }

    #[test]
    fn a_nack_parks_the_revision_until_the_desired_state_moves_on() {
        let mut t = Tracker::default();
        let nonce = t.sent(module("a"), 3, Instant::now());
        t.withdraw(&module("a"));
        assert!(t.wants(&module("a"), 3), "a withdrawn offer is made again");
        let answered = t.answer(&nonce, &Answer::Nack("crash loop".into()));
        assert_eq!(answered.map(|a| a.revision), Some(3));
        assert!(!t.wants(&module("a"), 3), "parked");
        assert!(t.wants(&module("a"), 4));
    }
}
