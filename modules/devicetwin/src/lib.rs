//! devicetwin: each device's desired and reported state, kept on the node (KubeEdge's twin
//! module, MODULES.md §5). Applications and mappers talk to it over MQTT through eventbus
//! (device topics arrive as beehive messages, answers leave as `publish` requests to module
//! `eventbus`); the cloud's devicecontroller sends membership, and the Device objects
//! metamanager stores carry the desired values; reported values and states go to the cloud
//! through EdgeHub's durable outbox, so nothing is dropped while the link is down (#1968).
//!
//! - [`twin`] — the pure part: model, validation, merge, payloads (unit-tested).
//! - [`topic`] — device and node topics, parsed by segment.
//! - [`store`] — KubeEdge's tables in devicetwin's own SQLite file.
//! - [`module`] — the beehive module (name and group `twin`).
//! - [`config`] — `modules.device-twin`.

pub mod config;
pub mod module;
pub mod store;
pub mod topic;
pub mod twin;

pub use config::DeviceTwinConfig;
pub use module::{DeviceTwin, TwinStats};
