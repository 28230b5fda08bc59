//! CloudHub as a beehive module: serves the edge listeners (WebSocket and QUIC), the certificate
//! bootstrap server and the cloud API on sockets bound beforehand (so a port in use fails the
//! daemon's start-up, not a module later), until the hive shuts down; then closes every session.
//!
//! Messages other modules send to the `cloudhub` module are queued for a node, KubeEdge style:
//! the resource `node/<id>/<rest>` names the node and is trimmed to `<rest>` on the way out
//! (PROTOCOL.md B§1.4, B§8.4).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beehive::{BoxFuture, Module, ModuleContext, ModuleError};
use proto::Message;
use tokio::net::TcpListener;
use transport::{ListenConfig, ListenSocket, Protocol};

use crate::api::ApiOptions;
use crate::bootstrap::BootstrapConfig;
use crate::config::CloudHubConfig;
use crate::hub::Hub;
use session::node::delivery::needs_ack;

/// The module's name and group.
pub const MODULE_NAME: &str = "cloudhub";
/// How long sessions may take to close at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Sockets bound for the enabled endpoints.
#[derive(Debug, Default)]
pub struct Bound {
    /// WebSocket (TCP).
    pub websocket: Option<ListenSocket>,
    /// QUIC (UDP).
    pub quic: Option<ListenSocket>,
    /// Certificate bootstrap (TCP).
    pub https: Option<TcpListener>,
    /// Cloud API (TCP).
    pub api: Option<TcpListener>,
}

impl Bound {
    /// Binds every enabled endpoint of `config`.
    pub async fn bind(config: &CloudHubConfig) -> std::io::Result<Self> {
        let mut bound = Self::default();
        if config.websocket.enable {
            let addr = config.websocket.socket_addr();
            bound.websocket = Some(ListenSocket::bind(Protocol::WebSocket, addr).await?);
        }
        if config.quic.enable {
            let addr = config.quic.socket_addr();
            bound.quic = Some(ListenSocket::bind(Protocol::Quic, addr).await?);
        }
        if config.https.enable {
            bound.https = Some(TcpListener::bind(config.https.socket_addr()).await?);
        }
        if config.api.enable {
            bound.api = Some(TcpListener::bind(config.api.socket_addr()).await?);
        }
        Ok(bound)
    }

    /// The bound addresses, in the order websocket, quic, https, api (`None` if disabled).
    pub fn addrs(&self) -> [Option<SocketAddr>; 4] {
        [
            self.websocket.as_ref().and_then(|s| s.local_addr().ok()),
            self.quic.as_ref().and_then(|s| s.local_addr().ok()),
            self.https.as_ref().and_then(|s| s.local_addr().ok()),
            self.api.as_ref().and_then(|s| s.local_addr().ok()),
        ]
    }
}

/// Everything the module serves.
#[derive(Debug)]
struct Parts {
    bound: Bound,
    listen: ListenConfig,
    bootstrap: Option<BootstrapConfig>,
    api: ApiServing,
}

/// How the cloud API is served: its options and, for HTTPS, the TLS configuration.
#[derive(Debug, Clone, Default)]
pub struct ApiServing {
    /// Credentials and limits.
    pub options: ApiOptions,
    /// HTTPS (from `transport::tls::api_server_config`); `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The CloudHub beehive module.
#[derive(Debug)]
pub struct CloudHubModule {
    hub: Hub,
    parts: Mutex<Option<Parts>>,
}

impl CloudHubModule {
    /// A module serving `bound` with `hub`; `listen` configures the edge listeners and
    /// `bootstrap` the certificate server (needed if `bound.https` is set).
    pub fn new(
        hub: Hub,
        bound: Bound,
        listen: ListenConfig,
        bootstrap: Option<BootstrapConfig>,
    ) -> Self {
        Self {
            hub,
            parts: Mutex::new(Some(Parts {
                bound,
                listen,
                bootstrap,
                api: ApiServing::default(),
            })),
        }
    }

    /// Serves the cloud API as `api` says (default: open, plain HTTP).
    pub fn with_api(self, api: ApiServing) -> Self {
        if let Some(parts) = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            parts.api = api;
        }
        self
    }

    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}

impl Module for CloudHubModule {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn start(
        self: Arc<Self>,
        mut ctx: ModuleContext,
    ) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            let parts = self
                .parts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let Some(parts) = parts else {
                return Err(ModuleError::msg("cloudhub module started twice"));
            };
            // Upstream messages go to the cloud modules registered on this bus from now on.
            self.hub.route_upstream_through(ctx.bus().clone());
            let signal = ctx.shutdown_signal();
            let stop = move || {
                let signal = signal.clone();
                async move { signal.triggered().await }
            };
            let mut tasks = Vec::new();
            for (protocol, socket) in [
                (Protocol::WebSocket, parts.bound.websocket),
                (Protocol::Quic, parts.bound.quic),
            ] {
                let Some(socket) = socket else { continue };
                let addr = socket.local_addr().ok();
                let listener =
                    transport::listen(protocol, socket, parts.listen.clone(), Box::pin(stop()))
                        .map_err(|e| ModuleError::msg(format!("{protocol} listener: {e}")))?;
                tracing::info!(%protocol, addr = ?addr, "serving edges");
                let hub = self.hub.clone();
                tasks.push(tokio::spawn(async move { hub.serve(listener).await }));
            }
            if let (Some(tcp), Some(config)) = (parts.bound.https, parts.bootstrap) {
                tracing::info!(addr = ?tcp.local_addr().ok(), "serving certificate bootstrap");
                let shutdown = stop();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = crate::bootstrap::serve(tcp, config, shutdown).await {
                        tracing::error!(error = %e, "certificate bootstrap server failed");
                    }
                }));
            }
            if let Some(tcp) = parts.bound.api {
                let api = parts.api;
                tracing::info!(addr = ?tcp.local_addr().ok(), https = api.tls.is_some(),
                    credentials_required = api.options.require_credentials,
                    "serving the cloud API");
                let hub = self.hub.clone();
                let shutdown = stop();
                let handshake_timeout = parts.listen.link.handshake_timeout;
                tasks.push(tokio::spawn(async move {
                    let served = match api.tls {
                        Some(tls) => {
                            crate::api::serve_tls(
                                tcp,
                                tls,
                                handshake_timeout,
                                hub,
                                api.options,
                                shutdown,
                            )
                            .await
                        }
                        None => {
                            crate::api::serve_with_options(tcp, hub, api.options, shutdown).await
                        }
                    };
                    if let Err(e) = served {
                        tracing::error!(error = %e, "cloud API server failed");
                    }
                }));
            }
            // Messages from other modules go to nodes until shutdown.
            while let Some(msg) = ctx.recv().await {
                self.dispatch_downstream(msg).await;
            }
            // What other modules handed over before the shutdown is still queued durably.
            while let Some(msg) = ctx.try_recv() {
                self.dispatch_downstream(msg).await;
            }
            self.hub.shutdown(SHUTDOWN_GRACE).await;
            for task in tasks {
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
            }
            Ok(())
        })
    }
}

impl CloudHubModule {
    async fn dispatch_downstream(&self, mut msg: Message) {
        let Some((node, rest)) = split_node_resource(&msg.route.resource) else {
            tracing::warn!(resource = %msg.route.resource, id = %msg.header.id,
                "message for cloudhub names no node (resource node/<id>/...); dropped");
            return;
        };
        let needs = needs_ack(&msg);
        msg.route.resource = rest;
        if let Err(e) = self.hub.send(&node, msg, needs).await {
            tracing::warn!(%node, error = %e, "message from a cloud module not queued");
        }
    }
}

/// Splits `node/<id>/<rest>` (KubeEdge's cloud-internal resource) into the node id and `<rest>`.
fn split_node_resource(resource: &str) -> Option<(String, String)> {
    let rest = resource.strip_prefix("node/")?;
    let (node, rest) = rest.split_once('/').unwrap_or((rest, ""));
    (!node.is_empty()).then(|| (node.to_owned(), rest.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_prefix_is_split_off() {
        assert_eq!(
            split_node_resource("node/edge-1/default/pod/a"),
            Some(("edge-1".into(), "default/pod/a".into()))
        );
        assert_eq!(
            split_node_resource("node/edge-1"),
            Some(("edge-1".into(), String::new()))
        );
        assert_eq!(split_node_resource("node//x"), None);
        assert_eq!(split_node_resource("default/pod/a"), None);
    }
}
