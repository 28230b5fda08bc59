//! End to end, from the cloud's side: the real `cloudcore` and `edgecore` processes on loopback,
//! over each protocol. A message sent with the cloud API reaches the edge's application and is
//! acknowledged; a message from the edge's application appears on the cloud's live SSE stream;
//! `kill -9` of edgecore, then of cloudcore, in the middle of a stream of messages both ways, and
//! every accepted message reaches its application exactly once; two connections claiming one
//! node id (the newest wins, the node stays connected); a certificate of another node is refused
//! and closed.
//!
//! "Accepted" means: the cloud API answered 202/200 to the POST (the message is in the cloud's
//! durable queue), or the edge's local store answered 202 (the message is in the edge's durable
//! outbox). The binaries are found next to this test's executable; `cargo test --workspace`
//! builds them (as it runs their own tests).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Sse, http, json_of, wait_until,
};
use causeway_tests::drain::{exactly_once, wait_drained};
use serde_json::{Value, json};

/// Bound on anything that should happen within a few heartbeats.
const PATIENCE: Duration = Duration::from_secs(90);
/// The node every test edge runs as.
const NODE: &str = "edge-cloud-e2e";

/// Starts cloudcore for these tests (keepalive interval 30 s).
fn start_cloud(dir: &Path, ports: [u16; 4]) -> Cloud {
    Cloud::start(dir, ports, 30, PATIENCE)
}

/// The cloud API calls these tests make, addressed to [`NODE`].
trait CloudApi {
    /// Queues a message for the edge (no wait); the cloud has it durably once this returns.
    fn post(&self, id: &str, resource: &str);
    /// Queues a message and waits for the edge's ACK.
    fn post_and_wait(&self, id: &str, resource: &str) -> Value;
    /// The cloud's view of the node.
    fn node(&self) -> Value;
    /// The Prometheus text of `/metrics`.
    fn metrics(&self) -> String;
}

impl CloudApi for Cloud {
    fn post(&self, id: &str, resource: &str) {
        let (code, body) = http(
            self.api,
            "POST",
            &format!("/v1/nodes/{NODE}/messages"),
            &message(id, resource).to_string(),
        );
        assert_eq!(code, 202, "{body}");
    }

    fn post_and_wait(&self, id: &str, resource: &str) -> Value {
        let (code, body) = http(
            self.api,
            "POST",
            &format!("/v1/nodes/{NODE}/messages?wait=ack&timeout=90s"),
            &message(id, resource).to_string(),
        );
        assert_eq!(code, 200, "{body}");
        json_of(&body)
    }

    fn node(&self) -> Value {
        let (code, body) = http(self.api, "GET", &format!("/v1/nodes/{NODE}"), "");
        assert_eq!(code, 200, "{body}");
        json_of(&body)
    }

    fn metrics(&self) -> String {
        http(self.api, "GET", "/metrics", "").1
    }
}

fn message(id: &str, resource: &str) -> Value {
    json!({
        "header": {"msg_id": id},
        "route": {"source": "e2e", "group": "resource", "operation": "update", "resource": resource},
        "content": {"id": id}
    })
}

/// Starts edgecore and waits until it is connected and its local store serves.
fn start_edge(config: &Path) -> Edge {
    let edge = Edge::start(config, PATIENCE);
    edge.wait_connected();
    edge
}

/// Waits until a (re)started cloudcore sees the node connected: the edge found it again.
fn wait_node_connected(cloud: &Cloud) {
    wait_until("node connected to the new cloudcore", PATIENCE, || {
        let node = cloud.node();
        if node["connected"] == true {
            Ok(())
        } else {
            Err(node.to_string())
        }
    });
}

fn edge_config(dir: &Path, protocol: &str, cloud: &Cloud, heartbeat: u64) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, NODE, cloud)
        .heartbeat(heartbeat)
        .write_in(dir)
}

/// One protocol's full run; returns the exactly-once tallies for the report.
fn cloud_end_to_end(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut cloud = start_cloud(root, [0; 4]);
    let config = edge_config(root, protocol, &cloud, 1);
    let mut edge = start_edge(&config);
    let node = cloud.node();
    assert_eq!(node["connected"], true, "{node}");
    assert_eq!(node["protocol"], protocol);

    // Cloud API -> edge application, acknowledged once stored there.
    let acked = cloud.post_and_wait("api-1", "default/configmap/cm1");
    assert_eq!(acked["acked"], true, "{acked}");
    assert_eq!(edge.received().get("api-1"), Some(&1));

    // Edge application -> cloud, on the live stream (subscribed before sending).
    let mut live = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}"));
    let up = edge.send(0);
    let counts = live.until_all(std::slice::from_ref(&up));
    assert_eq!(counts[&up], 1);

    // kill -9 of edgecore in the middle of traffic both ways. Downstream messages share one
    // resource, so they are delivered in order and the final one's ACK implies all the others'.
    let stream = "default/configmap/stream";
    let mut down_ids: Vec<String> = Vec::new();
    let mut up_ids: Vec<String> = vec![up];
    for i in 0..40 {
        let id = format!("edge-kill-down-{i}");
        cloud.post(&id, stream);
        down_ids.push(id);
        if i % 2 == 0 {
            up_ids.push(edge.send(i));
        }
    }
    edge.daemon.kill();
    for i in 40..80 {
        let id = format!("edge-kill-down-{i}");
        cloud.post(&id, stream);
        down_ids.push(id);
    }
    edge = start_edge(&config);
    for i in 100..120 {
        up_ids.push(edge.send(i));
    }
    let last = "edge-kill-down-last".to_owned();
    assert_eq!(cloud.post_and_wait(&last, stream)["acked"], true);
    down_ids.push(last);
    let received = edge.received();
    exactly_once(
        "downstream across an edgecore kill -9",
        &received,
        &down_ids,
    );
    let mut all = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    let counts = all.until_all(&up_ids);
    exactly_once("upstream across an edgecore kill -9", &counts, &up_ids);
    println!(
        "{protocol}: edgecore kill -9: {} downstream and {} upstream messages, each delivered \
         exactly once",
        down_ids.len(),
        up_ids.len()
    );

    // kill -9 of cloudcore in the middle of traffic both ways.
    let ports = cloud.ports();
    let mut down2: Vec<String> = Vec::new();
    let mut up2: Vec<String> = Vec::new();
    for i in 0..40 {
        let id = format!("cloud-kill-down-{i}");
        cloud.post(&id, stream);
        down2.push(id);
        if i % 2 == 0 {
            up2.push(edge.send(1000 + i));
        }
    }
    cloud.daemon.kill();
    for i in 40..60 {
        up2.push(edge.send(1000 + i));
    }
    cloud = start_cloud(root, ports);
    wait_node_connected(&cloud);
    for i in 40..80 {
        let id = format!("cloud-kill-down-{i}");
        cloud.post(&id, stream);
        down2.push(id);
    }
    let last = "cloud-kill-down-last".to_owned();
    assert_eq!(cloud.post_and_wait(&last, stream)["acked"], true);
    down2.push(last);
    let received = edge.received();
    exactly_once("downstream across a cloudcore kill -9", &received, &down2);
    exactly_once("downstream before the cloudcore kill", &received, &down_ids);
    let mut all = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    let mut every = up_ids.clone();
    every.extend(up2.iter().cloned());
    let counts = all.until_all(&every);
    exactly_once("upstream across a cloudcore kill -9", &counts, &every);
    println!(
        "{protocol}: cloudcore kill -9: {} downstream and {} upstream messages, each delivered \
         exactly once",
        down2.len(),
        up2.len()
    );

    // Every queue drained: the edge's outbox is empty, the cloud's queue has nothing open.
    wait_drained(cloud.api, NODE, &root.join("edge/outbox.db"), PATIENCE);

    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
}

#[test]
fn websocket_cloud_end_to_end() {
    cloud_end_to_end("websocket");
}

#[test]
fn quic_cloud_end_to_end() {
    cloud_end_to_end("quic");
}

/// The edge's own certificate material, for dialling as (or pretending to be) the node.
fn edge_dial(dir: &Path, protocol: &str, cloud: &Cloud, claim: &str) -> transport::DialConfig {
    let identity = certs::Identity::load(dir.join("edge/node.crt"), dir.join("edge/node.key"))
        .expect("edge certificate");
    let anchors = certs::TrustAnchors::load(dir.join("edge/ca.crt")).expect("edge CA");
    transport::DialConfig::new(
        cloud.server(protocol).to_string(),
        certs::NodeId::new(claim).expect("node id"),
        identity,
        anchors,
    )
}

/// Two connections claiming one node id: the newest wins (the older is closed), and the node
/// stays connected; then a connection with this node's certificate claiming another node is
/// refused and closed, and that node never appears.
fn identity_rules(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let cloud = start_cloud(root, [0; 4]);
    // A 3 s heartbeat: the replaced edgecore, closed with the takeover's code, waits the longest
    // backoff (eight heartbeats, PROTOCOL.md Part A item 9) before redialling, not two.
    let config = edge_config(root, protocol, &cloud, 3);
    let mut edge = start_edge(&config);
    // A worker thread keeps the test's connection served between `block_on` calls (its ACK is
    // written by a task of this runtime).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let tp: transport::Protocol = protocol.parse().expect("protocol");

    let newest = runtime
        .block_on(transport::connect(
            tp,
            &edge_dial(root, protocol, &cloud, NODE),
        ))
        .expect("second connection of the node");
    edge.wait_cloud(false);
    // The edge read the close code and says so (not just the reason text).
    let line = edge.daemon.logged("disconnected from the cloud");
    assert!(line.contains("close=replaced"), "{line}");
    let node = cloud.node();
    assert_eq!(node["connected"], true, "the node stays connected: {node}");
    // The newest connection is the one served.
    let (code, body) = std::thread::scope(|s| {
        let post = s.spawn(|| {
            http(
                cloud.api,
                "POST",
                &format!("/v1/nodes/{NODE}/messages?wait=ack&timeout=30s"),
                &message("to-newest", "default/configmap/n").to_string(),
            )
        });
        runtime.block_on(async {
            let msg = tokio::time::timeout(PATIENCE, newest.recv())
                .await
                .expect("in time")
                .expect("ok")
                .expect("open");
            assert_eq!(msg.header.id, "to-newest");
            newest
                .send(proto::Message::response_to(
                    &msg,
                    proto::Content::text("OK"),
                ))
                .await
                .expect("ack");
        });
        post.join().expect("post")
    });
    assert_eq!(code, 200, "{body}");
    let metrics = cloud.metrics();
    assert!(metrics.contains("cloudhub_reconnects_total 1"), "{metrics}");
    assert!(
        !metrics.contains("reason=\"replaced\""),
        "a replaced session publishes no disconnect:\n{metrics}"
    );
    // Whether the close is confirmed does not matter here; the connection is gone either way.
    let _ = runtime.block_on(newest.close("test done"));
    drop(newest);
    edge.wait_connected();

    // This node's certificate, claiming to be another node.
    let outcome = runtime.block_on(async {
        match transport::connect(tp, &edge_dial(root, protocol, &cloud, "edge-other")).await {
            Err(e) => format!("refused: {e}"),
            Ok(conn) => match tokio::time::timeout(PATIENCE, conn.recv()).await {
                Ok(Ok(Some(m))) => panic!("an impostor was served {m:?}"),
                Ok(Ok(None)) => "closed".to_owned(),
                Ok(Err(e)) => format!("closed: {e}"),
                Err(_) => panic!("an impostor's connection stayed open"),
            },
        }
    });
    println!("{protocol}: impostor {outcome}");
    let (code, _) = http(cloud.api, "GET", "/v1/nodes/edge-other", "");
    assert_eq!(code, 404);
    let deadline = Instant::now() + PATIENCE;
    while !cloud
        .metrics()
        .contains("cloudhub_rejected_connections_total{reason=\"node_id_mismatch\"} 1")
    {
        assert!(
            Instant::now() < deadline,
            "rejection not counted:\n{}",
            cloud.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cloud.node()["connected"], true);
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn websocket_identity_rules() {
    identity_rules("websocket");
}

#[test]
fn quic_identity_rules() {
    identity_rules("quic");
}
