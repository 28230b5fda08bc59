//! The resource path on the edge with the real `cloudcore` and `edgecore` over each protocol:
//! resource messages from the cloud (posted through the cloud API, as edgecontroller would send
//! them) are stored by metamanager and acknowledged; an older version is acknowledged but not
//! applied, a delete of another uid leaves the object, a bad resource string is refused (the cloud
//! marks the message failed); MetaServer serves the objects, a watch sees each change and stays
//! open through a cloud outage; a configmap missing at the edge is asked of the cloud
//! (edgecontroller answers from the object store), stored and served, a NotFound answer is a 404
//! and is not stored, a bad query gets a BadRequest answer and stores nothing; a pod's status
//! reported by the edge lands in the cloud's pod object; the node object's Ready condition
//! follows the link (True, then Unknown once the edge is gone); every message id is journaled once
//! and every queue drains; and edgecore restarted with the cloud down still serves every object
//! (offline autonomy).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, bootstrap_token, http, json_of, wait_until,
};
use causeway_tests::drain::wait_drained;
use serde_json::{Value, json};

/// Bound on each wait; generous, since the suite runs beside builds on two cores.
const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-meta";

fn edge_config(dir: &Path, protocol: &str, cloud: &Cloud, token: &str) -> PathBuf {
    EdgeConfig::new(protocol, NODE, cloud.server(protocol), &dir.join("edge"))
        .bootstrap(cloud.https, Some(token))
        .deadlines(2)
        .metamanager("remote-query-timeout: 20")
        .write_in(dir)
}

fn configmap(name: &str, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"namespace": "default", "name": name, "uid": format!("uid-{name}"),
                        "resourceVersion": rv.to_string(), "labels": {"app": "demo"}},
           "data": {"version": rv.to_string()}})
}

fn pod(uid: &str, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": "default", "name": "p1", "uid": uid,
                        "resourceVersion": rv.to_string()},
           "spec": {"nodeName": NODE}})
}

/// Posts a resource message as edgecontroller sends it and waits for the edge's answer.
fn post(
    cloud: &Cloud,
    id: &str,
    op: &str,
    resource: &str,
    rv: u64,
    parent: &str,
    object: Value,
) -> Value {
    let msg = json!({
        "header": {"msg_id": id, "parent_msg_id": parent, "timestamp": proto::now_millis(),
                   "resourceversion": rv.to_string()},
        "route": {"source": "edgecontroller", "group": "resource", "operation": op,
                  "resource": resource},
        "content": object,
    });
    let (code, body) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{NODE}/messages?ack=true&wait=ack&timeout=60s"),
        &msg.to_string(),
    );
    assert_eq!(code, 200, "{body}");
    json_of(&body)
}

fn acked(cloud: &Cloud, id: &str, op: &str, resource: &str, rv: u64, object: Value) {
    let answer = post(cloud, id, op, resource, rv, "", object);
    assert_eq!(answer["acked"], true, "{id}: {answer}");
}

/// A GET on the edge's MetaServer.
fn meta(edge: &Edge, path: &str) -> (u16, Value) {
    let (code, body) = http(edge.local, "GET", path, "");
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// An open `?watch=true` stream on MetaServer, read as it comes.
struct Watch {
    stream: TcpStream,
    text: String,
}

impl Watch {
    fn open(edge: &Edge, path: &str) -> Self {
        let mut stream = TcpStream::connect(edge.local).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n").unwrap();
        Self {
            stream,
            text: String::new(),
        }
    }

    /// The watch events so far (chunk-size lines skipped).
    fn events(&self) -> Vec<Value> {
        self.text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .filter(|v| v.get("type").is_some())
            .collect()
    }

    /// Reads until `n` events arrived.
    fn until(&mut self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        while self.events().len() < n {
            assert!(Instant::now() < deadline, "watch events: {}", self.text);
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the watch ended:\n{}", self.text),
                Ok(k) => self.text.push_str(&String::from_utf8_lossy(&buf[..k])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the watch: {e}"),
            }
        }
        self.events()
    }
}

/// Upstream messages edgecontroller took so far (`/metrics`).
fn routed_to_edgecontroller(cloud: &Cloud) -> u64 {
    let (_, text) = http(cloud.api, "GET", "/metrics", "");
    text.lines()
        .find_map(|l| l.strip_prefix("cloudhub_upstream_routed_total{module=\"edgecontroller\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The node's cloud queue (pending, in flight).
fn node_queue(cloud: &Cloud) -> Value {
    let (code, body) = http(cloud.api, "GET", &format!("/v1/nodes/{NODE}"), "");
    assert_eq!(code, 200, "{body}");
    json_of(&body)["queue"].clone()
}

/// A cloud API call with a JSON body.
fn api(cloud: &Cloud, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (code, text) = http(cloud.api, method, path, &body.to_string());
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The node object's Ready condition in the cloud.
fn ready(cloud: &Cloud) -> Option<String> {
    let (code, node) = api(
        cloud,
        "GET",
        &format!("/v1/cluster/nodes/{NODE}"),
        &Value::Null,
    );
    if code != 200 {
        return None;
    }
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?["status"]
        .as_str()
        .map(str::to_owned)
}

/// Sends `msg` upstream through the edge's local API.
fn upstream(edge: &Edge, msg: &Value) {
    let (code, body) = http(edge.local, "POST", "/v1/upstream", &msg.to_string());
    assert_eq!(code, 202, "{body}");
}

fn resource_path(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let ports = cloud.ports();
    let token = bootstrap_token(root);
    let config = edge_config(root, protocol, &cloud, &token);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    let mut watch = Watch::open(&edge, "/api/v1/namespaces/default/configmaps?watch=true");

    // Stored and acknowledged; versions in order; an older one acknowledged, not applied.
    let cm = "default/configmap/cm1";
    acked(&cloud, "c1", "insert", cm, 5, configmap("cm1", 5));
    acked(&cloud, "c2", "update", cm, 7, configmap("cm1", 7));
    acked(&cloud, "c3", "update", cm, 6, configmap("cm1", 6));
    let (code, got) = meta(&edge, "/api/v1/namespaces/default/configmaps/cm1");
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["data"]["version"], "7", "{got}");
    let events = watch.until(2);
    assert_eq!(
        (events[0]["type"].as_str(), events[1]["type"].as_str()),
        (Some("ADDED"), Some("MODIFIED"))
    );
    assert_eq!(events[1]["object"]["data"]["version"], "7");

    // A delete of another incarnation leaves the pod; its own uid deletes it.
    let p = "default/pod/p1";
    acked(&cloud, "p1", "insert", p, 10, pod("u1", 10));
    acked(&cloud, "p2", "delete", p, 11, pod("u-other", 11));
    assert_eq!(meta(&edge, "/api/v1/namespaces/default/pods/p1").0, 200);
    acked(&cloud, "p3", "delete", p, 10, pod("u1", 10));
    let (code, gone) = meta(&edge, "/api/v1/namespaces/default/pods/p1");
    assert_eq!(
        (code, gone["kind"].as_str()),
        (404, Some("Status")),
        "{gone}"
    );

    // A bad resource string is refused: the cloud marks the message failed with the reason.
    let refused = post(
        &cloud,
        "bad1",
        "update",
        "default/configmap",
        12,
        "",
        json!({}),
    );
    assert_eq!(refused["failed"], true, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad resource")),
        "{refused}"
    );

    // A configmap missing here is asked of the cloud: edgecontroller answers from the object
    // store; stored, ACKed and served.
    let mut remote = configmap("remote", 0);
    remote["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    remote["metadata"].as_object_mut().unwrap().remove("uid");
    let (code, put) = api(
        &cloud,
        "PUT",
        "/v1/namespaces/default/configmaps/remote",
        &remote,
    );
    assert!(code == 200 || code == 201, "{put}");
    let remote_rv = put["metadata"]["resourceVersion"].clone();
    let (code, remote) = meta(&edge, "/api/v1/namespaces/default/configmaps/remote");
    assert_eq!(code, 200, "{remote}");
    assert_eq!(remote["metadata"]["name"], "remote");
    assert_eq!(remote["metadata"]["resourceVersion"], remote_rv, "{remote}");
    assert_eq!(
        watch.until(3)[2]["type"],
        "ADDED",
        "the stored answer is a change too"
    );
    // A NotFound answer is a 404 and is never stored as the object (KubeEdge's M2).
    let (code, gone) = meta(&edge, "/api/v1/namespaces/default/secrets/gone");
    assert_eq!(
        (code, gone["reason"].as_str()),
        (404, Some("NotFound")),
        "{gone}"
    );
    let (_, secrets) = meta(&edge, "/api/v1/namespaces/default/secrets");
    assert_eq!(secrets["items"], json!([]), "the error was not stored");
    // The node object was created on connect, is Ready while the edge is connected, and was
    // synced to its node.
    wait_until("node Ready True", PATIENCE, || match ready(&cloud) {
        Some(r) if r == "True" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    wait_until("the node object at the edge", PATIENCE, || {
        match meta(&edge, &format!("/api/v1/nodes/{NODE}")) {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        }
    });
    // Bad queries (an unknown type, a malformed resource) are answered BadRequest: nothing is
    // stored at the edge.
    let stored_before = edge.status()["objects"].clone();
    let routed_before = routed_to_edgecontroller(&cloud);
    for (id, resource) in [
        ("q-bad1", "default/widget/x"),
        ("q-bad2", "default/configmap"),
    ] {
        upstream(
            &edge,
            &json!({"id": id, "source": "metamanager", "group": "meta",
                    "operation": "query", "resource": resource}),
        );
    }
    wait_until("the bad queries answered", PATIENCE, || {
        let routed = routed_to_edgecontroller(&cloud);
        let queue = node_queue(&cloud);
        if routed >= routed_before + 2 && queue["pending"] == 0 && queue["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!(
                "routed {routed} (before {routed_before}), cloud queue {queue}"
            ))
        }
    });
    assert_eq!(edge.status()["objects"], stored_before, "nothing stored");

    // A pod's status reported by the edge lands in the cloud's pod object.
    let p9 = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": "default", "name": "p9"},
                    "spec": {"nodeName": NODE}});
    let (code, p9) = api(&cloud, "PUT", "/v1/namespaces/default/pods/p9", &p9);
    assert!(code == 200 || code == 201, "{p9}");
    upstream(
        &edge,
        &json!({"source": "edged", "group": "meta", "operation": "update",
                "resource": "default/podstatus/p9",
                "content": {"UID": p9["metadata"]["uid"], "Name": "p9",
                            "Status": {"phase": "Running"}}}),
    );
    wait_until("the pod status in the cloud", PATIENCE, || {
        let (_, pod) = api(
            &cloud,
            "GET",
            "/v1/namespaces/default/pods/p9",
            &Value::Null,
        );
        if pod["status"]["phase"] == "Running" {
            Ok(())
        } else {
            Err(format!("{pod}"))
        }
    });
    let (_, list) = meta(
        &edge,
        "/api/v1/namespaces/default/configmaps?labelSelector=app%3Ddemo",
    );
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
    // The list's version is the newest the edge stored (the test's pod went up to 10).
    let newest = remote_rv.as_str().unwrap().parse::<u64>().unwrap().max(10);
    assert_eq!(
        list["metadata"]["resourceVersion"],
        newest.to_string(),
        "{list}"
    );

    // Each applied message journaled once; the refused one not at all; every queue drained.
    let received = edge.received();
    for id in ["c1", "c2", "c3", "p1", "p2", "p3"] {
        assert_eq!(received.get(id), Some(&1), "{id}: {received:?}");
    }
    assert_eq!(received.get("bad1"), None);
    wait_drained(cloud.api, NODE, &root.join("edge/outbox.db"), PATIENCE);

    // A cloud outage: the watch stays open, MetaServer serves; the next change comes through.
    assert_eq!(cloud.daemon.stop(), Some(0));
    edge.wait_cloud(false);
    assert_eq!(
        meta(&edge, "/api/v1/namespaces/default/configmaps/cm1").0,
        200
    );
    let cloud = Cloud::start(root, ports, 5, PATIENCE);
    edge.wait_connected();
    acked(&cloud, "c4", "update", cm, 8, configmap("cm1", 8));
    let events = watch.until(4);
    assert_eq!(events[3]["type"], "MODIFIED");
    assert_eq!(events[3]["object"]["data"]["version"], "8");
    drop(watch);

    // The edge gone while the cloud runs: its node is Ready Unknown.
    assert_eq!(edge.daemon.stop(), Some(0));
    wait_until("node Ready Unknown", PATIENCE, || match ready(&cloud) {
        Some(r) if r == "Unknown" => Ok(()),
        other => Err(format!("{other:?}")),
    });

    // Offline autonomy: edgecore restarted with the cloud down serves every object.
    assert_eq!(cloud.daemon.stop(), Some(0));
    let edge = Edge::start(&config, PATIENCE);
    assert_eq!(edge.status()["cloud"], "disconnected");
    let (code, got) = meta(&edge, "/api/v1/namespaces/default/configmaps/cm1");
    assert_eq!((code, &got["data"]["version"]), (200, &json!("8")), "{got}");
    let (_, all) = meta(&edge, "/api/v1/configmaps");
    assert_eq!(all["items"].as_array().unwrap().len(), 2, "{all}");
    println!(
        "{protocol}: edge restarted without its cloud serves {} configmaps",
        2
    );
    assert_eq!(edge.daemon.stop(), Some(0));
}

#[test]
fn websocket_resource_path() {
    resource_path("websocket");
}

#[test]
fn quic_resource_path() {
    resource_path("quic");
}
