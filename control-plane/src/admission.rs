//! A token bucket: admits new fleet streams at a steady rate with a burst, so a whole
//! fleet reconnecting at once is shed with UNAVAILABLE (and retries with backoff) instead
//! of overwhelming the control plane.

use std::sync::Mutex;
use std::time::Instant;

/// Thread-safe token bucket.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate_per_sec` tokens refill each second, up to `burst`; starts full.
    pub(crate) fn new(rate_per_sec: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate_per_sec,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate_per_sec).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let bucket = TokenBucket::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| bucket.try_take_at(t0)));
        assert!(!bucket.try_take_at(t0));
        // 10/s: one token after 100 ms.
        assert!(bucket.try_take_at(t0 + Duration::from_millis(101)));
        assert!(!bucket.try_take_at(t0 + Duration::from_millis(102)));
    }
}
