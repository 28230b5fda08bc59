//! EdgeHub's configuration: the `edgehub:` section of `edgecore.yaml` (printed by
//! `edgecore --defaultconfig`),
//! typed serde structs with `deny_unknown_fields` and validated newtypes, so parsing is
//! validation. Defaults are KubeEdge's (PROTOCOL.md B§7.1) and assume KubeEdge's target: an edge
//! node on a WAN link of tens to hundreds of milliseconds RTT, 15 s heartbeats, a dead cloud
//! noticed within about two of them.
//!
//! [`from_yaml`] parses any config type with serde-saphyr and names the key path of an error
//! (`edgehub.controller.heartbeat: ...`), for unknown keys and invalid values alike.
//!
//! `controller.protocol` picks the wire: the `websocket:` or `quic:` section of the same
//! name supplies the server address and timeouts; the other section is used only by
//! `controller.fallback` (off by default).

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use beehive::config::{ConfigError, InvalidValue, Seconds, from_yaml, load_yaml};
use certs::NodeId;
use transport::Protocol;

use crate::outbox::{Durability, OutboxConfig};
use session::edge::SessionConfig;

/// The `edgehub:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EdgeHubConfig {
    /// Protocol, identity and pacing.
    pub controller: ControllerConfig,
    /// The WebSocket endpoint (used when `controller.protocol` is `websocket`).
    #[serde(default = "EndpointConfig::websocket_default")]
    pub websocket: EndpointConfig,
    /// The QUIC endpoint (used when `controller.protocol` is `quic`).
    #[serde(default = "EndpointConfig::quic_default")]
    pub quic: EndpointConfig,
    /// Certificate files.
    #[serde(default)]
    pub tls: TlsFiles,
    /// The cloud's certificate server (`/ca.crt`, `/edge.crt`), used to obtain a certificate
    /// with [`EdgeHubConfig::token`]. Default `https://127.0.0.1:10002` (KubeEdge: the cloud's
    /// address, port 10002).
    #[serde(default = "default_http_server")]
    pub http_server: HttpsUrl,
    /// Bootstrap token (`<ca hash>.<jwt>`, from `causeway token create` or `keadm gettoken`).
    /// Needed only while the node has no certificate; empty (the default) means none.
    #[serde(default, with = "token_serde")]
    pub token: Option<BootstrapToken>,
    /// The durable outbox.
    #[serde(default)]
    pub outbox: OutboxSection,
}

/// `edgehub.controller`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ControllerConfig {
    /// `websocket` (KubeEdge's wire; works with stock KubeEdge and Causeway clouds) or `quic`
    /// (Causeway clouds only; better on lossy links). Default `websocket`, KubeEdge's.
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Keepalive period in seconds. Default 15. The reconnect wait is two heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: Seconds,
    /// Sent as `project_id`. Default `e632aba927ea4ac2b575ec1603d56f10`, KubeEdge's.
    #[serde(default)]
    pub project_id: ProjectId,
    /// This node's name: in the URL, the headers and the certificate CN. Required.
    pub node_id: NodeId,
    /// Module → cloud messages per second. Default 30 (keepalives are not limited).
    #[serde(default = "default_qps")]
    pub message_qps: Qps,
    /// Module → cloud burst. Default 60.
    #[serde(default = "default_burst")]
    pub message_burst: NonZeroU32,
    /// Moving to the other protocol when this one cannot connect (a network that drops UDP),
    /// and back once it can. Off by default.
    #[serde(default)]
    pub fallback: FallbackConfig,
}

/// `edgehub.controller.fallback`: after `attempts` failed connects in a row over `protocol`,
/// the edge dials the other protocol, at the server of the other endpoint section (`websocket:`
/// when `protocol` is `quic`); while connected there it tries `protocol` again in the
/// background every `probe-interval` seconds and moves back once a handshake completes.
/// Messages move with it exactly once (the session's resend and dedup, as across any
/// reconnect). Nothing new on the wire: the cloud must listen on both protocols (a Causeway
/// cloud does by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FallbackConfig {
    /// Whether to fall back at all. Default false.
    #[serde(default)]
    pub enable: bool,
    /// Failed connects in a row before moving. Default 3 (with QUIC's default 30 s handshake
    /// timeout about 1.5 to 2 minutes behind a UDP-dropping firewall; lower `quic.handshake-timeout`
    /// to fall back sooner).
    #[serde(default = "default_fallback_attempts")]
    pub attempts: NonZeroU32,
    /// Seconds between background tries of `protocol` while on the other one (from the end of
    /// one try to the start of the next). Default 60.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Seconds,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            enable: false,
            attempts: default_fallback_attempts(),
            probe_interval: default_probe_interval(),
        }
    }
}

/// `edgehub.websocket` / `edgehub.quic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EndpointConfig {
    /// The cloud's `host:port`. The host must be a name or IP address in the cloud's server
    /// certificate. Default `127.0.0.1:10000` (WebSocket, TCP) / `127.0.0.1:10001` (QUIC, UDP).
    pub server: ServerAddr,
    /// Seconds for TCP/UDP, TLS and the protocol handshake together. Default 30.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Seconds,
    /// Seconds without any traffic from the cloud (messages, pongs, QUIC acknowledgements) after
    /// which the link counts as dead. Default 15. Unlike KubeEdge this is enforced (W7); the
    /// transport pings the cloud in between, so an idle healthy link stays up.
    #[serde(default = "default_deadline")]
    pub read_deadline: Seconds,
    /// Seconds a write may make no progress before the link counts as dead. Default 15.
    #[serde(default = "default_deadline")]
    pub write_deadline: Seconds,
}

/// `edgehub.tls`: where the node's certificate material lives. Defaults are KubeEdge's paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsFiles {
    /// The cloud CA (PEM). Default `/etc/kubeedge/ca/rootCA.crt`. Written by the bootstrap.
    pub ca_file: PathBuf,
    /// This node's certificate (PEM). Default `/etc/kubeedge/certs/server.crt`.
    pub cert_file: PathBuf,
    /// This node's private key (PEM, mode 0600). Default `/etc/kubeedge/certs/server.key`.
    pub key_file: PathBuf,
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            ca_file: "/etc/kubeedge/ca/rootCA.crt".into(),
            cert_file: "/etc/kubeedge/certs/server.crt".into(),
            key_file: "/etc/kubeedge/certs/server.key".into(),
        }
    }
}

/// `edgehub.outbox`: the durable queue of module → cloud messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutboxSection {
    /// The SQLite file. Default `/var/lib/causeway/outbox.db`.
    #[serde(default = "default_outbox_path")]
    pub path: PathBuf,
    /// Most messages kept while the cloud is unreachable. Default 100000; beyond it producers
    /// wait (back-pressure).
    #[serde(default = "default_max_messages")]
    pub max_messages: NonZeroU64,
    /// Most bytes kept. Default 67108864 (64 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: NonZeroU64,
    /// `full` (default: every accepted message survives power loss) or `normal` (survives a
    /// process crash; fewer disk syncs).
    #[serde(default)]
    pub durability: Durability,
    /// How many answered cloud message ids are remembered to recognise resends. Default 10000.
    #[serde(default = "default_dedup_window")]
    pub dedup_window: NonZeroU64,
    /// Seconds a delivered cloud message that no module has answered yet suppresses its resends;
    /// after that a resend is delivered again (the module may have failed to store it, e.g. on
    /// a full disk). Default 30.
    #[serde(default = "default_dedup_pending_ttl")]
    pub dedup_pending_ttl: Seconds,
}

impl Default for OutboxSection {
    fn default() -> Self {
        Self {
            path: default_outbox_path(),
            max_messages: default_max_messages(),
            max_bytes: default_max_bytes(),
            durability: Durability::default(),
            dedup_window: default_dedup_window(),
            dedup_pending_ttl: default_dedup_pending_ttl(),
        }
    }
}

/// The project id: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, since it travels in a URL path
/// and an HTTP header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectId(String);

/// A `host:port` with a non-zero port; IPv6 hosts in brackets (`[::1]:10000`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr(String);

/// An `https://host[:port]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl(String);

/// A positive, finite rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Qps(f64);

/// A bootstrap token that at least has the token's shape (`<64 hex>.<jwt>`). It is a secret:
/// `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

impl EdgeHubConfig {
    /// The defaults for `node_id`.
    pub fn new(node_id: NodeId) -> Self {
        Self {
            controller: ControllerConfig {
                protocol: default_protocol(),
                heartbeat: default_heartbeat(),
                project_id: ProjectId::default(),
                node_id,
                message_qps: default_qps(),
                message_burst: default_burst(),
                fallback: FallbackConfig::default(),
            },
            websocket: EndpointConfig::websocket_default(),
            quic: EndpointConfig::quic_default(),
            tls: TlsFiles::default(),
            http_server: default_http_server(),
            token: None,
            outbox: OutboxSection::default(),
        }
    }

    /// The endpoint of the configured protocol.
    pub fn endpoint(&self) -> &EndpointConfig {
        self.endpoint_for(self.controller.protocol)
    }

    /// The endpoint of `protocol` (the other one is used by the fallback).
    pub fn endpoint_for(&self, protocol: Protocol) -> &EndpointConfig {
        match protocol {
            Protocol::WebSocket => &self.websocket,
            Protocol::Quic => &self.quic,
        }
    }

    /// Which protocol each dial uses: the configured one, or the fallback's choice.
    pub fn protocol_choice(&self) -> crate::fallback::ProtocolChoice {
        use crate::fallback::{FallbackPolicy, ProtocolChoice};
        let fallback = self.controller.fallback;
        if fallback.enable {
            ProtocolChoice::with_fallback(FallbackPolicy {
                primary: self.controller.protocol,
                attempts: fallback.attempts.get(),
                probe_interval: fallback.probe_interval.duration(),
            })
        } else {
            ProtocolChoice::fixed(self.controller.protocol)
        }
    }

    /// The session parameters. Liveness is left to the transport's read deadline (its pings
    /// and QUIC PINGs are answered by any cloud, while a KubeEdge cloud sends no message on an
    /// idle link), so the session's own silence check is off.
    pub fn session_config(&self) -> SessionConfig {
        let mut config = SessionConfig::new(self.controller.heartbeat.duration());
        config.dead_after = None;
        config.message_qps = self.controller.message_qps.get();
        config.message_burst = self.controller.message_burst.get();
        config
    }

    /// The transport's link parameters for the configured protocol.
    pub fn link_config(&self) -> transport::config::LinkConfig {
        self.link_config_for(self.controller.protocol)
    }

    /// The transport's link parameters for `protocol`.
    pub fn link_config_for(&self, protocol: Protocol) -> transport::config::LinkConfig {
        let endpoint = self.endpoint_for(protocol);
        let read_deadline = endpoint.read_deadline.duration();
        transport::config::LinkConfig {
            handshake_timeout: endpoint.handshake_timeout.duration(),
            read_deadline,
            write_deadline: endpoint.write_deadline.duration(),
            // A third of the read deadline: one or two lost pings never end a healthy link.
            keep_alive_interval: read_deadline / 3,
            ..transport::config::LinkConfig::default()
        }
    }

    /// The outbox parameters.
    pub fn outbox_config(&self) -> OutboxConfig {
        let mut config = OutboxConfig::new(&self.outbox.path);
        config.max_messages = self.outbox.max_messages.get();
        config.max_bytes = self.outbox.max_bytes.get();
        config.durability = self.outbox.durability;
        config.dedup_window = self.outbox.dedup_window.get();
        config.dedup_pending_ttl = self.outbox.dedup_pending_ttl.duration();
        config
    }
}

impl EndpointConfig {
    /// KubeEdge's WebSocket defaults with server `127.0.0.1:10000`.
    pub fn websocket_default() -> Self {
        Self::with_server(ServerAddr("127.0.0.1:10000".into()))
    }

    /// KubeEdge's QUIC defaults with server `127.0.0.1:10001`.
    pub fn quic_default() -> Self {
        Self::with_server(ServerAddr("127.0.0.1:10001".into()))
    }

    /// Default timeouts for `server`.
    pub fn with_server(server: ServerAddr) -> Self {
        Self {
            server,
            handshake_timeout: default_handshake_timeout(),
            read_deadline: default_deadline(),
            write_deadline: default_deadline(),
        }
    }
}

impl ProjectId {
    /// Validates a project id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidValue> {
        let s = s.into();
        let ok = (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(InvalidValue(format!(
                "project id {s:?} must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'"
            )))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ProjectId {
    fn default() -> Self {
        Self(transport::config::DEFAULT_PROJECT_ID.to_owned())
    }
}

impl ServerAddr {
    /// Validates `host:port`.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidValue> {
        let s = s.into();
        let bad = || {
            InvalidValue(format!(
                "server {s:?} must be host:port, e.g. 10.0.0.1:10000"
            ))
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        };
        match port.parse::<u16>() {
            Ok(p) if p != 0 && host_ok => Ok(Self(s)),
            _ => Err(bad()),
        }
    }

    /// The address as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl HttpsUrl {
    /// Validates an `https://host[:port][/path]` URL.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidValue> {
        let s = s.into();
        let bad = || {
            InvalidValue(format!(
                "{s:?} must be an https:// URL, e.g. https://10.0.0.1:10002"
            ))
        };
        let rest = s.strip_prefix("https://").ok_or_else(bad)?;
        let authority = rest.split('/').next().unwrap_or_default();
        let ok = match authority.rsplit_once(':') {
            Some((_, port)) if !authority.ends_with(']') => {
                ServerAddr::new(authority).is_ok() && port.parse::<u16>().is_ok()
            }
            _ => ServerAddr::new(format!("{authority}:443")).is_ok(),
        };
        if ok {
            Ok(Self(s.trim_end_matches('/').to_owned()))
        } else {
            Err(bad())
        }
    }

    /// The URL without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Qps {
    /// Validates a rate.
    pub fn new(qps: f64) -> Result<Self, InvalidValue> {
        if qps.is_finite() && qps > 0.0 {
            Ok(Self(qps))
        } else {
            Err(InvalidValue(format!(
                "rate {qps} must be a positive number"
            )))
        }
    }

    /// The rate.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl BootstrapToken {
    /// Checks the token's shape (`<64 hex>.<jwt>`); whether it is valid only the cloud can tell.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidValue> {
        let s = s.into();
        let token = s.trim().to_owned();
        certs::token::split(&token).map_err(|e| InvalidValue(format!("token: {e}")))?;
        Ok(Self(token))
    }

    /// The token.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

/// Serde for the newtypes: each (de)serialises as its plain value and validates on the way in.
macro_rules! serde_via {
    ($ty:ty, $inner:ty, $get:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let get: fn(&$ty) -> $inner = $get;
                get(self).serialize(serializer)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let inner = <$inner>::deserialize(deserializer)?;
                Self::new(inner).map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via!(ProjectId, String, |s| s.0.clone());
serde_via!(ServerAddr, String, |s| s.0.clone());
serde_via!(HttpsUrl, String, |s| s.0.clone());
serde_via!(Qps, f64, |s| s.0);

/// `token: ""` (KubeEdge's way of saying "none") and an absent key both mean no token.
mod token_serde {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        token: &Option<BootstrapToken>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        token
            .as_ref()
            .map_or("", |t| t.expose())
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<BootstrapToken>, D::Error> {
        let s = String::deserialize(deserializer)?;
        if s.trim().is_empty() {
            Ok(None)
        } else {
            BootstrapToken::new(s)
                .map(Some)
                .map_err(serde::de::Error::custom)
        }
    }
}

fn default_protocol() -> Protocol {
    Protocol::WebSocket
}

fn default_heartbeat() -> Seconds {
    Seconds::at_least_one(15)
}

fn default_handshake_timeout() -> Seconds {
    Seconds::at_least_one(30)
}

fn default_deadline() -> Seconds {
    Seconds::at_least_one(15)
}

fn default_qps() -> Qps {
    Qps(30.0)
}

fn default_burst() -> NonZeroU32 {
    NonZeroU32::MIN.saturating_add(59)
}

fn default_fallback_attempts() -> NonZeroU32 {
    NonZeroU32::MIN.saturating_add(2)
}

fn default_probe_interval() -> Seconds {
    Seconds::at_least_one(60)
}

fn default_http_server() -> HttpsUrl {
    HttpsUrl("https://127.0.0.1:10002".into())
}

fn default_outbox_path() -> PathBuf {
    "/var/lib/causeway/outbox.db".into()
}

fn default_max_messages() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(99_999)
}

fn default_max_bytes() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(64 * 1024 * 1024 - 1)
}

fn default_dedup_pending_ttl() -> Seconds {
    Seconds::at_least_one(30)
}

fn default_dedup_window() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(9_999)
}

#[cfg(test)]
mod tests;
