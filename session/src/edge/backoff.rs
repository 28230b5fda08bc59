//! Reconnect backoff: exponential growth with full jitter, capped (fixes W11, KubeEdge's fixed
//! 30 s retry that makes a whole fleet reconnect in lockstep after a cloud restart).
//!
//! After the `n`-th consecutive failure the wait is `min + u * (ceiling(n) - min)` with `u` drawn
//! uniformly from `[0, 1)` and `ceiling(n) = clamp(base * 2^(n-1), min, max)`: every wait lies in
//! `[min, max]` and the jitter (the part above `min`) in `[0, ceiling(n) - min]`.

use std::time::Duration;

/// Bounds of the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The shortest wait, so a failing cloud is never hammered in a tight loop.
    pub min: Duration,
    /// The ceiling after the first failure; it doubles with each further failure.
    pub base: Duration,
    /// The largest ceiling: the longest an edge waits between attempts once the link is back.
    pub max: Duration,
}

impl BackoffConfig {
    /// Defaults derived from the heartbeat: 1 s minimum, a first ceiling of two heartbeats
    /// (KubeEdge's fixed wait, now its upper bound), capped at eight heartbeats (2 min at 15 s).
    pub fn from_heartbeat(heartbeat: Duration) -> Self {
        Self {
            min: Duration::from_secs(1).min(heartbeat),
            base: heartbeat.saturating_mul(2),
            max: heartbeat.saturating_mul(8),
        }
    }

    /// The ceiling of the wait after `failures` consecutive failures (`failures >= 1`).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        let grown = self.base.saturating_mul(1u32 << exponent);
        grown.clamp(self.min, self.max.max(self.min))
    }

    /// The wait after `failures` consecutive failures, `unit` being a uniform draw from `[0, 1)`
    /// (values outside are clamped, so a bad random source cannot break the bounds).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let span = self.ceiling(failures).saturating_sub(self.min);
        self.min + span.mul_f64(unit)
    }
}

/// A small deterministic random source (SplitMix64) for jitter, so the session needs no external
/// randomness: the driver seeds it from the clock, tests from a constant.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw from `[0, 1)` with 53 bits of precision.
    pub fn next_unit(&mut self) -> f64 {
        // Top 53 bits as an integer below 2^53, scaled: exact in an f64.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig::from_heartbeat(Duration::from_secs(15))
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let c = config();
        let secs: Vec<u64> = (1..=6).map(|n| c.ceiling(n).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 120, 120, 120]);
        assert_eq!(c.ceiling(u32::MAX), Duration::from_secs(120));
    }

    #[test]
    fn delays_stay_within_bounds_and_cover_the_range() {
        let c = config();
        let mut rng = SplitMix64::new(7);
        for failures in 1..=10 {
            let ceiling = c.ceiling(failures);
            let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
            for _ in 0..2000 {
                let d = c.delay(failures, rng.next_unit());
                assert!(
                    d >= c.min && d <= ceiling && d <= c.max,
                    "{d:?} for {failures}"
                );
                lo = lo.min(d);
                hi = hi.max(d);
            }
            // Full jitter: draws reach both ends of [min, ceiling] (within 2 % of the span).
            let slack = (ceiling - c.min).mul_f64(0.02);
            assert!(lo <= c.min + slack, "lowest {lo:?} for {failures}");
            assert!(hi >= ceiling - slack, "highest {hi:?} for {failures}");
        }
    }

    #[test]
    fn out_of_range_draws_are_clamped() {
        let c = config();
        assert_eq!(c.delay(1, -3.0), c.min);
        assert_eq!(c.delay(1, f64::NAN), c.min);
        assert_eq!(c.delay(1, 7.0), c.ceiling(1));
    }

    #[test]
    fn unit_draws_are_in_half_open_interval() {
        let mut rng = SplitMix64::new(0);
        for _ in 0..10_000 {
            let u = rng.next_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
