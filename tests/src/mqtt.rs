//! MQTT for the device-path tests: a real mosquitto the test starts on a free loopback port with
//! a temporary config (killed on drop), devices as real rumqttc clients, and the `mosquitto_*`
//! command-line tools where installed. CI installs mosquitto (`.ci/run`); elsewhere the tests
//! that need it skip with a printed reason.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::daemon::{EdgeCore, wait_until};

/// Bound on every wait here.
const PATIENCE: Duration = Duration::from_secs(60);

/// A free loopback TCP port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Whether `tool` runs here.
pub fn installed(tool: &str) -> bool {
    Command::new(tool).arg("--help").output().is_ok()
}

/// Whether mosquitto runs here; prints why a test skips when it does not.
pub fn mosquitto_or_skip() -> bool {
    if installed("mosquitto") {
        return true;
    }
    println!("SKIP: mosquitto is not installed (apt-get install mosquitto; CI has it)");
    false
}

/// Which broker eventbus uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// The embedded broker inside edgecore (`mode: internal`).
    Internal,
    /// A mosquitto the test starts (`mode: external`).
    External,
}

/// The `modules.eventbus` lines of an edge config ([`crate::daemon::EdgeConfig::modules`]): the
/// embedded broker listening on `port`, or a client of the external broker there (with
/// `external_keys`, YAML flow style after a comma: `username: u, password: p`); its topic store
/// in `edge_dir`.
pub fn eventbus_module(edge_dir: &Path, mode: Mode, port: u16, external_keys: &str) -> String {
    let mode_keys = match mode {
        Mode::Internal => format!("mode: internal\n    internal: {{ listen: '127.0.0.1:{port}' }}"),
        Mode::External => format!(
            "mode: external\n    external: {{ server: '127.0.0.1:{port}', \
             client-id: eventbus-e2e-{port}{external_keys} }}"
        ),
    };
    format!(
        "  eventbus:\n    enable: true\n    {mode_keys}\n    path: {}/eventbus.db\n",
        edge_dir.display()
    )
}

/// Waits until the edge's `/v1/status` says eventbus is connected to its broker.
pub fn wait_broker(edge: &EdgeCore) {
    wait_until("eventbus connected to its broker", PATIENCE, || {
        let s = edge.status();
        if s["eventbus"]["broker"] == "connected" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
}

/// mosquitto on a loopback port with a temporary config; killed on drop.
pub struct Mosquitto {
    child: Child,
    /// The config file it runs with.
    pub conf: PathBuf,
}

impl Mosquitto {
    /// Anonymous, no persistence, plain TCP on `port`.
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(
            dir,
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
    }

    /// mosquitto with `listeners` (its config lines: `listener`, TLS files, `password_file`,
    /// ...), no persistence, a deep queue; returns once `port` accepts connections.
    pub fn start_with(dir: &Path, port: u16, listeners: &str) -> Self {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("{listeners}persistence false\nmax_queued_messages 10000\n"),
        )
        .expect("conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        wait_until("mosquitto listening", PATIENCE, || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| e.to_string())
        });
        Self { child, conf }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device: a rumqttc client on its own runtime (it reconnects by itself and sends again what
/// was not acknowledged); what it receives, and how many of its publishes were acknowledged.
pub struct Device {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    got: std::sync::mpsc::Receiver<(String, String)>,
    acks: Arc<AtomicUsize>,
    subacks: Arc<AtomicUsize>,
}

impl Device {
    /// Connects client `id` to the broker on loopback `port`, anonymously.
    pub fn connect(port: u16, id: &str) -> Self {
        Self::connect_as(port, id, None)
    }

    /// [`Device::connect`] with a user name and password.
    pub fn connect_as(port: u16, id: &str, credentials: Option<(&str, &str)>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = credentials {
            o.set_credentials(user, password);
        }
        let (client, mut el) = AsyncClient::new(o, 512);
        let (tx, got) = std::sync::mpsc::channel();
        let acks = Arc::new(AtomicUsize::new(0));
        let subacks = Arc::new(AtomicUsize::new(0));
        let (a, s) = (acks.clone(), subacks.clone());
        rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body = String::from_utf8_lossy(&p.payload).into_owned();
                        let _ = tx.send((p.topic.clone(), body));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self {
            rt,
            client,
            got,
            acks,
            subacks,
        }
    }

    /// Subscribes `filter` at QoS 1 and waits for the SUBACK.
    pub fn subscribe(&self, filter: &str) {
        let before = self.subacks.load(Ordering::SeqCst);
        self.rt
            .block_on(self.client.subscribe(filter, QoS::AtLeastOnce))
            .expect("subscribe");
        wait_until("SUBACK", PATIENCE, || {
            if self.subacks.load(Ordering::SeqCst) > before {
                Ok(())
            } else {
                Err("none".into())
            }
        });
    }

    /// Publishes at QoS 1 (queued in the client; see [`Device::acked`]).
    pub fn publish(&self, topic: &str, payload: &str) {
        self.rt
            .block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload))
            .expect("publish");
    }

    /// PUBACKs received so far.
    pub fn acked(&self) -> usize {
        self.acks.load(Ordering::SeqCst)
    }

    /// The next publication received (topic, payload); panics after a minute.
    pub fn recv(&self) -> (String, String) {
        self.got.recv_timeout(PATIENCE).expect("a publication")
    }

    /// The next publication received within `time`, if any.
    pub fn recv_for(&self, time: Duration) -> Option<(String, String)> {
        self.got.recv_timeout(time).ok()
    }

    /// The next publication on `topic` whose payload satisfies `wanted` (others are skipped);
    /// panics after a minute.
    pub fn recv_where(&self, topic: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.got.recv_timeout(left) {
                Ok((t, body)) if t == topic && wanted(&body) => return body,
                Ok(_) => {}
                Err(_) => panic!("nothing wanted on {topic} within {PATIENCE:?}"),
            }
        }
    }
}
