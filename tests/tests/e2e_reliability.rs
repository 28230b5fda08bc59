//! Reliability end to end: the real `cloudcore` and `edgecore` on loopback, over each protocol,
//! with thousands of ACK-required messages from the cloud and hundreds of messages from the
//! edge, while each daemon is killed (SIGKILL) and restarted twice. Every queue must drain back
//! to empty — the cloud's per-node queue (nothing pending, nothing in flight) and the edge's
//! outbox (no rows) — and every id must arrive exactly once at its application.
//!
//! It first reproduces the field report that made the edge's outbox keep every ACK response for
//! good (PROTOCOL.md Part A item 7): 300 acknowledged downstream messages used to leave 300 rows
//! behind and, past 256, block every later upstream message behind them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::daemon::{CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Sse, http};
use causeway_tests::drain::{exactly_once, wait_drained};
use serde_json::json;

/// Bound on each wait; generous, since the suite runs beside builds on two cores.
const PATIENCE: Duration = Duration::from_secs(150);
/// Downstream messages are spread over this many resources (order is kept per resource, so
/// more resources mean more messages in flight at once).
const RESOURCES: usize = 16;

fn node(protocol: &str) -> String {
    format!("edge-soak-{protocol}")
}

fn start_cloud(dir: &Path, ports: [u16; 4]) -> Cloud {
    Cloud::start(dir, ports, 30, PATIENCE)
}

/// The edge's config: KubeEdge's default upstream limit (30 msg/s, burst 60), which ACKs must
/// not pay for.
fn edge_config(dir: &Path, protocol: &str, cloud: &Cloud) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, &node(protocol), cloud).write_in(dir)
}

/// Queues an ACK-required message for the node; the cloud has it durably once this returns.
fn post(cloud: &Cloud, node: &str, id: &str, n: usize) {
    let msg = json!({
        "header": {"msg_id": id},
        "route": {"source": "soak", "group": "resource", "operation": "update",
                  "resource": format!("default/configmap/cm{}", n % RESOURCES)},
        "content": {"n": n}
    });
    let (code, body) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{node}/messages?ack=true"),
        &msg.to_string(),
    );
    assert_eq!(code, 202, "{body}");
}

fn soak(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = node(protocol);
    let outbox = root.join("edge/outbox.db");
    let mut cloud = start_cloud(root, [0; 4]);
    let ports = cloud.ports();
    let config = edge_config(root, protocol, &cloud);
    let mut edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();

    // The field report: 300 ACKed downstream messages, then the edge must still send.
    let mut down: Vec<String> = Vec::new();
    let mut up: Vec<String> = Vec::new();
    for n in 0..300 {
        let id = format!("{protocol}-wedge-{n}");
        post(&cloud, &node, &id, n);
        down.push(id);
    }
    wait_drained(cloud.api, &node, &outbox, PATIENCE);
    for n in 0..50 {
        up.push(edge.send(n));
    }
    let counts = Sse::open(cloud.api, PATIENCE, &format!("node={node}&since=0")).until_all(&up);
    exactly_once("upstream after 300 ACKed messages", &counts, &up);
    wait_drained(cloud.api, &node, &outbox, PATIENCE);

    // Four rounds, each killing one side in the middle of traffic both ways.
    for round in 0..4 {
        let kill_edge = round % 2 == 0;
        for n in 0..250 {
            let id = format!("{protocol}-r{round}-a{n}");
            post(&cloud, &node, &id, n);
            down.push(id);
            if n % 6 == 0 {
                up.push(edge.send(n));
            }
        }
        if kill_edge {
            edge.daemon.kill();
            for n in 0..250 {
                let id = format!("{protocol}-r{round}-b{n}");
                post(&cloud, &node, &id, n);
                down.push(id);
            }
            edge = Edge::start(&config, PATIENCE);
        } else {
            cloud.daemon.kill();
            for n in 0..250 {
                if n % 6 == 0 {
                    up.push(edge.send(1000 + n));
                }
            }
            cloud = start_cloud(root, ports);
            for n in 0..250 {
                let id = format!("{protocol}-r{round}-b{n}");
                post(&cloud, &node, &id, n);
                down.push(id);
            }
        }
        wait_drained(cloud.api, &node, &outbox, PATIENCE);
    }

    let received = edge.received();
    exactly_once("downstream across kills", &received, &down);
    let counts = Sse::open(cloud.api, PATIENCE, &format!("node={node}&since=0")).until_all(&up);
    exactly_once("upstream across kills", &counts, &up);
    wait_drained(cloud.api, &node, &outbox, PATIENCE);
    println!(
        "{protocol}: {} ACKed downstream and {} upstream messages, two kills of each daemon: \
         each id delivered exactly once, every queue empty",
        down.len(),
        up.len()
    );
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn websocket_queues_drain_across_kills() {
    soak("websocket");
}

#[test]
fn quic_queues_drain_across_kills() {
    soak("quic");
}
