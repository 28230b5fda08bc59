//! The ObjectSync rows, durable: one SQLite row per node and object (what the node ACKed and
//! the message outstanding for it), written through on every change so a restarted cloudcore
//! knows exactly what each node holds.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, params};

use crate::planner::{Outstanding, SyncRow};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS object_sync (
    node TEXT NOT NULL,
    resource TEXT NOT NULL,
    uid TEXT NOT NULL,
    acked_rv INTEGER NOT NULL,
    out_id TEXT,
    out_rv INTEGER,
    out_uid TEXT,
    out_delete INTEGER,
    out_failures INTEGER,
    out_retry_at_ms INTEGER,
    PRIMARY KEY (node, resource)
) WITHOUT ROWID;
";

/// The ObjectSync table.
#[derive(Debug)]
pub(crate) struct SyncStore {
    conn: Connection,
}

type Rows = BTreeMap<String, BTreeMap<String, SyncRow>>;

impl SyncStore {
    pub(crate) fn open(path: &Path) -> rusqlite::Result<Self> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    pub(crate) fn load(&self) -> rusqlite::Result<Rows> {
        let mut stmt = self.conn.prepare(
            "SELECT node, resource, uid, acked_rv, out_id, out_rv, out_uid, out_delete,
                    out_failures, out_retry_at_ms FROM object_sync",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Rows::new();
        while let Some(r) = rows.next()? {
            let out_id: Option<String> = r.get(4)?;
            let row = SyncRow {
                uid: r.get(2)?,
                acked_rv: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                out: match out_id {
                    Some(id) => Some(Outstanding {
                        id,
                        rv: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                        uid: r.get(6)?,
                        delete: r.get::<_, i64>(7)? != 0,
                        failures: u32::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                        retry_at_ms: r.get(9)?,
                    }),
                    None => None,
                },
            };
            out.entry(r.get(0)?).or_default().insert(r.get(1)?, row);
        }
        Ok(out)
    }

    pub(crate) fn save(&self, node: &str, key: &str, row: &SyncRow) -> rusqlite::Result<()> {
        let o = row.out.as_ref();
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO object_sync (node, resource, uid, acked_rv, out_id, out_rv,
                    out_uid, out_delete, out_failures, out_retry_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                node,
                key,
                row.uid,
                i64::try_from(row.acked_rv).unwrap_or(i64::MAX),
                o.map(|o| o.id.clone()),
                o.map(|o| i64::try_from(o.rv).unwrap_or(i64::MAX)),
                o.map(|o| o.uid.clone()),
                o.map(|o| i64::from(o.delete)),
                o.map(|o| i64::from(o.failures)),
                o.and_then(|o| o.retry_at_ms),
            ])?;
        Ok(())
    }

    pub(crate) fn forget(&self, node: &str, key: &str) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM object_sync WHERE node = ?1 AND resource = ?2")?
            .execute(params![node, key])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("objectsync.db");
        let row = SyncRow {
            uid: "u".into(),
            acked_rv: 3,
            out: Some(Outstanding {
                id: "m".into(),
                rv: 4,
                uid: "u".into(),
                delete: false,
                failures: 2,
                retry_at_ms: Some(99),
            }),
        };
        {
            let s = SyncStore::open(&path).unwrap();
            s.save("edge-1", "default/pod/p", &row).unwrap();
            s.save("edge-1", "default/pod/q", &SyncRow::default())
                .unwrap();
            s.forget("edge-1", "default/pod/q").unwrap();
        }
        let s = SyncStore::open(&path).unwrap();
        let rows = s.load().unwrap();
        assert_eq!(rows["edge-1"].len(), 1);
        assert_eq!(rows["edge-1"]["default/pod/p"], row);
    }
}
