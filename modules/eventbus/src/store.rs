//! The topics the cloud subscribed, in SQLite (KubeEdge's table `sub_topics`), so they are
//! subscribed again after a restart.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _, params};

/// Why the topic store failed.
#[derive(Debug, thiserror::Error)]
#[error("eventbus topic store {path}: {source}")]
pub struct StoreError {
    path: String,
    #[source]
    source: rusqlite::Error,
}

/// The `sub_topics` table.
#[derive(Debug)]
pub struct TopicStore {
    conn: Connection,
    path: String,
}

impl TopicStore {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let err = |source| StoreError {
            path: shown.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory shows as SQLite's "unable to open" below, with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS sub_topics (topic TEXT PRIMARY KEY NOT NULL);",
        )
        .map_err(err)?;
        Ok(Self { conn, path: shown })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    /// Remembers a topic; true if it was new.
    pub fn insert(&self, topic: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO sub_topics (topic) VALUES (?1)",
                params![topic],
            )
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Forgets a topic; true if it was there.
    pub fn remove(&self, topic: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM sub_topics WHERE topic = ?1", params![topic])
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Whether a topic is remembered.
    pub fn contains(&self, topic: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT 1 FROM sub_topics WHERE topic = ?1",
                params![topic],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.err(e))
    }

    /// Every remembered topic, sorted (none is an empty list, not an error: M17).
    pub fn all(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT topic FROM sub_topics ORDER BY topic")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_survive_reopening_and_empty_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/eventbus.db");
        let s = TopicStore::open(&path).unwrap();
        assert!(s.all().unwrap().is_empty());
        assert!(s.insert("default/a").unwrap());
        assert!(!s.insert("default/a").unwrap());
        assert!(s.insert("default/b").unwrap());
        drop(s);
        let s = TopicStore::open(&path).unwrap();
        assert_eq!(s.all().unwrap(), ["default/a", "default/b"]);
        assert!(s.remove("default/a").unwrap());
        assert!(!s.remove("default/a").unwrap());
        assert!(!s.contains("default/a").unwrap());
        assert_eq!(s.all().unwrap(), ["default/b"]);
    }
}
