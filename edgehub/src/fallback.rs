//! Protocol fallback (`edgehub.controller.fallback`): which protocol the next dial uses, as a
//! sans-IO state machine on an injected clock (no runtime, no sockets), so its decisions are
//! unit-tested on a virtual clock and the driver only carries them out.
//!
//! The edge dials its configured protocol (the *primary*, say QUIC). After `attempts`
//! consecutive failed connects over it (a network where UDP is blocked never completes a QUIC
//! handshake) it moves to the other protocol (the *fallback*, say WebSocket), whose endpoint is
//! the other section of the config. While connected over the fallback it probes the primary in
//! the background, one probe at a time and at most one per `probe-interval`; a probe that
//! completes a handshake is the connection the edge moves back onto. Failed dials over the
//! fallback count the same way, so an edge whose cloud is down entirely alternates between the
//! two instead of sticking to either.
//!
//! Nothing new goes on the wire: a stock KubeEdge cloud speaks one protocol per port, and a
//! move is a reconnect like any other, so the session's resend and dedup carry every message
//! across it exactly once (PROTOCOL.md Part A items 6 and 7).

use std::time::{Duration, Instant};

use transport::Protocol;

/// The fallback's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackPolicy {
    /// The configured protocol.
    pub primary: Protocol,
    /// Consecutive failed connects over the protocol in use before moving to the other.
    pub attempts: u32,
    /// Least time between the end of one probe of the primary and the start of the next.
    pub probe_interval: Duration,
}

/// A move from one protocol to the other, for the log and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// The protocol left.
    pub from: Protocol,
    /// The protocol used from now on.
    pub to: Protocol,
    /// Why.
    pub cause: SwitchCause,
}

/// Why the protocol changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchCause {
    /// This many consecutive connects over `from` failed.
    Failures(u32),
    /// A background probe of the primary completed a handshake.
    ProbeSucceeded,
}

/// The state: the protocol in use, failures in a row over it, the next probe.
#[derive(Debug, Clone)]
pub struct ProtocolChoice {
    policy: Option<FallbackPolicy>,
    primary: Protocol,
    current: Protocol,
    failures: u32,
    /// Connected over the fallback: when the next probe of the primary may start.
    next_probe: Option<Instant>,
    probing: bool,
    switches: u64,
}

impl ProtocolChoice {
    /// Always `primary` (fallback off).
    pub fn fixed(primary: Protocol) -> Self {
        Self {
            policy: None,
            primary,
            current: primary,
            failures: 0,
            next_probe: None,
            probing: false,
            switches: 0,
        }
    }

    /// Starting on `policy.primary`, falling back as the policy says.
    pub fn with_fallback(policy: FallbackPolicy) -> Self {
        Self {
            policy: Some(FallbackPolicy {
                attempts: policy.attempts.max(1),
                ..policy
            }),
            ..Self::fixed(policy.primary)
        }
    }

    /// The protocol the next dial uses.
    pub fn current(&self) -> Protocol {
        self.current
    }

    /// Whether the edge is on the fallback protocol.
    pub fn on_fallback(&self) -> bool {
        self.current != self.primary
    }

    /// Protocol moves so far.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// A dial over `protocol` failed. A configuration fault (unreadable certificate files) does
    /// not count: the other protocol would fail the same way.
    pub fn dial_failed(&mut self, protocol: Protocol, configuration_fault: bool) -> Option<Switch> {
        let policy = self.policy?;
        if protocol != self.current || configuration_fault {
            return None;
        }
        self.failures += 1;
        if self.failures < policy.attempts {
            return None;
        }
        let failures = self.failures;
        Some(self.switch_to(other(protocol), SwitchCause::Failures(failures)))
    }

    /// A connection over `protocol` is established (the session took it). On the fallback, the
    /// first probe of the primary is due one interval from `now`.
    pub fn connected(&mut self, now: Instant, protocol: Protocol) {
        self.current = protocol;
        self.failures = 0;
        self.next_probe = match self.policy {
            Some(policy) if self.on_fallback() && !self.probing => {
                Some(now + policy.probe_interval)
            }
            _ => None,
        };
    }

    /// The connection in use ended: no probing until the next one is up (the next dial itself
    /// says whether the protocol in use works).
    pub fn disconnected(&mut self) {
        self.next_probe = None;
    }

    /// When [`ProtocolChoice::poll_probe`] next returns a protocol, if ever.
    pub fn probe_deadline(&self) -> Option<Instant> {
        self.next_probe
    }

    /// Whether a probe of the primary should start now; the protocol to dial if so. The caller
    /// reports its outcome with [`ProtocolChoice::probe_succeeded`] or
    /// [`ProtocolChoice::probe_failed`].
    pub fn poll_probe(&mut self, now: Instant) -> Option<Protocol> {
        match self.next_probe {
            Some(due) if due <= now && !self.probing && self.on_fallback() => {
                self.probing = true;
                self.next_probe = None;
                Some(self.primary)
            }
            _ => None,
        }
    }

    /// The probe failed; the next is due one interval from `now` if the fallback is still
    /// connected (`connected`).
    pub fn probe_failed(&mut self, now: Instant, connected: bool) {
        self.probing = false;
        if let Some(policy) = self.policy
            && connected
            && self.on_fallback()
        {
            self.next_probe = Some(now + policy.probe_interval);
        }
    }

    /// The probe completed a handshake: the edge moves back to the primary, over the probe's
    /// connection. `None` if it is already there (nothing to move).
    pub fn probe_succeeded(&mut self) -> Option<Switch> {
        self.probing = false;
        self.next_probe = None;
        self.on_fallback()
            .then(|| self.switch_to(self.primary, SwitchCause::ProbeSucceeded))
    }

    fn switch_to(&mut self, to: Protocol, cause: SwitchCause) -> Switch {
        let from = self.current;
        self.current = to;
        self.failures = 0;
        self.next_probe = None;
        self.switches += 1;
        Switch { from, to, cause }
    }
}

/// The other protocol.
pub fn other(protocol: Protocol) -> Protocol {
    match protocol {
        Protocol::Quic => Protocol::WebSocket,
        Protocol::WebSocket => Protocol::Quic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(60);

    fn choice() -> ProtocolChoice {
        ProtocolChoice::with_fallback(FallbackPolicy {
            primary: Protocol::Quic,
            attempts: 3,
            probe_interval: INTERVAL,
        })
    }

    /// A virtual clock: `t(s)` is `s` seconds after an arbitrary origin.
    fn clock() -> impl Fn(u64) -> Instant {
        let origin = Instant::now();
        move |s| origin + Duration::from_secs(s)
    }

    #[test]
    fn fixed_never_switches_nor_probes() {
        let t = clock();
        let mut c = ProtocolChoice::fixed(Protocol::Quic);
        for _ in 0..10 {
            assert_eq!(c.dial_failed(Protocol::Quic, false), None);
        }
        c.connected(t(0), Protocol::Quic);
        assert_eq!(c.poll_probe(t(1_000)), None);
        assert_eq!(c.current(), Protocol::Quic);
        assert_eq!(c.switches(), 0);
    }

    #[test]
    fn falls_back_after_the_configured_failures_in_a_row() {
        let mut c = choice();
        assert_eq!(c.dial_failed(Protocol::Quic, false), None);
        assert_eq!(c.dial_failed(Protocol::Quic, false), None);
        assert_eq!(c.current(), Protocol::Quic);
        let switch = c
            .dial_failed(Protocol::Quic, false)
            .expect("third failure moves");
        assert_eq!(
            switch,
            Switch {
                from: Protocol::Quic,
                to: Protocol::WebSocket,
                cause: SwitchCause::Failures(3)
            }
        );
        assert_eq!(c.current(), Protocol::WebSocket);
        assert!(c.on_fallback());
    }

    #[test]
    fn a_success_resets_the_count_and_configuration_faults_do_not_count() {
        let t = clock();
        let mut c = choice();
        c.dial_failed(Protocol::Quic, false);
        c.dial_failed(Protocol::Quic, false);
        c.connected(t(0), Protocol::Quic);
        c.dial_failed(Protocol::Quic, false);
        c.dial_failed(Protocol::Quic, false);
        for _ in 0..5 {
            assert_eq!(c.dial_failed(Protocol::Quic, true), None);
        }
        assert_eq!(c.current(), Protocol::Quic);
        assert!(c.dial_failed(Protocol::Quic, false).is_some());
    }

    #[test]
    fn a_late_failure_of_the_protocol_left_does_not_count() {
        let mut c = choice();
        for _ in 0..3 {
            c.dial_failed(Protocol::Quic, false);
        }
        assert_eq!(c.dial_failed(Protocol::Quic, false), None);
        assert_eq!(c.current(), Protocol::WebSocket);
    }

    #[test]
    fn probes_the_primary_at_a_bounded_rate_while_on_the_fallback() {
        let t = clock();
        let mut c = choice();
        for _ in 0..3 {
            c.dial_failed(Protocol::Quic, false);
        }
        // Not connected yet: no probe.
        assert_eq!(c.poll_probe(t(1_000)), None);
        c.connected(t(10), Protocol::WebSocket);
        assert_eq!(c.probe_deadline(), Some(t(70)));
        assert_eq!(c.poll_probe(t(69)), None);
        assert_eq!(c.poll_probe(t(70)), Some(Protocol::Quic));
        // One at a time.
        assert_eq!(c.poll_probe(t(500)), None);
        assert_eq!(c.probe_deadline(), None);
        // A failed probe (a 30 s handshake timeout) waits a whole interval from its end.
        c.probe_failed(t(100), true);
        assert_eq!(c.probe_deadline(), Some(t(160)));
        assert_eq!(c.poll_probe(t(159)), None);
        assert_eq!(c.poll_probe(t(160)), Some(Protocol::Quic));
        c.probe_failed(t(161), true);
        // Probes over a day: at most one per interval.
        let mut probes = 0;
        let mut now = 161;
        while now <= 161 + 86_400 {
            if c.poll_probe(t(now)).is_some() {
                probes += 1;
                c.probe_failed(t(now), true);
            }
            now += 1;
        }
        assert_eq!(probes, 86_400 / 60);
        assert_eq!(c.current(), Protocol::WebSocket);
    }

    #[test]
    fn a_successful_probe_moves_back_and_stops_probing() {
        let t = clock();
        let mut c = choice();
        for _ in 0..3 {
            c.dial_failed(Protocol::Quic, false);
        }
        c.connected(t(0), Protocol::WebSocket);
        assert_eq!(c.poll_probe(t(60)), Some(Protocol::Quic));
        let switch = c.probe_succeeded().expect("moves back");
        assert_eq!(switch.cause, SwitchCause::ProbeSucceeded);
        assert_eq!(
            (switch.from, switch.to),
            (Protocol::WebSocket, Protocol::Quic)
        );
        assert_eq!(c.current(), Protocol::Quic);
        c.connected(t(61), Protocol::Quic);
        assert_eq!(c.probe_deadline(), None);
        assert_eq!(c.poll_probe(t(10_000)), None);
        assert_eq!(c.switches(), 2);
    }

    #[test]
    fn no_probe_while_the_fallback_is_down() {
        let t = clock();
        let mut c = choice();
        for _ in 0..3 {
            c.dial_failed(Protocol::Quic, false);
        }
        c.connected(t(0), Protocol::WebSocket);
        c.disconnected();
        assert_eq!(c.poll_probe(t(1_000)), None);
        // A probe that was under way when it went down does not schedule another.
        c.connected(t(1_000), Protocol::WebSocket);
        assert_eq!(c.poll_probe(t(1_060)), Some(Protocol::Quic));
        c.disconnected();
        c.probe_failed(t(1_070), false);
        assert_eq!(c.probe_deadline(), None);
    }

    #[test]
    fn alternates_while_both_fail() {
        let mut c = choice();
        let mut seen = Vec::new();
        for _ in 0..12 {
            let protocol = c.current();
            seen.push(protocol);
            c.dial_failed(protocol, false);
        }
        let quic = seen.iter().filter(|p| **p == Protocol::Quic).count();
        assert_eq!(quic, 6, "{seen:?}");
        assert_eq!(c.switches(), 4);
    }

    #[test]
    fn a_connect_over_the_other_protocol_is_what_counts() {
        // The session connected over WebSocket after a probe had already moved the choice
        // back (the WebSocket dial was under way): the edge is on WebSocket and probes again.
        let t = clock();
        let mut c = choice();
        for _ in 0..3 {
            c.dial_failed(Protocol::Quic, false);
        }
        c.connected(t(0), Protocol::WebSocket);
        assert!(c.poll_probe(t(60)).is_some());
        c.probe_succeeded();
        c.connected(t(61), Protocol::WebSocket);
        assert!(c.on_fallback());
        assert_eq!(c.probe_deadline(), Some(t(121)));
    }
}
