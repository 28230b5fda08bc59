//! The embedded broker (KubeEdge's mode 0): a small MQTT 3.1.1 broker inside edgecore, on
//! rumqttc's packet codec, so a node needs nothing else installed.
//!
//! Why not rumqttd: its router acknowledges a device's QoS 1 publish as soon as it has it (no
//! hook to hold the PUBACK until the outbox committed the upload), and it refuses every filter
//! and topic that starts with `$` (`InvalidFilterPrefix`), which rules out KubeEdge's
//! `$hw/events/…` topics altogether. This broker hands each publication on a topic eventbus
//! listens to to eventbus and sends the device its PUBACK only once eventbus says it is stored;
//! a refusal closes the connection without a PUBACK, so the device sends it again.
//!
//! What it does: CONNECT (MQTT 3.1.1; clean sessions only: nothing is kept for a client between
//! connections), SUBSCRIBE / UNSUBSCRIBE with `+` and `#` (granted QoS at most 1), PUBLISH at
//! QoS 0 and 1 (QoS 2 is refused by closing the connection), PINGREQ, DISCONNECT, keepalive
//! (a client silent for 1.5 × its keepalive is dropped). Fan-out to devices is at most once
//! per subscriber (QoS 1 deliveries are not retransmitted; a subscriber whose queue is full
//! misses messages, counted). Not done: retained messages, last wills, TLS, authentication,
//! persistent sessions. It listens on loopback by default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::InternalBroker;

/// Time a new connection has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets queued to one client before deliveries to it are dropped.
const CLIENT_QUEUE: usize = 1024;

/// A publication for eventbus, with where to say whether it was taken (`true`: the device gets
/// its PUBACK; `false`: its connection is closed without one).
#[derive(Debug)]
pub struct Inbound {
    /// The publication.
    pub publish: Publish,
    /// Eventbus's verdict (dropped: treated as `false`).
    pub taken: oneshot::Sender<bool>,
}

struct Client {
    id: String,
    filters: Vec<(String, QoS)>,
    tx: mpsc::Sender<Packet>,
    next_pkid: u16,
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, Client>,
    /// eventbus's own filters.
    local: Vec<String>,
}

/// The running broker; cheap to clone. [`Broker::stop`] closes the port and every connection.
#[derive(Clone)]
pub struct Broker {
    state: Arc<Mutex<State>>,
    dropped: Arc<AtomicU64>,
    addr: SocketAddr,
    /// The accept loop, which owns the connections' tasks.
    accept: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("addr", &self.addr).finish()
    }
}

impl Broker {
    /// Binds `settings.listen` and serves; publications matching eventbus's filters
    /// ([`Self::set_local`]) come out of `inbound`.
    pub async fn start(
        settings: &InternalBroker,
        inbound: mpsc::Sender<Inbound>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let broker = Self {
            state: Arc::default(),
            dropped: Arc::default(),
            addr,
            accept: Arc::default(),
        };
        let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
        let max_packet = settings.max_payload_bytes.saturating_add(65_536);
        let b = broker.clone();
        let task = tokio::spawn(async move {
            let mut next_id = 0u64;
            // Dropped with this task: aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded broker accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(%peer, "embedded broker at its connection limit; refused");
                    continue;
                };
                next_id += 1;
                let (b, inbound, id) = (b.clone(), inbound.clone(), next_id);
                connections.spawn(async move {
                    let _slot = slot;
                    if let Err(why) = b.serve(stream, id, max_packet, &inbound).await {
                        tracing::debug!(%peer, error = %why, "embedded broker connection ended");
                    }
                    b.lock().clients.remove(&id);
                });
            }
        });
        *broker.accept.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(broker)
    }

    /// Closes the port and every connection.
    pub fn stop(&self) {
        if let Some(t) = self
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            t.abort();
        }
        self.lock().clients.clear();
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Deliveries to devices dropped because their queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.lock().clients.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds eventbus's filter.
    pub fn subscribe_local(&self, filter: &str) {
        let mut s = self.lock();
        if !s.local.iter().any(|f| f == filter) {
            s.local.push(filter.to_owned());
        }
    }

    /// Removes eventbus's filter.
    pub fn unsubscribe_local(&self, filter: &str) {
        self.lock().local.retain(|f| f != filter);
    }

    /// Delivers a publication to every device subscribed to its topic; returns how many.
    pub fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) -> usize {
        let mut s = self.lock();
        let mut n = 0;
        for c in s.clients.values_mut() {
            let Some(granted) = c
                .filters
                .iter()
                .filter(|(f, _)| matches(topic, f))
                .map(|(_, q)| *q)
                .max_by_key(|q| *q as u8)
            else {
                continue;
            };
            let mut p = Publish::new(topic, min_qos(qos, granted), payload.to_vec());
            p.retain = retain;
            if p.qos != QoS::AtMostOnce {
                c.next_pkid = c.next_pkid.checked_add(1).unwrap_or(1);
                p.pkid = c.next_pkid;
            }
            if c.tx.try_send(Packet::Publish(p)).is_ok() {
                n += 1;
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %c.id, topic, "embedded broker: delivery dropped (queue full)");
            }
        }
        n
    }

    async fn serve(
        &self,
        stream: TcpStream,
        id: u64,
        max_packet: usize,
        inbound: &mpsc::Sender<Inbound>,
    ) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(4096);
        let first =
            tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut rd, &mut buf, max_packet))
                .await
                .map_err(|_| "no CONNECT in time".to_owned())??;
        let Packet::Connect(connect) = first else {
            return Err("first packet is not CONNECT".into());
        };
        let client_id = if connect.client_id.is_empty() {
            format!("anon-{id}")
        } else {
            connect.client_id.clone()
        };
        let (tx, mut rx) = mpsc::channel::<Packet>(CLIENT_QUEUE);
        {
            let mut s = self.lock();
            // A client id connects once: the older connection is closed (its queue dropped).
            s.clients.retain(|_, c| c.id != client_id);
            s.clients.insert(
                id,
                Client {
                    id: client_id.clone(),
                    filters: Vec::new(),
                    tx: tx.clone(),
                    next_pkid: 0,
                },
            );
        }
        let writer = tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(4096);
            while let Some(p) = rx.recv().await {
                out.clear();
                if p.write(&mut out, usize::MAX).is_err() || wr.write_all(&out).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let send = |p: Packet| {
            let tx = tx.clone();
            async move { tx.send(p).await.map_err(|_| "connection closed".to_owned()) }
        };
        send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await?;
        let keepalive = match connect.keep_alive {
            0 => Duration::from_secs(24 * 3600),
            k => Duration::from_secs(u64::from(k)).mul_f64(1.5),
        };
        let result = loop {
            let packet =
                match tokio::time::timeout(keepalive, read_packet(&mut rd, &mut buf, max_packet))
                    .await
                {
                    Err(_) => break Err("keepalive expired".to_owned()),
                    Ok(Err(e)) => break Err(e),
                    Ok(Ok(p)) => p,
                };
            match packet {
                Packet::Publish(p) => {
                    if p.qos == QoS::ExactlyOnce {
                        break Err("QoS 2 is not supported".into());
                    }
                    let topic = p.topic.clone();
                    if topic.is_empty() || topic.contains(['+', '#']) {
                        break Err(format!("invalid topic {topic:?}"));
                    }
                    self.publish(&topic, p.qos, p.retain, &p.payload);
                    let local = self.lock().local.iter().any(|f| matches(&topic, f));
                    let pkid = p.pkid;
                    let qos = p.qos;
                    let taken = if local {
                        let (taken_tx, taken_rx) = oneshot::channel();
                        let ok = inbound
                            .send(Inbound {
                                publish: p,
                                taken: taken_tx,
                            })
                            .await
                            .is_ok();
                        ok && taken_rx.await.unwrap_or(false)
                    } else {
                        true
                    };
                    if !taken {
                        break Err(format!(
                            "publication on {topic:?} not stored; closed without PUBACK"
                        ));
                    }
                    if qos == QoS::AtLeastOnce {
                        send(Packet::PubAck(PubAck::new(pkid))).await?;
                    }
                }
                Packet::Subscribe(sub) => {
                    let mut codes = Vec::with_capacity(sub.filters.len());
                    {
                        let mut s = self.lock();
                        let Some(c) = s.clients.get_mut(&id) else {
                            break Err("taken over".into());
                        };
                        for f in &sub.filters {
                            if valid_filter(&f.path) {
                                let q = min_qos(f.qos, QoS::AtLeastOnce);
                                c.filters.retain(|(p, _)| p != &f.path);
                                c.filters.push((f.path.clone(), q));
                                codes.push(SubscribeReasonCode::Success(q));
                            } else {
                                codes.push(SubscribeReasonCode::Failure);
                            }
                        }
                    }
                    send(Packet::SubAck(SubAck::new(sub.pkid, codes))).await?;
                }
                Packet::Unsubscribe(unsub) => {
                    if let Some(c) = self.lock().clients.get_mut(&id) {
                        c.filters.retain(|(p, _)| !unsub.topics.contains(p));
                    }
                    send(Packet::UnsubAck(UnsubAck::new(unsub.pkid))).await?;
                }
                Packet::PingReq => send(Packet::PingResp).await?,
                Packet::Disconnect => break Ok(()),
                // Acknowledgements of deliveries: nothing is retransmitted, so nothing to do.
                Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
                other => break Err(format!("unexpected packet {other:?}")),
            }
        };
        // Only this connection's entry (a takeover may have replaced it).
        self.lock().clients.remove(&id);
        drop(tx);
        let _ = writer.await;
        result
    }
}

async fn read_packet(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, max_packet) {
            Ok(p) => return Ok(p),
            Err(mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.max(1024));
            }
            Err(e) => return Err(format!("bad packet: {e}")),
        }
        let n = rd.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed by the client".into());
        }
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

/// A valid subscription filter: `#` only last and alone in its level, `+` alone in its level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// MQTT topic matching; a filter starting with a wildcard does not match topics starting with
/// `$` (MQTT 3.1.1 §4.7.2), but `$hw/events/device/+/…` does match `$hw/events/device/…`.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(level)) if f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching() {
        assert!(matches(
            "$hw/events/device/ns/d/twin/update",
            "$hw/events/device/+/+/twin/+"
        ));
        assert!(!matches(
            "$hw/events/device/ns/d/twin/update/result",
            "$hw/events/device/+/+/twin/+"
        ));
        assert!(matches("$hw/events/upload/a/b", "$hw/events/upload/#"));
        assert!(matches("$hw/events/upload", "$hw/events/upload/#"));
        assert!(matches("default/user/a/b", "+/user/#"));
        assert!(!matches("$hw/user/a", "+/user/#"));
        assert!(!matches("$SYS/x", "#"));
        assert!(matches("a", "#"));
        assert!(matches("SYS/dis/upload_records", "SYS/dis/upload_records"));
        assert!(!matches("a/b", "a"));
        assert!(!matches("a", "a/b"));
        assert!(valid_filter("a/+/b/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
    }
}
