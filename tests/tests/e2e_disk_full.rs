//! A full disk, end to end: the real `cloudcore` and `edgecore` over each protocol, with one
//! side's databases on a small tmpfs the test mounts itself (root; skipped with the reason
//! printed where mounting is impossible) and fills to the last page.
//!
//! Edge: its outbox and local store live on the small disk. New upstream messages are refused
//! at the local endpoint (507 with `Retry-After`), the failure is logged once (not once per
//! message), what was accepted (202: committed) is kept, a cloud message that cannot be stored is not
//! acknowledged; once the filler is removed the node recovers by itself: everything accepted
//! reaches the cloud exactly once, the cloud message is stored once, and every queue drains.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeCore as Edge, Sse, bootstrap_token, http, http_with, json_of,
    outbox_rows, wait_until,
};
use causeway_tests::disk::SmallDisk;
use serde_json::{Value, json};

/// Bound on each wait; generous, since the suite runs beside builds on two cores.
const PATIENCE: Duration = Duration::from_secs(120);
/// Most upstream POSTs tried on a full disk before the edge must have refused one.
const MAX_ACCEPTED_WHILE_FULL: usize = 200;

/// Mounts the small disk, or prints why not (the test then passes without running).
fn small_disk(test: &str) -> Option<SmallDisk> {
    match SmallDisk::mount("16m") {
        Ok(disk) => Some(disk),
        Err(why) => {
            println!("SKIPPED {test}: cannot mount a small tmpfs ({why}); run as root");
            None
        }
    }
}

fn edge_config(dir: &Path, data: &Path, protocol: &str, node: &str, cloud: &Cloud) -> PathBuf {
    let d = dir.display();
    let data = data.display();
    let server = cloud.server(protocol);
    let https = cloud.https;
    let token = bootstrap_token(dir);
    let config = dir.join("edgecore.yaml");
    std::fs::write(
        &config,
        format!(
            "edgehub:
  controller: {{ protocol: {protocol}, heartbeat: 1, node-id: {node} }}
  {protocol}: {{ server: '{server}', handshake-timeout: 5, read-deadline: 3, write-deadline: 3 }}
  tls: {{ ca-file: {d}/edge/ca.crt, cert-file: {d}/edge/node.crt, key-file: {d}/edge/node.key }}
  http-server: 'https://{https}'
  token: '{token}'
  outbox: {{ path: {data}/outbox.db, dedup-pending-ttl: 2 }}
modules:
  local-store: {{ path: {data}/local.db, listen: '127.0.0.1:0' }}
"
        ),
    )
    .expect("write edge config");
    config
}

/// One upstream POST at the edge's local endpoint: the status, the head and the JSON body.
fn post_upstream(edge: &Edge, n: usize) -> (u16, String, Value) {
    let body = json!({"group": "user", "resource": "sensors/t1", "operation": "upload",
                      "content": {"n": n, "pad": "x".repeat(512)}});
    let (code, head, body) = http_with(edge.local, "POST", "/v1/upstream", &[], &body.to_string());
    (code, head, json_of(&body))
}

fn node_view(cloud: &Cloud, node: &str) -> Value {
    let (code, body) = http(cloud.api, "GET", &format!("/v1/nodes/{node}"), "");
    assert_eq!(code, 200, "{body}");
    json_of(&body)
}

fn message_state(cloud: &Cloud, node: &str, id: &str) -> Value {
    let (_, body) = http(
        cloud.api,
        "GET",
        &format!("/v1/nodes/{node}/messages/{id}"),
        "",
    );
    json_of(&body)
}

/// Queues an ACK-required message for `node` at the cloud.
fn post_downstream(cloud: &Cloud, node: &str, id: &str) {
    let msg = json!({
        "header": {"msg_id": id},
        "route": {"source": "disk", "group": "resource", "operation": "update",
                  "resource": "default/configmap/full"},
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

fn assert_once(counts: &HashMap<String, usize>, ids: &[String]) {
    for id in ids {
        assert_eq!(counts.get(id), Some(&1), "{id} exactly once: {counts:?}");
    }
}

fn edge_disk_full(protocol: &str) {
    let test = format!("{protocol}_edge_disk_full");
    let Some(disk) = small_disk(&test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = format!("edge-full-{protocol}");
    let cloud = Cloud::start(root, [0; 4], 30, PATIENCE);
    let config = edge_config(root, disk.path(), protocol, &node, &cloud);
    let mut edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={node}&since=0"));

    // Both databases hold something before the disk fills.
    let mut accepted = vec![edge.send(0)];
    post_downstream(&cloud, &node, "before-full");
    wait_until("first cloud message stored", PATIENCE, || {
        match edge.received().get("before-full") {
            Some(1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    disk.fill();
    // A 202 means committed to the outbox, so a POST accepted now found room in the files'
    // slack; the first that finds none is refused, and so is every later one, at the door.
    let mut refused = None;
    for n in 1..=MAX_ACCEPTED_WHILE_FULL {
        let (code, head, body) = post_upstream(&edge, n);
        match code {
            202 => accepted.push(body["id"].as_str().expect("id").to_owned()),
            507 => {
                refused = Some((head, body));
                break;
            }
            _ => panic!("POST on a full disk: {code} {body}"),
        }
    }
    let (head, body) = refused.unwrap_or_else(|| {
        panic!("{MAX_ACCEPTED_WHILE_FULL} POSTs accepted on a full disk, none refused")
    });
    assert_eq!(body["code"], "insufficient_storage", "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let status = edge.status();
    assert!(
        status["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("full")),
        "/v1/status names the full disk: {status}"
    );
    // A cloud message now cannot be stored at the edge, so it is not acknowledged.
    post_downstream(&cloud, &node, "while-full");
    for n in 0..20 {
        let (code, _, body) = post_upstream(&edge, 1000 + n);
        assert_eq!(code, 507, "still full: {body}");
    }
    let state = message_state(&cloud, &node, "while-full");
    assert_ne!(
        state["state"], "acked",
        "acknowledged without being stored: {state}"
    );
    println!(
        "{protocol}: {} upstream messages stored on the filled disk (slack in the files), then 507",
        accepted.len() - 1
    );

    disk.free();
    wait_until("the edge's storage works again", PATIENCE, || {
        let status = edge.status();
        if status["storage_error"].is_null() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    accepted.push(edge.send(2000));
    assert_once(&sse.until_all(&accepted), &accepted);
    wait_until(
        "the cloud message stored after space returned",
        PATIENCE,
        || {
            let state = message_state(&cloud, &node, "while-full");
            if state["state"] == "acked" {
                Ok(())
            } else {
                Err(state.to_string())
            }
        },
    );
    let received = edge.received();
    for id in ["before-full", "while-full"] {
        assert_eq!(received.get(id), Some(&1), "{id}: {received:?}");
    }
    wait_until("every queue drained", PATIENCE, || {
        let rows = outbox_rows(&disk.path().join("outbox.db"));
        let queue = node_view(&cloud, &node)["queue"].clone();
        if rows == 0 && queue["pending"] == 0 && queue["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!("outbox {rows} rows, cloud queue {queue}"))
        }
    });
    // One line for the episode and one for its end, however many messages were refused.
    assert_eq!(edge.daemon.count_logged("outbox: the disk is full"), 1);
    assert_eq!(edge.daemon.count_logged("outbox: storage works again"), 1);
    assert!(edge.daemon.count_logged("local store: the disk is full") <= 1);
    // An open event stream would hold the cloud API's graceful shutdown.
    drop(sse);

    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
    drop(disk);
}

#[test]
fn websocket_edge_disk_full() {
    edge_disk_full("websocket");
}

#[test]
fn quic_edge_disk_full() {
    edge_disk_full("quic");
}
