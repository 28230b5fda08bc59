//! `modules.service-bus` in `edgecore.yaml`: whether servicebus runs, which local services the
//! cloud may call (none by default), and the bounds of each call.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Largest `max-response-bytes`: the reply (base64, in a message) must fit the transport's
/// 32 MiB message cap with room to spare.
pub const MAX_RESPONSE_BYTES_LIMIT: u64 = 16 * 1024 * 1024;

/// `modules.service-bus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceBusConfig {
    /// Whether it runs. Default false (KubeEdge's default too).
    #[serde(default)]
    pub enable: bool,
    /// The services the cloud may call, as `ip:port`; a request names only a port, so each port
    /// appears once. Default none: every call is refused (403) until a target is listed.
    /// Usually loopback (`127.0.0.1:8080`), as KubeEdge always calls `127.0.0.1:<port>`.
    #[serde(default, deserialize_with = "distinct_ports")]
    pub allowed_targets: Vec<SocketAddr>,
    /// Seconds a call may take, from connecting to the last byte of the answer; longer gets
    /// 504. Default 10 (KubeEdge's fixed client timeout).
    #[serde(default = "default_timeout")]
    pub timeout: NonZeroU64,
    /// Largest response body passed back; a larger one gets 502 `response_too_large`.
    /// Default 5242880 (5 MiB, KubeEdge's read limit); at most 16777216.
    #[serde(
        default = "default_max_response_bytes",
        deserialize_with = "response_limit"
    )]
    pub max_response_bytes: NonZeroU64,
    /// Calls in progress at once; one more gets 503 `busy` at once. Default 64.
    #[serde(default = "default_max_concurrent_calls")]
    pub max_concurrent_calls: NonZeroUsize,
}

impl Default for ServiceBusConfig {
    fn default() -> Self {
        Self {
            enable: false,
            allowed_targets: Vec::new(),
            timeout: default_timeout(),
            max_response_bytes: default_max_response_bytes(),
            max_concurrent_calls: default_max_concurrent_calls(),
        }
    }
}

impl ServiceBusConfig {
    /// [`Self::timeout`] as a duration.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.get())
    }

    /// The allowed target with this port, if any.
    pub fn target_for_port(&self, port: u16) -> Option<SocketAddr> {
        self.allowed_targets
            .iter()
            .copied()
            .find(|t| t.port() == port)
    }
}

fn default_timeout() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(9)
}

fn default_max_response_bytes() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(5 * 1024 * 1024 - 1)
}

fn default_max_concurrent_calls() -> NonZeroUsize {
    NonZeroUsize::MIN.saturating_add(63)
}

fn distinct_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let targets = Vec::<SocketAddr>::deserialize(d)?;
    let mut seen = HashSet::new();
    for t in &targets {
        if t.port() == 0 {
            return Err(serde::de::Error::custom(format!(
                "{t}: port 0 cannot be called"
            )));
        }
        if !seen.insert(t.port()) {
            return Err(serde::de::Error::custom(format!(
                "port {} is listed twice; a request names only the port, so each port may \
                 appear once",
                t.port()
            )));
        }
    }
    Ok(targets)
}

fn response_limit<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroU64, D::Error> {
    let n = NonZeroU64::deserialize(d)?;
    if n.get() > MAX_RESPONSE_BYTES_LIMIT {
        return Err(serde::de::Error::custom(format!(
            "{n} is over {MAX_RESPONSE_BYTES_LIMIT}: the reply must fit in one message"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ServiceBusConfig, String> {
        serde_json::from_str::<serde_json::Value>(yaml)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
    }

    #[test]
    fn defaults_deny_everything() {
        let c = ServiceBusConfig::default();
        assert!(!c.enable);
        assert!(c.allowed_targets.is_empty());
        assert_eq!(c.call_timeout(), Duration::from_secs(10));
        assert_eq!(c.max_response_bytes.get(), 5 * 1024 * 1024);
        assert_eq!(parse("{}").unwrap(), c);
    }

    #[test]
    fn targets_are_found_by_port_and_listed_once() {
        let c = parse(r#"{"allowed-targets": ["127.0.0.1:8080", "[::1]:9090"]}"#).unwrap();
        assert_eq!(c.target_for_port(9090), Some("[::1]:9090".parse().unwrap()));
        assert_eq!(c.target_for_port(1), None);
        let e = parse(r#"{"allowed-targets": ["127.0.0.1:8080", "10.0.0.1:8080"]}"#).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = parse(r#"{"allowed-targets": ["localhost:8080"]}"#).unwrap_err();
        assert!(e.contains("invalid socket address"), "{e}");
        let e = parse(r#"{"max-response-bytes": 99999999}"#).unwrap_err();
        assert!(e.contains("fit in one message"), "{e}");
        let e = parse(r#"{"timeout": 0}"#).unwrap_err();
        assert!(e.contains("nonzero") || e.contains("zero"), "{e}");
        assert!(parse(r#"{"allow": []}"#).is_err());
    }
}
