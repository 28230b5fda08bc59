//! [`SqliteObjects`]: the object store in its own SQLite file (WAL, `synchronous=FULL`) beside
//! the message store. One connection behind a mutex: every write is one short transaction that
//! takes the next resourceVersion, writes the row and commits, and only then is the change
//! published to watchers (under the same lock, so the live feed is in resourceVersion order).
//!
//! Table `objects` holds one row per object (the live object, or its tombstone) keyed by
//! (resource, namespace, name); `object_meta` holds the last resourceVersion given and the
//! compaction floor (the newest purged tombstone's version).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::model::{ObjectKind, Selector, prepare};
use super::{Change, ChangeKind, ObjectError, ObjectSource, StoredObject};

/// Capacity of the live change feed; a slower watcher catches up from the table.
const FEED: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    resource TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    rv INTEGER NOT NULL,
    created_rv INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (resource, namespace, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_rv ON objects(rv);
CREATE TABLE IF NOT EXISTS object_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// What a `PUT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new object (201).
    Created,
    /// A new version of an existing one (200).
    Updated,
    /// The same object again: nothing was written, the version is unchanged (200).
    Unchanged,
}

/// The SQLite object store. Share it behind an `Arc`.
#[derive(Debug)]
pub struct SqliteObjects {
    conn: Mutex<Connection>,
    feed: broadcast::Sender<Change>,
}

impl SqliteObjects {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, ObjectError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ObjectError::Corrupt(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let (feed, _) = broadcast::channel(FEED);
        Ok(Self {
            conn: Mutex::new(conn),
            feed,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last resourceVersion given (0 for an empty store): what a list reports, and where a
    /// watch that wants only new changes starts.
    pub fn current_rv(&self) -> Result<u64, ObjectError> {
        meta(&self.lock(), "rv")
    }

    /// The oldest resourceVersion a watch may resume from.
    pub fn floor(&self) -> Result<u64, ObjectError> {
        meta(&self.lock(), "floor")
    }

    /// Creates or replaces `{namespace}/{kind}/{name}` with `body` (checked by
    /// [`prepare`]). A conditional write (`metadata.resourceVersion` given) succeeds only if
    /// the stored live object has exactly that version. The uid and creationTimestamp of an
    /// existing object are kept; a body without `status` keeps the stored status (what the edge
    /// reported). Writing the same object again changes nothing.
    pub fn put(
        &self,
        kind: &ObjectKind,
        namespace: &str,
        name: &str,
        body: Value,
    ) -> Result<(StoredObject, PutOutcome), ObjectError> {
        let namespace = if kind.namespaced { namespace } else { "" };
        let prepared = prepare(kind, namespace, name, body)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing = select(&tx, kind.resource, namespace, name)?.filter(|o| !o.deleted);
        if let Some(expected) = prepared.expected_rv {
            match &existing {
                Some(o) if o.rv == expected => {}
                Some(o) => {
                    return Err(ObjectError::Conflict(format!(
                        "{} {namespace}/{name} has resourceVersion {}, not {expected}: it changed \
                         since it was read; read it again and reapply",
                        kind.kind, o.rv
                    )));
                }
                None => {
                    return Err(ObjectError::Conflict(format!(
                        "{} {namespace}/{name} does not exist, so it cannot have \
                         resourceVersion {expected}",
                        kind.kind
                    )));
                }
            }
        }
        let mut body = prepared.body;
        let (uid, created_at, outcome) = match &existing {
            Some(o) => {
                if body.get("status").is_none() {
                    if let Some(status) = o.body.get("status") {
                        body["status"] = status.clone();
                    }
                }
                let meta = &o.body["metadata"];
                (
                    o.uid.clone(),
                    meta["creationTimestamp"].clone(),
                    PutOutcome::Updated,
                )
            }
            None => (proto::new_id(), json!(now_rfc3339()), PutOutcome::Created),
        };
        body["metadata"]["uid"] = json!(uid);
        body["metadata"]["creationTimestamp"] = created_at;
        if let Some(o) = &existing {
            let mut same = body.clone();
            same["metadata"]["resourceVersion"] = json!(o.rv.to_string());
            if same == o.body {
                return Ok((o.clone(), PutOutcome::Unchanged));
            }
        }
        let rv = next_rv(&tx)?;
        body["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = StoredObject {
            resource: kind.resource.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid,
            rv,
            created_rv: existing.as_ref().map_or(rv, |o| o.created_rv),
            deleted: false,
            body,
        };
        upsert(&tx, &object)?;
        tx.commit()?;
        let change = if outcome == PutOutcome::Created {
            ChangeKind::Added
        } else {
            ChangeKind::Modified
        };
        self.publish(&object, change);
        Ok((object, outcome))
    }

    /// Deletes `{namespace}/{kind}/{name}`: it becomes a tombstone (the last object) under a new
    /// resourceVersion, which is returned. `NotFound` if there is no live object.
    pub fn delete(
        &self,
        kind: &ObjectKind,
        namespace: &str,
        name: &str,
    ) -> Result<StoredObject, ObjectError> {
        let namespace = if kind.namespaced { namespace } else { "" };
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(mut object) = select(&tx, kind.resource, namespace, name)?.filter(|o| !o.deleted)
        else {
            return Err(not_found(kind, namespace, name));
        };
        let rv = next_rv(&tx)?;
        object.rv = rv;
        object.deleted = true;
        object.body["metadata"]["resourceVersion"] = json!(rv.to_string());
        upsert(&tx, &object)?;
        tx.commit()?;
        self.publish(&object, ChangeKind::Deleted);
        Ok(object)
    }

    /// Live objects of `kind` (in `namespace`, or every namespace with `None`) that `selector`
    /// selects, by namespace and name, and the store's resourceVersion at the time.
    pub fn list(
        &self,
        kind: &ObjectKind,
        namespace: Option<&str>,
        selector: &Selector,
    ) -> Result<(Vec<StoredObject>, u64), ObjectError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT resource, namespace, name, uid, rv, deleted, body, created_rv FROM objects
             WHERE resource = ?1 AND deleted = 0 AND (?2 IS NULL OR namespace = ?2)
             ORDER BY namespace, name",
        )?;
        let rows = stmt.query_map(params![kind.resource, namespace], read_row)?;
        let mut out = Vec::new();
        for row in rows {
            let object = row??;
            if selector.matches(object.labels()) {
                out.push(object);
            }
        }
        drop(stmt);
        let rv = meta(&conn, "rv")?;
        Ok((out, rv))
    }

    /// Live objects and tombstones: how many of each (for tests and metrics).
    pub fn counts(&self) -> Result<(u64, u64), ObjectError> {
        let conn = self.lock();
        let (live, dead): (i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(deleted = 0), 0), COALESCE(SUM(deleted = 1), 0) FROM objects",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((to_u64(live), to_u64(dead)))
    }

    fn publish(&self, object: &StoredObject, kind: ChangeKind) {
        // No watcher is fine: the change is in the table.
        let _ = self.feed.send(Change {
            object: Arc::new(object.clone()),
            kind,
        });
    }
}

impl ObjectSource for SqliteObjects {
    fn changed_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<StoredObject>>, ObjectError> {
        let conn = self.lock();
        let floor = meta(&conn, "floor")?;
        if after < floor {
            return Err(ObjectError::Gone {
                asked: after,
                floor,
            });
        }
        let mut stmt = conn.prepare_cached(
            "SELECT resource, namespace, name, uid, rv, deleted, body, created_rv FROM objects
             WHERE rv > ?1 ORDER BY rv LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![to_i64(after), i64::try_from(limit).unwrap_or(i64::MAX)],
            read_row,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Arc::new(row??));
        }
        Ok(out)
    }

    fn get(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<StoredObject>, ObjectError> {
        Ok(select(&self.lock(), resource, namespace, name)?.filter(|o| !o.deleted))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    fn write_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        status: Value,
    ) -> Result<Option<StoredObject>, ObjectError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(mut object) = select(&tx, resource, namespace, name)?.filter(|o| !o.deleted)
        else {
            return Ok(None);
        };
        if uid.is_some_and(|u| !u.is_empty() && u != object.uid) {
            return Ok(None);
        }
        if object.body.get("status") == Some(&status) {
            return Ok(Some(object));
        }
        let rv = next_rv(&tx)?;
        object.rv = rv;
        object.body["status"] = status;
        object.body["metadata"]["resourceVersion"] = json!(rv.to_string());
        upsert(&tx, &object)?;
        tx.commit()?;
        self.publish(&object, ChangeKind::Modified);
        Ok(Some(object))
    }

    fn create_if_absent(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        body: Value,
    ) -> Result<StoredObject, ObjectError> {
        let kind = super::model::kind_by_resource(resource)
            .ok_or_else(|| ObjectError::UnknownResource(resource.to_owned()))?;
        if let Some(o) = ObjectSource::get(self, resource, namespace, name)? {
            return Ok(o);
        }
        match self.put(kind, namespace, name, body) {
            Ok((o, _)) => Ok(o),
            // Written meanwhile by someone else: theirs stands.
            Err(ObjectError::Conflict(_)) => ObjectSource::get(self, resource, namespace, name)?
                .ok_or_else(|| not_found(kind, namespace, name)),
            Err(e) => Err(e),
        }
    }

    fn purge_tombstone(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        rv: u64,
    ) -> Result<(), ObjectError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let gone = tx.execute(
            "DELETE FROM objects WHERE resource = ?1 AND namespace = ?2 AND name = ?3
             AND deleted = 1 AND rv = ?4",
            params![resource, namespace, name, to_i64(rv)],
        )?;
        if gone > 0 {
            tx.execute(
                "INSERT INTO object_meta (key, value) VALUES ('floor', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                [to_i64(rv)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn not_found(kind: &ObjectKind, namespace: &str, name: &str) -> ObjectError {
    if namespace.is_empty() {
        ObjectError::NotFound(format!("{} {name:?}", kind.resource))
    } else {
        ObjectError::NotFound(format!("{} \"{namespace}/{name}\"", kind.resource))
    }
}

fn select(
    conn: &Connection,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<StoredObject>, ObjectError> {
    conn.prepare_cached(
        "SELECT resource, namespace, name, uid, rv, deleted, body, created_rv FROM objects
         WHERE resource = ?1 AND namespace = ?2 AND name = ?3",
    )?
    .query_row(params![resource, namespace, name], read_row)
    .optional()?
    .transpose()
}

fn upsert(conn: &Connection, o: &StoredObject) -> Result<(), ObjectError> {
    conn.prepare_cached(
        "INSERT INTO objects (resource, namespace, name, uid, rv, deleted, body, created_rv)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (resource, namespace, name) DO UPDATE SET uid = excluded.uid,
             rv = excluded.rv, deleted = excluded.deleted, body = excluded.body,
             created_rv = excluded.created_rv",
    )?
    .execute(params![
        o.resource,
        o.namespace,
        o.name,
        o.uid,
        to_i64(o.rv),
        i64::from(o.deleted),
        o.body.to_string(),
        to_i64(o.created_rv)
    ])?;
    Ok(())
}

/// A row; the outer error is SQLite's, the inner one a body that is not JSON.
fn read_row(row: &Row<'_>) -> rusqlite::Result<Result<StoredObject, ObjectError>> {
    let text: String = row.get(6)?;
    let object = |body| StoredObject {
        resource: row.get(0).unwrap_or_default(),
        namespace: row.get(1).unwrap_or_default(),
        name: row.get(2).unwrap_or_default(),
        uid: row.get(3).unwrap_or_default(),
        rv: to_u64(row.get(4).unwrap_or_default()),
        deleted: row.get::<_, i64>(5).unwrap_or_default() != 0,
        body,
        created_rv: to_u64(row.get(7).unwrap_or_default()),
    };
    Ok(serde_json::from_str(&text)
        .map(object)
        .map_err(|e| ObjectError::Corrupt(format!("object body: {e}"))))
}

fn meta(conn: &Connection, key: &str) -> Result<u64, ObjectError> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT value FROM object_meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(v.map_or(0, to_u64))
}

/// Takes the next resourceVersion inside the caller's transaction.
fn next_rv(conn: &Connection) -> Result<u64, ObjectError> {
    let rv: i64 = conn
        .prepare_cached(
            "INSERT INTO object_meta (key, value) VALUES ('rv', 1)
             ON CONFLICT(key) DO UPDATE SET value = value + 1 RETURNING value",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(to_u64(rv))
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::model::kind_by_resource;
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteObjects) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteObjects::open(&dir.path().join("objects.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn versions_increase_and_deletes_leave_tombstones() {
        let (_dir, s) = store();
        let cm = kind_by_resource("configmaps").unwrap();
        let (a, out) = s
            .put(cm, "default", "a", json!({"data": {"k": "1"}}))
            .unwrap();
        assert_eq!((a.rv, out), (1, PutOutcome::Created));
        let (same, out) = s
            .put(cm, "default", "a", json!({"data": {"k": "1"}}))
            .unwrap();
        assert_eq!((same.rv, out), (1, PutOutcome::Unchanged));
        let (b, out) = s
            .put(cm, "default", "a", json!({"data": {"k": "2"}}))
            .unwrap();
        assert_eq!(
            (b.rv, out, b.uid.clone()),
            (2, PutOutcome::Updated, a.uid.clone())
        );
        // A stale conditional update changes nothing.
        let stale = json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "3"}});
        assert_eq!(
            s.put(cm, "default", "a", stale).unwrap_err().status_code(),
            (409, "conflict")
        );
        let gone = s.delete(cm, "default", "a").unwrap();
        assert_eq!((gone.rv, gone.deleted), (3, true));
        assert!(
            ObjectSource::get(&s, "configmaps", "default", "a")
                .unwrap()
                .is_none()
        );
        assert_eq!(s.counts().unwrap(), (0, 1));
        let changed = s.changed_since(0, 10).unwrap();
        assert_eq!(changed.len(), 1);
        assert!(changed[0].deleted);
        s.purge_tombstone("configmaps", "default", "a", 3).unwrap();
        assert_eq!(s.counts().unwrap(), (0, 0));
        assert!(matches!(
            s.changed_since(2, 10),
            Err(ObjectError::Gone { .. })
        ));
        assert!(s.changed_since(3, 10).unwrap().is_empty());
    }

    #[test]
    fn status_survives_a_reapply() {
        let (_dir, s) = store();
        let pod = kind_by_resource("pods").unwrap();
        let (p, _) = s
            .put(pod, "default", "p", json!({"spec": {"nodeName": "e"}}))
            .unwrap();
        let st = s
            .write_status(
                "pods",
                "default",
                "p",
                Some(&p.uid),
                json!({"phase": "Running"}),
            )
            .unwrap()
            .unwrap();
        assert_eq!(st.rv, 2);
        let (again, out) = s
            .put(pod, "default", "p", json!({"spec": {"nodeName": "e"}}))
            .unwrap();
        assert_eq!((again.rv, out), (2, PutOutcome::Unchanged));
        assert!(
            s.write_status("pods", "default", "p", Some("other"), json!({}))
                .unwrap()
                .is_none()
        );
    }
}
