//! End to end: the object path with the real `cloudcore` (object store, edgecontroller) and the
//! real `edgecore` on loopback, over each protocol. Objects are applied through the cloud API;
//! the edge (its local store, until metamanager lands) receives KubeEdge's `resource` messages and
//! ACKs them after storing.
//!
//! - apply → the edge has the pod and the configmap it references → ACKed (queue drained);
//! - update and delete propagate (a configmap no pod references any more is deleted at the edge);
//! - the edge offline while 100 objects change (50 updated twice, 25 deleted, 25 created), then
//!   back: exactly one message per changed object, none for the unchanged ones, and the edge's
//!   last word on every object is the cloud's state.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, bootstrap_token, http, json_of, wait_until,
};
use causeway_tests::drain::wait_cloud_drained;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-obj";

fn edge_config(
    dir: &Path,
    protocol: &str,
    server: SocketAddr,
    https: SocketAddr,
    token: &str,
) -> PathBuf {
    EdgeConfig::new(protocol, NODE, server, &dir.join("edge"))
        .bootstrap(https, Some(token))
        .deadlines(2)
        .write_in(dir)
}

fn put(api: SocketAddr, path: &str, body: &Value) -> Value {
    let (code, text) = http(api, "PUT", path, &body.to_string());
    assert!(code == 200 || code == 201, "PUT {path}: {code} {text}");
    json_of(&text)
}

/// Deletes and returns the last object (its resourceVersion is the deletion's).
fn delete(api: SocketAddr, path: &str) -> Value {
    let (code, text) = http(api, "DELETE", path, "");
    assert_eq!(code, 200, "DELETE {path}: {text}");
    json_of(&text)
}

/// The edge's view: per resource, the last operation and resourceVersion it stored.
fn edge_state(messages: &[Value]) -> BTreeMap<String, (String, u64)> {
    let mut state = BTreeMap::new();
    for m in messages {
        let resource = m["route"]["resource"].as_str().unwrap_or("").to_owned();
        let op = m["route"]["operation"].as_str().unwrap_or("").to_owned();
        let rv = m["header"]["resourceversion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        state.insert(resource, (op, rv));
    }
    state
}

fn acked(api: SocketAddr, id: &str) -> bool {
    let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}/messages/{id}"), "");
    code == 200 && json_of(&body)["state"] == "acked"
}

/// Waits until the edge's last word on each of `want` is (op, rv); returns all its messages.
fn wait_edge(edge: &Edge, want: &[(&str, &str, u64)]) -> Vec<Value> {
    wait_until("the edge holds the cloud's objects", PATIENCE, || {
        let messages = edge.journal();
        let state = edge_state(&messages);
        for (resource, op, rv) in want {
            let got = state.get(*resource);
            if got != Some(&((*op).to_owned(), *rv)) {
                return Err(format!("{resource}: {got:?}, want {op} {rv}"));
            }
        }
        Ok(messages)
    })
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn objects(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let api = cloud.api;
    let token = bootstrap_token(root);
    let config = edge_config(root, protocol, cloud.server(protocol), cloud.https, &token);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_until("the node is known", PATIENCE, || {
        let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
        if code == 200 { Ok(()) } else { Err(body) }
    });

    // Apply: a configmap and a pod on the node that references it.
    let cm = put(
        api,
        "/v1/namespaces/default/configmaps/cm-a",
        &json!({"data": {"k": "1"}}),
    );
    let pod = put(
        api,
        "/v1/namespaces/default/pods/p1",
        &json!({"spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox",
            "envFrom": [{"configMapRef": {"name": "cm-a"}}]}]}}),
    );
    let messages = wait_edge(
        &edge,
        &[
            ("default/configmap/cm-a", "insert", rv_of(&cm)),
            ("default/pod/p1", "insert", rv_of(&pod)),
        ],
    );
    for m in &messages {
        assert_eq!(m["route"]["source"], "edgecontroller");
        assert_eq!(m["route"]["group"], "resource");
        assert!(m["content"]["kind"].is_string(), "{m}");
    }
    let ids: Vec<String> = messages
        .iter()
        .map(|m| m["header"]["msg_id"].as_str().unwrap().to_owned())
        .collect();
    wait_until("the edge ACKed them", PATIENCE, || {
        if ids.iter().all(|id| acked(api, id)) {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    });
    wait_cloud_drained(api, NODE, PATIENCE);

    // Update and delete propagate; the configmap goes when no pod references it.
    let cm2 = put(
        api,
        "/v1/namespaces/default/configmaps/cm-a",
        &json!({"data": {"k": "2"}}),
    );
    // `update`, or `insert` when the controller saw the change before the first ACK (both
    // are upserts at the edge); the version is what matters.
    wait_until("the update reaches the edge", PATIENCE, || {
        let state = edge_state(&edge.journal());
        match state.get("default/configmap/cm-a") {
            Some((op, rv)) if *rv == rv_of(&cm2) && (op == "update" || op == "insert") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // (Versions are global: the node's Ready writes take some too, so the deletion's is read.)
    let deleted = delete(api, "/v1/namespaces/default/pods/p1");
    wait_until(
        "the pod and its unreferenced configmap are deleted at the edge",
        PATIENCE,
        || {
            let state = edge_state(&edge.journal());
            let pod_gone =
                state.get("default/pod/p1") == Some(&("delete".to_owned(), rv_of(&deleted)));
            let cm_gone = state
                .get("default/configmap/cm-a")
                .is_some_and(|(op, _)| op == "delete");
            if pod_gone && cm_gone {
                Ok(())
            } else {
                Err(format!("{state:?}"))
            }
        },
    );
    wait_cloud_drained(api, NODE, PATIENCE);

    // 100 configmaps referenced by one pod (it also names 25 that do not exist yet).
    let names: Vec<String> = (0..125).map(|i| format!("cm-{i:03}")).collect();
    for name in &names[..100] {
        put(
            api,
            &format!("/v1/namespaces/default/configmaps/{name}"),
            &json!({"data": {"v": "0"}}),
        );
    }
    let env_from: Vec<Value> = names
        .iter()
        .map(|n| json!({"configMapRef": {"name": n}}))
        .collect();
    put(
        api,
        "/v1/namespaces/default/pods/p2",
        &json!({"spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox", "envFrom": env_from}]}}),
    );
    wait_until("the edge holds 100 configmaps", PATIENCE, || {
        let m = edge.journal();
        let held = edge_state(&m)
            .iter()
            .filter(|(k, (op, _))| k.starts_with("default/configmap/cm-") && op == "insert")
            .count();
        if held == 100 {
            Ok(())
        } else {
            Err(format!("{held}"))
        }
    });
    wait_cloud_drained(api, NODE, PATIENCE);
    // Taken once the queue drained: every earlier message (the pod too) has arrived.
    let before = edge.journal();

    // The edge goes away; 100 objects change meanwhile (150 changes).
    assert_eq!(edge.daemon.stop(), Some(0));
    wait_until("the cloud sees the node gone", PATIENCE, || {
        let (_, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
        if json_of(&body)["connected"] == false {
            Ok(())
        } else {
            Err(body)
        }
    });
    let mut changes = 0;
    for name in &names[..50] {
        for v in ["1", "2"] {
            put(
                api,
                &format!("/v1/namespaces/default/configmaps/{name}"),
                &json!({"data": {"v": v}}),
            );
            changes += 1;
        }
    }
    for name in &names[50..75] {
        delete(api, &format!("/v1/namespaces/default/configmaps/{name}"));
        changes += 1;
    }
    for name in &names[100..] {
        put(
            api,
            &format!("/v1/namespaces/default/configmaps/{name}"),
            &json!({"data": {"v": "new"}}),
        );
        changes += 1;
    }
    // Queued meanwhile: one message per changed object.
    wait_until("one queued message per changed object", PATIENCE, || {
        let (_, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
        let q = &json_of(&body)["queue"];
        let open = q["pending"].as_u64().unwrap_or(0) + q["in_flight"].as_u64().unwrap_or(0);
        if open == 100 { Ok(()) } else { Err(body) }
    });

    // Back: the edge converges, with exactly one new message per changed object.
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    let (_, list) = http(api, "GET", "/v1/namespaces/default/configmaps", "");
    let cloud_state: HashMap<String, u64> = json_of(&list)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["metadata"]["name"].as_str().unwrap().to_owned(), rv_of(o)))
        .collect();
    wait_until("the edge converges to the cloud's state", PATIENCE, || {
        let m = edge.journal();
        let state = edge_state(&m);
        for name in &names {
            let key = format!("default/configmap/{name}");
            let got = state.get(&key);
            let ok = match cloud_state.get(name) {
                Some(rv) => got.is_some_and(|(op, r)| op != "delete" && r == rv),
                None => got.is_some_and(|(op, _)| op == "delete"),
            };
            if !ok {
                return Err(format!(
                    "{key}: edge {got:?}, cloud {:?}",
                    cloud_state.get(name)
                ));
            }
        }
        Ok(())
    });
    wait_cloud_drained(api, NODE, PATIENCE);
    let after = edge
        .journal()
        .into_iter()
        .skip(before.len())
        .collect::<Vec<_>>();
    let mut per_object: BTreeMap<String, usize> = BTreeMap::new();
    for m in &after {
        *per_object
            .entry(m["route"]["resource"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    println!(
        "{protocol}: edge offline during {changes} changes to 100 objects; after reconnect it received {} messages for {} objects",
        after.len(),
        per_object.len()
    );
    assert_eq!(per_object.len(), 100, "{per_object:?}");
    assert!(per_object.values().all(|n| *n == 1), "{per_object:?}");
    for name in &names[75..100] {
        assert!(
            !per_object.contains_key(&format!("default/configmap/{name}")),
            "unchanged {name} resent"
        );
    }
    // Every id exactly once at the edge.
    let counts = edge.received();
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn objects_sync_over_quic() {
    objects("quic");
}

#[test]
fn objects_sync_over_websocket() {
    objects("websocket");
}
