//! Shared helpers for Causeway's end-to-end and conformance tests (the tests live in `tests/tests/`).

pub mod containerd;
pub mod daemon;
pub mod disk;
pub mod drain;
pub mod mqtt;
pub mod transport_harness;
