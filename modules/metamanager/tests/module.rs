//! The metamanager module on a real beehive with a real SQLite file; a small module plays
//! EdgeHub (`websocket`): it records what metamanager sends to the cloud (checking, from another
//! handle on the file, that an ACK leaves only after the commit) and answers remote queries as
//! the cloud's edgecontroller does.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use beehive::{Beehive, Bus, Hive, ModuleError, SimpleModule};
use causeway_metamanager::{MetaManager, MetaManagerConfig, MetaStore};
use proto::{Content, Message};
use session::edge::route::connection_event;

const WAIT: Duration = Duration::from_secs(30);

struct Edge {
    hive: Hive,
    bus: Bus,
    to_cloud: mpsc::Receiver<(Message, bool)>,
    store: Arc<MetaStore>,
    _dir: tempfile::TempDir,
}

/// metamanager and a stand-in EdgeHub that answers queries for `default/configmap/remote` with an
/// object and for anything else with a NotFound StatusError.
fn start() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let config = MetaManagerConfig {
        path: path.clone(),
        ..MetaManagerConfig::default()
    };
    let meta = MetaManager::open(config).unwrap();
    let store = meta.store();
    let (tx, to_cloud) = mpsc::channel(64);
    let hub = SimpleModule::new("websocket", "hub", move |mut ctx| {
        let tx = tx.clone();
        let path = path.clone();
        async move {
            while let Some(msg) = ctx.recv().await {
                if msg.route.operation == "query" {
                    let content = if msg.route.resource == "default/configmap/remote" {
                        json!({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"namespace": "default", "name": "remote",
                                            "resourceVersion": "41", "uid": "r1"},
                               "data": {"k": "v"}})
                    } else {
                        json!({"ErrStatus": {"status": "Failure", "reason": "NotFound",
                                             "code": 404, "message": "configmaps \"gone\" not found"}})
                    };
                    let mut answer = Message::new(msg.header.id.clone())
                        .route(
                            "edgecontroller",
                            "resource",
                            msg.route.resource.clone(),
                            "response",
                        )
                        .content(Content::Json(content));
                    answer.header.resource_version = "41".into();
                    let _ = tx.send((msg, false)).await;
                    let _ = ctx.bus().send_resp(answer);
                    continue;
                }
                // An ACK may only leave once the row is committed: check from another handle.
                let committed = MetaStore::open(&path, 100)
                    .and_then(|s| s.journaled(&msg.header.parent_id))
                    .unwrap_or(false);
                let _ = tx.send((msg, committed)).await;
            }
            Ok::<(), ModuleError>(())
        }
    });
    let mut beehive = Beehive::new();
    beehive.register(meta, true).unwrap();
    beehive.register(hub, true).unwrap();
    let hive = beehive.start();
    let bus = hive.bus().clone();
    Edge {
        hive,
        bus,
        to_cloud,
        store,
        _dir: dir,
    }
}

async fn next(rx: &mut mpsc::Receiver<(Message, bool)>) -> (Message, bool) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

fn cloud(id: &str, op: &str, resource: &str, rv: &str) -> Message {
    let mut m = Message::with_header(id, "", 1)
        .route("edgecontroller", "resource", resource, op)
        .content(Content::Json(
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": {"name": "c", "uid": "u1", "resourceVersion": rv},
                                      "data": {"rv": rv}}),
        ));
    m.header.resource_version = rv.to_owned();
    m
}

async fn query(bus: &Bus, resource: &str) -> Message {
    let q = Message::new("").route("edged", "meta", resource, "query");
    bus.send_sync("metamanager", q, WAIT).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_objects_are_acked_after_the_commit_in_version_order() {
    let mut edge = start();
    let bus = edge.bus.clone();
    let key = "default/configmap/c";
    bus.send_to_group("meta", cloud("m1", "insert", key, "5"))
        .await
        .unwrap();
    let (ack, committed) = next(&mut edge.to_cloud).await;
    assert_eq!(
        (ack.route.operation.as_str(), ack.header.parent_id.as_str()),
        ("response", "m1")
    );
    assert_eq!(ack.content.as_text(), Some("OK"));
    assert_eq!(ack.route.resource, key);
    assert!(committed, "acknowledged only after the row was committed");
    // a resend: not applied again, acknowledged again
    bus.send_to_group("meta", cloud("m1", "insert", key, "5"))
        .await
        .unwrap();
    assert_eq!(next(&mut edge.to_cloud).await.0.header.parent_id, "m1");
    // an older version: acknowledged, not applied
    bus.send_to_group("meta", cloud("m2", "update", key, "4"))
        .await
        .unwrap();
    assert_eq!(next(&mut edge.to_cloud).await.0.header.parent_id, "m2");
    assert_eq!(
        edge.store.get(key).unwrap().unwrap().resource_version,
        Some(5)
    );
    bus.send_to_group("meta", cloud("m3", "update", key, "6"))
        .await
        .unwrap();
    assert_eq!(next(&mut edge.to_cloud).await.0.header.parent_id, "m3");
    assert_eq!(
        edge.store.get(key).unwrap().unwrap().resource_version,
        Some(6)
    );

    // a bad resource string and an unknown operation: refused with op error, never ACKed
    bus.send_to_group("meta", cloud("bad1", "update", "default/configmap", "7"))
        .await
        .unwrap();
    let (refusal, _) = next(&mut edge.to_cloud).await;
    assert_eq!(
        (
            refusal.route.operation.as_str(),
            refusal.header.parent_id.as_str()
        ),
        ("error", "bad1")
    );
    assert!(
        refusal.content.as_text().unwrap().contains("bad resource"),
        "{refusal:?}"
    );
    bus.send_to_group("meta", cloud("bad2", "patch", key, "7"))
        .await
        .unwrap();
    let (refusal, _) = next(&mut edge.to_cloud).await;
    assert_eq!(refusal.route.operation, "error");
    assert!(refusal.content.as_text().unwrap().contains("\"patch\""));

    // deleted: the query answers null
    bus.send_to_group("meta", cloud("m4", "delete", key, "6"))
        .await
        .unwrap();
    assert_eq!(next(&mut edge.to_cloud).await.0.header.parent_id, "m4");
    assert_eq!(query(&bus, key).await.content, Content::Json(Value::Null));
    assert_eq!(
        edge.store.journal_count().unwrap(),
        4,
        "m1, m2, m3, m4; refusals not journaled"
    );
    assert!(edge.hive.shutdown().await.is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_cloud_messages_is_acked_once_each_after_its_commit() {
    // Sent faster than metamanager stores them, they are stored in group commits: every message
    // still gets exactly its own answer, after the commit, and per key in the cloud's order.
    let mut edge = start();
    let bus = edge.bus.clone();
    let mut expected = Vec::new();
    for i in 0..300 {
        let (id, msg) = if i % 50 == 7 {
            // A refusal in the middle of a batch.
            let id = format!("bad{i}");
            (id.clone(), cloud(&id, "update", "default/configmap", "1"))
        } else {
            let id = format!("b{i}");
            let key = format!("default/configmap/k{}", i % 10);
            (id.clone(), cloud(&id, "update", &key, &(i + 1).to_string()))
        };
        expected.push(id);
        bus.send_to_group("meta", msg).await.unwrap();
        if i == 150 {
            // A query between cloud messages is answered from what was stored before it.
            assert_ne!(
                query(&bus, "default/configmap/k0").await.content,
                Content::Json(Value::Null)
            );
        }
    }
    let mut answered = Vec::new();
    for _ in 0..expected.len() {
        let (answer, committed) = next(&mut edge.to_cloud).await;
        let refused = answer.header.parent_id.starts_with("bad");
        assert_eq!(
            answer.route.operation,
            if refused { "error" } else { "response" }
        );
        assert!(refused || committed, "{answer:?} left before its commit");
        answered.push(answer.header.parent_id);
    }
    assert_eq!(answered, expected, "one answer each, in arrival order");
    assert_eq!(edge.store.journal_count().unwrap(), 294);
    for k in 0..10 {
        let key = format!("default/configmap/k{k}");
        let last = (0..300).rev().find(|i| i % 10 == k && i % 50 != 7).unwrap();
        assert_eq!(
            edge.store.get(&key).unwrap().unwrap().resource_version,
            Some(last + 1)
        );
    }
    assert!(edge.hive.shutdown().await.is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_locally_and_ask_the_cloud_only_when_connected() {
    let mut edge = start();
    let bus = edge.bus.clone();
    for (id, name) in [("a", "one"), ("b", "two")] {
        let resource = format!("default/configmap/{name}");
        bus.send_to_group("meta", cloud(id, "update", &resource, "3"))
            .await
            .unwrap();
        next(&mut edge.to_cloud).await;
    }
    let one = query(&bus, "default/configmap/one").await;
    assert_eq!(one.route.operation, "response");
    assert_eq!(one.route.source, "metamanager");
    let Content::Json(Value::Array(items)) = &one.content else {
        panic!("a JSON array of strings: {one:?}")
    };
    let object: Value = serde_json::from_str(items[0].as_str().unwrap()).unwrap();
    assert_eq!(object["data"]["rv"], "3");
    let list = query(&bus, "default/configmap").await;
    assert!(
        matches!(&list.content, Content::Json(Value::Array(a)) if a.len() == 2),
        "{list:?}"
    );
    assert_eq!(
        query(&bus, "other/configmap").await.content,
        Content::Json(Value::Null)
    );

    // bad queries are refused with what is wrong
    let bad = query(&bus, "default").await;
    assert_eq!(bad.route.operation, "error");
    assert!(
        bad.content.as_text().unwrap().contains("bad resource"),
        "{bad:?}"
    );
    let unknown = query(&bus, "default/gizmo/x").await;
    assert_eq!(unknown.route.operation, "error");
    assert!(
        unknown
            .content
            .as_text()
            .unwrap()
            .contains("unknown resource type \"gizmo\"")
    );

    // offline: a miss is answered locally, nothing leaves
    assert_eq!(
        query(&bus, "default/configmap/remote").await.content,
        Content::Json(Value::Null)
    );
    assert!(
        edge.to_cloud.try_recv().is_err(),
        "nothing asked of the cloud while offline"
    );

    // connected: the miss is asked of the cloud, the answer stored, ACKed and returned
    let event = connection_event("meta", true, proto::new_id(), proto::now_millis());
    bus.send_to_group("meta", event).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let answer = loop {
        let a = query(&bus, "default/configmap/remote").await;
        if a.content != Content::Json(Value::Null) || tokio::time::Instant::now() > deadline {
            break a;
        }
    };
    assert_eq!(answer.route.operation, "response", "{answer:?}");
    assert!(
        format!("{:?}", answer.content).contains("remote"),
        "{answer:?}"
    );
    let (ask, _) = next(&mut edge.to_cloud).await;
    assert_eq!(
        (
            ask.route.source.as_str(),
            ask.route.group.as_str(),
            ask.route.operation.as_str()
        ),
        ("metamanager", "meta", "query")
    );
    let (ack, committed) = next(&mut edge.to_cloud).await;
    assert_eq!(ack.route.operation, "response");
    assert!(committed, "the answer was stored before its ACK");
    let stored = edge.store.get("default/configmap/remote").unwrap().unwrap();
    assert_eq!(stored.resource_version, Some(41));

    // a NotFound answer is returned as the error and never stored (M2)
    let gone = query(&bus, "default/secret/gone").await;
    assert_eq!(gone.route.operation, "error", "{gone:?}");
    assert!(
        gone.content.as_text().unwrap().contains("not found"),
        "{gone:?}"
    );
    assert_eq!(edge.store.get("default/secret/gone").unwrap(), None);
    // pods are never asked of the cloud
    assert_eq!(
        query(&bus, "default/pod/p").await.content,
        Content::Json(Value::Null)
    );
    assert!(edge.hive.shutdown().await.is_clean());
}
