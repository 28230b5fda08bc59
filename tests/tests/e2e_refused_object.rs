//! An object the edge refuses is sent again by edgecontroller's sync until it is stored, with the
//! real `cloudcore` and `edgecore` over each protocol. The refusal comes from a real write
//! failure: the test adds SQLite triggers to the edge's metamanager database that abort writes of
//! one configmap (as a corrupt or read-only store would fail), so metamanager answers op `error`
//! and the cloud marks the message failed; the triggers are dropped, the sync resends after its
//! backoff, and the object arrives: stored once, ACKed, every queue drained.

use std::net::SocketAddr;
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, http, json_of, outbox_rows, wait_until,
};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-refuse";

fn put(api: SocketAddr, path: &str, body: &Value) -> Value {
    let (code, text) = http(api, "PUT", path, &body.to_string());
    assert!(code == 200 || code == 201, "PUT {path}: {code} {text}");
    json_of(&text)
}

/// A counter's value on the cloud's `/metrics` (0 when absent).
fn metric(api: SocketAddr, name: &str) -> u64 {
    let (_, text) = http(api, "GET", "/metrics", "");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Every cloud message metamanager applied, by id (its journal, `/v1/messages`).
fn applied(edge: &Edge) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (code, body) = http(
            edge.local,
            "GET",
            &format!("/v1/messages?after={after}&limit=500"),
            "",
        );
        assert_eq!(code, 200, "{body}");
        let page = json_of(&body);
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            return out;
        }
        out.extend(messages.iter().map(|m| m["message"].clone()));
        after = page["next"].as_u64().expect("next");
    }
}

const REFUSE: &str = "CREATE TRIGGER refuse_insert BEFORE INSERT ON meta
      WHEN NEW.key LIKE '%cm-refused%' BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;
  CREATE TRIGGER refuse_update BEFORE UPDATE ON meta
      WHEN NEW.key LIKE '%cm-refused%' BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;";
const ACCEPT: &str = "DROP TRIGGER refuse_insert; DROP TRIGGER refuse_update;";

fn refused_then_resent(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let api = cloud.api;
    let config = EdgeConfig::for_cloud(root, protocol, NODE, &cloud)
        .deadlines(2)
        .write_in(root);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    let db = rusqlite::Connection::open(root.join("edge/meta.db")).unwrap();
    db.busy_timeout(PATIENCE).unwrap();
    db.execute_batch(REFUSE).unwrap();

    let cm = put(
        api,
        "/v1/namespaces/default/configmaps/cm-refused",
        &json!({"data": {"k": "v"}}),
    );
    put(
        api,
        "/v1/namespaces/default/pods/p-refused",
        &json!({"spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox",
            "envFrom": [{"configMapRef": {"name": "cm-refused"}}]}]}}),
    );
    wait_until("the edge refused the configmap", PATIENCE, || match metric(
        api,
        "cloudhub_downstream_failed_total",
    ) {
        0 => Err("no refusal yet".to_owned()),
        _ => Ok(()),
    });
    db.execute_batch(ACCEPT).unwrap();

    // The sync sends it again (newest version, new id) after its backoff; it is stored and ACKed.
    // Waited on in metamanager's journal, not through MetaServer (whose miss would ask the cloud).
    wait_until("the sync's resend stored", PATIENCE, || {
        let stored = applied(&edge).into_iter().find(|m| {
            m["route"]["resource"] == "default/configmap/cm-refused"
                && m["route"]["operation"] != "response"
        });
        match stored {
            Some(m) if m["header"]["resourceversion"] == cm["metadata"]["resourceVersion"] => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    wait_until("every queue drained", PATIENCE, || {
        let rows = outbox_rows(&root.join("edge/outbox.db"));
        let (_, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
        let queue = json_of(&body)["queue"].clone();
        if rows == 0 && queue["pending"] == 0 && queue["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!("outbox {rows} rows, cloud queue {queue}"))
        }
    });
    // Each applied id once; the configmap applied once (the refused delivery left no trace).
    let messages = applied(&edge);
    let mut ids: Vec<&str> = messages
        .iter()
        .map(|m| m["header"]["msg_id"].as_str().unwrap())
        .collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "an id applied twice");
    let cm_applied = messages
        .iter()
        .filter(|m| m["route"]["resource"] == "default/configmap/cm-refused")
        .count();
    assert_eq!(cm_applied, 1, "{messages:?}");
    let refusals = metric(api, "cloudhub_downstream_failed_total");
    println!("{protocol}: configmap refused {refusals} time(s), then resent and stored once");
    drop(db);
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn refused_object_is_resent_over_websocket() {
    refused_then_resent("websocket");
}

#[test]
fn refused_object_is_resent_over_quic() {
    refused_then_resent("quic");
}
