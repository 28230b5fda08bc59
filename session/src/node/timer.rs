//! The node session's timers: one deadline slot per [`Timer`], the earliest of which the driver
//! arms as its single sleep (the shape of quinn-proto's `connection/timer.rs`).

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

impl From<Timer> for usize {
    fn from(timer: Timer) -> Self {
        timer as Self
    }
}

/// One optional deadline per [`Timer`].
pub(crate) type TimerTable = crate::timer::TimerTable<Timer, { Timer::VALUES.len() }>;
