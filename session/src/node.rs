//! The cloud's per-node session as a sans-IO state machine: liveness (keepalive check), upstream
//! dispatch with deduplication and acknowledgement, and windowed, resent downstream delivery. It
//! imports no runtime and touches no socket, file or clock; the async driver (`cloudhub`'s
//! `driver.rs`) feeds it and carries out what it asks. Ids and timestamps of the messages it
//! creates come from [`SessionConfig::new_id`] and [`SessionConfig::wall_millis`].
//!
//! How it improves on KubeEdge's `NodeSession` (PROTOCOL.md B§8.5, W12): up to
//! [`SessionConfig::window`] ACK-required messages in flight at once instead of one, resends with
//! exponential backoff for as long as the session lives instead of giving up after four, and
//! order kept per resource so that a resend can never overtake a newer message for the same
//! object.

pub mod delivery;
mod timer;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use proto::Message;
use proto::message::{GROUP_CAUSEWAY, OP_ACK, OP_ERROR, UpstreamClass};
use proto::rate::TokenBucket;

use self::timer::{Timer, TimerTable};

/// Route source of messages the cloud hub itself originates (upstream acks).
pub const SOURCE_CLOUDHUB: &str = "cloudhub";

/// Tunables of one node session. The defaults assume KubeEdge's edge (15 s heartbeat) on a
/// mediocre link (up to ~1 s RTT, a few % loss).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long the node may stay silent (no keepalive) before the session ends. Default 30 s,
    /// KubeEdge's `keepaliveInterval`: two edge heartbeats. Shorter notices dead nodes sooner but
    /// drops nodes whose keepalive is merely late.
    pub keepalive_interval: Duration,
    /// Most ACK-required messages unacknowledged at once. Default 64. KubeEdge allows 1, which
    /// caps a node at one message per round trip; larger costs memory per node only.
    pub window: usize,
    /// Wait before the first resend of an unacknowledged message. Default 5 s, as KubeEdge.
    pub ack_timeout: Duration,
    /// Upper bound of the doubling resend interval. Default 60 s: a healed link is noticed within
    /// a minute without a resend storm on a dead one.
    pub max_ack_timeout: Duration,
    /// Whether the edge negotiated `upstream-ack` (PROTOCOL.md Part A item 7): if so, every
    /// durably accepted upstream message is acknowledged with a `causeway`/`ack` message.
    pub upstream_ack: bool,
    /// How many accepted upstream ids the session remembers to re-ack duplicates without asking
    /// the store. Default 4096. The store keeps the persisted, longer window.
    pub dedup_window: usize,
    /// Pace of no-ACK messages toward an edge without `upstream-ack` (a stock KubeEdge edge),
    /// which cannot refuse them and drops the oldest once its 100-entry receive FIFO overflows
    /// (PROTOCOL.md B W6): nothing tells the cloud how far behind it is, so the cloud must not
    /// outrun it. `None` sends them as fast as the link takes them. A Causeway edge is never
    /// paced: it exerts back-pressure instead of dropping. Default 100 messages per second,
    /// bursts of 32 (with the 64-message ACK window, under the FIFO's 100).
    pub no_ack_pace: Option<Pace>,
    /// Source of message ids for messages the session creates; injected so tests are
    /// deterministic. Default: random UUID v4.
    pub new_id: fn() -> String,
    /// Wall clock in Unix milliseconds for message timestamps; injected like `new_id`.
    pub wall_millis: fn() -> i64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(30),
            window: 64,
            ack_timeout: Duration::from_secs(5),
            max_ack_timeout: Duration::from_secs(60),
            upstream_ack: false,
            dedup_window: 4096,
            no_ack_pace: Some(Pace::default()),
            new_id: proto::new_id,
            wall_millis: proto::now_millis,
        }
    }
}

/// A rate and burst for [`SessionConfig::no_ack_pace`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Messages per second (positive).
    pub per_second: f64,
    /// Messages that may go at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            per_second: 100.0,
            burst: 32,
        }
    }
}

/// A message queued for the node, as the store hands it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Downstream {
    /// The store's sequence number: an opaque handle the session passes back in
    /// [`Transmit`] and [`SessionEvent::Acked`].
    pub seq: u64,
    /// The message, sent unchanged (same id on every resend).
    pub message: Message,
    /// Whether the edge must acknowledge it ([`delivery::needs_ack`] or an override).
    pub needs_ack: bool,
}

/// A message for the driver to write to the connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    /// What to write.
    pub message: Message,
    /// Why: tells the driver what to record once the write succeeded.
    pub kind: TransmitKind,
}

/// What a [`Transmit`] is, so the driver can update the store after the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransmitKind {
    /// A queued downstream message.
    Delivery {
        /// Its store sequence number.
        seq: u64,
        /// Whether it waits for an ACK; if not, the driver removes it from the store once
        /// written.
        needs_ack: bool,
        /// 1 for the first send in this session, then 2, 3, ... for resends.
        attempt: u32,
    },
    /// An acknowledgement of an upstream message (nothing to record).
    UpstreamAck,
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A message from the edge for the applications. Persist it (deduplicated by id), then call
    /// [`NodeSession::upstream_accepted`] (or [`NodeSession::upstream_failed`]).
    Upstream(Message),
    /// The edge acknowledged a downstream message (op `response`, parent id = its id).
    Acked {
        /// The acknowledged message id.
        id: String,
        /// Its store sequence number when this session holds it; `None` when the id is not
        /// one the session knows (the store may still: mark it acked there).
        seq: Option<u64>,
        /// From the first send in this session to the ACK; `None` if not sent in this session.
        latency: Option<Duration>,
        /// The edge's response itself (its content may be a reply).
        response: Message,
    },
    /// The edge answered a downstream message awaiting its ACK with an error (op `error`,
    /// parent id = its id: it could not deliver it): that message's terminal answer. Mark it
    /// failed with the reason. The error message itself also comes as
    /// [`SessionEvent::Upstream`], for the applications.
    Failed {
        /// The refused message id.
        id: String,
        /// Its store sequence number when this session holds it; `None` when the session does
        /// not (the store may: mark it failed there if it awaits an ACK).
        seq: Option<u64>,
        /// The edge's reason (the error message's text).
        reason: String,
    },
    /// The session ended on its own; see the reason. Close the connection.
    Closed(CloseReason),
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// No keepalive within [`SessionConfig::keepalive_interval`].
    KeepaliveTimeout,
    /// The driver called [`NodeSession::close`] (transport error, replaced, shutdown).
    Local,
}

/// Counters of one session, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Downstream messages sent for the first time in this session.
    pub sent: u64,
    /// Downstream messages sent again because no ACK came in time.
    pub resent: u64,
    /// ACKs that matched a message the session held.
    pub acked: u64,
    /// Error answers that ended a message the session held ([`SessionEvent::Failed`]).
    pub failed: u64,
    /// Messages the session held that the operator cancelled ([`NodeSession::cancel`]).
    pub cancelled: u64,
    /// Upstream messages handed to the driver as [`SessionEvent::Upstream`].
    pub upstream: u64,
    /// Upstream messages dropped as duplicates of an id already accepted or being accepted.
    pub duplicates: u64,
    /// Keepalives received.
    pub keepalives: u64,
    /// Times no-ACK messages had to wait for the pace ([`SessionConfig::no_ack_pace`]).
    pub paced: u64,
}

/// A message sent and waiting for its ACK.
#[derive(Debug)]
struct InFlight {
    down: Downstream,
    first_sent: Instant,
    attempts: u32,
    deadline: Instant,
}

/// The cloud's session with one connected node, free of I/O.
///
/// It takes events in (`handle_*`, plus commands such as [`Self::queue`]) and hands actions out
/// (`poll_*`), as quinn-proto's `Connection` does. Its methods come in four kinds:
///
/// - A. getters, taking `&self`;
/// - B. handlers of input from the network or the clock, named `handle_*`;
/// - C. commands from the driver: [`Self::queue`], [`Self::cancel`], [`Self::upstream_accepted`],
///   [`Self::upstream_failed`], [`Self::close`]. They perform no system I/O either;
/// - D. polls for what the driver must do, named `poll_*`.
///
/// Use it by calling (B) and (C) as things happen, and after each such call, as soon as
/// feasible, calling every poll (D) until it returns `None`, acting on each output (write the
/// message, persist the event, re-arm the one timer). Poll in this order:
///
/// 1. [`Self::poll_transmit`]
/// 2. [`Self::poll_timeout`]
/// 3. [`Self::poll_event`]
///
/// Only (2) depends on (1) today, but keep the order: more dependencies may come. (A) may be
/// called at any time.
///
/// Time passed in must be monotonic: inputs at different instants must arrive in order;
/// [`Self::handle_timeout`] and other handlers at the same instant may interleave freely.
/// Timers fire only through [`Self::handle_timeout`], never by looking at a clock.
#[derive(Debug)]
pub struct NodeSession {
    config: SessionConfig,
    timers: TimerTable,
    closed: Option<CloseReason>,
    last_keepalive: Instant,
    /// Queued downstream messages not yet sent in this session, in store order.
    pending: VecDeque<Downstream>,
    /// How many of `pending` need no ACK (they may pass a full window).
    pending_no_ack: usize,
    /// Sent ACK-required messages by id.
    in_flight: HashMap<String, InFlight>,
    /// Resources with a message in flight: later messages for them wait (per-resource order).
    busy_resources: HashSet<String>,
    /// Ids in `pending` or `in_flight`, so a message fed twice is held once.
    held: HashSet<String>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SessionEvent>,
    /// Upstream ids handed out as events and not yet accepted by the driver.
    accepting: HashSet<String>,
    /// Recently accepted upstream ids, oldest first, for in-session dedup.
    accepted: RecentIds,
    /// Paces no-ACK messages toward an edge without `upstream-ack`; `None` when not paced.
    no_ack_bucket: Option<TokenBucket>,
    stats: SessionStats,
}

impl NodeSession {
    /// A session for a node that connected at `now`; the keepalive check starts at once.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        let mut timers = TimerTable::default();
        timers.set(Timer::KeepaliveCheck, now + config.keepalive_interval);
        let accepted = RecentIds::new(config.dedup_window);
        let no_ack_bucket = match config.no_ack_pace {
            Some(pace) if !config.upstream_ack => {
                Some(TokenBucket::new(pace.per_second, pace.burst, now))
            }
            _ => None,
        };
        Self {
            no_ack_bucket,
            config,
            timers,
            closed: None,
            last_keepalive: now,
            pending: VecDeque::new(),
            pending_no_ack: 0,
            in_flight: HashMap::new(),
            busy_resources: HashSet::new(),
            held: HashSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            accepting: HashSet::new(),
            accepted,
            stats: SessionStats::default(),
        }
    }

    /// Processes one message received from the node at `now` (PROTOCOL.md B§8.3, as amended
    /// by Causeway):
    /// - op `keepalive` (any route): refreshes liveness; nothing else.
    /// - op `response` with a parent id: the ACK of a downstream message.
    /// - op `error` with a parent id: if that message awaits an ACK, its terminal answer
    ///   ([`SessionEvent::Failed`]); and, like anything else, an upstream message.
    /// - anything else: an upstream message for the applications, once per id.
    pub fn handle_message(&mut self, now: Instant, mut msg: Message) {
        if self.closed.is_some() {
            return;
        }
        match msg.upstream_class() {
            UpstreamClass::Keepalive => {
                self.stats.keepalives += 1;
                self.last_keepalive = now;
                self.timers
                    .set(Timer::KeepaliveCheck, now + self.config.keepalive_interval);
                return;
            }
            UpstreamClass::Answer => {
                self.handle_ack(now, msg);
                return;
            }
            // Answered by the transport, which delivers none; should one slip through, it is
            // neither delivered nor acknowledged, as Part A item 7 says.
            UpstreamClass::Control => return,
            UpstreamClass::Data => {}
        }
        if msg.route.operation == OP_ERROR && msg.is_response() {
            self.handle_refusal(now, &msg);
        }
        if msg.header.id.is_empty() {
            // Without an id the message can be neither deduplicated nor acknowledged; give it
            // one so the store can hold it, and deliver it as KubeEdge would.
            msg.header.id = (self.config.new_id)();
        } else if self.accepting.contains(&msg.header.id) {
            // A resend racing the first copy's persistence: its ACK follows that copy's.
            self.stats.duplicates += 1;
            return;
        } else if self.accepted.contains(&msg.header.id) {
            self.stats.duplicates += 1;
            self.queue_upstream_ack(&msg.header.id);
            return;
        }
        self.accepting.insert(msg.header.id.clone());
        self.stats.upstream += 1;
        self.events.push_back(SessionEvent::Upstream(msg));
    }

    /// Fires whichever timers are due at `now`: the keepalive check ends the session; due
    /// in-flight messages are resent with a doubled interval.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.timers.is_expired(Timer::KeepaliveCheck, now) {
            self.end(CloseReason::KeepaliveTimeout);
            self.events
                .push_back(SessionEvent::Closed(CloseReason::KeepaliveTimeout));
            return;
        }
        if self.timers.is_expired(Timer::AckResend, now) {
            let mut due: Vec<&mut InFlight> = self
                .in_flight
                .values_mut()
                .filter(|f| f.deadline <= now)
                .collect();
            // Resend in store order so the edge sees them as queued.
            due.sort_by_key(|f| f.down.seq);
            for flight in due {
                flight.attempts += 1;
                flight.deadline = now + backoff(&self.config, flight.attempts);
                self.stats.resent += 1;
                self.transmits.push_back(Transmit {
                    message: flight.down.message.clone(),
                    kind: TransmitKind::Delivery {
                        seq: flight.down.seq,
                        needs_ack: true,
                        attempt: flight.attempts,
                    },
                });
            }
            self.rearm_resend();
        }
        if self.timers.is_expired(Timer::NoAckPace, now) {
            self.timers.stop(Timer::NoAckPace);
            self.pump(now);
        }
    }

    /// Queues downstream messages (in store order) for sending at `now`. Ids the session already
    /// holds are ignored, so the driver may refill from the store without tracking exactly what
    /// was handed over.
    pub fn queue(&mut self, now: Instant, messages: impl IntoIterator<Item = Downstream>) {
        if self.closed.is_some() {
            return;
        }
        for down in messages {
            if self.held.insert(down.message.header.id.clone()) {
                if !down.needs_ack {
                    self.pending_no_ack += 1;
                }
                self.pending.push_back(down);
            }
        }
        self.pump(now);
    }

    /// The operator cancelled downstream message `id` (the store already holds it as
    /// cancelled): the session forgets it, so it is never sent or resent, and its resource's
    /// later messages may go. An ACK that still comes for it matches nothing. Returns whether
    /// the session held it.
    pub fn cancel(&mut self, now: Instant, id: &str) -> bool {
        if self.closed.is_some() {
            return false;
        }
        if let Some(flight) = self.in_flight.remove(id) {
            self.busy_resources
                .remove(&flight.down.message.route.resource);
        } else if let Some(pos) = self.pending.iter().position(|d| d.message.header.id == id) {
            if self.pending.remove(pos).is_some_and(|d| !d.needs_ack) {
                self.pending_no_ack -= 1;
            }
        } else {
            return false;
        }
        self.held.remove(id);
        self.stats.cancelled += 1;
        self.pump(now);
        true
    }

    /// The driver durably accepted upstream message `id`: acknowledges it to the edge (if
    /// negotiated) and remembers it, so a resend is re-acked without a store round trip.
    pub fn upstream_accepted(&mut self, id: &str) {
        self.accepting.remove(id);
        self.accepted.insert(id.to_owned());
        if self.closed.is_none() {
            self.queue_upstream_ack(id);
        }
    }

    /// The driver could not persist upstream message `id`: forgets it unacknowledged, so the
    /// edge's resend is tried again.
    pub fn upstream_failed(&mut self, id: &str) {
        self.accepting.remove(id);
    }

    /// Ends the session at the driver's request; every poll then returns nothing. Messages held
    /// stay in the store and go to the node's next session.
    pub fn close(&mut self) {
        if self.closed.is_none() {
            self.end(CloseReason::Local);
        }
    }

    /// The next message to write, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_timeout()
    }

    /// The next event for the driver, if any.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Why the session ended, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closed
    }

    /// When the node's last keepalive arrived (the session's start before the first).
    pub fn last_keepalive(&self) -> Instant {
        self.last_keepalive
    }

    /// ACK-required messages sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// How many more messages [`Self::queue`] should be given: the session buffers up to two
    /// windows so the window never runs dry between refills.
    pub fn wants(&self) -> usize {
        if self.closed.is_some() {
            return 0;
        }
        (2 * self.config.window).saturating_sub(self.held.len())
    }

    /// This session's counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    fn handle_ack(&mut self, now: Instant, response: Message) {
        let id = response.header.parent_id.clone();
        let (seq, latency) = if let Some(flight) = self.in_flight.remove(&id) {
            self.busy_resources
                .remove(&flight.down.message.route.resource);
            self.held.remove(&id);
            self.stats.acked += 1;
            self.rearm_resend();
            (
                Some(flight.down.seq),
                Some(now.saturating_duration_since(flight.first_sent)),
            )
        } else if let Some(pos) = self.pending.iter().position(|d| d.message.header.id == id) {
            // Sent by an earlier session and answered only now: no need to send it again.
            let down = self.pending.remove(pos);
            if down.as_ref().is_some_and(|d| !d.needs_ack) {
                self.pending_no_ack -= 1;
            }
            self.held.remove(&id);
            self.stats.acked += 1;
            (down.map(|d| d.seq), None)
        } else {
            (None, None)
        };
        self.events.push_back(SessionEvent::Acked {
            id,
            seq,
            latency,
            response,
        });
        self.pump(now);
    }

    /// The edge could not deliver the message the error `answer` answers: if it awaits an ACK
    /// here, it leaves the session like an acknowledged one (its resource's later messages may
    /// go); if the session does not hold it, the store decides.
    fn handle_refusal(&mut self, now: Instant, answer: &Message) {
        let id = answer.header.parent_id.clone();
        let seq = if let Some(flight) = self.in_flight.remove(&id) {
            self.busy_resources
                .remove(&flight.down.message.route.resource);
            self.held.remove(&id);
            self.rearm_resend();
            Some(flight.down.seq)
        } else if let Some(pos) = self
            .pending
            .iter()
            .position(|d| d.needs_ack && d.message.header.id == id)
        {
            self.held.remove(&id);
            self.pending.remove(pos).map(|d| d.seq)
        } else if self.held.contains(&id) {
            // A no-ACK message still pending here: nothing awaits an answer to it.
            return;
        } else {
            None
        };
        if seq.is_some() {
            self.stats.failed += 1;
        }
        let reason = String::from_utf8_lossy(&answer.content.to_bytes()).into_owned();
        self.events
            .push_back(SessionEvent::Failed { id, seq, reason });
        self.pump(now);
    }

    /// Moves pending messages to the wire while the window and per-resource order allow.
    fn pump(&mut self, now: Instant) {
        let window = self.config.window;
        // Under load the window is usually full with only ACK-required messages waiting: then
        // nothing can move and the scan is skipped.
        if self.pending.is_empty() || (self.in_flight.len() >= window && self.pending_no_ack == 0) {
            self.rearm_resend();
            return;
        }
        // Choose, in queue order, what may go now (borrowing only), then move it.
        let mut chosen: Vec<usize> = Vec::new();
        // When the pace next has a token, if it ran out.
        let mut paced_until = None;
        {
            let mut in_flight = self.in_flight.len();
            let mut no_ack_left = self.pending_no_ack;
            // Resources passed over, or just put in flight: later messages for them wait.
            let mut blocked: HashSet<&str> = HashSet::new();
            for (idx, down) in self.pending.iter().enumerate() {
                let full = in_flight >= window;
                // Nothing more can move: the window is full and no no-ACK message may pass it.
                if full && (no_ack_left == 0 || paced_until.is_some()) {
                    break;
                }
                if !down.needs_ack {
                    no_ack_left -= 1;
                }
                let resource = down.message.route.resource.as_str();
                if blocked.contains(resource)
                    || self.busy_resources.contains(resource)
                    || (down.needs_ack && full)
                {
                    blocked.insert(resource);
                    continue;
                }
                if !down.needs_ack
                    && let Some(bucket) = self.no_ack_bucket.as_mut()
                {
                    if paced_until.is_some() {
                        blocked.insert(resource);
                        continue;
                    }
                    if let Err(at) = bucket.try_take(now) {
                        paced_until = Some(at);
                        self.stats.paced += 1;
                        blocked.insert(resource);
                        continue;
                    }
                }
                chosen.push(idx);
                if down.needs_ack {
                    in_flight += 1;
                    blocked.insert(resource);
                }
            }
        }
        let mut sent: Vec<Downstream> = Vec::with_capacity(chosen.len());
        for &idx in chosen.iter().rev() {
            if let Some(down) = self.pending.remove(idx) {
                sent.push(down);
            }
        }
        for down in sent.into_iter().rev() {
            self.stats.sent += 1;
            self.transmits.push_back(Transmit {
                message: down.message.clone(),
                kind: TransmitKind::Delivery {
                    seq: down.seq,
                    needs_ack: down.needs_ack,
                    attempt: 1,
                },
            });
            if down.needs_ack {
                self.busy_resources
                    .insert(down.message.route.resource.clone());
                let id = down.message.header.id.clone();
                self.in_flight.insert(
                    id,
                    InFlight {
                        down,
                        first_sent: now,
                        attempts: 1,
                        deadline: now + self.config.ack_timeout,
                    },
                );
            } else {
                self.pending_no_ack -= 1;
                self.held.remove(&down.message.header.id);
            }
        }
        if let Some(at) = paced_until {
            self.timers.set(Timer::NoAckPace, at);
        }
        self.rearm_resend();
    }

    fn queue_upstream_ack(&mut self, id: &str) {
        if !self.config.upstream_ack {
            return;
        }
        let message = Message::with_header((self.config.new_id)(), id, (self.config.wall_millis)())
            .route(SOURCE_CLOUDHUB, GROUP_CAUSEWAY, "", OP_ACK);
        self.transmits.push_back(Transmit {
            message,
            kind: TransmitKind::UpstreamAck,
        });
    }

    fn rearm_resend(&mut self) {
        match self.in_flight.values().map(|f| f.deadline).min() {
            Some(deadline) => self.timers.set(Timer::AckResend, deadline),
            None => self.timers.stop(Timer::AckResend),
        }
    }

    fn end(&mut self, reason: CloseReason) {
        self.closed = Some(reason);
        self.timers.stop_all();
        self.transmits.clear();
    }
}

/// Wait after send number `attempts` (1-based): `ack_timeout` doubled per resend, capped.
fn backoff(config: &SessionConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    config
        .ack_timeout
        .saturating_mul(factor)
        .min(config.max_ack_timeout)
}

/// A bounded set of ids that forgets the oldest first.
#[derive(Debug)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl RecentIds {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn insert(&mut self, id: String) {
        if self.set.contains(&id) {
            return;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}
