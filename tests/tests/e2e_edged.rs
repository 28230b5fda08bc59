//! End to end: pods applied in the cloud run on the edge through a real containerd (started by
//! the test with `scripts/containerd.sh`), with the real `cloudcore` and `edgecore` (edged on).
//!
//! - `causeway apply`'s path (the cloud API): a pod with a configmap volume and env → it runs
//!   (its output in its log file) → `Running` with its container `running` and Ready in the
//!   cloud; the configmap updated → the mounted file changes inside the container;
//! - a crashing container is restarted with back-off and counted (`restartCount`, `lastState`);
//! - an image that is not there → `ErrImagePull` / `ImagePullBackOff` with the runtime's message;
//! - deleted pods → their containers and sandboxes are gone;
//! - cloudcore stopped: a killed container comes back; edgecore restarted with the cloud down:
//!   the pod still runs, the same container, not killed.

use std::path::Path;
use std::time::Duration;

use causeway_tests::containerd::{BUSYBOX_IMAGE, Containerd, PAUSE_IMAGE};
use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, http, json_of, wait_until,
};
use edged::cri::Cri;
use edged::reconcile::{ContainerSeen, ContainerState};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);
const NODE: &str = "edge-pods";

fn put(api: std::net::SocketAddr, path: &str, body: &Value) -> Value {
    let (code, text) = http(api, "PUT", path, &body.to_string());
    assert!(code == 200 || code == 201, "PUT {path}: {code} {text}");
    json_of(&text)
}

fn pod_status(api: std::net::SocketAddr, name: &str) -> Value {
    let (code, text) = http(
        api,
        "GET",
        &format!("/v1/namespaces/default/pods/{name}"),
        "",
    );
    assert_eq!(code, 200, "{text}");
    json_of(&text)["status"].clone()
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The runtime's containers of pod `uid`.
fn containers(socket: &Path, uid: &str) -> Vec<ContainerSeen> {
    block_on(async {
        let mut cri = Cri::connect(socket).await.unwrap();
        cri.containers()
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.pod_uid == uid)
            .collect()
    })
}

fn sandboxes_of(socket: &Path, uid: &str) -> usize {
    block_on(async {
        let mut cri = Cri::connect(socket).await.unwrap();
        cri.sandboxes()
            .await
            .unwrap()
            .iter()
            .filter(|s| s.pod_uid == uid)
            .count()
    })
}

fn exec(socket: &Path, id: &str, script: &str) -> String {
    block_on(async {
        let mut cri = Cri::connect(socket).await.unwrap();
        let (_, out) = cri
            .exec_sync(id, vec!["sh".into(), "-c".into(), script.into()], 10)
            .await
            .unwrap_or((1, Vec::new()));
        String::from_utf8_lossy(&out).trim().to_owned()
    })
}

fn running(socket: &Path, uid: &str, name: &str) -> Option<ContainerSeen> {
    containers(socket, uid)
        .into_iter()
        .find(|c| c.name == name && c.state == ContainerState::Running)
}

#[test]
fn pods_run_on_the_edge() {
    let runtime = match Containerd::start() {
        Ok(r) => r,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let socket = runtime.socket().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let api = cloud.api;
    let edged_root = root.join("edged");
    let config = EdgeConfig::for_cloud(root, "websocket", NODE, &cloud)
        .modules(&format!(
            "  edged: {{ enable: true, cri-socket: '{}', pod-sandbox-image: '{PAUSE_IMAGE}', \
             root-dir: '{}', backoff-initial: 1, backoff-max: 2 }}\n",
            socket.display(),
            edged_root.display()
        ))
        .write_in(root);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();

    // Node status from edged: capacity and the runtime's version in the cloud's node object.
    wait_until("the node's capacity in the cloud", PATIENCE, || {
        let (_, node) = http(api, "GET", &format!("/v1/cluster/nodes/{NODE}"), "");
        let node = json_of(&node);
        if node["status"]["capacity"]["cpu"].is_string()
            && node["status"]["nodeInfo"]["containerRuntimeVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("containerd://"))
        {
            Ok(())
        } else {
            Err(node.to_string())
        }
    });

    put(
        api,
        "/v1/namespaces/default/configmaps/web-cfg",
        &json!({"data": {"greeting": "hello"}}),
    );
    let web = put(
        api,
        "/v1/namespaces/default/pods/web",
        &json!({"spec": {"nodeName": NODE, "hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": BUSYBOX_IMAGE,
                "command": ["sh", "-c", "echo started $GREETING $MODE; exec sleep 100000"],
                "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "web-cfg", "key": "greeting"}}},
                        {"name": "MODE", "value": "e2e"}],
                "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
                "resources": {"limits": {"cpu": "200m", "memory": "32Mi"}}}],
            "volumes": [{"name": "cfg", "configMap": {"name": "web-cfg"}}]}}),
    );
    let web_uid = web["metadata"]["uid"].as_str().unwrap().to_owned();
    let crash = put(
        api,
        "/v1/namespaces/default/pods/crash",
        &json!({"spec": {"nodeName": NODE, "hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "boom", "image": BUSYBOX_IMAGE,
                "command": ["sh", "-c", "echo boom; exit 3"]}]}}),
    );
    let crash_uid = crash["metadata"]["uid"].as_str().unwrap().to_owned();
    let missing = put(
        api,
        "/v1/namespaces/default/pods/missing",
        &json!({"spec": {"nodeName": NODE, "hostNetwork": true,
            "containers": [{"name": "c", "image": "causeway.local/not-there:1"}]}}),
    );
    let missing_uid = missing["metadata"]["uid"].as_str().unwrap().to_owned();

    // Running in the cloud, Ready, its output in its log.
    wait_until("web Running and Ready in the cloud", PATIENCE, || {
        let s = pod_status(api, "web");
        let c = &s["containerStatuses"][0];
        let ready = s["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if s["phase"] == "Running"
            && c["state"]["running"].is_object()
            && c["ready"] == true
            && ready
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let log = edged_root
        .join("pods")
        .join(&web_uid)
        .join("logs/main/0.log");
    wait_until("web's output in its log", PATIENCE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("started hello e2e") {
            Ok(())
        } else {
            Err(text)
        }
    });
    let main = running(&socket, &web_uid, "main").expect("web's container runs");
    assert_eq!(exec(&socket, &main.id, "cat /etc/cfg/greeting"), "hello");

    // The configmap changes: the mounted file follows.
    put(
        api,
        "/v1/namespaces/default/configmaps/web-cfg",
        &json!({"data": {"greeting": "bonjour"}}),
    );
    wait_until("the mounted configmap file changed", PATIENCE, || {
        let text = exec(&socket, &main.id, "cat /etc/cfg/greeting");
        if text == "bonjour" { Ok(()) } else { Err(text) }
    });

    // The crashing container: restarted with back-off and counted.
    wait_until(
        "crash restarted twice, its exit in lastState",
        PATIENCE,
        || {
            let s = pod_status(api, "crash");
            let c = &s["containerStatuses"][0];
            let last = if c["state"]["terminated"].is_object() {
                &c["state"]
            } else {
                &c["lastState"]
            };
            if c["restartCount"].as_u64().unwrap_or(0) >= 2 && last["terminated"]["exitCode"] == 3 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );

    // The image that is not there: the pull error, the runtime's message.
    wait_until("missing's pull error in the cloud", PATIENCE, || {
        let s = pod_status(api, "missing");
        let w = &s["containerStatuses"][0]["state"]["waiting"];
        let reason = w["reason"].as_str().unwrap_or_default();
        if (reason == "ErrImagePull" || reason == "ImagePullBackOff")
            && w["message"]
                .as_str()
                .is_some_and(|m| m.contains("not-there"))
            && s["phase"] == "Pending"
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });

    // Deleted: containers and sandboxes gone.
    for name in ["crash", "missing"] {
        let (code, text) = http(
            api,
            "DELETE",
            &format!("/v1/namespaces/default/pods/{name}"),
            "",
        );
        assert_eq!(code, 200, "{text}");
    }
    wait_until("crash and missing gone from the runtime", PATIENCE, || {
        let left: Vec<_> = [&crash_uid, &missing_uid]
            .iter()
            .map(|uid| (containers(&socket, uid).len(), sandboxes_of(&socket, uid)))
            .collect();
        if left.iter().all(|&(c, s)| c == 0 && s == 0) {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });

    // The cloud away: a killed container comes back.
    let ports = cloud.ports();
    assert_eq!(cloud.daemon.stop(), Some(0));
    edge.wait_cloud(false);
    block_on(async {
        let mut cri = Cri::connect(&socket).await.unwrap();
        cri.stop_container(&main.id, 0).await.unwrap();
    });
    let again = wait_until(
        "web's container restarted offline",
        PATIENCE,
        || match running(&socket, &web_uid, "main") {
            Some(c) if c.id != main.id => Ok(c),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(again.attempt, 1);

    // edgecore restarted with the cloud down: the pod is resumed, not killed.
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(
        running(&socket, &web_uid, "main").map(|c| c.id),
        Some(again.id.clone())
    );
    let mut edge = Edge::start(&config, PATIENCE);
    edge.daemon.wait_for("edged: first pass done");
    assert_eq!(
        running(&socket, &web_uid, "main").map(|c| c.id),
        Some(again.id.clone())
    );
    assert_eq!(
        containers(&socket, &web_uid).len(),
        2,
        "the current and one exited instance"
    );

    // The cloud back: the pod deleted, its containers go.
    let cloud = Cloud::start(root, ports, 5, PATIENCE);
    edge.wait_connected();
    let (code, text) = http(cloud.api, "DELETE", "/v1/namespaces/default/pods/web", "");
    assert_eq!(code, 200, "{text}");
    wait_until("web gone from the runtime", PATIENCE, || {
        let left = (
            containers(&socket, &web_uid).len(),
            sandboxes_of(&socket, &web_uid),
        );
        if left == (0, 0) {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    let pod_dir = edged_root.join("pods").join(&web_uid);
    wait_until("web's directory removed", PATIENCE, || {
        if pod_dir.exists() {
            Err(pod_dir.display().to_string())
        } else {
            Ok(())
        }
    });
    assert_eq!(edge.daemon.stop(), Some(0));
    drop(runtime);
}
