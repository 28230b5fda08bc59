//! End to end with the real `cloudcore` and `edgecore` on loopback, over each protocol: a
//! message that needs an ACK but that the edge cannot deliver is answered with an error and
//! fails at once in the cloud instead of being resent forever, and the messages queued after it
//! for the same resource are delivered and acknowledged (issue 9: every queue has a way back to
//! empty). Two cases: a group no edge handler serves (`nosuch`, refused by the edge session)
//! and a group whose module this edge does not run (`twin`: edgecore has no devicetwin, refused
//! by the bus).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, http, json_of};
use causeway_tests::drain::wait_drained;
use serde_json::{Value, json};

/// Bound on anything that should happen within a few heartbeats.
const PATIENCE: Duration = Duration::from_secs(90);
/// The node every test edge runs as.
const NODE: &str = "edge-refused-e2e";

fn edge_config(dir: &Path, protocol: &str, cloud: &Cloud) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, NODE, cloud).write_in(dir)
}

fn message(id: &str, group: &str, resource: &str) -> String {
    json!({
        "header": {"msg_id": id},
        "route": {"source": "e2e", "group": group, "operation": "update", "resource": resource},
        "content": {"id": id}
    })
    .to_string()
}

/// POSTs with `?ack=true&wait=ack` and returns the answer (200 expected).
fn post_and_wait(cloud: &Cloud, id: &str, group: &str, resource: &str) -> Value {
    let (code, body) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{NODE}/messages?ack=true&wait=ack&timeout=60s"),
        &message(id, group, resource),
    );
    assert_eq!(code, 200, "{body}");
    json_of(&body)
}

fn message_state(cloud: &Cloud, id: &str) -> Value {
    let (code, body) = http(
        cloud.api,
        "GET",
        &format!("/v1/nodes/{NODE}/messages/{id}"),
        "",
    );
    assert_eq!(code, 200, "{body}");
    json_of(&body)
}

fn refused_messages_fail_and_their_resource_drains(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 30, PATIENCE);
    let config = edge_config(root, protocol, &cloud);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();

    for (id, group, why) in [("typo-1", "nosuch", "nosuch"), ("twin-1", "twin", "twin")] {
        let resource = format!("default/configmap/{id}");
        let started = Instant::now();
        let answer = post_and_wait(&cloud, id, group, &resource);
        let took = started.elapsed();
        assert_eq!(answer["acked"], false, "{answer}");
        assert_eq!(answer["failed"], true, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{answer}");
        println!("{protocol}: group {group:?} failed after {took:?}: {error}");
        let state = message_state(&cloud, id);
        assert_eq!(state["state"], "failed", "{state}");
        assert_eq!(state["error"], error, "{state}");
        // The resource is not held back: the next message for it is delivered and acked.
        let next = format!("{id}-next");
        let answer = post_and_wait(&cloud, &next, "resource", &resource);
        assert_eq!(answer["acked"], true, "{answer}");
        assert_eq!(edge.received().get(&next), Some(&1));
        assert_eq!(edge.received().get(id), None);
    }
    let metrics = http(cloud.api, "GET", "/metrics", "").1;
    assert!(
        metrics.contains("cloudhub_downstream_failed_total 2"),
        "{metrics}"
    );

    // Every queue drained: the edge's outbox is empty, the cloud's queue has nothing open.
    wait_drained(cloud.api, NODE, &root.join("edge/outbox.db"), PATIENCE);
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
}

#[test]
fn websocket_refused_messages_fail_and_their_resource_drains() {
    refused_messages_fail_and_their_resource_drains("websocket");
}

#[test]
fn quic_refused_messages_fail_and_their_resource_drains() {
    refused_messages_fail_and_their_resource_drains("quic");
}
