//! The async driver: the thin tokio loop around [`EdgeSession`], shaped like quinn's
//! `ConnectionDriver`. One hub task owns the session and the outbox; each turn it feeds in what
//! happened (a message or failure from the connection, a dial outcome, a message from a module,
//! a timer expiry), drains `poll_transmit` into the connection's writer, re-arms its one sleep to
//! `poll_timeout`, performs `poll_action` (dial, close, forget) and forwards `poll_event` to the
//! bus.
//!
//! Each connection gets exactly two tasks, a reader and a writer, tagged with the connection's
//! [`Generation`]. Closing a connection aborts both and waits for them (and for a bounded graceful
//! close) in a closer task, and the next dial starts only after every closer has finished, so no
//! task of an old connection outlives it or touches its successor (W10).
//!
//! Back-pressure instead of drops everywhere: the reader waits when the hub is behind (the
//! transport then stops reading the socket and the cloud is throttled), the hub stops reading
//! the connection while the bus is slow, and modules wait on EdgeHub's inbox while the outbox is
//! full.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use beehive::{Bus, GroupSendError, ModuleContext};
use proto::{Content, Message};
use transport::{Connection, DialConfig};

use crate::config::EdgeHubConfig;
use crate::outbox::{Downstream, Outbox, PushError, Seq};
use session::edge::route::{self, Destination};
use session::edge::{Action, EdgeSession, Event, Generation, SessionEvent, Transmit, TransmitKind};

/// Messages from a connection's reader and writer, and dial outcomes, to the hub task.
const INBOUND_CAPACITY: usize = 256;
/// Transmits queued for a connection's writer.
const WRITER_CAPACITY: usize = 64;
/// Cloud messages queued for delivery on the bus.
const DELIVERY_CAPACITY: usize = 1024;
/// Most module messages stored in one outbox transaction (one fsync).
const UPSTREAM_BATCH: usize = 256;

/// Counters of one EdgeHub, readable while it runs ([`crate::EdgeHub::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    connects: AtomicU64,
    disconnects: AtomicU64,
    connect_failures: AtomicU64,
    upstream_stored: AtomicU64,
    upstream_acked: AtomicU64,
    upstream_refused: AtomicU64,
    answers_queued: AtomicU64,
    downstream_delivered: AtomicU64,
    downstream_duplicates: AtomicU64,
    downstream_undeliverable: AtomicU64,
    keepalives_sent: AtomicU64,
    link: std::sync::Mutex<LinkStatus>,
}

/// The state of the link to the cloud, for status endpoints: whether it is up, and the last
/// failure (a refused dial, a lost connection), so "disconnected" can say why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStatus {
    /// A connection to the cloud is established.
    pub connected: bool,
    /// The most recent connect failure or disconnect reason, if any happened.
    pub last_error: Option<String>,
}

/// A snapshot of EdgeHub's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Connections established.
    pub connects: u64,
    /// Connections lost or closed.
    pub disconnects: u64,
    /// Connect attempts that failed.
    pub connect_failures: u64,
    /// Module messages stored in the outbox.
    pub upstream_stored: u64,
    /// Outbox messages deleted after the cloud's acknowledgement (or, with a KubeEdge cloud,
    /// after being written).
    pub upstream_acked: u64,
    /// Module messages refused because they can never fit the outbox.
    pub upstream_refused: u64,
    /// Answers to cloud messages (ACKs) from modules, recorded as answered and queued for the
    /// cloud; they are never stored in the outbox (PROTOCOL.md Part A item 7).
    pub answers_queued: u64,
    /// Cloud messages handed to the bus.
    pub downstream_delivered: u64,
    /// Cloud resends recognised and not delivered again.
    pub downstream_duplicates: u64,
    /// Cloud messages no module could take (no handler, no such group or module): logged.
    pub downstream_undeliverable: u64,
    /// Keepalives written.
    pub keepalives_sent: u64,
}

impl Counters {
    pub(crate) fn link(&self) -> LinkStatus {
        self.link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_link(&self, connected: bool, error: Option<String>) {
        let mut link = self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        link.connected = connected;
        if error.is_some() {
            link.last_error = error;
        }
    }

    pub(crate) fn snapshot(&self) -> HubStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HubStats {
            connects: get(&self.connects),
            disconnects: get(&self.disconnects),
            connect_failures: get(&self.connect_failures),
            upstream_stored: get(&self.upstream_stored),
            upstream_acked: get(&self.upstream_acked),
            upstream_refused: get(&self.upstream_refused),
            answers_queued: get(&self.answers_queued),
            downstream_delivered: get(&self.downstream_delivered),
            downstream_duplicates: get(&self.downstream_duplicates),
            downstream_undeliverable: get(&self.downstream_undeliverable),
            keepalives_sent: get(&self.keepalives_sent),
        }
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What the hub task hears from its helper tasks.
// Messages are nearly all of the traffic; boxing them to shrink the rare variants would add an
// allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Inbound {
    /// A dial finished.
    Dialed {
        generation: Generation,
        result: Result<Box<dyn Connection>, String>,
    },
    /// The connection received a message.
    Message(Generation, Message),
    /// The connection failed (or the peer closed it).
    Failed(Generation, String),
    /// A message the session said to forget once written was written.
    Written { id: String },
}

/// A cloud message or connection event for the delivery task.
enum Delivery {
    Publish {
        group: &'static str,
        message: Message,
    },
    Deliver {
        destination: Destination,
        message: Message,
    },
}

/// The tasks of one established connection.
struct Link {
    generation: Generation,
    conn: Arc<dyn Connection>,
    writer_tx: mpsc::Sender<Transmit>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

/// Runs EdgeHub until shutdown: the hub task. `reconnect` forces a reconnect (certificate renewal).
pub(crate) async fn run(
    config: EdgeHubConfig,
    mut ctx: ModuleContext,
    counters: Arc<Counters>,
    reconnect: Arc<Notify>,
) -> Result<(), crate::StartError> {
    let outbox = Outbox::open(config.outbox_config())?;
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let session = EdgeSession::with_seed(config.session_config(), now(), seed);
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_CAPACITY);
    let delivery = tokio::spawn(deliver_loop(
        ctx.bus().clone(),
        delivery_rx,
        counters.clone(),
    ));
    let usage = outbox.usage();
    info!(
        node = %config.controller.node_id,
        protocol = %config.controller.protocol,
        server = config.endpoint().server.as_str(),
        outbox_messages = usage.messages,
        "edgehub starting"
    );
    let mut hub = Hub {
        config,
        session,
        outbox,
        counters,
        inbound_tx,
        delivery_tx,
        link: None,
        closing: Vec::new(),
        dialing: None,
        cursor: Seq::default(),
        outbox_dirty: true,
        upstream_batch: VecDeque::new(),
        full_warned: false,
        store_error_logged: false,
        deliveries: VecDeque::new(),
        writer_blocked: false,
        forgets: Vec::new(),
        last_upstream_ack: None,
    };
    hub.run(&mut ctx, inbound_rx, &reconnect).await;
    hub.stop(&mut ctx).await;
    drop(hub);
    // The delivery task ends once the hub's sender is gone and its queue is drained; bound the
    // wait, since modules are stopping too.
    let _ = tokio::time::timeout(Duration::from_secs(2), delivery).await;
    Ok(())
}

struct Hub {
    config: EdgeHubConfig,
    session: EdgeSession,
    outbox: Outbox,
    counters: Arc<Counters>,
    inbound_tx: mpsc::Sender<Inbound>,
    delivery_tx: mpsc::Sender<Delivery>,
    link: Option<Link>,
    /// Closers of ended connections; the next dial waits for all of them.
    closing: Vec<JoinHandle<()>>,
    /// The dial in progress.
    dialing: Option<JoinHandle<()>>,
    /// The last outbox row offered to the current connection.
    cursor: Seq,
    /// The outbox may hold rows after `cursor` that the session could take.
    outbox_dirty: bool,
    /// Module messages taken from the inbox and not yet stored (the outbox is full).
    upstream_batch: VecDeque<Message>,
    /// A full outbox was reported (logged once per episode).
    full_warned: bool,
    /// A storage error was reported (logged once per episode).
    store_error_logged: bool,
    /// Cloud messages waiting for room in the delivery queue.
    deliveries: VecDeque<Delivery>,
    /// The writer's queue was full; wait for room before polling more transmits.
    writer_blocked: bool,
    /// Outbox ids to delete after this turn.
    forgets: Vec<String>,
    /// Whether the current connection acknowledges upstream messages (for the log line).
    last_upstream_ack: Option<bool>,
}

impl Hub {
    async fn run(
        &mut self,
        ctx: &mut ModuleContext,
        mut inbound_rx: mpsc::Receiver<Inbound>,
        reconnect: &Notify,
    ) {
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        let shutdown = ctx.shutdown_signal();
        loop {
            self.turn(ctx.bus());
            let deadline = self
                .session
                .poll_timeout()
                .map_or_else(far, tokio::time::Instant::from_std);
            sleep.as_mut().reset(deadline);
            let writer_tx = self.link.as_ref().map(|l| l.writer_tx.clone());
            let writer_wait = self.writer_blocked && writer_tx.is_some();
            let accept_upstream = self.upstream_batch.is_empty();
            tokio::select! {
                biased;
                () = shutdown.triggered() => return,
                permit = reserve(self.delivery_tx.clone()), if !self.deliveries.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(d) = self.deliveries.pop_front() {
                                permit.send(d);
                            }
                        }
                        Err(_) => {
                            // The delivery task is gone (it only ends when it panicked): these
                            // messages cannot reach the bus; say so rather than spin.
                            bump(&self.counters.downstream_undeliverable, self.deliveries.len() as u64);
                            error!(lost = self.deliveries.len(), "bus delivery task ended");
                            self.deliveries.clear();
                        }
                    }
                }
                Some(inbound) = inbound_rx.recv(), if self.deliveries.is_empty() => {
                    self.on_inbound(inbound);
                }
                permit = reserve_opt(writer_tx), if writer_wait => {
                    self.writer_blocked = false;
                    if let Some(permit) = permit
                        && let Some(transmit) = self.session.poll_transmit(now())
                    {
                        self.count_transmit(&transmit);
                        permit.send(transmit);
                    }
                }
                msg = ctx.recv(), if accept_upstream => {
                    let Some(msg) = msg else { return };
                    self.upstream_batch.push_back(msg);
                    while self.upstream_batch.len() < UPSTREAM_BATCH {
                        let Some(more) = ctx.try_recv() else { break };
                        self.upstream_batch.push_back(more);
                    }
                    self.store_upstream(ctx.bus());
                }
                () = reconnect.notified() => {
                    self.session.handle_event(now(), Event::Reconnect {
                        reason: "certificate renewed".into(),
                    });
                }
                () = &mut sleep => self.session.handle_timeout(now()),
            }
        }
    }

    /// One turn of polling: drain the session until it has nothing more to say.
    fn turn(&mut self, bus: &Bus) {
        if !self.upstream_batch.is_empty() {
            self.store_upstream(bus);
        }
        loop {
            let mut progress = self.feed_upstream();
            progress |= self.pump_transmits();
            while let Some(action) = self.session.poll_action() {
                progress = true;
                self.on_action(action);
            }
            while let Some(event) = self.session.poll_event() {
                progress = true;
                self.on_event(event);
            }
            self.flush_deliveries();
            if !self.forgets.is_empty() {
                let ids = std::mem::take(&mut self.forgets);
                match self.outbox.remove_many(ids.iter().map(String::as_str)) {
                    Ok(removed) => {
                        bump(&self.counters.upstream_acked, removed as u64);
                        self.outbox_dirty = true;
                        if !self.upstream_batch.is_empty() {
                            self.store_upstream(bus);
                        }
                    }
                    // The rows stay and are sent again later; the cloud deduplicates them.
                    Err(e) => error!(error = %e, "outbox: could not delete acknowledged messages"),
                }
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }

    /// Offers outbox rows after the cursor to the session while it has room.
    fn feed_upstream(&mut self) -> bool {
        let mut progress = false;
        while self.outbox_dirty && self.session.connected_generation().is_some() {
            let room = self.session.upstream_capacity();
            if room == 0 {
                break;
            }
            let rows = match self.outbox.pending_after(self.cursor, room) {
                Ok((rows, 0)) => rows,
                Ok((rows, damaged)) => {
                    error!(damaged, "outbox: discarded rows that no longer decode");
                    rows
                }
                Err(e) => {
                    error!(error = %e, "outbox: could not read pending messages");
                    self.outbox_dirty = false;
                    break;
                }
            };
            if rows.len() < room {
                self.outbox_dirty = false;
            }
            for row in rows {
                match self.session.queue_upstream(row.message) {
                    Ok(()) => self.cursor = row.seq,
                    // Not connected or the window is full: offered again later.
                    Err(_) => {
                        self.outbox_dirty = true;
                        return progress;
                    }
                }
                progress = true;
            }
        }
        progress
    }

    /// Moves transmits into the writer's queue while it has room.
    fn pump_transmits(&mut self) -> bool {
        let mut progress = false;
        let Some(link) = &self.link else {
            // Nothing to write to: transmits of a connection being closed are dropped by the
            // session itself; this only drains strays.
            while self.session.poll_transmit(now()).is_some() {}
            return false;
        };
        let writer_tx = link.writer_tx.clone();
        loop {
            let permit = match writer_tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => {
                    self.writer_blocked = true;
                    return progress;
                }
                // The writer ended; its failure report is on its way.
                Err(mpsc::error::TrySendError::Closed(())) => return progress,
            };
            let Some(transmit) = self.session.poll_transmit(now()) else {
                return progress;
            };
            self.count_transmit(&transmit);
            permit.send(transmit);
            progress = true;
        }
    }

    fn count_transmit(&self, transmit: &Transmit) {
        if transmit.kind == TransmitKind::Keepalive {
            bump(&self.counters.keepalives_sent, 1);
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let now = now();
        match inbound {
            Inbound::Dialed { generation, result } => self.on_dialed(now, generation, result),
            Inbound::Message(generation, message) => {
                self.session.handle_message(now, generation, message);
            }
            Inbound::Failed(generation, reason) => {
                self.session
                    .handle_event(now, Event::Failed { generation, reason });
            }
            Inbound::Written { id } => self.forgets.push(id),
        }
    }

    fn on_dialed(
        &mut self,
        now: Instant,
        generation: Generation,
        result: Result<Box<dyn Connection>, String>,
    ) {
        self.dialing = None;
        match result {
            Ok(conn) => {
                let conn: Arc<dyn Connection> = Arc::from(conn);
                let upstream_ack = conn.peer().capabilities.upstream_ack;
                if self.session.state() == session::edge::SessionState::Connecting(generation) {
                    self.link = Some(self.spawn_link(generation, conn));
                    self.cursor = Seq::default();
                    self.outbox_dirty = true;
                    self.last_upstream_ack = Some(upstream_ack);
                } else {
                    // Not wanted any more: the session closes it via `on_action` below.
                    self.closing.push(spawn_closer(
                        None,
                        conn,
                        "stale connection".into(),
                        self.write_deadline(),
                    ));
                }
                self.session.handle_event(
                    now,
                    Event::Connected {
                        generation,
                        upstream_ack,
                    },
                );
            }
            Err(reason) => {
                self.session
                    .handle_event(now, Event::ConnectFailed { generation, reason });
            }
        }
    }

    fn spawn_link(&self, generation: Generation, conn: Arc<dyn Connection>) -> Link {
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_CAPACITY);
        let reader = tokio::spawn(read_loop(generation, conn.clone(), self.inbound_tx.clone()));
        let writer = tokio::spawn(write_loop(
            generation,
            conn.clone(),
            writer_rx,
            self.inbound_tx.clone(),
        ));
        Link {
            generation,
            conn,
            writer_tx,
            reader,
            writer,
        }
    }

    fn on_action(&mut self, action: Action) {
        match action {
            Action::Connect { generation } => {
                let closers = std::mem::take(&mut self.closing);
                let dial = self.dial_config();
                let protocol = self.config.controller.protocol;
                let tx = self.inbound_tx.clone();
                info!(generation = generation.get(), protocol = %protocol, "connecting to the cloud");
                self.dialing = Some(tokio::spawn(async move {
                    // Every task of the previous connection has ended before we dial again.
                    for closer in closers {
                        let _ = closer.await;
                    }
                    let result = match dial {
                        Ok(dial) => transport::connect(protocol, &dial)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    };
                    let _ = tx.send(Inbound::Dialed { generation, result }).await;
                }));
            }
            Action::Close { generation, reason } => {
                if let Some(link) = self.link.take_if(|l| l.generation == generation) {
                    self.writer_blocked = false;
                    let deadline = self.write_deadline();
                    self.closing.push(spawn_closer(
                        Some((link.reader, link.writer)),
                        link.conn,
                        reason.to_string(),
                        deadline,
                    ));
                }
            }
            Action::Forget { id } => self.forgets.push(id),
        }
    }

    fn on_event(&mut self, event: SessionEvent) {
        let protocol = self.config.controller.protocol;
        match event {
            SessionEvent::Connected {
                generation,
                upstream_ack,
            } => {
                bump(&self.counters.connects, 1);
                self.counters.set_link(true, None);
                info!(
                    generation = generation.get(),
                    %protocol,
                    server = self.config.endpoint().server.as_str(),
                    upstream_ack,
                    "connected to the cloud"
                );
                if !upstream_ack {
                    warn!(
                        generation = generation.get(),
                        "cloud does not acknowledge upstream messages (a KubeEdge cloud): messages \
                         leave the outbox once written, as KubeEdge does"
                    );
                }
            }
            SessionEvent::Disconnected { generation, reason } => {
                bump(&self.counters.disconnects, 1);
                self.counters.set_link(false, Some(reason.to_string()));
                warn!(generation = generation.get(), %reason, "disconnected from the cloud");
            }
            SessionEvent::ConnectFailed { generation, reason } => {
                bump(&self.counters.connect_failures, 1);
                self.counters.set_link(false, Some(reason.clone()));
                warn!(generation = generation.get(), %reason, "connect attempt failed");
            }
            SessionEvent::ReconnectScheduled {
                generation,
                after,
                failures,
            } => {
                info!(
                    next_generation = generation.get(),
                    after_ms = after.as_millis() as u64,
                    failures,
                    "reconnect attempt scheduled"
                );
            }
            SessionEvent::Publish { group, message } => {
                self.deliveries
                    .push_back(Delivery::Publish { group, message });
            }
            SessionEvent::Deliver {
                destination,
                message,
            } => self.on_deliver(destination, message),
            SessionEvent::Unroutable { reason, message } => {
                bump(&self.counters.downstream_undeliverable, 1);
                warn!(
                    id = message.header.id,
                    group = message.route.group,
                    source = message.route.source,
                    ?reason,
                    "cloud message matches no edge handler; not delivered"
                );
            }
        }
    }

    fn on_deliver(&mut self, destination: Destination, message: Message) {
        match self.outbox.check_downstream(now(), &message) {
            Ok(Downstream::Deliver) => {
                self.deliveries.push_back(Delivery::Deliver {
                    destination,
                    message,
                });
            }
            Ok(Downstream::AnsweredDuplicate) => {
                bump(&self.counters.downstream_duplicates, 1);
                debug!(
                    id = message.header.id,
                    "cloud resent an answered message: answering again"
                );
                // The ACK contract only reads the operation and the parent id (B§8.5). Already
                // recorded as answered: nothing to store, straight onto the answer lane.
                let ack = Message::response_to(&message, Content::text("OK"));
                self.session.queue_answer(ack);
            }
            Ok(Downstream::PendingDuplicate) => {
                bump(&self.counters.downstream_duplicates, 1);
                debug!(
                    id = message.header.id,
                    "cloud resent a message still being handled"
                );
            }
            Err(e) => {
                // Deliver rather than lose it; the module is idempotent by contract.
                error!(error = %e, "outbox: dedup lookup failed");
                self.deliveries.push_back(Delivery::Deliver {
                    destination,
                    message,
                });
            }
        }
    }

    fn flush_deliveries(&mut self) {
        while let Some(delivery) = self.deliveries.pop_front() {
            match self.delivery_tx.try_send(delivery) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) => {
                    self.deliveries.push_front(d);
                    return;
                }
            }
        }
    }

    /// Stores the pending module messages; on a full outbox (or a storage error) keeps the rest,
    /// and the inbox is not read until they are stored.
    fn store_upstream(&mut self, bus: &Bus) {
        while !self.upstream_batch.is_empty() {
            match self.outbox.push_batch(&mut self.upstream_batch) {
                Ok(outcome) => {
                    let answers = outcome.answers.len();
                    bump(
                        &self.counters.upstream_stored,
                        (outcome.accepted - answers) as u64,
                    );
                    bump(&self.counters.answers_queued, answers as u64);
                    for answer in outcome.answers {
                        self.session.queue_answer(answer);
                    }
                    if outcome.accepted > answers {
                        self.outbox_dirty = true;
                    }
                    if outcome.full {
                        if !self.full_warned {
                            warn!(
                                usage = ?self.outbox.usage(),
                                "outbox full: modules wait until the cloud acknowledges messages"
                            );
                            self.full_warned = true;
                        }
                        return;
                    }
                }
                Err(PushError::TooLarge { size, max }) => {
                    let Some(msg) = self.upstream_batch.pop_front() else {
                        continue;
                    };
                    bump(&self.counters.upstream_refused, 1);
                    error!(
                        id = msg.header.id,
                        size, max, "message larger than the outbox; refused"
                    );
                    if msg.header.sync {
                        let text = format!("message of {size} bytes exceeds the outbox ({max})");
                        let _ = bus.send_resp(Message::error_for(&msg, text));
                    }
                }
                Err(e) => {
                    if !self.store_error_logged {
                        error!(error = %e, "outbox: could not store module messages; will retry");
                        self.store_error_logged = true;
                    }
                    return;
                }
            }
        }
        if self.full_warned {
            info!("outbox has room again");
        }
        self.full_warned = false;
        self.store_error_logged = false;
    }

    /// Ends the session at shutdown: close the link, keep what modules still had queued.
    async fn stop(&mut self, ctx: &mut ModuleContext) {
        self.session.handle_event(now(), Event::Shutdown);
        while let Some(msg) = ctx.try_recv() {
            self.upstream_batch.push_back(msg);
        }
        self.store_upstream(ctx.bus());
        if !self.upstream_batch.is_empty() {
            error!(
                lost = self.upstream_batch.len(),
                "shutting down with module messages the full outbox could not take"
            );
        }
        self.turn(ctx.bus());
        if let Some(dial) = self.dialing.take() {
            dial.abort();
        }
        let closers = std::mem::take(&mut self.closing);
        // Within the hive's shutdown grace: a close the cloud does not confirm by then is
        // abandoned (dropping the connection aborts it).
        let bound = self.write_deadline().min(Duration::from_secs(5));
        for closer in closers {
            let _ = tokio::time::timeout(bound, closer).await;
        }
        info!("edgehub stopped");
    }

    fn dial_config(&self) -> Result<DialConfig, String> {
        let tls = &self.config.tls;
        let identity = certs::Identity::load(&tls.cert_file, &tls.key_file)
            .map_err(|e| format!("loading the node certificate: {e}"))?;
        let anchors = certs::TrustAnchors::load(&tls.ca_file)
            .map_err(|e| format!("loading the CA certificate: {e}"))?;
        let mut dial = DialConfig::new(
            self.config.endpoint().server.as_str(),
            self.config.controller.node_id.clone(),
            identity,
            anchors,
        );
        dial.project_id = self.config.controller.project_id.as_str().to_owned();
        dial.link = self.config.link_config();
        Ok(dial)
    }

    fn write_deadline(&self) -> Duration {
        self.config.endpoint().write_deadline.duration()
    }
}

/// Receives from the connection until it fails; every message and the final failure go to the
/// hub tagged with the connection's generation.
async fn read_loop(generation: Generation, conn: Arc<dyn Connection>, tx: mpsc::Sender<Inbound>) {
    loop {
        let inbound = match conn.recv().await {
            Ok(Some(message)) => Inbound::Message(generation, message),
            Ok(None) => Inbound::Failed(generation, "the cloud closed the connection".into()),
            Err(e) => Inbound::Failed(generation, e.to_string()),
        };
        let last = matches!(inbound, Inbound::Failed(..));
        if tx.send(inbound).await.is_err() || last {
            return;
        }
    }
}

/// Writes transmits in order until the queue closes or a write fails.
async fn write_loop(
    generation: Generation,
    conn: Arc<dyn Connection>,
    mut rx: mpsc::Receiver<Transmit>,
    tx: mpsc::Sender<Inbound>,
) {
    while let Some(transmit) = rx.recv().await {
        if transmit.generation != generation {
            continue;
        }
        let id = transmit.message.header.id.clone();
        match conn.send(transmit.message).await {
            Ok(()) => {
                if let TransmitKind::Upstream {
                    forget_after_write: true,
                } = transmit.kind
                {
                    let _ = tx.send(Inbound::Written { id }).await;
                }
            }
            Err(e) => {
                let _ = tx.send(Inbound::Failed(generation, e.to_string())).await;
                return;
            }
        }
    }
}

/// Ends a connection's tasks, then closes it gracefully within `deadline`.
fn spawn_closer(
    tasks: Option<(JoinHandle<()>, JoinHandle<()>)>,
    conn: Arc<dyn Connection>,
    reason: String,
    deadline: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Some((reader, writer)) = tasks {
            reader.abort();
            writer.abort();
            let _ = reader.await;
            let _ = writer.await;
        }
        match tokio::time::timeout(deadline, conn.close(&reason)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "closing the old connection"),
            Err(_) => debug!("closing the old connection timed out; dropped"),
        }
    })
}

/// Hands cloud messages and connection events to the bus, in order, waiting while a module's
/// inbox is full (the hub stops reading the connection meanwhile).
async fn deliver_loop(bus: Bus, mut rx: mpsc::Receiver<Delivery>, counters: Arc<Counters>) {
    while let Some(delivery) = rx.recv().await {
        match delivery {
            Delivery::Publish { group, message } => {
                if let Err(e) = bus.send_to_group(group, message).await {
                    // Most edges run only some of KubeEdge's modules; an empty group is normal.
                    debug!(group, error = %e, "connection event not delivered");
                }
            }
            Delivery::Deliver {
                destination,
                message,
            } => {
                deliver(&bus, destination, message, &counters).await;
            }
        }
    }
}

async fn deliver(bus: &Bus, destination: Destination, message: Message, counters: &Counters) {
    let id = message.header.id.clone();
    let result = match destination {
        Destination::Response => match bus.send_resp(message).into_undelivered() {
            None => Ok(()),
            // Nobody waits for it (any more): route it as an ordinary message.
            Some(message) => match route::route_without_waiter(&message) {
                Some(Destination::Group(group)) => group_send(bus, group, message).await,
                Some(Destination::Module(module)) => {
                    bus.send(module, message).await.map_err(|e| e.to_string())
                }
                _ => Err("a response nobody waits for".to_owned()),
            },
        },
        Destination::Group(group) => group_send(bus, group, message).await,
        Destination::Module(module) => bus.send(module, message).await.map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => bump(&counters.downstream_delivered, 1),
        Err(reason) => {
            bump(&counters.downstream_undeliverable, 1);
            warn!(id, ?destination, reason, "cloud message not delivered");
        }
    }
}

async fn group_send(bus: &Bus, group: &str, message: Message) -> Result<(), String> {
    match bus.send_to_group(group, message).await {
        Ok(_) => Ok(()),
        Err(e @ GroupSendError::MembersStopped { delivered, .. }) if delivered > 0 => {
            debug!(error = %e, "some group members have stopped");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn reserve<T>(
    tx: mpsc::Sender<T>,
) -> Result<mpsc::OwnedPermit<T>, mpsc::error::SendError<()>> {
    tx.reserve_owned().await
}

async fn reserve_opt<T>(tx: Option<mpsc::Sender<T>>) -> Option<mpsc::OwnedPermit<T>> {
    match tx {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => None,
    }
}

/// The current monotonic time, through tokio's clock so paused-time tests control it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
