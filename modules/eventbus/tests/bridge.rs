//! eventbus on a real beehive against real brokers: mosquitto (started here on a free loopback
//! port with a temporary config, killed at the end; skipped with a message where it is not
//! installed) and the embedded broker; the topic store is a real SQLite file. Stand-in modules
//! for EdgeHub (`websocket`) and devicetwin (group `twin`) collect what eventbus sends them.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use beehive::{Beehive, Hive, SimpleModule};
use causeway_eventbus::config::{BrokerMode, EventBusConfig};
use causeway_eventbus::{BrokerState, EventBus, StatusHandle};
use proto::{Content, Message};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mosquitto process on `port`, killed on drop.
struct Mosquitto(Child);

impl Mosquitto {
    /// Starts mosquitto on `port`, or None (with the reason printed) when it is not installed.
    fn start(dir: &Path, port: u16) -> Option<Self> {
        if Command::new("mosquitto").arg("-h").output().is_err() {
            println!("SKIP: mosquitto is not installed (apt-get install mosquitto; CI has it)");
            return None;
        }
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < DEADLINE, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self(child))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A hive with eventbus and the two stand-ins; returns what reaches EdgeHub and devicetwin.
struct Rig {
    hive: Hive,
    status: StatusHandle,
    to_hub: mpsc::UnboundedReceiver<Message>,
    to_twin: mpsc::UnboundedReceiver<Message>,
}

fn collector(
    name: &'static str,
    group: &'static str,
) -> (impl beehive::Module, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let m = SimpleModule::new(name, group, move |mut ctx| {
        let tx = tx.clone();
        async move {
            while let Some(m) = ctx.recv().await {
                let _ = tx.send(m);
            }
            Ok(())
        }
    });
    (m, rx)
}

fn rig(config: EventBusConfig) -> Rig {
    let (hub, to_hub) = collector("websocket", "hub");
    let (twin, to_twin) = collector("twin", "twin");
    let eb = EventBus::open(config, "node-a", None).unwrap();
    let status = eb.status();
    let mut b = Beehive::new();
    b.register(hub, true).unwrap();
    b.register(twin, true).unwrap();
    b.register(eb, true).unwrap();
    Rig {
        hive: b.start(),
        status,
        to_hub,
        to_twin,
    }
}

fn config(dir: &Path, mode: BrokerMode, port: u16) -> EventBusConfig {
    let mut c = EventBusConfig {
        enable: true,
        mode,
        path: dir.join("eventbus.db"),
        ..EventBusConfig::default()
    };
    c.external.server = format!("127.0.0.1:{port}");
    c.external.client_id = format!("eventbus-test-{port}");
    c.internal.listen = SocketAddr::from(([127, 0, 0, 1], port));
    c
}

async fn connected(status: &StatusHandle) {
    let started = Instant::now();
    while status.state() != BrokerState::Connected {
        assert!(
            started.elapsed() < DEADLINE,
            "not connected: {:?}",
            status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A device: a rumqttc client whose event loop runs in a task; received publications come out
/// of the channel.
async fn device(
    port: u16,
    id: &str,
    subscribe: Option<&str>,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (up_tx, mut up_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = up_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let t = p.topic.clone();
                    let _ = tx.send((t, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    if let Some(t) = subscribe {
        client.subscribe(t, QoS::AtLeastOnce).await.unwrap();
        tokio::time::timeout(DEADLINE, up_rx.recv())
            .await
            .expect("suback");
    }
    (client, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Message>, what: &str) -> Message {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within the deadline"))
        .unwrap()
}

fn cloud(op: &str, resource: &str, content: Content) -> Message {
    Message::new("")
        .route("router_eventbus", "user", resource, op)
        .content(content)
}

/// Both directions, the cloud's subscribe stored and honoured, across a module restart.
async fn bridges_both_ways(mode: BrokerMode, port: u16, dir: &Path) {
    let mut r = rig(config(dir, mode, port));
    connected(&r.status).await;
    let (dev, mut dev_rx) = device(port, "dev-1", Some("default/cmd")).await;
    // Device topic → devicetwin, base64url with padding.
    let topic = "$hw/events/device/default/t1/twin/update";
    dev.publish(topic, QoS::AtLeastOnce, false, r#"{"event_id":"e1"}"#)
        .await
        .unwrap();
    let m = next(&mut r.to_twin, "twin message").await;
    assert_eq!(m.route.operation, "response");
    assert_eq!(
        base64::engine::general_purpose::URL_SAFE
            .decode(&m.route.resource)
            .unwrap(),
        topic.as_bytes()
    );
    assert_eq!(m.content, Content::text(r#"{"event_id":"e1"}"#));
    // User topic → the cloud as an upload.
    dev.publish("default/user/temp", QoS::AtLeastOnce, false, "21")
        .await
        .unwrap();
    let m = next(&mut r.to_hub, "upload").await;
    assert_eq!(
        (
            m.route.source.as_str(),
            m.route.group.as_str(),
            m.route.operation.as_str()
        ),
        ("bus", "user", "upload")
    );
    assert_eq!(m.route.resource, "default/user/temp");
    assert_eq!(m.content, Content::text("21"));
    // The cloud publishes to the device.
    let bus = r.hive.bus().clone();
    bus.send(
        "eventbus",
        cloud("publish", "node/node-a/default/cmd", Content::text("on")),
    )
    .await
    .unwrap();
    let (t, p) = tokio::time::timeout(DEADLINE, dev_rx.recv())
        .await
        .expect("the device got the cloud's publish")
        .unwrap();
    assert_eq!((t.as_str(), p.as_slice()), ("default/cmd", &b"on"[..]));
    // The cloud subscribes a custom topic: stored, and honoured.
    bus.send(
        "eventbus",
        cloud("subscribe", "default/custom", Content::default()),
    )
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        dev.publish("default/custom", QoS::AtLeastOnce, false, "c1")
            .await
            .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), r.to_hub.recv()).await
        {
            assert_eq!(m.route.resource, "default/custom");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "custom topic never bridged");
    }
    while tokio::time::timeout(Duration::from_millis(300), r.to_hub.recv())
        .await
        .is_ok()
    {}
    // A bad cloud request is refused without stopping the module.
    bus.send("eventbus", cloud("frobnicate", "x", Content::default()))
        .await
        .unwrap();
    let started = Instant::now();
    while r.status.snapshot().publish_dropped == 0 {
        assert!(started.elapsed() < DEADLINE, "bad request not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = r.hive.shutdown().await;
    assert!(report.is_clean(), "{report:?}");
    // Restarted: the stored topic is subscribed again.
    let store = causeway_eventbus::store::TopicStore::open(&dir.join("eventbus.db")).unwrap();
    assert_eq!(store.all().unwrap(), ["default/custom"]);
    drop(store);
    {
        let mut r = rig(config(dir, mode, port));
        connected(&r.status).await;
        let started = Instant::now();
        loop {
            dev.publish("default/custom", QoS::AtLeastOnce, false, "c2")
                .await
                .unwrap();
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(300), r.to_hub.recv()).await
            {
                if m.content == Content::text("c2") {
                    break;
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "stored topic not subscribed after restart"
            );
        }
        // Unsubscribe: forgotten.
        r.hive
            .bus()
            .send(
                "eventbus",
                cloud("unsubscribe", "default/custom", Content::default()),
            )
            .await
            .unwrap();
        let started = Instant::now();
        loop {
            let s = causeway_eventbus::store::TopicStore::open(&dir.join("eventbus.db")).unwrap();
            if s.all().unwrap().is_empty() {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "unsubscribe not stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(r.hive.shutdown().await.is_clean());
    }
}

#[tokio::test]
async fn external_broker_bridges_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(_broker) = Mosquitto::start(dir.path(), port) else {
        return;
    };
    bridges_both_ways(BrokerMode::External, port, dir.path()).await;
}

#[tokio::test]
async fn embedded_broker_bridges_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    bridges_both_ways(BrokerMode::Internal, free_port(), dir.path()).await;
}

/// The broker down at start: eventbus starts anyway, shows `connecting`, drops publishes at once,
/// and connects when the broker comes up.
#[tokio::test]
async fn broker_down_at_start_then_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    if Command::new("mosquitto").arg("-h").output().is_err() {
        println!("SKIP: mosquitto is not installed (apt-get install mosquitto; CI has it)");
        return;
    }
    let mut r = rig(config(dir.path(), BrokerMode::External, port));
    let started = Instant::now();
    while r.status.snapshot().last_error.is_none() {
        assert!(started.elapsed() < DEADLINE, "no connect failure recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.status.state(), BrokerState::Connecting);
    // A publish while the broker is down is dropped at once, not queued for ever.
    let t = Instant::now();
    r.hive
        .bus()
        .send(
            "eventbus",
            cloud("publish", "default/cmd", Content::text("x")),
        )
        .await
        .unwrap();
    let started = Instant::now();
    while r.status.snapshot().publish_dropped == 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "publish neither sent nor dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    let _broker = Mosquitto::start(dir.path(), port).unwrap();
    connected(&r.status).await;
    let (dev, _) = device(port, "dev-late", None).await;
    dev.publish("default/user/late", QoS::AtLeastOnce, false, "up")
        .await
        .unwrap();
    let m = next(&mut r.to_hub, "upload after the broker came up").await;
    assert_eq!(m.route.resource, "default/user/late");
    assert!(r.status.snapshot().connects >= 1);
    assert!(r.hive.shutdown().await.is_clean());
}
