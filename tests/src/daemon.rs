//! The real `cloudcore` and `edgecore` processes as the end-to-end tests (`e2e_cloud.rs`,
//! `e2e_edge.rs`) drive them: found next to the test executable, started with a config file,
//! watched through their stderr log lines, signalled, and talked to over plain HTTP/1.1.
//!
//! Helpers here panic with the daemon's log on failure: they exist to make a failing end-to-end
//! test say why, and every wait is bounded so a broken daemon fails the test instead of hanging it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
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
        Self::spawn(name, Command::new(binary(name)), config, patience)
    }

    /// [`Daemon::start`] through `command`, which runs the binary `name` (inside a network
    /// namespace, say: `ip netns exec <ns> <binary>`).
    pub fn spawn(
        name: &'static str,
        mut command: Command,
        config: &Path,
        patience: Duration,
    ) -> Self {
        let mut child = command
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

    /// The first log line containing `needle`, among the lines already read or those to come:
    /// for a fact a daemon logs once (where it listens), whichever order its tasks log in.
    pub fn logged(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        self.wait_for(needle)
    }

    /// Waits for a log line containing `needle` (after the lines already consumed). For a fact
    /// logged once, [`Daemon::logged`]; for a state, [`wait_until`] on an endpoint.
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

    /// Every log line read so far, including those waiting to be read, as one text.
    pub fn log_so_far(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// How many log lines so far (read or still queued) contain `needle`: for "logged once, not
    /// once per message" checks, after the state the line reports was observed.
    pub fn count_logged(&mut self, needle: &str) -> usize {
        self.seen.extend(self.lines.try_iter());
        self.seen.iter().filter(|l| l.contains(needle)).count()
    }

    /// The process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// SIGTERM, then the exit code; on a non-zero exit the daemon's log is printed, so a
    /// failing assertion on it says why.
    pub fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        let code = self.child.wait().expect("wait").code();
        if code != Some(0) {
            self.seen.extend(self.lines.try_iter());
            eprintln!(
                "{} exited with {code:?}; its log:\n{}",
                self.name,
                self.seen.join("\n")
            );
        }
        code
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

/// Polls `check` every 20 ms until it returns `Some`, for at most `patience`; panics with `what`
/// and the last observation otherwise. Tests wait on state this way, never on the order of log
/// lines from two tasks.
pub fn wait_until<T>(
    what: &str,
    patience: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not so after {patience:?}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
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
    let (status, _, body) = http_with(addr, method, path, &[], body);
    (status, body)
}

/// [`http`] with extra request headers; returns (status, response head, body).
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(HTTP_PATIENCE)).expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = Vec::new();
    // A refusal may close before reading everything we sent; what arrived still counts.
    let _ = s.read_to_end(&mut out);
    parse_response(&String::from_utf8_lossy(&out))
}

/// (status, head, de-chunked body) of an HTTP/1.1 response text.
pub fn parse_response(out: &str) -> (u16, String, String) {
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, head.to_owned(), body)
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

/// The `edgecore.yaml` of a test edge: what every end-to-end test writes, with what differs set
/// through the builder. Defaults: heartbeat 1 s, handshake timeout 5 s, read and write deadlines
/// 3 s, the certificate files (`ca.crt`, `node.crt`, `node.key`) and both stores (`outbox.db`,
/// `meta.db`) in one edge directory, metamanager and the local API on an ephemeral port, no
/// bootstrap (see [`EdgeConfig::bootstrap`]).
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    protocol: String,
    node: String,
    server: SocketAddr,
    edge_dir: PathBuf,
    data_dir: PathBuf,
    heartbeat: u64,
    deadline: u64,
    bootstrap: Option<(SocketAddr, Option<String>)>,
    outbox_options: String,
    metamanager_options: String,
    modules: String,
    handshake_timeout: u64,
    fallback: Option<(SocketAddr, String)>,
}

impl EdgeConfig {
    /// An edge `node` dialling `server` over `protocol`, its files in `edge_dir`.
    pub fn new(protocol: &str, node: &str, server: SocketAddr, edge_dir: &Path) -> Self {
        Self {
            protocol: protocol.to_owned(),
            node: node.to_owned(),
            server,
            edge_dir: edge_dir.to_owned(),
            data_dir: edge_dir.to_owned(),
            heartbeat: 1,
            deadline: 3,
            bootstrap: None,
            outbox_options: String::new(),
            metamanager_options: String::new(),
            modules: String::new(),
            handshake_timeout: 5,
            fallback: None,
        }
    }

    /// The handshake timeout, seconds (both protocols).
    #[must_use]
    pub fn handshake_timeout(mut self, secs: u64) -> Self {
        self.handshake_timeout = secs;
        self
    }

    /// Protocol fallback on (`controller.fallback`, more keys in YAML flow style such as
    /// `attempts: 2, probe-interval: 2`), the other protocol's cloud at `other_server`.
    #[must_use]
    pub fn fallback(mut self, other_server: SocketAddr, keys: &str) -> Self {
        self.fallback = Some((other_server, keys.to_owned()));
        self
    }

    /// The usual edge of `cloud` (started in `dir`): its files in `<dir>/edge`, bootstrapped
    /// from the cloud's HTTPS address with a fresh token.
    pub fn for_cloud(dir: &Path, protocol: &str, node: &str, cloud: &CloudCore) -> Self {
        let token = bootstrap_token(dir);
        Self::new(protocol, node, cloud.server(protocol), &dir.join("edge"))
            .bootstrap(cloud.https, Some(&token))
    }

    /// Bootstrap: the certificate server `https` and, if given, a token to obtain one with.
    #[must_use]
    pub fn bootstrap(mut self, https: SocketAddr, token: Option<&str>) -> Self {
        self.bootstrap = Some((https, token.map(str::to_owned)));
        self
    }

    /// The keepalive interval, seconds.
    #[must_use]
    pub fn heartbeat(mut self, secs: u64) -> Self {
        self.heartbeat = secs;
        self
    }

    /// The read and write deadlines, seconds.
    #[must_use]
    pub fn deadlines(mut self, secs: u64) -> Self {
        self.deadline = secs;
        self
    }

    /// Where the outbox and metamanager's store live (the certificates stay in the edge
    /// directory).
    #[must_use]
    pub fn stores_in(mut self, dir: &Path) -> Self {
        dir.clone_into(&mut self.data_dir);
        self
    }

    /// More `edgehub.outbox` keys, YAML flow style: `dedup-pending-ttl: 2`.
    #[must_use]
    pub fn outbox(mut self, keys: &str) -> Self {
        self.outbox_options = format!(", {keys}");
        self
    }

    /// More `modules.metamanager` keys, YAML flow style: `remote-query-timeout: 20`.
    #[must_use]
    pub fn metamanager(mut self, keys: &str) -> Self {
        self.metamanager_options = format!(", {keys}");
        self
    }

    /// More modules: YAML lines under `modules:`, indented by two spaces.
    #[must_use]
    pub fn modules(mut self, yaml: &str) -> Self {
        yaml.clone_into(&mut self.modules);
        self
    }

    /// The file's text.
    pub fn yaml(&self) -> String {
        let (protocol, node, server) = (&self.protocol, &self.node, self.server);
        let (heartbeat, deadline) = (self.heartbeat, self.deadline);
        let e = self.edge_dir.display();
        let data = self.data_dir.display();
        let bootstrap = match &self.bootstrap {
            None => String::new(),
            Some((https, None)) => format!("  http-server: 'https://{https}'\n"),
            Some((https, Some(token))) => {
                format!("  http-server: 'https://{https}'\n  token: '{token}'\n")
            }
        };
        let (outbox, metamanager) = (&self.outbox_options, &self.metamanager_options);
        let handshake = self.handshake_timeout;
        let endpoint = |protocol: &str, server: SocketAddr| {
            format!(
                "  {protocol}: {{ server: '{server}', handshake-timeout: {handshake}, \
                 read-deadline: {deadline}, write-deadline: {deadline} }}\n"
            )
        };
        let (fallback, other) = match &self.fallback {
            None => (String::new(), String::new()),
            Some((other_server, keys)) => {
                let other = if protocol == "quic" {
                    "websocket"
                } else {
                    "quic"
                };
                (
                    format!(", fallback: {{ enable: true, {keys} }}"),
                    endpoint(other, *other_server),
                )
            }
        };
        let endpoint = endpoint(protocol, server);
        format!(
            "edgehub:
  controller: {{ protocol: {protocol}, heartbeat: {heartbeat}, node-id: {node}{fallback} }}
{endpoint}{other}  tls: {{ ca-file: {e}/ca.crt, cert-file: {e}/node.crt, key-file: {e}/node.key }}
{bootstrap}  outbox: {{ path: {data}/outbox.db{outbox} }}
modules:
  metamanager: {{ path: {data}/meta.db{metamanager} }}
  local-api: {{ listen: '127.0.0.1:0' }}
{}",
            self.modules
        )
    }

    /// Writes the file to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.yaml()).expect("write the edge config");
        path.to_owned()
    }

    /// Writes the file as `<dir>/edgecore.yaml`; returns its path.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        self.write(&dir.join("edgecore.yaml"))
    }
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

/// Where a daemon runs: the address it binds and the command that runs its binary (the
/// binary itself on loopback; `ip netns exec <ns> <binary>` in a link lab's namespace).
pub struct Placement<'a> {
    /// The address the edges' listeners bind (WebSocket, QUIC, certificate bootstrap).
    pub host: IpAddr,
    /// The command for a binary's path.
    pub command: &'a dyn Fn(&Path) -> Command,
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
        Self::start_with(dir, ports, keepalive_interval, "", patience)
    }

    /// [`CloudCore::start`] with `extra` lines appended to the `cloudhub:` section (indented by
    /// two spaces, such as `"  node-limit: 3\n"`).
    pub fn start_with(
        dir: &Path,
        ports: [u16; 4],
        keepalive_interval: u64,
        extra: &str,
        patience: Duration,
    ) -> Self {
        let loopback = Placement {
            host: IpAddr::from([127, 0, 0, 1]),
            command: &|binary: &Path| Command::new(binary),
        };
        Self::start_placed(dir, ports, keepalive_interval, extra, patience, &loopback)
    }

    /// [`CloudCore::start_with`] with the edges' listeners on `placement.host` (the address in
    /// its server certificate too), run through `placement.command`. The cloud API stays on
    /// loopback (plain HTTP, as the tests speak it), reached from where cloudcore runs.
    pub fn start_placed(
        dir: &Path,
        ports: [u16; 4],
        keepalive_interval: u64,
        extra: &str,
        patience: Duration,
        placement: &Placement<'_>,
    ) -> Self {
        let d = dir.display();
        let h = placement.host;
        let [ws, quic, https, api] = ports;
        let config = dir.join("cloudcore.yaml");
        std::fs::write(
            &config,
            format!(
                "cloudhub:
  websocket: {{ enable: true, address: {h}, port: {ws} }}
  quic: {{ enable: true, address: {h}, port: {quic} }}
  https: {{ enable: true, address: {h}, port: {https} }}
  api: {{ enable: true, address: 127.0.0.1, port: {api} }}
  keepalive-interval: {keepalive_interval}
  tls: {{ cert-dir: {d}/pki }}
  advertise-address: [{h}]
  queue: {{ path: {d}/cloudcore.db }}
  delivery: {{ ack-timeout: 1, max-ack-timeout: 2 }}
  link: {{ handshake-timeout: 5, read-deadline: 3, write-deadline: 3 }}
{extra}"
            ),
        )
        .expect("write config");
        let command = (placement.command)(&binary("cloudcore"));
        let mut daemon = Daemon::spawn("cloudcore", command, &config, patience);
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

/// A running `edgecore` with its local API's address (the edge applications' endpoint).
pub struct EdgeCore {
    /// The process.
    pub daemon: Daemon,
    /// The local API's HTTP endpoint.
    pub local: SocketAddr,
    patience: Duration,
}

impl EdgeCore {
    /// Starts edgecore with `config` and waits until its local API serves (the address comes
    /// from its log, whatever else was logged first). It may not be connected yet: see
    /// [`EdgeCore::wait_connected`].
    pub fn start(config: &Path, patience: Duration) -> Self {
        Self::spawn(Command::new(binary("edgecore")), config, patience)
    }

    /// [`EdgeCore::start`] through `command`, which runs the edgecore binary (see
    /// [`Daemon::spawn`]). The local API is then reached from where edgecore runs.
    pub fn spawn(command: Command, config: &Path, patience: Duration) -> Self {
        let mut daemon = Daemon::spawn("edgecore", command, config, patience);
        let line = daemon.logged("local API listening");
        let local = fields(&line)["addr"]
            .parse()
            .unwrap_or_else(|_| panic!("local API address in {line}"));
        Self {
            daemon,
            local,
            patience,
        }
    }

    /// The local API's `/v1/status`.
    pub fn status(&self) -> Value {
        let (code, body) = http(self.local, "GET", "/v1/status", "");
        assert_eq!(code, 200, "{body}");
        json_of(&body)
    }

    /// Waits until the edge reports its link to the cloud `connected` (or not).
    pub fn wait_cloud(&self, connected: bool) {
        let what = if connected {
            "edge connected to the cloud"
        } else {
            "edge disconnected from the cloud"
        };
        wait_until(what, self.patience, || {
            let status = self.status();
            if (status["cloud"] == "connected") == connected {
                Ok(())
            } else {
                Err(status.to_string())
            }
        });
    }

    /// [`EdgeCore::wait_cloud`] for `connected`.
    pub fn wait_connected(&self) {
        self.wait_cloud(true);
    }

    /// Sends an upstream message through the local API (group `user`); once this returns
    /// the edge has it durably. Returns its id.
    pub fn send(&self, n: usize) -> String {
        self.send_content(&serde_json::json!({ "n": n }))
    }

    /// [`EdgeCore::send`] with the given content.
    pub fn send_content(&self, content: &Value) -> String {
        let body = serde_json::json!({"group": "user", "resource": "sensors/t1",
                                      "operation": "upload", "content": content});
        let (code, body) = http(self.local, "POST", "/v1/upstream", &body.to_string());
        assert_eq!(code, 202, "{body}");
        json_of(&body)["id"].as_str().expect("id").to_owned()
    }

    /// The cloud message `id` as the edge's metamanager journaled it (KubeEdge JSON).
    pub fn stored(&self, id: &str) -> Option<Value> {
        let (code, body) = http(self.local, "GET", "/v1/messages?after=0&limit=1000", "");
        assert_eq!(code, 200, "{body}");
        json_of(&body)["messages"]
            .as_array()?
            .iter()
            .map(|m| m["message"].clone())
            .find(|m| m["header"]["msg_id"] == id)
    }

    /// Every cloud message the edge's metamanager journaled, in the order it stored them (the
    /// local API's `/v1/messages`, read page by page).
    pub fn journal(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (code, body) = http(
                self.local,
                "GET",
                &format!("/v1/messages?after={after}&limit=1000"),
                "",
            );
            assert_eq!(code, 200, "{body}");
            let page = json_of(&body);
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return out;
            }
            out.extend(messages.into_iter().map(|m| m["message"].clone()));
            after = page["next"].as_u64().expect("next cursor");
        }
    }

    /// How often each cloud message id is journaled by the edge's metamanager.
    pub fn received(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for m in self.journal() {
            if let Some(id) = m["header"]["msg_id"].as_str() {
                *counts.entry(id.to_owned()).or_default() += 1;
            }
        }
        counts
    }
}

/// Rows in the edge's outbox file (`outbox.db`), read from the file itself while edgecore may
/// run: what is still waiting to leave the edge.
pub fn outbox_rows(path: &Path) -> u64 {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .unwrap_or_else(|e| panic!("counting {}: {e}", path.display()))
}

/// A Server-Sent Events connection to the cloud's upstream stream.
pub struct Sse {
    stream: TcpStream,
    text: String,
    patience: Duration,
}

impl Sse {
    /// Opens `GET /v1/messages?<query>` and waits for the response head (the subscription is
    /// live once the head arrived).
    pub fn open(api: SocketAddr, patience: Duration, query: &str) -> Self {
        let mut stream = TcpStream::connect(api).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        write!(
            stream,
            "GET /v1/messages?{query} HTTP/1.1\r\nHost: {api}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("write");
        let mut sse = Self {
            stream,
            text: String::new(),
            patience,
        };
        let deadline = Instant::now() + patience;
        while !sse.text.contains("\r\n\r\n") {
            sse.read_some();
            assert!(Instant::now() < deadline, "no SSE response head");
        }
        assert!(sse.text.starts_with("HTTP/1.1 200"), "{}", sse.text);
        sse
    }

    fn read_some(&mut self) {
        let mut buf = [0u8; 16384];
        match self.stream.read(&mut buf) {
            Ok(0) => panic!("SSE stream closed:\n{}", self.text),
            Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the event stream: {e}"),
        }
    }

    /// Reads what arrives within `time` (for waits that publish and look again).
    pub fn read_for(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        while Instant::now() < deadline {
            self.read_some();
        }
    }

    /// Reads until the message `id` appeared; its event's `message` (KubeEdge JSON), as cloud
    /// applications see it.
    pub fn message(&mut self, id: &str) -> Value {
        let needle = format!("\"msg_id\":\"{id}\"");
        let deadline = Instant::now() + self.patience;
        loop {
            if let Some(line) = self
                .text
                .lines()
                .find(|l| l.starts_with("data:") && l.contains(&needle))
            {
                let event: Value = serde_json::from_str(line["data:".len()..].trim())
                    .unwrap_or_else(|e| panic!("event is not JSON ({e}): {line}"));
                return event["message"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{id} never reached the event stream"
            );
            self.read_some();
        }
    }

    /// Reads until a message for which `wanted` holds appeared; that message (KubeEdge JSON).
    pub fn message_where(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + self.patience;
        loop {
            let found = self
                .text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
                .map(|event| event["message"].clone())
                .find(|m| wanted(m));
            if let Some(message) = found {
                return message;
            }
            assert!(
                Instant::now() < deadline,
                "no such message reached the event stream"
            );
            self.read_some();
        }
    }

    /// The messages (KubeEdge JSON) read so far, in stream order.
    pub fn messages(&self) -> Vec<Value> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .map(|event| event["message"].clone())
            .collect()
    }

    /// Reads until every id in `ids` appeared; returns how often each id appeared.
    pub fn until_all(&mut self, ids: &[String]) -> HashMap<String, usize> {
        let deadline = Instant::now() + self.patience;
        loop {
            let counts = count_ids(&self.text, ids);
            if ids.iter().all(|id| counts.contains_key(id)) {
                return counts;
            }
            assert!(
                Instant::now() < deadline,
                "upstream messages never reached the cloud; missing {:?}",
                ids.iter()
                    .filter(|id| !counts.contains_key(*id))
                    .collect::<Vec<_>>()
            );
            self.read_some();
        }
    }
}
