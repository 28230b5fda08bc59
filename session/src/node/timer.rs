//! The node session's timers: one deadline slot per [`Timer`], the earliest of which the driver
//! arms as its single sleep (the shape of quinn-proto's `connection/timer.rs`).

use std::time::Instant;

/// Kinds of timer a [`super::NodeSession`] keeps.
#[derive(Debug, Copy, Clone, Eq, PartialEq)]
pub(crate) enum Timer {
    /// When the node must have sent its next keepalive (B§6.2); the session ends if it fires.
    KeepaliveCheck = 0,
    /// When the earliest unacknowledged downstream message is due to be resent.
    AckResend = 1,
    /// When the no-ACK pace ([`super::SessionConfig::no_ack_pace`]) has a token again.
    NoAckPace = 2,
}

impl Timer {
    /// Every timer, in slot order.
    pub(crate) const VALUES: [Self; 3] = [Self::KeepaliveCheck, Self::AckResend, Self::NoAckPace];
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Copy, Clone, Default)]
pub(crate) struct TimerTable {
    data: [Option<Instant>; Timer::VALUES.len()],
}

impl TimerTable {
    /// Arms `timer` to fire at `time`, replacing any earlier setting.
    pub(crate) fn set(&mut self, timer: Timer, time: Instant) {
        self.data[timer as usize] = Some(time);
    }

    /// Disarms `timer`.
    pub(crate) fn stop(&mut self, timer: Timer) {
        self.data[timer as usize] = None;
    }

    /// Disarms every timer.
    pub(crate) fn stop_all(&mut self) {
        self.data = Default::default();
    }

    /// When `timer` fires, if armed.
    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// The earliest armed deadline: what the driver should sleep until.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// Whether `timer` is armed and due at `now`.
    pub(crate) fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn next_timeout_is_the_earliest_armed() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        assert_eq!(t.next_timeout(), None);
        t.set(Timer::KeepaliveCheck, now + Duration::from_secs(30));
        t.set(Timer::AckResend, now + Duration::from_secs(5));
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(5)));
        assert!(t.is_expired(Timer::AckResend, now + Duration::from_secs(5)));
        assert!(!t.is_expired(Timer::KeepaliveCheck, now + Duration::from_secs(5)));
        t.stop(Timer::AckResend);
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(30)));
        t.stop_all();
        assert_eq!(t.next_timeout(), None);
    }
}
