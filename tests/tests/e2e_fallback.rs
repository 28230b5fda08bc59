//! Protocol fallback with the real daemons (issue 14, `udp-blocked`): cloudcore in the link
//! lab's cloud namespace listening on both protocols, an edgecore configured for QUIC with
//! `controller.fallback` on in the edge namespace, every packet through the lab's forwarder,
//! which drops all UDP at first. The edge must fall back to WebSocket, carry traffic both ways
//! there, and move back to QUIC once UDP passes again, while messages keep flowing; every id
//! arrives exactly once and every queue drains. Both the edge's `/v1/status` and the cloud's node
//! view must say which protocol the node is on.
//!
//! Root only (network namespaces, TUN devices): skipped with a message elsewhere.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Placement, Sse, binary, http, json_of,
    wait_until,
};
use causeway_tests::drain::{exactly_once, wait_drained};
use linklab::{CLOUD_ADDR, Lab, LabError};
use serde_json::{Value, json};

/// Bound on each wait; generous, since the suite runs beside builds on two cores.
const PATIENCE: Duration = Duration::from_secs(120);

/// The two daemons' HTTP endpoints, each reached from inside its namespace.
struct Sides<'a> {
    lab: &'a Lab,
    cloud_api: SocketAddr,
    edge_api: SocketAddr,
    node: String,
    down: Vec<String>,
    up: Vec<String>,
}

impl Sides<'_> {
    fn cloud_http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.lab
            .cloud()
            .run(|| http(self.cloud_api, method, path, body))
    }

    fn edge_http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.lab
            .edge()
            .run(|| http(self.edge_api, method, path, body))
    }

    /// `count` ACK-required messages queued for the node (durable once the POST returned).
    fn send_down(&mut self, count: usize) {
        for _ in 0..count {
            let id = format!("{}-down-{}", self.node, self.down.len());
            let msg = json!({
                "header": {"msg_id": id},
                "route": {"source": "fallback", "group": "resource", "operation": "update",
                          "resource": "default/configmap/fallback"},
                "content": {"n": self.down.len()}
            });
            let path = format!("/v1/nodes/{}/messages?ack=true", self.node);
            let (code, body) = self.cloud_http("POST", &path, &msg.to_string());
            assert_eq!(code, 202, "{body}");
            self.down.push(id);
        }
    }

    /// `count` messages from the edge's local API (in its outbox once the POST returned).
    fn send_up(&mut self, count: usize) {
        for _ in 0..count {
            let body = json!({"group": "user", "resource": "sensors/t1",
                              "operation": "upload", "content": {"n": self.up.len()}});
            let (code, body) = self.edge_http("POST", "/v1/upstream", &body.to_string());
            assert_eq!(code, 202, "{body}");
            self.up
                .push(json_of(&body)["id"].as_str().expect("id").to_owned());
        }
    }

    /// `Ok` once both the edge and the cloud say the node is connected over `protocol` (and
    /// the edge says whether that is its fallback).
    fn on(&self, protocol: &str, fallback: bool) -> Result<(), String> {
        let (code, body) = self.edge_http("GET", "/v1/status", "");
        let status = json_of(&body);
        // 404 until the node first connected.
        let (_, view) = self.cloud_http("GET", &format!("/v1/nodes/{}", self.node), "");
        let view = serde_json::from_str::<Value>(&view).unwrap_or(Value::Null);
        let ok = code == 200
            && status["cloud"] == "connected"
            && status["protocol"] == protocol
            && status["fallback"] == fallback
            && view["connected"] == true
            && view["protocol"] == protocol;
        if ok {
            Ok(())
        } else {
            Err(format!("edge {status}; cloud {view}"))
        }
    }

    fn journal(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let path = format!("/v1/messages?after={after}&limit=1000");
            let (code, body) = self.edge_http("GET", &path, "");
            assert_eq!(code, 200, "{body}");
            let page = json_of(&body);
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return all;
            }
            all.extend(messages.into_iter().map(|m| m["message"].clone()));
            after = page["next"].as_u64().expect("next cursor");
        }
    }
}

#[test]
fn quic_edge_falls_back_to_websocket_while_udp_is_blocked_and_moves_back() {
    let blocked = linklab::scenario::by_name("udp-blocked").expect("udp-blocked scenario");
    let lab = match Lab::start(&blocked, 14) {
        Ok(lab) => lab,
        Err(LabError::Unsupported(why)) => {
            println!("skipped: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = "edge-fallback".to_owned();
    let outbox = root.join("edge/outbox.db");
    let cloud_command = |binary: &std::path::Path| lab.cloud().command(binary);
    let placement = Placement {
        host: CLOUD_ADDR.into(),
        command: &cloud_command,
    };
    let cloud = Cloud::start_placed(root, [0; 4], 30, "", PATIENCE, &placement);
    // A QUIC handshake gives up after 2 s; two such failures in a row move the edge to
    // WebSocket; QUIC is tried again 2 s after each failed try.
    let config = EdgeConfig::for_cloud(root, "quic", &node, &cloud)
        .handshake_timeout(2)
        .fallback(cloud.server("websocket"), "attempts: 2, probe-interval: 2")
        .write_in(root);
    let started = Instant::now();
    let mut edge = Edge::spawn(lab.edge().command(binary("edgecore")), &config, PATIENCE);
    let mut sides = Sides {
        lab: &lab,
        cloud_api: cloud.api,
        edge_api: edge.local,
        node: node.clone(),
        down: Vec::new(),
        up: Vec::new(),
    };

    // Queued at the edge while no protocol works yet (the cloud queues only for nodes that
    // connected once).
    sides.send_up(10);
    wait_until("the edge on WebSocket (fallback)", PATIENCE, || {
        sides.on("websocket", true)
    });
    let fell_back = started.elapsed();
    // Traffic over the fallback, with QUIC probes failing in the background.
    sides.send_down(10);
    sides.send_up(10);
    lab.cloud()
        .run(|| wait_drained(cloud.api, &node, &outbox, PATIENCE));

    // UDP passes again; messages keep flowing while the edge moves back.
    let (up, down) = (blocked.up, blocked.down);
    let open = |i: linklab::model::Impairment| linklab::model::Impairment {
        drop_udp: false,
        ..i
    };
    lab.control().set_impairment(open(up), open(down));
    let unblocked = Instant::now();
    let deadline = unblocked + PATIENCE;
    let moved_back = loop {
        sides.send_down(1);
        sides.send_up(1);
        match sides.on("quic", false) {
            Ok(()) => break unblocked.elapsed(),
            Err(state) if Instant::now() > deadline => {
                panic!("not back on QUIC {PATIENCE:?} after UDP returned: {state}")
            }
            // Pacing of the traffic, not the condition waited for.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    sides.send_down(10);
    sides.send_up(10);
    lab.cloud()
        .run(|| wait_drained(cloud.api, &node, &outbox, PATIENCE));

    let mut counts = std::collections::HashMap::new();
    for m in sides.journal() {
        if let Some(id) = m["header"]["msg_id"].as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    exactly_once("downstream", &counts, &sides.down);
    let mut sse = lab
        .cloud()
        .run(|| Sse::open(cloud.api, PATIENCE, &format!("node={node}&since=0")));
    let counts = sse.until_all(&sides.up);
    exactly_once("upstream", &counts, &sides.up);

    assert!(edge.daemon.count_logged("falling back") >= 1);
    assert!(edge.daemon.count_logged("works again; moving back") >= 1);
    let (link_up, link_down) = lab.control().stats();
    assert!(link_up.udp_blocked > 0, "no UDP was dropped: {link_up:?}");
    println!(
        "fallback: on WebSocket {} ms after edgecore started with UDP blocked; back on QUIC \
         {} ms after UDP returned; {} downstream and {} upstream messages each exactly once, \
         queues empty; link edge→cloud {link_up:?}, cloud→edge {link_down:?}",
        fell_back.as_millis(),
        moved_back.as_millis(),
        sides.down.len(),
        sides.up.len(),
    );
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}
