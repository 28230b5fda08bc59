//! The `cloudcore` binary as a user runs it: `--version`, `--defaultconfig` (which must parse to
//! the defaults), and a start on free ports that creates the key material, serves `/healthz`,
//! and exits 0 on SIGTERM and on SIGINT.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cloudhub::config::{CloudcoreConfig, DEFAULT_YAML, from_yaml};

const BIN: &str = env!("CARGO_BIN_EXE_cloudcore");

#[test]
fn version_names_the_package_version() {
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("cloudcore {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn defaultconfig_is_complete_and_parses_to_the_defaults() {
    let out = Command::new(BIN)
        .arg("--defaultconfig")
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text, DEFAULT_YAML);
    let parsed: CloudcoreConfig = from_yaml(&text, "--defaultconfig").expect("parses");
    assert_eq!(parsed, CloudcoreConfig::default());
    // Complete: every section is spelled out.
    for key in [
        "websocket:",
        "quic:",
        "https:",
        "api:",
        "tls:",
        "queue:",
        "delivery:",
        "link:",
    ] {
        assert!(text.contains(key), "{key} missing");
    }
}

#[test]
fn a_bad_config_fails_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "cloudhub:\n  node-limit: -1\n").expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cloudhub.node-limit"), "{err}");
    // Said once: not again in a log line, nor twice within the line.
    assert_eq!(err.matches("cloudhub.node-limit").count(), 1, "{err}");
    assert_eq!(err.matches("cloudcore: ").count(), 1, "{err}");
}

#[test]
fn a_disabled_listener_needs_no_other_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cloudcore.yaml");
    let yaml = format!(
        "cloudhub:\n  websocket: {{ address: 127.0.0.1, port: 0 }}\n  \
         quic: {{ enable: false }}\n  https: {{ enable: false }}\n  api: {{ port: 0 }}\n  \
         tls: {{ cert-dir: {} }}\n  queue: {{ path: {} }}\n",
        dir.path().join("pki").display(),
        dir.path().join("cloudcore.db").display()
    );
    std::fs::write(&config, yaml).expect("write config");
    let mut running = Running::start(&config);
    let line = running.wait_for("cloudcore listening");
    assert!(
        field(&line, "websocket").starts_with("127.0.0.1:"),
        "{line}"
    );
    running.signal("TERM");
    assert_eq!(running.child.wait().expect("wait").code(), Some(0));
}

/// A running cloudcore with its stderr lines forwarded.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(config: &std::path::Path) -> Self {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cloudcore");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for the line containing `needle` (or fails after a generous bound).
    fn wait_for(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no {needle:?} line from cloudcore: {e}"),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in a tracing line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(&format!("{key}=")).map(|i| i + key.len() + 1);
    let rest = start.map_or("", |s| &line[s..]);
    rest.split_whitespace().next().unwrap_or("")
}

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("cloudcore.yaml");
    let yaml = format!(
        "cloudhub:\n  websocket: {{ enable: true, address: 127.0.0.1, port: 0 }}\n  \
         quic: {{ enable: true, address: 127.0.0.1, port: 0 }}\n  \
         https: {{ enable: true, address: 127.0.0.1, port: 0 }}\n  \
         api: {{ enable: true, address: 127.0.0.1, port: 0 }}\n  \
         tls: {{ cert-dir: {} }}\n  queue: {{ path: {} }}\n",
        dir.join("pki").display(),
        dir.join("state/cloudcore.db").display()
    );
    std::fs::write(&path, yaml).expect("write config");
    path
}

fn healthz(api: &str) -> String {
    let mut stream = TcpStream::connect(api).expect("connect to the API");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn starts_serves_and_exits_zero_on_sigterm_and_sigint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    for sig in ["TERM", "INT"] {
        let mut running = Running::start(&config);
        let line = running.wait_for("cloudcore listening");
        let api = field(&line, "api").to_owned();
        assert!(api.starts_with("127.0.0.1:"), "{line}");
        running.wait_for("bootstrap token");
        let response = healthz(&api);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ok"), "{response}");
        running.signal(sig);
        let status = running.child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "exit status after SIG{sig}");
    }
    // First start created the key material in the `causeway certs init` layout; the second
    // start reused it.
    for file in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        assert!(dir.path().join("pki").join(file).exists(), "{file}");
    }
    assert!(dir.path().join("state/cloudcore.db").exists());
}

/// Runs cloudcore to its exit (bounded: it must refuse to start, not serve).
fn run_to_exit(config: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("cloudcore kept running with a damaged or locked store");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    (status.code(), err)
}

#[test]
fn a_damaged_or_locked_store_is_one_clear_line_and_exit_1() {
    // Damaged: garbage where the SQLite file should be; it is left as it was.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let db = dir.path().join("state/cloudcore.db");
    std::fs::create_dir_all(db.parent().expect("dir")).expect("mkdir");
    std::fs::write(&db, vec![0x5a; 8192]).expect("write");
    let (code, err) = run_to_exit(&config);
    assert_eq!(code, Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("cloudcore: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(line.contains(&db.display().to_string()), "{line}");
    assert!(line.contains("not a database"), "{line}");
    assert_eq!(err.matches("cloudcore: ").count(), 1, "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), vec![0x5a; 8192]);

    // Locked: another process holds an exclusive lock on a good file.
    std::fs::remove_file(&db).expect("rm");
    let holder = rusqlite::Connection::open(&db).expect("open");
    holder
        .execute_batch("CREATE TABLE t (x); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);")
        .expect("lock");
    let (code, err) = run_to_exit(&config);
    assert_eq!(code, Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("cloudcore: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(line.contains(&db.display().to_string()), "{line}");
    assert!(line.contains("locked"), "{line}");
}
