//! The session manager: admits authenticated connections from the transport listeners (one live
//! session per node id, a node limit), runs one driver (`driver.rs`) per connection, and offers the
//! operations the cloud API needs (node views, queueing a message, waiting for its ACK, metrics).
//!
//! Reconnect safety (fixes KubeEdge's W9): every admitted connection gets a fresh *generation*.
//! A newer connection of the same node replaces the entry and tells the old driver to close;
//! a driver removes the entry only if it still holds its own generation (compare-and-remove),
//! so an old session's teardown can neither end the new session nor publish a late
//! "disconnected". Refused connections (node limit, identity) are closed with a reason and never
//! served (fixes W8).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::Message;
use proto::close::SessionCloseCode;
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use transport::{AcceptError, Connection, Listener, Protocol};

use crate::metrics::{Gauges, Metrics};
use crate::store::{EnqueueError, Enqueued, MessageState, MessageStore, QueueDepth, StoreError};
use session::node::SessionConfig;

/// Settings of the session manager. Defaults are KubeEdge's where it has one.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most nodes with a live session; further nodes are refused and closed. Default 500
    /// (KubeEdge `nodeLimit`). A reconnecting node replaces its own session and never counts
    /// twice.
    pub node_limit: usize,
    /// Per-session tunables (keepalive interval, window, resend backoff).
    pub session: SessionConfig,
    /// Bound on closing a connection gracefully at the end of a session. Default 5 s.
    pub close_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            node_limit: 500,
            session: SessionConfig::default(),
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// The cloud hub: cheap to clone, shared by the listeners, the drivers and the API.
#[derive(Clone, Debug)]
pub struct Hub {
    pub(crate) inner: Arc<Inner>,
}

/// State shared by the hub's handles and its drivers.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: HubConfig,
    pub(crate) store: Arc<dyn MessageStore>,
    pub(crate) metrics: Metrics,
    nodes: Mutex<HashMap<String, Live>>,
    next_generation: AtomicU64,
    waiters: Mutex<HashMap<(String, String), Waiters>>,
    drivers: AtomicUsize,
    drivers_done: Notify,
    shutting_down: AtomicBool,
}

/// Everyone waiting for one message's ACK.
type Waiters = Vec<oneshot::Sender<AckInfo>>;

/// The registry entry of a node's current session.
#[derive(Debug)]
struct Live {
    generation: u64,
    info: Arc<LiveInfo>,
    wake: Arc<Notify>,
    /// Taken to tell the driver to stop (replacement, shutdown).
    close: Option<oneshot::Sender<CloseCause>>,
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

/// Why a session ended, as logged and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseCause {
    /// A newer connection of the same node took over.
    Replaced,
    /// The cloud is stopping.
    Shutdown,
    /// No keepalive within the keepalive interval.
    KeepaliveTimeout,
    /// The node closed the connection cleanly.
    PeerClosed,
    /// The transport reported an error while reading.
    Transport(String),
    /// Writing to the node failed.
    SendFailed(String),
    /// The store failed; the node will reconnect and start over from what is durable.
    StoreFailed(String),
}

impl CloseCause {
    /// Stable metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::PeerClosed => "peer_closed",
            Self::Transport(_) => "transport_error",
            Self::SendFailed(_) => "send_failed",
            Self::StoreFailed(_) => "store_failed",
        }
    }

    /// The session close code sent with the close (PROTOCOL.md Part A item 9); `None` where the
    /// connection already failed and a plain close is all that is left to send.
    pub(crate) fn session_code(&self) -> Option<SessionCloseCode> {
        match self {
            Self::Replaced => Some(SessionCloseCode::Replaced),
            Self::Shutdown => Some(SessionCloseCode::Shutdown),
            Self::KeepaliveTimeout => Some(SessionCloseCode::KeepaliveTimeout),
            Self::StoreFailed(_) => Some(SessionCloseCode::InternalError),
            Self::PeerClosed | Self::Transport(_) | Self::SendFailed(_) => None,
        }
    }

    /// The reason text sent to the node with the close.
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Replaced => "replaced by a newer connection of this node".into(),
            Self::Shutdown => "cloud is shutting down".into(),
            Self::KeepaliveTimeout => "no keepalive within the keepalive interval".into(),
            Self::PeerClosed => "closed by the node".into(),
            Self::Transport(e) => format!("transport error: {e}"),
            Self::SendFailed(e) => format!("send failed: {e}"),
            Self::StoreFailed(e) => format!("cloud store failure: {e}"),
        }
    }
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
}

/// A node as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Project id the node claimed (last connection).
    pub project: String,
    /// Whether it has a live session.
    pub connected: bool,
    /// Protocol of the live session.
    pub protocol: Option<Protocol>,
    /// Start of the live session, Unix milliseconds.
    pub connected_since_ms: Option<i64>,
    /// Address of the live session's peer.
    pub remote_addr: Option<String>,
    /// Last keepalive of the live session, Unix milliseconds.
    pub last_keepalive_ms: Option<i64>,
    /// First connection ever, Unix milliseconds (0 if it never connected but is live now).
    pub first_seen_ms: i64,
    /// When the node was last heard from, Unix milliseconds: its last message (keepalives
    /// included) while connected; the last message of its latest session otherwise (or that
    /// session's start, if the cloud stopped before recording it).
    pub last_seen_ms: i64,
    /// Open messages queued for it.
    pub queue: QueueView,
}

/// Queue depth as the API shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueView {
    /// Queued, not yet written in the current session.
    pub pending: u64,
    /// Written, waiting for an ACK.
    pub in_flight: u64,
}

impl From<QueueDepth> for QueueView {
    fn from(d: QueueDepth) -> Self {
        Self {
            pending: d.pending,
            in_flight: d.in_flight,
        }
    }
}

/// Why [`Hub::send`] did not queue a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The node never connected, so nothing can be queued for it (a typo, or a node not yet
    /// enrolled). Caller's fault (the API answers 404).
    #[error("unknown node {0:?}: it has never connected")]
    UnknownNode(String),
    /// The node's queue is at its bound; nothing was stored. Retry later (503).
    #[error(transparent)]
    QueueFull(EnqueueError),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A registered interest in one message's ACK; see [`Hub::ack_waiter`].
#[derive(Debug)]
pub struct AckWaiter {
    rx: Option<oneshot::Receiver<AckInfo>>,
    key: (String, String),
    hub: Arc<Inner>,
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
        let mut waiters = lock(&self.hub.waiters);
        if let Some(list) = waiters.get_mut(&self.key) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&self.key);
            }
        }
    }
}

impl Hub {
    /// A hub over `store`. Start serving with [`Hub::serve`].
    pub fn new(config: HubConfig, store: Arc<dyn MessageStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                metrics: Metrics::default(),
                nodes: Mutex::new(HashMap::new()),
                next_generation: AtomicU64::new(1),
                waiters: Mutex::new(HashMap::new()),
                drivers: AtomicUsize::new(0),
                drivers_done: Notify::new(),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// Accepts connections from `listener` until it ends (its shutdown signal fired), admitting
    /// each and counting each rejection by reason.
    pub async fn serve(&self, mut listener: Box<dyn Listener>) {
        while let Some(accepted) = listener.accept().await {
            match accepted {
                Ok(conn) => self.admit(conn),
                Err(AcceptError::Rejected { remote, reason }) => {
                    self.inner.metrics.rejected(reason.label());
                    tracing::warn!(%remote, %reason, "connection rejected");
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            }
        }
    }

    /// Admits one authenticated connection: replaces the node's previous session if any, or
    /// refuses (and closes) it when the node limit is reached or its identity is inconsistent.
    pub fn admit(&self, conn: Box<dyn Connection>) {
        let conn: Arc<dyn Connection> = Arc::from(conn);
        let peer = conn.peer().clone();
        let Some(node) = peer.node_id.as_ref().map(|n| n.as_str().to_owned()) else {
            self.refuse(conn, Refusal::MissingNodeId, "no node id".into());
            return;
        };
        // Transport checked this; checked again here because acting as another node is the
        // one thing a node must never manage (W8).
        match certs::node_id_from_cert(&peer.certificate) {
            Ok(certified) if certified.as_str() == node => {}
            Ok(certified) => {
                let why = format!("node id {node:?} does not match certificate {certified:?}");
                self.refuse(conn, Refusal::NodeIdMismatch, why);
                return;
            }
            Err(e) => {
                self.refuse(conn, Refusal::NotNodeCertificate, e.to_string());
                return;
            }
        }
        if self.inner.shutting_down.load(Ordering::Acquire) {
            self.refuse(conn, Refusal::ShuttingDown, "cloud is shutting down".into());
            return;
        }
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let (close_tx, close_rx) = oneshot::channel();
        let wake = Arc::new(Notify::new());
        let info = Arc::new(LiveInfo {
            protocol: peer.protocol,
            project: peer.project_id.clone().unwrap_or_default(),
            remote: peer.remote_addr,
            connected_since_ms: proto::now_millis(),
            last_keepalive_ms: AtomicI64::new(0),
            last_frame_ms: AtomicI64::new(0),
        });
        let replaced = {
            let mut nodes = lock(&self.inner.nodes);
            let limit = self.inner.config.node_limit;
            if !nodes.contains_key(&node) && nodes.len() >= limit {
                drop(nodes);
                self.refuse(
                    conn,
                    Refusal::NodeLimit,
                    format!("node limit of {limit} reached"),
                );
                return;
            }
            nodes.insert(
                node.clone(),
                Live {
                    generation,
                    info: Arc::clone(&info),
                    wake: Arc::clone(&wake),
                    close: Some(close_tx),
                },
            )
        };
        self.inner.metrics.session_started(peer.protocol);
        if let Some(mut old) = replaced {
            self.inner.metrics.reconnect();
            if let Some(tx) = old.close.take() {
                let _ = tx.send(CloseCause::Replaced);
            }
            tracing::info!(%node, protocol = %peer.protocol, remote = %peer.remote_addr,
                old_generation = old.generation, generation, "node reconnected; replacing its previous session");
        } else {
            tracing::info!(%node, protocol = %peer.protocol, remote = %peer.remote_addr,
                upstream_ack = peer.capabilities.upstream_ack, generation, "node connected");
        }
        self.inner.drivers.fetch_add(1, Ordering::AcqRel);
        let driver = crate::driver::Driver {
            hub: Arc::clone(&self.inner),
            conn,
            node,
            generation,
            info,
            wake,
            close: close_rx,
        };
        tokio::spawn(driver.run());
    }

    /// Queues `msg` durably for `node` and wakes its session if it is connected. An offline
    /// node gets it when it reconnects.
    pub async fn send(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> Result<Enqueued, SendError> {
        if !self.is_known(node).await? {
            return Err(SendError::UnknownNode(node.to_owned()));
        }
        let queued = match self.inner.store.enqueue(node, msg, needs_ack).await {
            Ok(q) => q,
            Err(e @ EnqueueError::QueueFull { .. }) => return Err(SendError::QueueFull(e)),
            Err(EnqueueError::Store(e)) => return Err(SendError::Store(e)),
        };
        if let Some(live) = lock(&self.inner.nodes).get(node) {
            live.wake.notify_one();
        }
        Ok(queued)
    }

    /// Registers interest in the ACK of message `id` for `node`. Register *before* queueing the
    /// message so an immediate ACK cannot be missed.
    pub fn ack_waiter(&self, node: &str, id: &str) -> AckWaiter {
        let (tx, rx) = oneshot::channel();
        let key = (node.to_owned(), id.to_owned());
        lock(&self.inner.waiters)
            .entry(key.clone())
            .or_default()
            .push(tx);
        AckWaiter {
            rx: Some(rx),
            key,
            hub: Arc::clone(&self.inner),
        }
    }

    /// Where message `id` for `node` stands in the store.
    pub async fn message_state(
        &self,
        node: &str,
        id: &str,
    ) -> Result<Option<MessageState>, StoreError> {
        self.inner.store.message_state(node, id).await
    }

    /// Every known node, connected or not, with its queue.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, StoreError> {
        let known = self.inner.store.nodes().await?;
        let depths: HashMap<String, QueueDepth> =
            self.inner.store.queue_depths().await?.into_iter().collect();
        let mut live: HashMap<String, Arc<LiveInfo>> = self.live_snapshot().into_iter().collect();
        let mut views: Vec<NodeView> = known
            .into_iter()
            .map(|rec| {
                let info = live.remove(&rec.id);
                let depth = depths.get(&rec.id).copied().unwrap_or_default();
                node_view(&rec.id.clone(), Some(rec), info.as_deref(), depth)
            })
            .collect();
        // Live sessions whose registration is not committed yet.
        for (id, info) in live {
            let depth = depths.get(&id).copied().unwrap_or_default();
            views.push(node_view(&id, None, Some(&info), depth));
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(views)
    }

    /// One node, or `None` if it is unknown.
    pub async fn node(&self, id: &str) -> Result<Option<NodeView>, StoreError> {
        let rec = self.inner.store.node(id).await?;
        let info = lock(&self.inner.nodes).get(id).map(|l| Arc::clone(&l.info));
        if rec.is_none() && info.is_none() {
            return Ok(None);
        }
        let depth = self
            .inner
            .store
            .queue_depths()
            .await?
            .into_iter()
            .find_map(|(n, d)| (n == id).then_some(d))
            .unwrap_or_default();
        Ok(Some(node_view(id, rec, info.as_deref(), depth)))
    }

    /// Nodes with a live session, per protocol.
    pub fn connected(&self) -> Vec<(Protocol, u64)> {
        let nodes = lock(&self.inner.nodes);
        Protocol::ALL
            .iter()
            .map(|p| {
                let n = nodes.values().filter(|l| l.info.protocol == *p).count();
                (*p, u64::try_from(n).unwrap_or(u64::MAX))
            })
            .collect()
    }

    /// Whether `node` has a live session.
    pub fn is_connected(&self, node: &str) -> bool {
        lock(&self.inner.nodes).contains_key(node)
    }

    /// The hub's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// All metrics in the Prometheus text format.
    pub async fn metrics_text(&self) -> String {
        let queue_depths = self.inner.store.queue_depths().await.unwrap_or_default();
        let gauges = Gauges {
            connected: self.connected(),
            queue_depths,
        };
        self.inner.metrics.render(&gauges)
    }

    /// The store (for the upstream log and its live feed).
    pub fn store(&self) -> &Arc<dyn MessageStore> {
        &self.inner.store
    }

    /// Refuses new connections, closes every session and waits up to `grace` for the drivers
    /// to finish (their queued messages stay in the store).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let closers: Vec<oneshot::Sender<CloseCause>> = lock(&self.inner.nodes)
            .values_mut()
            .filter_map(|l| l.close.take())
            .collect();
        for tx in closers {
            let _ = tx.send(CloseCause::Shutdown);
        }
        if tokio::time::timeout(grace, self.wait_sessions_at_most(0))
            .await
            .is_err()
        {
            tracing::warn!("sessions still closing after the shutdown grace period");
        }
    }

    /// Waits until at most `n` sessions (drivers, including replaced ones still closing) run:
    /// after it returns, every teardown beyond them has finished.
    pub async fn wait_sessions_at_most(&self, n: usize) {
        loop {
            let done = self.inner.drivers_done.notified();
            if self.inner.drivers.load(Ordering::Acquire) <= n {
                return;
            }
            done.await;
        }
    }

    async fn is_known(&self, node: &str) -> Result<bool, StoreError> {
        if lock(&self.inner.nodes).contains_key(node) {
            return Ok(true);
        }
        Ok(self.inner.store.node(node).await?.is_some())
    }

    fn live_snapshot(&self) -> Vec<(String, Arc<LiveInfo>)> {
        lock(&self.inner.nodes)
            .iter()
            .map(|(id, l)| (id.clone(), Arc::clone(&l.info)))
            .collect()
    }

    fn refuse(&self, conn: Arc<dyn Connection>, refusal: Refusal, why: String) {
        self.inner.metrics.rejected(refusal.label());
        let peer = conn.peer();
        tracing::warn!(remote = %peer.remote_addr, protocol = %peer.protocol, reason = %why,
            "connection refused");
        let timeout = self.inner.config.close_timeout;
        tokio::spawn(async move {
            let closing = conn.close_with(Some(refusal.session_code()), &why);
            let _ = tokio::time::timeout(timeout, closing).await;
        });
    }
}

/// Why [`Hub::admit`] refused an authenticated connection.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    MissingNodeId,
    NodeIdMismatch,
    NotNodeCertificate,
    ShuttingDown,
    NodeLimit,
}

impl Refusal {
    /// Stable metric label (`cloudhub_rejected_connections_total{reason}`).
    fn label(self) -> &'static str {
        match self {
            Self::MissingNodeId => "missing_node_id",
            Self::NodeIdMismatch => "node_id_mismatch",
            Self::NotNodeCertificate => "not_node_certificate",
            Self::ShuttingDown => "shutting_down",
            Self::NodeLimit => "node_limit",
        }
    }

    /// The close code the node reads (PROTOCOL.md Part A item 9).
    fn session_code(self) -> SessionCloseCode {
        match self {
            Self::MissingNodeId | Self::NodeIdMismatch | Self::NotNodeCertificate => {
                SessionCloseCode::IdentityRefused
            }
            Self::ShuttingDown => SessionCloseCode::Shutdown,
            Self::NodeLimit => SessionCloseCode::NodeLimit,
        }
    }
}

impl Inner {
    /// Removes `node`'s entry only if it still belongs to `generation` (compare-and-remove);
    /// returns whether it did.
    pub(crate) fn remove_if_current(&self, node: &str, generation: u64) -> bool {
        let mut nodes = lock(&self.nodes);
        if nodes.get(node).is_some_and(|l| l.generation == generation) {
            nodes.remove(node);
            true
        } else {
            false
        }
    }

    /// Hands an ACK to whoever waits for it.
    pub(crate) fn notify_ack(&self, node: &str, info: &AckInfo) {
        let key = (node.to_owned(), info.id.clone());
        if let Some(list) = lock(&self.waiters).remove(&key) {
            for tx in list {
                let _ = tx.send(info.clone());
            }
        }
    }

    /// A driver finished.
    pub(crate) fn driver_done(&self) {
        self.drivers.fetch_sub(1, Ordering::AcqRel);
        self.drivers_done.notify_waiters();
    }
}

/// A node's view from what the store knows and its live session, if any.
fn node_view(
    id: &str,
    rec: Option<crate::store::NodeRecord>,
    live: Option<&LiveInfo>,
    depth: QueueDepth,
) -> NodeView {
    let (project, first_seen_ms, last_seen_ms) = match rec {
        Some(r) => (r.project, r.first_seen_ms, r.last_seen_ms),
        None => (
            live.map(|l| l.project.clone()).unwrap_or_default(),
            0,
            live.map_or(0, |l| l.connected_since_ms),
        ),
    };
    let mut view = NodeView {
        id: id.to_owned(),
        project,
        connected: false,
        protocol: None,
        connected_since_ms: None,
        remote_addr: None,
        last_keepalive_ms: None,
        first_seen_ms,
        last_seen_ms,
        queue: depth.into(),
    };
    if let Some(info) = live {
        view.connected = true;
        view.project.clone_from(&info.project);
        view.protocol = Some(info.protocol);
        view.connected_since_ms = Some(info.connected_since_ms);
        view.remote_addr = Some(info.remote.to_string());
        let ka = info.last_keepalive_ms.load(Ordering::Relaxed);
        view.last_keepalive_ms = (ka > 0).then_some(ka);
        view.last_seen_ms = view
            .last_seen_ms
            .max(info.last_frame_ms.load(Ordering::Relaxed));
    }
    view
}

/// Locks a mutex, recovering the data if a holder panicked (the maps stay consistent: every
/// critical section is a single insert, remove or read).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
