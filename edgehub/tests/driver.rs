//! EdgeHub's driver against a real transport listener on loopback, over both protocols: keepalives,
//! a message each way with the upstream acknowledgement, the unacknowledged message resent after
//! the cloud drops the link (W5), a blackholed link noticed by the read deadline (W7), and a
//! restart of the edge that resends from the durable outbox. Heartbeat 1 s, read deadline 2 s in
//! the blackhole test and 5 s elsewhere; every
//! wait is for an event, bounded by [`common::PATIENCE`].

mod common;

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use beehive::{Beehive, Hive, ModuleError, SimpleModule};
use causeway_edgehub::{EdgeHubConfig, EdgeHubModule, StatsHandle};
use proto::{Content, Message};
use transport::Protocol;

use common::{Cloud, PATIENCE, Pki, Proxy, ack_of, recv_data};

/// A running edge: EdgeHub plus a probe module in group `meta` that reports what it receives.
struct Edge {
    hive: Hive,
    meta: mpsc::Receiver<Message>,
    stats: StatsHandle,
}

impl Edge {
    fn start(config: EdgeHubConfig) -> Self {
        let (tx, meta) = mpsc::channel(256);
        let probe = SimpleModule::new("meta-probe", "meta", move |mut ctx| {
            let tx = tx.clone();
            async move {
                while let Some(msg) = ctx.recv().await {
                    let _ = tx.send(msg).await;
                }
                Ok::<(), ModuleError>(())
            }
        });
        let hub = EdgeHubModule::new(config);
        let stats = hub.stats_handle();
        let mut beehive = Beehive::new();
        beehive.register(hub, true).unwrap();
        beehive.register(probe, true).unwrap();
        Self {
            hive: beehive.start(),
            meta,
            stats,
        }
    }

    /// The next message the probe got that is not a connection event.
    async fn next_meta(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.meta.recv())
                .await
                .unwrap()
                .unwrap();
            if msg.route.operation != "connect" {
                return msg;
            }
        }
    }

    /// Waits for the next `cloud_connected` / `cloud_disconnected` event.
    async fn next_connection_event(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.meta.recv())
                .await
                .unwrap()
                .unwrap();
            if msg.route.operation == "connect" {
                return msg.content.as_text().unwrap_or_default().to_owned();
            }
        }
    }

    async fn send_upstream(&self, msg: Message) {
        self.hive.bus().send("websocket", msg).await.unwrap();
    }

    async fn stop(self) {
        let report = self.hive.shutdown().await;
        assert!(report.is_clean(), "{report:?}");
    }
}

fn upstream(id: &str) -> Message {
    Message::with_header(id, "", proto::now_millis())
        .route("metamanager", "resource", "default/podstatus/p1", "update")
        .content(Content::text(format!("status {id}")))
}

fn pod_update(id: &str) -> Message {
    Message::with_header(id, "", proto::now_millis())
        .route("edgecontroller", "resource", "default/pod/p1", "update")
        .content(Content::Json(
            serde_json::json!({"metadata": {"name": "p1"}}),
        ))
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    // Counters change inside the edge; poll them at a fine grain within the patience bound.
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn message_each_way_with_keepalives(protocol: Protocol) {
    let pki = Pki::new("edge-1");
    let mut cloud = Cloud::start(&pki, protocol).await;
    let mut edge = Edge::start(pki.edge_config(protocol, cloud.addr));
    let conn = cloud.accept().await;
    assert_eq!(
        conn.peer().node_id.as_ref().map(|n| n.as_str()),
        Some("edge-1")
    );
    assert!(
        conn.peer().capabilities.upstream_ack,
        "Causeway peers negotiate upstream-ack"
    );
    assert_eq!(edge.next_connection_event().await, "cloud_connected");

    // Keepalives: one right after connect, then every heartbeat.
    for _ in 0..2 {
        let k = tokio::time::timeout(PATIENCE, conn.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(k.route.operation, "keepalive");
        assert_eq!(
            (k.route.source.as_str(), k.route.resource.as_str()),
            ("websocket", "node")
        );
        assert_eq!(k.content.as_text(), Some("ping"));
    }

    // Cloud → edge: routed to group meta.
    conn.send(pod_update("down-1")).await.unwrap();
    let got = edge.next_meta().await;
    assert_eq!(got.header.id, "down-1");

    // Edge → cloud: stored, sent, acknowledged, then forgotten.
    edge.send_upstream(upstream("up-1")).await;
    let got = recv_data(&*conn).await;
    assert_eq!(got.header.id, "up-1");
    conn.send(ack_of(&got)).await.unwrap();
    let stats = edge.stats.clone();
    wait_for(|| stats.get().upstream_acked == 1).await;
    assert_eq!(stats.get().upstream_stored, 1);
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_message_each_way_with_keepalives() {
    message_each_way_with_keepalives(Protocol::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_message_each_way_with_keepalives() {
    message_each_way_with_keepalives(Protocol::Quic).await;
}

async fn unacknowledged_message_is_resent_after_reconnect(protocol: Protocol) {
    let pki = Pki::new("edge-2");
    let mut cloud = Cloud::start(&pki, protocol).await;
    let mut edge = Edge::start(pki.edge_config(protocol, cloud.addr));
    let first = cloud.accept().await;
    edge.send_upstream(upstream("in-flight")).await;
    let got = recv_data(&*first).await;
    assert_eq!(got.header.id, "in-flight");
    // The cloud drops the link before acknowledging.
    let dropped_at = Instant::now();
    first.close("test: drop before ack").await.ok();
    drop(first);
    assert_eq!(edge.next_connection_event().await, "cloud_connected");
    assert_eq!(edge.next_connection_event().await, "cloud_disconnected");
    let second = cloud.accept().await;
    let reconnect = dropped_at.elapsed();
    let again = recv_data(&*second).await;
    assert_eq!(again.header.id, "in-flight", "resent under the same id");
    assert_eq!(again.content, got.content);
    second.send(ack_of(&again)).await.unwrap();
    let stats = edge.stats.clone();
    wait_for(|| stats.get().upstream_acked == 1).await;
    println!(
        "{protocol}: reconnected {reconnect:?} after the cloud dropped the link (heartbeat 1 s)"
    );
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_unacknowledged_message_is_resent_after_reconnect() {
    unacknowledged_message_is_resent_after_reconnect(Protocol::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_unacknowledged_message_is_resent_after_reconnect() {
    unacknowledged_message_is_resent_after_reconnect(Protocol::Quic).await;
}

async fn blackholed_cloud_is_noticed_by_the_read_deadline(protocol: Protocol) {
    let pki = Pki::new("edge-3");
    let mut cloud = Cloud::start(&pki, protocol).await;
    let proxy = Proxy::start(protocol, cloud.addr).await;
    let mut edge = Edge::start(pki.edge_config_with_deadline(protocol, proxy.addr, 2));
    let _conn = cloud.accept().await;
    assert_eq!(edge.next_connection_event().await, "cloud_connected");
    // Silence: nothing arrives any more, nothing is closed, no error is sent.
    proxy.blackhole(true);
    let cut = Instant::now();
    assert_eq!(edge.next_connection_event().await, "cloud_disconnected");
    let noticed = cut.elapsed();
    println!(
        "{protocol}: blackholed cloud noticed after {noticed:?} (heartbeat 1 s, read deadline 2 s)"
    );
    // The link comes back: the edge reconnects through the proxy.
    proxy.blackhole(false);
    let _again = cloud.accept().await;
    assert_eq!(edge.next_connection_event().await, "cloud_connected");
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_blackholed_cloud_is_noticed_by_the_read_deadline() {
    blackholed_cloud_is_noticed_by_the_read_deadline(Protocol::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_blackholed_cloud_is_noticed_by_the_read_deadline() {
    blackholed_cloud_is_noticed_by_the_read_deadline(Protocol::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stored_while_offline_survive_a_restart_and_go_out_in_order() {
    let protocol = Protocol::Quic;
    let pki = Pki::new("edge-4");
    // No cloud yet: the edge stores what modules send.
    let unused = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cloud_addr = unused.local_addr().unwrap();
    drop(unused);
    let edge = Edge::start(pki.edge_config(protocol, cloud_addr));
    for i in 0..5 {
        edge.send_upstream(upstream(&format!("offline-{i}"))).await;
    }
    let stats = edge.stats.clone();
    wait_for(|| stats.get().upstream_stored == 5).await;
    edge.stop().await;

    // Restart the edge with the cloud up: everything goes out, in order, under the same ids.
    let mut cloud = Cloud::start_at(&pki, protocol, cloud_addr).await;
    let edge = Edge::start(pki.edge_config(protocol, cloud_addr));
    let conn = cloud.accept().await;
    for i in 0..5 {
        let got = recv_data(&*conn).await;
        assert_eq!(got.header.id, format!("offline-{i}"));
        conn.send(ack_of(&got)).await.unwrap();
    }
    let stats = edge.stats.clone();
    wait_for(|| stats.get().upstream_acked == 5).await;
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_cloud_message_is_handled_once_and_answered_again() {
    let protocol = Protocol::WebSocket;
    let pki = Pki::new("edge-5");
    let mut cloud = Cloud::start(&pki, protocol).await;
    let mut edge = Edge::start(pki.edge_config(protocol, cloud.addr));
    let conn = cloud.accept().await;
    let pod = pod_update("dup-1");
    conn.send(pod.clone()).await.unwrap();
    let got = edge.next_meta().await;
    // The module stores it and acknowledges (KubeEdge's contract), through EdgeHub.
    edge.send_upstream(Message::response_to(&got, Content::text("OK")))
        .await;
    let ack = recv_data(&*conn).await;
    assert_eq!(
        (ack.header.parent_id.as_str(), ack.route.operation.as_str()),
        ("dup-1", "response")
    );
    conn.send(ack_of(&ack)).await.unwrap();
    // The cloud resends it (its ACK timer fired first): the module does not see it again, but
    // EdgeHub answers it again.
    conn.send(pod).await.unwrap();
    let again = recv_data(&*conn).await;
    assert_eq!(
        (
            again.header.parent_id.as_str(),
            again.route.operation.as_str()
        ),
        ("dup-1", "response")
    );
    assert!(
        edge.meta.try_recv().is_err(),
        "the module saw the message once"
    );
    let stats = edge.stats.clone();
    wait_for(|| stats.get().downstream_duplicates == 1).await;
    edge.stop().await;
    cloud.stop().await;
}
