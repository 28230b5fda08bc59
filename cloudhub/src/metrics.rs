//! Counters of the cloud hub and their Prometheus text exposition. Plain atomics: a scrape reads
//! them without stopping the sessions; gauges that live elsewhere (connected nodes, queue
//! depths) are passed in at render time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use transport::Protocol;

use crate::store::QueueDepth;

/// Upper bounds (seconds) of the ACK latency histogram buckets.
const ACK_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Counters per protocol.
#[derive(Debug, Default)]
struct PerProtocol {
    received: AtomicU64,
    sent: AtomicU64,
    sessions: AtomicU64,
}

/// The hub's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    ws: PerProtocol,
    quic: PerProtocol,
    /// A live session replaced by a newer connection of the same node.
    reconnects: AtomicU64,
    resends: AtomicU64,
    /// No-ACK messages written and removed from the queue: delivery never confirmed.
    unconfirmed: AtomicU64,
    refused: AtomicU64,
    cancelled: AtomicU64,
    upstream_accepted: AtomicU64,
    upstream_duplicates: AtomicU64,
    acks: AtomicU64,
    ack_buckets: [AtomicU64; ACK_BUCKETS.len()],
    ack_sum_micros: AtomicU64,
    ack_timed: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    disconnects: Mutex<BTreeMap<&'static str, u64>>,
    /// Upstream messages a cloud module took, by module.
    routed: Mutex<BTreeMap<&'static str, u64>>,
    /// Upstream messages for a cloud module that is not registered, by module.
    unrouted: Mutex<BTreeMap<&'static str, u64>>,
}

/// Gauges read from elsewhere at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Connected nodes per protocol.
    pub connected: Vec<(Protocol, u64)>,
    /// Open messages per node.
    pub queue_depths: Vec<(String, QueueDepth)>,
}

impl Metrics {
    fn per(&self, protocol: Protocol) -> &PerProtocol {
        match protocol {
            Protocol::WebSocket => &self.ws,
            Protocol::Quic => &self.quic,
        }
    }

    /// A message arrived from a node.
    pub fn received(&self, protocol: Protocol) {
        self.per(protocol).received.fetch_add(1, Ordering::Relaxed);
    }

    /// A message was written to a node.
    pub fn sent(&self, protocol: Protocol) {
        self.per(protocol).sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A session started.
    pub fn session_started(&self, protocol: Protocol) {
        self.per(protocol).sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A node's live session was replaced by its new connection.
    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds resends made by a session.
    pub fn resends(&self, n: u64) {
        self.resends.fetch_add(n, Ordering::Relaxed);
    }

    /// A message that needs no ACK was written and forgotten: sent, never confirmed (set
    /// against the ACK count, what the cloud knows was delivered).
    pub fn unconfirmed(&self) {
        self.unconfirmed.fetch_add(1, Ordering::Relaxed);
    }

    /// The edge refused a message awaiting its ACK (op `error`): it left the queue as failed.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The operator cancelled an open downstream message: it left the queue.
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Cloud module `module` took an upstream message.
    pub fn upstream_routed(&self, module: &'static str) {
        bump(&self.routed, module);
    }

    /// An upstream message for cloud module `module`, which is not registered, took the
    /// application path.
    pub fn upstream_unrouted(&self, module: &'static str) {
        bump(&self.unrouted, module);
    }

    /// An upstream message was durably accepted on the application path (`duplicate`: it had
    /// been before).
    pub fn upstream(&self, duplicate: bool) {
        let counter = if duplicate {
            &self.upstream_duplicates
        } else {
            &self.upstream_accepted
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A downstream message was acked after `latency` (from its first send in the session).
    pub fn ack(&self, latency: Option<Duration>) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        let Some(latency) = latency else { return };
        self.ack_timed.fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        for (bound, bucket) in ACK_BUCKETS.iter().zip(&self.ack_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.ack_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// A connection was refused; `reason` is a stable label.
    pub fn rejected(&self, reason: &'static str) {
        bump(&self.rejected, reason);
    }

    /// A session ended; `reason` is a stable label.
    pub fn disconnected(&self, reason: &'static str) {
        bump(&self.disconnects, reason);
    }

    /// Rejections so far with `reason` (for tests and logs).
    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.rejected
            .lock()
            .map(|m| m.get(reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Live sessions replaced by a newer connection so far.
    pub fn reconnect_count(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Renders everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "cloudhub_connected_nodes",
            "gauge",
            "Nodes with a live session.",
        );
        for (protocol, n) in &gauges.connected {
            line(
                &mut out,
                "cloudhub_connected_nodes",
                &[("protocol", protocol.as_str())],
                *n,
            );
        }
        let per = [
            (Protocol::WebSocket, &self.ws),
            (Protocol::Quic, &self.quic),
        ];
        for (name, help, pick) in [
            (
                "cloudhub_messages_received_total",
                "Messages received from nodes (keepalives included).",
                0,
            ),
            (
                "cloudhub_messages_sent_total",
                "Messages written to nodes.",
                1,
            ),
            ("cloudhub_sessions_total", "Node sessions started.", 2),
        ] {
            header(&mut out, name, "counter", help);
            for (protocol, counters) in per {
                let v = match pick {
                    0 => &counters.received,
                    1 => &counters.sent,
                    _ => &counters.sessions,
                };
                line(&mut out, name, &[("protocol", protocol.as_str())], load(v));
            }
        }
        for (name, help, v) in [
            (
                "cloudhub_reconnects_total",
                "Live sessions replaced by a new connection of the same node.",
                &self.reconnects,
            ),
            (
                "cloudhub_resends_total",
                "Downstream messages resent for want of an ACK.",
                &self.resends,
            ),
            (
                "cloudhub_unconfirmed_sent_total",
                "Downstream messages that need no ACK, written and forgotten: sent, never confirmed.",
                &self.unconfirmed,
            ),
            (
                "cloudhub_downstream_failed_total",
                "Downstream messages the edge answered with an error (could not deliver): failed.",
                &self.refused,
            ),
            (
                "cloudhub_downstream_cancelled_total",
                "Downstream messages the operator cancelled (DELETE): they left the queue unsent or unacknowledged.",
                &self.cancelled,
            ),
            (
                "cloudhub_upstream_accepted_total",
                "Upstream messages durably accepted.",
                &self.upstream_accepted,
            ),
            (
                "cloudhub_upstream_duplicates_total",
                "Upstream resends recognised as already accepted.",
                &self.upstream_duplicates,
            ),
        ] {
            header(&mut out, name, "counter", help);
            line(&mut out, name, &[], load(v));
        }
        for (name, help, map) in [
            (
                "cloudhub_rejected_connections_total",
                "Connections refused and closed, by reason.",
                &self.rejected,
            ),
            (
                "cloudhub_disconnects_total",
                "Sessions ended, by reason.",
                &self.disconnects,
            ),
        ] {
            header(&mut out, name, "counter", help);
            if let Ok(map) = map.lock() {
                for (reason, n) in map.iter() {
                    line(&mut out, name, &[("reason", reason)], *n);
                }
            }
        }
        for (name, help, map) in [
            (
                "cloudhub_upstream_routed_total",
                "Upstream messages a cloud module took, by module.",
                &self.routed,
            ),
            (
                "cloudhub_upstream_unrouted_total",
                "Upstream messages for a cloud module that is not registered (they took the \
                 application path), by module.",
                &self.unrouted,
            ),
        ] {
            header(&mut out, name, "counter", help);
            if let Ok(map) = map.lock() {
                for (module, n) in map.iter() {
                    line(&mut out, name, &[("module", module)], *n);
                }
            }
        }
        header(
            &mut out,
            "cloudhub_queue_depth",
            "gauge",
            "Open downstream messages per node and state.",
        );
        for (node, depth) in &gauges.queue_depths {
            let n = node.as_str();
            line(
                &mut out,
                "cloudhub_queue_depth",
                &[("node", n), ("state", "pending")],
                depth.pending,
            );
            line(
                &mut out,
                "cloudhub_queue_depth",
                &[("node", n), ("state", "in_flight")],
                depth.in_flight,
            );
        }
        let name = "cloudhub_ack_latency_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "From the first send of a downstream message to its ACK.",
        );
        for (bound, bucket) in ACK_BUCKETS.iter().zip(&self.ack_buckets) {
            let le = bound.to_string();
            line(
                &mut out,
                &format!("{name}_bucket"),
                &[("le", &le)],
                load(bucket),
            );
        }
        // Acks of messages not sent in the acking session have no latency; count only timed.
        let timed = load(&self.ack_timed);
        line(
            &mut out,
            &format!("{name}_bucket"),
            &[("le", "+Inf")],
            timed,
        );
        let _ = writeln!(
            out,
            "{name}_sum {}",
            load(&self.ack_sum_micros) as f64 / 1e6
        );
        line(&mut out, &format!("{name}_count"), &[], timed);
        header(
            &mut out,
            "cloudhub_acks_total",
            "counter",
            "Downstream ACKs received.",
        );
        line(&mut out, "cloudhub_acks_total", &[], load(&self.acks));
        out
    }
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    if let Ok(mut map) = map.lock() {
        *map.entry(key).or_default() += 1;
    }
}

fn load(v: &AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn line(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value (backslash, quote, newline) as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        m.received(Protocol::Quic);
        m.sent(Protocol::WebSocket);
        m.ack(Some(Duration::from_millis(3)));
        m.ack(Some(Duration::from_secs(60)));
        m.ack(None);
        m.rejected("node_limit");
        m.rejected("node_limit");
        m.disconnected("keepalive_timeout");
        let text = m.render(&Gauges {
            connected: vec![(Protocol::Quic, 2)],
            queue_depths: vec![(
                "edge\"1".into(),
                QueueDepth {
                    pending: 3,
                    in_flight: 1,
                },
            )],
        });
        for expected in [
            "cloudhub_connected_nodes{protocol=\"quic\"} 2",
            "cloudhub_messages_received_total{protocol=\"quic\"} 1",
            "cloudhub_messages_sent_total{protocol=\"websocket\"} 1",
            "cloudhub_rejected_connections_total{reason=\"node_limit\"} 2",
            "cloudhub_disconnects_total{reason=\"keepalive_timeout\"} 1",
            "cloudhub_queue_depth{node=\"edge\\\"1\",state=\"pending\"} 3",
            "cloudhub_ack_latency_seconds_bucket{le=\"0.005\"} 1",
            "cloudhub_ack_latency_seconds_bucket{le=\"0.0025\"} 0",
            "cloudhub_ack_latency_seconds_bucket{le=\"30\"} 1",
            "cloudhub_acks_total 3",
            "cloudhub_ack_latency_seconds_count 2",
            "cloudhub_ack_latency_seconds_bucket{le=\"+Inf\"} 2",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert_eq!(m.rejected_count("node_limit"), 2);
    }
}
