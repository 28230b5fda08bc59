//! Outbox tests on real SQLite files in temporary directories.

use bytes::Bytes;
use proto::Content;
use serde_json::json;

use super::*;

fn open(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(OutboxConfig::new(dir.path().join("state/outbox.db"))).expect("open")
}

fn msg(id: &str) -> Message {
    Message::with_header(id, "", 1_700_000_000_000)
        .route("metamanager", "resource", "default/pod/a", "update")
        .content(Content::text(format!("body of {id}")))
}

fn ids(rows: &[Stored]) -> Vec<&str> {
    rows.iter().map(|r| r.message.header.id.as_str()).collect()
}

#[test]
fn keeps_order_ids_and_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let mut rich = msg("rich");
    rich.header.resource_version = "42".into();
    rich.header.message_type = "channel".into();
    rich.header.sync = true;
    rich.route.destination = "somewhere".into();
    rich.content = Content::Json(json!({"n": 9007199254740993u64, "s": "<&>", "a": [1, null]}));
    let raw = msg("raw").content(Content::Bytes(Bytes::from_static(b"\x00\xff bytes")));
    let nil = msg("nil").content(Content::default());
    for m in [&msg("a"), &rich, &raw, &nil, &msg("b")] {
        assert!(matches!(outbox.push(m).unwrap(), Pushed::Queued(_)));
    }
    let (rows, damaged) = outbox.pending_after(Seq::default(), 100).unwrap();
    assert_eq!(damaged, 0);
    assert_eq!(ids(&rows), ["a", "rich", "raw", "nil", "b"]);
    assert_eq!(
        rows[1].message, rich,
        "header, route and exact JSON content survive"
    );
    assert_eq!(rows[2].message, raw, "bytes stay bytes");
    assert_eq!(rows[3].message, nil);
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    // Paging with a cursor.
    let (page, _) = outbox.pending_after(rows[1].seq, 2).unwrap();
    assert_eq!(ids(&page), ["raw", "nil"]);
}

#[test]
fn a_message_leaves_only_when_removed_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut outbox = open(&dir);
        for id in ["m1", "m2", "m3"] {
            outbox.push(&msg(id)).unwrap();
        }
        assert!(outbox.remove("m1").unwrap(), "acked");
        assert!(!outbox.remove("m1").unwrap(), "a duplicate ack is harmless");
        assert!(!outbox.remove("never-stored").unwrap());
        // m2 was written to the link, then the link dropped before its ack: it stays.
    }
    let mut outbox = open(&dir);
    let (rows, _) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(
        ids(&rows),
        ["m2", "m3"],
        "resent after restart under the same ids"
    );
    assert_eq!(outbox.usage().messages, 2);
    let bytes = outbox.usage().bytes;
    assert!(bytes > 0);
    assert_eq!(outbox.remove_many(["m2", "m3", "zz"]).unwrap(), 2);
    assert_eq!(outbox.usage(), OutboxUsage::default());
}

#[test]
fn in_flight_message_is_offered_again_from_the_start_after_a_reconnect() {
    // W5: the driver walks the outbox with a cursor per connection; a new connection starts at
    // the beginning, so whatever was not acknowledged goes out again, in order.
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    for id in ["x", "y", "z"] {
        outbox.push(&msg(id)).unwrap();
    }
    let (first, _) = outbox.pending_after(Seq::default(), 10).unwrap();
    outbox.remove("x").unwrap(); // acked on connection 1; y was in flight when it dropped
    let (second, _) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(ids(&second), ["y", "z"]);
    assert_eq!(second[0].seq, first[1].seq);
}

#[test]
fn pushes_are_idempotent_by_id_and_ids_are_assigned_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    assert!(matches!(
        outbox.push(&msg("same")).unwrap(),
        Pushed::Queued(_)
    ));
    assert_eq!(outbox.push(&msg("same")).unwrap(), Pushed::AlreadyQueued);
    let anonymous = Message::default().route("app", "user", "r", "upload");
    outbox.push(&anonymous).unwrap();
    let (rows, _) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].message.header.id.len(), 36);
}

#[test]
fn full_outbox_refuses_instead_of_dropping() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = OutboxConfig::new(dir.path().join("o.db"));
    config.max_messages = 3;
    let mut outbox = Outbox::open(config).unwrap();
    for id in ["a", "b", "c"] {
        outbox.push(&msg(id)).unwrap();
    }
    let err = outbox.push(&msg("d")).unwrap_err();
    assert!(matches!(err, PushError::Full { messages: 3, .. }), "{err}");
    // A duplicate of a stored message is still accepted (nothing new to store).
    assert_eq!(outbox.push(&msg("a")).unwrap(), Pushed::AlreadyQueued);
    outbox.remove("a").unwrap();
    outbox.push(&msg("d")).unwrap();
    let (rows, _) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(ids(&rows), ["b", "c", "d"]);
}

#[test]
fn byte_limit_and_oversized_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = OutboxConfig::new(dir.path().join("o.db"));
    config.max_bytes = 1000;
    let mut outbox = Outbox::open(config).unwrap();
    let big = msg("big").content(Content::Bytes(Bytes::from(vec![7u8; 2000])));
    let err = outbox.push(&big).unwrap_err();
    assert!(
        matches!(err, PushError::TooLarge { max: 1000, .. }),
        "{err}"
    );
    let mut pushed = 0;
    let err = loop {
        match outbox.push(&msg(&format!("m{pushed}"))) {
            Ok(_) => pushed += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, PushError::Full { .. }));
    assert!(
        pushed >= 2 && outbox.usage().bytes <= 1000,
        "{pushed} {:?}",
        outbox.usage()
    );
}

#[test]
fn batch_push_stops_at_the_limit_and_leaves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = OutboxConfig::new(dir.path().join("o.db"));
    config.max_messages = 4;
    let mut outbox = Outbox::open(config).unwrap();
    let mut batch: VecDeque<Message> = (0..6).map(|i| msg(&format!("b{i}"))).collect();
    let outcome = outbox.push_batch(&mut batch).unwrap();
    assert_eq!(
        outcome,
        BatchPushed {
            accepted: 4,
            full: true,
            answers: Vec::new(),
        }
    );
    assert_eq!(
        batch
            .iter()
            .map(|m| m.header.id.as_str())
            .collect::<Vec<_>>(),
        ["b4", "b5"]
    );
    outbox.remove_many(["b0", "b1"]).unwrap();
    let outcome = outbox.push_batch(&mut batch).unwrap();
    assert_eq!(
        outcome,
        BatchPushed {
            accepted: 2,
            full: false,
            answers: Vec::new(),
        }
    );
    assert!(batch.is_empty());
    let (rows, _) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(ids(&rows), ["b2", "b3", "b4", "b5"]);
}

#[test]
fn answered_cloud_messages_are_recognised_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let cloud = Message::with_header("cloud-1", "", 0).route(
        "edgecontroller",
        "resource",
        "ns/pod/p",
        "update",
    );
    {
        let mut outbox = open(&dir);
        assert_eq!(
            outbox.check_downstream(t0, &cloud).unwrap(),
            DedupVerdict::Deliver
        );
        assert_eq!(
            outbox.check_downstream(t0, &cloud).unwrap(),
            DedupVerdict::PendingDuplicate
        );
        // The module stores it and answers through the outbox, which keeps no row of the answer.
        assert_eq!(
            outbox
                .push(&Message::response_to(&cloud, Content::text("OK")))
                .unwrap(),
            Pushed::Answered
        );
        assert_eq!(outbox.usage(), OutboxUsage::default());
        assert_eq!(
            outbox.check_downstream(t0, &cloud).unwrap(),
            DedupVerdict::AnsweredDuplicate
        );
    }
    let mut outbox = open(&dir);
    assert_eq!(
        outbox.check_downstream(t0, &cloud).unwrap(),
        DedupVerdict::AnsweredDuplicate
    );
    assert!(outbox.is_answered("cloud-1").unwrap());
}

#[test]
fn unanswered_deliveries_suppress_resends_only_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let t0 = Instant::now();
    let ttl = outbox.config().dedup_pending_ttl;
    let cloud =
        Message::with_header("c", "", 0).route("edgecontroller", "resource", "ns/pod/p", "update");
    assert_eq!(
        outbox.check_downstream(t0, &cloud).unwrap(),
        DedupVerdict::Deliver
    );
    assert_eq!(
        outbox
            .check_downstream(t0 + ttl - Duration::from_millis(1), &cloud)
            .unwrap(),
        DedupVerdict::PendingDuplicate
    );
    // The module never answered (it lost the message): after the TTL a resend is delivered again.
    assert_eq!(
        outbox.check_downstream(t0 + ttl, &cloud).unwrap(),
        DedupVerdict::Deliver
    );
    // Messages without an id cannot be deduplicated and are always delivered.
    let anonymous = Message::default().route("x", "twin", "r", "update");
    for _ in 0..2 {
        assert_eq!(
            outbox.check_downstream(t0, &anonymous).unwrap(),
            DedupVerdict::Deliver
        );
    }
}

#[test]
fn windows_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = OutboxConfig::new(dir.path().join("o.db"));
    config.dedup_window = 3;
    let mut outbox = Outbox::open(config).unwrap();
    let t0 = Instant::now();
    for i in 0..5 {
        let cloud =
            Message::with_header(format!("c{i}"), "", 0).route("e", "resource", "r", "update");
        outbox
            .push(&Message::response_to(&cloud, Content::text("OK")))
            .unwrap();
    }
    let answered: Vec<bool> = (0..5)
        .map(|i| outbox.is_answered(&format!("c{i}")).unwrap())
        .collect();
    assert_eq!(answered, [false, false, true, true, true]);
    // Pending sightings are capped the same way: the oldest is forgotten first.
    for i in 0..5 {
        let cloud =
            Message::with_header(format!("p{i}"), "", 0).route("e", "resource", "r", "update");
        assert_eq!(
            outbox.check_downstream(t0, &cloud).unwrap(),
            DedupVerdict::Deliver
        );
    }
    let oldest = Message::with_header("p0", "", 0).route("e", "resource", "r", "update");
    assert_eq!(
        outbox.check_downstream(t0, &oldest).unwrap(),
        DedupVerdict::Deliver
    );
    let newest = Message::with_header("p4", "", 0).route("e", "resource", "r", "update");
    assert_eq!(
        outbox.check_downstream(t0, &newest).unwrap(),
        DedupVerdict::PendingDuplicate
    );
}

#[test]
fn database_is_private_in_wal_mode_with_the_chosen_sync() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir);
    let mode: String = outbox
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = outbox
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "FULL");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir.path().join("state/outbox.db")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let mut config = OutboxConfig::new(dir.path().join("n.db"));
    config.durability = Durability::Normal;
    let outbox = Outbox::open(config).unwrap();
    let sync: i64 = outbox
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 1, "NORMAL");
}

/// A file written by schema 1 (JSON content stored as kind 0, bytes as 1, the reverse of
/// `proto::row`), built with that version's SQL: its messages read back as they were, once.
#[test]
fn reads_a_schema_1_file_written_with_the_old_content_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let head = |id: &str| {
        format!(
            r#"{{"header":{{"msg_id":"{id}","parent_msg_id":"","timestamp":1700000000000,"sync":false}},"route":{{"source":"metamanager","group":"resource","operation":"update","resource":"default/pod/a"}},"content":null}}"#
        )
    };
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE outbox (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 meta TEXT NOT NULL,
                 content_kind INTEGER NOT NULL,
                 content BLOB NOT NULL,
                 size INTEGER NOT NULL
             );
             CREATE TABLE answered (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE
             );
             PRAGMA user_version = 1;",
        )
        .unwrap();
        let mut insert = conn
            .prepare("INSERT INTO outbox (id, meta, content_kind, content, size) VALUES (?1, ?2, ?3, ?4, 1)")
            .unwrap();
        insert
            .execute(params![
                "json",
                head("json"),
                0,
                br#"{"a":[1,"x"]}"#.to_vec()
            ])
            .unwrap();
        insert
            .execute(params!["bytes", head("bytes"), 1, b"\x00\xff".to_vec()])
            .unwrap();
    }
    for _ in 0..2 {
        // The second open finds schema 2 and must not swap the kinds back.
        let mut outbox = Outbox::open(OutboxConfig::new(&path)).unwrap();
        let (rows, damaged) = outbox.pending_after(Seq::default(), 10).unwrap();
        assert_eq!(damaged, 0);
        assert_eq!(ids(&rows), ["json", "bytes"]);
        assert_eq!(
            rows[0].message.content,
            Content::Json(json!({"a": [1, "x"]}))
        );
        assert_eq!(
            rows[1].message.content,
            Content::Bytes(Bytes::from_static(b"\x00\xff"))
        );
        assert_eq!(rows[0].message.route.resource, "default/pod/a");
        let version: i64 = outbox
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
    }
}

#[test]
fn damaged_rows_are_discarded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    outbox.push(&msg("good-1")).unwrap();
    outbox
        .conn
        .execute(
            "INSERT INTO outbox (id, meta, content_kind, content, size) VALUES ('bad', '{not json', 0, x'', 9)",
            [],
        )
        .unwrap();
    outbox.push(&msg("good-2")).unwrap();
    let usage_before = outbox.usage().messages;
    let (rows, damaged) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(ids(&rows), ["good-1", "good-2"]);
    assert_eq!(damaged, 1);
    let (_, damaged_again) = outbox.pending_after(Seq::default(), 10).unwrap();
    assert_eq!(damaged_again, 0);
    // The inserted row bypassed the counters; removing it must not underflow them.
    assert!(outbox.usage().messages <= usage_before);
}

#[test]
fn refuses_a_newer_schema_and_a_non_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    drop(Outbox::open(OutboxConfig::new(&path)).unwrap());
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 9)
        .unwrap();
    let err = Outbox::open(OutboxConfig::new(&path)).unwrap_err();
    assert!(
        matches!(err, OpenError::NewerSchema { found: 9, .. }),
        "{err}"
    );
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let err = Outbox::open(OutboxConfig::new(&junk)).unwrap_err();
    assert!(matches!(err, OpenError::Sqlite { .. }), "{err}");
    assert!(err.to_string().contains("junk.db"));
}

#[test]
fn answers_leave_no_row_and_a_mixed_batch_keeps_only_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = open(&dir);
    let mut batch = VecDeque::new();
    for i in 0..300 {
        let cloud =
            Message::with_header(format!("c{i}"), "", 0).route("e", "resource", "r", "update");
        batch.push_back(Message::response_to(&cloud, Content::text("OK")));
        if i % 3 == 0 {
            batch.push_back(msg(&format!("d{i}")));
        }
    }
    let outcome = outbox.push_batch(&mut batch).unwrap();
    assert_eq!(outcome.accepted, 400);
    assert!(!outcome.full);
    assert!(batch.is_empty());
    // Every answer comes back to be sent, in order; none is stored.
    let parents: Vec<String> = outcome
        .answers
        .iter()
        .map(|a| a.header.parent_id.clone())
        .collect();
    assert_eq!(
        parents,
        (0..300).map(|i| format!("c{i}")).collect::<Vec<_>>()
    );
    assert_eq!(outbox.usage().messages, 100);
    let (rows, _) = outbox.pending_after(Seq::default(), 1000).unwrap();
    assert!(rows.iter().all(|r| r.message.header.id.starts_with('d')));
    // Acknowledging the data empties the outbox; the answers are remembered for dedup.
    outbox
        .remove_many(rows.iter().map(|r| r.message.header.id.as_str()))
        .unwrap();
    assert_eq!(outbox.usage(), OutboxUsage::default());
    assert!(
        outbox
            .pending_after(Seq::default(), 10)
            .unwrap()
            .0
            .is_empty()
    );
    assert!(outbox.is_answered("c299").unwrap());
}
