//! Where a message from the cloud goes on the edge: KubeEdge's `routeToEdge` handler table
//! (PROTOCOL.md B§7.4) as a pure function, plus the edge's module and group names (B§10.4).
//!
//! Unlike KubeEdge, a message that matches no handler is reported ([`Routing::Unroutable`]) so the
//! caller logs and counts it; nothing is dropped silently.

use proto::Message;
use proto::message::{GROUP_CAUSEWAY, OP_ACK};

/// EdgeHub's module name on the bus. KubeEdge calls it `websocket` whatever the protocol, and
/// edge modules address it by that name (`SendSync` to `websocket`).
pub const MODULE_EDGEHUB: &str = "websocket";
/// EdgeHub's group: metamanager sends module → cloud messages to group `hub`.
pub const GROUP_HUB: &str = "hub";
/// metamanager's group: resource and func messages from the cloud go here.
pub const GROUP_META: &str = "meta";
/// devicetwin's group.
pub const GROUP_TWIN: &str = "twin";
/// eventbus's and servicebus's group.
pub const GROUP_BUS: &str = "bus";
/// taskmanager's group (and module name).
pub const GROUP_TASKMANAGER: &str = "taskmanager";
/// Route group of resource messages from the cloud.
pub const GROUP_RESOURCE: &str = "resource";
/// Route group of function messages from the cloud.
pub const GROUP_FUNC: &str = "func";
/// Route group of user (router) messages.
pub const GROUP_USER: &str = "user";
/// eventbus's module name.
pub const MODULE_EVENTBUS: &str = "eventbus";
/// servicebus's module name.
pub const MODULE_SERVICEBUS: &str = "servicebus";
/// taskmanager's module name.
pub const MODULE_TASKMANAGER: &str = "taskmanager";
/// Source of user messages meant for eventbus.
pub const SOURCE_ROUTER_EVENTBUS: &str = "router_eventbus";
/// Source of user messages meant for servicebus.
pub const SOURCE_ROUTER_SERVICEBUS: &str = "router_servicebus";

/// Groups told about connection changes (KubeEdge's `pubConnectInfo`, B§7.3).
pub const CONNECTION_EVENT_GROUPS: [&str; 4] =
    [GROUP_TWIN, GROUP_META, GROUP_BUS, GROUP_TASKMANAGER];
/// Source of connection events.
pub const CONNECTION_EVENT_SOURCE: &str = "edgehub";
/// Resource of connection events.
pub const CONNECTION_EVENT_RESOURCE: &str = "node/connection";
/// Operation of connection events.
pub const CONNECTION_EVENT_OPERATION: &str = "connect";
/// Content of the event published when the cloud link comes up.
pub const CLOUD_CONNECTED: &str = "cloud_connected";
/// Content of the event published when the cloud link goes down.
pub const CLOUD_DISCONNECTED: &str = "cloud_disconnected";

/// Where a cloud message is delivered on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// It answers a module's synchronous request: beehive's `send_resp` wakes the waiter.
    Response,
    /// Every module of this group.
    Group(&'static str),
    /// This one module.
    Module(&'static str),
}

/// Why a cloud message matched no handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unroutable {
    /// A `user` message that is not a response and whose source is neither router.
    UnknownUserSource,
    /// A route group no edge handler serves.
    UnknownGroup,
}

impl std::fmt::Display for Unroutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnknownUserSource => "no edge module handles user messages from this source",
            Self::UnknownGroup => "no edge module handles this route group",
        })
    }
}

/// The routing decision for one cloud message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// Deliver to this destination on the bus.
    Deliver(Destination),
    /// Causeway's upstream acknowledgement of the edge message with this id: consumed by EdgeHub
    /// (the outbox forgets that message), never delivered to a module.
    UpstreamAck(String),
    /// No handler matches: log and count it.
    Unroutable(Unroutable),
}

/// Decides where a cloud message goes, in KubeEdge's handler order.
pub fn route_to_edge(msg: &Message) -> Routing {
    let route = &msg.route;
    match route.group.as_str() {
        GROUP_CAUSEWAY if route.operation == OP_ACK && msg.is_response() => {
            Routing::UpstreamAck(msg.header.parent_id.clone())
        }
        GROUP_RESOURCE | GROUP_FUNC if msg.is_response() => Routing::Deliver(Destination::Response),
        GROUP_RESOURCE | GROUP_FUNC => Routing::Deliver(Destination::Group(GROUP_META)),
        GROUP_TWIN => Routing::Deliver(Destination::Group(GROUP_TWIN)),
        GROUP_USER if msg.is_response() => Routing::Deliver(Destination::Response),
        GROUP_USER => match route.source.as_str() {
            SOURCE_ROUTER_EVENTBUS => Routing::Deliver(Destination::Module(MODULE_EVENTBUS)),
            SOURCE_ROUTER_SERVICEBUS => Routing::Deliver(Destination::Module(MODULE_SERVICEBUS)),
            _ => Routing::Unroutable(Unroutable::UnknownUserSource),
        },
        GROUP_TASKMANAGER => Routing::Deliver(Destination::Module(MODULE_TASKMANAGER)),
        _ => Routing::Unroutable(Unroutable::UnknownGroup),
    }
}

/// Where a response goes when no module waits for it (any more): the destination an ordinary
/// message of its route would have, or `None` when there is none.
pub fn route_without_waiter(msg: &Message) -> Option<Destination> {
    let route = &msg.route;
    match route.group.as_str() {
        GROUP_RESOURCE | GROUP_FUNC => Some(Destination::Group(GROUP_META)),
        GROUP_TWIN => Some(Destination::Group(GROUP_TWIN)),
        GROUP_USER => match route.source.as_str() {
            SOURCE_ROUTER_EVENTBUS => Some(Destination::Module(MODULE_EVENTBUS)),
            SOURCE_ROUTER_SERVICEBUS => Some(Destination::Module(MODULE_SERVICEBUS)),
            _ => None,
        },
        GROUP_TASKMANAGER => Some(Destination::Module(MODULE_TASKMANAGER)),
        _ => None,
    }
}

/// The connection event KubeEdge publishes to each of [`CONNECTION_EVENT_GROUPS`], with the given
/// id and timestamp (Unix milliseconds).
pub fn connection_event(group: &str, connected: bool, id: String, timestamp_ms: i64) -> Message {
    let content = if connected {
        CLOUD_CONNECTED
    } else {
        CLOUD_DISCONNECTED
    };
    Message::with_header(id, "", timestamp_ms)
        .route(
            CONNECTION_EVENT_SOURCE,
            group,
            CONNECTION_EVENT_RESOURCE,
            CONNECTION_EVENT_OPERATION,
        )
        .content(proto::Content::text(content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(source: &str, group: &str, parent: &str) -> Message {
        Message::with_header("id-1", parent, 0).route(source, group, "default/pod/p", "update")
    }

    #[test]
    fn kubeedge_handler_table() {
        use Destination::*;
        let cases = [
            (
                msg("edgecontroller", "resource", ""),
                Routing::Deliver(Group("meta")),
            ),
            (
                msg("edgecontroller", "resource", "p"),
                Routing::Deliver(Response),
            ),
            (
                msg("edgecontroller", "func", ""),
                Routing::Deliver(Group("meta")),
            ),
            (
                msg("edgecontroller", "func", "p"),
                Routing::Deliver(Response),
            ),
            (
                msg("devicecontroller", "twin", ""),
                Routing::Deliver(Group("twin")),
            ),
            // twin goes to the group even when it carries a parent id
            (
                msg("devicecontroller", "twin", "p"),
                Routing::Deliver(Group("twin")),
            ),
            (
                msg("router_eventbus", "user", ""),
                Routing::Deliver(Module("eventbus")),
            ),
            (
                msg("router_servicebus", "user", ""),
                Routing::Deliver(Module("servicebus")),
            ),
            (
                msg("router_eventbus", "user", "p"),
                Routing::Deliver(Response),
            ),
            (
                msg("router", "user", ""),
                Routing::Unroutable(Unroutable::UnknownUserSource),
            ),
            (
                msg("taskmanager", "taskmanager", ""),
                Routing::Deliver(Module("taskmanager")),
            ),
            (
                msg("x", "nonsense", ""),
                Routing::Unroutable(Unroutable::UnknownGroup),
            ),
            (
                msg("x", "", ""),
                Routing::Unroutable(Unroutable::UnknownGroup),
            ),
        ];
        for (m, want) in cases {
            assert_eq!(route_to_edge(&m), want, "{:?}", m.route);
        }
    }

    #[test]
    fn upstream_ack_is_consumed_only_with_a_parent() {
        let ack =
            Message::with_header("a", "up-7", 0).route("cloudhub", GROUP_CAUSEWAY, "", OP_ACK);
        assert_eq!(route_to_edge(&ack), Routing::UpstreamAck("up-7".into()));
        let bare = Message::with_header("a", "", 0).route("cloudhub", GROUP_CAUSEWAY, "", OP_ACK);
        assert_eq!(
            route_to_edge(&bare),
            Routing::Unroutable(Unroutable::UnknownGroup)
        );
    }

    #[test]
    fn connection_events_match_kubeedge() {
        let m = connection_event("meta", true, "id-1".into(), 1);
        assert_eq!(m.route.source, "edgehub");
        assert_eq!(m.route.group, "meta");
        assert_eq!(m.route.resource, "node/connection");
        assert_eq!(m.route.operation, "connect");
        assert_eq!(m.content.as_text(), Some("cloud_connected"));
        assert_eq!(
            connection_event("twin", false, "id-2".into(), 2)
                .content
                .as_text(),
            Some("cloud_disconnected")
        );
    }
}
