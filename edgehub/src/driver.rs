//! The async driver: the thin tokio loop around [`EdgeSession`], shaped like quinn's
//! `ConnectionDriver`. One task owns the session; each turn it feeds in what happened (a message
//! or failure from the connection, a dial outcome, a message from a module, a timer expiry),
//! drains `poll_transmit` into the connection's writer, re-arms its one sleep to
//! `poll_timeout`, performs `poll_action` (dial, close, forget) and forwards `poll_event` to the
//! bus. What it does around that lives beside it: start-up and shutdown (`driver/lifecycle.rs`),
//! the outbox ([`crate::pump`]), the connection's tasks ([`crate::link`]), the bus deliveries
//! ([`crate::deliver`]), the counters ([`crate::stats`]).
//!
//! Back-pressure instead of drops everywhere: the reader waits when the driver is behind (the
//! transport then stops reading the socket and the cloud is throttled), the driver stops reading
//! the connection while the bus is slow, and modules wait on EdgeHub's inbox while the outbox is
//! full.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use beehive::ModuleContext;
use proto::close::SessionCloseCode;
use session::edge::{Action, DisconnectReason, EdgeSession, Event, SessionEvent};

use crate::config::EdgeHubConfig;
use crate::deliver::{Deliveries, Delivery, Refusal};
use crate::fallback::{ProtocolChoice, Switch, SwitchCause};
use crate::link::{self, Inbound, Link};
use crate::outbox::DedupVerdict;
use crate::pump::OutboxPump;
use crate::stats::{self, Counters};

mod lifecycle;

pub(crate) use lifecycle::run;

/// The loop's state: the session and what carries out its actions.
struct Driver {
    config: EdgeHubConfig,
    session: EdgeSession,
    pump: OutboxPump,
    counters: Arc<Counters>,
    inbound_tx: mpsc::Sender<Inbound>,
    deliveries: Deliveries,
    link: Option<Link>,
    /// Closers of ended connections; the next dial waits for all of them.
    closing: Vec<JoinHandle<()>>,
    /// The dial in progress.
    dialing: Option<JoinHandle<()>>,
    /// The writer's queue was full; wait for room before polling more transmits.
    writer_blocked: bool,
    /// Which protocol each dial uses (the fallback's state machine).
    choice: ProtocolChoice,
    /// The protocol of the connection in use (or the last one).
    link_protocol: transport::Protocol,
    /// A probe of the configured protocol in progress (protocol fallback).
    probing: Option<JoinHandle<()>>,
    /// A connection a probe established, waiting for the session's next [`Action::Connect`].
    ready: Option<(transport::Protocol, Box<dyn transport::Connection>)>,
}

impl Driver {
    async fn run(
        &mut self,
        ctx: &mut ModuleContext,
        mut inbound_rx: mpsc::Receiver<Inbound>,
        mut refusals: mpsc::Receiver<Refusal>,
        reconnect: &Notify,
    ) {
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        let probe_sleep = tokio::time::sleep_until(far());
        tokio::pin!(probe_sleep);
        let shutdown = ctx.shutdown_signal();
        loop {
            self.turn(ctx);
            let deadline = self
                .session
                .poll_timeout()
                .map_or_else(far, tokio::time::Instant::from_std);
            sleep.as_mut().reset(deadline);
            let probe_deadline = self.choice.probe_deadline();
            if let Some(due) = probe_deadline {
                probe_sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(due));
            }
            let writer_tx = self.link.as_ref().map(|l| l.writer_tx.clone());
            let writer_wait = self.writer_blocked && writer_tx.is_some();
            let delivering = self.deliveries.is_blocked();
            tokio::select! {
                biased;
                () = shutdown.triggered() => return,
                Some(refusal) = refusals.recv() => {
                    self.session.refuse(&refusal.message, refusal.reason);
                }
                room = self.deliveries.room(), if delivering => self.deliveries.send(room),
                Some(inbound) = inbound_rx.recv(), if !delivering => self.on_inbound(inbound),
                permit = link::writer_room(writer_tx), if writer_wait => {
                    self.writer_blocked = false;
                    if let Some(permit) = permit
                        && let Some(transmit) = self.session.poll_transmit(now())
                    {
                        self.counters.transmitted(transmit.kind);
                        permit.send(transmit);
                    }
                }
                msg = ctx.recv(), if self.pump.accepts() => {
                    let Some(msg) = msg else { return };
                    self.pump.take(msg);
                    while self.pump.batch_has_room() {
                        let Some(more) = ctx.try_recv() else { break };
                        self.pump.take(more);
                    }
                    self.pump.store(&mut self.session, ctx.bus(), &self.counters);
                }
                () = self.pump.retry_due() => {
                    self.pump.retry(&mut self.session, ctx.bus(), &self.counters);
                }
                () = reconnect.notified() => {
                    let reason = "certificate renewed".into();
                    self.session.handle_event(now(), Event::Reconnect { reason });
                }
                () = &mut sleep => self.session.handle_timeout(now()),
                () = &mut probe_sleep, if probe_deadline.is_some() => self.start_probe(),
            }
        }
    }

    /// One turn of polling: drain the session until it has nothing more to say.
    fn turn(&mut self, ctx: &ModuleContext) {
        let bus = ctx.bus();
        if self.pump.wants_store() {
            self.pump.store(&mut self.session, bus, &self.counters);
        }
        loop {
            let mut progress = self.pump.feed(&mut self.session);
            progress |= self.pump_transmits();
            while let Some(action) = self.session.poll_action() {
                progress = true;
                self.on_action(action);
            }
            while let Some(event) = self.session.poll_event() {
                progress = true;
                self.on_event(event);
            }
            self.deliveries.flush();
            progress |= self
                .pump
                .flush_forgets(&mut self.session, bus, &self.counters);
            if !progress {
                break;
            }
        }
    }

    /// Moves transmits into the writer's queue while it has room.
    fn pump_transmits(&mut self) -> bool {
        let Some(link) = &self.link else {
            // Nothing to write to: transmits of a connection being closed are dropped by the
            // session itself; this only drains strays.
            while self.session.poll_transmit(now()).is_some() {}
            return false;
        };
        let (progress, full) = link.fill_writer(&mut self.session, now(), &self.counters);
        self.writer_blocked |= full;
        progress
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let now = now();
        match inbound {
            Inbound::Dialed {
                generation,
                protocol,
                result: Ok(conn),
            } => {
                let conn: Arc<dyn transport::Connection> = Arc::from(conn);
                let upstream_ack = conn.peer().capabilities.upstream_ack;
                let connected = Event::Connected {
                    generation,
                    upstream_ack,
                };
                self.dialing = None;
                self.session.handle_event(now, connected);
                // The session decides whether it still wants this connection; if not (it shut
                // down or moved on), it has asked to close it.
                if self.session.connected_generation() == Some(generation) {
                    self.link = Some(Link::spawn(generation, conn, &self.inbound_tx));
                    self.link_protocol = protocol;
                    self.choice.connected(now, protocol);
                    self.counters
                        .set_protocol(protocol, self.choice.on_fallback());
                    if let Some((_, unused)) = self.ready.take() {
                        self.close_unused(unused, "probe connection not needed");
                    }
                    self.pump.connected();
                } else {
                    let deadline = self.write_deadline();
                    let closer = link::close_unused(conn, "stale connection".into(), deadline);
                    self.closing.push(closer);
                }
            }
            Inbound::Dialed {
                generation,
                protocol,
                result: Err(fault),
            } => {
                self.dialing = None;
                let configuration = fault.class == proto::FaultClass::Configuration;
                if let Some(switch) = self.choice.dial_failed(protocol, configuration) {
                    self.switched(switch, &fault.reason);
                }
                let failed = Event::ConnectFailed { generation, fault };
                self.session.handle_event(now, failed);
            }
            Inbound::Probed { protocol, result } => self.probed(protocol, result),
            Inbound::Message(generation, message) => {
                self.session.handle_message(now, generation, message);
            }
            Inbound::Failed(generation, fault, None) => {
                self.session
                    .handle_event(now, Event::Failed { generation, fault });
            }
            Inbound::Failed(generation, fault, Some(code)) => {
                let closed = Event::ClosedByCloud {
                    generation,
                    code,
                    reason: fault.reason,
                };
                self.session.handle_event(now, closed);
            }
            Inbound::Written { id } => self.pump.forget(id),
        }
    }

    fn on_action(&mut self, action: Action) {
        match action {
            Action::Connect { generation } => {
                let protocol = self.choice.current();
                let closers = std::mem::take(&mut self.closing);
                let tx = self.inbound_tx.clone();
                match self.ready.take() {
                    Some((ready, conn)) if ready == protocol => {
                        info!(generation = generation.get(), %protocol,
                            "connecting to the cloud over the probe's connection");
                        self.dialing = Some(link::adopt(generation, protocol, conn, closers, tx));
                    }
                    unused => {
                        if let Some((_, conn)) = unused {
                            self.close_unused(conn, "probe connection not needed");
                        }
                        info!(generation = generation.get(), %protocol, "connecting to the cloud");
                        let dial = link::dial(generation, protocol, &self.config, closers, tx);
                        self.dialing = Some(dial);
                    }
                }
            }
            Action::Close { generation, reason } => {
                if let Some(link) = self.link.take_if(|l| l.generation == generation) {
                    self.writer_blocked = false;
                    let deadline = self.write_deadline();
                    // An edge going away says so, so the cloud logs a shutdown, not a failure.
                    let code = (reason == DisconnectReason::Shutdown)
                        .then_some(SessionCloseCode::Shutdown);
                    self.closing
                        .push(link.close(code, reason.to_string(), deadline));
                }
            }
            Action::Forget { id } => self.pump.forget(id),
        }
    }

    fn on_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Publish { group, message } => {
                self.deliveries.push(Delivery::Publish { group, message });
            }
            SessionEvent::Deliver {
                destination,
                message,
            } => match self.pump.check_downstream(now(), &message, &self.counters) {
                DedupVerdict::Deliver => self.deliveries.push(Delivery::Deliver {
                    destination,
                    message,
                }),
                DedupVerdict::AnsweredDuplicate => self.session.answer_again(&message),
                // The module will answer the first copy.
                DedupVerdict::PendingDuplicate => {}
            },
            other => {
                if matches!(other, SessionEvent::Disconnected { .. }) {
                    self.choice.disconnected();
                }
                let protocol = match other {
                    SessionEvent::Connected { .. } | SessionEvent::Disconnected { .. } => {
                        self.link_protocol
                    }
                    _ => self.choice.current(),
                };
                let server = self.config.endpoint_for(protocol).server.as_str();
                stats::record_event(&self.counters, protocol, server, &other);
            }
        }
    }

    /// The probe timer fired: try the configured protocol in the background.
    fn start_probe(&mut self) {
        if self.probing.is_some() {
            return;
        }
        if let Some(protocol) = self.choice.poll_probe(now()) {
            info!(%protocol, "probing whether the configured protocol works again");
            let tx = self.inbound_tx.clone();
            self.probing = Some(link::probe(protocol, &self.config, tx));
        }
    }

    /// A probe ended: move back over its connection, or wait for the next.
    fn probed(
        &mut self,
        protocol: transport::Protocol,
        result: Result<Box<dyn transport::Connection>, proto::Fault>,
    ) {
        self.probing = None;
        let now = now();
        let conn = match result {
            Ok(conn) => conn,
            Err(fault) => {
                let connected = self.session.connected_generation().is_some();
                self.choice.probe_failed(now, connected);
                info!(%protocol, reason = %fault.reason, "probe failed; staying on the fallback");
                return;
            }
        };
        let Some(switch) = self.choice.probe_succeeded() else {
            self.close_unused(conn, "probe connection not needed");
            return;
        };
        self.switched(switch, "a probe completed a handshake");
        self.ready = Some((protocol, conn));
        let reason = format!("moving back to {protocol}");
        self.session
            .handle_event(now, Event::ReconnectNow { reason });
        // A session that was connecting carries on with its dial; the probe's connection waits
        // for the next attempt (and is closed if that attempt is over the other protocol).
    }

    /// Logs and counts a protocol move.
    fn switched(&self, switch: Switch, why: &str) {
        let Switch { from, to, cause } = switch;
        self.counters
            .switched(to, to != self.config.controller.protocol);
        match cause {
            SwitchCause::Failures(failures) => warn!(%from, %to, failures, last_error = why,
                "falling back: {failures} connects in a row over {from} failed; using {to}"),
            SwitchCause::ProbeSucceeded => {
                info!(%from, %to, "{to} works again; moving back from {from}");
            }
        }
    }

    fn close_unused(&mut self, conn: Box<dyn transport::Connection>, reason: &str) {
        let deadline = self.write_deadline();
        let closer = link::close_unused(Arc::from(conn), reason.into(), deadline);
        self.closing.push(closer);
    }

    fn write_deadline(&self) -> Duration {
        self.config
            .endpoint_for(self.link_protocol)
            .write_deadline
            .duration()
    }
}

/// The current monotonic time, through tokio's clock so paused-time tests control it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
