//! Device and node MQTT topics as eventbus hands them over (MODULES.md §3.2, §5.2): the topic is
//! the message resource, base64url with padding; it is parsed by segment index, never by
//! substring search (KubeEdge's M18: a namespace named like a path word mis-parsed).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;

/// Prefix of device topics.
pub const DEVICE_PREFIX: &str = "$hw/events/device/";
/// Prefix of node topics.
pub const NODE_PREFIX: &str = "$hw/events/node/";

/// What a device or node topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `$hw/events/device/<ns>/<name>/<action>`.
    Device {
        /// The device id, `<ns>/<name>`.
        id: String,
        /// What is asked.
        action: DeviceAction,
    },
    /// `$hw/events/node/<node>/<action>`.
    Node {
        /// The node named in the topic.
        node: String,
        /// What is asked.
        action: NodeAction,
    },
}

/// The device topics devicetwin answers, and the rest by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// `twin/update`: an application or mapper reports or sets twins.
    TwinUpdate,
    /// `twin/get`: the device's twins, answered on `twin/get/result`.
    TwinGet,
    /// `state/update`: the device's state (online, offline, ...).
    StateUpdate,
    /// Any other suffix (`twin/cloud_updated`, `state/get`, `updated`, ...): not handled.
    Other(String),
}

/// The node topics devicetwin answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAction {
    /// `membership/get`: the node's devices, answered on `membership/get/result`.
    MembershipGet,
    /// Any other suffix.
    Other(String),
}

/// Why a resource is not a device or node topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The resource is not base64url of UTF-8 text.
    #[error("resource {0:?} is not a base64url-encoded topic")]
    NotBase64(String),
    /// The topic is neither a device nor a node topic, or lacks segments.
    #[error("topic {0:?} is not $hw/events/device/<ns>/<name>/... or $hw/events/node/<node>/...")]
    Shape(String),
}

/// base64url (with padding) of a topic: the resource eventbus gives it.
pub fn encode(topic: &str) -> String {
    URL_SAFE.encode(topic)
}

/// The topic in a resource eventbus made (base64url; padding optional).
pub fn decode(resource: &str) -> Result<String, TopicError> {
    let trimmed = resource.trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| TopicError::NotBase64(resource.to_owned()))
}

/// Parses a topic by segment.
pub fn parse(topic: &str) -> Result<Topic, TopicError> {
    let shape = || TopicError::Shape(topic.to_owned());
    if let Some(rest) = topic.strip_prefix(DEVICE_PREFIX) {
        let mut parts = rest.splitn(3, '/');
        let (ns, name, action) = (parts.next(), parts.next(), parts.next());
        let (Some(ns), Some(name), Some(action)) = (ns, name, action) else {
            return Err(shape());
        };
        if ns.is_empty() || name.is_empty() {
            return Err(shape());
        }
        let action = match action {
            "twin/update" => DeviceAction::TwinUpdate,
            "twin/get" => DeviceAction::TwinGet,
            "state/update" => DeviceAction::StateUpdate,
            other => DeviceAction::Other(other.to_owned()),
        };
        return Ok(Topic::Device {
            id: format!("{ns}/{name}"),
            action,
        });
    }
    if let Some(rest) = topic.strip_prefix(NODE_PREFIX) {
        let (node, action) = rest.split_once('/').ok_or_else(shape)?;
        if node.is_empty() {
            return Err(shape());
        }
        let action = match action {
            "membership/get" => NodeAction::MembershipGet,
            other => NodeAction::Other(other.to_owned()),
        };
        return Ok(Topic::Node {
            node: node.to_owned(),
            action,
        });
    }
    Err(shape())
}

/// `$hw/events/device/<id>/<suffix>`.
pub fn device_topic(id: &str, suffix: &str) -> String {
    format!("{DEVICE_PREFIX}{id}/{suffix}")
}

/// `$hw/events/node/<node>/<suffix>`.
pub fn node_topic(node: &str, suffix: &str) -> String {
    format!("{NODE_PREFIX}{node}/{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_by_segment() {
        assert_eq!(
            parse("$hw/events/device/default/thermo-1/twin/update"),
            Ok(Topic::Device {
                id: "default/thermo-1".into(),
                action: DeviceAction::TwinUpdate
            })
        );
        // A namespace and name equal to path words (M18) parse the same way.
        assert_eq!(
            parse("$hw/events/device/events/device/state/update"),
            Ok(Topic::Device {
                id: "events/device".into(),
                action: DeviceAction::StateUpdate
            })
        );
        assert_eq!(
            parse("$hw/events/device/ns/d/twin/cloud_updated"),
            Ok(Topic::Device {
                id: "ns/d".into(),
                action: DeviceAction::Other("twin/cloud_updated".into())
            })
        );
        assert_eq!(
            parse("$hw/events/node/edge-1/membership/get"),
            Ok(Topic::Node {
                node: "edge-1".into(),
                action: NodeAction::MembershipGet
            })
        );
        for bad in [
            "$hw/events/device/ns/d",
            "$hw/events/device//d/twin/get",
            "$hw/events/node/",
            "other/topic",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_are_base64url_with_or_without_padding() {
        let t = "$hw/events/device/default/thermo-1/twin/get";
        let r = encode(t);
        assert!(r.ends_with('=') || r.len() % 4 == 0);
        assert_eq!(decode(&r).unwrap(), t);
        assert_eq!(decode(r.trim_end_matches('=')).unwrap(), t);
        assert!(matches!(
            decode("not base64!"),
            Err(TopicError::NotBase64(_))
        ));
    }
}
