//! The `edgecore` binary: `--version`, `--defaultconfig` (which must parse), configuration errors
//! naming the key path, and a clean exit 0 on SIGTERM and SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use causeway_edgecore::config::EdgecoreConfig;

const EXE: &str = env!("CARGO_BIN_EXE_edgecore");

#[test]
fn version() {
    let out = Command::new(EXE).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("edgecore {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn defaultconfig_is_complete_commented_and_parses() {
    let out = Command::new(EXE).arg("--defaultconfig").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .filter(|l| l.trim_start().starts_with('#') || l.contains(" # "))
            .count()
            > 10
    );
    let config = EdgecoreConfig::parse(&text, "--defaultconfig").unwrap();
    // Every section is spelled out.
    for key in [
        "controller:",
        "websocket:",
        "quic:",
        "tls:",
        "http-server:",
        "token:",
        "outbox:",
        "local-store:",
    ] {
        assert!(text.contains(key), "{key} missing");
    }
    assert_eq!(config.edgehub.controller.heartbeat.get(), 15);
}

#[test]
fn a_config_file_is_required() {
    let out = Command::new(EXE).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn unknown_keys_and_invalid_values_are_refused_with_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "edgehub:\n  controller: { node-id: edge-1, hearbeat: 15 }\n",
            "edgehub.controller.hearbeat",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, heartbeat: -3 }\n",
            "edgehub.controller.heartbeat",
        ),
        (
            "edgehub:\n  controller: { node-id: EDGE }\n",
            "edgehub.controller.node-id",
        ),
        (
            "edgehub:\n  controller: { node-id: e }\nmodules:\n  local-store: { listen: '10.0.0.1:1' }\n",
            "modules.local-store.listen",
        ),
    ];
    for (i, (yaml, key)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(EXE)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "file not named:\n{stderr}"
        );
    }
}

#[test]
fn a_missing_certificate_without_token_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgecore.yaml");
    let d = dir.path().display();
    std::fs::write(
        &path,
        format!(
            "edgehub:\n  controller: {{ node-id: edge-1 }}\n  tls: {{ ca-file: {d}/ca.crt, cert-file: {d}/n.crt, key-file: {d}/n.key }}\n  outbox: {{ path: {d}/o.db }}\nmodules:\n  local-store: {{ path: {d}/l.db, listen: '127.0.0.1:0' }}\n"
        ),
    )
    .unwrap();
    let out = Command::new(EXE)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("edgehub.token"));
}

/// Starts edgecore with EdgeHub disabled (no cloud needed) and waits until it is running.
fn start_daemon(dir: &tempfile::TempDir) -> Child {
    let path = dir.path().join("edgecore.yaml");
    let d = dir.path().display();
    std::fs::write(
        &path,
        format!(
            "edgehub:\n  controller: {{ node-id: edge-1 }}\n  outbox: {{ path: {d}/o.db }}\nmodules:\n  edgehub: {{ enable: false }}\n  local-store: {{ path: {d}/l.db, listen: '127.0.0.1:0' }}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(EXE)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let started = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("local store listening") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        panic!("edgecore did not log its start");
    }
    child
}

fn exits_zero_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_daemon(&dir);
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "edgecore exits 0 on SIG{signal}");
}

#[test]
fn exits_zero_on_sigterm() {
    exits_zero_on("TERM");
}

#[test]
fn exits_zero_on_sigint() {
    exits_zero_on("INT");
}
