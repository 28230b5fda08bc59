//! devicetwin's SQLite file with KubeEdge's tables (`device`, `device_attr`, `device_twin`,
//! MODULES.md §2.1, §5.1): column names and value encodings as KubeEdge writes them
//! (`expected_meta` `{"timestamp":ms}`, versions `{"cloud":N,"edge":M}`, `attr_type` the value
//! type, `metadata` `{"type":…}`), so the rows read the same to anyone who knows KubeEdge's.
//!
//! Its own file, not metamanager's: devicetwin writes on every report, and a separate file keeps
//! those writes from waiting on metamanager's lock (and metamanager's ACKs from waiting on
//! them); each schema is migrated by the module that owns it. A device is saved whole in one
//! transaction, so a crash leaves the last saved state, never half an update.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, params};
use serde_json::{Value, json};

use crate::twin::{Device, Stamped, Twin, Version};

/// The store (one connection; the module is its only user).
#[derive(Debug)]
pub struct TwinStore {
    conn: Connection,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (a full disk, a locked or damaged file); nothing of the operation was kept.
    #[error("devicetwin database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl TwinStore {
    /// Opens (creating) the file at `path` and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS device (
                 id TEXT PRIMARY KEY, name TEXT, description TEXT, state TEXT, last_online TEXT);
             CREATE TABLE IF NOT EXISTS device_attr (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, deviceid TEXT, name TEXT,
                 description TEXT, value TEXT, optional NUMERIC, attr_type TEXT, metadata TEXT);
             CREATE TABLE IF NOT EXISTS device_twin (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, deviceid TEXT, name TEXT,
                 description TEXT, expected TEXT, actual TEXT, expected_meta TEXT,
                 actual_meta TEXT, expected_version TEXT, actual_version TEXT,
                 optional NUMERIC, attr_type TEXT, metadata TEXT);
             CREATE UNIQUE INDEX IF NOT EXISTS device_twin_key ON device_twin (deviceid, name);",
        )?;
        Ok(Self { conn })
    }

    /// Every device with its twins, by id.
    pub fn load(&self) -> Result<BTreeMap<String, Device>, StoreError> {
        let mut devices = BTreeMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, description, state, last_online FROM device")?;
        let rows = stmt.query_map([], |r| {
            Ok(Device {
                id: r.get(0)?,
                name: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                description: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                state: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                last_online: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                twins: BTreeMap::new(),
            })
        })?;
        for d in rows {
            let d = d?;
            devices.insert(d.id.clone(), d);
        }
        let mut stmt = self.conn.prepare(
            "SELECT deviceid, name, expected, actual, expected_meta, actual_meta,
                    expected_version, actual_version, optional, attr_type FROM device_twin",
        )?;
        let rows = stmt.query_map([], |r| {
            let side = |value: Option<String>, meta: Option<String>| {
                value.map(|value| Stamped {
                    value,
                    timestamp: json_of(meta)["timestamp"].as_i64().unwrap_or(0),
                })
            };
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                Twin {
                    expected: side(r.get(2)?, r.get(4)?),
                    actual: side(r.get(3)?, r.get(5)?),
                    expected_version: Version::from_json(&json_of(r.get(6)?)),
                    actual_version: Version::from_json(&json_of(r.get(7)?)),
                    optional: r.get::<_, Option<bool>>(8)?.unwrap_or(true),
                    value_type: r
                        .get::<_, Option<String>>(9)?
                        .unwrap_or_else(|| "string".into()),
                },
            ))
        })?;
        for row in rows {
            let (device, name, twin) = row?;
            if let Some(d) = devices.get_mut(&device) {
                d.twins.insert(name, twin);
            }
        }
        Ok(devices)
    }

    /// Saves `device` whole (its row and exactly its twins) in one transaction.
    pub fn save(&mut self, device: &Device) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO device (id, name, description, state, last_online)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                device.id,
                device.name,
                device.description,
                device.state,
                device.last_online
            ],
        )?;
        tx.execute("DELETE FROM device_twin WHERE deviceid = ?1", [&device.id])?;
        for (name, t) in &device.twins {
            let meta = |s: &Option<Stamped>| {
                s.as_ref()
                    .map(|s| json!({"timestamp": s.timestamp}).to_string())
            };
            tx.execute(
                "INSERT INTO device_twin (deviceid, name, description, expected, actual,
                     expected_meta, actual_meta, expected_version, actual_version, optional,
                     attr_type, metadata)
                 VALUES (?1, ?2, '', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    device.id,
                    name,
                    t.expected.as_ref().map(|s| &s.value),
                    t.actual.as_ref().map(|s| &s.value),
                    meta(&t.expected),
                    meta(&t.actual),
                    t.expected_version.to_json().to_string(),
                    t.actual_version.to_json().to_string(),
                    t.optional,
                    t.value_type,
                    json!({"type": t.value_type}).to_string(),
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes a device, its attributes and twins.
    pub fn remove(&mut self, id: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM device_twin WHERE deviceid = ?1", [id])?;
        tx.execute("DELETE FROM device_attr WHERE deviceid = ?1", [id])?;
        tx.execute("DELETE FROM device WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }
}

fn json_of(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_twins_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devicetwin.db");
        let mut d = Device::new("default/a", "a", "lab");
        d.state = "online".into();
        let mut t = Twin {
            expected: Some(Stamped {
                value: "25".into(),
                timestamp: 7,
            }),
            actual: None,
            expected_version: Version { cloud: 2, edge: 0 },
            actual_version: Version::default(),
            optional: false,
            value_type: "int".into(),
        };
        d.twins.insert("setpoint".into(), t.clone());
        {
            let mut s = TwinStore::open(&path).unwrap();
            s.save(&d).unwrap();
            s.save(&Device::new("default/b", "b", "")).unwrap();
            s.remove("default/b").unwrap();
        }
        let mut s = TwinStore::open(&path).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded["default/a"], d);
        // A twin removed from the device is removed from the table.
        t.value_type = "string".into();
        d.twins.clear();
        d.twins.insert("other".into(), t);
        s.save(&d).unwrap();
        assert_eq!(s.load().unwrap()["default/a"], d);
    }
}
