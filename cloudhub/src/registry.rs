//! The per-node registry: which node has a live session (one per node id, each admitted
//! connection with a fresh *generation*), who waits for which message's ACK, and how many drivers
//! run. [`crate::Hub`] admits connections into it and reads it for the API; a driver uses only
//! its narrow end: [`Registry::remove_if_current`], [`Registry::notify_ack`],
//! [`Registry::replies`] and [`Registry::driver_done`] (and the ids cancelled for it, in its
//! [`Entry`]).
//!
//! Reconnect safety (fixes KubeEdge's W9): a newer connection of the same node replaces the entry
//! and tells the old driver to stop ([`Stop::Replaced`]); a driver removes the entry only if it
//! still holds its own generation (compare-and-remove), so an old session's teardown can neither
//! end the new session nor publish a late "disconnected".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::Message;
use tokio::sync::{Notify, oneshot};
use transport::Protocol;

use crate::proxy::Replies;

/// Why the registry tells a driver to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A newer connection of the same node took over.
    Replaced,
    /// The cloud is stopping.
    Shutdown,
}

/// What the API shows about a live session; the driver updates the keepalive time.
#[derive(Debug)]
pub(crate) struct LiveInfo {
    pub(crate) protocol: Protocol,
    pub(crate) project: String,
    pub(crate) remote: SocketAddr,
    pub(crate) connected_since_ms: i64,
    pub(crate) last_keepalive_ms: AtomicI64,
    /// When the last message (keepalives included) arrived: the node's `last_seen_ms` while live.
    pub(crate) last_frame_ms: AtomicI64,
}

/// What the edge answered to a message it acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct AckInfo {
    /// The acknowledged message id.
    pub id: String,
    /// From its first send in the acking session to the ACK, when it was sent in that session.
    pub latency: Option<Duration>,
    /// The edge's response (op `response`); its content may carry a reply. `None` when the
    /// message was already acked before the wait began.
    pub response: Option<Message>,
    /// The edge did not acknowledge but refused the message (op `error`: it could not deliver
    /// it), with this reason: the message failed and will not be resent.
    pub failed: Option<String>,
    /// The operator cancelled the message ([`crate::Hub::cancel`]): it will not be resent.
    pub cancelled: bool,
}

/// A registered interest in one message's ACK; see [`crate::Hub::ack_waiter`].
#[derive(Debug)]
pub struct AckWaiter {
    rx: Option<oneshot::Receiver<AckInfo>>,
    key: (String, String),
    registry: Arc<Registry>,
}

/// A connection's place in the registry, handed to its driver.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) generation: u64,
    pub(crate) info: Arc<LiveInfo>,
    /// Notified when a message is queued for the node, or one is cancelled.
    pub(crate) wake: Arc<Notify>,
    /// Ids the operator cancelled, for the driver to take out of its session on `wake`.
    pub(crate) cancelled: Arc<Mutex<Vec<String>>>,
    /// Resolves when the registry tells the driver to stop.
    pub(crate) stop: oneshot::Receiver<Stop>,
}

/// How an admission went.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Entered; `replaced` is the generation of the session it replaced, if any.
    Entered { entry: Entry, replaced: Option<u64> },
    /// The node limit is reached and the node has no session to replace.
    LimitReached,
}

/// The registry: live sessions, ACK waiters and the count of running drivers.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    nodes: Mutex<HashMap<String, Live>>,
    next_generation: AtomicU64,
    waiters: Mutex<HashMap<(String, String), Waiters>>,
    drivers: AtomicUsize,
    drivers_done: Notify,
    shutting_down: AtomicBool,
    /// Proxy calls waiting for servicebus replies (`proxy.rs`).
    replies: Arc<Replies>,
    /// Every ACK (and refusal) for cloud modules that track their deliveries
    /// ([`crate::Hub::subscribe_acks`]); created on first subscription.
    acks: std::sync::OnceLock<tokio::sync::broadcast::Sender<Arc<(String, AckInfo)>>>,
}

/// Capacity of the ACK feed; a subscriber that lags asks the store where its messages stand.
const ACK_FEED: usize = 8192;

/// Everyone waiting for one message's ACK.
type Waiters = Vec<oneshot::Sender<AckInfo>>;

/// The registry entry of a node's current session.
#[derive(Debug)]
struct Live {
    generation: u64,
    info: Arc<LiveInfo>,
    wake: Arc<Notify>,
    cancelled: Arc<Mutex<Vec<String>>>,
    /// Taken to tell the driver to stop (replacement, shutdown).
    stop: Option<oneshot::Sender<Stop>>,
}

impl AckWaiter {
    /// Waits up to `timeout` for the ACK; `None` on timeout (the message stays queued and will
    /// still be delivered).
    pub async fn wait(mut self, timeout: Duration) -> Option<AckInfo> {
        let rx = self.rx.take()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

impl Drop for AckWaiter {
    fn drop(&mut self) {
        let mut waiters = lock(&self.registry.waiters);
        if let Some(list) = waiters.get_mut(&self.key) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&self.key);
            }
        }
    }
}

impl Registry {
    /// Enters a new session of `node` with a fresh generation, replacing (and stopping) its
    /// previous one, unless `limit` sessions of other nodes are live. A driver is counted as
    /// running from here until [`Registry::driver_done`].
    pub(crate) fn admit(&self, node: &str, info: LiveInfo, limit: usize) -> Admission {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (stop_tx, stop) = oneshot::channel();
        let info = Arc::new(info);
        let wake = Arc::new(Notify::new());
        let cancelled = Arc::new(Mutex::new(Vec::new()));
        let replaced = {
            let mut nodes = lock(&self.nodes);
            if !nodes.contains_key(node) && nodes.len() >= limit {
                return Admission::LimitReached;
            }
            let live = Live {
                generation,
                info: Arc::clone(&info),
                wake: Arc::clone(&wake),
                cancelled: Arc::clone(&cancelled),
                stop: Some(stop_tx),
            };
            nodes.insert(node.to_owned(), live)
        };
        let replaced = replaced.map(|mut old| {
            if let Some(tx) = old.stop.take() {
                let _ = tx.send(Stop::Replaced);
            }
            old.generation
        });
        self.drivers.fetch_add(1, Ordering::AcqRel);
        Admission::Entered {
            entry: Entry {
                generation,
                info,
                wake,
                cancelled,
                stop,
            },
            replaced,
        }
    }

    /// Wakes `node`'s session, if it has one, to look for newly queued messages.
    pub(crate) fn wake(&self, node: &str) {
        if let Some(live) = lock(&self.nodes).get(node) {
            live.wake.notify_one();
        }
    }

    /// Tells `node`'s live session, if it has one, that message `id` was cancelled in the
    /// store, so it drops the copy it may hold. A session admitted after the store's cancel
    /// never reads the message, so call this after the cancel is durable.
    pub(crate) fn cancelled(&self, node: &str, id: &str) {
        if let Some(live) = lock(&self.nodes).get(node) {
            lock(&live.cancelled).push(id.to_owned());
            live.wake.notify_one();
        }
    }

    /// What the API shows about `node`'s live session, if it has one.
    pub(crate) fn info(&self, node: &str) -> Option<Arc<LiveInfo>> {
        lock(&self.nodes).get(node).map(|l| Arc::clone(&l.info))
    }

    /// Every live session's node id and info.
    pub(crate) fn live(&self) -> Vec<(String, Arc<LiveInfo>)> {
        lock(&self.nodes)
            .iter()
            .map(|(id, l)| (id.clone(), Arc::clone(&l.info)))
            .collect()
    }

    /// Registers interest in the ACK of message `id` for `node`.
    pub(crate) fn ack_waiter(self: &Arc<Self>, node: &str, id: &str) -> AckWaiter {
        let (tx, rx) = oneshot::channel();
        let key = (node.to_owned(), id.to_owned());
        lock(&self.waiters).entry(key.clone()).or_default().push(tx);
        AckWaiter {
            rx: Some(rx),
            key,
            registry: Arc::clone(self),
        }
    }

    /// A feed of every ACK and refusal from now on, with the node's id.
    pub(crate) fn subscribe_acks(
        &self,
    ) -> tokio::sync::broadcast::Receiver<Arc<(String, AckInfo)>> {
        self.acks
            .get_or_init(|| tokio::sync::broadcast::channel(ACK_FEED).0)
            .subscribe()
    }

    /// Refuses admissions from now on (see [`Registry::is_shutting_down`]) and tells every
    /// running driver to stop.
    pub(crate) fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let stops: Vec<oneshot::Sender<Stop>> = lock(&self.nodes)
            .values_mut()
            .filter_map(|l| l.stop.take())
            .collect();
        for tx in stops {
            let _ = tx.send(Stop::Shutdown);
        }
    }

    /// Whether [`Registry::shut_down`] was called.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Waits until at most `n` drivers run.
    pub(crate) async fn wait_drivers_at_most(&self, n: usize) {
        loop {
            let done = self.drivers_done.notified();
            if self.drivers.load(Ordering::Acquire) <= n {
                return;
            }
            done.await;
        }
    }

    /// Removes `node`'s entry only if it still belongs to `generation` (compare-and-remove);
    /// returns whether it did. The driver's end.
    pub(crate) fn remove_if_current(&self, node: &str, generation: u64) -> bool {
        let mut nodes = lock(&self.nodes);
        if nodes.get(node).is_some_and(|l| l.generation == generation) {
            nodes.remove(node);
            true
        } else {
            false
        }
    }

    /// Hands an ACK to whoever waits for it. The driver's end.
    pub(crate) fn notify_ack(&self, node: &str, info: &AckInfo) {
        if let Some(feed) = self.acks.get() {
            // No subscriber is fine.
            let _ = feed.send(Arc::new((node.to_owned(), info.clone())));
        }
        let key = (node.to_owned(), info.id.clone());
        if let Some(list) = lock(&self.waiters).remove(&key) {
            for tx in list {
                let _ = tx.send(info.clone());
            }
        }
    }

    /// The callers waiting for servicebus replies; the driver hands replies to them.
    pub(crate) fn replies(&self) -> &Arc<Replies> {
        &self.replies
    }

    /// A driver finished. The driver's end.
    pub(crate) fn driver_done(&self) {
        self.drivers.fetch_sub(1, Ordering::AcqRel);
        self.drivers_done.notify_waiters();
    }

    /// Live sessions per protocol.
    pub(crate) fn connected(&self) -> Vec<(Protocol, u64)> {
        let nodes = lock(&self.nodes);
        Protocol::ALL
            .iter()
            .map(|p| {
                let n = nodes.values().filter(|l| l.info.protocol == *p).count();
                (*p, u64::try_from(n).unwrap_or(u64::MAX))
            })
            .collect()
    }

    /// Whether `node` has a live session.
    pub(crate) fn is_connected(&self, node: &str) -> bool {
        lock(&self.nodes).contains_key(node)
    }
}

/// Locks a mutex, recovering the data if a holder panicked (the maps stay consistent: every
/// critical section is a single insert, remove or read).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
