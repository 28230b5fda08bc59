//! A token bucket with time passed in, so a limiter is exact and testable in virtual time. Both
//! session state machines pace with it: the edge's module → cloud messages (KubeEdge's
//! `messageQPS` / `messageBurst`, 30 / 60) and the cloud's no-ACK messages toward an edge that
//! cannot tell it how far behind it is (PROTOCOL.md Part A item 7). It lives here, in the one
//! crate without I/O that both sides share.

use std::time::{Duration, Instant};

/// A token bucket refilled continuously at `qps` tokens per second up to `burst` tokens.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    qps: f64,
    /// Capacity; also the number of tokens a fresh bucket holds.
    burst: f64,
    /// Tokens available at `updated`.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket. `qps` must be positive and `burst` at least one; callers' configurations
    /// validate both, and out-of-range values are clamped here (a `qps` of 0 would never refill).
    pub fn new(qps: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: if qps > 0.0 { qps } else { f64::MIN_POSITIVE },
            burst,
            tokens: burst,
            updated: now,
        }
    }

    /// Takes one token if one is available at `now`; otherwise returns when one will be.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // Round the wait up to the next nanosecond so the token is really there by then.
            let nanos = ((1.0 - self.tokens) / self.qps * 1e9).ceil();
            let wait = Duration::try_from_secs_f64(nanos / 1e9).unwrap_or(Duration::MAX);
            Err(now
                .checked_add(wait + Duration::from_nanos(1))
                .unwrap_or(now))
        }
    }

    /// Tokens available at `now` (fractional).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn refill(&mut self, now: Instant) {
        // Time is monotonic by contract; a `now` before `updated` simply adds nothing.
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.updated = self.updated.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_qps() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(30.0, 60, t0);
        for _ in 0..60 {
            assert!(bucket.try_take(t0).is_ok());
        }
        let next = bucket.try_take(t0).unwrap_err();
        // One token at 30 qps takes 1/30 s.
        let wait = next - t0;
        assert!(wait >= Duration::from_micros(33_333) && wait <= Duration::from_micros(33_334));
        assert!(bucket.try_take(next).is_ok());
        assert!(bucket.try_take(next).is_err());
        // One second later exactly 30 more tokens are there, and not more.
        let later = next + Duration::from_secs(1);
        let taken = (0..100)
            .take_while(|_| bucket.try_take(later).is_ok())
            .count();
        assert_eq!(taken, 30);
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5, t0);
        assert!((bucket.available(t0 + Duration::from_secs(3600)) - 5.0).abs() < f64::EPSILON);
    }
}
