//! The sync planner (pure, no I/O): from what a node should hold (placement) and what the cloud
//! knows the node holds (the ObjectSync rows: per object the last resourceVersion the node
//! ACKed, and the message outstanding for it), which messages to send now. KubeEdge's
//! synccontroller, done right:
//!
//! - an object whose version the node lacks gets one message with the newest version; a newer
//!   version while one is outstanding *replaces* it in the node's queue (the caller sends with
//!   [`cloudhub::Hub::send_superseding`]), so after an outage the node receives one message per
//!   changed object, not one per change;
//! - an object the node holds that it should not (deleted, or no pod there references it any
//!   more) gets a `delete`;
//! - a delivery the edge refused (op `error`) is re-sent after a backoff that doubles up to
//!   [`MAX_BACKOFF_MS`], for ever: nothing is dropped after N retries.

use std::collections::BTreeMap;

/// The longest wait before a refused delivery is sent again.
pub const MAX_BACKOFF_MS: i64 = 60_000;
/// The first wait.
pub const FIRST_BACKOFF_MS: i64 = 1_000;

/// What the cloud knows of one object on one node (an ObjectSync row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncRow {
    /// The object's uid the node ACKed.
    pub uid: String,
    /// The last resourceVersion the node ACKed (0: none).
    pub acked_rv: u64,
    /// The message sent for it and not yet answered.
    pub out: Option<Outstanding>,
}

/// A message sent for an object and not yet ACKed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outstanding {
    /// Message id.
    pub id: String,
    /// The version it carries (of the deletion, for a delete).
    pub rv: u64,
    /// The uid it carries.
    pub uid: String,
    /// A delete.
    pub delete: bool,
    /// Refusals so far.
    pub failures: u32,
    /// When a refused delivery may be sent again (Unix ms); `None` while waiting for the answer.
    pub retry_at_ms: Option<i64>,
}

/// What a node should hold of one object: its version and uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// resourceVersion.
    pub rv: u64,
    /// uid.
    pub uid: String,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the object's current version (`insert` if the node never had it, else `update`).
    Send {
        /// Wire resource.
        key: String,
        /// The node has no version of it yet.
        first: bool,
    },
    /// Tell the node the object is gone.
    Delete {
        /// Wire resource.
        key: String,
    },
    /// Drop the row: the node never had it and nothing is outstanding.
    Forget {
        /// Wire resource.
        key: String,
    },
}

/// The messages to send to one node now.
pub fn plan(
    wants: &BTreeMap<String, Want>,
    rows: &BTreeMap<String, SyncRow>,
    now_ms: i64,
) -> Vec<Action> {
    let due = |o: &Outstanding| o.retry_at_ms.is_some_and(|t| t <= now_ms);
    let mut actions = Vec::new();
    for (key, want) in wants {
        let row = rows.get(key);
        let held = row.filter(|r| r.uid == want.uid).map_or(0, |r| r.acked_rv);
        if held >= want.rv {
            continue;
        }
        if let Some(o) = row.and_then(|r| r.out.as_ref()) {
            if !o.delete && o.rv == want.rv && o.uid == want.uid && !due(o) {
                continue;
            }
        }
        actions.push(Action::Send {
            key: key.clone(),
            first: row.is_none_or(|r| r.acked_rv == 0),
        });
    }
    for (key, row) in rows {
        if wants.contains_key(key) {
            continue;
        }
        match &row.out {
            Some(o) if o.delete && !due(o) => {}
            None if row.acked_rv == 0 => actions.push(Action::Forget { key: key.clone() }),
            _ => actions.push(Action::Delete { key: key.clone() }),
        }
    }
    actions
}

/// What an answer does to the row of the message it answers: an ACK records the version (or
/// drops the row after a delete: `None`); a refusal schedules a resend with backoff.
pub fn answered(mut row: SyncRow, id: &str, refused: bool, now_ms: i64) -> Option<SyncRow> {
    let Some(out) = row.out.as_mut().filter(|o| o.id == id) else {
        return Some(row);
    };
    if refused {
        out.failures += 1;
        let backoff = FIRST_BACKOFF_MS
            .saturating_mul(1 << out.failures.saturating_sub(1).min(16))
            .min(MAX_BACKOFF_MS);
        out.retry_at_ms = Some(now_ms + backoff);
        return Some(row);
    }
    let out = row.out.take()?;
    if out.delete {
        return None;
    }
    row.acked_rv = out.rv;
    row.uid = out.uid;
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(rv: u64) -> Want {
        Want {
            rv,
            uid: "u".into(),
        }
    }

    fn acked(rv: u64) -> SyncRow {
        SyncRow {
            uid: "u".into(),
            acked_rv: rv,
            out: None,
        }
    }

    fn sent(rv: u64, delete: bool) -> Outstanding {
        Outstanding {
            id: format!("m{rv}"),
            rv,
            uid: "u".into(),
            delete,
            failures: 0,
            retry_at_ms: None,
        }
    }

    fn map<T>(items: impl IntoIterator<Item = (&'static str, T)>) -> BTreeMap<String, T> {
        items.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn only_what_the_node_lacks_is_sent() {
        let wants = map([("a", want(5)), ("b", want(7)), ("c", want(9))]);
        let rows = map([
            ("a", acked(5)),
            ("b", acked(3)),
            // Outstanding with the current version: wait for its answer.
            (
                "c",
                SyncRow {
                    out: Some(sent(9, false)),
                    ..SyncRow::default()
                },
            ),
            ("gone", acked(2)),
            ("never", SyncRow::default()),
        ]);
        assert_eq!(
            plan(&wants, &rows, 0),
            [
                Action::Send {
                    key: "b".into(),
                    first: false
                },
                Action::Delete { key: "gone".into() },
                Action::Forget {
                    key: "never".into()
                },
            ]
        );
        // A new object: insert.
        assert_eq!(
            plan(&map([("n", want(1))]), &BTreeMap::new(), 0),
            [Action::Send {
                key: "n".into(),
                first: true
            }]
        );
    }

    #[test]
    fn a_newer_version_replaces_the_outstanding_one() {
        let wants = map([("a", want(8))]);
        let rows = map([(
            "a",
            SyncRow {
                out: Some(sent(6, false)),
                ..acked(2)
            },
        )]);
        assert_eq!(
            plan(&wants, &rows, 0),
            [Action::Send {
                key: "a".into(),
                first: false
            }]
        );
    }

    #[test]
    fn a_recreated_object_is_sent_again() {
        let wants = map([(
            "a",
            Want {
                rv: 3,
                uid: "new".into(),
            },
        )]);
        let rows = map([("a", acked(9))]);
        assert_eq!(
            plan(&wants, &rows, 0),
            [Action::Send {
                key: "a".into(),
                first: false
            }]
        );
    }

    #[test]
    fn refusals_are_retried_with_backoff_forever() {
        let mut row = SyncRow {
            out: Some(sent(4, false)),
            ..SyncRow::default()
        };
        let wants = map([("a", want(4))]);
        let mut last = 0;
        for n in 1..=30u32 {
            row = answered(row, "m4", true, 0).unwrap();
            let at = row.out.as_ref().unwrap().retry_at_ms.unwrap();
            assert!(at >= last && at <= MAX_BACKOFF_MS, "{n}: {at}");
            last = at;
            let rows = map([("a", row.clone())]);
            assert!(plan(&wants, &rows, at - 1).is_empty());
            assert_eq!(plan(&wants, &rows, at).len(), 1, "due after {n} refusals");
        }
        assert_eq!(last, MAX_BACKOFF_MS);
        // The ACK records the version; an answer to another id changes nothing.
        let same = answered(row.clone(), "other", false, 0).unwrap();
        assert_eq!(same, row);
        let done = answered(row, "m4", false, 0).unwrap();
        assert_eq!((done.acked_rv, done.out), (4, None));
        // An ACKed delete drops the row.
        let del = SyncRow {
            out: Some(sent(5, true)),
            ..acked(4)
        };
        assert_eq!(answered(del, "m5", false, 0), None);
    }
}
