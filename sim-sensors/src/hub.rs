//! Every open subscription, the stub-wide counters, and the bridge fan-out.
//!
//! Invariant: a subscriber is in the hub exactly while its response stream exists, so
//! `subscribers` in status and metrics is the number of open `StreamImu` calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::pb;
use crate::subscriber::{End, Feed, Roster, Subscriber};

/// The registry of subscribers.
#[derive(Debug)]
pub struct Hub {
    subs: Mutex<BTreeMap<u64, Arc<Subscriber>>>,
    next_id: AtomicU64,
    sent: AtomicU64,
    retired_dropped: AtomicU64,
    cut: AtomicU64,
    /// Last injected timestamp per sensor: bridge time must move forward.
    bridge_clock: Mutex<HashMap<String, u64>>,
    hung_after: Duration,
    metrics: Metrics,
}

#[derive(Debug)]
struct Metrics {
    sent: metrics::Counter,
    dropped: metrics::Counter,
    subscribers: metrics::Gauge,
    cut: metrics::Counter,
    injected: metrics::Counter,
}

impl Hub {
    /// An empty hub; subscribers that take nothing for `hung_after` are cut off.
    pub fn new(hung_after: Duration) -> Hub {
        Hub {
            subs: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            sent: AtomicU64::new(0),
            retired_dropped: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            bridge_clock: Mutex::new(HashMap::new()),
            hung_after,
            metrics: Metrics {
                sent: metrics::counter!("aviary_sensor_samples_sent_total"),
                dropped: metrics::counter!("aviary_sensor_samples_dropped_total"),
                subscribers: metrics::gauge!("aviary_sensor_subscribers"),
                cut: metrics::counter!("aviary_sensor_subscribers_cut_total"),
                injected: metrics::counter!("aviary_sensor_samples_injected_total"),
            },
        }
    }

    fn subs(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Subscriber>>> {
        // Each critical section is one map operation; a poisoned map is still consistent.
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new subscriber with room for `capacity` samples.
    pub fn subscribe(
        &self,
        sensor_id: &str,
        peer: String,
        rate_hz: f64,
        feed: Feed,
        capacity: usize,
    ) -> Arc<Subscriber> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscriber::new(
            id,
            sensor_id.to_owned(),
            peer,
            rate_hz,
            feed,
            capacity,
        ));
        let mut subs = self.subs();
        subs.insert(id, sub.clone());
        self.metrics.subscribers.set(subs.len() as f64);
        sub
    }

    /// Forgets a subscriber whose stream is gone, keeping its drop count in the totals.
    pub fn remove(&self, sub: &Subscriber) {
        let mut subs = self.subs();
        if subs.remove(&sub.id).is_some() {
            self.retired_dropped
                .fetch_add(sub.dropped(), Ordering::Relaxed);
            self.metrics.subscribers.set(subs.len() as f64);
        }
    }

    /// Number of open subscriptions.
    pub fn len(&self) -> usize {
        self.subs().len()
    }

    /// True when nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts samples handed to clients.
    pub fn count_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.metrics.sent.increment(n);
    }

    /// Counts samples dropped from full queues.
    pub fn count_dropped(&self, n: u64) {
        if n > 0 {
            self.metrics.dropped.increment(n);
        }
    }

    /// Cuts `sub` off if its queue has been full and untouched for the hung deadline;
    /// true if it was.
    pub fn cut_if_hung(&self, sub: &Subscriber, now: Instant) -> bool {
        match sub.stalled_for(now) {
            Some(stalled) if stalled >= self.hung_after => {
                let queued = sub.queued() as u64;
                sub.end(End::Failed(
                    tonic::Code::DeadlineExceeded,
                    format!(
                        "subscriber read nothing for {:.1}s with its queue full; disconnected",
                        stalled.as_secs_f64()
                    ),
                ));
                self.count_dropped(queued);
                // Out of the status now: the call itself lingers until the client reads
                // or its connection goes, which may be never.
                self.remove(sub);
                self.cut.fetch_add(1, Ordering::Relaxed);
                self.metrics.cut.increment(1);
                tracing::warn!(stream = sub.id, peer = %sub.peer, sensor = %sub.sensor_id, "hung subscriber cut off");
                true
            }
            _ => false,
        }
    }

    /// Checks for a bridged sample that `timestamp_ns` moves its sensor's time forward.
    pub fn advance_bridge_clock(&self, sensor_id: &str, timestamp_ns: u64) -> Result<(), u64> {
        let mut clock = self.bridge_clock.lock().unwrap_or_else(|p| p.into_inner());
        match clock.get(sensor_id) {
            Some(last) if timestamp_ns <= *last => Err(*last),
            _ => {
                clock.insert(sensor_id.to_owned(), timestamp_ns);
                Ok(())
            }
        }
    }

    /// Fans a bridged sample out to every bridge subscriber of its sensor; returns how
    /// many received it.
    pub fn publish(&self, sample: &pb::ImuSample) -> usize {
        let now = Instant::now();
        let targets: Vec<Arc<Subscriber>> = self
            .subs()
            .values()
            .filter(|s| s.feed == Feed::Bridge && s.sensor_id == sample.sensor_id)
            .cloned()
            .collect();
        let mut reached = 0;
        for sub in targets {
            if sub.is_closed() || self.cut_if_hung(&sub, now) {
                continue;
            }
            let dropped = sub.push(now, sample.clone());
            self.count_dropped(dropped);
            reached += 1;
        }
        self.metrics.injected.increment(1);
        reached
    }

    /// Ends every subscription with UNAVAILABLE (shutdown).
    pub fn close_all(&self, reason: &str) {
        for sub in self.subs().values() {
            sub.end(End::Failed(tonic::Code::Unavailable, reason.to_owned()));
        }
    }

    /// Totals and one entry per open stream.
    pub fn status(&self) -> (u64, u64, u64, Vec<pb::StreamStatus>) {
        let subs = self.subs();
        let streams: Vec<pb::StreamStatus> = subs
            .values()
            .map(|s| pb::StreamStatus {
                id: s.id,
                sensor_id: s.sensor_id.clone(),
                peer: s.peer.clone(),
                rate_hz: s.rate_hz,
                samples_sent: s.sent(),
                samples_dropped: s.dropped(),
                queued: u32::try_from(s.queued()).unwrap_or(u32::MAX),
            })
            .collect();
        let dropped = self.retired_dropped.load(Ordering::Relaxed)
            + streams.iter().map(|s| s.samples_dropped).sum::<u64>();
        (
            self.sent.load(Ordering::Relaxed),
            dropped,
            self.cut.load(Ordering::Relaxed),
            streams,
        )
    }
}

impl Roster for Hub {
    fn count_sent(&self, n: u64) {
        Hub::count_sent(self, n);
    }

    fn remove(&self, sub: &Subscriber) {
        Hub::remove(self, sub);
    }
}
