//! The real `cloudcore` and `edgecore` processes as the end-to-end tests (`e2e_cloud.rs`,
//! `e2e_edge.rs`) drive them: found next to the test executable, started with a config file,
//! watched through their stderr log lines, signalled, and talked to over plain HTTP/1.1.
//!
//! Helpers here panic with the daemon's log on failure: they exist to make a failing end-to-end
//! test say why, and every wait is bounded so a broken daemon fails the test instead of hanging it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Read timeout of [`http`]: longer than the longest `?wait=ack&timeout=` the tests ask the cloud
/// API for, so a slow answer is read rather than cut off.
pub const HTTP_PATIENCE: Duration = Duration::from_secs(90);

/// A built binary of the workspace, next to this test executable's `deps/` directory.
///
/// `current_exe` is the test executable even when called from this library, which is why the
/// binaries are found relative to it (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo test --workspace` (it builds every binary) or \
         `cargo build -p causeway-edgecore -p causeway-cloudcore` first",
        path.display()
    );
    path
}

/// A daemon whose stderr lines are collected; killed when dropped.
pub struct Daemon {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    patience: Duration,
}

impl Daemon {
    /// Starts the binary `name` with `--config <config>`; [`Daemon::wait_for`] gives up after
    /// `patience` (each test knows how many heartbeats it waits for).
    pub fn start(name: &'static str, config: &Path, patience: Duration) -> Self {
        let mut child = Command::new(binary(name))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let (tx, lines) = channel();
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Self {
            name,
            child,
            lines,
            seen: Vec::new(),
            patience,
        }
    }

    /// Waits for a log line containing `needle` (after the lines already consumed).
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + self.patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "{} never logged {needle:?}; its log:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` (a name such as `TERM`) with `kill(1)`, as an operator would.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        self.child.wait().expect("wait").code()
    }

    /// SIGKILL: the process dies without any cleanup.
    pub fn kill(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` fields of a log line.
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// A plain HTTP/1.1 exchange; returns (status, body), the body de-chunked if it was chunked.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(HTTP_PATIENCE)).expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Parses a response body as JSON, panicking with the body if it is not.
pub fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// How often each of `ids` appears as a message id in the `data:` lines of a Server-Sent Events
/// text from the cloud's upstream stream; ids never seen are absent.
pub fn count_ids(text: &str, ids: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<Value>(data.trim()) else {
            continue;
        };
        if let Some(id) = event["message"]["header"]["msg_id"].as_str()
            && ids.iter().any(|i| i == id)
        {
            *counts.entry(id.to_owned()).or_default() += 1;
        }
    }
    counts
}

/// A bootstrap token for the CA that cloudcore created under `<dir>/pki`, as
/// `causeway token create` makes it (valid for an hour).
pub fn bootstrap_token(dir: &Path) -> String {
    let ca = certs::files::CertDir::new(dir.join("pki"))
        .load_ca()
        .expect("the cloud created its CA");
    certs::token::create(
        &ca,
        Duration::from_secs(3600),
        time::OffsetDateTime::now_utc(),
    )
}

/// A running `cloudcore` on loopback, with the addresses it reported it bound.
pub struct CloudCore {
    /// The process; its log is read through [`Daemon::wait_for`].
    pub daemon: Daemon,
    /// The WebSocket server edges dial.
    pub ws: SocketAddr,
    /// The QUIC server edges dial.
    pub quic: SocketAddr,
    /// The certificate-bootstrap HTTPS server.
    pub https: SocketAddr,
    /// The cloud API (messages, nodes, metrics).
    pub api: SocketAddr,
}

impl CloudCore {
    /// Writes `<dir>/cloudcore.yaml` and starts cloudcore with its state (PKI, queue) in `dir`,
    /// listening on `ports` (websocket, quic, https, api; 0 = any) so a restart can reuse the
    /// previous run's ports. Returns once it logged where it listens.
    pub fn start(dir: &Path, ports: [u16; 4], keepalive_interval: u64, patience: Duration) -> Self {
        let d = dir.display();
        let [ws, quic, https, api] = ports;
        let config = dir.join("cloudcore.yaml");
        std::fs::write(
            &config,
            format!(
                "cloudhub:
  websocket: {{ enable: true, address: 127.0.0.1, port: {ws} }}
  quic: {{ enable: true, address: 127.0.0.1, port: {quic} }}
  https: {{ enable: true, address: 127.0.0.1, port: {https} }}
  api: {{ enable: true, address: 127.0.0.1, port: {api} }}
  keepalive-interval: {keepalive_interval}
  tls: {{ cert-dir: {d}/pki }}
  advertise-address: [127.0.0.1]
  queue: {{ path: {d}/cloudcore.db }}
  delivery: {{ ack-timeout: 1, max-ack-timeout: 2 }}
  link: {{ handshake-timeout: 5, read-deadline: 3, write-deadline: 3 }}
"
            ),
        )
        .expect("write config");
        let mut daemon = Daemon::start("cloudcore", &config, patience);
        let line = daemon.wait_for("cloudcore listening");
        let f = fields(&line);
        let addr = |k: &str| -> SocketAddr {
            f.get(k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} in {line}"))
        };
        Self {
            ws: addr("websocket"),
            quic: addr("quic"),
            https: addr("https"),
            api: addr("api"),
            daemon,
        }
    }

    /// The bound ports, in [`CloudCore::start`]'s order, to restart on the same ones.
    pub fn ports(&self) -> [u16; 4] {
        [
            self.ws.port(),
            self.quic.port(),
            self.https.port(),
            self.api.port(),
        ]
    }

    /// The address an edge speaking `protocol` (`quic` or `websocket`) dials.
    pub fn server(&self, protocol: &str) -> SocketAddr {
        if protocol == "quic" {
            self.quic
        } else {
            self.ws
        }
    }
}
