//! metamanager's SQLite file: the `meta` table of objects (KubeEdge's `key`, `type`, `value`,
//! plus the parts of the key, the resource version, the uid and a tombstone flag) and the
//! `journal` of cloud messages applied, once per message id and bounded, in arrival order (what
//! local applications follow on `/v1/messages`, and how a resent message is recognised), each
//! row in proto's one message-row encoding ([`proto::row::HeadRow`]).
//!
//! [`MetaStore::apply`] runs [`crate::decide::decide`] against the stored row and writes its plan,
//! the journal row included, in one transaction; only once it returns `Ok` may the message be
//! acknowledged. Committed changes are then published to watchers ([`MetaStore::subscribe`]).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::Value;
use tokio::sync::broadcast;

use proto::Message;
use proto::row::HeadRow;

use crate::decide::{self, Action, CloudChange, Plan, StoredState};

/// Tombstones kept (the newest); older ones are pruned. A tombstone only guards against a late,
/// older version of an object deleted since, which the cloud's per-resource order makes rare.
const MAX_TOMBSTONES: i64 = 10_000;
/// Changes buffered per watcher; one that falls further behind is ended (it re-watches).
const WATCH_BUFFER: usize = 1024;

/// The store. Cheap to share behind an `Arc`; every method is one statement or one transaction.
#[derive(Debug)]
pub struct MetaStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    journal_max: u64,
    changes: broadcast::Sender<Change>,
    /// Why writes fail, while they do (a full disk): `/v1/status` says it.
    write_problem: Mutex<Option<String>>,
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Its key: the resource string (`default/configmap/cm1`).
    pub key: String,
    /// The type segment (`configmap`).
    pub kind: String,
    /// The namespace segment (`null` for cluster-scoped objects).
    pub namespace: String,
    /// The name segment.
    pub name: String,
    /// The content as received (the object's JSON text).
    pub value: String,
    /// Its resource version, when known.
    pub resource_version: Option<u64>,
}

/// A committed change, for watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub event: ChangeEvent,
    /// The object after the change (for a deletion, its last stored state).
    pub object: StoredObject,
}

/// Kubernetes watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeEvent {
    /// A new object.
    Added,
    /// A new version of a stored object.
    Modified,
    /// The object was deleted.
    Deleted,
}

/// What [`MetaStore::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The message was applied (or kept out, per the plan) and journaled.
    Done(Plan),
    /// A message with this id was applied before: nothing written (acknowledge it again).
    Duplicate,
}

/// Why the store could not open or write. Local (disk full, file damaged or locked): a message
/// that was not stored is not acknowledged, so the cloud sends it again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("metamanager store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The database directory could not be created.
    #[error("metamanager store {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl StoreError {
    /// The disk is full (SQLite's `SQLITE_FULL`): nothing was stored; it works again once space
    /// returns.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
    }

    /// The failure passes by itself (a full disk, a locked or busy file, an I/O error): a
    /// message that was not stored is better resent by the cloud than refused.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            Self::Io { .. } => true,
            Self::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(DiskFull | DatabaseBusy | DatabaseLocked | SystemIoFailure | CannotOpen)
            ),
        }
    }
}

impl MetaStore {
    /// Opens (creating) the store at `path`, keeping at most `journal_max` journal rows.
    pub fn open(path: &Path, journal_max: u64) -> Result<Self, StoreError> {
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
        // FULL: an acknowledged object must survive power loss, or the cloud counts it synced
        // while the edge lost it (KubeEdge #3620's consequence).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (
                 key TEXT PRIMARY KEY,
                 type TEXT NOT NULL DEFAULT '',
                 value TEXT NOT NULL DEFAULT '',
                 namespace TEXT NOT NULL DEFAULT '',
                 name TEXT NOT NULL DEFAULT '',
                 resource_version INTEGER,
                 uid TEXT,
                 deleted INTEGER NOT NULL DEFAULT 0,
                 updated_ms INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS meta_type ON meta (type, namespace);
             CREATE TABLE IF NOT EXISTS journal (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 received_ms INTEGER NOT NULL,
                 head TEXT NOT NULL,
                 content_kind INTEGER NOT NULL,
                 content BLOB NOT NULL
             );",
        )
        .map_err(sqlite)?;
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            journal_max,
            changes,
            write_problem: Mutex::new(None),
        })
    }

    /// Applies a cloud message read by [`decide::inspect`]: decides against the stored row and
    /// writes the plan and the journal row in one transaction, committed when this returns `Ok`.
    /// A message whose id is journaled already is not applied again ([`Applied::Duplicate`]).
    pub fn apply(&self, msg: &Message, change: &CloudChange) -> Result<Applied, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let (applied, change_out) = self.apply_in(&tx, msg, change).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        drop(conn);
        if let Some(change) = change_out {
            // No watcher is no error.
            let _ = self.changes.send(change);
        }
        Ok(applied)
    }

    /// [`MetaStore::apply`] for several messages in one transaction and one fsync (group
    /// commit), in order, with exactly the outcomes applying them one by one would have. `None`
    /// when any of them failed or the commit did: nothing of the batch is then stored, and the
    /// caller applies them one by one to learn which failed and why.
    pub fn apply_batch(&self, batch: &[(&Message, &CloudChange)]) -> Option<Vec<Applied>> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction().ok()?;
        let mut applied = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        for (msg, change) in batch {
            // An error drops `tx`, which rolls the whole batch back.
            let (outcome, change_out) = self.apply_in(&tx, msg, change).ok()?;
            applied.push(outcome);
            changes.extend(change_out);
        }
        tx.commit().ok()?;
        drop(conn);
        for change in changes {
            let _ = self.changes.send(change);
        }
        Some(applied)
    }

    /// The writes of one cloud message inside `tx`, and the change to publish once committed.
    fn apply_in(
        &self,
        tx: &Transaction<'_>,
        msg: &Message,
        change: &CloudChange,
    ) -> rusqlite::Result<(Applied, Option<Change>)> {
        let key = change.resource.key();
        if !msg.header.id.is_empty() && journaled(tx, &msg.header.id)? {
            return Ok((Applied::Duplicate, None));
        }
        let stored = stored_state(tx, &key)?;
        let plan = decide::decide(change, stored.as_ref());
        let now = proto::now_millis();
        let change_out = match (&plan, &change.action) {
            (Plan::Upsert { created }, Action::Upsert(value)) => {
                let r = &change.resource;
                let name = r.name.clone().unwrap_or_default();
                tx.execute(
                    "INSERT OR REPLACE INTO meta
                         (key, type, value, namespace, name, resource_version, uid, deleted,
                          updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8)",
                    params![
                        key,
                        r.kind,
                        value,
                        r.namespace,
                        name,
                        change.resource_version.map(to_sql_rv),
                        change.uid,
                        now
                    ],
                )?;
                Some(Change {
                    event: if *created {
                        ChangeEvent::Added
                    } else {
                        ChangeEvent::Modified
                    },
                    object: StoredObject {
                        key: key.clone(),
                        kind: r.kind.clone(),
                        namespace: r.namespace.clone(),
                        name,
                        value: value.clone(),
                        resource_version: change.resource_version,
                    },
                })
            }
            (Plan::Delete, _) => {
                let last = object(tx, &key)?;
                let rv = change
                    .resource_version
                    .max(stored.as_ref().and_then(|s| s.resource_version));
                tx.execute(
                    "UPDATE meta SET deleted = 1, resource_version = ?2, updated_ms = ?3
                     WHERE key = ?1",
                    params![key, rv.map(to_sql_rv), now],
                )?;
                tx.execute(
                    "DELETE FROM meta WHERE deleted = 1 AND key NOT IN
                         (SELECT key FROM meta WHERE deleted = 1
                          ORDER BY updated_ms DESC LIMIT ?1)",
                    [MAX_TOMBSTONES],
                )?;
                last.map(|object| Change {
                    event: ChangeEvent::Deleted,
                    object,
                })
            }
            _ => None,
        };
        self.journal_in(tx, msg)?;
        Ok((Applied::Done(plan), change_out))
    }

    /// Committed changes from now on. A receiver that falls more than 1024 changes behind gets
    /// `Lagged` and should start over (a watch ends; its client re-lists).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The live object under `key`.
    pub fn get(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let conn = lock(&self.conn);
        conn.query_row(
            "SELECT key, type, namespace, name, value, resource_version FROM meta
             WHERE key = ?1 AND deleted = 0",
            [key],
            row_object,
        )
        .optional()
        .map_err(|e| self.err(e))
    }

    /// The live objects of type `kind`, in `namespace` or in all of them, ordered by key.
    pub fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<StoredObject>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn
            .prepare_cached(
                "SELECT key, type, namespace, name, value, resource_version FROM meta
                 WHERE deleted = 0 AND type = ?1 AND (?2 IS NULL OR namespace = ?2)
                 ORDER BY key",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![kind, namespace], row_object)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The highest resource version stored (deleted objects' included): a list's
    /// `metadata.resourceVersion`.
    pub fn max_resource_version(&self) -> Result<u64, StoreError> {
        lock(&self.conn)
            .query_row("SELECT MAX(resource_version) FROM meta", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.map_or(0, |v| v.max(0) as u64))
            .map_err(|e| self.err(e))
    }

    /// Live objects stored.
    pub fn object_count(&self) -> Result<u64, StoreError> {
        self.count("SELECT COUNT(*) FROM meta WHERE deleted = 0")
    }

    /// Up to `limit` journaled cloud messages after `after`, oldest first, as (seq, KubeEdge
    /// JSON). A row that no longer reads as a message (a damaged file) is `null`.
    pub fn journal(&self, after: i64, limit: usize) -> Result<Vec<(i64, Value)>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, head, content_kind, content FROM journal WHERE seq > ?1
                 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    let row = HeadRow {
                        head: r.get(1)?,
                        content_kind: r.get(2)?,
                        content: r.get(3)?,
                    };
                    Ok((r.get::<_, i64>(0)?, row))
                },
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, row) = row.map_err(|e| self.err(e))?;
            let json = row
                .into_message()
                .ok()
                .and_then(|m| serde_json::from_slice(&proto::json::to_vec(&m)).ok())
                .unwrap_or(Value::Null);
            out.push((seq, json));
        }
        Ok(out)
    }

    /// Journal rows.
    pub fn journal_count(&self) -> Result<u64, StoreError> {
        self.count("SELECT COUNT(*) FROM journal")
    }

    /// Whether the message with this id is journaled (was applied).
    pub fn journaled(&self, id: &str) -> Result<bool, StoreError> {
        journaled(&lock(&self.conn), id).map_err(|e| self.err(e))
    }

    /// Why writes fail, while they do.
    pub fn write_problem(&self) -> Option<String> {
        lock(&self.write_problem).clone()
    }

    /// Records why writes fail (`None`: they work); returns the previous state, so the caller
    /// logs an episode's start and end once.
    pub fn set_write_problem(&self, problem: Option<String>) -> Option<String> {
        std::mem::replace(&mut *lock(&self.write_problem), problem)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn journal_in(&self, tx: &Transaction<'_>, msg: &Message) -> rusqlite::Result<()> {
        let row = HeadRow::from_message(msg);
        let id = if msg.header.id.is_empty() {
            proto::new_id()
        } else {
            msg.header.id.clone()
        };
        tx.execute(
            "INSERT INTO journal (id, received_ms, head, content_kind, content)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                proto::now_millis(),
                row.head,
                row.content_kind,
                row.content
            ],
        )?;
        let seq = tx.last_insert_rowid();
        let keep = i64::try_from(self.journal_max).unwrap_or(i64::MAX);
        tx.execute(
            "DELETE FROM journal WHERE seq <= ?1 - ?2",
            params![seq, keep],
        )?;
        Ok(())
    }

    fn count(&self, sql: &str) -> Result<u64, StoreError> {
        lock(&self.conn)
            .query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

/// SQLite integers are signed; versions beyond `i64::MAX` (never seen in practice) saturate.
fn to_sql_rv(rv: u64) -> i64 {
    i64::try_from(rv).unwrap_or(i64::MAX)
}

fn journaled(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT 1 FROM journal WHERE id = ?1", [id], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
}

fn stored_state(conn: &Connection, key: &str) -> rusqlite::Result<Option<StoredState>> {
    conn.query_row(
        "SELECT resource_version, uid, deleted FROM meta WHERE key = ?1",
        [key],
        |r| {
            Ok(StoredState {
                resource_version: r.get::<_, Option<i64>>(0)?.map(|v| v.max(0) as u64),
                uid: r.get(1)?,
                deleted: r.get::<_, i64>(2)? != 0,
            })
        },
    )
    .optional()
}

/// The row under `key`, tombstone or not.
fn object(conn: &Connection, key: &str) -> rusqlite::Result<Option<StoredObject>> {
    conn.query_row(
        "SELECT key, type, namespace, name, value, resource_version FROM meta WHERE key = ?1",
        [key],
        row_object,
    )
    .optional()
}

fn row_object(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredObject> {
    Ok(StoredObject {
        key: r.get(0)?,
        kind: r.get(1)?,
        namespace: r.get(2)?,
        name: r.get(3)?,
        value: r.get(4)?,
        resource_version: r.get::<_, Option<i64>>(5)?.map(|v| v.max(0) as u64),
    })
}

/// Locks a mutex, recovering from poisoning: every critical section is one statement or one
/// transaction, which SQLite keeps consistent whatever happened to the thread.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use proto::Content;
    use serde_json::json;

    use super::*;
    use crate::decide::{Kept, inspect};

    fn msg(id: &str, op: &str, resource: &str, rv: u64) -> Message {
        let mut m = Message::with_header(id, "", 0)
            .route("edgecontroller", "resource", resource, op)
            .content(Content::Json(
                json!({"metadata": {"uid": "u1"}, "data": {"rv": rv}}),
            ));
        m.header.resource_version = rv.to_string();
        m
    }

    fn apply(store: &MetaStore, m: &Message) -> Applied {
        store.apply(m, &inspect(m).unwrap()).unwrap()
    }

    #[test]
    fn applies_in_version_order_journals_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/meta.db");
        let store = MetaStore::open(&path, 100).unwrap();
        let mut watch = store.subscribe();
        let key = "default/configmap/c";
        assert_eq!(
            apply(&store, &msg("a", "insert", key, 5)),
            Applied::Done(Plan::Upsert { created: true })
        );
        assert_eq!(
            apply(&store, &msg("a", "insert", key, 5)),
            Applied::Duplicate
        );
        assert_eq!(
            apply(&store, &msg("b", "update", key, 4)),
            Applied::Done(Plan::Keep(Kept::Older {
                stored: 5,
                incoming: 4
            }))
        );
        assert_eq!(store.get(key).unwrap().unwrap().resource_version, Some(5));
        apply(&store, &msg("c", "update", key, 10));
        assert_eq!(store.journal_count().unwrap(), 3);
        assert_eq!(watch.try_recv().unwrap().event, ChangeEvent::Added);
        assert_eq!(watch.try_recv().unwrap().event, ChangeEvent::Modified);
        assert!(
            watch.try_recv().is_err(),
            "the kept message changed nothing"
        );
        drop(store);

        let store = MetaStore::open(&path, 100).unwrap();
        let got = store.get(key).unwrap().unwrap();
        assert_eq!(got.resource_version, Some(10));
        assert!(got.value.contains("\"rv\":10"), "{}", got.value);
        assert_eq!(
            apply(&store, &msg("c", "update", key, 10)),
            Applied::Duplicate
        );
        assert_eq!(store.max_resource_version().unwrap(), 10);
    }

    #[test]
    fn delete_leaves_a_tombstone_that_keeps_older_versions_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(&dir.path().join("meta.db"), 100).unwrap();
        let key = "default/pod/p";
        apply(&store, &msg("a", "insert", key, 5));
        apply(&store, &msg("x", "insert", "other/pod/q", 6));
        assert_eq!(store.list("pod", None).unwrap().len(), 2);
        assert_eq!(store.list("pod", Some("default")).unwrap().len(), 1);
        assert_eq!(
            apply(&store, &msg("b", "delete", key, 5)),
            Applied::Done(Plan::Delete)
        );
        assert_eq!(store.get(key).unwrap(), None);
        assert_eq!(store.list("pod", Some("default")).unwrap(), vec![]);
        assert_eq!(
            apply(&store, &msg("c", "update", key, 5)),
            Applied::Done(Plan::Keep(Kept::Older {
                stored: 5,
                incoming: 5
            }))
        );
        assert_eq!(
            apply(&store, &msg("d", "update", key, 7)),
            Applied::Done(Plan::Upsert { created: true })
        );
        assert!(store.get(key).unwrap().is_some());
        assert_eq!(store.object_count().unwrap(), 2);
    }

    #[test]
    fn journal_is_bounded_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(&dir.path().join("meta.db"), 3).unwrap();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            apply(
                &store,
                &msg(id, "update", "default/configmap/c", i as u64 + 1),
            );
        }
        assert_eq!(store.journal_count().unwrap(), 3);
        assert!(!store.journaled("a").unwrap());
        let rows = store.journal(0, 10).unwrap();
        let ids: Vec<&str> = rows
            .iter()
            .map(|(_, m)| m["header"]["msg_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["b", "c", "d"]);
        assert_eq!(store.journal(rows[1].0, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_batch_has_the_outcomes_of_one_by_one_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let batched = MetaStore::open(&dir.path().join("batched.db"), 100).unwrap();
        let single = MetaStore::open(&dir.path().join("single.db"), 100).unwrap();
        let (c, p) = ("default/configmap/c", "default/pod/p");
        let messages = [
            msg("a", "insert", c, 5),
            msg("a", "insert", c, 5),
            msg("b", "update", c, 4),
            msg("d", "insert", p, 1),
            msg("e", "delete", p, 2),
            msg("f", "update", c, 9),
        ];
        let changes: Vec<CloudChange> = messages.iter().map(|m| inspect(m).unwrap()).collect();
        let mut watch = batched.subscribe();
        let batch: Vec<(&Message, &CloudChange)> = messages.iter().zip(&changes).collect();
        let outcomes = batched.apply_batch(&batch).expect("the batch commits");
        let expected: Vec<Applied> = messages.iter().map(|m| apply(&single, m)).collect();
        assert_eq!(outcomes, expected);
        assert_eq!(outcomes[1], Applied::Duplicate);
        for store in [&batched, &single] {
            assert_eq!(store.get(c).unwrap().unwrap().resource_version, Some(9));
            assert_eq!(store.get(p).unwrap(), None);
            assert_eq!(store.journal_count().unwrap(), 5);
        }
        let events: Vec<ChangeEvent> = std::iter::from_fn(|| watch.try_recv().ok())
            .map(|change| change.event)
            .collect();
        assert_eq!(
            events,
            [
                ChangeEvent::Added,
                ChangeEvent::Added,
                ChangeEvent::Deleted,
                ChangeEvent::Modified
            ]
        );
    }

    #[test]
    fn a_failing_batch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(&dir.path().join("meta.db"), 100).unwrap();
        // A trigger that refuses one object makes the batch fail part-way.
        lock(&store.conn)
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON meta WHEN NEW.name = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let messages = [
            msg("a", "insert", "default/configmap/good", 1),
            msg("b", "insert", "default/configmap/bad", 1),
        ];
        let changes: Vec<CloudChange> = messages.iter().map(|m| inspect(m).unwrap()).collect();
        let batch: Vec<(&Message, &CloudChange)> = messages.iter().zip(&changes).collect();
        assert_eq!(store.apply_batch(&batch), None);
        assert_eq!(store.object_count().unwrap(), 0);
        assert_eq!(store.journal_count().unwrap(), 0);
        // One by one, the good one is stored and the bad one fails.
        assert!(store.apply(&messages[0], &changes[0]).is_ok());
        assert!(store.apply(&messages[1], &changes[1]).is_err());
        assert_eq!(store.object_count().unwrap(), 1);
    }
}
