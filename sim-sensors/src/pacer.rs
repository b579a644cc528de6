//! The pacer: one thread that wakes at each sample's due time and pushes it to its
//! subscriber's queue.
//!
//! Why a thread and not tokio timers: tokio's timer wheel has millisecond resolution, so
//! at 1 kHz every sample would be up to a whole period late. A thread parked with a
//! futex timeout wakes within tens of microseconds, and one thread serves every paced
//! stream from a single deadline heap. Invariant: due times are computed from the
//! stream's start and each sample's sensor time, never from the previous wake-up, so a
//! late wake-up delays samples but never shifts the ones after it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hub::Hub;
use crate::source::{SampleStream, Tick};
use crate::subscriber::{End, Subscriber};

/// Samples due within this much of now are sent in the same wake-up.
const SLACK: Duration = Duration::from_micros(20);
/// Paced streams start on this grid, so streams of one rate share their due times and
/// one wake-up serves them all (100 subscribers at 1 kHz: 1,000 wake-ups a second, not
/// 100,000).
const START_GRID: Duration = Duration::from_millis(1);
/// How often full queues are checked for hung clients.
const HUNG_CHECK: Duration = Duration::from_millis(100);

/// A stream the pacer serves.
struct Job {
    stream: SampleStream,
    sub: Arc<Subscriber>,
    start: Instant,
    first_ns: u64,
    speed: f64,
    tick: Tick,
}

impl Job {
    fn due(&self) -> Instant {
        let elapsed_ns = (self.tick.sensor_ns - self.first_ns) as f64 / self.speed;
        self.start + Duration::from_nanos(elapsed_ns as u64)
    }
}

struct Shared {
    incoming: Mutex<Vec<Job>>,
    stop: AtomicBool,
}

/// Handle to the pacer thread; dropping it stops the thread.
pub struct Pacer {
    epoch: Instant,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Pacer {
    /// Starts the pacer thread.
    pub fn start(hub: Arc<Hub>) -> std::io::Result<Pacer> {
        let shared = Arc::new(Shared {
            incoming: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let thread = std::thread::Builder::new()
            .name("aviary-pacer".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared, &hub)
            })?;
        Ok(Pacer {
            epoch: Instant::now(),
            shared,
            thread: Some(thread),
        })
    }

    /// Paces `stream` into `sub` at `speed` × real time, starting now.
    pub fn add(&self, mut stream: SampleStream, sub: Arc<Subscriber>, speed: f64) {
        let Some(tick) = stream.next_tick() else {
            sub.end(End::Finished);
            return;
        };
        let job = Job {
            first_ns: tick.sensor_ns,
            stream,
            sub,
            start: self.next_grid_point(),
            speed,
            tick,
        };
        self.shared
            .incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Pacer {
    /// The first point of [`START_GRID`] from now on.
    fn next_grid_point(&self) -> Instant {
        let grid = START_GRID.as_nanos();
        let since = Instant::now().duration_since(self.epoch).as_nanos();
        let steps = since.div_ceil(grid);
        self.epoch + Duration::from_nanos(u64::try_from(steps * grid).unwrap_or(u64::MAX))
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, hub: &Hub) {
    let mut jobs: HashMap<u64, Job> = HashMap::new();
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut next_hung_check = Instant::now() + HUNG_CHECK;
    while !shared.stop.load(Ordering::Relaxed) {
        for job in shared
            .incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            heap.push(Reverse((job.due(), job.sub.id)));
            jobs.insert(job.sub.id, job);
        }
        let mut now = Instant::now();
        while let Some(Reverse((due, id))) = heap.peek().copied() {
            if due > now + SLACK {
                break;
            }
            heap.pop();
            let Some(job) = jobs.get_mut(&id) else {
                continue;
            };
            if job.sub.is_closed() {
                jobs.remove(&id);
                continue;
            }
            if let Some(sample) = job.tick.sample.take() {
                hub.count_dropped(job.sub.push(due, sample));
            }
            match job.stream.next_tick() {
                Some(tick) => {
                    job.tick = tick;
                    heap.push(Reverse((job.due(), id)));
                }
                None => {
                    job.sub.end(End::Finished);
                    jobs.remove(&id);
                }
            }
            now = Instant::now();
        }
        if now >= next_hung_check {
            jobs.retain(|_, job| !job.sub.is_closed() && !hub.cut_if_hung(&job.sub, now));
            next_hung_check = now + HUNG_CHECK;
        }
        let wake = heap
            .peek()
            .map(|Reverse((due, _))| *due)
            .unwrap_or(next_hung_check)
            .min(next_hung_check);
        let now = Instant::now();
        if wake > now {
            std::thread::park_timeout(wake - now);
        }
    }
}
