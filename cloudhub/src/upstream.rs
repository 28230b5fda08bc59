//! Upstream routing: which cloud module an edge's message goes to, and the seam through which a
//! node's driver hands it over.
//!
//! KubeEdge's CloudHub publishes every upstream message that is not an ACK, a keepalive, an
//! error or a servicebus reply to a cloud module chosen by its source (`PubToController`,
//! PROTOCOL.md B§8.3 item 8; MODULES.md §0): `twin` → devicecontroller, `metaserver` →
//! dynamiccontroller, anything else → edgecontroller. [`route`] is that choice, pure. The driver
//! hands the message (its resource prefixed `node/<id>/`, as KubeEdge does) to the chosen
//! beehive module as a sync request and acknowledges it to the edge only once the module has
//! answered: a module answers op `response` when it has taken the message (handled it, or
//! passed it on durably with [`crate::Hub::accept_upstream`]) and op `error` when it could not
//! yet (the driver tries again each second, like a failed store write). A module therefore
//! only registers on the bus under its name to receive its messages.
//!
//! A module that is not registered (none is for `dynamiccontroller` today) loses nothing: its
//! messages take the application path (the upstream log, the API's SSE stream), counted in
//! `cloudhub_upstream_unrouted_total{module}` and logged once per module.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use beehive::{Bus, SyncError};
use proto::Message;

use crate::store::StoreFuture;

/// How long a module may take to take an upstream message before the driver tries again.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sources that are cloud modules: KubeEdge never publishes an edge message claiming one of them
/// to a controller. Causeway keeps such messages on the application path.
const CLOUD_MODULE_SOURCES: [&str; 5] = [
    "cloudhub",
    "cloudStream",
    "devicecontroller",
    "edgecontroller",
    "synccontroller",
];

/// Where an upstream message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// The cloud module of this name (when it is registered).
    Module(&'static str),
    /// The application path: the upstream log and the API's SSE stream.
    Application,
}

/// KubeEdge's choice of cloud module for an upstream message by its source (PROTOCOL.md B§8.3
/// item 8). ACKs, keepalives, error answers and servicebus replies never get here: the session
/// and the driver consume them first.
pub fn route(msg: &Message) -> UpstreamTarget {
    match msg.route.source.as_str() {
        "twin" => UpstreamTarget::Module("devicecontroller"),
        "metaserver" => UpstreamTarget::Module("dynamiccontroller"),
        source if CLOUD_MODULE_SOURCES.contains(&source) => UpstreamTarget::Application,
        _ => UpstreamTarget::Module("edgecontroller"),
    }
}

/// The node id and the edge's own resource of a message handed to a cloud module, whose resource
/// is `node/<id>/<resource>`.
pub fn split_node(resource: &str) -> Option<(&str, &str)> {
    let rest = resource.strip_prefix("node/")?;
    let (node, rest) = rest.split_once('/').unwrap_or((rest, ""));
    (!node.is_empty()).then_some((node, rest))
}

/// A hand-over under way: the module's name and the future of its answer.
pub(crate) type Handover = (
    &'static str,
    StoreFuture<'static, Result<(), HandoverError>>,
);

/// Why a hand-over did not happen.
#[derive(Debug)]
pub(crate) enum HandoverError {
    /// The module did not take it now (busy, an error answer): try again later.
    Retry(String),
    /// The module is gone (stopped, shutting down): take the application path.
    Gone(String),
}

/// The drivers' end of the routing: the bus, set once CloudHub's module starts (without a bus,
/// every message takes the application path).
#[derive(Debug, Default)]
pub(crate) struct UpstreamRouter {
    bus: OnceLock<Bus>,
    /// Modules already reported missing (logged once each).
    missing: Mutex<BTreeSet<&'static str>>,
    /// The edge's own `sync` flag of each message being handed over, by (node, id): a sync
    /// request to a module sets it, and a module passing the message on must not change it.
    edge_sync: Arc<Mutex<HashMap<(String, String), bool>>>,
}

/// Removes a hand-over's entry from [`UpstreamRouter::edge_sync`] on every exit.
struct SyncEntry {
    key: (String, String),
    map: Arc<Mutex<HashMap<(String, String), bool>>>,
}

impl Drop for SyncEntry {
    fn drop(&mut self) {
        lock(&self.map).remove(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl UpstreamRouter {
    /// Routes through `bus` from now on.
    pub(crate) fn set_bus(&self, bus: Bus) {
        let _ = self.bus.set(bus);
    }

    /// The hand-over of `msg` from `node` to its module, or `Err(module)` with the module that
    /// should have had it when the application path takes it (`None`: its own choice).
    pub(crate) fn hand_over(
        &self,
        node: &str,
        msg: &Message,
    ) -> Result<Handover, Option<&'static str>> {
        let UpstreamTarget::Module(module) = route(msg) else {
            return Err(None);
        };
        let Some(bus) = self.bus.get().filter(|b| b.modules().contains(&module)) else {
            self.report_missing(module);
            return Err(Some(module));
        };
        let bus = bus.clone();
        let mut request = msg.clone();
        request.route.resource = format!("node/{node}/{}", msg.route.resource);
        let key = (node.to_owned(), msg.header.id.clone());
        lock(&self.edge_sync).insert(key.clone(), msg.header.sync);
        let entry = SyncEntry {
            key,
            map: Arc::clone(&self.edge_sync),
        };
        Ok((
            module,
            Box::pin(async move {
                let _entry = entry;
                match bus.send_sync(module, request, HANDOVER_TIMEOUT).await {
                    Ok(answer) if answer.route.operation == proto::message::OP_ERROR => {
                        let why = answer.content.as_text().unwrap_or_default().to_owned();
                        Err(HandoverError::Retry(why))
                    }
                    Ok(_) => Ok(()),
                    Err(e @ (SyncError::UnknownModule { .. } | SyncError::Stopped { .. })) => {
                        Err(HandoverError::Gone(e.to_string()))
                    }
                    Err(e) => Err(HandoverError::Retry(e.to_string())),
                }
            }),
        ))
    }

    /// The edge's message again from one handed to a module: the `node/<id>/` prefix removed
    /// and the edge's `sync` flag restored.
    pub(crate) fn original(&self, node: &str, mut msg: Message) -> Message {
        let prefix = format!("node/{node}/");
        if let Some(rest) = msg.route.resource.strip_prefix(&prefix) {
            msg.route.resource = rest.to_owned();
        }
        let key = (node.to_owned(), msg.header.id.clone());
        if let Some(sync) = lock(&self.edge_sync).get(&key) {
            msg.header.sync = *sync;
        }
        msg
    }

    fn report_missing(&self, module: &'static str) {
        if lock(&self.missing).insert(module) {
            tracing::info!(
                module,
                "no cloud module of this name is registered; \
                its upstream messages take the application path (upstream log, API stream)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(source: &str) -> Message {
        Message::new("").route(source, "g", "default/podstatus/p", "update")
    }

    #[test]
    fn routes_by_source_as_kubeedge() {
        assert_eq!(
            route(&from("twin")),
            UpstreamTarget::Module("devicecontroller")
        );
        assert_eq!(
            route(&from("metaserver")),
            UpstreamTarget::Module("dynamiccontroller")
        );
        for source in ["edged", "metamanager", "app", ""] {
            assert_eq!(
                route(&from(source)),
                UpstreamTarget::Module("edgecontroller")
            );
        }
        for source in CLOUD_MODULE_SOURCES {
            assert_eq!(route(&from(source)), UpstreamTarget::Application);
        }
    }

    #[test]
    fn node_prefix_is_split_off() {
        assert_eq!(
            split_node("node/edge-1/default/pod/a"),
            Some(("edge-1", "default/pod/a"))
        );
        assert_eq!(split_node("node/edge-1"), Some(("edge-1", "")));
        assert_eq!(split_node("node//x"), None);
        assert_eq!(split_node("default/pod/a"), None);
    }
}
