//! EdgeHub's counters, link status and storage state, readable while it runs
//! ([`crate::EdgeHubModule::stats`], [`crate::StatsHandle`]); the receipts of module messages whose
//! senders wait to hear they were stored ([`Receipt`]); and the one place that turns the
//! session's link events into counts and log lines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use proto::FaultClass;
use proto::close::Retry;
use session::edge::{DisconnectReason, SessionEvent, TransmitKind};
use transport::Protocol;

/// Counters of one EdgeHub, readable while it runs ([`crate::EdgeHubModule::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connects: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) upstream_stored: AtomicU64,
    pub(crate) upstream_acked: AtomicU64,
    pub(crate) upstream_refused: AtomicU64,
    pub(crate) answers_queued: AtomicU64,
    pub(crate) downstream_delivered: AtomicU64,
    pub(crate) downstream_duplicates: AtomicU64,
    pub(crate) downstream_undeliverable: AtomicU64,
    pub(crate) keepalives_sent: AtomicU64,
    pub(crate) protocol_switches: AtomicU64,
    link: Mutex<LinkStatus>,
    storage: Mutex<Option<StorageProblem>>,
    /// Who waits to hear what became of a module message, by message id.
    receipts: Mutex<HashMap<String, Vec<oneshot::Sender<Receipt>>>>,
}

/// Why the outbox cannot store right now, for status endpoints and for refusing new messages at
/// the door (edgecore's local endpoint answers 507 while the disk is full). Cleared once the
/// failed operations succeed again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageProblem {
    /// The disk holding the outbox is full (`SQLITE_FULL`), rather than failing otherwise.
    pub disk_full: bool,
    /// What failed, with SQLite's error.
    pub error: String,
}

/// What became of a module message whose sender waits for it ([`crate::StatsHandle::receipt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Receipt {
    /// Committed to the outbox: it survives a crash of the process (and, with durability
    /// `full`, a power cut), and leaves only once the cloud has it.
    Stored,
    /// Not taken: the outbox holds its maximum (the cloud has been unreachable for long).
    /// Dropped by EdgeHub; retry later.
    OutboxFull,
    /// Not taken: the outbox cannot write (a full disk). Dropped by EdgeHub; retry later.
    StorageFailed(StorageProblem),
    /// Never storable: larger than the outbox's byte limit.
    TooLarge {
        /// Its stored size.
        size: u64,
        /// The limit.
        max: u64,
    },
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
    /// The protocol of the connection in use (or the next dial's, while down).
    pub protocol: Option<Protocol>,
    /// The edge is on the other protocol than the configured one (`controller.fallback`).
    pub fallback: bool,
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
    /// Moves between protocols (`controller.fallback`): to the other one and back.
    pub protocol_switches: u64,
}

impl Counters {
    pub(crate) fn link(&self) -> LinkStatus {
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_link(&self, connected: bool, error: Option<String>) {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        link.connected = connected;
        if error.is_some() {
            link.last_error = error;
        }
    }

    /// Records the protocol in use and whether it is the fallback.
    pub(crate) fn set_protocol(&self, protocol: Protocol, fallback: bool) {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        link.protocol = Some(protocol);
        link.fallback = fallback;
    }

    /// Counts a protocol move to `to`.
    pub(crate) fn switched(&self, to: Protocol, fallback: bool) {
        bump(&self.protocol_switches, 1);
        self.set_protocol(to, fallback);
    }

    pub(crate) fn storage(&self) -> Option<StorageProblem> {
        self.storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_storage(&self, problem: Option<StorageProblem>) {
        *self.storage.lock().unwrap_or_else(PoisonError::into_inner) = problem;
    }

    /// Registers interest in what becomes of message `id`, before it is handed to EdgeHub.
    pub(crate) fn watch(&self, id: &str) -> oneshot::Receiver<Receipt> {
        let (tx, rx) = oneshot::channel();
        self.receipts().entry(id.to_owned()).or_default().push(tx);
        rx
    }

    /// Forgets the watchers of `id` that gave up (their receivers are gone).
    pub(crate) fn unwatch(&self, id: &str) {
        let mut receipts = self.receipts();
        if let Some(waiters) = receipts.get_mut(id) {
            waiters.retain(|w| !w.is_closed());
            if waiters.is_empty() {
                receipts.remove(id);
            }
        }
    }

    /// Tells everyone waiting for `id` what became of it; whether anyone was.
    pub(crate) fn settle(&self, id: &str, receipt: &Receipt) -> bool {
        let Some(waiters) = self.receipts().remove(id) else {
            return false;
        };
        for waiter in waiters {
            let _ = waiter.send(receipt.clone());
        }
        true
    }

    /// Whether anyone waits for a receipt.
    pub(crate) fn watched(&self) -> bool {
        !self.receipts().is_empty()
    }

    fn receipts(&self) -> MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<Receipt>>>> {
        self.receipts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a message handed to the writer.
    pub(crate) fn transmitted(&self, kind: TransmitKind) {
        if kind == TransmitKind::Keepalive {
            bump(&self.keepalives_sent, 1);
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
            protocol_switches: get(&self.protocol_switches),
        }
    }
}

/// Adds `n` to a counter.
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Counts and logs a session event that is not a delivery: a link event (connected,
/// disconnected, a failed attempt, the next attempt scheduled) or an unroutable cloud message.
/// Deliveries and publications are the driver's and ignored here.
pub(crate) fn record_event(
    counters: &Counters,
    protocol: Protocol,
    server: &str,
    event: &SessionEvent,
) {
    match event {
        SessionEvent::Connected {
            generation,
            upstream_ack,
        } => {
            bump(&counters.connects, 1);
            counters.set_link(true, None);
            info!(
                generation = generation.get(),
                %protocol,
                server,
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
            bump(&counters.disconnects, 1);
            counters.set_link(false, Some(reason.to_string()));
            let class = match &reason {
                DisconnectReason::Transport(fault) => fault.class.label(),
                DisconnectReason::ClosedByCloud { code, .. } if code.retry() == Retry::Longest => {
                    FaultClass::Configuration.label()
                }
                DisconnectReason::DeadPeer { .. } | DisconnectReason::ClosedByCloud { .. } => {
                    FaultClass::Network.label()
                }
                _ => "none",
            };
            match &reason {
                DisconnectReason::ClosedByCloud { code, .. } if code.retry() == Retry::Longest => {
                    error!(generation = generation.get(), close = %code.label(), %reason, class,
                        "disconnected from the cloud; waiting the longest backoff before trying \
                         again (another edge with this node id, or a refused identity?)");
                }
                DisconnectReason::ClosedByCloud { code, .. } => {
                    warn!(generation = generation.get(), close = %code.label(), %reason, class,
                        "disconnected from the cloud");
                }
                _ => warn!(generation = generation.get(), %reason, class,
                    "disconnected from the cloud"),
            }
        }
        SessionEvent::ConnectFailed {
            generation,
            fault,
            repeated,
        } => {
            bump(&counters.connect_failures, 1);
            counters.set_link(false, Some(fault.to_string()));
            let generation = generation.get();
            let class = fault.class.label();
            let reason = &fault.reason;
            match fault.class {
                // Said once: it repeats until someone fixes it, and the edge retries slowly.
                FaultClass::Configuration if *repeated => {
                    debug!(generation, class, reason, "connect attempt failed again");
                }
                FaultClass::Configuration => error!(
                    generation,
                    class,
                    reason,
                    "connect attempt failed: fix the configuration; retrying slowly until then"
                ),
                _ => warn!(generation, class, reason, "connect attempt failed"),
            }
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
        SessionEvent::Unroutable { reason, message } => {
            bump(&counters.downstream_undeliverable, 1);
            warn!(
                id = message.header.id,
                group = message.route.group,
                source = message.route.source,
                ?reason,
                "cloud message matches no edge handler; not delivered"
            );
        }
        SessionEvent::Publish { .. } | SessionEvent::Deliver { .. } => {}
    }
}
