//! The embedded [`MessageStore`]: one SQLite file in WAL mode, written by one dedicated thread
//! that batches every operation queued meanwhile into one transaction (group commit), so a
//! thousand nodes cost a handful of fsyncs per batch rather than one each, while every
//! operation is durable before its future resolves.
//!
//! Open-message counts per node are kept in memory (loaded at start) so the queue bound costs
//! no `COUNT(*)`; acked rows are kept for `acked_retention` (for status queries and duplicate
//! POSTs) and then pruned; the upstream log keeps the newest `upstream_window` records per node,
//! which is both what SSE consumers can resume from and the deduplication window.
//!
//! **A full disk.** On `SQLITE_FULL` SQLite may undo only the failing statement or the whole
//! transaction. The writer checks after every job whether its transaction is still open: if
//! SQLite rolled it back, the jobs that ran in it are undone and fail, and the rest of the batch
//! runs in a fresh transaction (without that check they would run in autocommit mode and be
//! stored while reported failed). A failed commit fails every job of its batch. Either way the
//! in-memory counters are read back from the database, the caller sees
//! [`StoreError::DiskFull`], the writer thread carries on, and the episode and its end are
//! logged once each. The WAL keeps the size it grew to, so later batches reuse its pages.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::Message;
use proto::row::MessageRow;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use tokio::sync::{broadcast, oneshot};

use super::{
    Accepted, Cancelled, EnqueueError, Enqueued, MessageState, MessageStore, NodeRecord,
    QueueDepth, StoreError, StoreFuture, Superseded, UpstreamRecord,
};
use session::node::Downstream;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Capacity of the live upstream feed; slower subscribers catch up from the table.
const UPSTREAM_FEED: usize = 4096;
/// How often acked rows past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How hard SQLite syncs to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `synchronous=FULL`: a committed operation survives a power loss. Default.
    #[default]
    Full,
    /// `synchronous=NORMAL`: survives a process crash (kill -9), may lose the last commits on
    /// power loss; several times more commits per second on slow disks.
    Normal,
}

/// Settings of [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// Database file (created with its directory if missing).
    pub path: PathBuf,
    /// Most open (pending + in-flight) messages per node; beyond it `enqueue` refuses. Default
    /// 10,000: about 10 MB of 1 KiB messages for a node that is offline for long.
    pub queue_limit: u64,
    /// Upstream records kept per node (deduplication window and SSE replay). Default 10,000:
    /// far more than an edge outbox resends after a reconnect.
    pub upstream_window: u64,
    /// How long acked downstream rows are kept for status queries. Default 10 minutes.
    pub acked_retention: Duration,
    /// Sync level. Default [`Durability::Full`].
    pub durability: Durability,
}

impl SqliteConfig {
    /// Defaults with the database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            queue_limit: 10_000,
            upstream_window: 10_000,
            acked_retention: Duration::from_secs(600),
            durability: Durability::Full,
        }
    }
}

/// The SQLite-backed [`MessageStore`]. Cheap to share behind an `Arc`; dropping the last
/// handle finishes queued operations and stops the writer thread.
#[derive(Debug)]
pub struct SqliteStore {
    jobs: Option<mpsc::Sender<Job>>,
    feed: broadcast::Sender<Arc<UpstreamRecord>>,
    writer: Option<JoinHandle<()>>,
}

type Job = Box<dyn FnOnce(&mut Batch<'_, '_>) + Send>;
type Completion = Box<dyn FnOnce(Result<(), &Failure>) + Send>;

/// Why a batch (or the part of it that ran before SQLite rolled it back) did not commit.
#[derive(Debug, Clone)]
struct Failure {
    text: String,
    disk_full: bool,
}

/// What one job sees while its batch runs.
struct Batch<'c, 's> {
    tx: &'c mut Transaction<'s>,
    state: &'c mut State,
    config: &'c SqliteConfig,
    now_ms: i64,
    completions: Vec<Completion>,
    published: Vec<Arc<UpstreamRecord>>,
    /// The storage error of the last job that failed with one.
    failure: Option<Failure>,
}

/// Writer-thread memory mirrored from the database.
#[derive(Debug, Default)]
struct State {
    depth: HashMap<String, QueueDepth>,
    upstream: HashMap<String, u64>,
}

impl SqliteStore {
    /// Opens (or creates) the database and starts the writer thread.
    pub fn open(config: SqliteConfig) -> Result<Self, StoreError> {
        if let Some(dir) = config.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Corrupt(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(&config.path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match config.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let state = State::load(&conn)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (feed, _) = broadcast::channel(UPSTREAM_FEED);
        let publish = feed.clone();
        let writer = std::thread::Builder::new()
            .name("cloudhub-store".into())
            .spawn(move || run_writer(conn, rx, state, config, publish))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the store thread: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            feed,
            writer: Some(writer),
        })
    }

    /// Queues `f` for the writer thread; its result is delivered once its batch committed.
    fn submit<T, E, F>(&self, f: F) -> StoreFuture<'static, Result<T, E>>
    where
        T: Send + 'static,
        E: From<StoreError> + AsStoreError + Send + 'static,
        F: FnOnce(&mut Batch<'_, '_>) -> Result<T, E> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |batch: &mut Batch<'_, '_>| {
            let result = batch.isolated(f);
            if let Err(e) = &result
                && let Some(StoreError::Database(e)) = e.as_store_error()
            {
                batch.failure = Some(Failure::of(e));
            }
            batch.completions.push(Box::new(move |commit| {
                let result = match commit {
                    Ok(()) => result,
                    Err(why) => Err(E::from(why.to_store_error())),
                };
                let _ = reply.send(result);
            }));
        });
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        Box::pin(async move {
            if !sent {
                return Err(E::from(StoreError::Closed));
            }
            rx.await
                .unwrap_or_else(|_| Err(E::from(StoreError::Closed)))
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Batch<'_, '_> {
    /// Runs one job. There is no savepoint per job (its page copies cost more than the rest of
    /// a job): every job makes at most one essential write, as its last step, and SQLite undoes
    /// a failed statement by itself, so a failed job leaves nothing behind and the rest of the
    /// batch commits. In-memory counters change only after the write succeeded.
    fn isolated<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, E>,
    ) -> Result<T, E> {
        f(self)
    }
}

/// What one transaction of the writer did.
enum Outcome {
    /// Every job ran and the transaction committed.
    Committed,
    /// SQLite rolled the transaction back by itself after a job's error (`SQLITE_FULL` and I/O
    /// errors may do that rather than undo only the failed statement): the jobs that ran are
    /// undone and fail; the rest wait in `jobs` for a fresh transaction.
    RolledBack(Failure),
    /// The transaction could not begin or commit: every job that ran fails.
    Failed(Failure),
}

fn run_writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    mut state: State,
    config: SqliteConfig,
    publish: broadcast::Sender<Arc<UpstreamRecord>>,
) {
    let mut last_prune = Instant::now();
    // A storage failure (a full disk) was logged and no write has succeeded since.
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        let mut jobs = std::collections::VecDeque::from([first]);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push_back(job),
                Err(_) => break,
            }
        }
        while !jobs.is_empty() {
            let changes_before = conn.total_changes();
            let mut completions = Vec::with_capacity(jobs.len());
            let mut published = Vec::new();
            let mut job_failure = None;
            let outcome = run_batch(
                &mut conn,
                &mut jobs,
                &mut state,
                &config,
                (&mut completions, &mut published, &mut job_failure),
            );
            let rolled_back = matches!(outcome, Outcome::RolledBack(_));
            match outcome {
                Outcome::Committed => {
                    let wrote = conn.total_changes() > changes_before;
                    for done in completions {
                        done(Ok(()));
                    }
                    for record in published {
                        // No subscriber is fine: the record is in the table.
                        let _ = publish.send(record);
                    }
                    match job_failure {
                        Some(failure) => note_failure(&mut failing, &failure),
                        None if wrote && failing => {
                            tracing::info!("message store: writes succeed again");
                            failing = false;
                        }
                        None => {}
                    }
                }
                Outcome::RolledBack(failure) | Outcome::Failed(failure) => {
                    note_failure(&mut failing, &failure);
                    for done in completions {
                        done(Err(&failure));
                    }
                    // The counters saw the undone jobs; read them back from the database.
                    match State::load(&conn) {
                        Ok(fresh) => state = fresh,
                        Err(e) => tracing::error!(error = %e, "cannot reload store counters"),
                    }
                    if !rolled_back {
                        // Commit failed (nothing is left), or the transaction could not even
                        // begin: the waiting jobs drop their replies (Closed) rather than spin
                        // on a broken database.
                        jobs.clear();
                    }
                }
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            let horizon = proto::now_millis()
                - i64::try_from(config.acked_retention.as_millis()).unwrap_or(i64::MAX);
            if let Err(e) = conn.execute(
                "DELETE FROM downstream WHERE state >= 2 AND acked_ms < ?1",
                [horizon],
            ) {
                tracing::warn!(error = %e, "pruning acked messages failed");
            }
        }
    }
}

/// Runs jobs from the front of `jobs` in one transaction until they are done or SQLite rolls
/// the transaction back; the jobs that ran leave their completions, published records and last
/// storage failure in `out`.
fn run_batch(
    conn: &mut Connection,
    jobs: &mut std::collections::VecDeque<Job>,
    state: &mut State,
    config: &SqliteConfig,
    out: (
        &mut Vec<Completion>,
        &mut Vec<Arc<UpstreamRecord>>,
        &mut Option<Failure>,
    ),
) -> Outcome {
    let (completions, published, job_failure) = out;
    let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return Outcome::Failed(Failure::of(&e)),
    };
    let mut batch = Batch {
        tx: &mut tx,
        state,
        config,
        now_ms: proto::now_millis(),
        completions: Vec::new(),
        published: Vec::new(),
        failure: None,
    };
    let mut rolled_back = None;
    while let Some(job) = jobs.pop_front() {
        job(&mut batch);
        if batch.tx.is_autocommit() {
            // Everything this transaction did is undone; `failure` says why.
            rolled_back = Some(batch.failure.take().unwrap_or_else(|| Failure {
                text: "SQLite rolled the transaction back".into(),
                disk_full: false,
            }));
            break;
        }
    }
    *completions = std::mem::take(&mut batch.completions);
    *published = std::mem::take(&mut batch.published);
    *job_failure = batch.failure.take();
    if let Some(failure) = rolled_back {
        published.clear();
        return Outcome::RolledBack(failure);
    }
    match tx.commit() {
        Ok(()) => Outcome::Committed,
        Err(e) => {
            published.clear();
            Outcome::Failed(Failure::of(&e))
        }
    }
}

/// Logs a storage failure once per episode: a full disk would otherwise log every operation.
fn note_failure(failing: &mut bool, failure: &Failure) {
    if *failing {
        tracing::debug!(error = %failure.text, "message store write failed");
        return;
    }
    *failing = true;
    if failure.disk_full {
        tracing::error!(
            error = %failure.text,
            "message store: the disk is full; new messages are refused (the API answers 507), \
             queued ones are kept and delivered, and writes are retried as they come"
        );
    } else {
        tracing::error!(error = %failure.text, "message store: writes fail");
    }
}

impl Failure {
    fn of(e: &rusqlite::Error) -> Self {
        Self {
            text: e.to_string(),
            disk_full: e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
        }
    }

    fn to_store_error(&self) -> StoreError {
        if self.disk_full {
            StoreError::DiskFull(self.text.clone())
        } else {
            StoreError::Commit(self.text.clone())
        }
    }
}

/// The store's own error inside an operation's error type, so the writer can tell a failed
/// job's storage failure from its refusals.
pub(crate) trait AsStoreError {
    /// The store error, if this is one.
    fn as_store_error(&self) -> Option<&StoreError>;
}

impl AsStoreError for StoreError {
    fn as_store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

impl AsStoreError for EnqueueError {
    fn as_store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// The message columns of both queues, in [`MESSAGE_COLUMNS`] order ([`MessageRow`]'s fields).
macro_rules! message_column_defs {
    () => {
        "
    msg_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    resource_version TEXT NOT NULL,
    sync INTEGER NOT NULL,
    msg_type TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    grp TEXT NOT NULL,
    operation TEXT NOT NULL,
    resource TEXT NOT NULL,
    content_kind INTEGER NOT NULL,
    content BLOB NOT NULL
"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS downstream (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    needs_ack INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_ms INTEGER NOT NULL,
    acked_ms INTEGER,
",
    message_column_defs!(),
    ");
CREATE UNIQUE INDEX IF NOT EXISTS downstream_id ON downstream(node, msg_id);
CREATE INDEX IF NOT EXISTS downstream_open ON downstream(node, seq) WHERE state < 2;
CREATE TABLE IF NOT EXISTS upstream (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    accepted_ms INTEGER NOT NULL,
",
    message_column_defs!(),
    ");
CREATE UNIQUE INDEX IF NOT EXISTS upstream_id ON upstream(node, msg_id);
CREATE INDEX IF NOT EXISTS upstream_node_seq ON upstream(node, seq);
"
);

/// The twelve message columns, in table order starting at `msg_id`.
const MESSAGE_COLUMNS: &str = "msg_id, parent_id, timestamp, resource_version, sync, msg_type, \
     source, destination, grp, operation, resource, content_kind, content";

const STATE_PENDING: i64 = 0;
const STATE_IN_FLIGHT: i64 = 1;
const STATE_ACKED: i64 = 2;
/// The edge answered with an error; `error` holds its reason, `acked_ms` when.
const STATE_FAILED: i64 = 3;
/// The operator cancelled it; `acked_ms` holds when.
const STATE_CANCELLED: i64 = 4;

/// Columns added after the first release, for databases created before them.
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let has_error: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('downstream') WHERE name = 'error'")?
        .exists([])?;
    if !has_error {
        conn.execute_batch("ALTER TABLE downstream ADD COLUMN error TEXT")?;
    }
    Ok(())
}

impl State {
    fn load(conn: &Connection) -> Result<Self, rusqlite::Error> {
        let mut state = Self::default();
        let mut stmt = conn.prepare(
            "SELECT node, state, COUNT(*) FROM downstream WHERE state < 2 GROUP BY node, state",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let node: String = row.get(0)?;
            let st: i64 = row.get(1)?;
            let n: i64 = row.get(2)?;
            let depth = state.depth.entry(node).or_default();
            let n = u64::try_from(n).unwrap_or(0);
            if st == STATE_PENDING {
                depth.pending = n;
            } else {
                depth.in_flight = n;
            }
        }
        let mut stmt = conn.prepare("SELECT node, COUNT(*) FROM upstream GROUP BY node")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let n: i64 = row.get(1)?;
            state
                .upstream
                .insert(row.get(0)?, u64::try_from(n).unwrap_or(0));
        }
        Ok(state)
    }
}

/// What [`insert_downstream`] does with a message id the node's queue already holds.
#[derive(Clone, Copy)]
enum OnConflict {
    /// Inserts nothing and returns no row (a retried POST).
    Nothing,
    /// Fails with the constraint error (the caller removed the rows it replaces).
    Fail,
}

/// Inserts `msg` into `node`'s downstream queue as pending; its `seq`, or `None` when
/// [`OnConflict::Nothing`] skipped a known id. The one INSERT of both enqueue paths.
fn insert_downstream(
    conn: &Connection,
    node: &str,
    needs_ack: bool,
    now_ms: i64,
    msg: &Message,
    on_conflict: OnConflict,
) -> Result<Option<i64>, StoreError> {
    let mut values = vec![
        rusqlite::types::Value::Text(node.to_owned()),
        rusqlite::types::Value::Integer(i64::from(needs_ack)),
        rusqlite::types::Value::Integer(now_ms),
    ];
    values.extend(message_values(msg));
    let conflict = match on_conflict {
        OnConflict::Nothing => "ON CONFLICT (node, msg_id) DO NOTHING",
        OnConflict::Fail => "",
    };
    let sql = format!(
        "INSERT INTO downstream (node, needs_ack, enqueued_ms, {MESSAGE_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
         {conflict} RETURNING seq"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(values), |r| r.get(0))
        .optional()?)
}

/// Message fields as SQL values, in [`MESSAGE_COLUMNS`] order ([`MessageRow`]'s).
fn message_values(msg: &Message) -> [rusqlite::types::Value; 13] {
    use rusqlite::types::Value;
    let row = MessageRow::from_message(msg);
    [
        Value::Text(row.id),
        Value::Text(row.parent_id),
        Value::Integer(row.timestamp),
        Value::Text(row.resource_version),
        Value::Integer(i64::from(row.sync)),
        Value::Text(row.message_type),
        Value::Text(row.source),
        Value::Text(row.destination),
        Value::Text(row.group),
        Value::Text(row.operation),
        Value::Text(row.resource),
        Value::Integer(row.content_kind),
        Value::Blob(row.content),
    ]
}

/// Reads a message from `row`, whose columns from `at` on are [`MESSAGE_COLUMNS`].
fn message_from_row(row: &Row<'_>, at: usize) -> Result<Message, StoreError> {
    MessageRow {
        id: row.get(at)?,
        parent_id: row.get(at + 1)?,
        timestamp: row.get(at + 2)?,
        resource_version: row.get(at + 3)?,
        sync: row.get::<_, i64>(at + 4)? != 0,
        message_type: row.get(at + 5)?,
        source: row.get(at + 6)?,
        destination: row.get(at + 7)?,
        group: row.get(at + 8)?,
        operation: row.get(at + 9)?,
        resource: row.get(at + 10)?,
        content_kind: row.get(at + 11)?,
        content: row.get(at + 12)?,
    }
    .into_message()
    .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl MessageStore for SqliteStore {
    fn register_node(&self, node: NodeRecord) -> StoreFuture<'static, Result<(), StoreError>> {
        self.submit(move |b| {
            b.tx.prepare_cached(
                "INSERT INTO nodes (id, project, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET project = excluded.project,
                     last_seen_ms = excluded.last_seen_ms",
            )?
            .execute(params![
                node.id,
                node.project,
                node.first_seen_ms,
                node.last_seen_ms
            ])?;
            Ok(())
        })
    }

    fn nodes(&self) -> StoreFuture<'static, Result<Vec<NodeRecord>, StoreError>> {
        self.submit(|b| {
            let mut stmt = b.tx.prepare_cached(
                "SELECT id, project, first_seen_ms, last_seen_ms FROM nodes ORDER BY id",
            )?;
            let rows = stmt.query_map([], node_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn node(&self, node: &str) -> StoreFuture<'static, Result<Option<NodeRecord>, StoreError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            Ok(b.tx
                .prepare_cached(
                    "SELECT id, project, first_seen_ms, last_seen_ms FROM nodes WHERE id = ?1",
                )?
                .query_row([node], node_from_row)
                .optional()?)
        })
    }

    fn enqueue(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> StoreFuture<'static, Result<Enqueued, EnqueueError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            let existing = |b: &mut Batch<'_, '_>| -> Result<Option<i64>, StoreError> {
                Ok(b.tx
                    .prepare_cached("SELECT seq FROM downstream WHERE node = ?1 AND msg_id = ?2")?
                    .query_row(params![node, msg.header.id], |r| r.get(0))
                    .optional()?)
            };
            let duplicate = |seq: i64| Enqueued {
                seq: to_u64(seq),
                duplicate: true,
            };
            let limit = b.config.queue_limit;
            let depth = b.state.depth.get(&node).copied().unwrap_or_default();
            if depth.total() >= limit {
                // Full: a retried POST of a queued message is still answered as such.
                return match existing(b)? {
                    Some(seq) => Ok(duplicate(seq)),
                    None => Err(EnqueueError::QueueFull {
                        node: node.clone(),
                        limit,
                    }),
                };
            }
            // One statement in the usual case; a known id inserts nothing and returns no row.
            let inserted =
                insert_downstream(b.tx, &node, needs_ack, b.now_ms, &msg, OnConflict::Nothing)?;
            let Some(seq) = inserted else {
                return match existing(b)? {
                    Some(seq) => Ok(duplicate(seq)),
                    None => Err(StoreError::Corrupt("insert conflicted with no row".into()).into()),
                };
            };
            b.state.depth.entry(node.clone()).or_default().pending += 1;
            Ok(Enqueued {
                seq: to_u64(seq),
                duplicate: false,
            })
        })
    }

    fn enqueue_superseding(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> StoreFuture<'static, Result<Superseded, EnqueueError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            // Two writes: a savepoint makes the job all-or-nothing (see `Batch::isolated`).
            let sp = b.tx.savepoint().map_err(StoreError::from)?;
            let mut replaced = Vec::new();
            let (mut pending, mut in_flight) = (0u64, 0u64);
            {
                let mut stmt = sp
                    .prepare_cached(
                        "DELETE FROM downstream WHERE node = ?1 AND state < 2 AND source = ?2
                         AND grp = ?3 AND resource = ?4 RETURNING msg_id, state",
                    )
                    .map_err(StoreError::from)?;
                let mut rows = stmt
                    .query(params![
                        node,
                        msg.route.source,
                        msg.route.group,
                        msg.route.resource
                    ])
                    .map_err(StoreError::from)?;
                while let Some(row) = rows.next().map_err(StoreError::from)? {
                    replaced.push(row.get::<_, String>(0).map_err(StoreError::from)?);
                    if row.get::<_, i64>(1).map_err(StoreError::from)? == STATE_PENDING {
                        pending += 1;
                    } else {
                        in_flight += 1;
                    }
                }
            }
            let limit = b.config.queue_limit;
            let depth = b.state.depth.get(&node).copied().unwrap_or_default();
            if depth.total().saturating_sub(pending + in_flight) >= limit {
                return Err(EnqueueError::QueueFull {
                    node: node.clone(),
                    limit,
                });
            }
            let seq = insert_downstream(&sp, &node, needs_ack, b.now_ms, &msg, OnConflict::Fail)?
                .ok_or_else(|| StoreError::Corrupt("insert returned no row".into()))?;
            sp.commit().map_err(StoreError::from)?;
            let depth = b.state.depth.entry(node.clone()).or_default();
            depth.pending = depth.pending.saturating_sub(pending) + 1;
            depth.in_flight = depth.in_flight.saturating_sub(in_flight);
            Ok(Superseded {
                enqueued: Enqueued {
                    seq: to_u64(seq),
                    duplicate: false,
                },
                replaced,
            })
        })
    }

    fn pending(
        &self,
        node: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'static, Result<Vec<Downstream>, StoreError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            let sql = format!(
                "SELECT seq, needs_ack, {MESSAGE_COLUMNS} FROM downstream
                 WHERE node = ?1 AND state < 2 AND seq > ?2 ORDER BY seq LIMIT ?3"
            );
            let mut stmt = b.tx.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![
                node,
                to_i64(after),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(Downstream {
                    seq: to_u64(row.get(0)?),
                    needs_ack: row.get::<_, i64>(1)? != 0,
                    message: message_from_row(row, 2)?,
                });
            }
            Ok(out)
        })
    }

    fn mark_in_flight(
        &self,
        node: &str,
        seq: u64,
        attempt: u32,
    ) -> StoreFuture<'static, Result<(), StoreError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            // Usually a pending message's first send: one statement. Otherwise a resend of one
            // already in flight; acked messages are left alone.
            let first =
                b.tx.prepare_cached(
                    "UPDATE downstream SET state = 1, attempts = ?1
                     WHERE seq = ?2 AND node = ?3 AND state = 0",
                )?
                .execute(params![i64::from(attempt), to_i64(seq), node])?;
            if first == 1 {
                let depth = b.state.depth.entry(node).or_default();
                depth.pending = depth.pending.saturating_sub(1);
                depth.in_flight += 1;
                return Ok(());
            }
            b.tx.prepare_cached(
                "UPDATE downstream SET attempts = ?1 WHERE seq = ?2 AND node = ?3 AND state = 1",
            )?
            .execute(params![i64::from(attempt), to_i64(seq), node])?;
            Ok(())
        })
    }

    fn mark_acked(
        &self,
        node: &str,
        id: &str,
    ) -> StoreFuture<'static, Result<Option<u64>, StoreError>> {
        let node = node.to_owned();
        let id = id.to_owned();
        self.submit(move |b| {
            // In flight is the usual case (one statement); pending happens for a message sent by
            // an earlier session whose ACK arrives in this one.
            for from in [STATE_IN_FLIGHT, STATE_PENDING] {
                let acked: Option<i64> =
                    b.tx.prepare_cached(
                        "UPDATE downstream SET state = 2, acked_ms = ?1
                         WHERE node = ?2 AND msg_id = ?3 AND state = ?4 RETURNING seq",
                    )?
                    .query_row(params![b.now_ms, node, id, from], |r| r.get(0))
                    .optional()?;
                if let Some(seq) = acked {
                    b.state.forget_open(&node, from);
                    return Ok(Some(to_u64(seq)));
                }
            }
            Ok(None)
        })
    }

    fn mark_failed(
        &self,
        node: &str,
        id: &str,
        reason: &str,
    ) -> StoreFuture<'static, Result<Option<u64>, StoreError>> {
        let node = node.to_owned();
        let id = id.to_owned();
        let reason = reason.to_owned();
        self.submit(move |b| {
            for from in [STATE_IN_FLIGHT, STATE_PENDING] {
                let failed: Option<i64> =
                    b.tx.prepare_cached(
                        "UPDATE downstream SET state = ?1, acked_ms = ?2, error = ?3
                         WHERE node = ?4 AND msg_id = ?5 AND state = ?6 AND needs_ack = 1
                         RETURNING seq",
                    )?
                    .query_row(
                        params![STATE_FAILED, b.now_ms, reason, node, id, from],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(seq) = failed {
                    b.state.forget_open(&node, from);
                    return Ok(Some(to_u64(seq)));
                }
            }
            Ok(None)
        })
    }

    fn cancel(&self, node: &str, id: &str) -> StoreFuture<'static, Result<Cancelled, StoreError>> {
        let node = node.to_owned();
        let id = id.to_owned();
        self.submit(move |b| {
            let row: Option<(i64, StateColumns)> =
                b.tx.prepare_cached(
                    "SELECT state, attempts, acked_ms, error, seq FROM downstream
                     WHERE node = ?1 AND msg_id = ?2",
                )?
                .query_row(params![node, id], |r| {
                    Ok((r.get(4)?, (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                })
                .optional()?;
            let Some((seq, (st, attempts, at, error))) = row else {
                return Ok(Cancelled::Unknown);
            };
            if st >= STATE_ACKED {
                return Ok(Cancelled::Already(state_of(st, attempts, at, error)));
            }
            b.tx.prepare_cached("UPDATE downstream SET state = ?1, acked_ms = ?2 WHERE seq = ?3")?
                .execute(params![STATE_CANCELLED, b.now_ms, seq])?;
            b.state.forget_open(&node, st);
            Ok(Cancelled::Now { seq: to_u64(seq) })
        })
    }

    fn remove(&self, node: &str, seq: u64) -> StoreFuture<'static, Result<(), StoreError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            let st: Option<i64> =
                b.tx.prepare_cached("SELECT state FROM downstream WHERE seq = ?1 AND node = ?2")?
                    .query_row(params![to_i64(seq), node], |r| r.get(0))
                    .optional()?;
            let Some(st) = st else { return Ok(()) };
            b.tx.prepare_cached("DELETE FROM downstream WHERE seq = ?1")?
                .execute([to_i64(seq)])?;
            if st < STATE_ACKED {
                b.state.forget_open(&node, st);
            }
            Ok(())
        })
    }

    fn message_state(
        &self,
        node: &str,
        id: &str,
    ) -> StoreFuture<'static, Result<Option<MessageState>, StoreError>> {
        let node = node.to_owned();
        let id = id.to_owned();
        self.submit(move |b| {
            let row: Option<StateColumns> =
                b.tx.prepare_cached(
                    "SELECT state, attempts, acked_ms, error FROM downstream
                     WHERE node = ?1 AND msg_id = ?2",
                )?
                .query_row(params![node, id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            Ok(row.map(|(st, attempts, acked, error)| state_of(st, attempts, acked, error)))
        })
    }

    fn queue_depths(&self) -> StoreFuture<'static, Result<Vec<(String, QueueDepth)>, StoreError>> {
        self.submit(|b| {
            let mut out: Vec<(String, QueueDepth)> = b
                .state
                .depth
                .iter()
                .filter(|(_, d)| d.total() > 0)
                .map(|(n, d)| (n.clone(), *d))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
    }

    fn accept_upstream(
        &self,
        node: &str,
        msg: Message,
    ) -> StoreFuture<'static, Result<Accepted, StoreError>> {
        let node = node.to_owned();
        self.submit(move |b| {
            let existing: Option<i64> =
                b.tx.prepare_cached("SELECT seq FROM upstream WHERE node = ?1 AND msg_id = ?2")?
                    .query_row(params![node, msg.header.id], |r| r.get(0))
                    .optional()?;
            if let Some(seq) = existing {
                return Ok(Accepted::Duplicate(to_u64(seq)));
            }
            let mut values = vec![
                rusqlite::types::Value::Text(node.clone()),
                rusqlite::types::Value::Integer(b.now_ms),
            ];
            values.extend(message_values(&msg));
            let sql = format!(
                "INSERT INTO upstream (node, accepted_ms, {MESSAGE_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            );
            b.tx.prepare_cached(&sql)?
                .execute(rusqlite::params_from_iter(values))?;
            let seq = to_u64(b.tx.last_insert_rowid());
            let count = b.state.upstream.entry(node.clone()).or_default();
            *count += 1;
            let window = b.config.upstream_window.max(1);
            // Prune in steps of an eighth of the window, not on every insert. Housekeeping: if it
            // fails the record is still accepted, and the next insert tries again.
            if *count > window + window / 8 {
                let pruned =
                    b.tx.prepare_cached(
                        "DELETE FROM upstream WHERE node = ?1 AND seq <= (SELECT seq FROM upstream
                         WHERE node = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                    )
                    .and_then(|mut stmt| stmt.execute(params![node, to_i64(window)]));
                match pruned {
                    Ok(removed) => {
                        *count = count.saturating_sub(u64::try_from(removed).unwrap_or(0));
                    }
                    Err(e) => tracing::warn!(%node, error = %e, "pruning the upstream log failed"),
                }
            }
            b.published.push(Arc::new(UpstreamRecord {
                seq,
                node,
                accepted_ms: b.now_ms,
                message: msg,
            }));
            Ok(Accepted::New(seq))
        })
    }

    fn upstream_since(
        &self,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'static, Result<Vec<Arc<UpstreamRecord>>, StoreError>> {
        self.submit(move |b| {
            let sql = format!(
                "SELECT seq, node, accepted_ms, {MESSAGE_COLUMNS} FROM upstream
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            );
            let mut stmt = b.tx.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![
                to_i64(after),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(Arc::new(UpstreamRecord {
                    seq: to_u64(row.get(0)?),
                    node: row.get(1)?,
                    accepted_ms: row.get(2)?,
                    message: message_from_row(row, 3)?,
                }));
            }
            Ok(out)
        })
    }

    fn subscribe_upstream(&self) -> broadcast::Receiver<Arc<UpstreamRecord>> {
        self.feed.subscribe()
    }
}

impl State {
    /// An open message of `node` in state `st` was acked or removed.
    fn forget_open(&mut self, node: &str, st: i64) {
        if let Some(depth) = self.depth.get_mut(node) {
            if st == STATE_PENDING {
                depth.pending = depth.pending.saturating_sub(1);
            } else {
                depth.in_flight = depth.in_flight.saturating_sub(1);
            }
        }
    }
}

/// A downstream row's `state`, `attempts`, `acked_ms` and `error` columns.
type StateColumns = (i64, i64, Option<i64>, Option<String>);

/// A row's state from its `state`, `attempts`, `acked_ms` and `error` columns.
fn state_of(st: i64, attempts: i64, at: Option<i64>, error: Option<String>) -> MessageState {
    let at_ms = at.unwrap_or(0);
    match st {
        STATE_PENDING => MessageState::Pending,
        STATE_IN_FLIGHT => MessageState::InFlight {
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        },
        STATE_FAILED => MessageState::Failed {
            at_ms,
            reason: error.unwrap_or_default(),
        },
        STATE_CANCELLED => MessageState::Cancelled { at_ms },
        _ => MessageState::Acked { at_ms },
    }
}

fn node_from_row(row: &Row<'_>) -> Result<NodeRecord, rusqlite::Error> {
    Ok(NodeRecord {
        id: row.get(0)?,
        project: row.get(1)?,
        first_seen_ms: row.get(2)?,
        last_seen_ms: row.get(3)?,
    })
}

#[cfg(test)]
mod tests;
