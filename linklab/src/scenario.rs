//! The named link scenarios of issue 14, in one table used by the behaviour test and the
//! benchmark alike (and copied into `docs/lossy-links.md`). Each is a steady impairment per
//! direction plus, for some, a disruption the harness triggers at a moment of its choosing
//! through [`crate::Control`].

use std::time::Duration;

use crate::model::{GilbertElliott, Impairment, Loss};

/// A disruption on top of the steady impairment, applied by the harness.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Disruption {
    /// None: the steady link only.
    None,
    /// Total loss both ways for this long, then the steady link again.
    Blackhole(Duration),
    /// The edge's source ports change (every flow), as a NAT losing its mappings.
    RebindPort,
    /// The edge's source address changes.
    RebindAddr,
    /// This loss both ways while connections are set up; the harness clears it once the edge
    /// is connected.
    HandshakeLoss(f64),
}

/// A named link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scenario {
    /// Its name, as on the command line and in the report.
    pub name: &'static str,
    /// One line for the report.
    pub summary: &'static str,
    /// Edge to cloud.
    pub up: Impairment,
    /// Cloud to edge.
    pub down: Impairment,
    /// What the harness does to it mid-run.
    pub disruption: Disruption,
}

const MS: Duration = Duration::from_millis(1);

/// Both directions alike.
const fn symmetric(
    name: &'static str,
    summary: &'static str,
    link: Impairment,
    disruption: Disruption,
) -> Scenario {
    Scenario {
        name,
        summary,
        up: link,
        down: link,
        disruption,
    }
}

const fn link(
    loss: Loss,
    one_way_ms: u32,
    rate_bps: Option<u64>,
    queue_bytes: usize,
) -> Impairment {
    Impairment {
        loss,
        delay: Duration::from_millis(one_way_ms as u64),
        jitter: Duration::ZERO,
        reorder: false,
        rate_bps,
        queue_bytes,
        drop_udp: false,
    }
}

/// The one-way delay of the scenarios whose point is a disruption, not the steady link.
const BASE_MS: u32 = 10;

/// Every scenario, in report order.
pub fn all() -> Vec<Scenario> {
    let base = link(Loss::None, BASE_MS, None, 64 * 1024);
    vec![
        symmetric(
            "clean",
            "no impairment",
            link(Loss::None, 0, None, 64 * 1024),
            Disruption::None,
        ),
        symmetric(
            "lossy-2",
            "2 % loss in bursts of about 3 packets, 15 ms one way, 10 Mb/s, 64 KiB queue",
            link(
                Loss::Bursty(GilbertElliott::with_mean(0.02, 3.0)),
                15,
                Some(10_000_000),
                64 * 1024,
            ),
            Disruption::None,
        ),
        symmetric(
            "lossy-5",
            "5 % random loss, 50 ms one way (100 ms RTT)",
            link(Loss::Random(0.05), 50, None, 64 * 1024),
            Disruption::None,
        ),
        symmetric(
            "satellite",
            "1 % random loss, 300 ms one way (600 ms RTT), 2 Mb/s, 64 KiB queue",
            link(Loss::Random(0.01), 300, Some(2_000_000), 64 * 1024),
            Disruption::None,
        ),
        symmetric(
            "handshake-loss",
            "30 % random loss both ways until the edge is connected, then 10 ms one way",
            base,
            Disruption::HandshakeLoss(0.30),
        ),
        symmetric(
            "blackhole",
            "10 ms one way; 5 s of total loss both ways, then restored",
            base,
            Disruption::Blackhole(MS * 5000),
        ),
        symmetric(
            "rebind-port",
            "10 ms one way; the edge's source ports change mid-connection",
            base,
            Disruption::RebindPort,
        ),
        symmetric(
            "rebind-addr",
            "10 ms one way; the edge's source address changes mid-connection",
            base,
            Disruption::RebindAddr,
        ),
        symmetric(
            "udp-blocked",
            "10 ms one way; every UDP packet dropped (only TCP passes)",
            Impairment {
                drop_udp: true,
                ..base
            },
            Disruption::None,
        ),
    ]
}

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

impl Scenario {
    /// The round-trip propagation delay (no queueing).
    pub fn rtt(&self) -> Duration {
        self.up.delay + self.down.delay
    }

    /// The narrower direction's rate, if any.
    pub fn rate_bps(&self) -> Option<u64> {
        match (self.up.rate_bps, self.down.rate_bps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let all = all();
        assert_eq!(all.len(), 9);
        for s in &all {
            assert_eq!(by_name(s.name), Some(*s));
        }
        assert_eq!(by_name("no-such-link"), None);
    }

    #[test]
    fn parameters_are_the_issues() {
        let lossy2 = by_name("lossy-2").expect("lossy-2");
        let Loss::Bursty(ge) = lossy2.up.loss else {
            panic!("lossy-2 is bursty");
        };
        let mean = ge.to_bad / (ge.to_bad + ge.to_good);
        assert!((mean - 0.02).abs() < 1e-9, "{mean}");
        assert!((1.0 / ge.to_good - 3.0).abs() < 1e-9);
        assert_eq!(lossy2.rtt(), MS * 30);
        assert_eq!(lossy2.rate_bps(), Some(10_000_000));
        assert_eq!(by_name("lossy-5").expect("lossy-5").rtt(), MS * 100);
        let sat = by_name("satellite").expect("satellite");
        assert_eq!((sat.rtt(), sat.rate_bps()), (MS * 600, Some(2_000_000)));
        assert_eq!(
            by_name("blackhole").expect("blackhole").disruption,
            Disruption::Blackhole(MS * 5000)
        );
        assert!(by_name("udp-blocked").expect("udp-blocked").up.drop_udp);
    }
}
