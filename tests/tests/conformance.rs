//! The transport conformance suite: one set of cases (`conformance/cases.rs`), written against
//! `transport`'s traits, instantiated once per adapter, so a failure reads `websocket::round_trip`
//! or `quic::round_trip` (STYLE.md lesson 6). Adapter-specific wire checks follow in
//! `conformance/websocket_wire.rs` and `conformance/quic_wire.rs`.
//!
//! Every server binds `127.0.0.1:0`; deadlines are short (1–2 s) and only upper bounds are
//! asserted, generously.

#[path = "conformance/cases.rs"]
mod cases;
#[path = "conformance/quic_wire.rs"]
mod quic_wire;
#[path = "conformance/websocket_wire.rs"]
mod websocket_wire;

/// Instantiates every case of `cases` for one protocol.
macro_rules! conformance_suite {
    ($adapter:ident, $protocol:expr, [$($case:ident),* $(,)?]) => {
        mod $adapter {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case($protocol).await;
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($adapter:ident, $protocol:expr) => {
        conformance_suite!(
            $adapter,
            $protocol,
            [
                round_trip,
                capabilities_are_negotiated,
                concurrent_senders_both_directions,
                per_key_order_under_load,
                message_size_cap,
                malformed_message_closes_only_that_connection,
                empty_payload_is_refused,
                giant_frame_announcement_is_refused,
                truncated_stream_is_reported,
                no_client_certificate_is_rejected,
                certificate_from_another_ca_is_rejected,
                expired_client_certificate_is_rejected,
                expired_server_certificate_is_refused_by_the_client,
                node_id_not_matching_certificate_is_rejected,
                non_node_certificate_is_rejected,
                silent_peer_is_detected,
                slow_reader_bounds_sender_memory,
                write_deadline_fails_a_stalled_send,
                graceful_close_delivers_what_was_sent,
                session_close_codes_reach_the_peer,
                shutdown_stops_accepting_but_keeps_connections,
                stalled_handshake_does_not_block_others,
                control_operations_are_acked_not_delivered,
            ]
        );
    };
}

all_cases!(websocket, transport::Protocol::WebSocket);
all_cases!(quic, transport::Protocol::Quic);
