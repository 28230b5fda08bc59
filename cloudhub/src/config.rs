//! The cloud daemon's configuration: `cloudcore.yaml`, whose one section `cloudhub:` is typed
//! here with `deny_unknown_fields` and validated newtypes, so parsing is validation. Keys are
//! kebab-case; durations are integers in KubeEdge's units (seconds, except the certificate
//! lifetime in days and the token refresh period in hours, as KubeEdge's `cloudHub` section).
//!
//! Defaults follow KubeEdge's cloudcore (PROTOCOL.md B§8.1) where it has one, and assume a
//! cloud serving up to a few hundred nodes on WAN links (15 s edge heartbeats, RTT up to ~1 s).
//! [`DEFAULT_YAML`] is the complete commented default file (`cloudcore --defaultconfig`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};

pub use beehive::config::{ConfigError, Seconds, from_yaml, load_yaml};

use crate::hub::HubConfig;
use crate::store::jetstream::JetStreamConfig;
use crate::store::sqlite::{Durability, SqliteConfig};
use session::node::{Pace, SessionConfig};

/// The whole `cloudcore.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CloudcoreConfig {
    /// The hub: listeners, limits, certificates, queue.
    #[serde(default)]
    pub cloudhub: CloudHubConfig,
}

/// The `cloudhub:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CloudHubConfig {
    /// WebSocket listener for edges (TCP). Default enabled on `0.0.0.0:10000`.
    #[serde(
        default = "Endpoint::websocket",
        deserialize_with = "Endpoint::websocket_over_defaults"
    )]
    pub websocket: Endpoint,
    /// QUIC listener for edges (UDP). Default enabled on `0.0.0.0:10001` (KubeEdge: disabled;
    /// Causeway's QUIC is the better wire on lossy links).
    #[serde(
        default = "Endpoint::quic",
        deserialize_with = "Endpoint::quic_over_defaults"
    )]
    pub quic: Endpoint,
    /// Certificate bootstrap server (HTTPS). Default enabled on `0.0.0.0:10002`.
    #[serde(
        default = "Endpoint::https",
        deserialize_with = "Endpoint::https_over_defaults"
    )]
    pub https: Endpoint,
    /// Cloud API for applications. Default enabled on `127.0.0.1:10003`; off loopback it needs
    /// HTTPS and credentials (see `api-server`).
    #[serde(
        default = "Endpoint::api",
        deserialize_with = "Endpoint::api_over_defaults"
    )]
    pub api: Endpoint,
    /// How the cloud API protects itself: TLS and the API token file.
    #[serde(default)]
    pub api_server: ApiServerSection,
    /// Seconds a node may go without a keepalive before its session ends. Default 30
    /// (KubeEdge `keepaliveInterval`: two 15 s edge heartbeats).
    #[serde(default = "default_keepalive")]
    pub keepalive_interval: Seconds,
    /// Most connected nodes; further connections are refused and closed. Default 500.
    #[serde(default = "default_node_limit")]
    pub node_limit: NonZeroU32,
    /// Certificate files.
    #[serde(default)]
    pub tls: TlsFiles,
    /// Addresses edges dial: the server certificate's IP SANs. Default `[127.0.0.1]`; set the
    /// cloud's reachable addresses in production (KubeEdge `advertiseAddress`).
    #[serde(default = "default_advertise")]
    pub advertise_address: Vec<IpAddr>,
    /// DNS names edges dial: the server certificate's DNS SANs. Default `[localhost]`.
    #[serde(default = "default_dns_names")]
    pub dns_names: Vec<String>,
    /// Validity of node certificates signed by the bootstrap server, in days. Default 365.
    #[serde(default = "default_cert_days")]
    pub edge_cert_signing_duration: NonZeroU32,
    /// Bootstrap token refresh period in hours; tokens are valid twice as long. Default 12
    /// (tokens valid 24 h), KubeEdge's.
    #[serde(default = "default_token_hours")]
    pub token_refresh_duration: NonZeroU32,
    /// The durable message store.
    #[serde(default)]
    pub queue: QueueSection,
    /// Downstream delivery pacing.
    #[serde(default)]
    pub delivery: DeliverySection,
    /// Transport timeouts towards edges.
    #[serde(default)]
    pub link: LinkSection,
}

impl Default for CloudHubConfig {
    fn default() -> Self {
        Self {
            websocket: Endpoint::websocket(),
            quic: Endpoint::quic(),
            https: Endpoint::https(),
            api: Endpoint::api(),
            api_server: ApiServerSection::default(),
            keepalive_interval: default_keepalive(),
            node_limit: default_node_limit(),
            tls: TlsFiles::default(),
            advertise_address: default_advertise(),
            dns_names: default_dns_names(),
            edge_cert_signing_duration: default_cert_days(),
            token_refresh_duration: default_token_hours(),
            queue: QueueSection::default(),
            delivery: DeliverySection::default(),
            link: LinkSection::default(),
        }
    }
}

/// One listening endpoint. In a file every key is optional: what is absent keeps that
/// endpoint's default, so `quic: { enable: false }` needs nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Endpoint {
    /// Whether to serve it.
    pub enable: bool,
    /// Address to bind.
    pub address: IpAddr,
    /// Port to bind (0: any free port, for tests).
    pub port: u16,
}

impl Endpoint {
    fn new(address: IpAddr, port: u16) -> Self {
        Self {
            enable: true,
            address,
            port,
        }
    }

    fn websocket() -> Self {
        Self::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10000)
    }

    fn quic() -> Self {
        Self::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10001)
    }

    fn https() -> Self {
        Self::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10002)
    }

    fn api() -> Self {
        Self::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10003)
    }

    /// The socket address to bind.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The keys given in the file over `defaults`.
    fn over<'de, D: Deserializer<'de>>(defaults: Self, d: D) -> Result<Self, D::Error> {
        let given = EndpointKeys::deserialize(d)?;
        Ok(Self {
            enable: given.enable.unwrap_or(defaults.enable),
            address: given.address.unwrap_or(defaults.address),
            port: given.port.unwrap_or(defaults.port),
        })
    }

    fn websocket_over_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(Self::websocket(), d)
    }

    fn quic_over_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(Self::quic(), d)
    }

    fn https_over_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(Self::https(), d)
    }

    fn api_over_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(Self::api(), d)
    }
}

/// An [`Endpoint`] as written in a file: any key may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct EndpointKeys {
    enable: Option<bool>,
    address: Option<IpAddr>,
    port: Option<u16>,
}

/// `cloudhub.api-server`: how the cloud API protects itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiServerSection {
    /// HTTPS with the cloud's server certificate: `auto` (default: when `api.address` is not
    /// loopback), `always`, or `never` (refused off loopback).
    #[serde(default)]
    pub tls: ApiTls,
    /// The API token file (SQLite, hashed tokens). Default `<cert-dir>/api-tokens.db`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Most connections held open (SSE streams included); more wait in the kernel's accept
    /// queue. Default 1024.
    #[serde(default = "default_api_connections")]
    pub max_connections: NonZeroU32,
    /// Most requests handled at once (SSE streams and ACK waits not counted). Default 64.
    #[serde(default = "default_api_requests")]
    pub max_concurrent_requests: NonZeroU32,
    /// Seconds a request waits for its turn before 503 `overloaded` with Retry-After.
    /// Default 5.
    #[serde(default = "default_request_wait")]
    pub request_wait: Seconds,
}

impl Default for ApiServerSection {
    fn default() -> Self {
        Self {
            tls: ApiTls::default(),
            token_file: None,
            max_connections: default_api_connections(),
            max_concurrent_requests: default_api_requests(),
            request_wait: default_request_wait(),
        }
    }
}

fn default_api_connections() -> NonZeroU32 {
    nz32(1024)
}
fn default_api_requests() -> NonZeroU32 {
    nz32(64)
}
fn default_request_wait() -> Seconds {
    Seconds::at_least_one(5)
}

/// `cloudhub.api-server.tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ApiTls {
    /// HTTPS when the API does not listen on loopback, plain HTTP on loopback.
    #[default]
    Auto,
    /// Always HTTPS.
    Always,
    /// Never HTTPS: only allowed on loopback.
    Never,
}

/// `cloudhub.tls`: where the CA and the server certificate live. Files missing at start are
/// created (a new CA, and a server certificate for `advertise-address` and `dns-names`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsFiles {
    /// Directory in `causeway certs init`'s layout (`ca.crt`, `ca.key`, `server.crt`,
    /// `server.key`). Default `/etc/causeway/pki`.
    #[serde(default = "default_cert_dir")]
    pub cert_dir: PathBuf,
    /// Overrides `<cert-dir>/ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Overrides `<cert-dir>/ca.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key_file: Option<PathBuf>,
    /// Overrides `<cert-dir>/server.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Overrides `<cert-dir>/server.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            cert_dir: default_cert_dir(),
            ca_file: None,
            ca_key_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl TlsFiles {
    fn pick(&self, over: Option<&PathBuf>, name: &str) -> PathBuf {
        over.cloned().unwrap_or_else(|| self.cert_dir.join(name))
    }

    /// The CA certificate file.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.pick(self.ca_file.as_ref(), "ca.crt")
    }

    /// The CA key file.
    pub fn ca_key_path(&self) -> PathBuf {
        self.pick(self.ca_key_file.as_ref(), "ca.key")
    }

    /// The server certificate file.
    pub fn server_cert_path(&self) -> PathBuf {
        self.pick(self.cert_file.as_ref(), "server.crt")
    }

    /// The server key file.
    pub fn server_key_path(&self) -> PathBuf {
        self.pick(self.key_file.as_ref(), "server.key")
    }
}

/// `cloudhub.queue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueueSection {
    /// SQLite database file. Default `/var/lib/causeway/cloudcore.db`.
    #[serde(default = "default_queue_path")]
    pub path: PathBuf,
    /// Most open messages per node; beyond it the API answers 503. Default 10000.
    #[serde(default = "default_queue_limit")]
    pub limit_per_node: NonZeroU64,
    /// Upstream messages kept per node (deduplication window, SSE replay). Default 10000.
    #[serde(default = "default_queue_limit")]
    pub upstream_window: NonZeroU64,
    /// `full` (survives power loss; default) or `normal` (survives crashes, faster).
    #[serde(default)]
    pub durability: Durability,
    /// Where the queues, the upstream log and node records live: `sqlite` (this instance's
    /// file at `path`; default) or `jetstream` (shared by every cloudcore on the same JetStream,
    /// settings in `jetstream`; docs/scale-out.md).
    #[serde(default)]
    pub store: StoreKind,
    /// The JetStream server and names, for `store: jetstream`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamSection>,
}

/// `cloudhub.queue.store`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// The embedded SQLite file (one cloudcore).
    #[default]
    Sqlite,
    /// NATS JetStream (several cloudcores sharing a fleet).
    Jetstream,
}

/// `cloudhub.queue.jetstream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JetStreamSection {
    /// NATS server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`. Required.
    pub url: String,
    /// Prefix of the buckets, stream and subjects: one per fleet. Default `causeway`.
    #[serde(default = "default_jetstream_prefix")]
    pub prefix: String,
    /// Copies JetStream keeps of each write: 1 on one server, 3 on a cluster. Default 1.
    #[serde(default = "default_replicas")]
    pub replicas: NonZeroU32,
}

impl Default for QueueSection {
    fn default() -> Self {
        Self {
            path: default_queue_path(),
            limit_per_node: default_queue_limit(),
            upstream_window: default_queue_limit(),
            durability: Durability::default(),
            store: StoreKind::default(),
            jetstream: None,
        }
    }
}

/// `cloudhub.delivery`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeliverySection {
    /// Most unacknowledged messages in flight per node. Default 64 (KubeEdge: 1).
    #[serde(default = "default_window")]
    pub window: NonZeroU32,
    /// Seconds before the first resend of an unacknowledged message. Default 5 (KubeEdge's).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Seconds,
    /// Cap of the doubling resend interval, in seconds. Default 60.
    #[serde(default = "default_max_ack_timeout")]
    pub max_ack_timeout: Seconds,
    /// Messages per second that need no ACK, per node, toward an edge that did not negotiate
    /// `upstream-ack` (a stock KubeEdge edge, which silently drops what overflows its receive
    /// queue); 0 does not pace them. Causeway edges are never paced. Default 100.
    #[serde(default = "default_no_ack_rate")]
    pub no_ack_rate: u32,
    /// Burst of those messages after a quiet spell. Default 32 (with the window of 64, under
    /// the stock edge's 100-entry queue).
    #[serde(default = "default_no_ack_burst")]
    pub no_ack_burst: NonZeroU32,
}

impl Default for DeliverySection {
    fn default() -> Self {
        Self {
            window: default_window(),
            ack_timeout: default_ack_timeout(),
            max_ack_timeout: default_max_ack_timeout(),
            no_ack_rate: default_no_ack_rate(),
            no_ack_burst: default_no_ack_burst(),
        }
    }
}

/// `cloudhub.link`: the transport's timeouts, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LinkSection {
    /// TLS plus protocol handshake. Default 30.
    #[serde(default = "default_handshake")]
    pub handshake_timeout: Seconds,
    /// Silence after which a link is presumed dead. Default 15.
    #[serde(default = "default_deadline")]
    pub read_deadline: Seconds,
    /// A write making no progress this long fails. Default 15.
    #[serde(default = "default_deadline")]
    pub write_deadline: Seconds,
}

impl Default for LinkSection {
    fn default() -> Self {
        Self {
            handshake_timeout: default_handshake(),
            read_deadline: default_deadline(),
            write_deadline: default_deadline(),
        }
    }
}

fn nz32(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn default_keepalive() -> Seconds {
    Seconds::at_least_one(30)
}
fn default_node_limit() -> NonZeroU32 {
    nz32(500)
}
fn default_advertise() -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
}
fn default_dns_names() -> Vec<String> {
    vec!["localhost".to_owned()]
}
fn default_cert_days() -> NonZeroU32 {
    nz32(365)
}
fn default_token_hours() -> NonZeroU32 {
    nz32(12)
}
fn default_cert_dir() -> PathBuf {
    PathBuf::from("/etc/causeway/pki")
}
fn default_queue_path() -> PathBuf {
    PathBuf::from("/var/lib/causeway/cloudcore.db")
}
fn default_jetstream_prefix() -> String {
    "causeway".into()
}
fn default_replicas() -> NonZeroU32 {
    nz32(1)
}
fn default_queue_limit() -> NonZeroU64 {
    NonZeroU64::new(10_000).unwrap_or(NonZeroU64::MIN)
}
fn default_window() -> NonZeroU32 {
    nz32(64)
}
fn default_ack_timeout() -> Seconds {
    Seconds::at_least_one(5)
}
fn default_max_ack_timeout() -> Seconds {
    Seconds::at_least_one(60)
}
fn default_no_ack_rate() -> u32 {
    100
}
fn default_no_ack_burst() -> NonZeroU32 {
    nz32(32)
}
fn default_handshake() -> Seconds {
    Seconds::at_least_one(30)
}
fn default_deadline() -> Seconds {
    Seconds::at_least_one(15)
}

impl CloudHubConfig {
    /// The session manager's settings.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            node_limit: usize::try_from(self.node_limit.get()).unwrap_or(usize::MAX),
            session: SessionConfig {
                keepalive_interval: self.keepalive_interval.duration(),
                window: usize::try_from(self.delivery.window.get()).unwrap_or(usize::MAX),
                ack_timeout: self.delivery.ack_timeout.duration(),
                max_ack_timeout: self
                    .delivery
                    .max_ack_timeout
                    .duration()
                    .max(self.delivery.ack_timeout.duration()),
                no_ack_pace: (self.delivery.no_ack_rate > 0).then(|| Pace {
                    per_second: f64::from(self.delivery.no_ack_rate),
                    burst: self.delivery.no_ack_burst.get(),
                }),
                ..SessionConfig::default()
            },
            ..HubConfig::default()
        }
    }

    /// The store's settings.
    pub fn store_config(&self) -> SqliteConfig {
        SqliteConfig {
            queue_limit: self.queue.limit_per_node.get(),
            upstream_window: self.queue.upstream_window.get(),
            durability: self.queue.durability,
            ..SqliteConfig::new(&self.queue.path)
        }
    }

    /// The JetStream store's settings with `store: jetstream` (`None` with `store: sqlite`);
    /// an error if the `jetstream` section with its `url` is missing.
    pub fn jetstream_config(&self) -> Result<Option<JetStreamConfig>, ConfigError> {
        if self.queue.store == StoreKind::Sqlite {
            return Ok(None);
        }
        let section = self.queue.jetstream.as_ref().ok_or_else(|| {
            ConfigError::Inconsistent(
                "cloudhub.queue.store is jetstream but cloudhub.queue.jetstream (url) is missing"
                    .into(),
            )
        })?;
        Ok(Some(JetStreamConfig {
            prefix: section.prefix.clone(),
            replicas: usize::try_from(section.replicas.get()).unwrap_or(1),
            queue_limit: self.queue.limit_per_node.get(),
            upstream_window: self.queue.upstream_window.get(),
            ..JetStreamConfig::new(section.url.as_str())
        }))
    }

    /// The transport's link settings.
    pub fn link_config(&self) -> transport::config::LinkConfig {
        let read_deadline = self.link.read_deadline.duration();
        transport::config::LinkConfig {
            handshake_timeout: self.link.handshake_timeout.duration(),
            read_deadline,
            write_deadline: self.link.write_deadline.duration(),
            keep_alive_interval: read_deadline / 3,
            ..transport::config::LinkConfig::default()
        }
    }

    /// Whether the API listens beyond loopback: then credentials and HTTPS are always required.
    pub fn api_is_exposed(&self) -> bool {
        !self.api.address.is_loopback()
    }

    /// Whether the API is served over HTTPS; an error if `api-server.tls: never` is asked for
    /// an API that listens beyond loopback (credentials would cross the network in clear).
    pub fn api_uses_tls(&self) -> Result<bool, ConfigError> {
        match self.api_server.tls {
            ApiTls::Always => Ok(true),
            ApiTls::Auto => Ok(self.api_is_exposed()),
            ApiTls::Never if self.api_is_exposed() => Err(ConfigError::Inconsistent(format!(
                "cloudhub.api.address {} is not loopback but cloudhub.api-server.tls is never: \
                 the API would carry credentials in clear; set tls: auto or bind to 127.0.0.1",
                self.api.address
            ))),
            ApiTls::Never => Ok(false),
        }
    }

    /// The API's serving options (without the token file, which the daemon opens).
    pub fn api_options(&self) -> crate::api::ApiOptions {
        let n = |v: NonZeroU32| usize::try_from(v.get()).unwrap_or(usize::MAX);
        crate::api::ApiOptions {
            require_credentials: self.api_is_exposed(),
            max_connections: n(self.api_server.max_connections),
            max_concurrent_requests: n(self.api_server.max_concurrent_requests),
            request_wait: self.api_server.request_wait.duration(),
            ..crate::api::ApiOptions::default()
        }
    }

    /// The object store's file: `objects.db` beside the message store (`queue.path`).
    pub fn objects_path(&self) -> PathBuf {
        self.queue.path.with_file_name("objects.db")
    }

    /// edgecontroller's ObjectSync rows: `objectsync.db` beside the message store.
    pub fn object_sync_path(&self) -> PathBuf {
        self.queue.path.with_file_name("objectsync.db")
    }

    /// The API token file.
    pub fn api_token_path(&self) -> PathBuf {
        self.api_server
            .token_file
            .clone()
            .unwrap_or_else(|| crate::auth::TokenStore::default_path(&self.tls.cert_dir))
    }

    /// How long bootstrap tokens should live: twice the refresh period.
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.token_refresh_duration.get()) * 2 * 3600)
    }
}

impl CloudcoreConfig {
    /// Reads and parses a `cloudcore.yaml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_yaml(path)
    }
}

/// The complete default `cloudcore.yaml`, commented: what `cloudcore --defaultconfig` prints.
/// It parses to [`CloudcoreConfig::default`] (tested).
pub const DEFAULT_YAML: &str = r#"# cloudcore configuration (Causeway). Every key is optional; these are the defaults.
# Durations are integers: seconds, except where a key says days or hours (as KubeEdge's).
cloudhub:
  # Edges connect over WebSocket (KubeEdge's wire, TCP) and/or QUIC (UDP); both use mutual TLS.
  websocket: { enable: true, address: 0.0.0.0, port: 10000 }
  quic: { enable: true, address: 0.0.0.0, port: 10001 }
  # Certificate bootstrap for edges (KubeEdge-compatible /ca.crt and /edge.crt over HTTPS).
  https: { enable: true, address: 0.0.0.0, port: 10002 }
  # Cloud API for applications (HTTP/JSON). Off loopback it is HTTPS and needs credentials.
  api: { enable: true, address: 127.0.0.1, port: 10003 }
  api-server:
    # HTTPS with the server certificate: auto (when api.address is not loopback), always, or
    # never (refused off loopback).
    tls: auto
    # API tokens (`causeway api-token create`) live hashed in <cert-dir>/api-tokens.db unless
    # token-file names another file. Once a token exists, every endpoint but /healthz and
    # /v1/openapi.json needs one.
    # Flood bounds: open connections (more wait in the kernel's accept queue), requests
    # handled at once (event streams and ACK waits not counted), and the seconds a request
    # waits for its turn before 503 overloaded with Retry-After.
    max-connections: 1024
    max-concurrent-requests: 64
    request-wait: 5
  # A node silent (no keepalive) this many seconds is disconnected: two 15 s edge heartbeats.
  keepalive-interval: 30
  # Most connected nodes; more are refused and closed.
  node-limit: 500
  tls:
    # `causeway certs init` layout: ca.crt, ca.key, server.crt, server.key. Files missing at
    # start are created. ca-file, ca-key-file, cert-file and key-file override single paths.
    cert-dir: /etc/causeway/pki
  # Addresses and names edges dial: the server certificate's SANs (used when it is created).
  advertise-address: [127.0.0.1]
  dns-names: [localhost]
  # Validity of node certificates signed by the bootstrap server, in days.
  edge-cert-signing-duration: 365
  # Bootstrap token refresh period in hours; a token is valid twice this long.
  token-refresh-duration: 12
  queue:
    # SQLite file holding per-node queues and the upstream log; nothing accepted is lost on
    # restart.
    path: /var/lib/causeway/cloudcore.db
    # Most open messages per node; beyond this the API answers 503 (never a silent drop).
    limit-per-node: 10000
    # Upstream messages remembered per node (deduplication window and SSE replay).
    upstream-window: 10000
    # full: survives power loss. normal: survives crashes only, faster on slow disks.
    durability: full
    # sqlite: the file above, one cloudcore. jetstream: NATS JetStream shared by several
    # cloudcores, with a section `jetstream: { url: nats://HOST:4222, prefix: causeway,
    # replicas: 1 }`; its server needs `jetstream { sync_interval: always }` (docs/scale-out.md).
    store: sqlite
  delivery:
    # Unacknowledged messages in flight per node (KubeEdge: 1).
    window: 64
    # Seconds before the first resend of an unacknowledged message; doubles up to the cap.
    ack-timeout: 5
    max-ack-timeout: 60
  link:
    # TLS and protocol handshake bound, read deadline (dead-link detection), write deadline.
    handshake-timeout: 30
    read-deadline: 15
    write-deadline: 15
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jetstream_store_needs_its_url() {
        let yaml = "cloudhub:\n  queue:\n    store: jetstream\n";
        let config = from_yaml::<CloudcoreConfig>(yaml, "x").expect("parses");
        let err = config.cloudhub.jetstream_config().expect_err("no url");
        assert!(
            err.to_string().contains("cloudhub.queue.jetstream"),
            "{err}"
        );
        let yaml = "cloudhub:\n  queue:\n    store: jetstream\n    jetstream:\n      url: nats://127.0.0.1:4222\n      replicas: 3\n";
        let config = from_yaml::<CloudcoreConfig>(yaml, "x").expect("parses");
        let js = config
            .cloudhub
            .jetstream_config()
            .expect("valid")
            .expect("jetstream");
        assert_eq!(
            (js.url.as_str(), js.prefix.as_str(), js.replicas),
            ("nats://127.0.0.1:4222", "causeway", 3)
        );
        assert!(
            CloudcoreConfig::default()
                .cloudhub
                .jetstream_config()
                .expect("valid")
                .is_none()
        );
    }

    #[test]
    fn default_yaml_parses_to_the_defaults() {
        let parsed: CloudcoreConfig = from_yaml(DEFAULT_YAML, "default").expect("parses");
        assert_eq!(parsed, CloudcoreConfig::default());
    }

    #[test]
    fn a_disabled_or_partial_endpoint_keeps_its_defaults() {
        let parsed: CloudcoreConfig = from_yaml(
            "cloudhub:\n  quic: { enable: false }\n  api: { port: 9999 }\n",
            "x",
        )
        .expect("parses");
        let defaults = CloudHubConfig::default();
        assert_eq!(
            parsed.cloudhub.quic,
            Endpoint {
                enable: false,
                ..defaults.quic.clone()
            }
        );
        assert_eq!(
            parsed.cloudhub.api,
            Endpoint {
                port: 9999,
                ..defaults.api.clone()
            }
        );
        assert_eq!(parsed.cloudhub.websocket, defaults.websocket);
        let err = from_yaml::<CloudcoreConfig>("cloudhub:\n  quic: { bogus: 1 }\n", "x")
            .expect_err("unknown key");
        assert!(err.to_string().contains("cloudhub.quic"), "{err}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let parsed: CloudcoreConfig = from_yaml("cloudhub: {}\n", "x").expect("parses");
        assert_eq!(parsed, CloudcoreConfig::default());
        assert_eq!(
            parsed.cloudhub.api.socket_addr().to_string(),
            "127.0.0.1:10003"
        );
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cloudcore.example.yaml");
        let config = CloudcoreConfig::load(&path).expect("example loads");
        assert!(config.cloudhub.websocket.enable);
    }

    #[test]
    fn errors_name_the_key() {
        let err = from_yaml::<CloudcoreConfig>("cloudhub:\n  node-limit: 0\n", "f.yaml")
            .expect_err("zero");
        let ConfigError::Invalid { key, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(key, "cloudhub.node-limit");
        let err = from_yaml::<CloudcoreConfig>("cloudhub:\n  nodelimit: 5\n", "f.yaml")
            .expect_err("unknown key");
        assert!(err.to_string().contains("nodelimit"), "{err}");
        let err = from_yaml::<CloudcoreConfig>("cloudhub:\n  keepalive-interval: 0\n", "f.yaml")
            .expect_err("zero seconds");
        assert!(err.to_string().contains("keepalive-interval"), "{err}");
    }

    #[test]
    fn derived_settings_follow_the_file() {
        let yaml = "cloudhub:\n  delivery: { window: 8, ack-timeout: 2, max-ack-timeout: 1 }\n  \
                    queue: { path: /tmp/q.db, limit-per-node: 3, durability: normal }\n";
        let config: CloudcoreConfig = from_yaml(yaml, "x").expect("parses");
        let hub = config.cloudhub.hub_config();
        assert_eq!(hub.session.window, 8);
        assert_eq!(hub.session.ack_timeout, Duration::from_secs(2));
        assert_eq!(
            hub.session.max_ack_timeout,
            Duration::from_secs(2),
            "cap ≥ first wait"
        );
        let store = config.cloudhub.store_config();
        assert_eq!(store.queue_limit, 3);
        assert_eq!(store.durability, Durability::Normal);
        assert_eq!(config.cloudhub.token_ttl(), Duration::from_secs(24 * 3600));
    }
}
