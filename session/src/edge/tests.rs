//! Virtual-time tests of [`EdgeSession`]: the production state machine driven by a harness whose
//! "network" is a queue of timed deliveries and whose "cloud" records what arrives, acknowledges
//! upstream messages and answers transport pings (modelled as [`Event::PeerActivity`]). Hours of
//! link time run in milliseconds; nothing sleeps.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use proto::Fault;

use super::*;

const HB: Duration = Duration::from_secs(15);

/// What the simulated link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Connects succeed after one latency; messages arrive after one latency.
    Up,
    /// Connects are refused after one latency (cloud down).
    Refused,
    /// Everything vanishes: connects time out after the handshake timeout, messages are lost
    /// and no sign of life comes back (half-open TCP, UDP blackhole).
    Blackhole,
}

/// Something scheduled to happen at a virtual instant.
#[derive(Debug)]
enum Delivery {
    ToSession(Event),
    MessageToSession(Generation, Message),
    ToCloud(Generation, Message),
}

struct Harness {
    session: EdgeSession,
    t0: Instant,
    now: Instant,
    link: Link,
    latency: Duration,
    handshake_timeout: Duration,
    /// Whether the simulated cloud negotiates and sends upstream acknowledgements.
    cloud_acks: bool,
    /// Whether the cloud's transport answers each received message with a sign of life.
    cloud_pongs: bool,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Delivery>,
    seq: u64,
    /// The generation the cloud currently serves (None: no connection).
    cloud_conn: Option<Generation>,
    /// Everything the cloud received: (time since t0, generation, message).
    received: Vec<(Duration, Generation, Message)>,
    actions: Vec<(Duration, Action)>,
    events: Vec<(Duration, SessionEvent)>,
    written_without_ack: Vec<String>,
}

impl Harness {
    fn new(config: SessionConfig) -> Self {
        Self::with_random(config, || 0.5)
    }

    fn with_random(config: SessionConfig, random: impl FnMut() -> f64 + Send + 'static) -> Self {
        let t0 = Instant::now();
        let h = Self {
            session: EdgeSession::new(config, t0, random),
            t0,
            now: t0,
            link: Link::Up,
            latency: Duration::from_millis(50),
            handshake_timeout: Duration::from_secs(30),
            cloud_acks: true,
            cloud_pongs: true,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            cloud_conn: None,
            received: Vec::new(),
            actions: Vec::new(),
            events: Vec::new(),
            written_without_ack: Vec::new(),
        };
        // Nothing is performed until the first `run_until`, so a test can set the link first.
        h
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    fn schedule(&mut self, after: Duration, delivery: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq)));
        self.pending.insert(self.seq, delivery);
    }

    /// Performs everything the session asks for at the current instant.
    fn drain(&mut self) {
        while let Some(transmit) = self.session.poll_transmit(self.now) {
            if let TransmitKind::Upstream {
                forget_after_write: true,
            } = transmit.kind
            {
                self.written_without_ack
                    .push(transmit.message.header.id.clone());
            }
            if self.link != Link::Blackhole {
                self.schedule(
                    self.latency,
                    Delivery::ToCloud(transmit.generation, transmit.message),
                );
            }
        }
        while let Some(action) = self.session.poll_action() {
            match &action {
                Action::Connect { generation } => {
                    let generation = *generation;
                    match self.link {
                        Link::Up => self.schedule(
                            self.latency * 2,
                            Delivery::ToSession(Event::Connected {
                                generation,
                                upstream_ack: self.cloud_acks,
                            }),
                        ),
                        Link::Refused => self.schedule(
                            self.latency,
                            Delivery::ToSession(Event::ConnectFailed {
                                generation,
                                fault: Fault::network("connection refused"),
                            }),
                        ),
                        Link::Blackhole => self.schedule(
                            self.handshake_timeout,
                            Delivery::ToSession(Event::ConnectFailed {
                                generation,
                                fault: Fault::network("handshake timed out"),
                            }),
                        ),
                    }
                }
                Action::Close { generation, .. } => {
                    if self.cloud_conn == Some(*generation) {
                        self.cloud_conn = None;
                    }
                }
                Action::Forget { .. } => {}
            }
            self.actions.push((self.elapsed(), action));
        }
        while let Some(event) = self.session.poll_event() {
            if let SessionEvent::Connected { generation, .. } = &event {
                self.cloud_conn = Some(*generation);
            }
            self.events.push((self.elapsed(), event));
        }
    }

    /// Advances to the next timer or delivery, handles it, and drains. False when nothing is left.
    fn step(&mut self) -> bool {
        let next_delivery = self.queue.peek().map(|Reverse((at, _))| *at);
        let next_timer = self.session.poll_timeout();
        let next = match (next_delivery, next_timer) {
            (Some(d), Some(t)) => d.min(t),
            (Some(d), None) => d,
            (None, Some(t)) => t,
            (None, None) => return false,
        };
        self.now = self.now.max(next);
        if next_delivery == Some(next) {
            let Some(Reverse((_, seq))) = self.queue.pop() else {
                unreachable!()
            };
            let delivery = self.pending.remove(&seq).expect("scheduled");
            self.deliver(delivery);
        } else {
            self.session.handle_timeout(self.now);
        }
        self.drain();
        true
    }

    fn deliver(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::ToSession(event) => self.session.handle_event(self.now, event),
            Delivery::MessageToSession(generation, message) => {
                if self.link != Link::Blackhole {
                    self.session.handle_message(self.now, generation, message);
                }
            }
            Delivery::ToCloud(generation, message) => {
                if self.link == Link::Blackhole || self.cloud_conn != Some(generation) {
                    return;
                }
                // As a Causeway cloud does (PROTOCOL.md Part A item 7): only data is acknowledged.
                let is_upstream = message.upstream_class() == UpstreamClass::Data;
                self.received
                    .push((self.elapsed(), generation, message.clone()));
                if self.cloud_pongs {
                    self.schedule(
                        self.latency,
                        Delivery::ToSession(Event::PeerActivity { generation }),
                    );
                }
                if is_upstream && self.cloud_acks {
                    let ack = Message::with_header(
                        format!("ack-{}", message.header.id),
                        message.header.id,
                        0,
                    )
                    .route(
                        "cloudhub",
                        proto::message::GROUP_CAUSEWAY,
                        "",
                        proto::message::OP_ACK,
                    );
                    self.schedule(self.latency, Delivery::MessageToSession(generation, ack));
                }
            }
        }
    }

    fn run_until(&mut self, until: Duration) {
        self.drain();
        while self.next_at().is_some_and(|at| at - self.t0 <= until) {
            self.step();
        }
        self.now = self.now.max(self.t0 + until);
    }

    fn next_at(&self) -> Option<Instant> {
        let d = self.queue.peek().map(|Reverse((at, _))| *at);
        match (d, self.session.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Injects an event from the driver at the current instant.
    fn inject(&mut self, event: Event) {
        self.session.handle_event(self.now, event);
        self.drain();
    }

    fn keepalive_times(&self) -> Vec<Duration> {
        self.received
            .iter()
            .filter(|(_, _, m)| m.route.operation == OP_KEEPALIVE)
            .map(|(t, _, _)| *t)
            .collect()
    }

    fn connects(&self) -> Vec<(Duration, Generation)> {
        self.actions
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Connect { generation } => Some((*t, *generation)),
                _ => None,
            })
            .collect()
    }

    fn closes(&self) -> Vec<(Duration, Generation, DisconnectReason)> {
        self.actions
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Close { generation, reason } => Some((*t, *generation, reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn published(&self, content: &str) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| {
                matches!(e, SessionEvent::Publish { message, .. } if message.content.as_text() == Some(content))
            })
            .count()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn upstream(id: &str) -> Message {
    Message::with_header(id, "", 0).route("metamanager", "resource", "default/pod/p", "update")
}

#[test]
fn keepalive_right_after_connect_then_every_heartbeat() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(61));
    // Connected at 100 ms (two latencies); each keepalive arrives one latency after it is sent.
    let sent: Vec<Duration> = h.keepalive_times().iter().map(|t| *t - ms(50)).collect();
    assert_eq!(
        sent,
        [ms(100), ms(15_100), ms(30_100), ms(45_100), ms(60_100)]
    );
    let k = &h.received[0].2;
    assert_eq!(
        (
            k.route.source.as_str(),
            k.route.group.as_str(),
            k.route.resource.as_str()
        ),
        ("websocket", "resource", "node")
    );
    assert_eq!(k.route.operation, "keepalive");
    assert_eq!(k.content, Content::text("ping"));
    assert_eq!(
        h.session.stats().disconnects,
        0,
        "a live cloud is never declared dead"
    );
}

#[test]
fn heartbeat_cadence_does_not_drift_when_the_driver_is_late() {
    let mut config = SessionConfig::new(HB);
    config.dead_after = None; // the test jumps time without letting the cloud answer
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    // The driver wakes 3 s late for the first heartbeat: the next keeps the original schedule.
    let due = h.session.timer(Timer::Heartbeat).expect("armed");
    h.now = due + Duration::from_secs(3);
    h.session.handle_timeout(h.now);
    assert_eq!(h.session.timer(Timer::Heartbeat), Some(due + HB));
    // 20 s late (more than a period): restart the cadence from now rather than bursting.
    let due = due + HB;
    h.now = due + Duration::from_secs(20);
    h.session.handle_timeout(h.now);
    assert_eq!(h.session.timer(Timer::Heartbeat), Some(h.now + HB));
}

#[test]
fn connection_events_are_published_to_the_four_groups() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(ms(500));
    let groups: Vec<&str> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            SessionEvent::Publish { group, .. } => Some(*group),
            _ => None,
        })
        .collect();
    assert_eq!(groups, ["twin", "meta", "bus", "taskmanager"]);
    assert_eq!(h.published("cloud_connected"), 4);
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("reset"),
    });
    assert_eq!(h.published("cloud_disconnected"), 4);
}

#[test]
fn reconnect_waits_two_heartbeats_plus_jitter_after_a_loss() {
    // The harness draws 0.5: half of the jitter (half a heartbeat) is added.
    let wait = HB * 2 + HB / 4;
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(20));
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("connection reset"),
    });
    let lost_at = h.elapsed();
    assert_eq!(h.session.state(), SessionState::Waiting);
    h.run_until(Duration::from_secs(120));
    let connects = h.connects();
    assert_eq!(connects.len(), 2);
    assert_eq!(connects[1], (lost_at + wait, Generation(2)));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
    let scheduled = h.events.iter().find_map(|(_, e)| match e {
        SessionEvent::ReconnectScheduled {
            after, failures, ..
        } => Some((*after, *failures)),
        _ => None,
    });
    assert_eq!(scheduled, Some((wait, 0)));
}

#[test]
fn the_wait_after_a_cloud_close_follows_its_code() {
    let normal = HB * 2 + HB / 4;
    let longest = BackoffConfig::from_heartbeat(HB).max;
    for (code, expected) in [
        (SessionCloseCode::Shutdown, normal),
        (SessionCloseCode::KeepaliveTimeout, normal),
        // A takeover by another instance of this node is not fought in a tight loop.
        (SessionCloseCode::Replaced, longest),
        (SessionCloseCode::IdentityRefused, longest),
    ] {
        let mut h = Harness::new(SessionConfig::new(HB));
        h.run_until(Duration::from_secs(20));
        h.inject(Event::ClosedByCloud {
            generation: Generation(1),
            code,
            reason: "why".into(),
        });
        let closed_at = h.elapsed();
        let disconnected = h.events.iter().find_map(|(_, e)| match e {
            SessionEvent::Disconnected { reason, .. } => Some(reason.clone()),
            _ => None,
        });
        assert_eq!(
            disconnected,
            Some(DisconnectReason::ClosedByCloud {
                code,
                reason: "why".into()
            })
        );
        h.run_until(Duration::from_secs(400));
        assert_eq!(h.connects()[1].0 - closed_at, expected, "{code}");
    }
    // The node limit counts as a failed attempt: backoff, at least the usual wait.
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(20));
    h.inject(Event::ClosedByCloud {
        generation: Generation(1),
        code: SessionCloseCode::NodeLimit,
        reason: "full".into(),
    });
    assert_eq!(h.session.failures(), 1);
}

#[test]
fn a_fleet_that_lost_its_cloud_together_comes_back_spread_out() {
    // Nodes with different random draws, all losing the link at one instant: each waits at
    // least two heartbeats and the fleet spreads over the jitter, not one burst.
    let mut waits = Vec::new();
    for draw in [0.0, 0.25, 0.5, 0.75, 0.999] {
        let mut h = Harness::with_random(SessionConfig::new(HB), move || draw);
        h.run_until(Duration::from_secs(20));
        h.inject(Event::Failed {
            generation: Generation(1),
            fault: Fault::network("cloud restarted"),
        });
        let lost_at = h.elapsed();
        h.run_until(Duration::from_secs(120));
        waits.push(h.connects()[1].0 - lost_at);
    }
    assert!(
        waits.iter().all(|w| *w >= HB * 2 && *w < HB * 2 + HB / 2),
        "{waits:?}"
    );
    assert!(waits.windows(2).all(|w| w[0] < w[1]), "{waits:?}");
}

#[test]
fn dead_cloud_is_detected_within_two_heartbeats() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(40));
    // The link blackholes: keepalives vanish, nothing comes back, no transport error is reported.
    h.link = Link::Blackhole;
    let cut = h.elapsed();
    h.run_until(Duration::from_secs(200));
    let (at, generation, reason) = h.closes().first().cloned().expect("closed");
    assert_eq!(generation, Generation(1));
    let DisconnectReason::DeadPeer { silent_for } = reason else {
        panic!("{reason:?}")
    };
    assert_eq!(silent_for, HB * 2);
    // Last sign of life: the pong of the keepalive sent at 30.1 s, heard at 30.2 s.
    assert_eq!(at, ms(30_200) + HB * 2);
    assert!(at - cut <= HB * 2, "noticed {:?} after the cut", at - cut);
}

#[test]
fn quiet_cloud_without_any_sign_of_life_is_dead_but_activity_keeps_it_alive() {
    let mut config = SessionConfig::new(HB);
    config.dead_after = Some(HB * 2);
    let mut h = Harness::new(config.clone());
    h.cloud_pongs = false;
    h.run_until(Duration::from_secs(31));
    assert_eq!(
        h.closes().len(),
        1,
        "no message and no activity for 30 s: dead"
    );

    let mut h = Harness::new(config);
    h.cloud_pongs = true;
    h.run_until(Duration::from_secs(300));
    assert!(h.closes().is_empty(), "transport activity counts as life");
}

#[test]
fn liveness_can_be_left_to_the_transport() {
    let mut config = SessionConfig::new(HB);
    config.dead_after = None;
    let mut h = Harness::new(config);
    h.cloud_pongs = false;
    h.run_until(Duration::from_secs(600));
    assert!(h.closes().is_empty());
    assert_eq!(h.session.timer(Timer::ReadDeadline), None);
}

#[test]
fn concurrent_failures_of_one_connection_cause_one_reconnect() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(20));
    // The reader, the writer and the transport's deadline all report the same dead connection.
    for reason in ["recv: reset", "send: broken pipe", "read deadline"] {
        h.inject(Event::Failed {
            generation: Generation(1),
            fault: Fault::network(reason),
        });
    }
    h.now += ms(10);
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("late"),
    });
    h.run_until(Duration::from_secs(100));
    assert_eq!(h.closes().len(), 1);
    assert_eq!(h.connects().len(), 2);
    assert_eq!(h.published("cloud_disconnected"), 4, "modules told once");
    assert_eq!(h.session.stats().coalesced_failures, 3);
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
}

#[test]
fn stale_generation_events_never_touch_the_new_connection() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(20));
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("reset"),
    });
    h.run_until(Duration::from_secs(60));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
    let before = h.session.stats();
    // Late signals from generation 1 arrive while generation 2 is healthy.
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("late read error"),
    });
    h.inject(Event::ConnectFailed {
        generation: Generation(1),
        fault: Fault::network("late"),
    });
    h.inject(Event::PeerActivity {
        generation: Generation(1),
    });
    h.inject(Event::Connected {
        generation: Generation(1),
        upstream_ack: true,
    });
    let late = Message::with_header("late", "", 0).route(
        "edgecontroller",
        "resource",
        "a/pod/b",
        "update",
    );
    h.session.handle_message(h.now, Generation(1), late);
    h.drain();
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
    assert_eq!(h.session.stats().stale_events, before.stale_events + 5);
    assert_eq!(
        h.session.stats().delivered,
        before.delivered,
        "late message not delivered"
    );
    // The late `Connected` of generation 1 is closed, never adopted; generation 2 is untouched.
    let closes = h.closes();
    assert_eq!(closes.len(), 2);
    assert_eq!(closes[1].1, Generation(1));
    h.run_until(Duration::from_secs(200));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
}

#[test]
fn failures_back_off_exponentially_within_bounds() {
    let mut config = SessionConfig::new(HB);
    config.backoff = BackoffConfig {
        min: Duration::from_secs(1),
        base: Duration::from_secs(30),
        max: Duration::from_secs(120),
    };
    // Always draw the top of the range, so each wait equals its ceiling.
    let mut h = Harness::with_random(config, || 1.0 - f64::EPSILON);
    h.link = Link::Refused;
    h.run_until(Duration::from_secs(1000));
    let connects = h.connects();
    let gaps: Vec<u64> = connects
        .windows(2)
        .map(|w| (w[1].0 - w[0].0 - h.latency).as_secs_f64().round() as u64)
        .collect();
    assert_eq!(&gaps[..6], &[30, 60, 120, 120, 120, 120]);
    assert_eq!(h.session.failures() as usize, connects.len());
}

#[test]
fn backoff_jitter_spreads_a_fleet() {
    // Ten edges lose a cloud that stays down; with full jitter their attempts spread out.
    let mut firsts = Vec::new();
    for seed in 0..10u64 {
        let mut h = Harness::new(SessionConfig::new(HB));
        h.session = EdgeSession::with_seed(SessionConfig::new(HB), h.t0, seed);
        h.link = Link::Refused;
        h.run_until(Duration::from_secs(400));
        let connects = h.connects();
        let gap = connects[1].0 - connects[0].0 - h.latency;
        let config = BackoffConfig::from_heartbeat(HB);
        assert!(gap >= config.min && gap <= config.ceiling(1), "{gap:?}");
        for w in connects.windows(2).skip(1) {
            assert!(w[1].0 - w[0].0 - h.latency <= config.max);
        }
        firsts.push(gap);
    }
    firsts.sort();
    firsts.dedup();
    assert_eq!(
        firsts.len(),
        10,
        "every seed gives a different wait: {firsts:?}"
    );
}

#[test]
fn success_resets_the_backoff_but_a_short_lived_connection_does_not() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.link = Link::Refused;
    h.run_until(Duration::from_secs(100));
    assert!(h.session.failures() >= 2);
    h.link = Link::Up;
    h.run_until(Duration::from_secs(400));
    assert_eq!(
        h.session.state(),
        SessionState::Connected(h.session.connected_generation().unwrap())
    );
    let failures_before = h.session.failures();
    // The connection is healthy for a long time, then lost: the counter resets, wait = 2 HB
    // plus the jitter (a quarter heartbeat with the harness's draw of 0.5).
    h.inject(Event::Failed {
        generation: h.session.connected_generation().unwrap(),
        fault: Fault::network("x"),
    });
    assert_eq!(h.session.failures(), 0);
    assert!(failures_before > 0);
    h.run_until(h.elapsed() + HB * 2 + HB / 4 + ms(200));
    // Now a connection that dies right away counts as a failure and waits at least 2 HB.
    let generation = h.session.connected_generation().expect("reconnected");
    h.inject(Event::Failed {
        generation,
        fault: Fault::network("accepted then closed"),
    });
    assert_eq!(h.session.failures(), 1);
    let wait = h.session.timer(Timer::ReconnectWait).unwrap() - h.now;
    assert!(wait >= HB * 2);
}

#[test]
fn blackholed_connect_attempts_time_out_and_back_off() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.link = Link::Blackhole;
    h.run_until(Duration::from_secs(300));
    let failures = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, SessionEvent::ConnectFailed { .. }))
        .count();
    assert!(failures >= 3);
    assert_eq!(h.session.stats().connects, 0);
    assert_eq!(h.published("cloud_connected"), 0);
}

#[test]
fn upstream_is_rate_limited_but_keepalives_are_not() {
    let mut config = SessionConfig::new(HB);
    config.message_qps = 10.0;
    config.message_burst = 5;
    config.upstream_window = 1000;
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    for i in 0..25 {
        h.session
            .queue_upstream(upstream(&format!("m{i}")))
            .unwrap();
    }
    h.drain();
    h.run_until(Duration::from_secs(10));
    let times: Vec<Duration> = h
        .received
        .iter()
        .filter(|(_, _, m)| m.route.operation != OP_KEEPALIVE)
        .map(|(t, _, _)| *t)
        .collect();
    assert_eq!(times.len(), 25);
    // Five at once (the burst), then one every 100 ms.
    assert!(times[..5].iter().all(|t| *t == ms(250)));
    for (i, t) in times[5..].iter().enumerate() {
        let expected = ms(250 + 100 * (i as u64 + 1));
        assert!(
            t.abs_diff(expected) <= ms(1),
            "message {}: {t:?} vs {expected:?}",
            i + 5
        );
    }
    // Order is kept.
    let ids: Vec<&str> = h
        .received
        .iter()
        .filter(|(_, _, m)| m.route.operation != OP_KEEPALIVE)
        .map(|(_, _, m)| m.header.id.as_str())
        .collect();
    let want: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want);
    // The keepalive at 15 s is not delayed by a full bucket.
    h.session.queue_upstream(upstream("late")).unwrap();
    h.run_until(Duration::from_secs(16));
    assert!(h.keepalive_times().contains(&ms(15_150)));
}

#[test]
fn acknowledged_upstream_is_forgotten_and_unacknowledged_survives_a_reconnect() {
    let mut config = SessionConfig::new(HB);
    config.upstream_window = 3;
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    for id in ["a", "b", "c"] {
        h.session.queue_upstream(upstream(id)).unwrap();
    }
    assert!(matches!(
        h.session.queue_upstream(upstream("d")),
        Err(QueueUpstreamError::WindowFull(_))
    ));
    h.drain();
    h.run_until(ms(400));
    let forgotten: Vec<&str> = h
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Forget { id } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(forgotten, ["a", "b", "c"]);
    assert_eq!(h.session.in_flight(), 0);
    assert_eq!(h.session.upstream_capacity(), 3);

    // Now the cloud stops acknowledging; the link drops with "e" in flight.
    h.cloud_acks = false;
    h.session.queue_upstream(upstream("e")).unwrap();
    h.drain();
    h.run_until(ms(600));
    assert_eq!(h.session.in_flight(), 1);
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("reset"),
    });
    assert_eq!(
        h.session.in_flight(),
        0,
        "cleared from the session, still in the outbox"
    );
    assert!(matches!(
        h.session.queue_upstream(upstream("e")),
        Err(QueueUpstreamError::NotConnected(_))
    ));
    assert!(
        !h.actions
            .iter()
            .any(|(_, a)| matches!(a, Action::Forget { id } if id == "e"))
    );
}

#[test]
fn without_upstream_ack_messages_are_forgotten_once_written() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.cloud_acks = false;
    h.run_until(ms(200));
    h.session.queue_upstream(upstream("x")).unwrap();
    h.drain();
    assert_eq!(h.written_without_ack, ["x"]);
    assert_eq!(h.session.in_flight(), 0);
    let connected = h.events.iter().find_map(|(_, e)| match e {
        SessionEvent::Connected { upstream_ack, .. } => Some(*upstream_ack),
        _ => None,
    });
    assert_eq!(connected, Some(false));
}

#[test]
fn cloud_messages_are_routed_and_acks_consumed() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(ms(200));
    let g = Generation(1);
    let pod = Message::with_header("p1", "", 0).route(
        "edgecontroller",
        "resource",
        "default/pod/a",
        "update",
    );
    let reply = Message::with_header("r1", "q1", 0).route(
        "edgecontroller",
        "resource",
        "default/pod/a",
        "response",
    );
    let junk = Message::with_header("j1", "", 0).route("x", "nowhere", "r", "update");
    let echo = Message::with_header("k1", "", 0).route("cloudhub", "resource", "node", "keepalive");
    let ack = Message::with_header("a1", "up-1", 0).route("cloudhub", "causeway", "", "ack");
    for m in [pod, reply, junk, echo, ack] {
        h.session.handle_message(h.now, g, m);
    }
    h.drain();
    let routed: Vec<(String, String)> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            SessionEvent::Deliver {
                destination,
                message,
            } => Some((format!("{destination:?}"), message.header.id.clone())),
            SessionEvent::Unroutable { message, .. } => {
                Some(("unroutable".into(), message.header.id.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        routed,
        [
            ("Group(\"meta\")".to_string(), "p1".to_string()),
            ("Response".into(), "r1".into()),
            ("unroutable".into(), "j1".into())
        ]
    );
    let stats = h.session.stats();
    assert_eq!(
        (
            stats.delivered,
            stats.unroutable,
            stats.keepalives_received,
            stats.upstream_acks
        ),
        (2, 1, 1, 1)
    );
    assert!(
        h.actions
            .iter()
            .any(|(_, a)| matches!(a, Action::Forget { id } if id == "up-1"))
    );
}

#[test]
fn requested_reconnect_and_shutdown() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(20));
    h.inject(Event::Reconnect {
        reason: "certificate renewed".into(),
    });
    assert!(matches!(h.closes()[0].2, DisconnectReason::Requested(_)));
    h.run_until(Duration::from_secs(60));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
    h.inject(Event::Shutdown);
    assert_eq!(h.session.state(), SessionState::Stopped);
    assert_eq!(
        h.closes().last().map(|c| c.2.clone()),
        Some(DisconnectReason::Shutdown)
    );
    assert_eq!(h.session.poll_timeout(), None);
    assert!(!h.step() || h.session.state() == SessionState::Stopped);
    h.run_until(Duration::from_secs(600));
    assert_eq!(h.connects().len(), 2, "no attempt after shutdown");
}

#[test]
fn reconnect_now_moves_without_the_wait_and_resends_the_unacknowledged() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.run_until(Duration::from_secs(5));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(1)));
    // The cloud stops acknowledging: "up-1" is written but stays in flight.
    h.cloud_acks = false;
    h.session.queue_upstream(upstream("up-1")).expect("queued");
    h.run_until(Duration::from_secs(6));
    let at = h.elapsed();
    h.inject(Event::ReconnectNow {
        reason: "moving back to quic".into(),
    });
    assert!(matches!(h.closes()[0].2, DisconnectReason::Requested(_)));
    // The next attempt is asked for at once, not after two heartbeats.
    assert_eq!(h.connects().last(), Some(&(at, Generation(2))));
    h.cloud_acks = true;
    h.run_until(Duration::from_secs(7));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(2)));
    // Unacknowledged upstream is the outbox's to offer again (it stays there): the session
    // forgot nothing it was not acknowledged for.
    assert!(
        !h.actions
            .iter()
            .any(|(_, a)| matches!(a, Action::Forget { id } if id == "up-1"))
    );

    // While waiting after a loss, it ends the wait.
    h.link = Link::Refused;
    h.inject(Event::Failed {
        generation: Generation(2),
        fault: Fault::network("reset"),
    });
    assert_eq!(h.session.state(), SessionState::Waiting);
    h.link = Link::Up;
    let at = h.elapsed();
    h.inject(Event::ReconnectNow {
        reason: "moving back".into(),
    });
    assert_eq!(h.connects().last(), Some(&(at, Generation(3))));
    // While connecting it changes nothing.
    h.inject(Event::ReconnectNow {
        reason: "again".into(),
    });
    assert_eq!(h.connects().len(), 3);
    h.run_until(Duration::from_secs(8));
    assert_eq!(h.session.state(), SessionState::Connected(Generation(3)));
}

#[test]
fn shutdown_while_connecting_closes_the_attempt() {
    let mut h = Harness::new(SessionConfig::new(HB));
    h.inject(Event::Shutdown);
    assert_eq!(h.closes().len(), 1);
    h.run_until(Duration::from_secs(10));
    // The attempt's late `Connected` is closed, not adopted.
    assert_eq!(h.session.state(), SessionState::Stopped);
    assert_eq!(h.closes().len(), 2);
    assert_eq!(h.published("cloud_connected"), 0);
}

#[test]
fn an_outage_and_recovery_lose_nothing_in_the_session_contract() {
    // Long run: outages of different kinds; after each, the session reconnects and resumes
    // keepalives; the generation grows by one per attempt and only the newest is ever connected.
    let mut h = Harness::new(SessionConfig::new(HB));
    let mut t = Duration::ZERO;
    for (link, secs) in [
        (Link::Up, 100),
        (Link::Blackhole, 100),
        (Link::Refused, 200),
        (Link::Up, 300),
    ] {
        h.link = link;
        t += Duration::from_secs(secs);
        h.run_until(t);
    }
    assert!(matches!(h.session.state(), SessionState::Connected(_)));
    let connects = h.connects();
    for (i, (_, g)) in connects.iter().enumerate() {
        assert_eq!(g.get(), i as u64 + 1);
    }
    // Keepalives resumed on the final connection at the heartbeat cadence.
    let last_gen = h.session.connected_generation().unwrap();
    let last: Vec<Duration> = h
        .received
        .iter()
        .filter(|(_, g, m)| *g == last_gen && m.route.operation == OP_KEEPALIVE)
        .map(|(t, _, _)| *t)
        .collect();
    assert!(last.len() >= 10);
    assert!(last.windows(2).all(|w| w[1] - w[0] == HB));
}

/// A cloud message that needs an ACK, delivered to the session as the cloud would send it.
fn cloud_message(id: &str) -> Message {
    Message::with_header(id, "", 0).route("edgecontroller", "resource", "default/pod/p", "update")
}

fn received_ids(h: &Harness) -> Vec<String> {
    h.received
        .iter()
        .filter(|(_, _, m)| m.route.operation != OP_KEEPALIVE)
        .map(|(_, _, m)| m.header.id.clone())
        .collect()
}

#[test]
fn answers_never_wait_for_an_acknowledgement_nor_fill_the_window() {
    // The bug this guards: answers (ACK responses) were kept until a cloud acknowledgement that
    // never comes, so after `upstream_window` of them nothing more went up.
    let mut config = SessionConfig::new(HB);
    config.upstream_window = 3;
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    let g = Generation(1);
    for i in 0..300 {
        let cloud = cloud_message(&format!("c{i}"));
        h.session.handle_message(h.now, g, cloud.clone());
        h.session
            .queue_answer(Message::response_to(&cloud, Content::text("OK")));
        // An answer stored by an older outbox comes back as a row: written once, then forgotten.
        if i % 100 == 0 {
            let mut legacy = Message::response_to(&cloud, Content::text("OK"));
            legacy.header.id = format!("legacy-{i}");
            h.session.queue_upstream(legacy).unwrap();
        }
        h.drain();
    }
    h.run_until(ms(1_000));
    assert_eq!(h.session.in_flight(), 0);
    assert_eq!(h.session.upstream_capacity(), 3);
    assert_eq!(
        h.written_without_ack,
        ["legacy-0", "legacy-100", "legacy-200"]
    );
    let stats = h.session.stats();
    assert_eq!(stats.answers_sent, 300);
    assert_eq!(stats.answers_rate_limited, 0);
    assert_eq!(stats.answers_dropped, 0);
    // Data still flows through the window afterwards.
    for id in ["a", "b", "c"] {
        h.session.queue_upstream(upstream(id)).unwrap();
    }
    h.drain();
    h.run_until(ms(1_500));
    assert_eq!(h.session.in_flight(), 0);
    assert!(received_ids(&h).ends_with(&["a".into(), "b".into(), "c".into()]));
}

#[test]
fn answers_bypass_the_rate_limiter_and_the_module_backlog() {
    let mut config = SessionConfig::new(HB);
    config.message_qps = 1.0;
    config.message_burst = 1;
    config.upstream_window = 1000;
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    for i in 0..100 {
        h.session
            .queue_upstream(upstream(&format!("m{i}")))
            .unwrap();
    }
    h.drain();
    let g = Generation(1);
    for i in 0..50 {
        let cloud = cloud_message(&format!("c{i}"));
        h.session.handle_message(h.now, g, cloud.clone());
        h.session
            .queue_answer(Message::response_to(&cloud, Content::text("OK")));
    }
    h.drain();
    h.run_until(ms(2_000));
    let ids = received_ids(&h);
    let answered: Vec<&Message> = h
        .received
        .iter()
        .map(|(_, _, m)| m)
        .filter(|m| m.upstream_class() == UpstreamClass::Answer)
        .collect();
    assert_eq!(answered.len(), 50, "every answer went out at once: {ids:?}");
    // Module data kept its pace of one per second behind them.
    let data = ids.iter().filter(|id| id.starts_with('m')).count();
    assert!(data <= 3, "{data} data messages in 1.8 s at 1 msg/s");
    assert_eq!(h.session.stats().answers_rate_limited, 0);
}

#[test]
fn with_the_default_config_acks_go_far_faster_than_the_module_limit() {
    // KubeEdge's defaults (30 msg/s, burst 60) protect the cloud from a runaway edge's module
    // data; the ACKs of 3,000 delivered cloud messages in one second must not be held to them,
    // while module data queued at the same time still is.
    let config = SessionConfig::new(HB);
    assert_eq!((config.message_qps, config.message_burst), (30.0, 60));
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    let g = Generation(1);
    for i in 0..3_000 {
        let cloud = cloud_message(&format!("c{i}"));
        h.session.handle_message(h.now, g, cloud.clone());
        h.session
            .queue_answer(Message::response_to(&cloud, Content::text("OK")));
        if i % 10 == 0 && h.session.upstream_capacity() > 0 {
            h.session
                .queue_upstream(upstream(&format!("m{i}")))
                .unwrap();
        }
        h.drain();
        // 3,000 messages spread over one second of cloud traffic.
        if i % 3 == 0 {
            h.run_until(h.elapsed() + Duration::from_millis(1));
        }
    }
    h.run_until(ms(1_300));
    let answers = h
        .received
        .iter()
        .filter(|(_, _, m)| m.upstream_class() == UpstreamClass::Answer)
        .count();
    assert_eq!(answers, 3_000);
    let stats = h.session.stats();
    assert_eq!(stats.answers_rate_limited, 0);
    assert_eq!(stats.answers_dropped, 0);
    // Module data: the burst of 60 plus 30 per second for about 1.1 s, not one more.
    let data = received_ids(&h)
        .iter()
        .filter(|id| id.starts_with('m'))
        .count();
    assert!((60..=95).contains(&data), "{data} module messages");
}

#[test]
fn answers_beyond_what_was_delivered_pay_the_rate_limit() {
    // An edge cannot flood the cloud with answers to messages it never received.
    let mut config = SessionConfig::new(HB);
    config.message_qps = 10.0;
    config.message_burst = 2;
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    for i in 0..12 {
        let cloud = cloud_message(&format!("never-sent-{i}"));
        h.session
            .queue_answer(Message::response_to(&cloud, Content::text("OK")));
    }
    h.drain();
    h.run_until(ms(700));
    let answers = h
        .received
        .iter()
        .filter(|(_, _, m)| m.upstream_class() == UpstreamClass::Answer)
        .count();
    // Two from the burst, then ten per second for 0.5 s (the last may be on the boundary).
    assert!((6..=8).contains(&answers), "{answers}");
    h.run_until(ms(2_000));
    assert_eq!(h.session.stats().answers_sent, 12);
    assert_eq!(h.session.stats().answers_rate_limited, 12);
}

#[test]
fn answers_are_dropped_without_a_connection_and_the_queue_is_bounded() {
    let mut config = SessionConfig::new(HB);
    config.answer_queue = 4;
    config.message_qps = 0.001;
    config.message_burst = 1;
    let mut h = Harness::new(config);
    // Not connected yet: dropped (the cloud resends the message and the edge answers again).
    h.session.queue_answer(Message::response_to(
        &cloud_message("early"),
        Content::text("OK"),
    ));
    assert_eq!(h.session.stats().answers_dropped, 1);
    h.run_until(ms(200));
    // Uncredited answers wait for the (very slow) limiter; the queue holds four.
    for i in 0..6 {
        h.session.queue_answer(Message::response_to(
            &cloud_message(&format!("x{i}")),
            Content::text("OK"),
        ));
    }
    h.drain();
    // Four were queued (two more dropped, beside the early one); the burst token let one go.
    assert_eq!(h.session.stats().answers_sent, 1);
    assert_eq!(h.session.stats().answers_dropped, 3);
    // A disconnect empties the queue: those answers are owed again to the cloud's resends.
    h.inject(Event::Failed {
        generation: Generation(1),
        fault: Fault::network("reset"),
    });
    assert_eq!(h.session.stats().answers_dropped, 6);
    assert!(h.session.poll_transmit(h.now).is_none());
}

#[test]
fn a_resent_message_that_was_answered_is_answered_again_from_the_session() {
    let mut config = SessionConfig::new(HB);
    config.new_id = || "answer-id".into();
    config.wall_millis = || 7;
    let mut h = Harness::new(config);
    h.run_until(ms(200));
    let cloud = cloud_message("c-resent");
    h.session
        .handle_message(h.now, Generation(1), cloud.clone());
    h.session.answer_again(&cloud);
    h.drain();
    h.run_until(ms(400));
    let answers: Vec<&Message> = h
        .received
        .iter()
        .map(|(_, _, m)| m)
        .filter(|m| m.upstream_class() == UpstreamClass::Answer)
        .collect();
    assert_eq!(answers.len(), 1);
    let answer = answers[0];
    assert_eq!(answer.header.parent_id, "c-resent");
    assert_eq!(answer.header.id, "answer-id");
    assert_eq!(answer.header.timestamp, 7);
    assert_eq!(answer.route.operation, "response");
    assert_eq!(answer.content.as_text(), Some("OK"));
    assert_eq!(h.session.stats().answers_rate_limited, 0);
}

#[test]
fn a_configuration_fault_is_retried_slowly_and_reported_as_repeated() {
    // A wrong certificate file does not fix itself: no fast retries, one report, then quiet.
    let config = SessionConfig::new(HB);
    let max = config.backoff.max;
    let mut h = Harness::new(config);
    let mut waits = Vec::new();
    let mut repeated = Vec::new();
    for attempt in 1..=3 {
        let generation = Generation(attempt);
        h.inject(Event::ConnectFailed {
            generation,
            fault: Fault::configuration("loading the CA certificate: no such file"),
        });
        let wait = h.session.timer(Timer::Backoff).expect("retry scheduled") - h.now;
        waits.push(wait);
        repeated.extend(h.events.iter().filter_map(|(_, e)| match e {
            SessionEvent::ConnectFailed {
                generation: g,
                repeated,
                fault,
            } if *g == generation => Some((*repeated, fault.class)),
            _ => None,
        }));
        h.now += wait;
        h.session.handle_timeout(h.now);
        h.drain();
        assert_eq!(
            h.session.state(),
            SessionState::Connecting(generation.next())
        );
    }
    for wait in &waits {
        assert!(
            *wait >= max / 2 && *wait <= max,
            "{wait:?} outside [max/2, max]"
        );
    }
    let class = FaultClass::Configuration;
    assert_eq!(repeated, [(false, class), (true, class), (true, class)]);
    // A network fault after it is new again, and backs off from the failure count as before.
    h.inject(Event::ConnectFailed {
        generation: Generation(4),
        fault: Fault::network("connection refused"),
    });
    let last = h.events.iter().rev().find_map(|(_, e)| match e {
        SessionEvent::ConnectFailed { repeated, .. } => Some(*repeated),
        _ => None,
    });
    assert_eq!(last, Some(false));
    let config = h.session.config().clone();
    let wait = h.session.timer(Timer::Backoff).unwrap() - h.now;
    assert!(wait <= config.backoff.ceiling(4), "{wait:?}");
}

/// A session connected as generation 1 at `now`, with its start-up output drained.
fn connected_session(now: Instant) -> EdgeSession {
    let mut s = EdgeSession::new(SessionConfig::new(HB), now, || 0.5);
    let generation = Generation(1);
    s.handle_event(
        now,
        Event::Connected {
            generation,
            upstream_ack: true,
        },
    );
    while s.poll_transmit(now).is_some() {}
    while s.poll_action().is_some() {}
    while s.poll_event().is_some() {}
    s
}

/// The error answers the session hands out now: (parent id, text).
fn error_answers(s: &mut EdgeSession, now: Instant) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(t) = s.poll_transmit(now) {
        assert_eq!(t.kind, TransmitKind::Answer, "{t:?}");
        assert_eq!(t.message.route.operation, "error");
        out.push((
            t.message.header.parent_id.clone(),
            t.message.content.as_text().unwrap_or_default().to_owned(),
        ));
    }
    out
}

#[test]
fn an_unroutable_cloud_message_is_answered_with_an_error_each_time_it_comes() {
    let now = Instant::now();
    let mut s = connected_session(now);
    let g = Generation(1);
    let typo = Message::with_header("n1", "", 0).route("cloud", "nosuch", "ns/thing/a", "update");
    for _ in 0..2 {
        s.handle_message(now, g, typo.clone());
        let answers = error_answers(&mut s, now);
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, "n1");
        assert!(answers[0].1.contains("nosuch"), "{answers:?}");
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Unroutable { .. })
        ));
        assert_eq!(s.poll_event(), None);
    }
    // A response that matches nothing awaits no answer; neither does a message without an id.
    let stray = Message::with_header("n2", "q", 0).route("cloud", "nosuch", "r", "response");
    let anonymous = Message::with_header("", "", 0).route("cloud", "nosuch", "r", "update");
    s.handle_message(now, g, stray);
    s.handle_message(now, g, anonymous);
    assert!(error_answers(&mut s, now).is_empty());
    let stats = s.stats();
    assert_eq!((stats.unroutable, stats.refused), (4, 2));
}

#[test]
fn a_message_the_bus_refused_is_answered_and_its_resend_is_not_delivered_again() {
    let now = Instant::now();
    let mut s = connected_session(now);
    let g = Generation(1);
    let twin = Message::with_header("t1", "", 0).route("cloud", "twin", "dev/1", "update");
    s.handle_message(now, g, twin.clone());
    assert!(matches!(s.poll_event(), Some(SessionEvent::Deliver { .. })));
    // The driver found no module of group twin.
    s.refuse(&twin, "no started module in group \"twin\"");
    assert_eq!(
        error_answers(&mut s, now),
        [(
            "t1".to_owned(),
            "no started module in group \"twin\"".to_owned()
        )]
    );
    // The answer was lost and the cloud resends: answered again, not delivered.
    s.handle_message(now, g, twin);
    assert_eq!(s.poll_event(), None);
    assert_eq!(error_answers(&mut s, now).len(), 1);
    // Other messages are delivered as before.
    let other = Message::with_header("t2", "", 0).route("cloud", "twin", "dev/1", "update");
    s.handle_message(now, g, other);
    assert!(matches!(s.poll_event(), Some(SessionEvent::Deliver { .. })));
}
