//! `modules.eventbus` in `edgecore.yaml`: which broker (the embedded one or an external one such
//! as mosquitto), how eventbus connects to it, and the bounds of its publishes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `modules.eventbus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EventBusConfig {
    /// Whether it runs. Default false: it opens an MQTT port, so a node asks for it.
    #[serde(default)]
    pub enable: bool,
    /// `internal` (KubeEdge's mode 0: the embedded broker, nothing else to install) or
    /// `external` (mode 2: a broker such as mosquitto that eventbus connects to as a client).
    /// Default `internal`.
    #[serde(default)]
    pub mode: BrokerMode,
    /// The embedded broker (mode `internal`).
    #[serde(default)]
    pub internal: InternalBroker,
    /// The external broker (mode `external`).
    #[serde(default)]
    pub external: ExternalBroker,
    /// QoS of eventbus's publishes (0 or 1). Default 1 (what KubeEdge uses on an external broker).
    #[serde(default = "default_qos", deserialize_with = "qos")]
    pub qos: u8,
    /// Retain flag of eventbus's publishes. Default false.
    #[serde(default)]
    pub retain: bool,
    /// Seconds a publish may wait for room in the client's queue; then it is dropped with a log,
    /// so a stuck broker never blocks devicetwin (KubeEdge waits 120 s, M17). Default 5.
    #[serde(default = "default_publish_timeout")]
    pub publish_timeout: u64,
    /// Seconds eventbus waits to hear that EdgeHub's outbox stored an upload before it gives up
    /// on that delivery (unacknowledged, the broker delivers it again after a reconnect).
    /// Default 10.
    #[serde(default = "default_store_timeout")]
    pub store_timeout: u64,
    /// The SQLite file of topics the cloud subscribed (table `sub_topics`, as KubeEdge).
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

/// Which broker eventbus uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerMode {
    /// The embedded broker (rumqttd) inside edgecore.
    #[default]
    Internal,
    /// A broker run by someone else (mosquitto); eventbus is its client.
    External,
}

/// `modules.eventbus.internal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InternalBroker {
    /// Where devices connect (MQTT 3.1.1, plain TCP). Default `127.0.0.1:1884` (KubeEdge's).
    #[serde(default = "default_internal_listen")]
    pub listen: SocketAddr,
    /// Connections at once. Default 1000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest publish payload in bytes. Default 1048576.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

impl Default for InternalBroker {
    fn default() -> Self {
        Self {
            listen: default_internal_listen(),
            max_connections: default_max_connections(),
            max_payload_bytes: default_max_payload(),
        }
    }
}

/// `modules.eventbus.external`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExternalBroker {
    /// `host:port` of the broker (a `tcp://` or `ssl://` prefix, as KubeEdge writes it, is
    /// accepted; TLS is `tls.enable`). With TLS the host is the name checked in the broker's
    /// certificate. Default `127.0.0.1:1883`.
    #[serde(default = "default_external_server")]
    pub server: String,
    /// Client id of eventbus's one session. It must be fixed and unique on the broker: the
    /// session is persistent (clean session false), so the broker keeps what eventbus has not
    /// acknowledged across a restart. Default `causeway-eventbus-<node-id>`.
    #[serde(default)]
    pub client_id: String,
    /// User name; empty: none. Default empty.
    #[serde(default)]
    pub username: String,
    /// Password (with `username`). Default empty.
    #[serde(default)]
    pub password: String,
    /// TLS to the broker.
    #[serde(default)]
    pub tls: ExternalTls,
    /// Keepalive in seconds. Default 30.
    #[serde(default = "default_keepalive")]
    pub keepalive: u64,
}

impl Default for ExternalBroker {
    fn default() -> Self {
        Self {
            server: default_external_server(),
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            tls: ExternalTls::default(),
            keepalive: default_keepalive(),
        }
    }
}

/// `modules.eventbus.external.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExternalTls {
    /// Whether to speak TLS (the broker's certificate checked against `ca-file`). Default false.
    #[serde(default)]
    pub enable: bool,
    /// PEM CA certificates that sign the broker's certificate.
    #[serde(default = "default_ca_file")]
    pub ca_file: PathBuf,
}

impl Default for ExternalTls {
    fn default() -> Self {
        Self {
            enable: false,
            ca_file: default_ca_file(),
        }
    }
}

impl Default for EventBusConfig {
    fn default() -> Self {
        Self {
            enable: false,
            mode: BrokerMode::Internal,
            internal: InternalBroker::default(),
            external: ExternalBroker::default(),
            qos: default_qos(),
            retain: false,
            publish_timeout: default_publish_timeout(),
            store_timeout: default_store_timeout(),
            path: default_path(),
        }
    }
}

impl ExternalBroker {
    /// The broker's host and port from [`Self::server`].
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let s = self.server.as_str();
        let s = ["tcp://", "ssl://", "tls://", "mqtt://", "mqtts://"]
            .iter()
            .find_map(|p| s.strip_prefix(p))
            .unwrap_or(s);
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{:?}: expected host:port", self.server))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{:?}: bad port", self.server))?;
        if host.is_empty() {
            return Err(format!("{:?}: no host", self.server));
        }
        Ok((host.to_owned(), port))
    }
}

impl EventBusConfig {
    /// [`Self::publish_timeout`] as a duration (at least one second).
    pub fn publish_wait(&self) -> Duration {
        Duration::from_secs(self.publish_timeout.max(1))
    }

    /// [`Self::store_timeout`] as a duration (at least one second).
    pub fn store_wait(&self) -> Duration {
        Duration::from_secs(self.store_timeout.max(1))
    }
}

fn default_qos() -> u8 {
    1
}

fn default_publish_timeout() -> u64 {
    5
}

fn default_store_timeout() -> u64 {
    10
}

fn default_keepalive() -> u64 {
    30
}

fn default_path() -> PathBuf {
    PathBuf::from("/var/lib/causeway/eventbus.db")
}

fn default_internal_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1884))
}

fn default_max_connections() -> usize {
    1000
}

fn default_max_payload() -> usize {
    1024 * 1024
}

fn default_external_server() -> String {
    "127.0.0.1:1883".into()
}

fn default_ca_file() -> PathBuf {
    PathBuf::from("/etc/kubeedge/ca/rootCA.crt")
}

fn qos<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let q = u8::deserialize(d)?;
    if q > 1 {
        return Err(serde::de::Error::custom(format!(
            "qos {q}: eventbus publishes at QoS 0 or 1"
        )));
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EventBusConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_refusals() {
        let c = parse("{}").unwrap();
        assert_eq!(c, EventBusConfig::default());
        assert_eq!(c.mode, BrokerMode::Internal);
        assert_eq!(c.internal.listen.port(), 1884);
        let c = parse(
            r#"{"mode": "external", "external": {"server": "h:8883", "tls": {"enable": true}}}"#,
        )
        .unwrap();
        assert_eq!(c.mode, BrokerMode::External);
        assert!(c.external.tls.enable);
        assert_eq!(c.external.host_port().unwrap(), ("h".to_owned(), 8883));
        let c = parse(r#"{"external": {"server": "tcp://10.0.0.1:1883"}}"#).unwrap();
        assert_eq!(c.external.host_port().unwrap().1, 1883);
        let c = parse(r#"{"external": {"server": "nohost"}}"#).unwrap();
        assert!(c.external.host_port().is_err());
        assert!(parse(r#"{"qos": 2}"#).unwrap_err().contains("QoS 0 or 1"));
        assert!(parse(r#"{"mode": "both"}"#).is_err());
        assert!(parse(r#"{"modes": "internal"}"#).is_err());
    }
}
