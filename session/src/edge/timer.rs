//! The edge session's timer kinds, each with one slot in a [`crate::timer::TimerTable`] (the
//! driver sleeps until the earliest armed slot; the session handles whichever have expired).

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

impl From<Timer> for usize {
    fn from(timer: Timer) -> Self {
        timer as Self
    }
}

/// One optional deadline per [`Timer`] kind.
pub type TimerTable = crate::timer::TimerTable<Timer, { Timer::VALUES.len() }>;
