//! Probing a silent link while data waits (issue 14, `docs/lossy-links.md`).
//!
//! After a blackhole QUIC's only way to learn that the link is back is an acknowledgement, and
//! the only packets it may send while its window is full of unacknowledged data are loss
//! probes, whose timer doubles on every expiry: after 5 s of total loss the next one is due up to
//! 3 s after the link returns. Here, once nothing has been acknowledged for a while and data is
//! in flight, the window lets one more packet through per probe interval; its acknowledgement
//! declares the earlier packets lost, and they are resent at once.
//!
//! [`ProbeWindow`] (the decision, sans-IO) and [`SilenceProbe`] (when a connection with nothing
//! new to send pings) take the time as an argument; [`ProbingBbrConfig`] wraps quinn's BBR with
//! the former, and the connection driver polls the latter (ten times a second while an answer
//! is awaited, once a second on a quiet connection).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Shortest silence before probing, and shortest interval between two probes: about the first
/// loss-probe timeout on a short link (RTT + 4 × RTT variance + 25 ms ACK delay), so a
/// short link's own timer still goes first.
pub(crate) const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// How often a connection whose datagrams are all answered looks again: a quiet connection (an
/// idle node between heartbeats) costs one wake-up a second instead of ten, and a blackhole that
/// starts while it is quiet is noticed within this long after it next sends.
pub(crate) const QUIET_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// (silence before the first probe, interval between probes) for a smoothed RTT: no probe
/// before two round trips without an acknowledgement, at most one per round trip (and never
/// more often than [`MIN_PROBE_INTERVAL`]): one packet per RTT is what a silent path may cost.
pub(crate) fn probe_timing(srtt: Duration) -> (Duration, Duration) {
    (
        (srtt * 2).max(MIN_PROBE_INTERVAL),
        srtt.max(MIN_PROBE_INTERVAL),
    )
}

/// Whether the congestion window lets one more packet through: the in-flight bytes the
/// controller has seen, the last acknowledgement and the last probe.
#[derive(Clone, Debug)]
pub(crate) struct ProbeWindow {
    in_flight: u64,
    last_ack: Instant,
    last_probe: Option<Instant>,
    srtt: Duration,
    mtu: u64,
}

impl ProbeWindow {
    pub(crate) fn new(now: Instant, mtu: u16) -> Self {
        Self {
            in_flight: 0,
            last_ack: now,
            last_probe: None,
            srtt: Duration::ZERO,
            mtu: u64::from(mtu),
        }
    }

    /// A packet of `bytes` left while the inner controller's window was `inner_window`: past
    /// the window, it was a probe.
    pub(crate) fn on_sent(&mut self, now: Instant, bytes: u64, inner_window: u64) {
        if self.in_flight + bytes > inner_window {
            self.last_probe = Some(now);
        }
        self.in_flight += bytes;
    }

    /// An acknowledgement arrived; `srtt` is the RTT estimate after it.
    pub(crate) fn on_ack(&mut self, now: Instant, srtt: Duration) {
        self.last_ack = now;
        self.srtt = srtt;
    }

    /// A batch of acknowledgements ended with `in_flight` bytes still unacknowledged.
    pub(crate) fn on_end_acks(&mut self, now: Instant, in_flight: u64) {
        self.last_ack = now;
        self.in_flight = in_flight;
    }

    /// `lost` bytes were declared lost (no longer in flight).
    pub(crate) fn on_lost(&mut self, lost: u64) {
        self.in_flight = self.in_flight.saturating_sub(lost);
    }

    pub(crate) fn on_mtu(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    /// Whether a probe is due: data in flight, nothing acknowledged for the silence period, and
    /// no probe within the interval.
    pub(crate) fn probe_due(&self, now: Instant) -> bool {
        let (silence, interval) = probe_timing(self.srtt);
        self.in_flight > 0
            && now.saturating_duration_since(self.last_ack) >= silence
            && self
                .last_probe
                .is_none_or(|p| now.saturating_duration_since(p) >= interval)
    }

    /// The window quinn sees: the inner one, or room for one more full packet when a probe is
    /// due (quinn blocks a packet when in-flight + a full packet reaches the window).
    pub(crate) fn window(&self, now: Instant, inner: u64) -> u64 {
        if self.probe_due(now) {
            inner.max(self.in_flight + 2 * self.mtu + 1)
        } else {
            inner
        }
    }
}

/// When a connection whose data waits unacknowledged, but which has nothing new to send, should
/// send a probe itself (quinn sends only when something wakes it): the peer's datagrams stopped
/// while ours did not.
#[derive(Debug)]
pub(crate) struct SilenceProbe {
    rx: u64,
    rx_at: Instant,
    tx_at_rx: u64,
    last_probe: Option<Instant>,
}

impl SilenceProbe {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            rx: 0,
            rx_at: now,
            tx_at_rx: 0,
            last_probe: None,
        }
    }

    /// Whether to probe now, given the datagrams sent (`tx`) and received (`rx`) so far and the
    /// RTT estimate.
    pub(crate) fn poll(&mut self, now: Instant, tx: u64, rx: u64, srtt: Duration) -> bool {
        if rx != self.rx {
            self.rx = rx;
            self.rx_at = now;
            self.tx_at_rx = tx;
            return false;
        }
        let (silence, interval) = probe_timing(srtt);
        let due = tx > self.tx_at_rx
            && now.saturating_duration_since(self.rx_at) >= silence
            && self
                .last_probe
                .is_none_or(|p| now.saturating_duration_since(p) >= interval);
        if due {
            self.last_probe = Some(now);
        }
        due
    }

    /// When to poll next, given the datagrams sent so far: soon while some of ours went out
    /// after the peer's last one (an answer is awaited), else after [`QUIET_POLL_INTERVAL`].
    pub(crate) fn next_poll(&self, tx: u64) -> Duration {
        if tx > self.tx_at_rx {
            MIN_PROBE_INTERVAL
        } else {
            QUIET_POLL_INTERVAL
        }
    }
}

/// quinn's BBR with a [`ProbeWindow`]: what Causeway's QUIC ends use.
#[derive(Debug, Default)]
pub(crate) struct ProbingBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for ProbingBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(ProbingController {
            inner: self.bbr.clone().build(now, current_mtu),
            probe: ProbeWindow::new(now, current_mtu),
        })
    }
}

/// A congestion controller whose window also lets a probe through (see the module doc).
struct ProbingController {
    inner: Box<dyn Controller>,
    probe: ProbeWindow,
}

impl Controller for ProbingController {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.probe.on_sent(now, bytes, self.inner.window());
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.probe.on_ack(now, rtt.get());
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.probe.on_end_acks(now, in_flight);
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.probe.on_lost(lost_bytes);
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.probe.on_mtu(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.probe.window(Instant::now(), self.inner.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self {
            inner: self.inner.clone_box(),
            probe: self.probe.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_probe_while_acknowledgements_arrive_or_nothing_is_in_flight() {
        let t0 = Instant::now();
        let mut w = ProbeWindow::new(t0, 1200);
        // Nothing in flight: silence alone is no reason.
        assert_eq!(w.window(t0 + 10_000 * MS, 12_000), 12_000);
        w.on_sent(t0, 12_000, 12_000);
        w.on_ack(t0 + 20 * MS, 20 * MS);
        w.on_end_acks(t0 + 20 * MS, 12_000);
        // Acknowledged 20 ms ago: not silent yet (silence is at least 100 ms).
        assert_eq!(w.window(t0 + 40 * MS, 12_000), 12_000);
    }

    #[test]
    fn one_packet_per_interval_once_silent() {
        let t0 = Instant::now();
        let mut w = ProbeWindow::new(t0, 1200);
        w.on_ack(t0, 20 * MS);
        w.on_end_acks(t0, 0);
        w.on_sent(t0, 12_000, 12_000);
        let t = t0 + 100 * MS;
        assert_eq!(w.window(t, 12_000), 12_000 + 2 * 1200 + 1);
        // The probe leaves past the inner window: none more until the interval has passed.
        w.on_sent(t, 1200, 12_000);
        assert_eq!(w.window(t + 50 * MS, 12_000), 12_000);
        assert_eq!(w.window(t + 100 * MS, 12_000), 13_200 + 2 * 1200 + 1);
        // An acknowledgement ends the silence; lost packets leave the flight.
        w.on_ack(t + 120 * MS, 20 * MS);
        w.on_end_acks(t + 120 * MS, 13_200);
        w.on_lost(13_200);
        assert_eq!(w.window(t + 10_000 * MS, 12_000), 12_000);
    }

    #[test]
    fn silence_and_interval_grow_with_the_rtt() {
        assert_eq!(probe_timing(Duration::ZERO), (100 * MS, 100 * MS));
        assert_eq!(probe_timing(600 * MS), (1200 * MS, 600 * MS));
    }

    #[test]
    fn silence_probe_fires_only_when_our_datagrams_go_unanswered() {
        let t0 = Instant::now();
        let mut p = SilenceProbe::new(t0);
        let rtt = 20 * MS;
        // Idle both ways: never.
        assert!(!p.poll(t0 + 1000 * MS, 0, 0, rtt));
        // We sent, the peer answered: the silence restarts.
        assert!(!p.poll(t0 + 1100 * MS, 5, 5, rtt));
        // We sent more, nothing came back for 100 ms: probe, then once per interval.
        assert!(!p.poll(t0 + 1150 * MS, 6, 5, rtt));
        assert!(p.poll(t0 + 1200 * MS, 6, 5, rtt));
        assert!(!p.poll(t0 + 1250 * MS, 7, 5, rtt));
        assert!(p.poll(t0 + 1300 * MS, 7, 5, rtt));
        assert!(!p.poll(t0 + 1310 * MS, 8, 6, rtt));
    }

    #[test]
    fn a_quiet_connection_polls_once_a_second_and_an_awaited_answer_ten_times() {
        let t0 = Instant::now();
        let mut p = SilenceProbe::new(t0);
        let rtt = 20 * MS;
        assert_eq!(p.next_poll(0), QUIET_POLL_INTERVAL);
        // Both sides exchanged and nothing of ours is unanswered: quiet.
        assert!(!p.poll(t0 + 100 * MS, 3, 3, rtt));
        assert_eq!(p.next_poll(3), QUIET_POLL_INTERVAL);
        // We sent after the peer's last datagram: poll soon.
        assert_eq!(p.next_poll(4), MIN_PROBE_INTERVAL);
    }
}
