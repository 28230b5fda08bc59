//! The impairment model of one direction of the link: which packet is dropped, and when each
//! other packet arrives, given a seeded RNG and the clock the caller passes in. Pure: no I/O,
//! no clock of its own, so a seed and a sequence of (time, length) give the same verdicts every
//! run and the unit tests check the statistics without a network.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How packets are lost on the wire (after the queue: a lost packet still took its time on the
/// link).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// Nothing lost.
    None,
    /// Each packet lost independently with this probability (0..=1).
    Random(f64),
    /// Losses in bursts: a two-state Markov chain.
    Bursty(GilbertElliott),
}

/// The Gilbert-Elliott model: a good and a bad state, a transition before each packet, and a
/// loss probability in each state. Real lossy links (radio fades, congested hops) lose packets
/// in runs, which costs a transport more than the same rate of independent losses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GilbertElliott {
    /// Probability of going from good to bad before a packet.
    pub to_bad: f64,
    /// Probability of going from bad to good before a packet.
    pub to_good: f64,
    /// Loss probability in the good state.
    pub loss_good: f64,
    /// Loss probability in the bad state.
    pub loss_bad: f64,
}

impl GilbertElliott {
    /// The simple Gilbert model with a mean loss rate and a mean burst length in packets: every
    /// packet in the bad state is lost, none in the good one. The bad state lasts `burst`
    /// packets on average (to_good = 1/burst) and the chain spends `loss` of its time there
    /// (to_bad / (to_bad + to_good) = loss).
    pub fn with_mean(loss: f64, burst: f64) -> Self {
        let to_good = 1.0 / burst.max(1.0);
        let to_bad = loss * to_good / (1.0 - loss).max(f64::EPSILON);
        Self {
            to_bad,
            to_good,
            loss_good: 0.0,
            loss_bad: 1.0,
        }
    }
}

/// One direction's impairments. `Default` is a perfect link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Impairment {
    /// Loss on the wire.
    pub loss: Loss,
    /// Fixed one-way propagation delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ±`jitter` around `delay` (never below zero).
    pub jitter: Duration,
    /// Whether jitter may reorder packets; when false a packet never arrives before the one
    /// sent ahead of it (it waits for it, as on a single path with variable queueing).
    pub reorder: bool,
    /// Link rate in bits per second; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before it drops arriving packets (tail drop); only with
    /// a rate.
    pub queue_bytes: usize,
    /// Every UDP packet is dropped (a network that lets only TCP through).
    pub drop_udp: bool,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            loss: Loss::None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            rate_bps: None,
            queue_bytes: 64 * 1024,
            drop_udp: false,
        }
    }
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// The link is switched off.
    Blackhole,
    /// UDP is blocked.
    UdpBlocked,
    /// The bottleneck queue was full.
    QueueFull,
    /// Lost on the wire.
    Lost,
}

/// What happens to an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered at this time (on the caller's clock).
    Deliver(Duration),
    /// Dropped.
    Drop(Drop),
}

/// Counters of one direction; [`LinkModel::take_stats`] reads and resets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets offered.
    pub offered: u64,
    /// Packets delivered (or scheduled for delivery).
    pub delivered: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Dropped while blackholed.
    pub blackholed: u64,
    /// Dropped as UDP.
    pub udp_blocked: u64,
    /// Dropped by the full queue.
    pub queue_full: u64,
    /// Lost on the wire.
    pub lost: u64,
}

/// One direction of the link: its impairments and state (RNG, burst state, queue, last
/// arrival). Times are offsets from any fixed origin the caller chooses.
#[derive(Debug)]
pub struct LinkModel {
    impairment: Impairment,
    rng: StdRng,
    bad: bool,
    busy_until: Duration,
    last_arrival: Duration,
    blackhole: bool,
    stats: LinkStats,
}

impl LinkModel {
    /// A direction with `impairment`; the same `seed` replays the same losses and jitter.
    pub fn new(impairment: Impairment, seed: u64) -> Self {
        Self {
            impairment,
            rng: StdRng::seed_from_u64(seed),
            bad: false,
            busy_until: Duration::ZERO,
            last_arrival: Duration::ZERO,
            blackhole: false,
            stats: LinkStats::default(),
        }
    }

    /// The impairments in force.
    pub fn impairment(&self) -> &Impairment {
        &self.impairment
    }

    /// Replaces the impairments from the next packet on (the queue and burst state stay).
    pub fn set_impairment(&mut self, impairment: Impairment) {
        self.impairment = impairment;
    }

    /// Switches the blackhole on (every packet dropped) or off.
    pub fn set_blackhole(&mut self, on: bool) {
        self.blackhole = on;
    }

    /// Whether the blackhole is on.
    pub fn blackhole(&self) -> bool {
        self.blackhole
    }

    /// The counters since the last call, reset to zero.
    pub fn take_stats(&mut self) -> LinkStats {
        std::mem::take(&mut self.stats)
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Decides the fate of a packet of `len` bytes offered at `now`.
    pub fn offer(&mut self, now: Duration, len: usize, udp: bool) -> Verdict {
        self.stats.offered += 1;
        let verdict = self.decide(now, len, udp);
        match verdict {
            Verdict::Deliver(_) => {
                self.stats.delivered += 1;
                self.stats.delivered_bytes += len as u64;
            }
            Verdict::Drop(Drop::Blackhole) => self.stats.blackholed += 1,
            Verdict::Drop(Drop::UdpBlocked) => self.stats.udp_blocked += 1,
            Verdict::Drop(Drop::QueueFull) => self.stats.queue_full += 1,
            Verdict::Drop(Drop::Lost) => self.stats.lost += 1,
        }
        verdict
    }

    fn decide(&mut self, now: Duration, len: usize, udp: bool) -> Verdict {
        let imp = self.impairment;
        if self.blackhole {
            return Verdict::Drop(Drop::Blackhole);
        }
        if udp && imp.drop_udp {
            return Verdict::Drop(Drop::UdpBlocked);
        }
        // The bottleneck: a packet leaves once the ones ahead of it have been sent.
        let departure = match imp.rate_bps {
            Some(rate) if rate > 0 => {
                let backlog = self.busy_until.saturating_sub(now);
                let queued_bytes = backlog.as_secs_f64() * rate as f64 / 8.0;
                if queued_bytes + len as f64 > imp.queue_bytes as f64 {
                    return Verdict::Drop(Drop::QueueFull);
                }
                let serialise = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
                self.busy_until = self.busy_until.max(now) + serialise;
                self.busy_until
            }
            _ => now,
        };
        if self.lost() {
            return Verdict::Drop(Drop::Lost);
        }
        let mut arrival = departure + imp.delay;
        if !imp.jitter.is_zero() {
            let spread = imp.jitter.as_secs_f64();
            let offset = self.rng.random_range(-spread..=spread);
            arrival = if offset >= 0.0 {
                arrival + Duration::from_secs_f64(offset)
            } else {
                arrival.saturating_sub(Duration::from_secs_f64(-offset))
            };
            arrival = arrival.max(departure);
        }
        if !imp.reorder {
            arrival = arrival.max(self.last_arrival);
        }
        self.last_arrival = self.last_arrival.max(arrival);
        Verdict::Deliver(arrival)
    }

    fn lost(&mut self) -> bool {
        match self.impairment.loss {
            Loss::None => false,
            Loss::Random(p) => self.rng.random_bool(p.clamp(0.0, 1.0)),
            Loss::Bursty(ge) => {
                let flip = if self.bad { ge.to_good } else { ge.to_bad };
                if self.rng.random_bool(flip.clamp(0.0, 1.0)) {
                    self.bad = !self.bad;
                }
                let p = if self.bad { ge.loss_bad } else { ge.loss_good };
                self.rng.random_bool(p.clamp(0.0, 1.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn run(model: &mut LinkModel, n: usize) -> Vec<Verdict> {
        (0..n)
            .map(|i| model.offer(MS * i as u32, 100, false))
            .collect()
    }

    #[test]
    fn perfect_link_delivers_at_once() {
        let mut m = LinkModel::new(Impairment::default(), 1);
        assert_eq!(m.offer(MS * 5, 1500, true), Verdict::Deliver(MS * 5));
        assert_eq!(m.stats().delivered, 1);
    }

    #[test]
    fn random_loss_rate_is_close_to_the_setting_and_seeded() {
        let imp = Impairment {
            loss: Loss::Random(0.05),
            ..Impairment::default()
        };
        let a = run(&mut LinkModel::new(imp, 7), 20_000);
        let b = run(&mut LinkModel::new(imp, 7), 20_000);
        assert_eq!(a, b, "the same seed replays the same losses");
        let lost = a
            .iter()
            .filter(|v| **v == Verdict::Drop(Drop::Lost))
            .count();
        let rate = lost as f64 / a.len() as f64;
        assert!((0.04..0.06).contains(&rate), "loss rate {rate}");
    }

    #[test]
    fn gilbert_elliott_has_the_mean_rate_and_burst_length() {
        let imp = Impairment {
            loss: Loss::Bursty(GilbertElliott::with_mean(0.02, 3.0)),
            ..Impairment::default()
        };
        let verdicts = run(&mut LinkModel::new(imp, 11), 200_000);
        let lost: Vec<bool> = verdicts
            .iter()
            .map(|v| *v == Verdict::Drop(Drop::Lost))
            .collect();
        let rate = lost.iter().filter(|l| **l).count() as f64 / lost.len() as f64;
        assert!((0.016..0.024).contains(&rate), "loss rate {rate}");
        let bursts = lost.windows(2).filter(|w| !w[0] && w[1]).count();
        let mean_burst = lost.iter().filter(|l| **l).count() as f64 / bursts as f64;
        assert!((2.5..3.5).contains(&mean_burst), "mean burst {mean_burst}");
    }

    #[test]
    fn delay_and_jitter_without_reordering_keep_order() {
        let imp = Impairment {
            delay: MS * 50,
            jitter: MS * 20,
            ..Impairment::default()
        };
        let mut m = LinkModel::new(imp, 3);
        let mut last = Duration::ZERO;
        for i in 0..1000u32 {
            let now = MS * i;
            let Verdict::Deliver(at) = m.offer(now, 100, false) else {
                panic!("no loss configured");
            };
            assert!(at >= last, "packet {i} overtook the one before it");
            assert!(at >= now + MS * 30, "never earlier than delay - jitter");
            last = at;
        }
    }

    #[test]
    fn jitter_with_reordering_reorders_some_packets() {
        let imp = Impairment {
            delay: MS * 50,
            jitter: MS * 20,
            reorder: true,
            ..Impairment::default()
        };
        let mut m = LinkModel::new(imp, 3);
        let arrivals: Vec<Duration> = (0..1000u32)
            .map(|i| match m.offer(MS * i, 100, false) {
                Verdict::Deliver(at) => at,
                v => panic!("{v:?}"),
            })
            .collect();
        let overtaken = arrivals.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(overtaken > 100, "{overtaken} reorderings");
        let spread = arrivals
            .iter()
            .enumerate()
            .map(|(i, at)| at.as_secs_f64() - (MS * i as u32).as_secs_f64())
            .fold((f64::MAX, 0.0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
        assert!(
            spread.0 >= 0.030 - 1e-9 && spread.1 <= 0.070 + 1e-9,
            "{spread:?}"
        );
    }

    #[test]
    fn rate_limit_spaces_packets_and_the_queue_is_bounded() {
        // 1 Mb/s: a 1250-byte packet takes 10 ms; the queue holds 10 of them.
        let imp = Impairment {
            rate_bps: Some(1_000_000),
            queue_bytes: 12_500,
            ..Impairment::default()
        };
        let mut m = LinkModel::new(imp, 1);
        let verdicts: Vec<Verdict> = (0..20)
            .map(|_| m.offer(Duration::ZERO, 1250, false))
            .collect();
        for (i, v) in verdicts.iter().take(10).enumerate() {
            assert_eq!(*v, Verdict::Deliver(MS * 10 * (i as u32 + 1)));
        }
        assert!(
            verdicts[10..]
                .iter()
                .all(|v| *v == Verdict::Drop(Drop::QueueFull))
        );
        // Once the queue drained the link takes packets again.
        assert_eq!(m.offer(MS * 100, 1250, false), Verdict::Deliver(MS * 110));
        let stats = m.take_stats();
        assert_eq!((stats.delivered, stats.queue_full), (11, 10));
        assert_eq!(
            m.stats(),
            LinkStats::default(),
            "taking the stats resets them"
        );
    }

    #[test]
    fn blackhole_drops_everything_until_switched_off() {
        let mut m = LinkModel::new(Impairment::default(), 1);
        m.set_blackhole(true);
        assert_eq!(m.offer(MS, 100, false), Verdict::Drop(Drop::Blackhole));
        m.set_blackhole(false);
        assert_eq!(m.offer(MS * 2, 100, false), Verdict::Deliver(MS * 2));
    }

    #[test]
    fn udp_blocked_lets_tcp_through() {
        let imp = Impairment {
            drop_udp: true,
            ..Impairment::default()
        };
        let mut m = LinkModel::new(imp, 1);
        assert_eq!(m.offer(MS, 100, true), Verdict::Drop(Drop::UdpBlocked));
        assert_eq!(m.offer(MS, 100, false), Verdict::Deliver(MS));
    }
}
