//! The durable outbox: every module → cloud message is written to SQLite before EdgeHub sends it,
//! and deleted only when the cloud has acknowledged it (PROTOCOL.md Part A item 7),
//! so a message in flight when the link drops is sent again, under the same id, after the
//! reconnect (fixes W5), and a restart of the process loses nothing either. Every row has a way
//! out: the cloud acknowledges only data ([`proto::message::UpstreamClass::Data`]), so the session
//! deletes any other stored message once written, and with a peer that lacks `upstream-ack`
//! (stock KubeEdge) it deletes every message once written, as KubeEdge does.
//!
//! **Answers** to cloud messages (op `response` with a parent id: the ACKs) get no row at all:
//! the cloud never acknowledges them, and their loss is repaired by the cloud's resend of the
//! message they answer. What is durable about an answer is the **downstream dedup window**: the
//! ids of cloud messages the edge has answered, recorded in the same transaction as the other
//! messages of the batch, so a cloud resend of an answered message is not handled twice but
//! answered again; and, in memory, the ids delivered recently and not yet answered, so a resend
//! that overtakes the module's answer is not delivered twice either.
//!
//! **Durability.** WAL journal, and `synchronous=FULL` by default: each commit is fsynced, so a
//! message the outbox accepted survives a power cut, which edge devices see far more often than
//! servers. `NORMAL` ([`Durability::Normal`]) survives a crash of the process but may lose the last
//! commits on power loss, in exchange for fewer fsyncs. Callers batch writes
//! ([`Outbox::push_batch`], [`Outbox::remove_many`]) so one fsync covers many messages.
//!
//! **Bounds.** At most [`OutboxConfig::max_messages`] messages and [`OutboxConfig::max_bytes`]
//! bytes; a push beyond either is refused ([`PushError::Full`]) and the producer waits
//! (back-pressure), nothing is dropped.
//!
//! **A full disk.** Every operation is one transaction, and a failed one (`SQLITE_FULL`, which
//! may roll back the statement or the whole transaction) is rolled back whole before the error
//! is returned, and in-memory counts change only after a commit: nothing is half-stored, and the
//! same call succeeds once space returns ([`StoreError::is_disk_full`]). EdgeHub keeps what it
//! could not store, refuses new messages meanwhile and retries (`driver.rs`).
//!
//! The store blocks on disk I/O; every call is short (one transaction) and is made from EdgeHub's
//! single hub task, which owns the outbox.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use proto::Message;
use proto::message::UpstreamClass;
use proto::row::HeadRow;

/// Schema version stored in `PRAGMA user_version`: 2 since content kinds are `proto::row`'s.
const SCHEMA_VERSION: i64 = 2;

/// Where and how the outbox stores messages. The defaults suit an edge device with a few GB of
/// flash: room for hours of an outage at KubeEdge's 30 messages per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// The SQLite file (created, with its directory, if missing; mode 0600).
    pub path: PathBuf,
    /// Most messages kept. Default 100 000.
    pub max_messages: u64,
    /// Most bytes kept (stored size of header, route and content). Default 64 MiB.
    pub max_bytes: u64,
    /// fsync policy. Default [`Durability::Full`].
    pub durability: Durability,
    /// How many answered downstream ids are remembered. Default 10 000: at KubeEdge's resend
    /// pace (five sends over 25 s) far more than can be outstanding.
    pub dedup_window: u64,
    /// How long a delivered, not yet answered downstream message suppresses its resends; after
    /// that a resend is delivered again, in case the module lost it. Default 30 s.
    pub dedup_pending_ttl: Duration,
}

impl OutboxConfig {
    /// The defaults, at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_messages: 100_000,
            max_bytes: 64 * 1024 * 1024,
            durability: Durability::Full,
            dedup_window: 10_000,
            dedup_pending_ttl: Duration::from_secs(30),
        }
    }
}

/// When SQLite syncs to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `synchronous=FULL`: every commit survives power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL`: commits survive a process crash; the last ones may be lost on power
    /// loss.
    Normal,
}

/// Insertion order of a stored message (SQLite rowid; never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub i64);

/// A stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Its place in the order.
    pub seq: Seq,
    /// The message, with the id it was stored under.
    pub message: Message,
}

/// The result of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Stored under this sequence number.
    Queued(Seq),
    /// A message with this id is already stored: pushing is idempotent.
    AlreadyQueued,
    /// An answer to a cloud message: its parent id is recorded as answered, the message itself
    /// is not stored; the caller sends it ([`session::edge::EdgeSession::queue_answer`]).
    Answered,
}

/// The result of [`Outbox::push_batch`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchPushed {
    /// Messages stored (or already present, or recorded as answers) and removed from the front
    /// of the batch.
    pub accepted: usize,
    /// The outbox is full: the rest of the batch stays with the caller.
    pub full: bool,
    /// The accepted answers, in batch order, for the caller to send ([`Pushed::Answered`]).
    pub answers: Vec<Message>,
}

/// The dedup window's verdict on a message from the cloud ([`Outbox::check_downstream`]): what to
/// do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupVerdict {
    /// First sighting (or its suppression expired): deliver it.
    Deliver,
    /// Already delivered and answered: do not deliver; answer it again.
    AnsweredDuplicate,
    /// Delivered moments ago and not answered yet: do not deliver; the module will answer.
    PendingDuplicate,
}

/// Counts of what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxUsage {
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
}

/// Why the outbox could not be opened. The fix is local: the path, its permissions or the disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The directory could not be created or the file's mode set.
    #[error("outbox {path}: {source}")]
    Io {
        /// The outbox path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// SQLite refused to open or initialise the file (not a database, locked, disk full).
    #[error("outbox {path}: {source}")]
    Sqlite {
        /// The outbox path.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer Causeway with a schema this one does not know.
    #[error("outbox {path}: schema version {found} is newer than {SCHEMA_VERSION}")]
    NewerSchema {
        /// The outbox path.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
}

/// A storage operation failed: the disk is full or failing, or the file was damaged. Local fault;
/// the operation can be retried once the cause is fixed, nothing was half-done (transactions).
#[derive(Debug, thiserror::Error)]
#[error("outbox storage: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

impl StoreError {
    /// The disk holding the outbox is full (SQLite's `SQLITE_FULL`): the operation was rolled
    /// back whole and succeeds again once space returns.
    pub fn is_disk_full(&self) -> bool {
        self.0.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
    }
}

/// Why a push was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The outbox holds its maximum; retry after acknowledgements free room (back-pressure).
    #[error("outbox full ({messages} messages, {bytes} bytes stored)")]
    Full {
        /// Messages stored.
        messages: u64,
        /// Bytes stored.
        bytes: u64,
    },
    /// The message alone is larger than [`OutboxConfig::max_bytes`]: it can never be stored. The
    /// producer's fault; the message is refused.
    #[error("message of {size} bytes exceeds the outbox limit of {max} bytes")]
    TooLarge {
        /// Its stored size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The durable upstream queue and downstream dedup window of one edge node.
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
    config: OutboxConfig,
    usage: OutboxUsage,
    /// Downstream ids delivered and not answered, with when (suppresses resends for a while).
    pending: HashMap<String, Instant>,
    /// The same sightings in delivery order, for eviction by age and count.
    pending_order: VecDeque<(String, Instant)>,
}

impl Outbox {
    /// Opens (creating if needed) the outbox at `config.path`.
    pub fn open(config: OutboxConfig) -> Result<Self, OpenError> {
        let path = config.path.clone();
        let io = |source| OpenError::Io {
            path: path.clone(),
            source,
        };
        let sqlite = |source| OpenError::Sqlite {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let conn = Connection::open(&path).map_err(sqlite)?;
        restrict_mode(&path).map_err(io)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        let synchronous = match config.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(sqlite)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sqlite)?;
        if version > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema {
                path,
                found: version,
            });
        }
        // Schema 1 stored JSON content as 0 and bytes as 1, the reverse of `proto::row`'s codes:
        // its rows are rewritten once, in the transaction that records schema 2.
        let swap_kinds = if version == 1 {
            "UPDATE outbox SET content_kind = 1 - content_kind WHERE content_kind IN (0, 1);"
        } else {
            ""
        };
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS outbox (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 meta TEXT NOT NULL,
                 content_kind INTEGER NOT NULL,
                 content BLOB NOT NULL,
                 size INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS answered (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE
             );
             {swap_kinds}
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;"
        ))
        .map_err(sqlite)?;
        let usage = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox",
                [],
                |r| {
                    let (messages, bytes): (i64, i64) = (r.get(0)?, r.get(1)?);
                    Ok(OutboxUsage {
                        messages: messages.max(0) as u64,
                        bytes: bytes.max(0) as u64,
                    })
                },
            )
            .map_err(sqlite)?;
        Ok(Self {
            conn,
            config,
            usage,
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
        })
    }

    /// Stores one message (one transaction). A message without an id gets a fresh one, since
    /// acknowledgement and dedup work by id.
    pub fn push(&mut self, message: &Message) -> Result<Pushed, PushError> {
        let tx = self.conn.transaction().map_err(StoreError)?;
        let mut usage = self.usage;
        let pushed = insert(&tx, &self.config, &mut usage, message)?;
        tx.commit().map_err(StoreError)?;
        self.usage = usage;
        if pushed == Pushed::Answered {
            self.pending_answered(&message.header.parent_id);
        }
        Ok(pushed)
    }

    /// Stores messages from the front of `batch` in one transaction (one fsync) until it is empty
    /// or the outbox is full; accepted messages are removed from `batch`. A message that can
    /// never fit ([`PushError::TooLarge`]) ends the batch with that error, still at the front.
    pub fn push_batch(&mut self, batch: &mut VecDeque<Message>) -> Result<BatchPushed, PushError> {
        let tx = self.conn.transaction().map_err(StoreError)?;
        let mut usage = self.usage;
        let mut outcome = BatchPushed::default();
        let mut too_large = None;
        for message in batch.iter() {
            match insert(&tx, &self.config, &mut usage, message) {
                Ok(pushed) => {
                    outcome.accepted += 1;
                    if pushed == Pushed::Answered {
                        outcome.answers.push(message.clone());
                    }
                }
                Err(PushError::Full { .. }) => {
                    outcome.full = true;
                    break;
                }
                Err(e @ PushError::TooLarge { .. }) => {
                    too_large = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().map_err(StoreError)?;
        self.usage = usage;
        batch.drain(..outcome.accepted);
        for answer in &outcome.answers {
            self.pending_answered(&answer.header.parent_id);
        }
        match too_large {
            Some(e) if outcome.accepted == 0 => Err(e),
            _ => Ok(outcome),
        }
    }

    /// Deletes the message with this id (acknowledged, or written to a KubeEdge peer). Returns
    /// whether it was stored; deleting an unknown id is not an error (duplicate acks happen).
    pub fn remove(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.remove_many([id])? == 1)
    }

    /// Deletes several messages in one transaction; returns how many were stored.
    pub fn remove_many<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut removed = 0;
        let mut freed = 0u64;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1 RETURNING size")?;
            for id in ids {
                if let Some(size) = stmt.query_row([id], |r| r.get::<_, i64>(0)).optional()? {
                    removed += 1;
                    freed += size.max(0) as u64;
                }
            }
        }
        tx.commit()?;
        self.usage.messages = self.usage.messages.saturating_sub(removed as u64);
        self.usage.bytes = self.usage.bytes.saturating_sub(freed);
        Ok(removed)
    }

    /// Up to `limit` stored messages after `after`, in insertion order. Rows that no longer decode
    /// (a damaged file) are deleted and counted in the second value, for the caller to log: they
    /// could never be sent.
    pub fn pending_after(
        &mut self,
        after: Seq,
        limit: usize,
    ) -> Result<(Vec<Stored>, usize), StoreError> {
        let mut rows = Vec::new();
        let mut damaged = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT seq, id, meta, content_kind, content FROM outbox
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut query = stmt.query(params![after.0, limit])?;
            while let Some(row) = query.next()? {
                let seq = Seq(row.get(0)?);
                let id: String = row.get(1)?;
                let stored = HeadRow {
                    head: row.get(2)?,
                    content_kind: row.get(3)?,
                    content: row.get(4)?,
                };
                match stored.into_message() {
                    Ok(mut message) => {
                        message.header.id = id;
                        rows.push(Stored { seq, message });
                    }
                    Err(_) => damaged.push(id),
                }
            }
        }
        let discarded = if damaged.is_empty() {
            0
        } else {
            self.remove_many(damaged.iter().map(String::as_str))?
        };
        Ok((rows, discarded))
    }

    /// Classifies a message from the cloud against the dedup window and, when it is to be
    /// delivered, records it as pending. Messages without an id are always delivered.
    pub fn check_downstream(
        &mut self,
        now: Instant,
        message: &Message,
    ) -> Result<DedupVerdict, StoreError> {
        let id = message.header.id.as_str();
        if id.is_empty() {
            return Ok(DedupVerdict::Deliver);
        }
        let answered = self
            .conn
            .prepare_cached("SELECT 1 FROM answered WHERE id = ?1")?
            .exists([id])?;
        if answered {
            return Ok(DedupVerdict::AnsweredDuplicate);
        }
        let ttl = self.config.dedup_pending_ttl;
        if let Some(at) = self.pending.get(id)
            && now.saturating_duration_since(*at) < ttl
        {
            return Ok(DedupVerdict::PendingDuplicate);
        }
        self.expire_pending(now);
        self.pending.insert(id.to_owned(), now);
        self.pending_order.push_back((id.to_owned(), now));
        Ok(DedupVerdict::Deliver)
    }

    /// What is stored.
    pub fn usage(&self) -> OutboxUsage {
        self.usage
    }

    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Whether this id is among the remembered answered downstream ids.
    pub fn is_answered(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM answered WHERE id = ?1")?
            .exists([id])?)
    }

    fn pending_answered(&mut self, parent_id: &str) {
        // The order queue keeps its entry until eviction, which then finds no match and skips it.
        self.pending.remove(parent_id);
    }

    /// Drops pending sightings that are older than the TTL or beyond the window's size.
    fn expire_pending(&mut self, now: Instant) {
        let ttl = self.config.dedup_pending_ttl;
        let cap = usize::try_from(self.config.dedup_window).unwrap_or(usize::MAX);
        while let Some((id, at)) = self.pending_order.front() {
            let expired = now.saturating_duration_since(*at) >= ttl;
            if !expired && self.pending_order.len() < cap {
                break;
            }
            // Remove the map entry only if it is this sighting (not a newer one of the same id).
            if self.pending.get(id) == Some(at) {
                self.pending.remove(id);
            }
            self.pending_order.pop_front();
        }
    }
}

/// Inserts one message inside `tx`, enforcing the limits against `usage` (updated on success);
/// an answer only records its parent id as answered.
fn insert(
    tx: &rusqlite::Transaction<'_>,
    config: &OutboxConfig,
    usage: &mut OutboxUsage,
    message: &Message,
) -> Result<Pushed, PushError> {
    if message.upstream_class() == UpstreamClass::Answer {
        remember_answered(tx, config, &message.header.parent_id).map_err(StoreError)?;
        return Ok(Pushed::Answered);
    }
    let mut message = message.clone();
    if message.header.id.is_empty() {
        message.header.id = proto::new_id();
    }
    let row = HeadRow::from_message(&message);
    let size = (row.head.len() + row.content.len()) as u64;
    if size > config.max_bytes {
        return Err(PushError::TooLarge {
            size,
            max: config.max_bytes,
        });
    }
    let exists = tx
        .prepare_cached("SELECT 1 FROM outbox WHERE id = ?1")
        .and_then(|mut s| s.exists([message.header.id.as_str()]))
        .map_err(StoreError)?;
    if exists {
        return Ok(Pushed::AlreadyQueued);
    }
    if usage.messages >= config.max_messages || usage.bytes + size > config.max_bytes {
        return Err(PushError::Full {
            messages: usage.messages,
            bytes: usage.bytes,
        });
    }
    tx.prepare_cached(
        "INSERT INTO outbox (id, meta, content_kind, content, size) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            message.header.id,
            row.head,
            row.content_kind,
            row.content,
            i64::try_from(size).unwrap_or(i64::MAX)
        ])
    })
    .map_err(StoreError)?;
    let seq = Seq(tx.last_insert_rowid());
    usage.messages += 1;
    usage.bytes += size;
    Ok(Pushed::Queued(seq))
}

/// Records that the edge answered cloud message `parent_id`, within the dedup window.
fn remember_answered(
    tx: &rusqlite::Transaction<'_>,
    config: &OutboxConfig,
    parent_id: &str,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached("INSERT OR IGNORE INTO answered (id) VALUES (?1)")?
        .execute([parent_id])?;
    let window = i64::try_from(config.dedup_window).unwrap_or(i64::MAX);
    tx.prepare_cached("DELETE FROM answered WHERE seq <= (SELECT MAX(seq) FROM answered) - ?1")?
        .execute([window])?;
    Ok(())
}

#[cfg(unix)]
fn restrict_mode(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict_mode(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests;
