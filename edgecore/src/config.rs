//! `edgecore.yaml`: the EdgeHub section (owned by `edgehub`, see [`edgehub::config`]) and the
//! per-module switches. Unknown keys and invalid values are refused with their key path.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use devicetwin::DeviceTwinConfig;
use edged::EdgedConfig;
use edgehub::EdgeHubConfig;
use edgehub::config::ConfigError;
use eventbus::EventBusConfig;
use metamanager::MetaManagerConfig;
use servicebus::ServiceBusConfig;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EdgecoreConfig {
    /// The link to the cloud.
    pub edgehub: EdgeHubConfig,
    /// Which modules run, and their settings.
    #[serde(default)]
    pub modules: ModulesConfig,
}

/// `modules:`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModulesConfig {
    /// EdgeHub itself.
    #[serde(default)]
    pub edgehub: Enable,
    /// metamanager: the node's objects from the cloud, their queries and MetaServer's data.
    #[serde(default)]
    pub metamanager: MetaManagerConfig,
    /// The local HTTP endpoint for applications on the node (MetaServer's routes too).
    #[serde(default)]
    pub local_api: LocalApiConfig,
    /// servicebus: lets the cloud call allowed HTTP services on this node (default off).
    #[serde(default)]
    pub service_bus: ServiceBusConfig,
    /// eventbus: the MQTT bridge for devices (embedded or external broker; default off).
    #[serde(default)]
    pub eventbus: EventBusConfig,
    /// devicetwin: devices' desired and reported twins over MQTT (through eventbus); default off.
    #[serde(default)]
    pub device_twin: DeviceTwinConfig,
    /// edged: runs the node's pods through containerd's CRI (needs metamanager); default off.
    #[serde(default)]
    pub edged: EdgedConfig,
}

/// A module switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Enable {
    /// Whether the module runs. Default true.
    #[serde(default = "yes")]
    pub enable: bool,
}

impl Default for Enable {
    fn default() -> Self {
        Self { enable: true }
    }
}

/// `modules.local-api`: see [`crate::localapi`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LocalApiConfig {
    /// Whether it runs. Default true.
    #[serde(default = "yes")]
    pub enable: bool,
    /// Its address: MetaServer (`/api/v1/...`), the journal, upstream sends and status. Must be
    /// a loopback address: the endpoint has no authentication. Default `127.0.0.1:10550`
    /// (KubeEdge's MetaServer address).
    #[serde(default = "default_listen", deserialize_with = "loopback")]
    pub listen: SocketAddr,
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        Self {
            enable: true,
            listen: default_listen(),
        }
    }
}

impl EdgecoreConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        edgehub::config::load_yaml(path)
    }

    /// Parses and validates YAML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        edgehub::config::from_yaml(text, origin)
    }
}

/// The complete default configuration, commented: what `edgecore --defaultconfig` prints. A test
/// checks that it parses to the defaults.
pub const DEFAULT_YAML: &str = r#"# edgecore configuration. Durations are whole seconds, as in KubeEdge.
edgehub:
  controller:
    # websocket: KubeEdge's wire (works with KubeEdge and Causeway clouds).
    # quic: Causeway's QUIC profile (Causeway clouds only; better on lossy links).
    protocol: websocket
    # Keepalive period; the reconnect wait after a lost connection is two heartbeats.
    heartbeat: 15
    project-id: e632aba927ea4ac2b575ec1603d56f10
    # This node's name (URL, headers, certificate CN). Change it.
    node-id: edge-1
    # Module -> cloud rate limit (keepalives are not limited).
    message-qps: 30
    message-burst: 60
    # When `protocol` cannot connect (a network that drops UDP blocks QUIC): after `attempts`
    # failed connects in a row use the other protocol, at the server of its section below;
    # try `protocol` again every `probe-interval` seconds and move back once it connects.
    # Messages move exactly once. The cloud must listen on both protocols.
    fallback:
      enable: false
      attempts: 3
      probe-interval: 60
  websocket:
    server: "127.0.0.1:10000"       # the cloud's host:port (a name or IP in its certificate)
    handshake-timeout: 30
    read-deadline: 15               # silence after which the link counts as dead
    write-deadline: 15
  quic:
    server: "127.0.0.1:10001"
    handshake-timeout: 30
    read-deadline: 15
    write-deadline: 15
  tls:
    ca-file: /etc/kubeedge/ca/rootCA.crt
    cert-file: /etc/kubeedge/certs/server.crt
    key-file: /etc/kubeedge/certs/server.key
  # Certificate bootstrap server of the cloud (used with the token when there is no certificate).
  http-server: "https://127.0.0.1:10002"
  # Bootstrap token from `causeway token create` (or `keadm gettoken`); empty when not needed.
  token: ""
  outbox:
    path: /var/lib/causeway/outbox.db
    max-messages: 100000            # beyond it modules wait; nothing is dropped
    max-bytes: 67108864
    durability: full                # full: survives power loss; normal: survives a crash
    dedup-window: 10000             # answered cloud message ids remembered
modules:
  edgehub:
    enable: true
  # The node's objects from the cloud (pods, configmaps, secrets, the node), applied in
  # resource-version order and acknowledged once stored; served to edge modules and MetaServer.
  metamanager:
    enable: true
    path: /var/lib/causeway/meta.db
    journal-max: 100000             # cloud messages remembered (/v1/messages, resend detection)
    remote-query-timeout: 10        # a configmap/secret missing here is asked of the cloud
  # MetaServer (/api/v1/...), /v1/messages, /v1/upstream, /v1/status for local applications.
  local-api:
    enable: true
    listen: "127.0.0.1:10550"       # loopback only: no authentication
  service-bus:
    # Lets the cloud call HTTP services on this node (cloud API: /v1/nodes/<id>/proxy/<port>/...).
    enable: false
    # ip:port of each service the cloud may call (one per port); none: every call gets 403.
    allowed-targets: []             # e.g. ["127.0.0.1:8080"]
    timeout: 10                     # seconds per call, connect to last byte; longer: 504
    max-response-bytes: 5242880     # larger response bodies: 502 (at most 16777216)
    max-concurrent-calls: 64        # more at once: 503
  # The MQTT bridge for devices (KubeEdge's eventbus): device/node topics to devicetwin, other
  # subscribed topics to the cloud through the outbox (acknowledged to the broker once stored).
  eventbus:
    enable: false
    mode: internal                  # internal: embedded broker (KubeEdge mode 0); external: mode 2
    internal:
      listen: "127.0.0.1:1884"      # where devices connect (MQTT 3.1.1, plain TCP)
      max-connections: 1000
      max-payload-bytes: 1048576
    external:
      server: "127.0.0.1:1883"      # host:port of the broker (e.g. mosquitto)
      client-id: ""                 # fixed, persistent session; "": causeway-eventbus-<node-id>
      username: ""
      password: ""
      tls:
        enable: false
        ca-file: /etc/kubeedge/ca/rootCA.crt   # the broker's certificate is checked against it
      keepalive: 30
    qos: 1                          # QoS of eventbus's publishes (0 or 1)
    retain: false
    publish-timeout: 5              # seconds a publish may wait for the client; then dropped
    store-timeout: 10               # seconds to wait for the outbox to store an upload
    path: /var/lib/causeway/eventbus.db   # topics subscribed by the cloud (sub_topics)
  # Runs the pods bound to this node through containerd's CRI (KubeEdge's edged); needs
  # metamanager. Pod and node status go to the cloud through the outbox.
  edged:
    enable: false
    cri-socket: /run/containerd/containerd.sock
    pod-sandbox-image: "registry.k8s.io/pause:3.9"   # pulled if absent; containerd's sandbox_image
    root-dir: /var/lib/causeway/edged   # pods/<uid>/volumes (configmap/secret files), pods/<uid>/logs
    sync-period: 1                  # seconds between reads of the runtime's state (and on store changes)
    node-status-period: 60          # node status sent at least this often (and on change)
    backoff-initial: 10             # restart and image-pull back-off, doubling...
    backoff-max: 300                # ...up to this
    max-dead-per-container: 1       # exited instances kept per container (lastState, logs)
    image-gc-bytes: 0               # unused images removed above this many bytes; 0: never
"#;

fn yes() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10550))
}

fn loopback<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let addr = SocketAddr::deserialize(deserializer)?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(serde::de::Error::custom(format!(
            "{addr} is not a loopback address; the local endpoint has no authentication"
        )))
    }
}

#[cfg(test)]
mod tests {
    use certs::NodeId;

    use super::*;

    #[test]
    fn default_yaml_parses_to_the_defaults() {
        let config = EdgecoreConfig::parse(DEFAULT_YAML, "--defaultconfig").unwrap();
        let expected = EdgecoreConfig {
            edgehub: EdgeHubConfig::new(NodeId::new("edge-1").unwrap()),
            modules: ModulesConfig::default(),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edgecore.example.yaml");
        let config = EdgecoreConfig::load(&path).unwrap();
        assert_eq!(
            config.edgehub.controller.protocol,
            transport::Protocol::Quic
        );
        assert!(config.modules.metamanager.enable);
        assert!(config.modules.local_api.enable);
    }

    #[test]
    fn module_keys_are_checked_with_their_path() {
        let base = "edgehub:\n  controller: { node-id: e }\n";
        let e = EdgecoreConfig::parse(
            &format!("{base}modules:\n  metamanager: {{ enabled: true }}\n"),
            "f",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("modules.metamanager.enabled"));
        let e = EdgecoreConfig::parse(
            &format!("{base}modules:\n  local-api: {{ listen: '0.0.0.0:10550' }}\n"),
            "f",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("modules.local-api.listen"));
        assert!(e.to_string().contains("loopback"), "{e}");
        let e = EdgecoreConfig::parse(
            &format!("{base}modules:\n  edgehub: {{ enable: maybe }}\n"),
            "f",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("modules.edgehub.enable"));
    }
}
