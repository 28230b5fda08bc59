//! Shared fixtures for cloudhub's socket tests: a real PKI (CA, server and node certificates), a
//! real hub over a SQLite file, real WebSocket and QUIC listeners on `127.0.0.1:0`, and edges
//! dialling with the real transport.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use certs::{CertificateAuthority, Identity, NodeId, Validity};
use cloudhub::store::sqlite::{SqliteConfig, SqliteStore};
use cloudhub::{Hub, HubConfig};
use proto::Message;
use tokio::sync::watch;
use transport::{Capabilities, Connection, DialConfig, ListenConfig, ListenSocket, Protocol};

/// Key material for one test.
pub struct Pki {
    pub ca: Arc<CertificateAuthority>,
    pub server: Identity,
}

impl Pki {
    pub fn new() -> Self {
        let now = time::OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate(Validity::days_from(now, 2)).expect("CA");
        let server = ca
            .issue_server(
                &["localhost".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Validity::days_from(now, 2),
            )
            .expect("server cert")
            .identity;
        Self {
            ca: Arc::new(ca),
            server,
        }
    }

    pub fn node(&self, node: &str) -> Identity {
        let now = time::OffsetDateTime::now_utc();
        self.ca
            .issue_node(
                &NodeId::new(node).expect("node id"),
                Validity::days_from(now, 2),
            )
            .expect("node cert")
            .identity
    }
}

/// A hub serving both protocols on loopback.
pub struct Cloud {
    pub hub: Hub,
    pub pki: Pki,
    pub addrs: HashMap<Protocol, SocketAddr>,
    pub dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
}

impl Cloud {
    pub async fn start(config: HubConfig) -> Self {
        Self::start_with(config, |_| {}).await
    }

    pub async fn start_with(config: HubConfig, store: impl FnOnce(&mut SqliteConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store_config = SqliteConfig::new(dir.path().join("cloud.db"));
        store(&mut store_config);
        let store = SqliteStore::open(store_config).expect("store");
        let hub = Hub::new(config, Arc::new(store));
        let pki = Pki::new();
        let (stop, _) = watch::channel(false);
        let mut addrs = HashMap::new();
        for protocol in Protocol::ALL {
            let socket = ListenSocket::bind(protocol, "127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("bind");
            addrs.insert(protocol, socket.local_addr().expect("addr"));
            let mut rx = stop.subscribe();
            let shutdown = Box::pin(async move {
                let _ = rx.wait_for(|s| *s).await;
            });
            let listen = ListenConfig::new(pki.server.clone(), pki.ca.trust_anchors());
            let listener = transport::listen(protocol, socket, listen, shutdown).expect("listen");
            let hub = hub.clone();
            tokio::spawn(async move { hub.serve(listener).await });
        }
        Self {
            hub,
            pki,
            addrs,
            dir,
            stop,
        }
    }

    pub fn dial_config(&self, protocol: Protocol, node: &str, identity: Identity) -> DialConfig {
        DialConfig::new(
            self.addrs[&protocol].to_string(),
            NodeId::new(node).expect("node id"),
            identity,
            self.pki.ca.trust_anchors(),
        )
    }

    /// Connects `node` with its own certificate and the given capabilities.
    pub async fn connect(
        &self,
        protocol: Protocol,
        node: &str,
        caps: Capabilities,
    ) -> Box<dyn Connection> {
        let mut config = self.dial_config(protocol, node, self.pki.node(node));
        config.capabilities = caps;
        transport::connect(protocol, &config)
            .await
            .expect("connect")
    }

    /// Connects and proves the session is up: a keepalive and one upstream message whose
    /// acceptance is awaited on the store's live feed.
    pub async fn connect_ready(
        &self,
        protocol: Protocol,
        node: &str,
        caps: Capabilities,
    ) -> Box<dyn Connection> {
        let mut feed = self.hub.store().subscribe_upstream();
        let conn = self.connect(protocol, node, caps).await;
        conn.send(keepalive()).await.expect("keepalive");
        let hello = upstream(&format!("hello-{}", proto::new_id()));
        let id = hello.header.id.clone();
        conn.send(hello).await.expect("hello");
        loop {
            let rec = within(feed.recv()).await.expect("feed");
            if rec.message.header.id == id {
                break;
            }
        }
        conn
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

pub fn keepalive() -> Message {
    Message::new("")
        .route("websocket", "resource", "node", "keepalive")
        .content(proto::Content::text("ping"))
}

pub fn upstream(id: &str) -> Message {
    Message::with_header(id, "", proto::now_millis()).route(
        "edged",
        "meta",
        "default/pod/p",
        "update",
    )
}

pub fn downstream(resource: &str) -> Message {
    Message::new("")
        .route("app", "resource", resource, "update")
        .content(proto::Content::text("x"))
}

/// Bounds a wait on an event so a broken test fails instead of hanging.
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("timed out waiting for an event")
}

/// The next application message (not a Causeway upstream ack) received on `conn`.
pub async fn recv_app(conn: &dyn Connection) -> Message {
    loop {
        let msg = within(conn.recv())
            .await
            .expect("recv ok")
            .expect("not closed");
        if msg.route.group != proto::message::GROUP_CAUSEWAY {
            return msg;
        }
    }
}
