//! The session manager over real sockets, for both protocols: delivery and ACK, upstream
//! acceptance (deduplicated, acknowledged to Causeway edges), offline queueing, the reconnect
//! race (W9), the node limit and identity refusals (W8).

extern crate causeway_cloudhub as cloudhub;

mod common;

use std::time::Duration;

use common::{Cloud, downstream, keepalive, recv_app, upstream, within};
use proto::Content;
use proto::close::SessionCloseCode;
use proto::message::{GROUP_CAUSEWAY, OP_ACK};
use transport::{Capabilities, Connection, Protocol};

use cloudhub::HubConfig;

async fn for_each_protocol<F, Fut>(test: F)
where
    F: Fn(Protocol) -> Fut,
    Fut: Future<Output = ()>,
{
    for protocol in Protocol::ALL {
        eprintln!("--- {protocol}");
        test(protocol).await;
    }
}

#[tokio::test]
async fn downstream_message_is_delivered_and_acked() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        let edge = cloud
            .connect_ready(protocol, "edge-1", Capabilities::NONE)
            .await;
        let msg = downstream("default/pod/a");
        let id = msg.header.id.clone();
        let waiter = cloud.hub.ack_waiter("edge-1", &id);
        let queued = cloud.hub.send("edge-1", msg, true).await.expect("send");
        assert!(!queued.duplicate);
        let got = recv_app(edge.as_ref()).await;
        assert_eq!(got.header.id, id);
        edge.send(proto::Message::response_to(&got, Content::text("OK")))
            .await
            .expect("ack");
        let ack = waiter.wait(Duration::from_secs(30)).await.expect("acked");
        assert_eq!(ack.id, id);
        assert!(ack.latency.is_some());
        assert!(matches!(
            cloud.hub.message_state("edge-1", &id).await.expect("state"),
            Some(cloudhub::store::MessageState::Acked { .. })
        ));
        let nodes = cloud.hub.nodes().await.expect("nodes");
        assert_eq!(nodes.len(), 1);
        assert!(nodes[0].connected);
        assert_eq!(nodes[0].protocol, Some(protocol));
        assert!(nodes[0].last_keepalive_ms.is_some());
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn upstream_is_accepted_once_and_acked_to_causeway_edges() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        let mut feed = cloud.hub.store().subscribe_upstream();
        let edge = cloud.connect(protocol, "edge-1", Capabilities::ALL).await;
        assert!(edge.peer().capabilities.upstream_ack, "negotiated");
        edge.send(keepalive()).await.expect("keepalive");
        let msg = upstream("up-1");
        edge.send(msg.clone()).await.expect("send");
        // The cloud acks it once it is durable...
        let ack = within(edge.recv()).await.expect("ok").expect("open");
        assert_eq!(
            (ack.route.group.as_str(), ack.route.operation.as_str()),
            (GROUP_CAUSEWAY, OP_ACK)
        );
        assert_eq!(ack.header.parent_id, "up-1");
        let rec = within(feed.recv()).await.expect("published");
        assert_eq!(rec.message, msg);
        assert_eq!(rec.node, "edge-1");
        // ...and a resend is acked again but not published again.
        edge.send(msg).await.expect("resend");
        let again = within(edge.recv()).await.expect("ok").expect("open");
        assert_eq!(again.header.parent_id, "up-1");
        edge.send(upstream("up-2")).await.expect("send");
        let next = within(feed.recv()).await.expect("published");
        assert_eq!(next.message.header.id, "up-2", "no duplicate in between");
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn kubeedge_edges_get_no_upstream_ack() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        let edge = cloud
            .connect_ready(protocol, "edge-1", Capabilities::NONE)
            .await;
        // The only thing the edge receives next is the message we queue, not an ack.
        cloud
            .hub
            .send("edge-1", downstream("default/pod/a"), false)
            .await
            .expect("send");
        let got = within(edge.recv()).await.expect("ok").expect("open");
        assert_eq!(got.route.resource, "default/pod/a");
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn messages_queued_while_offline_wait_for_the_node() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        // Unknown nodes cannot be sent to.
        let err = cloud
            .hub
            .send("edge-1", downstream("r"), true)
            .await
            .expect_err("unknown");
        assert!(
            matches!(err, cloudhub::hub::SendError::UnknownNode(_)),
            "{err}"
        );
        let edge = cloud
            .connect_ready(protocol, "edge-1", Capabilities::ALL)
            .await;
        edge.close("going offline").await.expect("close");
        drop(edge);
        cloud.hub.wait_sessions_at_most(0).await;
        assert!(!cloud.hub.is_connected("edge-1"));
        let mut ids = Vec::new();
        for i in 0..20 {
            // Both kinds wait: KubeEdge loses queued no-ACK messages on reconnect (W12).
            let msg = downstream(&format!("default/pod/p{i}"));
            ids.push(msg.header.id.clone());
            cloud
                .hub
                .send("edge-1", msg, i % 2 == 0)
                .await
                .expect("queued");
        }
        let nodes = cloud.hub.nodes().await.expect("nodes");
        assert!(!nodes[0].connected);
        assert_eq!(nodes[0].queue.pending, 20);
        let edge = cloud.connect(protocol, "edge-1", Capabilities::ALL).await;
        edge.send(keepalive()).await.expect("keepalive");
        let mut got = Vec::new();
        while got.len() < 20 {
            let msg = recv_app(edge.as_ref()).await;
            edge.send(proto::Message::response_to(&msg, Content::text("OK")))
                .await
                .expect("ack");
            got.push(msg.header.id);
        }
        got.sort();
        ids.sort();
        assert_eq!(got, ids);
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn the_newest_connection_of_a_node_wins() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        let old = cloud
            .connect_ready(protocol, "edge-1", Capabilities::ALL)
            .await;
        let new = cloud
            .connect_ready(protocol, "edge-1", Capabilities::ALL)
            .await;
        // The old connection is closed by the cloud, with the takeover's code...
        assert_eq!(
            closed_with(old.as_ref()).await,
            Some(SessionCloseCode::Replaced)
        );
        // ...and its teardown (finished once only one session runs) leaves the new one alone.
        cloud.hub.wait_sessions_at_most(1).await;
        assert!(cloud.hub.is_connected("edge-1"));
        assert_eq!(cloud.hub.metrics().reconnect_count(), 1);
        let metrics = cloud.hub.metrics_text().await;
        assert!(
            !metrics.contains("cloudhub_disconnects_total{reason="),
            "no disconnect was published:\n{metrics}"
        );
        let msg = downstream("default/pod/a");
        let id = msg.header.id.clone();
        cloud.hub.send("edge-1", msg, true).await.expect("send");
        let got = recv_app(new.as_ref()).await;
        assert_eq!(got.header.id, id, "the new session serves the node");
        cloud.stop();
    })
    .await;
}

/// Reads `conn` to its end; the session close code it ended with, if any.
async fn closed_with(conn: &dyn Connection) -> Option<SessionCloseCode> {
    within(async {
        loop {
            match conn.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return e.session_code(),
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_node_without_keepalives_is_closed_with_its_code() {
    for_each_protocol(|protocol| async move {
        let mut config = HubConfig::default();
        config.session.keepalive_interval = Duration::from_millis(300);
        let cloud = Cloud::start(config).await;
        let conn = cloud.connect(protocol, "edge-1", Capabilities::ALL).await;
        // Data is no keepalive (PROTOCOL.md Part A item 6).
        conn.send(upstream("data-only")).await.expect("send");
        assert_eq!(
            closed_with(conn.as_ref()).await,
            Some(SessionCloseCode::KeepaliveTimeout)
        );
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_its_code() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        let conn = cloud
            .connect_ready(protocol, "edge-1", Capabilities::ALL)
            .await;
        let (_, code) = tokio::join!(
            cloud.hub.shutdown(Duration::from_secs(5)),
            closed_with(conn.as_ref())
        );
        assert_eq!(code, Some(SessionCloseCode::Shutdown));
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn node_limit_refuses_and_closes_new_nodes_only() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig {
            node_limit: 1,
            ..HubConfig::default()
        })
        .await;
        let _a = cloud
            .connect_ready(protocol, "edge-a", Capabilities::ALL)
            .await;
        let b = cloud.connect(protocol, "edge-b", Capabilities::ALL).await;
        assert_eq!(
            closed_with(b.as_ref()).await,
            Some(SessionCloseCode::NodeLimit),
            "the refused connection is closed with the node limit's code"
        );
        assert_eq!(cloud.hub.metrics().rejected_count("node_limit"), 1);
        assert!(!cloud.hub.is_connected("edge-b"));
        // A reconnect of the admitted node replaces its session: not a new node.
        let _a2 = cloud
            .connect_ready(protocol, "edge-a", Capabilities::ALL)
            .await;
        assert_eq!(cloud.hub.metrics().rejected_count("node_limit"), 1);
        cloud.stop();
    })
    .await;
}

#[tokio::test]
async fn a_certificate_for_another_node_is_refused() {
    for_each_protocol(|protocol| async move {
        let cloud = Cloud::start(HubConfig::default()).await;
        // edge-b's certificate, claiming to be edge-a.
        let config = cloud.dial_config(protocol, "edge-a", cloud.pki.node("edge-b"));
        let refused = match transport::connect(protocol, &config).await {
            Err(e) => Some(e.to_string()),
            // Refusal may land just after the handshake: the connection is closed unused.
            Ok(conn) => match within(conn.recv()).await {
                Ok(Some(m)) => panic!("served a message to an impostor: {m:?}"),
                Ok(None) => Some("closed".into()),
                Err(e) => Some(e.to_string()),
            },
        };
        assert!(refused.is_some());
        within(async {
            while cloud.hub.metrics().rejected_count("node_id_mismatch") == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(!cloud.hub.is_connected("edge-a"));
        assert!(cloud.hub.nodes().await.expect("nodes").is_empty());
        cloud.stop();
    })
    .await;
}
