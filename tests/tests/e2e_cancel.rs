//! The operator's way out, end to end with the real `cloudcore`, `edgecore` and `causeway`
//! binaries on loopback, over each protocol: messages queued for a node that is offline, one of
//! them cancelled (`causeway cancel`, i.e. `DELETE /v1/nodes/{id}/messages/{msg_id}`) while a
//! `wait=ack` request waits for it. The waiter returns at once with `cancelled: true`; when the
//! node connects the cancelled message never arrives, the others (the same resource's next one
//! included) arrive exactly once, and every queue drains. A stock KubeEdge edge never answers a
//! message it cannot route; cancelling is how such a message leaves the queue.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, binary, http, json_of, wait_until,
};
use causeway_tests::drain::{exactly_once, wait_drained};
use serde_json::{Value, json};

/// Bound on anything that should happen within a few heartbeats.
const PATIENCE: Duration = Duration::from_secs(90);

fn edge_config(dir: &Path, protocol: &str, node: &str, cloud: &Cloud) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, node, cloud).write_in(dir)
}

/// Queues an ACK-required message for `node` (202).
fn post(cloud: &Cloud, node: &str, id: &str, resource: &str) {
    let msg = json!({
        "header": {"msg_id": id},
        "route": {"source": "e2e", "group": "resource", "operation": "update", "resource": resource},
        "content": {"id": id}
    });
    let (code, body) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{node}/messages?ack=true"),
        &msg.to_string(),
    );
    assert_eq!(code, 202, "{body}");
}

/// `causeway cancel node id` against the cloud's API: (success, stdout, stderr).
fn causeway_cancel(cloud: &Cloud, node: &str, id: &str) -> (bool, String, String) {
    let out = Command::new(binary("causeway"))
        .args([
            "cancel",
            node,
            id,
            "--api",
            &format!("http://{}", cloud.api),
        ])
        .env_remove("CAUSEWAY_API_TOKEN")
        .env_remove("CAUSEWAY_API")
        .stdin(Stdio::null())
        .output()
        .expect("run causeway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn state(cloud: &Cloud, node: &str, id: &str) -> (u16, Value) {
    let (code, body) = http(
        cloud.api,
        "GET",
        &format!("/v1/nodes/{node}/messages/{id}"),
        "",
    );
    (code, json_of(&body))
}

fn a_cancelled_message_never_arrives(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = format!("edge-cancel-{protocol}");
    let cloud = Cloud::start(root, [0; 4], 30, PATIENCE);
    let config = edge_config(root, protocol, &node, &cloud);
    // The node connects once (so the cloud knows it), then goes offline.
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    wait_until("the node offline", PATIENCE, || {
        let (_, body) = http(cloud.api, "GET", &format!("/v1/nodes/{node}"), "");
        let view = json_of(&body);
        if view["connected"] == false {
            Ok(())
        } else {
            Err(view.to_string())
        }
    });

    let stuck = "stuck-1";
    let resource = "default/configmap/stuck";
    // A waiter for the message, held while the node is offline.
    let waiter = {
        let api = cloud.api;
        let node = node.clone();
        std::thread::spawn(move || {
            let msg = json!({
                "header": {"msg_id": stuck},
                "route": {"source": "e2e", "group": "resource", "operation": "update",
                          "resource": resource},
                "content": {"id": stuck}
            });
            let started = Instant::now();
            let (code, body) = http(
                api,
                "POST",
                &format!("/v1/nodes/{node}/messages?wait=ack&timeout=60s"),
                &msg.to_string(),
            );
            (code, json_of(&body), started.elapsed())
        })
    };
    wait_until("the waited-for message queued", PATIENCE, || {
        match state(&cloud, &node, stuck) {
            (200, s) => Ok(s),
            (code, s) => Err(format!("{code} {s}")),
        }
    });
    let after = ["after-1".to_owned(), "other-1".to_owned()];
    post(&cloud, &node, &after[0], resource);
    post(&cloud, &node, &after[1], "default/configmap/other");

    let (ok, out, err) = causeway_cancel(&cloud, &node, stuck);
    assert!(ok, "causeway cancel: {err}");
    let answer = json_of(out.trim());
    assert_eq!(answer["state"], "cancelled", "{answer}");
    assert!(
        answer["cancelled_at_ms"].as_i64().is_some_and(|t| t > 0),
        "{answer}"
    );
    let (code, waited, took) = waiter.join().expect("waiter thread");
    assert_eq!(code, 200, "{waited}");
    assert_eq!(
        (&waited["cancelled"], &waited["acked"]),
        (&json!(true), &json!(false))
    );
    assert!(
        took < Duration::from_secs(60),
        "the wait ended with the cancel: {took:?}"
    );
    // Cancelling again answers the same; unknown ids are 404 and say so.
    let (ok, out, err) = causeway_cancel(&cloud, &node, stuck);
    assert!(ok, "{err}");
    assert_eq!(json_of(out.trim())["state"], "cancelled");
    let (ok, _, err) = causeway_cancel(&cloud, &node, "never-queued");
    assert!(
        !ok && err.contains("404") && err.contains("never-queued"),
        "{err}"
    );
    let (code, body) = http(
        cloud.api,
        "DELETE",
        &format!("/v1/nodes/{node}/messages/never-queued"),
        "",
    );
    assert_eq!(
        (code, json_of(&body)["code"].clone()),
        (404, json!("unknown_message"))
    );

    // The node comes back: everything but the cancelled message arrives, once.
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_drained(cloud.api, &node, &root.join("edge/outbox.db"), PATIENCE);
    let received = edge.received();
    exactly_once("messages not cancelled", &received, &after);
    assert_eq!(
        received.get(stuck),
        None,
        "the cancelled message arrived: {received:?}"
    );
    let (code, s) = state(&cloud, &node, stuck);
    assert_eq!((code, &s["state"]), (200, &json!("cancelled")), "{s}");
    // An acknowledged message cannot be cancelled: 409 with a clear error.
    let (code, body) = http(
        cloud.api,
        "DELETE",
        &format!("/v1/nodes/{node}/messages/{}", after[0]),
        "",
    );
    let body = json_of(&body);
    assert_eq!(
        (code, &body["code"]),
        (409, &json!("already_acked")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("acknowledged")),
        "{body}"
    );
    let metrics = http(cloud.api, "GET", "/metrics", "").1;
    assert!(
        metrics.contains("cloudhub_downstream_cancelled_total 1"),
        "{metrics}"
    );
    println!("{protocol}: cancelled while offline; the wait ended after {took:?}; never delivered");
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
}

#[test]
fn websocket_a_cancelled_message_never_arrives() {
    a_cancelled_message_never_arrives("websocket");
}

#[test]
fn quic_a_cancelled_message_never_arrives() {
    a_cancelled_message_never_arrives("quic");
}
