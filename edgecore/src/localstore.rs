//! The local store: a small, real edge module that lets local applications exchange messages
//! with the cloud until metamanager and eventbus exist.
//!
//! It joins a bus group (default `meta`, where EdgeHub routes cloud `resource` and `func`
//! messages), stores every message it receives in SQLite, and only after the row is committed
//! acknowledges it to the cloud with KubeEdge's contract (op `response`, parent id = the message
//! id, content `OK`), through EdgeHub's durable outbox. A message whose id it already holds is
//! not stored twice but acknowledged again (the cloud resends when an ACK is lost). The oldest
//! rows are deleted beyond `max-messages`.
//!
//! Local applications use a loopback-only HTTP/JSON endpoint (no authentication; the address is
//! refused at configuration time unless it is a loopback address):
//!
//! | Method & path | What |
//! |---|---|
//! | `GET /v1/messages?after=<seq>&limit=<n>` | stored cloud messages after `seq` (default 0), oldest first, at most `n` (default 100, max 1000): `{"messages": [{"seq": 1, "message": <KubeEdge JSON>}], "next": <last seq>}` |
//! | `POST /v1/upstream` | send a message to the cloud: `{"group", "resource", "operation", "content"?, "source"? (default "localapp"), "id"?}`; 202 `{"id": ...}` once it is committed to EdgeHub's outbox (it survives a crash); refusals carry `{"error", "code"}` and `Retry-After`: 507 `insufficient_storage` (disk full), 503 `outbox_full`, `storage_failing`, `busy`, or `unconfirmed` (not confirmed within 30 s; retry under the returned `id`, stored once per id); 413 larger than the outbox |
//! | `GET /v1/status` | `{"cloud": "connected" \| "disconnected", "last_error": <the link's last failure, or null>, "stored": <rows>, "storage_error": <why the outbox or this store cannot write (a full disk), or null>}` |
//! | `GET /healthz` | `ok` |
//!
//! **A full disk.** While EdgeHub's outbox cannot write, `POST /v1/upstream` is refused at once
//! (507 `insufficient_storage` for a full disk) rather than taken into memory; what was taken
//! before is kept and stored once space returns. While this store cannot write, cloud messages
//! are not acknowledged, so the cloud resends them and they are stored once space returns. Each
//! episode is logged once, and its end once; nothing needs a restart.
//!
//! Why HTTP on loopback rather than a JSON-lines file: applications can both read and send, the
//! cursor (`after`) makes reading restartable without the store tracking consumers, and a
//! connection state is available for applications that want to wait for the cloud.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Value, json};

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use edgehub::{Receipt, StatsHandle};
use proto::{Content, Message};
use session::edge::route::{
    CLOUD_CONNECTED, CLOUD_DISCONNECTED, CONNECTION_EVENT_OPERATION, CONNECTION_EVENT_SOURCE,
    MODULE_EDGEHUB,
};

use crate::config::LocalStoreConfig;

/// The module's name on the bus.
pub const MODULE_NAME: &str = "localstore";
/// Default `source` of messages local applications send.
pub const DEFAULT_SOURCE: &str = "localapp";
/// How long a `POST /v1/upstream` waits for room in EdgeHub's inbox before answering 503.
const UPSTREAM_WAIT: Duration = Duration::from_secs(5);
/// How long it then waits for EdgeHub to commit the message to the outbox: a refusal comes at
/// once, so only a very slow disk makes it wait this long.
const STORE_WAIT: Duration = Duration::from_secs(30);
/// `Retry-After` (seconds) of a refused `POST /v1/upstream`: EdgeHub retries its storage every
/// second, so a few seconds suffice once space returns.
const RETRY_AFTER_SECS: &str = "5";

/// The local store module.
#[derive(Debug)]
pub struct LocalStore {
    config: LocalStoreConfig,
    /// Filled in once the HTTP endpoint is bound (useful with port 0).
    bound: Arc<Mutex<Option<SocketAddr>>>,
    /// EdgeHub's link state, when EdgeHub runs: `/v1/status` then also says why the link is down.
    link: Option<StatsHandle>,
}

/// Why the local store could not start or store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (disk full, file damaged). Local; the message is not acknowledged, so the
    /// cloud resends it.
    #[error("local store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The database directory could not be created.
    #[error("local store {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP endpoint could not be bound (address in use, not local).
    #[error("local store endpoint {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// What a store of a received message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new row with this sequence number.
    New(i64),
    /// A row with this message id exists already.
    Duplicate,
}

/// The SQLite table of received messages.
#[derive(Debug)]
pub struct MessageTable {
    conn: Mutex<Connection>,
    path: PathBuf,
    max_messages: u64,
}

/// Connection state as the last `cloud_connected` / `cloud_disconnected` event said (never
/// connected counts as disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloudState {
    Connected,
    Disconnected,
}

struct Shared {
    table: MessageTable,
    bus: Bus,
    cloud: Mutex<CloudState>,
    link: Option<StatsHandle>,
    /// Why the last insert failed, while inserts fail (logged once per episode).
    store_problem: Mutex<Option<String>>,
}

impl LocalStore {
    /// The module for `config`.
    pub fn new(config: LocalStoreConfig) -> Self {
        Self {
            config,
            bound: Arc::default(),
            link: None,
        }
    }

    /// Reports EdgeHub's link state (and its last failure) on `/v1/status`.
    pub fn with_link(mut self, link: StatsHandle) -> Self {
        self.link = Some(link);
        self
    }

    /// A handle that reads the bound endpoint address once the module has started.
    pub fn bound_addr(&self) -> Arc<Mutex<Option<SocketAddr>>> {
        self.bound.clone()
    }
}

impl Module for LocalStore {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn group(&self) -> &str {
        &self.config.group
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move { run(&self, ctx).await.map_err(ModuleError::new) })
    }
}

async fn run(module: &LocalStore, mut ctx: ModuleContext) -> Result<(), StoreError> {
    let config = &module.config;
    let table = MessageTable::open(&config.path, config.max_messages.get())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StoreError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StoreError::Bind {
        addr: config.listen,
        source,
    })?;
    *lock(&module.bound) = Some(addr);
    tracing::info!(%addr, group = config.group, path = %config.path.display(), "local store listening");
    let shared = Arc::new(Shared {
        table,
        bus: ctx.bus().clone(),
        cloud: Mutex::new(CloudState::Disconnected),
        link: module.link.clone(),
        store_problem: Mutex::new(None),
    });
    let shutdown = ctx.shutdown_signal();
    let server = tokio::spawn(
        axum::serve(listener, router(shared.clone()))
            .with_graceful_shutdown(async move { shutdown.triggered().await })
            .into_future(),
    );
    while let Some(msg) = ctx.recv().await {
        handle(&shared, msg).await;
    }
    // Messages still queued were not acknowledged; the cloud resends them after a restart.
    let _ = server.await;
    Ok(())
}

/// Stores one bus message and acknowledges it once committed.
async fn handle(shared: &Shared, msg: Message) {
    let route = &msg.route;
    if route.source == CONNECTION_EVENT_SOURCE && route.operation == CONNECTION_EVENT_OPERATION {
        let state = match msg.content.as_text() {
            Some(CLOUD_CONNECTED) => Some(CloudState::Connected),
            Some(CLOUD_DISCONNECTED) => Some(CloudState::Disconnected),
            _ => None,
        };
        if let Some(state) = state {
            *lock(&shared.cloud) = state;
        }
        return;
    }
    match shared.table.insert(&msg) {
        Ok(stored) => {
            if lock(&shared.store_problem).take().is_some() {
                tracing::info!(
                    path = %shared.table.path.display(),
                    "local store: storing works again; acknowledging cloud messages"
                );
            }
            if stored == Stored::Duplicate {
                tracing::debug!(
                    id = msg.header.id,
                    "message stored before; acknowledging again"
                );
            }
            // Responses answer something; they need no acknowledgement.
            if !msg.is_response() {
                let ack = Message::response_to(&msg, Content::text("OK"));
                if let Err(e) = shared.bus.send(MODULE_EDGEHUB, ack).await {
                    tracing::warn!(id = msg.header.id, error = %e, "could not hand the ACK to EdgeHub");
                }
            }
        }
        Err(e) => {
            let mut problem = lock(&shared.store_problem);
            if problem.is_none() {
                // Once per episode: a full disk would otherwise log every resend of every message.
                let what = if e.is_disk_full() {
                    "local store: the disk is full; cloud messages are not acknowledged, so the \
                     cloud resends them until they can be stored"
                } else {
                    "local store: cannot store; cloud messages are not acknowledged, so the \
                     cloud resends them until they can be stored"
                };
                tracing::error!(id = msg.header.id, error = %e, "{what}");
            } else {
                tracing::debug!(id = msg.header.id, error = %e, "not stored, not acknowledged");
            }
            *problem = Some(e.to_string());
        }
    }
}

impl StoreError {
    /// The disk is full (SQLite's `SQLITE_FULL`): nothing was stored; it works again once space
    /// returns.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
    }
}

impl MessageTable {
    /// Opens (creating) the table at `path`, keeping at most `max_messages` rows.
    pub fn open(path: &Path, max_messages: u64) -> Result<Self, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(sqlite)?;
        // Another process holding the file waits us out this long, then the error names it.
        conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        // FULL: an acknowledged message must survive power loss, or the cloud forgets it for good.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 received_ms INTEGER NOT NULL,
                 body TEXT NOT NULL
             );",
        )
        .map_err(sqlite)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            max_messages,
        })
    }

    /// Stores `msg` (committed when this returns `Ok`), unless its id is already stored.
    pub fn insert(&self, msg: &Message) -> Result<Stored, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let body = String::from_utf8(proto::json::to_vec(msg)).unwrap_or_default();
        let mut conn = lock(&self.conn);
        let tx = conn.transaction().map_err(sqlite)?;
        let id = if msg.header.id.is_empty() {
            proto::new_id()
        } else {
            msg.header.id.clone()
        };
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO messages (id, received_ms, body) VALUES (?1, ?2, ?3)",
                params![id, proto::now_millis(), body],
            )
            .map_err(sqlite)?;
        let stored = if inserted == 0 {
            Stored::Duplicate
        } else {
            let seq = tx.last_insert_rowid();
            let keep = i64::try_from(self.max_messages).unwrap_or(i64::MAX);
            tx.execute(
                "DELETE FROM messages WHERE seq <= ?1 - ?2",
                params![seq, keep],
            )
            .map_err(sqlite)?;
            Stored::New(seq)
        };
        tx.commit().map_err(sqlite)?;
        Ok(stored)
    }

    /// Up to `limit` stored messages after `after`, oldest first, as (seq, KubeEdge JSON).
    pub fn list(&self, after: i64, limit: usize) -> Result<Vec<(i64, Value)>, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let conn = lock(&self.conn);
        let mut stmt = conn
            .prepare_cached("SELECT seq, body FROM messages WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(sqlite)?;
        let rows = stmt
            .query_map(
                params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .map_err(sqlite)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row.map_err(sqlite)?;
            out.push((seq, serde_json::from_str(&body).unwrap_or(Value::Null)));
        }
        Ok(out)
    }

    /// Rows stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let n: i64 = lock(&self.conn)
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .map_err(sqlite)?;
        Ok(n.max(0) as u64)
    }

    /// Whether a message with this id is stored.
    pub fn contains(&self, id: &str) -> Result<bool, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        lock(&self.conn)
            .query_row("SELECT 1 FROM messages WHERE id = ?1", [id], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(sqlite)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/messages", get(list_messages))
        .route("/v1/upstream", post(send_upstream))
        .route("/v1/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_messages(State(shared): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match shared.table.list(q.after, limit) {
        Ok(rows) => {
            let next = rows.last().map_or(q.after, |(seq, _)| *seq);
            let messages: Vec<Value> = rows
                .into_iter()
                .map(|(seq, message)| json!({"seq": seq, "message": message}))
                .collect();
            axum::Json(json!({"messages": messages, "next": next})).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// What a local application sends upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Upstream {
    group: String,
    resource: String,
    operation: String,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

async fn send_upstream(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<Upstream>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let up = match body {
        Ok(axum::Json(up)) => up,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    if up.group.is_empty() || up.operation.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "group and operation must not be empty",
        );
    }
    // Refused at the door while the outbox cannot write.
    if let Some(problem) = shared.link.as_ref().and_then(StatsHandle::storage_problem) {
        return not_stored(&Receipt::StorageFailed(problem), None);
    }
    let id = up
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(proto::new_id);
    let msg = Message::with_header(id.clone(), "", proto::now_millis())
        .route(
            up.source.unwrap_or_else(|| DEFAULT_SOURCE.to_owned()),
            up.group,
            up.resource,
            up.operation,
        )
        .content(Content::Json(up.content));
    // Registered before the hand-over, so the receipt cannot be missed.
    let receipt = shared.link.as_ref().map(|link| link.receipt(&id));
    match tokio::time::timeout(UPSTREAM_WAIT, shared.bus.send(MODULE_EDGEHUB, msg)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let text = e.to_string();
            return refused(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &text, None);
        }
        Err(_) => {
            let text = "EdgeHub is busy (its inbox is full): not accepted; retry later";
            return refused(StatusCode::SERVICE_UNAVAILABLE, "busy", text, None);
        }
    }
    let accepted = || (StatusCode::ACCEPTED, axum::Json(json!({"id": id}))).into_response();
    // Without EdgeHub's receipts (EdgeHub not running), handed over is all that can be said.
    let Some(receipt) = receipt else {
        return accepted();
    };
    match receipt.wait(STORE_WAIT).await {
        Some(Receipt::Stored) => accepted(),
        Some(other) => not_stored(&other, None),
        None => {
            let text = format!(
                "not confirmed stored within {}s; it may still be: retry with the same id (a \
                 message is stored once per id)",
                STORE_WAIT.as_secs()
            );
            refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "unconfirmed",
                &text,
                Some(&id),
            )
        }
    }
}

/// The answer to a POST whose message EdgeHub did not take.
fn not_stored(receipt: &Receipt, id: Option<&str>) -> Response {
    match receipt {
        Receipt::StorageFailed(problem) if problem.disk_full => refused(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            &format!(
                "the edge's disk is full: not accepted; retry once space is freed ({})",
                problem.error
            ),
            id,
        ),
        Receipt::StorageFailed(problem) => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_failing",
            &format!(
                "the edge's outbox cannot write: not accepted; retry later ({})",
                problem.error
            ),
            id,
        ),
        Receipt::OutboxFull => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbox_full",
            "the edge's outbox is full (the cloud has been unreachable): not accepted; retry \
             later",
            id,
        ),
        Receipt::TooLarge { size, max } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("message of {size} bytes exceeds the outbox limit of {max} bytes"),
        ),
        other => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            &format!("not accepted: {other:?}"),
            id,
        ),
    }
}

/// A refusal the caller should retry: `{"error", "code", "id"?}` with `Retry-After`.
fn refused(status: StatusCode, code: &str, text: &str, id: Option<&str>) -> Response {
    let mut body = json!({"error": text, "code": code});
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    resp
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let (connected, last_error) = match &shared.link {
        Some(link) => {
            let link = link.link();
            (link.connected, link.last_error)
        }
        None => (*lock(&shared.cloud) == CloudState::Connected, None),
    };
    let cloud = if connected {
        "connected"
    } else {
        "disconnected"
    };
    let storage_error = shared
        .link
        .as_ref()
        .and_then(StatsHandle::storage_problem)
        .map(|p| format!("outbox: {}", p.error))
        .or_else(|| lock(&shared.store_problem).clone());
    match shared.table.count() {
        Ok(stored) => axum::Json(json!({"cloud": cloud, "last_error": last_error,
                                        "stored": stored, "storage_error": storage_error}))
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({"error": text}))).into_response()
}

/// Locks a mutex, recovering from poisoning: the data (a SQLite handle, a state flag) stays
/// consistent because every critical section is one statement or one transaction.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> Message {
        Message::with_header(id, "", 1).route("edgecontroller", "resource", "ns/pod/p", "update")
    }

    #[test]
    fn stores_once_per_id_in_order_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let table = MessageTable::open(&dir.path().join("sub/local.db"), 3).unwrap();
        assert_eq!(table.insert(&msg("a")).unwrap(), Stored::New(1));
        assert_eq!(table.insert(&msg("a")).unwrap(), Stored::Duplicate);
        for id in ["b", "c", "d"] {
            table.insert(&msg(id)).unwrap();
        }
        assert_eq!(table.count().unwrap(), 3, "the oldest row was evicted");
        assert!(!table.contains("a").unwrap());
        let rows = table.list(0, 10).unwrap();
        let ids: Vec<&str> = rows
            .iter()
            .map(|(_, m)| m["header"]["msg_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["b", "c", "d"]);
        assert_eq!(table.list(rows[1].0, 10).unwrap().len(), 1);
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.db");
        MessageTable::open(&path, 10)
            .unwrap()
            .insert(&msg("x"))
            .unwrap();
        let table = MessageTable::open(&path, 10).unwrap();
        assert!(table.contains("x").unwrap());
        assert_eq!(table.insert(&msg("x")).unwrap(), Stored::Duplicate);
    }
}
