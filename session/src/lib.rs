//! The two ends of the edge/cloud link as sans-IO state machines, in the style of quinn-proto:
//! they take events, messages and `now` in and hand transmits, timers, actions and events out.
//! Neither imports a runtime or touches a socket, a file or a clock; ids, wall time and
//! randomness are injected. The async drivers in `edgehub` and `cloudhub` perform what they ask.
//!
//! - [`edge`]: [`edge::EdgeSession`], EdgeHub's link to the cloud (connect, keepalive, dead-cloud
//!   detection, reconnect with backoff, upstream rate limit and ACK window, the answer lane), and
//!   [`edge::route`], where cloud messages go on the edge's bus.
//! - [`node`]: [`node::NodeSession`], the cloud's session with one connected node (keepalive
//!   check, upstream dedup and ACK, windowed downstream delivery with resends), and
//!   [`node::delivery`], which downstream messages need an ACK.
//! - [`timer`]: [`timer::TimerTable`], the one-slot-per-kind timer table both sessions keep.
//!
//! CI checks that no I/O crate (tokio, quinn, rustls, mio) enters this crate's dependency tree.

pub mod edge;
pub mod node;
pub mod timer;

#[cfg(test)]
mod tests {
    #[test]
    fn the_state_machines_do_no_io() {
        // Mechanical check of the sans-IO rule, beyond the dependency tree that CI checks: no
        // runtime, socket, file or clock reads in the code (inline test modules may use a clock).
        for (file, source) in [
            ("edge.rs", include_str!("edge.rs")),
            ("edge/backoff.rs", include_str!("edge/backoff.rs")),
            ("edge/route.rs", include_str!("edge/route.rs")),
            ("edge/timer.rs", include_str!("edge/timer.rs")),
            ("node.rs", include_str!("node.rs")),
            ("node/delivery.rs", include_str!("node/delivery.rs")),
            ("node/timer.rs", include_str!("node/timer.rs")),
            ("timer.rs", include_str!("timer.rs")),
        ] {
            let source = source
                .split("#[cfg(test)]\nmod tests {")
                .next()
                .unwrap_or(source);
            assert!(source.len() > 1000, "{file}: the check must see the code");
            for banned in [
                "tokio",
                "std::net",
                "std::fs",
                "std::io",
                "Instant::now",
                "SystemTime",
                "Message::new(",
            ] {
                assert!(!source.contains(banned), "{file} mentions {banned}");
            }
        }
    }
}
