//! Shared helpers for Causeway's benchmark binaries (`src/bin/*.rs`): a private cloudcore
//! process to measure, its memory and CPU from `/proc`, its `/metrics`, and the KubeEdge
//! keepalive a test node sends.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::Message;
use transport::Protocol;

/// A cloudcore this benchmark started, with where it listens.
#[derive(Debug)]
pub struct SpawnedCloud {
    /// The process (SIGTERM it with [`SpawnedCloud::stop`], or SIGKILL it with
    /// [`SpawnedCloud::kill`]).
    pub child: Child,
    /// The edge listeners by protocol (`host:port`).
    pub addrs: HashMap<Protocol, String>,
    /// The cloud API (`host:port`).
    pub api: String,
    /// The PKI directory (its CA issues the test nodes' certificates).
    pub cert_dir: PathBuf,
    /// When it logged that it listens.
    pub listening_at: Instant,
}

impl SpawnedCloud {
    /// Starts `bin` with its PKI and store under `dir` (created on the first start and reused by
    /// a restart), room for `nodes` nodes, listening on loopback `ports` (websocket, quic, api;
    /// 0 = any free one). Returns once it logged where it listens; its stderr is drained.
    pub fn start(bin: &str, dir: &Path, nodes: usize, ports: [u16; 3]) -> Self {
        Self::start_with(bin, dir, nodes, ports, "normal")
    }

    /// [`SpawnedCloud::start`] with the message store's `durability` (`full`, the default of
    /// a real deployment, or `normal`, which the load benchmarks use).
    pub fn start_with(
        bin: &str,
        dir: &Path,
        nodes: usize,
        ports: [u16; 3],
        durability: &str,
    ) -> Self {
        let [ws, quic, api] = ports;
        let config = dir.join("cloudcore.yaml");
        let yaml = format!(
            "cloudhub:\n  websocket: {{ enable: true, address: 127.0.0.1, port: {ws} }}\n  \
             quic: {{ enable: true, address: 127.0.0.1, port: {quic} }}\n  \
             https: {{ enable: false, address: 127.0.0.1, port: 0 }}\n  \
             api: {{ enable: true, address: 127.0.0.1, port: {api} }}\n  \
             node-limit: {}\n  tls: {{ cert-dir: {} }}\n  \
             queue: {{ path: {}, durability: {durability}, limit-per-node: 1000000 }}\n",
            nodes + 16,
            dir.join("pki").display(),
            dir.join("cloudcore.db").display()
        );
        std::fs::write(&config, yaml).expect("write config");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn,cloudcore=info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let listening = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("cloudcore listening") => break line,
                Some(Ok(_)) => {}
                _ => panic!("cloudcore exited before listening"),
            }
        };
        let listening_at = Instant::now();
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |key: &str| -> String {
            let start = listening
                .find(&format!("{key}="))
                .map(|i| i + key.len() + 1)
                .expect("field in the listening line");
            listening[start..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned()
        };
        Self {
            addrs: [
                (Protocol::WebSocket, field("websocket")),
                (Protocol::Quic, field("quic")),
            ]
            .into_iter()
            .collect(),
            api: field("api"),
            cert_dir: dir.join("pki"),
            listening_at,
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The bound ports in [`SpawnedCloud::start`]'s order, to restart on the same ones.
    pub fn ports(&self) -> [u16; 3] {
        let port = |a: &str| {
            a.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        [
            port(&self.addrs[&Protocol::WebSocket]),
            port(&self.addrs[&Protocol::Quic]),
            port(&self.api),
        ]
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// SIGKILL and wait: the process dies without any cleanup.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time `pid` has used (user + system), from `/proc/<pid>/stat`, assuming the usual 100
/// clock ticks per second.
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no field {i} in /proc/{pid}/stat"))
    };
    // utime and stime are fields 14 and 15 of stat; here 0 is field 3 (state).
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// The cloud API's `/metrics` text.
pub fn metrics(api: &str) -> Result<String, String> {
    http_get(api, "/metrics")
}

/// A plain `GET` of `path` on `addr`; the whole response, head included.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("API {addr}: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: cloud\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// Polls the cloud's `/metrics` until `n` nodes are connected over `protocol`, for at most
/// `patience`.
pub async fn wait_connected(
    api: &str,
    protocol: Protocol,
    n: usize,
    patience: Duration,
) -> Result<(), String> {
    let needle = format!(
        "cloudhub_connected_nodes{{protocol=\"{}\"}} {n}\n",
        protocol.as_str()
    );
    let deadline = Instant::now() + patience;
    loop {
        let api = api.to_owned();
        let text = tokio::task::spawn_blocking(move || metrics(&api))
            .await
            .map_err(|e| e.to_string())??;
        if text.contains(&needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{n} {protocol} nodes never showed as connected"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// KubeEdge's keepalive, as an idle edge sends it every heartbeat.
pub fn keepalive() -> Message {
    Message::new("")
        .route("websocket", "resource", "node", "keepalive")
        .content(proto::Content::text("ping"))
}

/// An edgecore this benchmark started, with its local API's address.
#[derive(Debug)]
pub struct SpawnedEdge {
    /// The process (SIGTERM it with [`SpawnedEdge::stop`]).
    pub child: Child,
    /// The local API (`host:port`): `/v1/status`, `/v1/upstream`.
    pub local: String,
}

impl SpawnedEdge {
    /// Starts `bin` with `yaml` written to `<dir>/edgecore.yaml` (the local API must listen on
    /// `127.0.0.1:0`). Returns once it logged where its local API listens; its stderr is drained.
    pub fn start(bin: &str, dir: &Path, yaml: &str) -> Self {
        let config = dir.join("edgecore.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn,causeway_edgecore=info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let listening = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("local API listening") => break line,
                Some(Ok(_)) => {}
                _ => panic!("edgecore exited before its local API listened"),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let local = listening
            .split_whitespace()
            .find_map(|f| f.strip_prefix("addr="))
            .expect("addr= in the local API's line")
            .to_owned();
        Self { child, local }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.1 client on one kept-alive connection, so a benchmark measures the server
/// rather than TCP handshakes. It understands what the daemons' APIs answer: a `Content-Length`
/// body (never chunked for JSON answers).
#[derive(Debug)]
pub struct KeepAlive {
    addr: String,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects to `addr` (`host:port`).
    pub fn connect(addr: &str) -> Result<Self, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self {
            addr: addr.to_owned(),
            reader: BufReader::new(stream),
        })
    }

    /// One request; returns (status, body).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, String), String> {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut status = 0;
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some(code) = trimmed.strip_prefix("HTTP/1.1 ") {
                status = code.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            } else if let Some((name, value)) = trimmed.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().map_err(|_| "bad content-length")?;
            }
        }
        let mut body = vec![0; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| e.to_string())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
