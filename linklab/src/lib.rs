//! A packet-level link emulator for Causeway's tests and benchmarks: two network namespaces
//! (cloud and edge) whose only link is a userspace forwarder on TUN devices. It impairs IP
//! packets, so QUIC (UDP) and WebSocket (TCP) cross exactly the same link: loss (random or in
//! Gilbert-Elliott bursts), delay and jitter (with or without reordering), a rate limit with a
//! bounded queue, a blackhole switched at run time, UDP blocked, and NAT rebinding of the edge's
//! source port or address.
//!
//! - [`model`]: which packet is dropped and when each other one arrives (pure, seeded).
//! - [`packet`]: the edge's NAT rewrite with fixed checksums (pure).
//! - [`scenario`]: the named scenarios of issue 14, in one table.
//! - [`Lab`]: the namespaces, devices and forwarder (root only; [`LabError::Unsupported`]
//!   says why not, for a test to print and skip).
//!
//! Linux `netem` is not needed (it is missing on the project's machines).

pub mod model;
pub mod netns;
pub mod packet;
pub mod scenario;

mod lab;

pub use lab::{CLOUD_ADDR, Control, EDGE_ADDR, EDGE_REBOUND_ADDR, Lab};
pub use netns::{Netns, NetnsEntry};

/// Why a lab could not be set up.
#[derive(Debug)]
pub enum LabError {
    /// This machine cannot run it (not root, no TUN device, no `ip`): skip, saying this.
    Unsupported(String),
    /// A step failed where it should work: a real error.
    Setup(String),
}

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported(why) => write!(f, "link lab not supported here: {why}"),
            Self::Setup(why) => write!(f, "link lab set-up failed: {why}"),
        }
    }
}

impl std::error::Error for LabError {}
