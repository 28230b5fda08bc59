//! The two real state machines talking: an [`EdgeSession`] against a [`NodeSession`] through a
//! virtual link with latency, jitter (so messages overtake each other, as on QUIC streams), loss
//! and blackholes, in virtual time, in the style of quinn-proto's `Pair` (`tests/util.rs`). No
//! socket, no runtime, no sleep: minutes of link time run in milliseconds.
//!
//! Around the sessions, the harness plays what their drivers and stores do, no more: the edge's
//! outbox (rows offered after a cursor that restarts on every connection, deleted on
//! [`Action::Forget`]), the edge module that answers every delivered message and handles each id
//! once, the cloud's queue (refilled into the session, deleted on ACK) and its upstream log
//! (which keeps each id once), and the transports: a dial that takes a round trip or times out,
//! a sign of life for every message the cloud receives, a close that the other end hears one
//! latency later, and the cloud's newest-connection-wins rule.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use causeway_session::edge::{
    self, Action, DisconnectReason, EdgeSession, Generation, SessionEvent,
};
use causeway_session::node::{self, CloseReason, Downstream, NodeSession, TransmitKind};
use proto::{Content, Fault, Message};

const HEARTBEAT: Duration = Duration::from_secs(15);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Deterministic ids for the messages the sessions create (unique across the test binary).
fn next_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("s-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A small deterministic PRNG (xorshift64*) for loss and jitter.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        percent > 0 && self.next() % 100 < percent
    }

    fn below(&mut self, max: Duration) -> Duration {
        let span = max.as_micros() as u64;
        if span == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.next() % span)
    }
}

/// What the virtual link does.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// One-way delay.
    latency: Duration,
    /// Up to this much extra delay per message, drawn at random: later messages may overtake.
    jitter: Duration,
    /// Percent of edge → cloud messages lost.
    loss_up: u64,
    /// Percent of cloud → edge messages (and signs of life) lost.
    loss_down: u64,
    /// Everything vanishes and nothing is signalled: dials time out, messages and closes are
    /// lost (half-open TCP, a UDP blackhole).
    blackhole: bool,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            latency: ms(40),
            jitter: ms(30),
            loss_up: 0,
            loss_down: 0,
            blackhole: false,
        }
    }
}

/// Something arriving at one end at a virtual instant.
#[derive(Debug)]
enum Arrival {
    /// A dial reaches the cloud.
    Dial(Generation),
    /// The dial of this generation times out unless the edge heard it succeed.
    DialTimeout(Generation),
    /// A message reaches the cloud on the connection of this generation.
    ToCloud(Generation, Message),
    /// The edge closed this connection; the cloud hears of it.
    EdgeClosed(Generation),
    /// A message reaches the edge.
    ToEdge(Generation, Message),
    /// A transport-level outcome reaches the edge session.
    EdgeEvent(edge::Event),
}

/// The edge session with what its driver and outbox do around it.
struct EdgeEnd {
    session: EdgeSession,
    /// The durable outbox: seq → message.
    outbox: BTreeMap<u64, Message>,
    next_seq: u64,
    /// The last row offered to the current connection.
    cursor: u64,
    /// Downstream ids handled by the module, in order, each once.
    handled: Vec<String>,
    handled_set: HashSet<String>,
    /// Copies of each downstream id that arrived.
    copies: HashMap<String, u32>,
    disconnects: Vec<DisconnectReason>,
    connect_failures: u32,
    connects: Vec<Generation>,
    /// Dials whose outcome the edge has not heard yet.
    dialing: HashSet<Generation>,
}

/// The node session of the cloud's current connection with what its driver and store do.
struct CloudEnd {
    config: node::SessionConfig,
    /// The live connection: its generation and session.
    conn: Option<(Generation, NodeSession)>,
    /// The durable downstream queue: seq → message.
    queue: BTreeMap<u64, Downstream>,
    next_seq: u64,
    /// Highest seq handed to the current session.
    last_fed: u64,
    /// Upstream ids the store holds, each once, in order of acceptance.
    upstream: Vec<String>,
    upstream_set: HashSet<String>,
    /// Upstream messages the store was asked to accept (duplicates included).
    accept_calls: u32,
    closes: Vec<CloseReason>,
    sessions: u32,
    /// Resends over all sessions.
    resent: u64,
    /// ACKs over all sessions.
    acked: u64,
    /// Ids the edge answered with an error (failed), each answer once.
    failed: Vec<String>,
}

struct Pair {
    now: Instant,
    rng: Rng,
    link: Link,
    arrivals: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Arrival>,
    next_arrival: u64,
    edge: EdgeEnd,
    cloud: CloudEnd,
}

impl Pair {
    fn new(link: Link, seed: u64) -> Self {
        let now = Instant::now();
        let mut edge_config = edge::SessionConfig::new(HEARTBEAT);
        edge_config.new_id = next_id;
        edge_config.wall_millis = || 1;
        let node_config = node::SessionConfig {
            upstream_ack: true,
            new_id: next_id,
            wall_millis: || 1,
            ..node::SessionConfig::default()
        };
        Self {
            now,
            rng: Rng(seed | 1),
            link,
            arrivals: BinaryHeap::new(),
            pending: HashMap::new(),
            next_arrival: 0,
            edge: EdgeEnd {
                session: EdgeSession::with_seed(edge_config, now, seed),
                outbox: BTreeMap::new(),
                next_seq: 1,
                cursor: 0,
                handled: Vec::new(),
                handled_set: HashSet::new(),
                copies: HashMap::new(),
                disconnects: Vec::new(),
                connect_failures: 0,
                connects: Vec::new(),
                dialing: HashSet::new(),
            },
            cloud: CloudEnd {
                config: node_config,
                conn: None,
                queue: BTreeMap::new(),
                next_seq: 1,
                last_fed: 0,
                upstream: Vec::new(),
                upstream_set: HashSet::new(),
                accept_calls: 0,
                closes: Vec::new(),
                sessions: 0,
                resent: 0,
                acked: 0,
                failed: Vec::new(),
            },
        }
    }

    /// A module on the edge sends `n` messages to the cloud (they enter the outbox).
    fn edge_sends(&mut self, n: usize, tag: &str) -> Vec<String> {
        (0..n)
            .map(|i| {
                let id = format!("up-{tag}-{i}");
                let message = Message::with_header(id.clone(), "", 1)
                    .route(
                        "metamanager",
                        "resource",
                        format!("default/pod/{tag}-{i}"),
                        "update",
                    )
                    .content(Content::text("status"));
                self.edge.outbox.insert(self.edge.next_seq, message);
                self.edge.next_seq += 1;
                id
            })
            .collect()
    }

    /// An application queues `n` ACK-required messages for the node (`resources` distinct
    /// resources, so some wait behind others of the same resource).
    fn cloud_sends(&mut self, n: usize, resources: usize, tag: &str) -> Vec<String> {
        (0..n)
            .map(|i| {
                let id = format!("down-{tag}-{i}");
                let message = Message::with_header(id.clone(), "", 1)
                    .route(
                        "edgecontroller",
                        "resource",
                        format!("default/configmap/{tag}-{}", i % resources),
                        "update",
                    )
                    .content(Content::text("data"));
                let seq = self.cloud.next_seq;
                self.cloud.next_seq += 1;
                self.cloud.queue.insert(
                    seq,
                    Downstream {
                        seq,
                        message,
                        needs_ack: true,
                    },
                );
                id
            })
            .collect()
    }

    /// Runs the pair for `d` of virtual time.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.pump();
            let next = [
                self.arrivals.peek().map(|Reverse((at, _))| *at),
                self.edge.session.poll_timeout(),
                self.cloud.conn.as_ref().and_then(|(_, s)| s.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(at) if at <= end => self.now = self.now.max(at),
                _ => break,
            }
            self.step();
        }
        self.now = end;
        self.pump();
    }

    /// Runs until both queues are empty and every sent id is accounted for, or `limit` passes.
    fn run_until_drained(&mut self, limit: Duration, up: &[String], down: &[String]) -> Duration {
        let start = self.now;
        while self.now - start < limit {
            self.run_for(secs(1));
            let up_done = up.iter().all(|id| self.cloud.upstream_set.contains(id));
            let down_done = down.iter().all(|id| self.edge.handled_set.contains(id));
            if self.edge.outbox.is_empty() && self.cloud.queue.is_empty() && up_done && down_done {
                return self.now - start;
            }
        }
        panic!(
            "not drained after {limit:?}: outbox {}, cloud queue {}, upstream {}/{}, \
             downstream {}/{}",
            self.edge.outbox.len(),
            self.cloud.queue.len(),
            self.cloud.upstream_set.len(),
            up.len(),
            self.edge.handled_set.len(),
            down.len(),
        );
    }

    /// Everything due at `now`: arrivals, then both sessions' timers.
    fn step(&mut self) {
        let now = self.now;
        while let Some(&Reverse((at, key))) = self.arrivals.peek() {
            if at > now {
                break;
            }
            self.arrivals.pop();
            if let Some(arrival) = self.pending.remove(&key) {
                self.arrive(arrival);
            }
        }
        if self.edge.session.poll_timeout().is_some_and(|t| t <= now) {
            self.edge.session.handle_timeout(now);
        }
        if let Some((_, node)) = self.cloud.conn.as_mut()
            && node.poll_timeout().is_some_and(|t| t <= now)
        {
            node.handle_timeout(now);
        }
    }

    fn schedule(&mut self, after: Duration, arrival: Arrival) {
        let key = self.next_arrival;
        self.next_arrival += 1;
        self.arrivals.push(Reverse((self.now + after, key)));
        self.pending.insert(key, arrival);
    }

    /// Sends a message over the link in one direction: lost to the blackhole or at random, else
    /// delayed.
    fn send(&mut self, upward: bool, arrival: Arrival) {
        let loss = if upward {
            self.link.loss_up
        } else {
            self.link.loss_down
        };
        if self.rng.chance(loss) {
            return;
        }
        self.signal(arrival);
    }

    /// Sends what the transport retransmits until it arrives (handshakes, closes): lost only to
    /// the blackhole.
    fn signal(&mut self, arrival: Arrival) {
        if self.link.blackhole {
            return;
        }
        let delay = self.link.latency + self.rng.below(self.link.jitter);
        self.schedule(delay, arrival);
    }

    fn arrive(&mut self, arrival: Arrival) {
        let now = self.now;
        // What was on the wire when the blackhole began is lost too.
        if self.link.blackhole && !matches!(arrival, Arrival::DialTimeout(_)) {
            return;
        }
        match arrival {
            Arrival::Dial(generation) => {
                // Newest wins: a node's new connection replaces its session.
                if let Some((_, mut old)) = self.cloud.conn.take() {
                    old.close();
                    self.cloud.resent += old.stats().resent;
                }
                self.cloud.conn =
                    Some((generation, NodeSession::new(self.cloud.config.clone(), now)));
                self.cloud.sessions += 1;
                self.cloud.last_fed = 0;
                self.signal(Arrival::EdgeEvent(edge::Event::Connected {
                    generation,
                    upstream_ack: true,
                }));
            }
            Arrival::DialTimeout(generation) => {
                if self.edge.dialing.remove(&generation) {
                    let reason = "handshake timed out".to_owned();
                    let failed = edge::Event::ConnectFailed {
                        generation,
                        fault: Fault::network(reason),
                    };
                    self.edge.session.handle_event(now, failed);
                }
            }
            Arrival::ToCloud(generation, message) => {
                if let Some((current, node)) = self.cloud.conn.as_mut()
                    && *current == generation
                {
                    node.handle_message(now, message);
                    // The transport's acknowledgement: a sign of life for the edge.
                    self.send(
                        false,
                        Arrival::EdgeEvent(edge::Event::PeerActivity { generation }),
                    );
                }
            }
            Arrival::EdgeClosed(generation) => {
                if self
                    .cloud
                    .conn
                    .as_ref()
                    .is_some_and(|(g, _)| *g == generation)
                    && let Some((_, mut node)) = self.cloud.conn.take()
                {
                    node.close();
                    self.cloud.resent += node.stats().resent;
                }
            }
            Arrival::ToEdge(generation, message) => {
                self.edge.session.handle_message(now, generation, message);
            }
            Arrival::EdgeEvent(event) => {
                if let edge::Event::Connected { generation, .. } = &event {
                    self.edge.dialing.remove(generation);
                }
                self.edge.session.handle_event(now, event);
            }
        }
    }

    /// Drains both sessions' outputs until neither has anything more to say.
    fn pump(&mut self) {
        loop {
            let progress = self.pump_edge() | self.pump_cloud();
            if !progress {
                return;
            }
        }
    }

    fn pump_edge(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        // The driver offers outbox rows after its cursor while the session has room.
        while self.edge.session.upstream_capacity() > 0 {
            let Some((&seq, message)) = self.edge.outbox.range(self.edge.cursor + 1..).next()
            else {
                break;
            };
            if self.edge.session.queue_upstream(message.clone()).is_err() {
                break;
            }
            self.edge.cursor = seq;
            progress = true;
        }
        while let Some(transmit) = self.edge.session.poll_transmit(now) {
            progress = true;
            if let edge::TransmitKind::Upstream {
                forget_after_write: true,
            } = transmit.kind
            {
                self.forget_upstream(&transmit.message.header.id);
            }
            self.send(
                true,
                Arrival::ToCloud(transmit.generation, transmit.message),
            );
        }
        while let Some(action) = self.edge.session.poll_action() {
            progress = true;
            match action {
                Action::Connect { generation } => {
                    self.edge.dialing.insert(generation);
                    self.schedule(HANDSHAKE_TIMEOUT, Arrival::DialTimeout(generation));
                    self.signal(Arrival::Dial(generation));
                }
                Action::Close { generation, .. } => {
                    self.edge.dialing.remove(&generation);
                    self.signal(Arrival::EdgeClosed(generation));
                }
                Action::Forget { id } => self.forget_upstream(&id),
            }
        }
        while let Some(event) = self.edge.session.poll_event() {
            progress = true;
            match event {
                SessionEvent::Connected { generation, .. } => {
                    self.edge.cursor = 0;
                    self.edge.connects.push(generation);
                }
                SessionEvent::Disconnected { reason, .. } => self.edge.disconnects.push(reason),
                SessionEvent::ConnectFailed { .. } => self.edge.connect_failures += 1,
                SessionEvent::Deliver { message, .. } => {
                    // The module handles each id once and answers every copy (the outbox's
                    // downstream dedup).
                    let id = message.header.id.clone();
                    *self.edge.copies.entry(id.clone()).or_default() += 1;
                    if self.edge.handled_set.insert(id.clone()) {
                        self.edge.handled.push(id);
                    }
                    let ack =
                        Message::response_to_with(&message, Content::text("OK"), next_id(), 1);
                    self.edge.session.queue_answer(ack);
                }
                // The session has answered it with an error.
                SessionEvent::Unroutable { .. } => {}
                SessionEvent::ReconnectScheduled { .. } | SessionEvent::Publish { .. } => {}
            }
        }
        progress
    }

    fn forget_upstream(&mut self, id: &str) {
        self.edge.outbox.retain(|_, m| m.header.id != id);
    }

    fn pump_cloud(&mut self) -> bool {
        let now = self.now;
        let Some((generation, node)) = self.cloud.conn.as_mut() else {
            return false;
        };
        let generation = *generation;
        let mut progress = false;
        // The driver refills the session from the store after the last row it handed over.
        let wants = node.wants();
        if wants > 0 {
            let more: Vec<Downstream> = self
                .cloud
                .queue
                .range(self.cloud.last_fed + 1..)
                .take(wants)
                .map(|(_, d)| d.clone())
                .collect();
            if let Some(last) = more.last() {
                self.cloud.last_fed = last.seq;
                node.queue(now, more);
                progress = true;
            }
        }
        let mut out = Vec::new();
        while let Some(transmit) = node.poll_transmit() {
            if let TransmitKind::Delivery {
                seq,
                needs_ack: false,
                ..
            } = transmit.kind
            {
                self.cloud.queue.remove(&seq);
            }
            out.push(transmit.message);
        }
        let mut closed = None;
        while let Some(event) = node.poll_event() {
            progress = true;
            match event {
                node::SessionEvent::Upstream(message) => {
                    // The store keeps each id once and acknowledges duplicates too.
                    let id = message.header.id.clone();
                    self.cloud.accept_calls += 1;
                    if self.cloud.upstream_set.insert(id.clone()) {
                        self.cloud.upstream.push(id.clone());
                    }
                    node.upstream_accepted(&id);
                }
                node::SessionEvent::Acked { id, .. } => {
                    self.cloud.acked += 1;
                    self.cloud.queue.retain(|_, d| d.message.header.id != id);
                }
                node::SessionEvent::Failed { id, .. } => {
                    self.cloud.failed.push(id.clone());
                    self.cloud.queue.retain(|_, d| d.message.header.id != id);
                }
                node::SessionEvent::Closed(reason) => closed = Some(reason),
            }
        }
        // Acks for upstream messages come out of `upstream_accepted`.
        while let Some(transmit) = node.poll_transmit() {
            out.push(transmit.message);
        }
        progress |= !out.is_empty();
        for message in out {
            self.send(false, Arrival::ToEdge(generation, message));
        }
        if let Some(reason) = closed {
            // The cloud closes the connection; the edge hears of it one latency later.
            self.cloud.closes.push(reason);
            if let Some((_, node)) = self.cloud.conn.take() {
                self.cloud.resent += node.stats().resent;
            }
            let reason = format!("closed by the cloud: {reason:?}");
            self.signal(Arrival::EdgeEvent(edge::Event::Failed {
                generation,
                fault: Fault::network(reason),
            }));
        }
        progress
    }

    fn node_stats(&self) -> Option<node::SessionStats> {
        self.cloud.conn.as_ref().map(|(_, s)| s.stats())
    }
}

fn assert_each_once(what: &str, got: &[String], sent: &[String]) {
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "{what}: an id arrived twice");
    let sent_set: HashSet<&String> = sent.iter().collect();
    assert_eq!(unique, sent_set, "{what}: ids differ");
}

#[test]
fn keepalives_hold_a_quiet_link_for_ten_minutes() {
    let mut pair = Pair::new(Link::default(), 1);
    pair.run_for(secs(600));
    assert_eq!(pair.edge.connects.len(), 1, "one connection throughout");
    assert!(
        pair.edge.disconnects.is_empty(),
        "{:?}",
        pair.edge.disconnects
    );
    assert!(pair.cloud.closes.is_empty(), "{:?}", pair.cloud.closes);
    let node = pair.node_stats().expect("the node session is up");
    // One keepalive at connect, then one per heartbeat: 600 s / 15 s.
    assert!((40..=41).contains(&node.keepalives), "{node:?}");
    assert_eq!(pair.edge.session.stats().keepalives_sent, node.keepalives);
}

#[test]
fn upstream_is_acknowledged_and_resends_after_a_reconnect_are_deduplicated() {
    // A third of the cloud's acknowledgements are lost: their messages stay in the outbox
    // until the next connection resends them under the same ids.
    let link = Link {
        loss_down: 33,
        ..Link::default()
    };
    let mut pair = Pair::new(link, 2);
    pair.run_for(secs(1));
    let up = pair.edge_sends(300, "a");
    pair.run_for(secs(20));
    let unacked = pair.edge.outbox.len();
    assert!(unacked > 0, "some acknowledgements were lost");
    assert_eq!(pair.edge.session.in_flight(), unacked);
    assert_each_once("cloud store", &pair.cloud.upstream, &up);

    // A certificate renewal reconnects; the lossless link lets everything settle.
    pair.link.loss_down = 0;
    pair.edge.session.handle_event(
        pair.now,
        edge::Event::Reconnect {
            reason: "certificate renewed".into(),
        },
    );
    pair.run_until_drained(secs(120), &up, &[]);
    assert_eq!(pair.edge.connects.len(), 2);
    assert_eq!(pair.edge.session.in_flight(), 0);
    assert_each_once("cloud store", &pair.cloud.upstream, &up);
    // Every unacknowledged message came again, was recognised as a duplicate by the store and
    // acknowledged again.
    assert_eq!(pair.cloud.accept_calls as usize, up.len() + unacked);
}

#[test]
fn downstream_is_resent_until_acknowledged_and_handled_once() {
    // A quarter of what the edge sends is lost: ACKs, keepalives and all. Messages whose ACK
    // was lost are resent under the same id; the edge handles each once and answers each copy.
    let link = Link {
        loss_up: 25,
        ..Link::default()
    };
    let mut pair = Pair::new(link, 3);
    let down = pair.cloud_sends(300, 40, "b");
    pair.run_until_drained(secs(900), &[], &down);
    assert_each_once("edge module", &pair.edge.handled, &down);
    let resent = pair.cloud.resent + pair.node_stats().map_or(0, |s| s.resent);
    assert!(resent > 0, "lost ACKs caused resends");
    assert!(
        pair.edge.copies.values().any(|&n| n > 1),
        "some messages came twice"
    );
    assert!(
        pair.cloud.acked >= down.len() as u64,
        "every message acknowledged"
    );
    if let Some((_, node)) = pair.cloud.conn.as_ref() {
        assert_eq!(node.in_flight(), 0);
    }
}

#[test]
fn a_message_the_edge_cannot_route_fails_and_its_resource_drains() {
    // Loss both ways: the error answer or the message itself may be lost and resent.
    let link = Link {
        loss_up: 20,
        loss_down: 20,
        ..Link::default()
    };
    let mut pair = Pair::new(link, 5);
    // A typo in the group, on the resource of messages queued after it.
    let typo = "down-typo".to_owned();
    let seq = pair.cloud.next_seq;
    pair.cloud.next_seq += 1;
    let message = Message::with_header(typo.clone(), "", 1).route(
        "edgecontroller",
        "resourse",
        "default/configmap/t-0",
        "update",
    );
    pair.cloud.queue.insert(
        seq,
        Downstream {
            seq,
            message,
            needs_ack: true,
        },
    );
    let down = pair.cloud_sends(20, 1, "t");
    pair.run_until_drained(secs(900), &[], &down);
    assert_each_once("edge module", &pair.edge.handled, &down);
    assert!(pair.cloud.failed.contains(&typo), "{:?}", pair.cloud.failed);
    assert!(!pair.edge.handled_set.contains(&typo));
}

#[test]
fn both_ends_notice_a_blackhole_and_traffic_resumes_after_it() {
    let mut pair = Pair::new(Link::default(), 4);
    let up = pair.edge_sends(100, "c");
    let down = pair.cloud_sends(100, 100, "c");
    pair.run_for(secs(2));
    let first = pair.edge.connects.clone();
    assert_eq!(first.len(), 1);

    // The link goes silent mid-traffic: more of both directions is queued meanwhile.
    pair.link.blackhole = true;
    let more_up = pair.edge_sends(50, "d");
    let more_down = pair.cloud_sends(50, 50, "d");
    pair.run_for(secs(120));
    // The edge notices within its dead-cloud deadline (two heartbeats), then dials in vain.
    let dead = match pair.edge.disconnects.as_slice() {
        [DisconnectReason::DeadPeer { silent_for }] => *silent_for,
        other => panic!("expected one dead-cloud disconnect, got {other:?}"),
    };
    assert!(dead <= 2 * HEARTBEAT, "noticed after {dead:?}");
    assert!(
        pair.edge.connect_failures >= 2,
        "dials time out in the blackhole"
    );
    // The cloud ends the node's session when its keepalives stop.
    assert_eq!(pair.cloud.closes, [CloseReason::KeepaliveTimeout]);
    assert!(pair.cloud.conn.is_none());

    pair.link.blackhole = false;
    let up: Vec<String> = up.into_iter().chain(more_up).collect();
    let down: Vec<String> = down.into_iter().chain(more_down).collect();
    pair.run_until_drained(secs(300), &up, &down);
    assert!(
        pair.edge.connects.len() >= 2,
        "reconnected after the blackhole"
    );
    assert!(pair.edge.connects.last() > first.last());
    assert_each_once("cloud store", &pair.cloud.upstream, &up);
    assert_each_once("edge module", &pair.edge.handled, &down);
    assert_eq!(pair.edge.session.in_flight(), 0);
}
