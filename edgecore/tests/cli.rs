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
        "metamanager:",
        "local-api:",
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
            "edgehub:\n  controller: { node-id: e }\nmodules:\n  local-api: { listen: '10.0.0.1:1' }\n",
            "modules.local-api.listen",
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
            "edgehub:\n  controller: {{ node-id: edge-1 }}\n  tls: {{ ca-file: {d}/ca.crt, cert-file: {d}/n.crt, key-file: {d}/n.key }}\n  outbox: {{ path: {d}/o.db }}\nmodules:\n  metamanager: {{ path: {d}/m.db }}\n  local-api: {{ listen: '127.0.0.1:0' }}\n"
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
            "edgehub:\n  controller: {{ node-id: edge-1 }}\n  outbox: {{ path: {d}/o.db }}\nmodules:\n  edgehub: {{ enable: false }}\n  metamanager: {{ path: {d}/m.db }}\n  local-api: {{ listen: '127.0.0.1:0' }}\n"
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
            Ok(line) if line.contains("local API listening") => break true,
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

/// Writes a config whose node certificate exists (issued here), so edgecore gets as far as its
/// stores; the cloud address leads nowhere (nothing needs it).
fn config_with_certificate(dir: &std::path::Path) -> std::path::PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let ca = certs::CertificateAuthority::generate(certs::Validity::days_from(now, 1)).unwrap();
    let node = certs::NodeId::new("edge-1").unwrap();
    let issued = ca
        .issue_node(&node, certs::Validity::days_from(now, 1))
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("n.crt"), &issued.cert_pem).unwrap();
    std::fs::write(dir.join("n.key"), &issued.key_pem).unwrap();
    let d = dir.display();
    let path = dir.join("edgecore.yaml");
    std::fs::write(
        &path,
        format!(
            "edgehub:\n  controller: {{ node-id: edge-1 }}\n  websocket: {{ server: '127.0.0.1:9' }}\n  tls: {{ ca-file: {d}/ca.crt, cert-file: {d}/n.crt, key-file: {d}/n.key }}\n  outbox: {{ path: {d}/o.db }}\nmodules:\n  metamanager: {{ path: {d}/m.db }}\n  local-api: {{ listen: '127.0.0.1:0' }}\n"
        ),
    )
    .unwrap();
    path
}

/// Runs edgecore to its exit (bounded: it must refuse to start, not serve).
fn run_to_exit(config: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(EXE)
        .arg("--config")
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("edgecore kept running with a damaged or locked store");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn a_damaged_or_locked_store_is_one_clear_line_and_exit_1() {
    for file in ["o.db", "m.db"] {
        // Damaged: garbage where the SQLite file should be.
        let dir = tempfile::tempdir().unwrap();
        let config = config_with_certificate(dir.path());
        let path = dir.path().join(file);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let (code, err) = run_to_exit(&config);
        assert_eq!(code, Some(1), "{file}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("edgecore: "))
            .unwrap_or_else(|| panic!("{file}: no error line in {err}"));
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert!(line.contains("not a database"), "{line}");
        assert_eq!(err.matches("edgecore: ").count(), 1, "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![0x5a; 8192],
            "{file}: the damaged file is left as it was, never replaced by an empty store"
        );

        // Locked: another process holds an exclusive lock on a good file.
        let dir = tempfile::tempdir().unwrap();
        let config = config_with_certificate(dir.path());
        let path = dir.path().join(file);
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder
            .execute_batch("CREATE TABLE t (x); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);")
            .unwrap();
        let (code, err) = run_to_exit(&config);
        assert_eq!(code, Some(1), "{file}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("edgecore: "))
            .unwrap_or_else(|| panic!("{file}: no error line in {err}"));
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert!(line.contains("locked"), "{line}");
        drop(holder);
    }
}
