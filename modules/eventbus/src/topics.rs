//! What eventbus does with each MQTT publication and each bus message (MODULES.md §3.2–§3.4),
//! without I/O: the fixed subscriptions, the dispatch by topic, and the cloud's operations.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use proto::{Content, Message};
use session::edge::route::{GROUP_USER, SOURCE_ROUTER_EVENTBUS};

/// Source of every message eventbus sends (KubeEdge's `bus`).
pub const SOURCE_BUS: &str = "bus";
/// Operation of a device/node publication handed to devicetwin.
pub const OP_RESPONSE: &str = "response";
/// Operation of a publication sent to the cloud.
pub const OP_UPLOAD: &str = "upload";

/// The topics KubeEdge's eventbus always subscribes (MODULES.md §3.2).
pub const FIXED_TOPICS: [&str; 6] = [
    "$hw/events/upload/#",
    "$hw/events/device/+/+/state/update",
    "$hw/events/device/+/+/twin/+",
    "$hw/events/node/+/membership/get",
    "SYS/dis/upload_records",
    "+/user/#",
];

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Group `twin` (devicetwin): device and node topics.
    Twin,
    /// The cloud, through EdgeHub's outbox.
    Cloud,
}

/// The destination of a publication on `topic`.
pub fn destination(topic: &str) -> Destination {
    if topic.starts_with("$hw/events/device/") || topic.starts_with("$hw/events/node/") {
        Destination::Twin
    } else {
        Destination::Cloud
    }
}

/// KubeEdge's content for a payload: a string when it is UTF-8, bytes otherwise.
fn payload_content(payload: &[u8]) -> Content {
    match std::str::from_utf8(payload) {
        Ok(s) => Content::text(s),
        Err(_) => Content::Bytes(bytes::Bytes::copy_from_slice(payload)),
    }
}

/// The bus message for a publication on `topic`: to devicetwin (op `response`, resource the
/// padded base64url of the topic) or to the cloud (op `upload`, resource the topic).
pub fn inbound(topic: &str, payload: &[u8], id: String, now_ms: i64) -> (Destination, Message) {
    let dest = destination(topic);
    let (resource, op) = match dest {
        Destination::Twin => (URL_SAFE.encode(topic), OP_RESPONSE),
        Destination::Cloud => (topic.to_owned(), OP_UPLOAD),
    };
    let msg = Message::with_header(id, "", now_ms)
        .route(SOURCE_BUS, GROUP_USER, resource, op)
        .content(payload_content(payload));
    (dest, msg)
}

/// What a bus message asks of eventbus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Publish `payload` on `topic`.
    Publish {
        /// The MQTT topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
    },
    /// Subscribe `topic` and remember it.
    Subscribe(String),
    /// Unsubscribe `topic` and forget it.
    Unsubscribe(String),
}

/// Why a bus message is not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not a message for eventbus (a connection event, a response, another source).
    #[error("not an eventbus request")]
    NotForUs,
    /// A request eventbus cannot carry out, with why.
    #[error("{0}")]
    Invalid(String),
}

/// The topic on which `get_result` answers go.
pub fn auth_info_topic(node_id: &str) -> String {
    format!("$hw/events/node/{node_id}/authInfo/get/result")
}

/// Reads a bus message: the cloud's `router_eventbus` operations (§3.3) and devicetwin's
/// publishes (§3.4, any source but the cloud's router, op `publish`).
pub fn command(msg: &Message, node_id: &str) -> Result<Command, CommandError> {
    let route = &msg.route;
    let from_cloud = route.source == SOURCE_ROUTER_EVENTBUS;
    if msg.is_response() || (from_cloud && route.group != GROUP_USER) {
        return Err(CommandError::NotForUs);
    }
    let topic = || -> Result<String, CommandError> {
        // The cloud's router may leave `node/<id>/` in front of the topic.
        let t = route.resource.as_str();
        let t = t
            .strip_prefix("node/")
            .and_then(|rest| rest.strip_prefix(node_id))
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(t);
        check_topic(t)?;
        Ok(t.to_owned())
    };
    match route.operation.as_str() {
        "publish" => Ok(Command::Publish {
            topic: topic()?,
            payload: msg.content.to_bytes().into_owned(),
        }),
        "subscribe" if from_cloud => Ok(Command::Subscribe(topic()?)),
        "unsubscribe" if from_cloud => Ok(Command::Unsubscribe(topic()?)),
        "message" if from_cloud => {
            let body: serde_json::Value = match &msg.content {
                Content::Json(serde_json::Value::String(s)) => serde_json::from_str(s),
                Content::Json(v) => Ok(v.clone()),
                Content::Bytes(b) => serde_json::from_slice(b),
            }
            .map_err(|e| CommandError::Invalid(format!("message content is not JSON: {e}")))?;
            let inner = body.get("message").ok_or_else(|| {
                CommandError::Invalid("message content has no \"message\"".into())
            })?;
            let t = inner
                .get("topic")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| CommandError::Invalid("message has no string \"topic\"".into()))?;
            check_topic(t)?;
            Ok(Command::Publish {
                topic: t.to_owned(),
                payload: proto::json::value_to_vec(inner),
            })
        }
        "get_result" if from_cloud => Ok(Command::Publish {
            topic: auth_info_topic(node_id),
            payload: msg.content.to_bytes().into_owned(),
        }),
        op if from_cloud => Err(CommandError::Invalid(format!(
            "operation {op:?} is not one of publish, subscribe, unsubscribe, message, get_result"
        ))),
        _ => Err(CommandError::NotForUs),
    }
}

/// A topic eventbus may publish or subscribe: non-empty, at most 65535 bytes, no NUL.
fn check_topic(t: &str) -> Result<(), CommandError> {
    if t.is_empty() || t.len() > 65535 || t.contains('\0') {
        return Err(CommandError::Invalid(format!("{t:?} is not an MQTT topic")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_node_topics_go_to_twin_as_base64url_with_padding() {
        let (d, m) = inbound(
            "$hw/events/device/default/t1/twin/update",
            b"{}",
            "i".into(),
            1,
        );
        assert_eq!(d, Destination::Twin);
        assert_eq!(m.route.operation, "response");
        assert_eq!(m.route.source, "bus");
        assert_eq!(m.route.group, "user");
        let decoded = URL_SAFE.decode(&m.route.resource).unwrap();
        assert_eq!(decoded, b"$hw/events/device/default/t1/twin/update");
        assert_eq!(m.content, Content::text("{}"));
        // Padding kept: a 17-byte topic encodes to 24 characters ending in '='.
        let (_, m) = inbound("$hw/events/node/a", b"", "i".into(), 1);
        assert_eq!(m.route.resource, "JGh3L2V2ZW50cy9ub2RlL2E=");
    }

    #[test]
    fn other_topics_go_to_the_cloud_verbatim_and_bytes_stay_bytes() {
        let (d, m) = inbound("default/user/a", &[0xff, 0x00], "i".into(), 1);
        assert_eq!(d, Destination::Cloud);
        assert_eq!(m.route.operation, "upload");
        assert_eq!(m.route.resource, "default/user/a");
        assert_eq!(
            m.content,
            Content::Bytes(bytes::Bytes::from_static(&[0xff, 0x00]))
        );
    }

    fn cloud(op: &str, resource: &str, content: Content) -> Message {
        Message::with_header("c", "", 1)
            .route("router_eventbus", "user", resource, op)
            .content(content)
    }

    #[test]
    fn cloud_operations() {
        let c = command(
            &cloud("publish", "node/n1/default/t", Content::text("hi")),
            "n1",
        );
        assert_eq!(
            c,
            Ok(Command::Publish {
                topic: "default/t".into(),
                payload: b"hi".to_vec()
            })
        );
        assert_eq!(
            command(&cloud("subscribe", "default/x", Content::default()), "n1"),
            Ok(Command::Subscribe("default/x".into()))
        );
        assert_eq!(
            command(&cloud("unsubscribe", "default/x", Content::default()), "n1"),
            Ok(Command::Unsubscribe("default/x".into()))
        );
        let m = cloud(
            "message",
            "",
            Content::text(r#"{"message":{"topic":"a/b","v":1}}"#),
        );
        let Ok(Command::Publish { topic, payload }) = command(&m, "n1") else {
            panic!()
        };
        assert_eq!(topic, "a/b");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["v"], 1);
        let Ok(Command::Publish { topic, .. }) =
            command(&cloud("get_result", "auth_info", Content::text("{}")), "n1")
        else {
            panic!()
        };
        assert_eq!(topic, "$hw/events/node/n1/authInfo/get/result");
        assert!(matches!(
            command(&cloud("delete", "x", Content::default()), "n1"),
            Err(CommandError::Invalid(_))
        ));
        assert!(matches!(
            command(&cloud("message", "", Content::text("nope")), "n1"),
            Err(CommandError::Invalid(_))
        ));
        assert!(matches!(
            command(&cloud("publish", "", Content::default()), "n1"),
            Err(CommandError::Invalid(_))
        ));
        // devicetwin's publishes.
        let twin = Message::with_header("t", "", 1)
            .route(
                "twin",
                "user",
                "$hw/events/device/d/n/twin/update/result",
                "publish",
            )
            .content(Content::text("{}"));
        assert!(matches!(command(&twin, "n1"), Ok(Command::Publish { .. })));
        let ev =
            Message::with_header("e", "", 1).route("edgehub", "user", "node/connection", "connect");
        assert_eq!(command(&ev, "n1"), Err(CommandError::NotForUs));
    }
}
