//! The edge daemon's parts, as a library so tests can run them in-process: the configuration
//! file ([`config`]) and the local endpoint module ([`localapi`]). The binary (`src/main.rs`)
//! wires them to EdgeHub and metamanager on a beehive.
//!
//! What it is not: the link logic (that is `edgehub`) or the transport.

pub mod config;
pub mod localapi;
