//! The session's timers: one slot per [`Timer`] kind in a fixed table, as quinn-proto keeps them
//! (`quinn-proto/src/connection/timer.rs`). The driver sleeps until the earliest armed slot
//! ([`TimerTable::next_timeout`]) and the session handles whichever slots have expired.

use std::time::Instant;

/// What a timer is for. Each kind has one slot; arming a kind again replaces its deadline.
#[derive(Debug, Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// When the next keepalive is due (every `heartbeat` while connected).
    Heartbeat = 0,
    /// When a connected cloud that has shown no sign of life counts as dead (W7).
    ReadDeadline = 1,
    /// End of the fixed wait (two heartbeats) after an established connection was lost.
    ReconnectWait = 2,
    /// End of the jittered wait after a failed connect attempt.
    Backoff = 3,
    /// When the rate limiter will have a token for the next queued upstream message.
    RateLimit = 4,
}

impl Timer {
    /// Every kind, in slot order.
    pub const VALUES: [Self; 5] = [
        Self::Heartbeat,
        Self::ReadDeadline,
        Self::ReconnectWait,
        Self::Backoff,
        Self::RateLimit,
    ];
}

/// One optional deadline per [`Timer`] kind.
#[derive(Debug, Copy, Clone, Default, PartialEq, Eq)]
pub struct TimerTable {
    slots: [Option<Instant>; Timer::VALUES.len()],
}

impl TimerTable {
    /// Arms `timer` to fire at `at`, replacing any earlier deadline of that kind.
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.slots[timer as usize] = Some(at);
    }

    /// Disarms `timer`.
    pub fn stop(&mut self, timer: Timer) {
        self.slots[timer as usize] = None;
    }

    /// The deadline of `timer`, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.slots[timer as usize]
    }

    /// The earliest armed deadline: what the driver's single sleep is set to.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.slots.iter().flatten().min().copied()
    }

    /// Whether `timer` is armed with a deadline at or before `now`.
    pub fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.slots[timer as usize].is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn next_timeout_is_the_earliest_armed_slot() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::Heartbeat, t0 + Duration::from_secs(15));
        table.set(Timer::ReadDeadline, t0 + Duration::from_secs(30));
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_secs(15)));
        table.stop(Timer::Heartbeat);
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_secs(30)));
        assert!(!table.is_expired(Timer::ReadDeadline, t0));
        assert!(table.is_expired(Timer::ReadDeadline, t0 + Duration::from_secs(30)));
        assert!(!table.is_expired(Timer::Backoff, t0 + Duration::from_secs(99)));
    }
}
