//! eventbus: the edge module that bridges MQTT and the beehive bus (KubeEdge's eventbus,
//! MODULES.md §3), with an embedded broker (mode `internal`, the default) or an external one
//! such as mosquitto (mode `external`).
//!
//! - Publications on device and node topics (`$hw/events/device/…`, `$hw/events/node/…`) go to
//!   group `twin` (op `response`, resource the padded base64url of the topic); everything else
//!   subscribed goes to the cloud through EdgeHub's durable outbox (op `upload`, resource the
//!   topic). A QoS 1 upload is acknowledged to the broker only once the outbox committed it
//!   ([`edgehub::StatsHandle::receipt`]); until then the broker keeps it, and redelivers it after
//!   a reconnect if the outbox did not take it.
//! - The cloud's `router_eventbus` messages (`publish`, `subscribe`, `unsubscribe`, `message`,
//!   `get_result`) and devicetwin's `publish` messages are carried out; subscribed topics are
//!   kept in SQLite (`sub_topics`) and subscribed again at every connect.
//! - The broker may be down: eventbus reconnects with backoff and jitter while edgecore keeps
//!   running (it never waits for the broker at start, M17), logs each state change once, shows
//!   the state and counters through [`StatusHandle`], and drops publishes at once while
//!   disconnected or after `publish-timeout` (never blocking devicetwin).
//!
//! The embedded broker ([`broker`]) holds a device's PUBACK until the commit too.
//!
//! Layout: [`config`], [`topics`] (dispatch without I/O), [`store`] (`sub_topics`),
//! [`broker`] (the embedded broker), [`status`], and the [`EventBus`] module here.

pub mod broker;
pub mod config;
pub mod status;
pub mod store;
pub mod topics;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::RngExt as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use edgehub::{Receipt, StatsHandle};
use proto::Message;
use session::edge::route::{GROUP_BUS, GROUP_TWIN, MODULE_EDGEHUB, MODULE_EVENTBUS};

pub use config::{BrokerMode, EventBusConfig};
pub use status::{BrokerState, EventBusStatus, StatusHandle};

use status::Counter;
use store::TopicStore;
use topics::{Command, CommandError, Destination};

/// First reconnect delay; doubles per failure up to [`BACKOFF_MAX`], each with ±25 % jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Requests the MQTT client queues before a publish waits (then times out); also the embedded
/// broker's queue of publications for eventbus.
const CLIENT_QUEUE: usize = 256;
/// Largest MQTT packet the client takes or sends (a 16 MiB payload and its topic).
const MAX_PACKET: usize = 16 * 1024 * 1024 + 65_536;

/// Why eventbus cannot start: a configuration or disk problem named in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The topic store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// `modules.eventbus.external.server` is not `host:port`.
    #[error("modules.eventbus.external.server: {0}")]
    Server(String),
    /// The TLS CA file could not be read.
    #[error("modules.eventbus.external.tls.ca-file {path}: {why}")]
    Tls {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

/// The eventbus module: `eventbus` in group `bus`.
pub struct EventBus {
    config: EventBusConfig,
    /// The client's options (mode `external`).
    options: Option<MqttOptions>,
    store: Mutex<Option<TopicStore>>,
    receipts: Option<StatsHandle>,
    status: StatusHandle,
    node_id: String,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("config", &self.config)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// The module for `config` on node `node_id`; `receipts` is EdgeHub's handle, through which
    /// uploads are acknowledged only once stored (without it, once handed to EdgeHub). Opens the
    /// topic store and checks the broker settings now, so a bad path or file fails the start.
    pub fn open(
        config: EventBusConfig,
        node_id: &str,
        receipts: Option<StatsHandle>,
    ) -> Result<Self, OpenError> {
        let store = TopicStore::open(&config.path)?;
        let options = match config.mode {
            BrokerMode::External => Some(mqtt_options(&config, node_id)?),
            BrokerMode::Internal => None,
        };
        Ok(Self {
            config,
            options,
            store: Mutex::new(Some(store)),
            receipts,
            status: StatusHandle::default(),
            node_id: node_id.to_owned(),
        })
    }

    /// The state and counters, readable after the module was handed to the hive.
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }
}

/// The client options: a fixed client id and a persistent session (the broker keeps what was
/// not acknowledged), manual acknowledgements, credentials and TLS as configured.
fn mqtt_options(config: &EventBusConfig, node_id: &str) -> Result<MqttOptions, OpenError> {
    let ext = &config.external;
    let client_id = if ext.client_id.is_empty() {
        format!("causeway-eventbus-{node_id}")
    } else {
        ext.client_id.clone()
    };
    let (host, port) = ext.host_port().map_err(OpenError::Server)?;
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(ext.keepalive.max(5)))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if !ext.username.is_empty() {
        options.set_credentials(ext.username.clone(), ext.password.clone());
    }
    if ext.tls.enable {
        options.set_transport(Transport::tls_with_config(tls_config(&ext.tls.ca_file)?));
    }
    Ok(options)
}

/// rustls with ring, trusting the CA file's certificates only.
fn tls_config(ca_file: &std::path::Path) -> Result<rumqttc::TlsConfiguration, OpenError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let err = |why: String| OpenError::Tls {
        path: ca_file.display().to_string(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| err(e.to_string()))? {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

impl Module for EventBus {
    fn name(&self) -> &str {
        MODULE_EVENTBUS
    }

    fn group(&self) -> &str {
        GROUP_BUS
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            let store = self
                .store
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .ok_or_else(|| ModuleError::msg("eventbus started twice"))?;
            run(&self, Mutex::new(store), ctx).await;
            Ok(())
        })
    }
}

/// What the connection driver reports.
enum Link {
    /// Connected (CONNACK).
    Up,
    /// A publication from the broker.
    Publication(Publish),
    /// The connection failed or was lost; the driver retries after the delay.
    Down(String, Duration),
}

/// Polls the client's event loop for ever (its own task, so the module can await the client),
/// reconnecting after failures with backoff and jitter.
async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Link>) {
    let mut delay = BACKOFF_MIN;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = BACKOFF_MIN;
                if tx.send(Link::Up).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(Link::Publication(p)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let jitter = rand::rng().random_range(0.75..1.25);
                let wait = delay.mul_f64(jitter);
                if tx.send(Link::Down(e.to_string(), wait)).is_err() {
                    return;
                }
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The broker eventbus talks to.
enum Side {
    /// An external broker, through the MQTT client.
    External(AsyncClient),
    /// The embedded broker, directly.
    Embedded(broker::Broker),
    /// The embedded broker could not start.
    None,
}

/// How a publication is acknowledged once handled.
enum Acker {
    /// PUBACK to the external broker (manual acks).
    External(Publish),
    /// The embedded broker's connection waits for the verdict before its PUBACK.
    Embedded(oneshot::Sender<bool>),
}

impl Side {
    /// Acknowledges (`taken`) or refuses a publication; a refusal makes the broker deliver it
    /// again (external: a reconnect, once per connection; embedded: the device's connection is
    /// closed without a PUBACK).
    async fn settle(&self, acker: Acker, taken: bool, redelivery_asked: &mut bool) {
        match (self, acker) {
            (Self::External(client), Acker::External(p)) => {
                if taken {
                    if let Err(e) = client.ack(&p).await {
                        tracing::debug!(error = %e, "ack not queued (client stopping)");
                    }
                } else if !*redelivery_asked {
                    // The broker redelivers unacknowledged messages on a new connection only.
                    *redelivery_asked = true;
                    let _ = client.try_disconnect();
                }
            }
            (_, Acker::Embedded(tx)) => {
                let _ = tx.send(taken);
            }
            _ => {}
        }
    }

    fn subscribe(&self, topic: &str) {
        match self {
            Self::External(c) => {
                let _ = c.try_subscribe(topic, QoS::AtLeastOnce);
            }
            Self::Embedded(b) => b.subscribe_local(topic),
            Self::None => {}
        }
    }

    fn unsubscribe(&self, topic: &str) {
        match self {
            Self::External(c) => {
                let _ = c.try_unsubscribe(topic);
            }
            Self::Embedded(b) => b.unsubscribe_local(topic),
            Self::None => {}
        }
    }
}

/// What finished waiting for the outbox.
type Stored = (Acker, Option<Receipt>, String);

async fn run(bus_module: &EventBus, store: Mutex<TopicStore>, mut ctx: ModuleContext) {
    let config = &bus_module.config;
    let status = &bus_module.status;
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<broker::Inbound>(CLIENT_QUEUE);
    let mut driver = None;
    let (side, address) = match (&bus_module.options, config.mode) {
        (Some(options), BrokerMode::External) => {
            let (client, eventloop) = AsyncClient::new(options.clone(), CLIENT_QUEUE);
            driver = Some(tokio::spawn(drive(eventloop, link_tx)));
            let (host, port) = options.broker_address();
            (Side::External(client), format!("{host}:{port}"))
        }
        _ => match broker::Broker::start(&config.internal, inbound_tx).await {
            Ok(b) => {
                let addr = b.addr();
                tracing::info!(%addr, "embedded MQTT broker listening");
                for t in topics::FIXED_TOPICS {
                    b.subscribe_local(t);
                }
                for t in lock(&store).all().unwrap_or_default() {
                    b.subscribe_local(&t);
                }
                status.bump(Counter::Connects);
                status.set(BrokerState::Connected, None);
                (Side::Embedded(b), addr.to_string())
            }
            Err(e) => {
                let why = format!("embedded broker on {}: {e}", config.internal.listen);
                tracing::error!(error = %why,
                    "eventbus bridges nothing until edgecore restarts; the rest of edgecore runs");
                status.set(BrokerState::Failed, Some(why));
                (Side::None, config.internal.listen.to_string())
            }
        },
    };
    tracing::info!(mode = ?config.mode, broker = %address,
        topics = ?lock(&store).all().unwrap_or_default(), "eventbus ready");
    let mut waits: JoinSet<Stored> = JoinSet::new();
    let mut redelivery_asked = false;
    loop {
        tokio::select! {
            msg = ctx.recv() => {
                let Some(msg) = msg else { break };
                carry_out(bus_module, &store, &side, &msg).await;
            }
            Some(link) = link_rx.recv() => match link {
                Link::Up => {
                    status.bump(Counter::Connects);
                    redelivery_asked = false;
                    if status.set(BrokerState::Connected, None) {
                        tracing::info!(broker = %address, "eventbus connected to the MQTT broker");
                    }
                    if let Side::External(client) = &side {
                        subscribe_all(&store, client).await;
                    }
                }
                Link::Down(why, wait) => {
                    status.bump(Counter::ConnectFailures);
                    if status.set(BrokerState::Connecting, Some(why.clone())) {
                        tracing::warn!(broker = %address, error = %why,
                            retry_in_ms = wait.as_millis(),
                            "eventbus not connected to the MQTT broker; retrying with backoff");
                    } else {
                        tracing::debug!(error = %why, retry_in_ms = wait.as_millis(), "MQTT reconnect failed");
                    }
                }
                Link::Publication(p) => {
                    let (topic, payload, qos) = (p.topic.clone(), p.payload.clone(), p.qos);
                    handle(bus_module, ctx.bus(), &side, &mut waits, &topic, &payload, qos,
                        Acker::External(p), &mut redelivery_asked).await;
                }
            },
            Some(inbound) = inbound_rx.recv() => {
                let p = inbound.publish;
                handle(bus_module, ctx.bus(), &side, &mut waits, &p.topic, &p.payload, p.qos,
                    Acker::Embedded(inbound.taken), &mut redelivery_asked).await;
            }
            Some(done) = waits.join_next(), if !waits.is_empty() => {
                let Ok((acker, receipt, topic)) = done else { continue };
                let stored = matches!(receipt, Some(Receipt::Stored));
                if stored {
                    status.bump(Counter::UploadsStored);
                } else {
                    status.bump(Counter::UploadsNotStored);
                    tracing::warn!(%topic, receipt = ?receipt,
                        "upload not stored by the outbox; not acknowledged, so the device or broker sends it again");
                }
                side.settle(acker, stored, &mut redelivery_asked).await;
            }
        }
    }
    match &side {
        Side::External(client) => {
            let _ = client.try_disconnect();
        }
        Side::Embedded(b) => b.stop(),
        Side::None => {}
    }
    if let Some(d) = driver {
        // Give the DISCONNECT a moment to go out, then stop.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while link_rx.recv().await.is_some() {}
        })
        .await;
        d.abort();
    }
}

fn lock(store: &Mutex<TopicStore>) -> std::sync::MutexGuard<'_, TopicStore> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Subscribes the fixed topics and the stored ones (QoS 1).
async fn subscribe_all(store: &Mutex<TopicStore>, client: &AsyncClient) {
    let stored = lock(store).all();
    let stored = stored.unwrap_or_else(|e| {
        tracing::error!(error = %e, "stored topics unreadable; only the fixed ones are subscribed");
        Vec::new()
    });
    let filters = topics::FIXED_TOPICS
        .iter()
        .map(|t| (*t).to_owned())
        .chain(stored)
        .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
    if let Err(e) = client.subscribe_many(filters).await {
        tracing::warn!(error = %e, "subscribe not queued");
    }
}

/// Hands a publication on: to devicetwin (then acknowledged), or to EdgeHub; a QoS 1 upload is
/// acknowledged once the outbox's receipt says stored (a wait in `waits`).
#[allow(clippy::too_many_arguments)]
async fn handle(
    m: &EventBus,
    bus: &Bus,
    side: &Side,
    waits: &mut JoinSet<Stored>,
    topic: &str,
    payload: &[u8],
    qos: QoS,
    acker: Acker,
    redelivery_asked: &mut bool,
) {
    let id = proto::new_id();
    let (dest, msg) = topics::inbound(topic, payload, id.clone(), proto::now_millis());
    match dest {
        Destination::Twin => {
            match bus.send_to_group(GROUP_TWIN, msg).await {
                Ok(_) => m.status.bump(Counter::ToTwin),
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "device publication not delivered to devicetwin")
                }
            }
            side.settle(acker, true, redelivery_asked).await;
        }
        Destination::Cloud => {
            let receipt = (qos != QoS::AtMostOnce)
                .then(|| m.receipts.as_ref().map(|r| r.receipt(&id)))
                .flatten();
            if let Err(e) = bus.send(MODULE_EDGEHUB, msg).await {
                tracing::warn!(%topic, error = %e, "upload not handed to EdgeHub");
            }
            let Some(receipt) = receipt else {
                // QoS 0, or no EdgeHub handle (EdgeHub disabled): handed over is all there is.
                m.status.bump(Counter::UploadsStored);
                side.settle(acker, true, redelivery_asked).await;
                return;
            };
            let timeout = m.config.store_wait();
            let topic = topic.to_owned();
            waits.spawn(async move { (acker, receipt.wait(timeout).await, topic) });
        }
    }
}

/// Carries out one bus message: the cloud's operations and devicetwin's publishes.
async fn carry_out(m: &EventBus, store: &Mutex<TopicStore>, side: &Side, msg: &Message) {
    let cmd = match topics::command(msg, &m.node_id) {
        Ok(c) => c,
        Err(CommandError::NotForUs) => {
            tracing::debug!(id = %msg.header.id, source = %msg.route.source,
                operation = %msg.route.operation, "eventbus ignored a message");
            return;
        }
        Err(CommandError::Invalid(why)) => {
            m.status.bump(Counter::PublishDropped);
            tracing::warn!(id = %msg.header.id, operation = %msg.route.operation,
                resource = %msg.route.resource, error = %why, "eventbus refused a message");
            return;
        }
    };
    let connected = m.status.state() == BrokerState::Connected;
    match cmd {
        Command::Publish { topic, payload } => {
            if !connected {
                m.status.bump(Counter::PublishDropped);
                tracing::info!(id = %msg.header.id, %topic, "publish dropped: MQTT broker not connected");
                return;
            }
            let qos = if m.config.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let client = match side {
                Side::External(client) => client,
                Side::Embedded(b) => {
                    b.publish(&topic, qos, m.config.retain, &payload);
                    m.status.bump(Counter::Published);
                    return;
                }
                Side::None => return,
            };
            let sent = tokio::time::timeout(
                m.config.publish_wait(),
                client.publish(topic.clone(), qos, m.config.retain, payload),
            )
            .await;
            match sent {
                Ok(Ok(())) => m.status.bump(Counter::Published),
                Ok(Err(e)) => {
                    m.status.bump(Counter::PublishDropped);
                    tracing::warn!(id = %msg.header.id, %topic, error = %e, "publish dropped");
                }
                Err(_) => {
                    m.status.bump(Counter::PublishDropped);
                    tracing::warn!(id = %msg.header.id, %topic,
                        timeout_secs = m.config.publish_wait().as_secs(),
                        "publish dropped: the MQTT client's queue stayed full");
                }
            }
        }
        Command::Subscribe(topic) => match lock(store).insert(&topic) {
            Ok(_) => {
                tracing::info!(%topic, "eventbus subscribed a topic for the cloud");
                if connected {
                    side.subscribe(&topic);
                }
            }
            Err(e) => tracing::error!(%topic, error = %e, "subscribe not stored"),
        },
        Command::Unsubscribe(topic) => match lock(store).remove(&topic) {
            Ok(_) => {
                tracing::info!(%topic, "eventbus unsubscribed a topic for the cloud");
                if connected && !topics::FIXED_TOPICS.contains(&topic.as_str()) {
                    side.unsubscribe(&topic);
                }
            }
            Err(e) => tracing::error!(%topic, error = %e, "unsubscribe not stored"),
        },
    }
}
