//! Measures edged's pod lifecycle with the real daemons and a real containerd (root; started with
//! `scripts/containerd.sh`): `apply → Running` (the cloud API's PUT until the cloud's pod status
//! says Running) and `delete → gone` (the DELETE until the runtime has no container or sandbox
//! of the pod), N times (default 10), printing each and the medians. Not a test: run with
//! `cargo run -p causeway-tests --example edged_lifecycle [N]`.

use std::path::Path;
use std::time::{Duration, Instant};

use causeway_tests::containerd::{BUSYBOX_IMAGE, Containerd, PAUSE_IMAGE};
use causeway_tests::daemon::{CloudCore, EdgeConfig, EdgeCore, http, json_of, wait_until};
use edged::cri::Cri;
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(120);
const NODE: &str = "edge-bench";

fn left_at_runtime(socket: &Path, uid: &str) -> usize {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut cri = Cri::connect(socket).await.unwrap();
            let c = cri
                .containers()
                .await
                .unwrap()
                .iter()
                .filter(|c| c.pod_uid == uid)
                .count();
            let s = cri
                .sandboxes()
                .await
                .unwrap()
                .iter()
                .filter(|s| s.pod_uid == uid)
                .count();
            c + s
        })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let runtime = Containerd::start().unwrap_or_else(|why| panic!("{why}"));
    let socket = runtime.socket().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = CloudCore::start(root, [0; 4], 5, PATIENCE);
    let api = cloud.api;
    let config = EdgeConfig::for_cloud(root, "websocket", NODE, &cloud)
        .modules(&format!(
            "  edged: {{ enable: true, cri-socket: '{}', pod-sandbox-image: '{PAUSE_IMAGE}', root-dir: '{}' }}\n",
            socket.display(),
            root.join("edged").display()
        ))
        .write_in(root);
    let edge = EdgeCore::start(&config, PATIENCE);
    edge.wait_connected();
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("bench-{i}");
        let path = format!("/v1/namespaces/default/pods/{name}");
        let body = json!({"spec": {"nodeName": NODE, "hostNetwork": true,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": BUSYBOX_IMAGE,
                            "command": ["sleep", "100000"]}]}});
        let start = Instant::now();
        let (code, text) = http(api, "PUT", &path, &body.to_string());
        assert!(code == 200 || code == 201, "{text}");
        let uid = json_of(&text)["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned();
        wait_until("Running in the cloud", PATIENCE, || {
            let (_, text) = http(api, "GET", &path, "");
            let pod = json_of(&text);
            if pod["status"]["phase"] == "Running" {
                Ok(())
            } else {
                Err(text)
            }
        });
        let running = start.elapsed();
        let start = Instant::now();
        let (code, text) = http(api, "DELETE", &path, "");
        assert_eq!(code, 200, "{text}");
        wait_until("gone from the runtime", PATIENCE, || {
            let left = left_at_runtime(&socket, &uid);
            if left == 0 {
                Ok(())
            } else {
                Err(left.to_string())
            }
        });
        let gone = start.elapsed();
        println!("{name}: apply->Running {running:?}, delete->gone {gone:?}");
        up.push(running);
        down.push(gone);
    }
    println!(
        "median of {n}: apply->Running {:?}, delete->gone {:?}",
        median(&mut up),
        median(&mut down)
    );
    drop(edge);
    drop(cloud);
}
