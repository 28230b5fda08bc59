//! The checks every end-to-end test that sends traffic ends with: every queue drained back to
//! empty (the cloud's queue for the node has nothing pending or in flight, the edge's outbox no
//! row) and every id seen exactly once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::daemon::{http, json_of, outbox_rows, wait_until};

/// The cloud API's view of `node` (`GET /v1/nodes/{node}`, 200 expected).
pub fn node_view(api: SocketAddr, node: &str) -> Value {
    let (code, body) = http(api, "GET", &format!("/v1/nodes/{node}"), "");
    assert_eq!(code, 200, "{body}");
    json_of(&body)
}

/// Waits (up to `patience`) until the cloud's queue for `node` has nothing open and the edge's
/// outbox file `outbox` no row; panics with both if they never drain.
pub fn wait_drained(api: SocketAddr, node: &str, outbox: &Path, patience: Duration) {
    wait_until("every queue drained", patience, || {
        let rows = outbox_rows(outbox);
        let view = node_view(api, node);
        let queue = &view["queue"];
        if rows == 0 && queue["pending"] == 0 && queue["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!("outbox {rows} rows; cloud: {view}"))
        }
    });
}

/// Waits (up to `patience`) until the cloud's queue for `node` has nothing open: for tests
/// whose edge is not edgecore (no outbox file to read).
pub fn wait_cloud_drained(api: SocketAddr, node: &str, patience: Duration) {
    wait_until("the cloud's queue drained", patience, || {
        let view = node_view(api, node);
        let queue = &view["queue"];
        if queue["pending"] == 0 && queue["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!("cloud: {view}"))
        }
    });
}

/// Receives on `conn` until the Node object that the cloud sends every node that connects
/// (edgecontroller, the resource path) and answers it as an edge does: for tests whose edge is
/// a bare connection, so that the cloud's queue then holds only what the test sends.
pub async fn answer_node_object(conn: &dyn transport::Connection, node: &str, patience: Duration) {
    let resource = format!("node/{node}");
    loop {
        let msg = tokio::time::timeout(patience, conn.recv())
            .await
            .expect("the Node object within the patience")
            .expect("recv")
            .expect("open");
        if msg.route.resource.ends_with(&resource) {
            conn.send(proto::Message::response_to(
                &msg,
                proto::Content::text("OK"),
            ))
            .await
            .expect("answer");
            return;
        }
    }
}

/// Asserts every id in `ids` was counted exactly once in `counts` (`what` names the traffic).
pub fn exactly_once(what: &str, counts: &HashMap<String, usize>, ids: &[String]) {
    let wrong: Vec<(&String, Option<&usize>)> = ids
        .iter()
        .map(|id| (id, counts.get(id)))
        .filter(|(_, n)| *n != Some(&1))
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} ids not seen exactly once, e.g. {:?}",
        wrong.len(),
        ids.len(),
        &wrong[..wrong.len().min(5)]
    );
}
