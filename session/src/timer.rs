//! A session's timers: one optional deadline per timer kind in a fixed table, as quinn-proto keeps
//! them (`quinn-proto/src/connection/timer.rs`). The driver sleeps until the earliest armed slot
//! ([`TimerTable::next_timeout`]) and the session handles whichever slots have expired. Both
//! sessions use it with their own kinds (`edge::Timer`, `node`'s timers).

use std::marker::PhantomData;
use std::time::Instant;

/// One optional deadline for each of the `N` kinds `K` (each kind's slot is `usize::from(kind)`);
/// arming a kind again replaces its deadline.
#[derive(Debug, Copy, Clone, PartialEq, Eq)]
pub struct TimerTable<K, const N: usize> {
    slots: [Option<Instant>; N],
    kind: PhantomData<K>,
}

impl<K, const N: usize> Default for TimerTable<K, N> {
    fn default() -> Self {
        Self {
            slots: [None; N],
            kind: PhantomData,
        }
    }
}

impl<K: Copy + Into<usize>, const N: usize> TimerTable<K, N> {
    /// Arms `timer` to fire at `at`, replacing any earlier deadline of that kind.
    pub fn set(&mut self, timer: K, at: Instant) {
        self.slots[timer.into()] = Some(at);
    }

    /// Disarms `timer`.
    pub fn stop(&mut self, timer: K) {
        self.slots[timer.into()] = None;
    }

    /// Disarms every timer.
    pub fn stop_all(&mut self) {
        self.slots = [None; N];
    }

    /// The deadline of `timer`, if armed.
    pub fn get(&self, timer: K) -> Option<Instant> {
        self.slots[timer.into()]
    }

    /// The earliest armed deadline: what the driver's single sleep is set to.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.slots.iter().flatten().min().copied()
    }

    /// Whether `timer` is armed with a deadline at or before `now`.
    pub fn is_expired(&self, timer: K, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Stands for a session's kinds (the edge's and the node's tables were tested alike).
    #[derive(Debug, Copy, Clone, PartialEq, Eq)]
    enum Kind {
        Keepalive,
        Resend,
        Backoff,
    }

    impl From<Kind> for usize {
        fn from(kind: Kind) -> Self {
            kind as Self
        }
    }

    #[test]
    fn next_timeout_is_the_earliest_armed_slot() {
        let t0 = Instant::now();
        let mut table = TimerTable::<Kind, 3>::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Kind::Keepalive, t0 + Duration::from_secs(30));
        table.set(Kind::Resend, t0 + Duration::from_secs(5));
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_secs(5)));
        assert!(table.is_expired(Kind::Resend, t0 + Duration::from_secs(5)));
        assert!(!table.is_expired(Kind::Keepalive, t0 + Duration::from_secs(5)));
        assert!(!table.is_expired(Kind::Backoff, t0 + Duration::from_secs(99)));
        table.stop(Kind::Resend);
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_secs(30)));
        assert_eq!(
            table.get(Kind::Keepalive),
            Some(t0 + Duration::from_secs(30))
        );
        table.stop_all();
        assert_eq!(table.next_timeout(), None);
    }
}
