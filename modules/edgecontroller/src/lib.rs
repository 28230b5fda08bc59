//! edgecontroller: the cloud module that sends every edge node the objects it needs, reliably.
//!
//! It reads desired state through [`cloudhub::objects::ObjectSource`] (the embedded object store
//! today; a Kubernetes informer could feed the same seam), decides placement
//! ([`placement`]: pods by `spec.nodeName`, the configmaps and secrets they reference, the node
//! object, devices by `spec.nodeName` with their models), and keeps per node and object what the node ACKed (the ObjectSync rows, durable in
//! `objectsync.db`). The pure [`planner`] turns the two into messages; this module only sends
//! them and records answers:
//!
//! - messages are KubeEdge's (MODULES.md §1.1): source `edgecontroller`, group `resource`,
//!   resource `{ns}/{type}/{name}` (`null/node/{name}`), op `insert` / `update` / `delete`
//!   (secrets and nodes always `update`), header `resourceversion`, content the object JSON;
//!   every one needs an ACK;
//! - they go through [`cloudhub::Hub::send_superseding`], so an older queued version of the same
//!   object is replaced, not sent: a node back from an outage gets one message per changed object;
//! - answers come from [`cloudhub::Hub::subscribe_acks`]: an ACK records the version, a refusal
//!   (op `error`) schedules a resend with backoff, for ever; when the feed lags, outstanding
//!   messages are looked up in the store ([`cloudhub::Hub::message_state`]);
//! - a tombstone is purged from the object store once no node holds the object.
//!
//! It also takes the edge messages CloudHub routes to it ([`cloudhub::upstream`]): remote
//! queries answered from the object store, pod and node status written into the objects
//! ([`upstream`]), the rest passed on to the application path; and it keeps each node object's
//! Ready condition in step with the node's session. Status-only changes send nothing downstream.

pub mod placement;
pub mod planner;
mod sync_store;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use cloudhub::Hub;
use cloudhub::hub::SendError;
use cloudhub::objects::{ObjectError, ObjectSource, StoredObject};
use cloudhub::store::MessageState;
use proto::Message;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use planner::{Action, Outstanding, SyncRow, Want};
use sync_store::SyncStore;
use upstream::Upstream;

/// The module's name and group.
pub const MODULE_NAME: &str = "edgecontroller";
/// How often the whole state is planned again (retries due, nodes that appeared).
const TICK: Duration = Duration::from_secs(1);
/// How long an outstanding message waits before the store is asked where it stands (in case its
/// answer was missed).
const CHECK_AFTER_MS: i64 = 15_000;
/// Objects read per step when loading.
const LOAD_BATCH: usize = 1024;

/// The route source of an object message of wire type `wire`: devices and their models are
/// sent as KubeEdge's devicecontroller sends them (a stock edge's metamanager hands only
/// messages from `devicecontroller` to devicetwin, MODULES.md §2.3), everything else as
/// edgecontroller. One sync engine sends both: devicecontroller (modules/devicecontroller) owns
/// membership and the devices' reported status, not a second ObjectSync.
pub fn source_of(wire: &str) -> &'static str {
    match wire {
        "device" | "devicemodel" => "devicecontroller",
        _ => MODULE_NAME,
    }
}

/// The edgecontroller beehive module.
#[derive(Debug)]
pub struct EdgeController {
    hub: Hub,
    objects: Arc<dyn ObjectSource>,
    sync_path: PathBuf,
}

impl EdgeController {
    /// A controller sending `objects` to the nodes of `hub`, keeping its ObjectSync rows in
    /// `sync_path` (SQLite).
    pub fn new(hub: Hub, objects: Arc<dyn ObjectSource>, sync_path: PathBuf) -> Self {
        Self {
            hub,
            objects,
            sync_path,
        }
    }
}

impl Module for EdgeController {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            let sync = SyncStore::open(&self.sync_path)
                .map_err(|e| ModuleError::opening(MODULE_NAME, &self.sync_path, e))?;
            let mut controller = Controller {
                hub: self.hub.clone(),
                objects: Arc::clone(&self.objects),
                rows: sync.load().map_err(|e| ModuleError::msg(e.to_string()))?,
                sync,
                cache: BTreeMap::new(),
                cursor: 0,
                by_id: HashMap::new(),
                spec_rv: HashMap::new(),
                link: HashMap::new(),
            };
            controller.index();
            controller.run(ctx).await;
            Ok(())
        })
    }
}

struct Controller {
    hub: Hub,
    objects: Arc<dyn ObjectSource>,
    sync: SyncStore,
    /// Every object by wire resource, tombstones included.
    cache: BTreeMap<String, Arc<StoredObject>>,
    /// Highest resourceVersion in the cache.
    cursor: u64,
    /// ObjectSync rows: node → wire resource → row.
    rows: BTreeMap<String, BTreeMap<String, SyncRow>>,
    /// Outstanding message id → (node, wire resource).
    by_id: HashMap<String, (String, String)>,
    /// Per wire resource, the resourceVersion of its last change other than `status`: a node
    /// needs a message only when that moves (status written from the edge's reports and the
    /// link is not echoed back).
    spec_rv: HashMap<String, u64>,
    /// Per node, the link state last written into its Ready condition.
    link: HashMap<String, bool>,
}

impl Controller {
    fn index(&mut self) {
        self.by_id.clear();
        for (node, rows) in &self.rows {
            for (key, row) in rows {
                if let Some(out) = &row.out {
                    self.by_id
                        .insert(out.id.clone(), (node.clone(), key.clone()));
                }
            }
        }
    }

    async fn run(&mut self, mut ctx: ModuleContext) {
        let mut changes = self.objects.subscribe();
        let mut acks = self.hub.subscribe_acks();
        self.catch_up();
        let mut tick = tokio::time::interval(TICK);
        let shutdown = ctx.shutdown_signal();
        let mut last_check = proto::now_millis();
        loop {
            tokio::select! {
                // Answers before changes: a change planned after its object's ACK was recorded
                // is an `update`, not a second `insert`.
                biased;
                () = shutdown.triggered() => break,
                // Edge messages CloudHub routed here (cloudhub::upstream).
                msg = ctx.recv() => match msg {
                    Some(msg) => self.upstream(ctx.bus(), msg),
                    None => break,
                },
                ack = acks.recv() => match ack {
                    Ok(ack) => {
                        let (node, info) = &*ack;
                        self.answered(node, &info.id, info.failed.is_some());
                        if let Some(why) = &info.failed {
                            tracing::info!(%node, id = %info.id, reason = %why,
                                "edge refused an object; resending after a backoff");
                        }
                    }
                    Err(RecvError::Lagged(_)) => self.check_outstanding().await,
                    Err(RecvError::Closed) => break,
                },
                change = changes.recv() => match change {
                    Ok(change) => {
                        self.remember(change.object);
                        self.reconcile().await;
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.catch_up();
                        self.reconcile().await;
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    let now = proto::now_millis();
                    if now - last_check >= CHECK_AFTER_MS {
                        last_check = now;
                        self.check_outstanding().await;
                    }
                    self.reconcile().await;
                }
            }
        }
    }

    /// Handles an edge message CloudHub handed over (resource `node/<id>/<resource>`) and answers
    /// whether it was taken: op `response` when handled or passed on, op `error` to be handed
    /// over again later. What is not edgecontroller's own goes on to the application path
    /// unchanged; the store takes it now (in order) and the answer follows its commit without
    /// holding up the loop.
    fn upstream(&mut self, bus: &Bus, msg: Message) {
        let Some((node, resource)) = cloudhub::upstream::split_node(&msg.route.resource)
            .map(|(n, r)| (n.to_owned(), r.to_owned()))
        else {
            // CloudHub always prefixes the node; anything else is a bug, kept for the operator.
            tracing::warn!(resource = %msg.route.resource, id = %msg.header.id,
                "edgecontroller: upstream message names no node; taken and dropped");
            let _ = bus.send_resp(Message::response_to(&msg, proto::Content::text("OK")));
            return;
        };
        let what = upstream::classify(&msg.route.operation, &resource);
        if what == Upstream::PassOn {
            let accepting = self.hub.accept_upstream(&node, msg.clone());
            let bus = bus.clone();
            tokio::spawn(async move {
                let answer = match accepting.await {
                    Ok(_) => Message::response_to(&msg, proto::Content::text("OK")),
                    Err(e) => Message::error_for(&msg, e.to_string()),
                };
                // Not delivered only if the driver gave up waiting; it hands it over again.
                let _ = bus.send_resp(answer);
            });
            return;
        }
        let mut edge_msg = msg.clone();
        edge_msg.route.resource.clone_from(&resource);
        edge_msg.header.sync = false;
        let handled = self.own(&node, &edge_msg, what);
        let hub = self.hub.clone();
        let bus = bus.clone();
        tokio::spawn(async move {
            let taken = match handled {
                Ok((answer, needs_ack)) => hub
                    .send(&node, answer, needs_ack)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let reply = match taken {
                Ok(()) => Message::response_to(&msg, proto::Content::text("OK")),
                Err(e) => {
                    tracing::warn!(%node, id = %msg.header.id, error = %e,
                        "edgecontroller: edge message not handled yet; it is handed over again");
                    Message::error_for(&msg, e)
                }
            };
            let _ = bus.send_resp(reply);
        });
    }

    /// Handles an edge message that is edgecontroller's own (`msg` with the edge's resource);
    /// returns the answer for the node and whether it needs an ACK, or why it cannot be handled
    /// now (handed over again later).
    fn own(
        &mut self,
        node: &str,
        msg: &Message,
        what: Upstream<'_>,
    ) -> Result<(Message, bool), String> {
        let text = |t: &str| Message::response_to(msg, proto::Content::text(t));
        match what {
            Upstream::PassOn => Ok((text("OK"), false)),
            Upstream::Query {
                kind,
                namespace,
                name,
            } => match self.objects.get(kind.resource, namespace, name) {
                Ok(Some(o)) => {
                    let mut answer = Message::new(msg.header.id.clone())
                        .route(
                            MODULE_NAME,
                            "resource",
                            msg.route.resource.clone(),
                            "response",
                        )
                        .content(o.body);
                    answer.header.resource_version = o.rv.to_string();
                    Ok((answer, true))
                }
                Ok(None) => {
                    let why = format!("{} \"{name}\" not found", kind.resource);
                    let error = upstream::status_error("NotFound", 404, &why, kind.resource, name);
                    Ok((self.query_error(msg, error), false))
                }
                Err(e) => Err(e.to_string()),
            },
            Upstream::BadQuery(why) => {
                tracing::info!(%node, resource = %msg.route.resource, reason = %why,
                    "edgecontroller: bad query from the edge");
                let error = upstream::status_error("BadRequest", 400, &why, "", "");
                Ok((self.query_error(msg, error), false))
            }
            Upstream::PodStatus { namespace, name } => {
                let Some(request) = content_json(&msg.content) else {
                    return Ok((text("pod status: content is not a PodStatusRequest"), false));
                };
                let uid = request["UID"].as_str().filter(|u| !u.is_empty());
                match self.objects.write_status(
                    "pods",
                    namespace,
                    name,
                    uid,
                    request["Status"].clone(),
                ) {
                    Ok(Some(_)) => {}
                    Ok(None) => tracing::debug!(%node, namespace, name,
                        "edgecontroller: status of a pod the cloud does not have (or another uid)"),
                    Err(e) => return Err(e.to_string()),
                }
                Ok((text("OK"), false))
            }
            Upstream::NodeStatus { name } => {
                if name != node {
                    return Ok((
                        text(&format!(
                            "node {node:?} may not report the status of node {name:?}"
                        )),
                        false,
                    ));
                }
                let Some(request) = content_json(&msg.content) else {
                    return Ok((text("node status: content is not JSON"), false));
                };
                // update: a NodeStatusRequest; insert: a Node.
                let status = if msg.route.operation == "insert" {
                    request["status"].clone()
                } else {
                    request["Status"].clone()
                };
                let connected = self.hub.is_connected(node);
                self.write_node_status(node, Some(status), connected)?;
                Ok((text("OK"), false))
            }
        }
    }

    /// The answer to a query that found nothing or could not be asked: op `response` with the
    /// StatusError, which the edge must not store (no ACK).
    fn query_error(&self, msg: &Message, error: serde_json::Value) -> Message {
        Message::new(msg.header.id.clone())
            .route(
                MODULE_NAME,
                "resource",
                msg.route.resource.clone(),
                "response",
            )
            .content(error)
    }

    /// Writes every node's Ready condition whose link changed since it was last written (the node
    /// object created on first connect).
    fn sync_ready(&mut self, nodes: &[cloudhub::hub::NodeView]) {
        for view in nodes {
            if self.link.get(&view.id) == Some(&view.connected) {
                continue;
            }
            if let Err(e) = self.write_node_status(&view.id, None, view.connected) {
                tracing::warn!(node = %view.id, error = %e, "edgecontroller: node Ready not written");
            }
        }
    }

    /// Writes `node`'s status: `reported` (the edge's, or the stored one) with the Ready
    /// condition from the link. Creates the node object on a connect if there is none.
    fn write_node_status(
        &mut self,
        node: &str,
        reported: Option<serde_json::Value>,
        connected: bool,
    ) -> Result<(), String> {
        let existing = self
            .objects
            .get("nodes", "", node)
            .map_err(|e| e.to_string())?;
        let current = match existing {
            Some(o) => o,
            None if connected => {
                let body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}});
                self.objects
                    .create_if_absent("nodes", "", node, body)
                    .map_err(|e| e.to_string())?
            }
            // A node that never connected since the object store knew it: nothing to mark.
            None => {
                self.link.insert(node.to_owned(), connected);
                return Ok(());
            }
        };
        let now = cloudhub::objects::rfc3339(proto::now_millis());
        let status = reported.unwrap_or_else(|| current.body["status"].clone());
        let status = upstream::with_ready(status, connected, &now, &now);
        self.objects
            .write_status("nodes", "", node, None, status)
            .map_err(|e| e.to_string())?;
        self.link.insert(node.to_owned(), connected);
        Ok(())
    }

    fn remember(&mut self, object: Arc<StoredObject>) {
        self.cursor = self.cursor.max(object.rv);
        let key = object.wire_resource();
        let status_only = self.cache.get(&key).is_some_and(|old| {
            !old.deleted
                && !object.deleted
                && old.uid == object.uid
                && upstream::without_status(&old.body) == upstream::without_status(&object.body)
        });
        if !status_only {
            self.spec_rv.insert(key.clone(), object.rv);
        }
        self.cache.insert(key, object);
    }

    /// Reads every change after the cursor from the object store.
    fn catch_up(&mut self) {
        loop {
            match self.objects.changed_since(self.cursor, LOAD_BATCH) {
                Ok(batch) if batch.is_empty() => return,
                Ok(batch) => {
                    for o in batch {
                        self.remember(o);
                    }
                }
                // Tombstones below the floor were purged: everything above it is still there.
                Err(ObjectError::Gone { floor, .. }) => self.cursor = floor,
                Err(e) => {
                    tracing::warn!(error = %e, "edgecontroller: cannot read the object store");
                    return;
                }
            }
        }
    }

    /// Applies an answer to message `id` of `node`.
    fn answered(&mut self, node: &str, id: &str, refused: bool) {
        let Some((n, key)) = self.by_id.get(id).cloned() else {
            tracing::debug!(%node, %id, "edgecontroller: answer to a message it does not track");
            return;
        };
        tracing::debug!(%node, %id, resource = %key, refused, "edgecontroller: answered");
        if n != node {
            return;
        }
        let Some(row) = self.rows.get_mut(node).and_then(|r| r.remove(&key)) else {
            return;
        };
        match planner::answered(row, id, refused, proto::now_millis()) {
            Some(row) => {
                if !refused {
                    self.by_id.remove(id);
                }
                self.save(node, &key, &row);
                self.rows
                    .entry(node.to_owned())
                    .or_default()
                    .insert(key, row);
            }
            None => {
                self.by_id.remove(id);
                self.forget(node, &key);
            }
        }
    }

    /// Asks the store where every outstanding message stands, for answers the ACK
    /// feed did not bring (a lagging feed, a restart).
    async fn check_outstanding(&mut self) {
        let ids: Vec<(String, String)> = self
            .by_id
            .iter()
            .map(|(id, (node, _))| (id.clone(), node.clone()))
            .collect();
        for (id, node) in ids {
            match self.hub.message_state(&node, &id).await {
                Ok(Some(MessageState::Acked { .. })) => self.answered(&node, &id, false),
                Ok(Some(MessageState::Failed { .. })) => self.answered(&node, &id, true),
                // Unknown (acked long ago and pruned, or lost): send again.
                Ok(None) => self.answered(&node, &id, true),
                Ok(Some(_)) | Err(_) => {}
            }
        }
    }

    /// Plans every node and sends what it says.
    async fn reconcile(&mut self) {
        let placement = placement::place(self.cache.values());
        let known: Vec<String> = match self.hub.nodes().await {
            Ok(nodes) => {
                self.sync_ready(&nodes);
                nodes.into_iter().map(|n| n.id).collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "edgecontroller: cannot list nodes");
                return;
            }
        };
        let now = proto::now_millis();
        for node in known {
            let wants: BTreeMap<String, Want> = placement
                .get(&node)
                .into_iter()
                .flatten()
                .map(|(k, o)| {
                    (
                        k.clone(),
                        Want {
                            rv: self.spec_rv.get(k).copied().unwrap_or(o.rv).min(o.rv),
                            uid: o.uid.clone(),
                        },
                    )
                })
                .collect();
            let empty = BTreeMap::new();
            let actions = planner::plan(&wants, self.rows.get(&node).unwrap_or(&empty), now);
            for action in actions {
                self.act(&node, action).await;
            }
        }
        self.purge_tombstones();
    }

    async fn act(&mut self, node: &str, action: Action) {
        let (key, delete, first) = match action {
            Action::Forget { key } => {
                self.forget(node, &key);
                return;
            }
            Action::Send { key, first } => (key, false, first),
            Action::Delete { key } => (key, true, false),
        };
        let row = self
            .rows
            .get(node)
            .and_then(|r| r.get(&key))
            .cloned()
            .unwrap_or_default();
        let object = self.cache.get(&key).cloned();
        let (rv, uid, content) = match &object {
            Some(o) => (o.rv, o.uid.clone(), o.body.clone()),
            // Only a delete can lack its object; send what the node needs to find it.
            None => {
                let mut parts = key.splitn(3, '/');
                let (ns, _, name) = (parts.next(), parts.next(), parts.next());
                let meta =
                    json!({"namespace": ns.filter(|n| *n != "null"), "name": name, "uid": row.uid});
                (row.acked_rv, row.uid.clone(), json!({ "metadata": meta }))
            }
        };
        let wire = key.split('/').nth(1).unwrap_or("");
        let op = if delete {
            "delete"
        } else if first && wire != "secret" && wire != "node" {
            "insert"
        } else {
            "update"
        };
        let mut msg = Message::new("")
            .route(source_of(wire), "resource", key.clone(), op)
            .content(content);
        msg.header.resource_version = rv.to_string();
        let id = msg.header.id.clone();
        tracing::debug!(%node, %id, resource = %key, op, rv, "edgecontroller: sending");
        match self.hub.send_superseding(node, msg, true).await {
            Ok(done) => {
                for old in done.replaced {
                    self.by_id.remove(&old);
                }
                let row = SyncRow {
                    out: Some(Outstanding {
                        id: id.clone(),
                        rv,
                        uid,
                        delete,
                        failures: row.out.as_ref().map_or(0, |o| o.failures),
                        retry_at_ms: None,
                    }),
                    ..row
                };
                if let Some(old) = self
                    .rows
                    .get(node)
                    .and_then(|r| r.get(&key))
                    .and_then(|r| r.out.as_ref())
                {
                    self.by_id.remove(&old.id);
                }
                self.by_id.insert(id, (node.to_owned(), key.clone()));
                self.save(node, &key, &row);
                self.rows
                    .entry(node.to_owned())
                    .or_default()
                    .insert(key, row);
            }
            Err(SendError::UnknownNode(_)) => {}
            Err(e) => {
                tracing::warn!(%node, resource = %key, error = %e,
                    "edgecontroller: object not queued; trying again");
            }
        }
    }

    fn save(&self, node: &str, key: &str, row: &SyncRow) {
        if let Err(e) = self.sync.save(node, key, row) {
            tracing::warn!(%node, resource = %key, error = %e, "edgecontroller: ObjectSync row not saved");
        }
    }

    fn forget(&mut self, node: &str, key: &str) {
        if let Some(rows) = self.rows.get_mut(node) {
            rows.remove(key);
        }
        if let Err(e) = self.sync.forget(node, key) {
            tracing::warn!(%node, resource = %key, error = %e, "edgecontroller: ObjectSync row not removed");
        }
    }

    /// Drops tombstones no node holds any more, here and in the object store.
    fn purge_tombstones(&mut self) {
        let held = |key: &str| self.rows.values().any(|r| r.contains_key(key));
        let dead: Vec<Arc<StoredObject>> = self
            .cache
            .iter()
            .filter(|(k, o)| o.deleted && !held(k))
            .map(|(_, o)| Arc::clone(o))
            .collect();
        for o in dead {
            match self
                .objects
                .purge_tombstone(&o.resource, &o.namespace, &o.name, o.rv)
            {
                Ok(()) => {
                    self.cache.remove(&o.wire_resource());
                }
                Err(e) => tracing::warn!(error = %e, "edgecontroller: tombstone not purged"),
            }
        }
    }
}

/// The message content as JSON (bytes as JSON text, as QUIC delivers it).
fn content_json(content: &proto::Content) -> Option<serde_json::Value> {
    match content {
        // A JSON document sent as a string (some edges marshal content twice).
        proto::Content::Json(serde_json::Value::String(text)) => serde_json::from_str(text).ok(),
        proto::Content::Json(v) => Some(v.clone()),
        proto::Content::Bytes(b) => serde_json::from_slice(b).ok(),
    }
}
