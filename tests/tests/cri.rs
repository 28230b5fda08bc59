//! edged's CRI client against a real containerd (started by the test with
//! `scripts/containerd.sh`): a host-network sandbox, a container's output in its log file, an
//! exec, a failed pull with the runtime's message, and everything removed again.

use std::time::{Duration, Instant};

use causeway_tests::containerd::{BUSYBOX_IMAGE, Containerd, PAUSE_IMAGE};
use edged::cri::Cri;
use edged::make;
use edged::pod::Pod;
use edged::reconcile::ContainerState;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_through_the_cri() {
    let runtime = match Containerd::start() {
        Ok(r) => r,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let mut cri = Cri::connect(runtime.socket()).await.unwrap();
    assert!(cri.version().await.unwrap().starts_with("containerd://"));
    assert!(cri.has_image(PAUSE_IMAGE).await.unwrap());
    assert!(!cri.has_image("causeway.local/nothing:1").await.unwrap());
    let pull = cri
        .pull_image("causeway.local/nothing:1")
        .await
        .unwrap_err();
    assert!(pull.to_string().contains("PullImage"), "{pull}");

    let pod = Pod::from_json(
        &json!({"metadata": {"name": "hello", "namespace": "default", "uid": "uid-1"},
                "spec": {"hostNetwork": true, "containers": [
                    {"name": "main", "image": BUSYBOX_IMAGE,
                     "command": ["sh", "-c"], "args": ["echo hello from $WHO; sleep 30"],
                     "env": [{"name": "WHO", "value": "edged"}]}]}})
        .to_string(),
    )
    .unwrap();
    let sandbox_config = make::sandbox_config(&pod, 0, root.path());
    std::fs::create_dir_all(&sandbox_config.log_directory).unwrap();
    let sandbox = cri.run_sandbox(sandbox_config.clone()).await.unwrap();
    let dirs = make::volumes(&pod, root.path(), &std::collections::BTreeMap::new()).unwrap();
    let config = make::container_config(
        &pod,
        &pod.spec.containers[0],
        0,
        &std::collections::BTreeMap::new(),
        &dirs,
    )
    .unwrap();
    let id = cri
        .create_and_start(&sandbox, config, sandbox_config.clone())
        .await
        .unwrap();
    let log = std::path::Path::new(&sandbox_config.log_directory).join(make::log_path("main", 0));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("hello from edged") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no output in {}: {text:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = cri.containers().await.unwrap();
    let c = seen.iter().find(|c| c.id == id).unwrap();
    assert_eq!(
        (c.name.as_str(), c.pod_uid.as_str(), c.state),
        ("main", "uid-1", ContainerState::Running)
    );
    let (code, out) = cri
        .exec_sync(&id, vec!["sh".into(), "-c".into(), "echo $WHO".into()], 10)
        .await
        .unwrap();
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (0, "edged"));
    let sandboxes = cri.sandboxes().await.unwrap();
    assert_eq!(sandboxes.len(), 1);
    assert!(sandboxes[0].ready);

    cri.stop_container(&id, 1).await.unwrap();
    let seen = cri.containers().await.unwrap();
    assert_eq!(
        seen.iter().find(|c| c.id == id).unwrap().state,
        ContainerState::Exited
    );
    cri.remove_container(&id).await.unwrap();
    cri.stop_sandbox(&sandbox).await.unwrap();
    cri.remove_sandbox(&sandbox).await.unwrap();
    assert!(cri.containers().await.unwrap().is_empty());
    assert!(cri.sandboxes().await.unwrap().is_empty());
    assert_eq!(runtime.ctr(&["containers", "ls", "-q"]).trim(), "");
}
