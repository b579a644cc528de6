//! One `StreamImu` call: a bounded queue between whoever produces samples (the pacer
//! thread, the bridge) and the gRPC response stream, plus its counters.
//!
//! Invariant: a producer never waits for a subscriber. A full queue drops its oldest
//! sample and counts it, so one slow client costs the others nothing; a client that takes
//! nothing for the hung deadline is cut off.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tonic::Status;

use crate::pb;
use crate::source::{SampleStream, Tick};

/// How a subscription ended, as the client will see it.
#[derive(Clone, Debug)]
pub enum End {
    /// The source ran out (replay without `--loop`): the call ends OK.
    Finished,
    /// Ended by the stub: the call ends with this status.
    Failed(tonic::Code, String),
}

#[derive(Debug)]
struct Queue {
    samples: VecDeque<(Instant, pb::ImuSample)>,
    waker: Option<Waker>,
    end: Option<End>,
    last_take: Instant,
}

/// Where a subscriber's samples come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Pushed by the pacer thread.
    Paced,
    /// Generated as fast as the client reads (speed 0).
    Pulled,
    /// Pushed by `InjectImu` callers.
    Bridge,
}

/// A subscription's shared state.
#[derive(Debug)]
pub struct Subscriber {
    /// Unique within the stub's lifetime.
    pub id: u64,
    /// The sensor it reads.
    pub sensor_id: String,
    /// The client's address.
    pub peer: String,
    /// Samples per second asked for (0 for replay and bridge: as recorded or injected).
    pub rate_hz: f64,
    /// How samples arrive.
    pub feed: Feed,
    capacity: usize,
    queue: Mutex<Queue>,
    sent: AtomicU64,
    dropped: AtomicU64,
    /// Set when the response stream is gone (client left or call ended).
    closed: AtomicBool,
    lag: metrics::Gauge,
}

impl Subscriber {
    /// A subscriber with room for `capacity` queued samples.
    pub fn new(
        id: u64,
        sensor_id: String,
        peer: String,
        rate_hz: f64,
        feed: Feed,
        capacity: usize,
    ) -> Subscriber {
        Subscriber {
            id,
            lag: metrics::gauge!("aviary_sensor_stream_lag_seconds", "stream" => id.to_string(), "sensor" => sensor_id.clone()),
            sensor_id,
            peer,
            rate_hz,
            feed,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                // Grows only as far as the client falls behind: most queues hold a sample
                // or two, so reserving --queue-depth for each would waste memory.
                samples: VecDeque::new(),
                waker: None,
                end: None,
                last_take: Instant::now(),
            }),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // critical section is a single push or pop), so poisoning is ignored.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a sample due at `due`; returns how many old samples were dropped for it.
    pub fn push(&self, due: Instant, sample: pb::ImuSample) -> u64 {
        let mut q = self.lock();
        if q.end.is_some() {
            return 0;
        }
        let mut dropped = 0;
        while q.samples.len() >= self.capacity {
            q.samples.pop_front();
            dropped += 1;
        }
        q.samples.push_back((due, sample));
        let waker = q.waker.take();
        drop(q);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if let Some(w) = waker {
            w.wake();
        }
        dropped
    }

    /// Ends the subscription once the queued samples are taken (`Finished`) or at once
    /// (`Failed`).
    pub fn end(&self, end: End) {
        let mut q = self.lock();
        if q.end.is_some() {
            return;
        }
        if matches!(end, End::Failed(..)) {
            let discarded = q.samples.len() as u64;
            q.samples.clear();
            self.dropped.fetch_add(discarded, Ordering::Relaxed);
        }
        q.end = Some(end);
        let waker = q.waker.take();
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// True once the client's stream is gone or the subscription ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// How long a full queue has gone without the client taking a sample.
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        let q = self.lock();
        (q.samples.len() >= self.capacity && q.end.is_none())
            .then(|| now.saturating_duration_since(q.last_take))
    }

    /// Samples taken by the client.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Samples dropped from the full queue.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Samples waiting.
    pub fn queued(&self) -> usize {
        self.lock().samples.len()
    }

    /// Counts a sample the client took (pulled streams bypass the queue).
    pub(crate) fn taken(&self, due: Instant, now: Instant) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.lag
            .set(now.saturating_duration_since(due).as_secs_f64());
    }
}

/// What a response stream tells the set of subscriptions it belongs to (the hub): a
/// trait, so that the hub may know subscribers without subscribers knowing the hub.
pub trait Roster: Send + Sync {
    /// Counts samples sent to clients.
    fn count_sent(&self, n: u64);
    /// Forgets `sub` (its call went away).
    fn remove(&self, sub: &Subscriber);
}

/// The response stream tonic sends: takes from the queue, counts, and unregisters from
/// the hub when the call goes away.
pub struct QueueStream {
    sub: Arc<Subscriber>,
    hub: Arc<dyn Roster>,
    done: bool,
}

impl QueueStream {
    /// Streams `sub`'s queue; `hub` forgets it when dropped.
    pub fn new(sub: Arc<Subscriber>, hub: Arc<dyn Roster>) -> QueueStream {
        QueueStream {
            sub,
            hub,
            done: false,
        }
    }
}

impl Stream for QueueStream {
    type Item = Result<pb::ImuSample, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut q = self.sub.lock();
        if let Some((due, sample)) = q.samples.pop_front() {
            let now = Instant::now();
            q.last_take = now;
            drop(q);
            self.sub.taken(due, now);
            self.hub.count_sent(1);
            return Poll::Ready(Some(Ok(sample)));
        }
        match q.end.clone() {
            Some(End::Finished) => {
                drop(q);
                self.done = true;
                Poll::Ready(None)
            }
            Some(End::Failed(code, message)) => {
                drop(q);
                self.done = true;
                Poll::Ready(Some(Err(Status::new(code, message))))
            }
            None => {
                q.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for QueueStream {
    fn drop(&mut self) {
        self.sub.closed.store(true, Ordering::Relaxed);
        self.hub.remove(&self.sub);
    }
}

/// Dropped samples in a row a pulled stream skips before yielding to the runtime, so a
/// dropout rate near 1 cannot spin a worker.
const MAX_SKIPS_PER_POLL: usize = 1024;

/// The response stream at speed 0: samples are generated as the client reads, so the
/// client's pace (HTTP/2 flow control) is the only limit and nothing is ever dropped.
pub struct PulledStream {
    stream: SampleStream,
    sub: Arc<Subscriber>,
    hub: Arc<dyn Roster>,
    done: bool,
}

impl PulledStream {
    /// Serves `stream` to `sub` as fast as it is read.
    pub fn new(stream: SampleStream, sub: Arc<Subscriber>, hub: Arc<dyn Roster>) -> PulledStream {
        PulledStream {
            stream,
            sub,
            hub,
            done: false,
        }
    }
}

impl Stream for PulledStream {
    type Item = Result<pb::ImuSample, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Shutdown and other stub-side endings reach pulled streams through the queue's end.
        let end = self.sub.lock().end.clone();
        if let Some(end) = end {
            self.done = true;
            return Poll::Ready(match end {
                End::Finished => None,
                End::Failed(code, message) => Some(Err(Status::new(code, message))),
            });
        }
        for _ in 0..MAX_SKIPS_PER_POLL {
            match self.stream.next_tick() {
                None => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Some(Tick {
                    sample: Some(sample),
                    ..
                }) => {
                    let now = Instant::now();
                    self.sub.taken(now, now);
                    self.hub.count_sent(1);
                    return Poll::Ready(Some(Ok(sample)));
                }
                Some(Tick { sample: None, .. }) => {}
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for PulledStream {
    fn drop(&mut self) {
        self.sub.closed.store(true, Ordering::Relaxed);
        self.hub.remove(&self.sub);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> pb::ImuSample {
        pb::ImuSample {
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn full_queue_drops_oldest_and_counts() {
        let sub = Subscriber::new(1, "imu0".into(), "test".into(), 0.0, Feed::Bridge, 3);
        let now = Instant::now();
        for seq in 0..5 {
            sub.push(now, sample(seq));
        }
        assert_eq!(sub.dropped(), 2);
        let q = sub.lock();
        let seqs: Vec<u64> = q.samples.iter().map(|(_, s)| s.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        drop(q);
        assert!(sub.stalled_for(now + Duration::from_secs(1)).is_some());
        sub.end(End::Failed(tonic::Code::DeadlineExceeded, "slow".into()));
        assert_eq!(sub.queued(), 0);
        assert_eq!(sub.dropped(), 5);
    }
}
