//! The edge session: EdgeHub's link logic as a sans-IO state machine, free of any runtime and
//! socket, in the style of quinn-proto. It decides when to connect, when to send a keepalive,
//! when the cloud counts as dead, when to reconnect and how long to back off, how fast module
//! messages may go up, and where each cloud message goes on the bus. The async driver
//! (`edgehub`'s `driver.rs`) performs what it asks for and feeds back what happened. Ids and
//! timestamps of the messages it creates come from [`SessionConfig::new_id`] and
//! [`SessionConfig::wall_millis`].
//!
//! What it fixes against KubeEdge (PROTOCOL.md B§11): a silent cloud is noticed within about two
//! heartbeats (W7); every failure signal of one connection stops that connection exactly once and
//! no event of an old connection touches a newer one, thanks to a [`Generation`] number (W10);
//! repeated connect failures back off exponentially with full jitter (W11); the in-flight upstream
//! message is not lost, because the session only tells the outbox to forget a message once the
//! cloud acknowledged it (W5, see `edgehub`'s `outbox.rs`).
//!
//! Which upstream messages wait for an acknowledgement follows [`UpstreamClass`] (PROTOCOL.md
//! Part A item 7): only data does. Answers to cloud messages (the ACKs of downstream messages) go
//! on their own lane ([`EdgeSession::queue_answer`]), ahead of module data and outside the
//! upstream rate limiter as long as each answers a message this connection delivered, so a
//! backlog of module data never delays an ACK and ACKs never use up the modules' rate.
//!
//! A cloud message the edge cannot deliver (it matches no handler, or its module does not exist)
//! is answered on the same lane with KubeEdge's error message (op `error`, parent id = its id, the
//! reason as text; [`EdgeSession::refuse`]), so a Causeway cloud ends that message's resends and
//! the resource's later messages proceed (PROTOCOL.md Part A item 7).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use proto::close::{Retry, SessionCloseCode};
use proto::message::{OP_ERROR, OP_KEEPALIVE, UpstreamClass};
use proto::{Content, Fault, FaultClass, Message};

use self::route::{
    CONNECTION_EVENT_GROUPS, Destination, GROUP_RESOURCE, MODULE_EDGEHUB, Routing, Unroutable,
};

mod backoff;
pub mod route;
mod timer;

pub use backoff::{BackoffConfig, SplitMix64};
pub use proto::rate::TokenBucket;
pub use timer::{Timer, TimerTable};

/// Resource of the keepalive (B§6.1).
pub const KEEPALIVE_RESOURCE: &str = "node";
/// Content of the keepalive (B§6.1).
pub const KEEPALIVE_CONTENT: &str = "ping";

/// Numbers the connection attempts of one session, starting at 1. Every event about a connection
/// carries the generation it belongs to; events of any other generation are ignored, so a late
/// error from an old connection can never tear down its successor (W10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(u64);

impl Generation {
    /// The number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }

    fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Timing and flow parameters of a session. [`SessionConfig::new`] derives KubeEdge-compatible
/// defaults from the heartbeat (15 s in KubeEdge), for an edge link of unknown quality: every
/// derived value scales with the heartbeat, so a 1 s test heartbeat keeps the same proportions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Keepalive period. Default 15 s (KubeEdge's `heartbeat`).
    pub heartbeat: Duration,
    /// How long a connected cloud may show no sign of life (no message, no transport activity
    /// reported by the driver) before it counts as dead. Default two heartbeats (Part A §6).
    /// `None` leaves liveness to the transport alone.
    pub dead_after: Option<Duration>,
    /// The fixed wait after an established connection is lost, before the next attempt.
    /// Default two heartbeats (KubeEdge's wait).
    pub reconnect_wait: Duration,
    /// Up to this much is added at random to `reconnect_wait`, so a fleet that lost its cloud at
    /// one instant (a cloudcore restart) does not come back at one instant. Default half a
    /// heartbeat: 1,000 nodes arrive over 7.5 s instead of in one burst, at a mean cost of a
    /// quarter heartbeat.
    pub reconnect_jitter: Duration,
    /// A connection that ends sooner than this counts as a failed attempt for the backoff, so a
    /// cloud that accepts and immediately drops the edge is not retried in a tight cycle.
    /// Default one heartbeat.
    pub stable_after: Duration,
    /// Backoff after failed attempts; see [`BackoffConfig::from_heartbeat`].
    pub backoff: BackoffConfig,
    /// Rate of module → cloud messages, per second. Default 30 (KubeEdge's `messageQPS`).
    pub message_qps: f64,
    /// Burst of module → cloud messages. Default 60 (KubeEdge's `messageBurst`).
    pub message_burst: u32,
    /// Most upstream messages queued or awaiting the cloud's acknowledgement at once. Default 256:
    /// enough to keep a link busy, small enough that a reconnect resends little twice.
    pub upstream_window: usize,
    /// Most answers to cloud messages queued for writing; more are dropped (and counted), which
    /// loses nothing: the cloud resends what it has no answer for, and the edge answers the
    /// resend. Default 4096, more than a cloud keeps unacknowledged toward one node.
    pub answer_queue: usize,
    /// Source of the ids of messages the session creates (keepalives, connection events);
    /// injected so the session reads no OS randomness. Default: random UUID v4.
    pub new_id: fn() -> String,
    /// Wall clock in Unix milliseconds for those messages' timestamps; injected like `new_id`.
    pub wall_millis: fn() -> i64,
}

impl SessionConfig {
    /// Defaults derived from `heartbeat` (documented on each field).
    pub fn new(heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            dead_after: Some(heartbeat.saturating_mul(2)),
            reconnect_wait: heartbeat.saturating_mul(2),
            reconnect_jitter: heartbeat / 2,
            stable_after: heartbeat,
            backoff: BackoffConfig::from_heartbeat(heartbeat),
            message_qps: 30.0,
            message_burst: 60,
            upstream_window: 256,
            answer_queue: 4096,
            new_id: proto::new_id,
            wall_millis: proto::now_millis,
        }
    }
}

/// What the driver reports to the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The connection asked for by [`Action::Connect`] is established.
    Connected {
        /// The generation of the [`Action::Connect`].
        generation: Generation,
        /// Whether the cloud negotiated Causeway's `upstream-ack` capability. Without it, upstream
        /// messages are forgotten once written (KubeEdge semantics).
        upstream_ack: bool,
    },
    /// The connect attempt failed (dial, TLS, handshake, timeout). A configuration fault is
    /// retried slowly ([`BackoffConfig::max`]); any other with the backoff.
    ConnectFailed {
        /// The generation of the [`Action::Connect`].
        generation: Generation,
        /// What went wrong and whose fault it is.
        fault: Fault,
    },
    /// The connection failed: a receive or send error, the peer closed it, or the transport's
    /// own read deadline or idle timeout expired. Any number of these may arrive for one
    /// connection; the first stops it, the rest are coalesced.
    Failed {
        /// The generation of the failed connection.
        generation: Generation,
        /// What went wrong and whose fault it is.
        fault: Fault,
    },
    /// The cloud ended the session on purpose with a session close code (PROTOCOL.md Part A
    /// item 9): like [`Event::Failed`], but the wait before the next attempt follows the code
    /// ([`SessionCloseCode::retry`]), so a takeover by another instance of this node is not
    /// fought in a tight loop.
    ClosedByCloud {
        /// The generation of the closed connection.
        generation: Generation,
        /// The code the cloud closed with.
        code: SessionCloseCode,
        /// The cloud's reason text, for logs.
        reason: String,
    },
    /// The transport saw a sign of life from the cloud that is not a message (a pong, a QUIC
    /// acknowledgement): it postpones the dead-cloud deadline like a message does.
    PeerActivity {
        /// The generation of the connection.
        generation: Generation,
    },
    /// Reconnect now although the link is healthy, e.g. after a certificate renewal so the new
    /// certificate is presented.
    Reconnect {
        /// Why, for logs.
        reason: String,
    },
    /// Reconnect at once, without the wait after a loss: the driver already holds a working
    /// connection to offer for the next attempt (EdgeHub's protocol fallback moving back to
    /// its configured protocol). A connected session closes its connection and asks for the next
    /// one; a waiting one ends its wait; a connecting one carries on (the dial under way
    /// decides). The next connection resends what was unacknowledged, like any reconnect.
    ReconnectNow {
        /// Why, for logs.
        reason: String,
    },
    /// Stop for good: close the connection, tell modules, arm no more timers.
    Shutdown,
}

/// Why a connection was closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Nothing was heard from the cloud for this long (W7).
    DeadPeer {
        /// The silence that exceeded [`SessionConfig::dead_after`].
        silent_for: Duration,
    },
    /// The transport reported the connection failed.
    Transport(Fault),
    /// The cloud closed the session with a session close code.
    ClosedByCloud {
        /// The code.
        code: SessionCloseCode,
        /// The cloud's reason text.
        reason: String,
    },
    /// A reconnect was requested ([`Event::Reconnect`]).
    Requested(String),
    /// The edge is shutting down.
    Shutdown,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeadPeer { silent_for } => {
                write!(f, "cloud silent for {} ms", silent_for.as_millis())
            }
            Self::Transport(reason) => write!(f, "transport: {reason}"),
            Self::ClosedByCloud { code, reason } => {
                write!(f, "closed by the cloud with code {code}: {reason}")
            }
            Self::Requested(reason) => write!(f, "reconnect requested: {reason}"),
            Self::Shutdown => f.write_str("shutting down"),
        }
    }
}

/// I/O the driver must perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Dial the cloud; report [`Event::Connected`] or [`Event::ConnectFailed`] with this
    /// generation.
    Connect {
        /// Identifies this attempt.
        generation: Generation,
    },
    /// Close this connection and end every task that serves it before the next
    /// [`Action::Connect`] is acted on.
    Close {
        /// The connection to close.
        generation: Generation,
        /// Why, for logs.
        reason: DisconnectReason,
    },
    /// The cloud acknowledged the upstream message with this id: the outbox may delete it.
    Forget {
        /// The acknowledged message id.
        id: String,
    },
}

/// What the session tells the rest of the edge: bus deliveries and log-worthy changes.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A connection is up (log one line; if `upstream_ack` is false, log once that KubeEdge
    /// semantics apply on this connection).
    Connected {
        /// The connection.
        generation: Generation,
        /// Whether upstream messages are acknowledged by the cloud on this connection.
        upstream_ack: bool,
    },
    /// A connection went down (log one line with the reason).
    Disconnected {
        /// The connection.
        generation: Generation,
        /// Why.
        reason: DisconnectReason,
    },
    /// A connect attempt failed (log one line; if `repeated`, it failed like the attempt before
    /// it, and a configuration fault has been said once already).
    ConnectFailed {
        /// The attempt.
        generation: Generation,
        /// Why, and whose fault it is.
        fault: Fault,
        /// The previous attempt failed with the same fault.
        repeated: bool,
    },
    /// The next attempt is scheduled (log one line).
    ReconnectScheduled {
        /// The generation the next attempt will have.
        generation: Generation,
        /// How long until it starts.
        after: Duration,
        /// Consecutive failed attempts so far (0 after a healthy connection ended).
        failures: u32,
    },
    /// Send this connection event to every module of `group` (KubeEdge's `pubConnectInfo`).
    Publish {
        /// The group.
        group: &'static str,
        /// The `cloud_connected` / `cloud_disconnected` message.
        message: Message,
    },
    /// Deliver a cloud message on the bus.
    Deliver {
        /// Where to.
        destination: Destination,
        /// The message, unchanged.
        message: Message,
    },
    /// A cloud message matched no handler: log and count it (it is not delivered; the session
    /// has answered it with an error, [`EdgeSession::refuse`]).
    Unroutable {
        /// Why no handler matched.
        reason: Unroutable,
        /// The message.
        message: Message,
    },
}

/// One message to write to the connection of `generation`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    /// The connection this message must be written to; the driver drops a transmit of any other.
    pub generation: Generation,
    /// The message.
    pub message: Message,
    /// What it is, which says what the driver does after writing it.
    pub kind: TransmitKind,
}

/// What a [`Transmit`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransmitKind {
    /// A keepalive: not stored, not acknowledged.
    Keepalive,
    /// A module → cloud message from the outbox.
    Upstream {
        /// The cloud will not acknowledge this message: it is not data ([`UpstreamClass`]), or
        /// the cloud acknowledges nothing on this connection (a stock KubeEdge peer). Delete it
        /// from the outbox once written, as KubeEdge does. Otherwise it stays until
        /// [`Action::Forget`].
        forget_after_write: bool,
    },
    /// An answer to a cloud message ([`EdgeSession::queue_answer`]): never stored in the outbox,
    /// nothing to do once written.
    Answer,
}

/// Why [`EdgeSession::queue_upstream`] refused a message. The message is handed back; it stays in
/// the outbox and is offered again later.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueUpstreamError {
    /// No connection is up; offer it again after the next [`SessionEvent::Connected`].
    #[error("not connected to the cloud")]
    NotConnected(Box<Message>),
    /// [`SessionConfig::upstream_window`] messages are queued or unacknowledged; offer it again
    /// after an [`Action::Forget`] or a transmit frees room.
    #[error("upstream window is full")]
    WindowFull(Box<Message>),
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Connect attempts started.
    pub connect_attempts: u64,
    /// Connections established.
    pub connects: u64,
    /// Connect attempts that failed.
    pub connect_failures: u64,
    /// Established connections that were stopped.
    pub disconnects: u64,
    /// Failure signals for a connection that was already being stopped (coalesced).
    pub coalesced_failures: u64,
    /// Events or messages of a generation other than the current one (ignored).
    pub stale_events: u64,
    /// Keepalives handed to the driver.
    pub keepalives_sent: u64,
    /// Upstream messages handed to the driver.
    pub upstream_sent: u64,
    /// Upstream acknowledgements received.
    pub upstream_acks: u64,
    /// Answers to cloud messages handed to the driver.
    pub answers_sent: u64,
    /// Of those, answers that answered no message this connection delivered, so they waited for
    /// the upstream rate limiter like module data.
    pub answers_rate_limited: u64,
    /// Answers dropped: no connection was up, or the answer queue was full. The cloud resends
    /// the messages they answered, and the edge answers again.
    pub answers_dropped: u64,
    /// Cloud messages delivered on the bus.
    pub delivered: u64,
    /// Cloud messages that matched no handler.
    pub unroutable: u64,
    /// Error answers queued for cloud messages the edge could not deliver (unroutable, or no
    /// such module), resends included.
    pub refused: u64,
    /// Keepalives received from the cloud (liveness only).
    pub keepalives_received: u64,
}

/// The state of EdgeHub's link to the cloud, as a sans-IO state machine.
///
/// An `EdgeSession` performs no I/O and reads no clock. It consumes what happened through
/// `handle_*` methods and hands out what to do through `poll_*` methods, in the manner of
/// quinn-proto's `Connection`. Its methods are of four kinds:
///
/// - A. Getters taking `&self` ([`EdgeSession::state`], [`EdgeSession::stats`], ...), callable
///   at any time.
/// - B. Handlers of what happened, named `handle_*`: [`EdgeSession::handle_event`] (connection
///   outcomes, failures, shutdown), [`EdgeSession::handle_message`] (a message from the cloud) and
///   [`EdgeSession::handle_timeout`] (the deadline from `poll_timeout` has passed).
/// - C. Commands from the edge's modules: [`EdgeSession::queue_upstream`],
///   [`EdgeSession::queue_answer`].
/// - D. Polls for what to do, named `poll_*`.
///
/// After each call of kind B or C, as soon as feasible, call the polls in this order and act on
/// every output until each returns `None`:
///
/// 1. [`EdgeSession::poll_transmit`]: messages to write to the current connection;
/// 2. [`EdgeSession::poll_timeout`]: when to call `handle_timeout` next (re-arm one sleep to it;
///    it depends on what `poll_transmit` took, e.g. the rate limiter);
/// 3. [`EdgeSession::poll_action`]: connect, close, forget an acknowledged outbox message;
/// 4. [`EdgeSession::poll_event`]: bus deliveries and log lines.
///
/// Time is passed in as `now` and must be monotonic: never pass an `Instant` earlier than one
/// passed before. Calls with the same `now` may come in any order. `handle_timeout` must be called
/// whenever the `Instant` returned by `poll_timeout` has passed; calling it early is harmless.
pub struct EdgeSession {
    config: SessionConfig,
    state: State,
    /// The generation most recently handed out in an [`Action::Connect`].
    generation: Generation,
    timers: TimerTable,
    bucket: TokenBucket,
    /// Uniform draws from `[0, 1)` for the backoff jitter (injected, so tests are exact).
    random: Box<dyn FnMut() -> f64 + Send>,
    /// Consecutive failed attempts (reset by a connection that lasted
    /// [`SessionConfig::stable_after`]).
    failures: u32,
    /// The fault of the last failed connect attempt since the last connection, so one that
    /// repeats is reported as such (and a configuration fault said once).
    last_connect_fault: Option<Fault>,
    /// When the current connection last showed a sign of life.
    last_heard: Instant,
    keepalives: VecDeque<Transmit>,
    /// Answers to cloud messages, each with whether it is covered by `answer_credit` (then it
    /// bypasses the rate limiter).
    answers: VecDeque<(Message, bool)>,
    /// Cloud messages this connection delivered and not yet answered: the answers an honest
    /// edge owes, which therefore need no rate limit (capped at [`SessionConfig::answer_queue`]).
    answer_credit: usize,
    upstream: VecDeque<Message>,
    /// Ids written and awaiting the cloud's acknowledgement (only with `upstream_ack`).
    in_flight: HashSet<String>,
    /// Cloud messages refused recently (id → reason), oldest first in `refused_order`, so a
    /// resend is refused again instead of delivered (capped at [`SessionConfig::answer_queue`]).
    refused: HashMap<String, String>,
    refused_order: VecDeque<String>,
    actions: VecDeque<Action>,
    events: VecDeque<SessionEvent>,
    stats: SessionStats,
}

/// Where the session is in its connect / reconnect cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// An [`Action::Connect`] of this generation is outstanding.
    Connecting(Generation),
    /// This generation's connection is up.
    Connected(Generation),
    /// Waiting ([`Timer::ReconnectWait`] or [`Timer::Backoff`]) before the next attempt.
    Waiting,
    /// Shut down.
    Stopped,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Connecting {
        generation: Generation,
    },
    Connected {
        generation: Generation,
        since: Instant,
        upstream_ack: bool,
    },
    Waiting,
    Stopped,
}

impl EdgeSession {
    /// A session that asks to connect at once (generation 1). `random` returns uniform draws from
    /// `[0, 1)` for the backoff jitter; [`SplitMix64`] makes one from a seed.
    pub fn new(
        config: SessionConfig,
        now: Instant,
        random: impl FnMut() -> f64 + Send + 'static,
    ) -> Self {
        let bucket = TokenBucket::new(config.message_qps, config.message_burst, now);
        let mut session = Self {
            config,
            state: State::Waiting,
            generation: Generation(0),
            timers: TimerTable::default(),
            bucket,
            random: Box::new(random),
            failures: 0,
            last_connect_fault: None,
            last_heard: now,
            keepalives: VecDeque::new(),
            answers: VecDeque::new(),
            answer_credit: 0,
            upstream: VecDeque::new(),
            in_flight: HashSet::new(),
            refused: HashMap::new(),
            refused_order: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
        };
        session.start_attempt();
        session
    }

    /// A session whose jitter comes from [`SplitMix64`] seeded with `seed`.
    pub fn with_seed(config: SessionConfig, now: Instant, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        Self::new(config, now, move || rng.next_unit())
    }

    /// Handles what the driver observed about connections (kind B).
    pub fn handle_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected {
                generation,
                upstream_ack,
            } => self.on_connected(now, generation, upstream_ack),
            Event::ConnectFailed { generation, fault } => {
                self.on_connect_failed(now, generation, fault)
            }
            Event::Failed { generation, fault } => match self.state {
                State::Connected {
                    generation: current,
                    ..
                } if current == generation => {
                    self.disconnect(now, DisconnectReason::Transport(fault));
                }
                State::Connecting {
                    generation: current,
                } if current == generation => {
                    self.on_connect_failed(now, generation, fault);
                }
                _ if generation == self.generation => self.stats.coalesced_failures += 1,
                _ => self.stats.stale_events += 1,
            },
            Event::ClosedByCloud {
                generation,
                code,
                reason,
            } => match self.state {
                State::Connected {
                    generation: current,
                    ..
                } if current == generation => {
                    self.disconnect(now, DisconnectReason::ClosedByCloud { code, reason });
                }
                State::Connecting {
                    generation: current,
                } if current == generation => {
                    // Refused before the session began: a code that needs something outside this
                    // edge to change is a configuration fault (retried slowly, said once).
                    let class = if code.retry() == Retry::Longest {
                        FaultClass::Configuration
                    } else {
                        FaultClass::Network
                    };
                    let fault = Fault::new(class, format!("{code}: {reason}"));
                    self.on_connect_failed(now, generation, fault);
                }
                _ if generation == self.generation => self.stats.coalesced_failures += 1,
                _ => self.stats.stale_events += 1,
            },
            Event::PeerActivity { generation } => {
                if self.connected_generation() == Some(generation) {
                    self.heard(now);
                } else {
                    self.stats.stale_events += 1;
                }
            }
            Event::Reconnect { reason } => {
                if self.connected_generation().is_some() {
                    self.disconnect(now, DisconnectReason::Requested(reason));
                }
            }
            Event::ReconnectNow { reason } => match self.state {
                State::Connected { generation, .. } => {
                    self.stop_connection(generation, DisconnectReason::Requested(reason));
                    self.failures = 0;
                    self.start_attempt();
                }
                State::Waiting => {
                    self.timers.stop(Timer::ReconnectWait);
                    self.timers.stop(Timer::Backoff);
                    self.start_attempt();
                }
                State::Connecting { .. } | State::Stopped => {}
            },
            Event::Shutdown => self.shutdown(),
        }
    }

    /// Handles a message the connection of `generation` received from the cloud (kind B).
    pub fn handle_message(&mut self, now: Instant, generation: Generation, message: Message) {
        if self.connected_generation() != Some(generation) {
            self.stats.stale_events += 1;
            return;
        }
        self.heard(now);
        if message.route.operation == OP_KEEPALIVE {
            // A cloud that echoes keepalives: proof of life, nothing for the modules.
            self.stats.keepalives_received += 1;
            return;
        }
        match route::route_to_edge(&message) {
            Routing::UpstreamAck(id) => {
                self.stats.upstream_acks += 1;
                self.in_flight.remove(&id);
                // Forget even an id not in flight: a duplicate ack after a resend, or an ack that
                // raced a reconnect; deleting from the outbox is idempotent.
                self.actions.push_back(Action::Forget { id });
            }
            Routing::Deliver(_) if self.refused.contains_key(&message.header.id) => {
                // A resend of a message refused before (its answer was lost): refuse it again.
                let reason = self.refused[&message.header.id].clone();
                self.refuse(&message, reason);
            }
            Routing::Deliver(destination) => {
                self.stats.delivered += 1;
                self.answer_credit = (self.answer_credit + 1).min(self.config.answer_queue);
                self.events.push_back(SessionEvent::Deliver {
                    destination,
                    message,
                });
            }
            Routing::Unroutable(reason) => {
                self.stats.unroutable += 1;
                self.refuse(&message, format!("{reason}: {:?}", message.route.group));
                self.events
                    .push_back(SessionEvent::Unroutable { reason, message });
            }
        }
    }

    /// Handles every timer that has expired at `now` (kind B).
    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in Timer::VALUES {
            if !self.timers.is_expired(timer, now) {
                continue;
            }
            let deadline = self.timers.get(timer).unwrap_or(now);
            self.timers.stop(timer);
            match timer {
                Timer::Heartbeat => self.on_heartbeat(now, deadline),
                Timer::ReadDeadline => {
                    let silent_for = now.saturating_duration_since(self.last_heard);
                    self.disconnect(now, DisconnectReason::DeadPeer { silent_for });
                }
                Timer::ReconnectWait | Timer::Backoff => {
                    if matches!(self.state, State::Waiting) {
                        self.start_attempt();
                    }
                }
                // Only a wake-up: `poll_transmit` retries the bucket.
                Timer::RateLimit => {}
            }
        }
    }

    /// Queues a module → cloud message from the outbox for the current connection (kind C). It is
    /// sent in order, subject to the rate limiter.
    pub fn queue_upstream(&mut self, message: Message) -> Result<(), QueueUpstreamError> {
        if self.connected_generation().is_none() {
            return Err(QueueUpstreamError::NotConnected(Box::new(message)));
        }
        if self.upstream_capacity() == 0 {
            return Err(QueueUpstreamError::WindowFull(Box::new(message)));
        }
        self.upstream.push_back(message);
        Ok(())
    }

    /// Queues an answer to a cloud message (op `response` with its parent id: an ACK or a
    /// reply) for the current connection (kind C). The outbox has recorded the answered id; the
    /// answer itself is never stored, because the cloud does not acknowledge it and repairs its
    /// loss by resending the message it answers (PROTOCOL.md Part A item 7). So with no
    /// connection up, or the answer queue full, it is dropped and counted.
    pub fn queue_answer(&mut self, message: Message) {
        if self.connected_generation().is_none() || self.answers.len() >= self.config.answer_queue {
            self.stats.answers_dropped += 1;
            return;
        }
        let credited = self.answer_credit > 0;
        if credited {
            self.answer_credit -= 1;
        }
        self.answers.push_back((message, credited));
    }

    /// Answers a cloud message again that the edge answered before (the outbox remembers it)
    /// and the cloud resent, because that answer was lost (kind C). The module is not asked
    /// again: the answer is the minimal one the ACK contract reads (op `response`, parent id =
    /// the message's id, content `OK`; B§8.5), on the answer lane like any answer.
    pub fn answer_again(&mut self, message: &Message) {
        let answer = Message::response_to_with(
            message,
            Content::text("OK"),
            (self.config.new_id)(),
            (self.config.wall_millis)(),
        );
        self.queue_answer(answer);
    }

    /// Answers a cloud message the edge cannot deliver with KubeEdge's error message (op
    /// `error`, parent id = its id, `reason` as text) on the answer lane, and remembers it so a
    /// resend is refused again rather than delivered (kind C). The session calls it for a
    /// message that matches no handler; the driver calls it when the bus has no such module.
    /// Responses and messages without an id are not answered (nothing awaits an answer to them).
    pub fn refuse(&mut self, message: &Message, reason: impl Into<String>) {
        let id = &message.header.id;
        if id.is_empty() || message.is_response() {
            return;
        }
        let reason = reason.into();
        if !self.refused.contains_key(id) {
            if self.refused_order.len() >= self.config.answer_queue.max(1)
                && let Some(old) = self.refused_order.pop_front()
            {
                self.refused.remove(&old);
            }
            self.refused_order.push_back(id.clone());
            self.refused.insert(id.clone(), reason.clone());
        }
        let answer = Message::with_header(
            (self.config.new_id)(),
            id.clone(),
            (self.config.wall_millis)(),
        )
        .route("", "", message.route.resource.clone(), OP_ERROR)
        .content(Content::text(reason));
        self.stats.refused += 1;
        // An answer an honest edge owes, like an ACK: not rate limited.
        if self.connected_generation().is_some() {
            self.answer_credit = (self.answer_credit + 1).min(self.config.answer_queue);
        }
        self.queue_answer(answer);
    }

    /// The next message to write, if any (kind D). Keepalives go first, then answers to cloud
    /// messages, both outside the rate limiter (an answer only if it is covered by a delivered
    /// message); module data, and answers beyond what was delivered, wait for a token (then
    /// [`Timer::RateLimit`] is armed).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(transmit) = self.keepalives.pop_front() {
            return Some(transmit);
        }
        let State::Connected {
            generation,
            upstream_ack,
            ..
        } = self.state
        else {
            return None;
        };
        if let Some(&(_, credited)) = self.answers.front() {
            if !credited && let Err(at) = self.bucket.try_take(now) {
                self.timers.set(Timer::RateLimit, at);
                return None;
            }
            let (message, _) = self.answers.pop_front()?;
            self.stats.answers_sent += 1;
            if !credited {
                self.stats.answers_rate_limited += 1;
            }
            return Some(Transmit {
                generation,
                message,
                kind: TransmitKind::Answer,
            });
        }
        if self.upstream.is_empty() {
            return None;
        }
        match self.bucket.try_take(now) {
            Ok(()) => {
                let message = self.upstream.pop_front()?;
                let acknowledged = upstream_ack && message.upstream_class() == UpstreamClass::Data;
                if acknowledged {
                    self.in_flight.insert(message.header.id.clone());
                }
                self.stats.upstream_sent += 1;
                Some(Transmit {
                    generation,
                    message,
                    kind: TransmitKind::Upstream {
                        forget_after_write: !acknowledged,
                    },
                })
            }
            Err(at) => {
                self.timers.set(Timer::RateLimit, at);
                None
            }
        }
    }

    /// When `handle_timeout` must be called next (kind D).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_timeout()
    }

    /// The next I/O action for the driver (kind D).
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event for the bus or the log (kind D).
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Where the session is in its cycle.
    pub fn state(&self) -> SessionState {
        match self.state {
            State::Connecting { generation } => SessionState::Connecting(generation),
            State::Connected { generation, .. } => SessionState::Connected(generation),
            State::Waiting => SessionState::Waiting,
            State::Stopped => SessionState::Stopped,
        }
    }

    /// The generation of the established connection, if one is up.
    pub fn connected_generation(&self) -> Option<Generation> {
        match self.state {
            State::Connected { generation, .. } => Some(generation),
            _ => None,
        }
    }

    /// How many more upstream messages [`EdgeSession::queue_upstream`] accepts now.
    pub fn upstream_capacity(&self) -> usize {
        match self.state {
            State::Connected { .. } => self
                .config
                .upstream_window
                .saturating_sub(self.upstream.len() + self.in_flight.len()),
            _ => 0,
        }
    }

    /// Upstream messages written and not yet acknowledged by the cloud.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Consecutive failed connect attempts.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The deadline of one timer (for tests and diagnostics).
    pub fn timer(&self, timer: Timer) -> Option<Instant> {
        self.timers.get(timer)
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn start_attempt(&mut self) {
        self.generation = self.generation.next();
        self.state = State::Connecting {
            generation: self.generation,
        };
        self.stats.connect_attempts += 1;
        self.actions.push_back(Action::Connect {
            generation: self.generation,
        });
    }

    fn on_connected(&mut self, now: Instant, generation: Generation, upstream_ack: bool) {
        match self.state {
            State::Connecting {
                generation: current,
            } if current == generation => {}
            _ => {
                // A connection we no longer want (we shut down or moved on): close it unseen.
                self.stats.stale_events += 1;
                self.actions.push_back(Action::Close {
                    generation,
                    reason: DisconnectReason::Requested("stale connection".into()),
                });
                return;
            }
        }
        self.state = State::Connected {
            generation,
            since: now,
            upstream_ack,
        };
        self.last_connect_fault = None;
        self.stats.connects += 1;
        self.last_heard = now;
        self.bucket = TokenBucket::new(self.config.message_qps, self.config.message_burst, now);
        self.events.push_back(SessionEvent::Connected {
            generation,
            upstream_ack,
        });
        self.publish_connection(true);
        // Keepalive right after connect, then every heartbeat (B§6.1).
        self.queue_keepalive(generation);
        self.timers
            .set(Timer::Heartbeat, now + self.config.heartbeat);
        if let Some(dead_after) = self.config.dead_after {
            self.timers.set(Timer::ReadDeadline, now + dead_after);
        }
    }

    fn on_connect_failed(&mut self, now: Instant, generation: Generation, fault: Fault) {
        match self.state {
            State::Connecting {
                generation: current,
            } if current == generation => {}
            _ => {
                self.stats.stale_events += 1;
                return;
            }
        }
        self.stats.connect_failures += 1;
        self.failures = self.failures.saturating_add(1);
        let delay = if fault.class == FaultClass::Configuration {
            // Retrying soon cannot help until someone fixes it: the longest wait, jittered in
            // its upper half so a fleet with the same mistake does not retry in step.
            let max = self.config.backoff.max.max(self.config.backoff.min);
            max.mul_f64(0.5 + 0.5 * (self.random)().clamp(0.0, 1.0))
        } else {
            self.config.backoff.delay(self.failures, (self.random)())
        };
        let repeated = self.last_connect_fault.as_ref() == Some(&fault);
        self.last_connect_fault = Some(fault.clone());
        self.events.push_back(SessionEvent::ConnectFailed {
            generation,
            fault,
            repeated,
        });
        self.schedule(now, Timer::Backoff, delay);
    }

    fn on_heartbeat(&mut self, now: Instant, deadline: Instant) {
        let Some(generation) = self.connected_generation() else {
            return;
        };
        self.queue_keepalive(generation);
        // Keep the cadence anchored to the schedule, not to when the driver got round to it; if
        // the driver was late by more than a period, start again from now.
        let next = deadline + self.config.heartbeat;
        self.timers.set(
            Timer::Heartbeat,
            if next > now {
                next
            } else {
                now + self.config.heartbeat
            },
        );
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        if let Some(dead_after) = self.config.dead_after {
            self.timers.set(Timer::ReadDeadline, now + dead_after);
        }
    }

    /// Stops the current connection exactly once and schedules the next attempt.
    fn disconnect(&mut self, now: Instant, reason: DisconnectReason) {
        let State::Connected {
            generation, since, ..
        } = self.state
        else {
            return;
        };
        let retry = match &reason {
            DisconnectReason::ClosedByCloud { code, .. } => code.retry(),
            _ => Retry::Normal,
        };
        self.stop_connection(generation, reason);
        let lasted = now.saturating_duration_since(since);
        let fixed =
            self.config.reconnect_wait + self.config.reconnect_jitter.mul_f64((self.random)());
        let wait = if retry == Retry::Longest {
            // Something outside this edge must change (another instance holds the node id, the
            // identity is refused): retrying sooner would only take the session back and forth.
            self.failures = self.failures.saturating_add(1);
            self.config.backoff.max.max(fixed)
        } else if lasted >= self.config.stable_after && retry == Retry::Normal {
            self.failures = 0;
            fixed
        } else {
            // It failed as good as a connect attempt: keep backing off, never below the fixed wait.
            self.failures = self.failures.saturating_add(1);
            let delay = self.config.backoff.delay(self.failures, (self.random)());
            delay.max(fixed)
        };
        self.schedule(now, Timer::ReconnectWait, wait);
    }

    fn stop_connection(&mut self, generation: Generation, reason: DisconnectReason) {
        self.stats.disconnects += 1;
        for timer in [Timer::Heartbeat, Timer::ReadDeadline, Timer::RateLimit] {
            self.timers.stop(timer);
        }
        // Unsent and unacknowledged messages stay in the outbox and are offered again on the
        // next connection, under the same ids.
        self.keepalives.clear();
        // Answers owed to this connection's messages are owed again when the cloud resends them.
        self.stats.answers_dropped += self.answers.len() as u64;
        self.answers.clear();
        self.answer_credit = 0;
        self.upstream.clear();
        self.in_flight.clear();
        self.actions.push_back(Action::Close {
            generation,
            reason: reason.clone(),
        });
        self.events
            .push_back(SessionEvent::Disconnected { generation, reason });
        self.publish_connection(false);
    }

    fn schedule(&mut self, now: Instant, timer: Timer, after: Duration) {
        self.state = State::Waiting;
        self.timers.set(timer, now + after);
        self.events.push_back(SessionEvent::ReconnectScheduled {
            generation: self.generation.next(),
            after,
            failures: self.failures,
        });
    }

    fn shutdown(&mut self) {
        if let State::Connected { generation, .. } = self.state {
            self.stop_connection(generation, DisconnectReason::Shutdown);
        } else if let State::Connecting { generation } = self.state {
            self.actions.push_back(Action::Close {
                generation,
                reason: DisconnectReason::Shutdown,
            });
        }
        self.state = State::Stopped;
        self.timers = TimerTable::default();
    }

    fn queue_keepalive(&mut self, generation: Generation) {
        let message = Message::with_header((self.config.new_id)(), "", (self.config.wall_millis)())
            .route(
                MODULE_EDGEHUB,
                GROUP_RESOURCE,
                KEEPALIVE_RESOURCE,
                OP_KEEPALIVE,
            )
            .content(Content::text(KEEPALIVE_CONTENT));
        self.stats.keepalives_sent += 1;
        self.keepalives.push_back(Transmit {
            generation,
            message,
            kind: TransmitKind::Keepalive,
        });
    }

    fn publish_connection(&mut self, connected: bool) {
        for group in CONNECTION_EVENT_GROUPS {
            let message = route::connection_event(
                group,
                connected,
                (self.config.new_id)(),
                (self.config.wall_millis)(),
            );
            self.events
                .push_back(SessionEvent::Publish { group, message });
        }
    }
}

impl fmt::Debug for EdgeSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeSession")
            .field("state", &self.state)
            .field("generation", &self.generation)
            .field("timers", &self.timers)
            .field("failures", &self.failures)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
