//! Virtual-time tests of [`NodeSession`]: the real session against a small reference edge over
//! two queues with latency and loss (the `Pair` of quinn-proto's `tests/util.rs`). Minutes of
//! session time run in milliseconds; nothing sleeps.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use proto::message::{GROUP_CAUSEWAY, OP_ACK, OP_KEEPALIVE, OP_RESPONSE};
use proto::{Content, Message};

use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn test_id() -> String {
    proto::new_id()
}

fn config() -> SessionConfig {
    SessionConfig {
        upstream_ack: true,
        new_id: test_id,
        wall_millis: || 1,
        ..SessionConfig::default()
    }
}

fn down(seq: u64, resource: &str, needs_ack: bool) -> Downstream {
    Downstream {
        seq,
        message: Message::with_header(format!("down-{seq}"), "", 0)
            .route("app", "resource", resource, "update"),
        needs_ack,
    }
}

fn keepalive() -> Message {
    Message::new("").route("websocket", "resource", "node", OP_KEEPALIVE)
}

fn drain_transmits(s: &mut NodeSession) -> Vec<Transmit> {
    std::iter::from_fn(|| s.poll_transmit()).collect()
}

fn drain_events(s: &mut NodeSession) -> Vec<SessionEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// Tiny deterministic PRNG (xorshift64*) for loss patterns.
struct Rng(u64);

impl Rng {
    fn chance(&mut self, percent: u64) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % 100 < percent
    }
}

/// A reference edge: heartbeats, handles each downstream id once (and acks every copy),
/// keeps upstream messages until the cloud acks them and resends them under the same id.
struct TestEdge {
    heartbeat: Option<Duration>,
    next_heartbeat: Instant,
    upstream_resend: Duration,
    /// Downstream ids in the order the application got them (each once).
    handled: Vec<String>,
    handled_set: HashSet<String>,
    /// How many copies of each downstream id arrived.
    copies: HashMap<String, u32>,
    /// Upstream messages awaiting the cloud's ack, with their next resend time.
    outbox: BTreeMap<String, (Message, Instant)>,
    out: VecDeque<Message>,
}

impl TestEdge {
    fn new(now: Instant, heartbeat: Option<Duration>) -> Self {
        Self {
            heartbeat,
            next_heartbeat: now,
            upstream_resend: secs(10),
            handled: Vec::new(),
            handled_set: HashSet::new(),
            copies: HashMap::new(),
            outbox: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    fn send_upstream(&mut self, now: Instant, msg: Message) {
        self.outbox.insert(
            msg.header.id.clone(),
            (msg.clone(), now + self.upstream_resend),
        );
        self.out.push_back(msg);
    }

    fn receive(&mut self, msg: Message) {
        if msg.route.group == GROUP_CAUSEWAY && msg.route.operation == OP_ACK {
            self.outbox.remove(&msg.header.parent_id);
            return;
        }
        let id = msg.header.id.clone();
        *self.copies.entry(id.clone()).or_default() += 1;
        if self.handled_set.insert(id.clone()) {
            self.handled.push(id);
        }
        self.out
            .push_back(Message::response_to(&msg, Content::text("OK")));
    }

    fn handle_time(&mut self, now: Instant) {
        if let Some(hb) = self.heartbeat {
            if self.next_heartbeat <= now {
                self.out.push_back(keepalive());
                self.next_heartbeat = now + hb;
            }
        }
        let upstream_resend = self.upstream_resend;
        for (msg, due) in self.outbox.values_mut() {
            if *due <= now {
                self.out.push_back(msg.clone());
                *due = now + upstream_resend;
            }
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        let hb = self.heartbeat.map(|_| self.next_heartbeat);
        let resend = self.outbox.values().map(|(_, due)| *due).min();
        [hb, resend].into_iter().flatten().min()
    }
}

/// The cloud session and its driver's bookkeeping (a store in memory) against a [`TestEdge`].
struct Pair {
    now: Instant,
    cloud: NodeSession,
    edge: TestEdge,
    latency: Duration,
    to_edge: VecDeque<(Instant, Message)>,
    to_cloud: VecDeque<(Instant, Message)>,
    /// Percent of messages lost per direction.
    loss_to_edge: u64,
    loss_to_cloud: u64,
    rng: Rng,
    /// Downstream messages not yet acked (or, without ACK, not yet written), by seq.
    store: BTreeMap<u64, Downstream>,
    /// Upstream messages accepted, in order, each id once.
    accepted: Vec<String>,
    accepted_set: HashSet<String>,
    acks: Vec<(String, Option<Duration>)>,
    closed: Option<CloseReason>,
}

impl Pair {
    fn new(config: SessionConfig, heartbeat: Option<Duration>) -> Self {
        let now = Instant::now();
        Self {
            now,
            cloud: NodeSession::new(config, now),
            edge: TestEdge::new(now, heartbeat),
            latency: Duration::from_millis(50),
            to_edge: VecDeque::new(),
            to_cloud: VecDeque::new(),
            loss_to_edge: 0,
            loss_to_cloud: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            store: BTreeMap::new(),
            accepted: Vec::new(),
            accepted_set: HashSet::new(),
            acks: Vec::new(),
            closed: None,
        }
    }

    fn enqueue(&mut self, downs: impl IntoIterator<Item = Downstream>) {
        for d in downs {
            self.store.insert(d.seq, d);
        }
        self.refill();
    }

    /// What the driver does: top the session up from the store, in order.
    fn refill(&mut self) {
        let wants = self.cloud.wants();
        let batch: Vec<Downstream> = self.store.values().take(wants + 128).cloned().collect();
        self.cloud.queue(self.now, batch);
    }

    /// One turn: deliver due packets, fire due timers, move outputs onto the links.
    fn step(&mut self) {
        let now = self.now;
        while self.to_cloud.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, msg)) = self.to_cloud.pop_front() else {
                break;
            };
            self.cloud.handle_message(now, msg);
        }
        while self.to_edge.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, msg)) = self.to_edge.pop_front() else {
                break;
            };
            self.edge.receive(msg);
        }
        if self.cloud.poll_timeout().is_some_and(|t| t <= now) {
            self.cloud.handle_timeout(now);
        }
        self.edge.handle_time(now);
        self.drive_cloud_outputs();
        while let Some(msg) = self.edge.out.pop_front() {
            if !self.rng.chance(self.loss_to_cloud) {
                self.to_cloud.push_back((now + self.latency, msg));
            }
        }
    }

    fn drive_cloud_outputs(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.cloud.poll_transmit() {
                progressed = true;
                if let TransmitKind::Delivery {
                    seq,
                    needs_ack: false,
                    ..
                } = t.kind
                {
                    self.store.remove(&seq);
                }
                if !self.rng.chance(self.loss_to_edge) {
                    self.to_edge.push_back((self.now + self.latency, t.message));
                }
            }
            while let Some(ev) = self.cloud.poll_event() {
                progressed = true;
                match ev {
                    SessionEvent::Upstream(msg) => {
                        let id = msg.header.id.clone();
                        if self.accepted_set.insert(id.clone()) {
                            self.accepted.push(id.clone());
                        }
                        self.cloud.upstream_accepted(&id);
                    }
                    SessionEvent::Acked {
                        id, seq, latency, ..
                    } => {
                        if let Some(seq) = seq {
                            self.store.remove(&seq);
                        }
                        self.acks.push((id, latency));
                        self.refill();
                    }
                    SessionEvent::Failed { seq, .. } => {
                        if let Some(seq) = seq {
                            self.store.remove(&seq);
                        }
                        self.refill();
                    }
                    SessionEvent::Closed(reason) => self.closed = Some(reason),
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn next_time(&self) -> Option<Instant> {
        [
            self.cloud.poll_timeout(),
            self.edge.next_timeout(),
            self.to_cloud.front().map(|(t, _)| *t),
            self.to_edge.front().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs until `until` (virtual), or until the session closes.
    fn drive_until(&mut self, until: Instant) {
        self.step();
        while self.closed.is_none() {
            match self.next_time() {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    self.step();
                }
                _ => {
                    self.now = until;
                    break;
                }
            }
        }
    }

    fn drive_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.drive_until(until);
    }
}

#[test]
fn silent_node_times_out_after_keepalive_interval() {
    let mut pair = Pair::new(config(), None);
    let start = pair.now;
    pair.drive_for(secs(120));
    assert_eq!(pair.closed, Some(CloseReason::KeepaliveTimeout));
    assert_eq!(
        pair.now,
        start + secs(30),
        "closed exactly at the keepalive interval"
    );
    assert_eq!(pair.cloud.poll_timeout(), None);
}

#[test]
fn heartbeating_node_stays_connected() {
    let mut pair = Pair::new(config(), Some(secs(15)));
    pair.drive_for(secs(600));
    assert_eq!(pair.closed, None);
    assert!(pair.cloud.stats().keepalives >= 40);
}

#[test]
fn any_keepalive_operation_refreshes_liveness() {
    let now = Instant::now();
    let mut s = NodeSession::new(config(), now);
    // Any source, group, resource or content: only the operation counts (B§6.2).
    let odd = Message::new("")
        .route("x", "y", "z", OP_KEEPALIVE)
        .content(Content::text("?"));
    s.handle_message(now + secs(20), odd);
    assert_eq!(s.last_keepalive(), now + secs(20));
    s.handle_timeout(now + secs(30));
    assert_eq!(s.close_reason(), None);
    assert_eq!(s.poll_timeout(), Some(now + secs(50)));
    // Other traffic does not count (B§6.2).
    s.handle_message(
        now + secs(45),
        Message::new("").route("e", "g", "r", "update"),
    );
    s.handle_timeout(now + secs(50));
    assert_eq!(s.close_reason(), Some(CloseReason::KeepaliveTimeout));
    assert!(drain_transmits(&mut s).is_empty());
}

#[test]
fn resend_schedule_doubles_from_five_seconds_up_to_the_cap() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(
        SessionConfig {
            keepalive_interval: secs(100_000),
            ..config()
        },
        t0,
    );
    s.queue(t0, [down(1, "default/pod/a", true)]);
    let mut sends = Vec::new();
    let mut now = t0;
    for t in drain_transmits(&mut s) {
        sends.push((now - t0, t));
    }
    while sends.len() < 8 {
        let Some(next) = s.poll_timeout() else { break };
        now = next;
        s.handle_timeout(now);
        for t in drain_transmits(&mut s) {
            sends.push((now - t0, t));
        }
    }
    let times: Vec<u64> = sends.iter().map(|(d, _)| d.as_secs()).collect();
    assert_eq!(times, [0, 5, 15, 35, 75, 135, 195, 255]);
    for (i, (_, t)) in sends.iter().enumerate() {
        assert_eq!(t.message.header.id, "down-1", "resent under the same id");
        let attempt = u32::try_from(i + 1).unwrap_or(u32::MAX);
        assert_eq!(
            t.kind,
            TransmitKind::Delivery {
                seq: 1,
                needs_ack: true,
                attempt
            }
        );
    }
    assert_eq!(s.stats().resent, 7);
}

#[test]
fn ack_removes_the_message_and_reports_latency() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let d = down(7, "default/pod/a", true);
    s.queue(t0, [d.clone()]);
    assert_eq!(drain_transmits(&mut s).len(), 1);
    assert_eq!(s.in_flight(), 1);
    let ack = Message::response_to(&d.message, Content::text("OK"));
    s.handle_message(t0 + Duration::from_millis(120), ack.clone());
    assert_eq!(
        drain_events(&mut s),
        [SessionEvent::Acked {
            id: "down-7".into(),
            seq: Some(7),
            latency: Some(Duration::from_millis(120)),
            response: ack,
        }]
    );
    assert_eq!(s.in_flight(), 0);
    // Only the keepalive check is left: nothing will be resent.
    assert_eq!(s.poll_timeout(), Some(t0 + secs(30)));
    // A duplicate ACK is reported without a sequence number and changes nothing.
    let again = Message::response_to(&d.message, Content::text("OK"));
    s.handle_message(t0 + secs(1), again);
    assert!(matches!(
        drain_events(&mut s).as_slice(),
        [SessionEvent::Acked {
            seq: None,
            latency: None,
            ..
        }]
    ));
    assert!(drain_transmits(&mut s).is_empty());
}

#[test]
fn responses_never_go_up_as_application_messages() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let resp = Message::new("unknown-parent").route("meta", "meta", "r", OP_RESPONSE);
    s.handle_message(t0, resp);
    let events = drain_events(&mut s);
    assert!(matches!(
        events.as_slice(),
        [SessionEvent::Acked { seq: None, .. }]
    ));
}

#[test]
fn no_ack_messages_are_sent_once() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    s.queue(t0, [down(1, "default/podlist/a", false)]);
    let sent = drain_transmits(&mut s);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].kind,
        TransmitKind::Delivery {
            seq: 1,
            needs_ack: false,
            attempt: 1
        }
    );
    assert_eq!(s.in_flight(), 0);
    assert_eq!(s.poll_timeout(), Some(t0 + secs(30)), "no resend timer");
    assert_eq!(s.wants(), 128, "forgotten once handed out");
}

#[test]
fn window_limits_messages_in_flight() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let downs: Vec<Downstream> = (0..100)
        .map(|i| down(i, &format!("default/pod/p{i}"), true))
        .collect();
    s.queue(t0, downs.clone());
    assert_eq!(
        drain_transmits(&mut s).len(),
        64,
        "KubeEdge allows one; we allow a window"
    );
    assert_eq!(s.wants(), 28);
    s.handle_message(
        t0,
        Message::response_to(&downs[3].message, Content::text("OK")),
    );
    let next = drain_transmits(&mut s);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].message.header.id, "down-64");
}

#[test]
fn order_is_kept_per_resource() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let a1 = down(1, "default/pod/a", true);
    let b = down(2, "default/pod/b", true);
    let a2 = down(3, "default/pod/a", false);
    let a3 = down(4, "default/pod/a", true);
    s.queue(t0, [a1.clone(), b, a2, a3]);
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(
        ids,
        ["down-1", "down-2"],
        "a's later messages wait for a's first ACK"
    );
    s.handle_message(t0, Message::response_to(&a1.message, Content::text("OK")));
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(ids, ["down-3", "down-4"]);
}

#[test]
fn messages_fed_twice_are_held_once() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    s.queue(t0, [down(1, "r", true)]);
    s.queue(t0, [down(1, "r", true), down(2, "s", true)]);
    assert_eq!(drain_transmits(&mut s).len(), 2);
}

#[test]
fn ack_of_a_pending_message_from_an_earlier_session_removes_it() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let a1 = down(1, "default/pod/a", true);
    let a2 = down(2, "default/pod/a", true);
    s.queue(t0, [a1, a2.clone()]);
    drain_transmits(&mut s);
    s.handle_message(t0, Message::response_to(&a2.message, Content::text("OK")));
    assert!(matches!(
        drain_events(&mut s).as_slice(),
        [SessionEvent::Acked {
            seq: Some(2),
            latency: None,
            ..
        }]
    ));
    assert_eq!(s.wants(), 127);
}

#[test]
fn upstream_is_delivered_once_and_every_copy_acked() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let up = Message::with_header("up-1", "", 0).route("edged", "meta", "default/pod/x", "update");
    s.handle_message(t0, up.clone());
    assert_eq!(drain_events(&mut s), [SessionEvent::Upstream(up.clone())]);
    // A copy racing the first one's persistence is dropped; the ack follows acceptance.
    s.handle_message(t0, up.clone());
    assert!(drain_events(&mut s).is_empty());
    assert!(
        drain_transmits(&mut s).is_empty(),
        "not acked before it is durable"
    );
    s.upstream_accepted("up-1");
    let acks = drain_transmits(&mut s);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].kind, TransmitKind::UpstreamAck);
    let ack = &acks[0].message;
    assert_eq!(ack.header.parent_id, "up-1");
    assert_eq!(
        (
            ack.route.source.as_str(),
            ack.route.group.as_str(),
            ack.route.operation.as_str(),
            ack.route.resource.as_str()
        ),
        (SOURCE_CLOUDHUB, GROUP_CAUSEWAY, OP_ACK, "")
    );
    assert_eq!(ack.content, Content::Json(serde_json::Value::Null));
    // A later resend (our ack was lost) is acked again and not delivered again.
    s.handle_message(t0 + secs(10), up);
    assert!(drain_events(&mut s).is_empty());
    assert_eq!(drain_transmits(&mut s).len(), 1);
    assert_eq!(s.stats().duplicates, 2);
    assert_eq!(s.stats().upstream, 1);
}

#[test]
fn failed_persistence_lets_the_resend_through() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let up = Message::with_header("up-1", "", 0).route("edged", "meta", "r", "update");
    s.handle_message(t0, up.clone());
    drain_events(&mut s);
    s.upstream_failed("up-1");
    assert!(drain_transmits(&mut s).is_empty(), "never acked");
    s.handle_message(t0 + secs(1), up.clone());
    assert_eq!(drain_events(&mut s), [SessionEvent::Upstream(up)]);
}

#[test]
fn kubeedge_edges_get_no_upstream_ack() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(
        SessionConfig {
            upstream_ack: false,
            ..config()
        },
        t0,
    );
    let up = Message::with_header("up-1", "", 0).route("edged", "meta", "r", "update");
    s.handle_message(t0, up.clone());
    drain_events(&mut s);
    s.upstream_accepted("up-1");
    s.handle_message(t0, up);
    assert!(drain_transmits(&mut s).is_empty());
    assert!(drain_events(&mut s).is_empty(), "still deduplicated");
}

#[test]
fn upstream_without_an_id_gets_one() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let mut up = Message::new("").route("edged", "meta", "r", "update");
    up.header.id.clear();
    s.handle_message(t0, up.clone());
    s.handle_message(t0, up);
    let events = drain_events(&mut s);
    assert_eq!(events.len(), 2, "without an id nothing can be deduplicated");
    for ev in events {
        let SessionEvent::Upstream(m) = ev else {
            panic!("expected upstream, got {ev:?}")
        };
        assert_eq!(m.header.id.len(), 36);
    }
}

#[test]
fn closed_session_ignores_input_and_drops_pending_output() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    s.queue(t0, [down(1, "r", true)]);
    s.close();
    assert_eq!(s.close_reason(), Some(CloseReason::Local));
    assert!(s.poll_transmit().is_none());
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.wants(), 0);
    s.handle_message(
        t0,
        Message::with_header("x", "", 0).route("a", "b", "c", "d"),
    );
    s.queue(t0, [down(2, "r", true)]);
    assert!(s.poll_event().is_none());
    assert!(s.poll_transmit().is_none());
}

#[test]
fn every_downstream_message_lost_until_the_link_heals_is_still_delivered() {
    let mut pair = Pair::new(config(), Some(secs(15)));
    pair.loss_to_edge = 100;
    pair.enqueue((0..200).map(|i| down(i, &format!("default/pod/p{}", i % 50), i % 3 != 0)));
    pair.drive_for(secs(300));
    assert!(pair.edge.handled.is_empty(), "nothing crossed a dead link");
    assert_eq!(pair.closed, None, "keepalives still arrive");
    pair.loss_to_edge = 0;
    pair.drive_for(secs(600));
    assert!(
        pair.store.is_empty(),
        "every message acked or written: {:?}",
        pair.store.keys()
    );
    // Lost no-ACK messages were written (so forgotten) while the link was dead: those are
    // KubeEdge's semantics for them. Every ACK-required one arrived.
    let required: HashSet<String> = (0..200)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("down-{i}"))
        .collect();
    assert!(required.iter().all(|id| pair.edge.handled_set.contains(id)));
    assert_eq!(pair.cloud.in_flight(), 0);
}

#[test]
fn lossy_link_delivers_each_message_once_in_resource_order() {
    let mut pair = Pair::new(config(), Some(secs(15)));
    pair.loss_to_edge = 30;
    pair.loss_to_cloud = 30;
    pair.latency = Duration::from_millis(150);
    // A lossy link can miss two keepalives in a row; use a generous check for this test.
    pair.cloud = NodeSession::new(
        SessionConfig {
            keepalive_interval: secs(3600),
            ..config()
        },
        pair.now,
    );
    pair.enqueue((0..300).map(|i| down(i, &format!("default/pod/p{}", i % 7), true)));
    for i in 0..100 {
        let msg = Message::with_header(format!("up-{i}"), "", 0).route("edged", "meta", "r", "u");
        let now = pair.now;
        pair.edge.send_upstream(now, msg);
    }
    pair.drive_for(secs(3000));
    assert!(pair.store.is_empty());
    assert_eq!(pair.edge.handled.len(), 300);
    assert!(
        pair.edge.copies.values().any(|&c| c > 1),
        "loss caused resends"
    );
    // Per resource, the application saw the messages in queue order.
    for r in 0..7 {
        let seqs: Vec<u64> = pair
            .edge
            .handled
            .iter()
            .filter_map(|id| id.strip_prefix("down-")?.parse::<u64>().ok())
            .filter(|seq| seq % 7 == r)
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "resource p{r}");
    }
    // Upstream: each accepted exactly once, and the edge's outbox emptied.
    assert_eq!(pair.accepted.len(), 100);
    assert!(pair.edge.outbox.is_empty());
    assert!(
        pair.cloud.stats().duplicates > 0,
        "loss of acks caused upstream resends"
    );
    assert!(pair.acks.iter().any(|(_, l)| l.is_some()));
}

#[test]
fn no_ack_messages_pass_a_full_window_but_never_their_own_resource() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(
        SessionConfig {
            window: 2,
            ..config()
        },
        t0,
    );
    s.queue(
        t0,
        [
            down(1, "a", true),
            down(2, "b", true),
            down(3, "c", true),
            down(4, "c", false),
            down(5, "d", false),
        ],
    );
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(
        ids,
        ["down-1", "down-2", "down-5"],
        "c's no-ACK message waits behind c's queued one"
    );
    s.handle_message(
        t0,
        Message::response_to(&down(1, "a", true).message, Content::text("OK")),
    );
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(ids, ["down-3"], "c's ACK-required message first");
    s.handle_message(
        t0,
        Message::response_to(&down(3, "c", true).message, Content::text("OK")),
    );
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(ids, ["down-4"]);
    assert_eq!(s.wants(), 3);
}

#[test]
fn no_ack_messages_to_a_kubeedge_edge_are_paced_and_acked_ones_pass() {
    // A stock edge drops what overflows its 100-entry FIFO and cannot say so: pace what it
    // cannot refuse. ACK-required messages are not paced (the window bounds them).
    let t0 = Instant::now();
    let pace = Pace {
        per_second: 100.0,
        burst: 32,
    };
    let mut s = NodeSession::new(
        SessionConfig {
            upstream_ack: false,
            no_ack_pace: Some(pace),
            ..config()
        },
        t0,
    );
    let mut downs: Vec<Downstream> = (1..=100)
        .map(|i| down(i, &format!("default/podlist/{i}"), false))
        .collect();
    downs.push(down(101, "default/pod/acked", true));
    s.queue(t0, downs);
    let first = drain_transmits(&mut s);
    assert_eq!(first.len(), 33, "the burst and the ACK-required message");
    assert!(first.iter().any(|t| t.message.header.id == "down-101"));
    // Then 100 per second: the rest within 0.68 s, never more than the pace allows.
    let mut now = t0;
    let mut sent = first.len();
    while sent < 101 {
        let next = s.poll_timeout().expect("a pace timer while messages wait");
        assert!(next > now);
        now = next;
        s.handle_timeout(now);
        sent += drain_transmits(&mut s).len();
        let allowed = 33.0 + (now - t0).as_secs_f64() * 100.0;
        assert!(sent as f64 <= allowed + 1e-9, "{sent} by {:?}", now - t0);
    }
    assert!(now - t0 <= Duration::from_millis(690), "{:?}", now - t0);
    assert!(s.stats().paced > 0);
}

#[test]
fn causeway_edges_and_unpaced_configs_get_no_ack_messages_at_once() {
    let t0 = Instant::now();
    for config in [
        // A Causeway edge exerts back-pressure instead of dropping.
        config(),
        SessionConfig {
            upstream_ack: false,
            no_ack_pace: None,
            ..config()
        },
    ] {
        let mut s = NodeSession::new(config, t0);
        s.queue(
            t0,
            (1..=100).map(|i| down(i, &format!("default/podlist/{i}"), false)),
        );
        assert_eq!(drain_transmits(&mut s).len(), 100);
        assert_eq!(s.stats().paced, 0);
    }
}

/// An edge's error answer to `id` (KubeEdge's `NewErrorMessage`).
fn error_answer(id: &str, text: &str) -> Message {
    Message::with_header(format!("err-{id}"), id, 0)
        .route("", "", "r", OP_ERROR)
        .content(Content::text(text))
}

#[test]
fn an_error_answer_ends_the_message_and_frees_its_resource() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    s.queue(t0, [down(1, "pod/a", true), down(2, "pod/a", true)]);
    let sent: Vec<_> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(sent, ["down-1"], "per-resource order holds the second back");
    s.handle_message(t0 + secs(1), error_answer("down-1", "no edge module"));
    let events = drain_events(&mut s);
    assert_eq!(
        events[0],
        SessionEvent::Failed {
            id: "down-1".into(),
            seq: Some(1),
            reason: "no edge module".into(),
        }
    );
    // The error itself still goes up to the applications.
    assert!(
        matches!(&events[1], SessionEvent::Upstream(m) if m.header.id == "err-down-1"),
        "{events:?}"
    );
    assert_eq!(s.stats().failed, 1);
    // Never resent; the resource's next message goes at once.
    let sent: Vec<_> = drain_transmits(&mut s)
        .into_iter()
        .filter(|t| matches!(t.kind, TransmitKind::Delivery { .. }))
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(sent, ["down-2"]);
    s.handle_timeout(t0 + secs(300));
    let resent: Vec<_> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert!(resent.iter().all(|id| id == "down-2"), "{resent:?}");
    assert_eq!(s.in_flight(), 1);
}

#[test]
fn an_error_answer_to_a_message_not_held_is_left_to_the_store() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    // Not awaiting an ACK here: the no-ACK message pending in this session is not failed.
    s.queue(t0, [down(1, "pod/a", false)]);
    s.handle_message(t0, error_answer("unknown", "x"));
    let events = drain_events(&mut s);
    assert!(
        matches!(&events[0], SessionEvent::Failed { id, seq: None, .. } if id == "unknown"),
        "{events:?}"
    );
    assert_eq!(s.stats().failed, 0);
}

#[test]
fn a_cancelled_message_is_never_resent_and_frees_its_resource() {
    let t0 = Instant::now();
    let mut s = NodeSession::new(config(), t0);
    let a1 = down(1, "default/pod/a", true);
    let a2 = down(2, "default/pod/a", true);
    let b = down(3, "default/pod/b", false);
    let c = down(4, "default/pod/c", true);
    s.queue(t0, [a1.clone(), a2, b, c]);
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(
        ids,
        ["down-1", "down-3", "down-4"],
        "down-2 waits for down-1"
    );
    // In flight: cancelling it lets the resource's next message go at once.
    assert!(s.cancel(t0, "down-1"));
    let ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    assert_eq!(ids, ["down-2"]);
    // Pending (a resource still busy): it leaves before it is ever sent.
    let c2 = down(5, "default/pod/c", false);
    s.queue(t0, [c2]);
    assert!(
        drain_transmits(&mut s).is_empty(),
        "down-5 waits for down-4"
    );
    assert!(s.cancel(t0, "down-5"));
    assert!(!s.cancel(t0, "down-5"), "cancelled once");
    assert!(
        !s.cancel(t0, "down-3"),
        "a no-ACK message once written is not held"
    );
    assert_eq!(s.stats().cancelled, 2);
    // Minutes later only down-2 and down-4 are resent; never the cancelled ones.
    s.handle_timeout(t0 + secs(6));
    let mut ids: Vec<String> = drain_transmits(&mut s)
        .into_iter()
        .map(|t| t.message.header.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["down-2", "down-4"]);
    // A late ACK of the cancelled message matches nothing it holds.
    s.handle_message(
        t0 + secs(7),
        Message::response_to(&a1.message, Content::text("OK")),
    );
    assert!(matches!(
        drain_events(&mut s).as_slice(),
        [SessionEvent::Acked { seq: None, .. }]
    ));
    assert_eq!(s.in_flight(), 2);
    assert_eq!(s.wants(), 2 * config().window - 2);
}
