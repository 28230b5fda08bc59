//! The cloud API's OpenAPI 3.1 document, generated with utoipa: each handler in `api.rs` carries
//! its `#[utoipa::path]`, and the router is built from those handlers only (utoipa-axum's
//! `OpenApiRouter`), so a route cannot exist without its entry. Served at `/v1/openapi.json`
//! (public, like `/healthz`: it is the same for every cloudcore of a version, and in the repository
//! as `docs/openapi.json`; a test fails when that file differs from [`crate::api::openapi`]).
//!
//! The types here describe JSON the handlers build; each mirrors the code that produces it
//! (named in its doc), and `cloudhub/tests/openapi.rs` checks real answers against them.

use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The body of every error answer (4xx, 5xx).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "unknown node \"edge-9\": it has never connected", "code": "unknown_node"}))]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs; stable: `bad_query`, `bad_body`, `too_large`,
    /// `malformed_message`, `missing_route`, `unknown_node`, `unknown_message`,
    /// `unknown_token`, `name_taken`, `not_found`, `already_acked` (409), `already_failed`
    /// (409), objects: `invalid_object`, `kind_mismatch`,
    /// `name_mismatch`, `unknown_resource`, `bad_selector`, `already_exists` (409), `conflict`
    /// (409), `gone` (410), `insufficient_storage` (507); `unauthenticated` (401), `invalid_token`
    /// (401), `forbidden` (403), `queue_full` (503), `overloaded` (503), `store_error` (500);
    /// proxy calls: `bad_target` (400), `node_offline` (503), `edge_timeout` (504), `bad_reply`
    /// (502), and from the edge itself (`Server: causeway-edgecore`) `bad_request`,
    /// `target_not_allowed`, `connection_refused`, `connect_failed`, `response_too_large`,
    /// `bad_response`, `busy`, `timeout`.
    pub code: String,
}

/// A KubeEdge message in its JSON form (`proto::json`), as POSTed and as streamed.
#[derive(Debug, Serialize, ToSchema)]
pub struct KubeEdgeMessage {
    /// Identity and ordering.
    pub header: MessageHeader,
    /// Where it goes and what it does.
    pub route: MessageRoute,
    /// The payload: any JSON value (bytes that are not JSON travel as base64 text).
    #[schema(value_type = Object)]
    pub content: Value,
}

/// `header` of a [`KubeEdgeMessage`]. On a POST every field may be left out: an id and the
/// timestamp are filled in.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageHeader {
    /// Message id (a UUID if left out); a POST with an id already queued is a duplicate.
    pub msg_id: Option<String>,
    /// The message this one answers.
    pub parent_msg_id: Option<String>,
    /// Unix milliseconds (now if left out).
    pub timestamp: Option<i64>,
    /// Kubernetes resourceVersion, if any.
    pub resourceversion: Option<String>,
    /// KubeEdge's sync flag.
    pub sync: Option<bool>,
}

/// `route` of a [`KubeEdgeMessage`]. `group` and `operation` are required on a POST.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageRoute {
    /// Sending module.
    pub source: Option<String>,
    /// Route group: `resource`, `twin`, `user`, ...
    pub group: String,
    /// `insert`, `update`, `delete`, `query`, `response`, ...
    pub operation: String,
    /// e.g. `default/configmap/demo`.
    pub resource: Option<String>,
}

/// Answer of `POST /v1/nodes/{id}/messages` (`api::post_message`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "7b0c...", "node": "edge-1", "seq": 42, "duplicate": false, "needs_ack": true}))]
pub struct PostAnswer {
    /// The message id.
    pub id: String,
    /// The node.
    pub node: String,
    /// Position in the node's queue.
    pub seq: u64,
    /// A message with this id was already queued; nothing new was stored.
    pub duplicate: bool,
    /// Whether the cloud waits for the edge's ACK (and resends until it comes).
    pub needs_ack: bool,
    /// With `wait=ack`: whether the ACK came within the timeout (`false` also when the edge
    /// refused the message: see `failed`).
    pub acked: Option<bool>,
    /// With `wait=ack`: `true` when the edge answered with an error instead of an ACK (it could
    /// not deliver the message): it failed and will not be resent (200).
    pub failed: Option<bool>,
    /// With `failed`: the edge's reason.
    pub error: Option<String>,
    /// With `wait=ack`: `true` when the operator cancelled the message while the request
    /// waited (`DELETE`): it will not be sent again (200).
    pub cancelled: Option<bool>,
    /// With `wait=ack`, for a duplicate of a message acked earlier: when.
    pub acked_at_ms: Option<i64>,
    /// With `wait=ack`: milliseconds from the first send to the ACK.
    pub ack_latency_ms: Option<f64>,
    /// With `wait=ack`: the edge's answer message, if it sent one.
    pub response: Option<KubeEdgeMessage>,
}

/// Answer of `GET /v1/nodes/{id}/messages/{msg_id}` (`api::get_message`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct MessageStatus {
    /// The message id.
    pub id: String,
    /// The node.
    pub node: String,
    /// `pending` (queued), `in_flight` (written, waiting for the ACK), `acked`, `failed`
    /// (the edge answered with an error: it could not deliver it; never resent) or `cancelled`
    /// (by the operator's `DELETE`; never resent).
    pub state: String,
    /// Sends so far in the current session (`in_flight` only).
    pub attempts: Option<u32>,
    /// When the ACK came, Unix milliseconds (`acked` only).
    pub acked_at_ms: Option<i64>,
    /// When the edge's error answer came, Unix milliseconds (`failed` only).
    pub failed_at_ms: Option<i64>,
    /// The edge's reason (`failed` only).
    pub error: Option<String>,
    /// When the operator cancelled it, Unix milliseconds (`cancelled` only).
    pub cancelled_at_ms: Option<i64>,
}

/// The `data:` of each `message` event of `GET /v1/messages` (`api::record_event`). The event's
/// `id:` is `seq`; reconnect with `Last-Event-ID` (or `?since=`) to resume after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpstreamEvent {
    /// Position in the upstream log (strictly increasing).
    pub seq: u64,
    /// The node that sent it.
    pub node: String,
    /// When the cloud accepted it, Unix milliseconds.
    pub accepted_ms: i64,
    /// The message as the edge sent it.
    pub message: KubeEdgeMessage,
}

/// Body of `POST /v1/api-tokens`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"name": "dashboard", "scope": "read"}))]
pub struct CreateTokenBody {
    /// Unique among live tokens: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// `read`, `send` or `admin`.
    pub scope: crate::auth::Scope,
}

/// Answer of `POST /v1/api-tokens`: the token's record and the token itself, shown only here.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The name.
    pub name: String,
    /// The scope.
    pub scope: crate::auth::Scope,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// The bearer token (`cwapi_` + 43 characters). Only its hash is kept.
    pub token: String,
}

/// Adds the two ways to authenticate.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`causeway api-token create`). Scopes: read (GET \
                         endpoints, the event stream, metrics), send (read + POST messages), \
                         admin (everything, including /v1/api-tokens).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "On the HTTPS listener: a client certificate from the cloud CA with CN \
                     `causeway-api:<scope>:<name>` (`causeway certs api-client`)."
                        .to_owned(),
                ),
                extensions: None,
            },
        );
    }
}

/// The document's fixed parts; the paths come from the handlers (`api::openapi`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Causeway cloud API",
        description = "Applications' API of cloudcore: the nodes, queueing messages for them \
            (durably, with KubeEdge's ACK contract), the stream of messages from them, calls to \
            HTTP services on them (servicebus), and API tokens. Every error is JSON \
            (`ErrorBody`). Credentials are required on every endpoint but /healthz and \
            /v1/openapi.json once an API token exists, and always when the API is not on \
            loopback (then it is HTTPS): 401 without a usable one (with `WWW-Authenticate: \
            Bearer`), 403 when its scope is too small. See docs/api.md.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody, KubeEdgeMessage, UpstreamEvent)),
    modifiers(&Security),
    security(("bearer" = []), ("client_certificate" = [])),
    tags(
        (name = "nodes", description = "The nodes the cloud knows"),
        (name = "messages", description = "Messages to and from nodes"),
        (name = "proxy", description = "Calls to HTTP services on a node, through its servicebus"),
        (name = "tokens", description = "API tokens (scope admin)"),
        (name = "objects", description = "Desired state: Kubernetes-shaped objects edgecontroller syncs to the nodes"),
        (name = "operations", description = "Health, metrics, this document")
    )
)]
pub(crate) struct ApiDoc;
