//! The devicetwin beehive module (name and group `twin`): one loop, one message at a time, so a
//! device's updates apply in the order they arrived. Each change is saved before anything about
//! it is published or synced; a payload it cannot use gets KubeEdge's error result where
//! KubeEdge has one (`twin/update/result`) and is otherwise logged and counted; nothing stops
//! the loop.
//!
//! Inputs:
//! - eventbus (source `bus`): device and node topics, resource = base64url(topic);
//! - EdgeHub (group `twin`): the cloud's membership `update` and `membership/detail` answers,
//!   `"OK"` confirmations of what was synced, and connection events (on `cloud_connected` the
//!   module asks the cloud for the node's full device list, so devices added or removed while
//!   the node was offline are reconciled: M9);
//! - metamanager's store (when given): Device objects, stored in resource-version order and
//!   ACKed once stored (the cloud resends until they are), give membership and desired values;
//!   read whole at start and followed as they change, so nothing is lost between metamanager's
//!   ACK and this module (KubeEdge's ACK-before-handover gap).
//!
//! Outputs: `publish` requests to module `eventbus`; `update` / `get` messages to module
//! `websocket` (EdgeHub), which keeps them in its durable outbox until the cloud has them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use metamanager::store::{ChangeEvent, MetaStore, StoredObject};
use proto::{Content, Message};
use session::edge::route::{
    CLOUD_CONNECTED, CONNECTION_EVENT_OPERATION, CONNECTION_EVENT_SOURCE, GROUP_TWIN,
    MODULE_EDGEHUB, MODULE_EVENTBUS,
};

use crate::config::DeviceTwinConfig;
use crate::store::TwinStore;
use crate::topic::{self, DeviceAction, NodeAction, Topic};
use crate::twin::{self, Device, Failure, Member};

/// The module's name (KubeEdge's).
pub const MODULE_NAME: &str = "twin";
/// eventbus's source on messages from MQTT.
pub const SOURCE_BUS: &str = "bus";

/// What the module did, for status and tests. Every counter only grows.
#[derive(Debug, Default)]
pub struct TwinStats {
    /// Payloads refused (malformed, invalid, unknown device), whether or not a result said so.
    pub refused: AtomicU64,
    /// Publications handed to eventbus.
    pub published: AtomicU64,
    /// Publications eventbus could not take (not running, shutting down).
    pub publish_failed: AtomicU64,
    /// Messages handed to EdgeHub for the cloud.
    pub synced: AtomicU64,
    /// `"OK"` confirmations from the cloud.
    pub confirmed: AtomicU64,
    /// Saves that failed (the change was not applied).
    pub store_failed: AtomicU64,
}

impl TwinStats {
    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Every counter by name, as the local API's `/v1/status` shows them under `devicetwin`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "refused": Self::get(&self.refused),
            "published": Self::get(&self.published),
            "publish_failed": Self::get(&self.publish_failed),
            "synced": Self::get(&self.synced),
            "confirmed": Self::get(&self.confirmed),
            "store_failed": Self::get(&self.store_failed),
        })
    }
}

/// The devicetwin module.
#[derive(Debug)]
pub struct DeviceTwin {
    config: DeviceTwinConfig,
    node: String,
    meta: Option<Arc<MetaStore>>,
    stats: Arc<TwinStats>,
}

impl DeviceTwin {
    /// The module for node `node`, following the Device objects of `meta` if given.
    pub fn new(config: DeviceTwinConfig, node: &str, meta: Option<Arc<MetaStore>>) -> Self {
        Self {
            config,
            node: node.to_owned(),
            meta,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<TwinStats> {
        Arc::clone(&self.stats)
    }
}

impl Module for DeviceTwin {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn group(&self) -> &str {
        GROUP_TWIN
    }

    fn start(
        self: Arc<Self>,
        mut ctx: ModuleContext,
    ) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            let store = TwinStore::open(&self.config.path)
                .map_err(|e| ModuleError::opening(MODULE_NAME, &self.config.path, e))?;
            let devices = store.load().map_err(|e| ModuleError::msg(e.to_string()))?;
            tracing::info!(path = %self.config.path.display(), devices = devices.len(),
                "devicetwin started");
            let mut twin = Twin {
                node: self.node.clone(),
                bus: ctx.bus().clone(),
                store,
                devices,
                stats: Arc::clone(&self.stats),
                publish_warned: false,
            };
            let mut changes = self.meta.as_ref().map(|m| m.subscribe());
            if let Some(meta) = &self.meta {
                twin.resync_from_meta(meta).await;
            }
            loop {
                tokio::select! {
                    msg = ctx.recv() => match msg {
                        Some(msg) => twin.handle(msg).await,
                        None => break,
                    },
                    change = next_change(&mut changes) => match change {
                        Ok(c) if c.object.kind == "device" => {
                            twin.device_object(&c.object, c.event == ChangeEvent::Deleted).await;
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => {
                            if let Some(meta) = &self.meta {
                                twin.resync_from_meta(meta).await;
                            }
                        }
                        Err(RecvError::Closed) => changes = None,
                    },
                }
            }
            Ok(())
        })
    }
}

async fn next_change(
    rx: &mut Option<broadcast::Receiver<metamanager::store::Change>>,
) -> Result<metamanager::store::Change, RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct Twin {
    node: String,
    bus: Bus,
    store: TwinStore,
    devices: BTreeMap<String, Device>,
    stats: Arc<TwinStats>,
    publish_warned: bool,
}

impl Twin {
    async fn handle(&mut self, msg: Message) {
        let route = &msg.route;
        if route.source == CONNECTION_EVENT_SOURCE && route.operation == CONNECTION_EVENT_OPERATION
        {
            if msg.content.as_text() == Some(CLOUD_CONNECTED) {
                self.ask_membership_detail().await;
            }
        } else if route.source == SOURCE_BUS {
            self.mqtt_request(&msg).await;
        } else if route.resource.contains("membership") {
            self.membership(&msg).await;
        } else if msg.is_response() {
            if msg.content.as_text() == Some("OK") {
                self.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(parent = %msg.header.parent_id, "devicetwin: the cloud confirmed");
            } else {
                tracing::info!(parent = %msg.header.parent_id, resource = %route.resource,
                    "devicetwin: the cloud did not confirm a sync");
            }
        } else {
            self.refused(&format!(
                "devicetwin: message not handled (source {:?}, resource {:?}, operation {:?})",
                route.source, route.resource, route.operation
            ));
        }
    }

    /// A publication from MQTT.
    async fn mqtt_request(&mut self, msg: &Message) {
        let parsed = topic::decode(&msg.route.resource).and_then(|t| topic::parse(&t));
        let payload = msg.content.to_bytes();
        match parsed {
            Err(e) => self.refused(&format!("devicetwin: {e}")),
            Ok(Topic::Device { id, action }) => match action {
                DeviceAction::TwinUpdate => self.twin_update(&id, &payload).await,
                DeviceAction::TwinGet => {
                    let event_id = twin::event_id(&payload);
                    if twin::payload_object(&payload).is_err() {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    let result = twin::get_result(
                        self.devices.get(&id),
                        &id,
                        &event_id,
                        proto::now_millis(),
                    );
                    if result.get("code").is_some() {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    self.publish(&topic::device_topic(&id, "twin/get/result"), &result)
                        .await;
                }
                DeviceAction::StateUpdate => self.state_update(&id, &payload).await,
                DeviceAction::Other(what) => {
                    self.refused(&format!("devicetwin: device topic {what:?} is not handled"));
                }
            },
            Ok(Topic::Node { node, action }) => match action {
                NodeAction::MembershipGet if node == self.node => {
                    let event_id = twin::event_id(&payload);
                    let result = twin::membership_result(
                        self.devices.values(),
                        &event_id,
                        proto::now_millis(),
                    );
                    let topic = topic::node_topic(&self.node, "membership/get/result");
                    self.publish(&topic, &result).await;
                }
                NodeAction::MembershipGet => {
                    self.refused(&format!(
                        "devicetwin: membership/get for node {node:?}, not this one"
                    ));
                }
                NodeAction::Other(what) => {
                    self.refused(&format!("devicetwin: node topic {what:?} is not handled"));
                }
            },
        }
    }

    async fn twin_update(&mut self, id: &str, payload: &[u8]) {
        let now = proto::now_millis();
        let result_topic = topic::device_topic(id, "twin/update/result");
        let event_id = twin::event_id(payload);
        let outcome = match self.devices.get(id) {
            None => Err(Failure {
                code: 404,
                reason: format!("Device {id} not found"),
            }),
            Some(device) => twin::parse_update(payload).and_then(|u| {
                let mut changed = device.clone();
                let out = twin::apply_update(&mut changed, &u, now, &proto::new_id())?;
                Ok((changed, out))
            }),
        };
        let (changed, out) = match outcome {
            Ok(ok) => ok,
            Err(f) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(device = %id, code = f.code, reason = %f.reason,
                    "devicetwin: twin update refused");
                self.publish(&result_topic, &f.to_json(&event_id, now))
                    .await;
                return;
            }
        };
        if let Err(e) = self.store.save(&changed) {
            self.stats.store_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %id, error = %e, "devicetwin: update not stored");
            let f = Failure {
                code: 500,
                reason: format!("the update could not be stored: {e}"),
            };
            self.publish(&result_topic, &f.to_json(&event_id, now))
                .await;
            return;
        }
        self.devices.insert(id.to_owned(), changed);
        self.publish(&result_topic, &out.result).await;
        self.publish(
            &topic::device_topic(id, "twin/update/document"),
            &out.document,
        )
        .await;
        if let Some(delta) = &out.delta {
            self.publish(&topic::device_topic(id, "twin/update/delta"), delta)
                .await;
        }
        if let Some(sync) = out.sync {
            let resource = format!("device/{id}/twin/edge_updated");
            self.sync(resource, "update", Content::Json(sync)).await;
        }
    }

    async fn state_update(&mut self, id: &str, payload: &[u8]) {
        let state = match twin::parse_state(payload) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.refused(&format!(
                    "devicetwin: {id}: state not one of {:?}; ignored",
                    twin::STATES
                ));
                return;
            }
            Err(f) => {
                self.refused(&format!("devicetwin: {id}: {}", f.reason));
                return;
            }
        };
        let Some(device) = self.devices.get(id) else {
            self.refused(&format!("devicetwin: state update for unknown device {id}"));
            return;
        };
        let mut changed = device.clone();
        let result = twin::apply_state(
            &mut changed,
            &state,
            proto::now_millis(),
            &now_rfc3339(),
            &proto::new_id(),
        );
        if let Err(e) = self.store.save(&changed) {
            self.stats.store_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %id, error = %e, "devicetwin: state not stored");
            return;
        }
        self.devices.insert(id.to_owned(), changed);
        self.publish(&topic::device_topic(id, "state/update/result"), &result)
            .await;
        // KubeEdge sends this content as a JSON string holding the result.
        let resource = format!("device/{id}/state/update");
        self.sync(resource, "update", Content::text(result.to_string()))
            .await;
    }

    /// A membership message from the cloud: an `update` or a `detail` answer (the whole set).
    async fn membership(&mut self, msg: &Message) {
        let m = match twin::parse_membership(&msg.content.to_bytes()) {
            Ok(m) => m,
            Err(e) => {
                self.refused(&format!("devicetwin: membership message: {e}"));
                return;
            }
        };
        let (added, removed) = match m.all {
            Some(all) => {
                let keep: std::collections::BTreeSet<&str> =
                    all.iter().map(|d| d.id.as_str()).collect();
                let removed: Vec<Member> = self
                    .devices
                    .values()
                    .filter(|d| !keep.contains(d.id.as_str()))
                    .map(|d| Member {
                        id: d.id.clone(),
                        name: d.name.clone(),
                        description: d.description.clone(),
                    })
                    .collect();
                (all, removed)
            }
            None => (m.added, m.removed),
        };
        self.change_membership(added, removed).await;
    }

    /// Adds and removes devices; publishes `membership/updated` for what really changed.
    async fn change_membership(&mut self, added: Vec<Member>, removed: Vec<Member>) {
        let mut really_added = Vec::new();
        for m in added {
            let device = match self.devices.get(&m.id) {
                Some(d) if d.description == m.description && d.name == m.name => continue,
                Some(d) => Device {
                    name: m.name.clone(),
                    description: m.description.clone(),
                    ..d.clone()
                },
                None => Device::new(&m.id, &m.name, &m.description),
            };
            let new = !self.devices.contains_key(&m.id);
            if let Err(e) = self.store.save(&device) {
                self.stats.store_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %m.id, error = %e, "devicetwin: device not stored");
                continue;
            }
            self.devices.insert(m.id.clone(), device);
            if new {
                really_added.push(m);
            }
        }
        let mut really_removed = Vec::new();
        for m in removed {
            if !self.devices.contains_key(&m.id) {
                continue;
            }
            if let Err(e) = self.store.remove(&m.id) {
                self.stats.store_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %m.id, error = %e, "devicetwin: device not removed");
                continue;
            }
            self.devices.remove(&m.id);
            really_removed.push(m);
        }
        if really_added.is_empty() && really_removed.is_empty() {
            return;
        }
        tracing::info!(
            added = really_added.len(),
            removed = really_removed.len(),
            "devicetwin: membership changed"
        );
        let body = twin::membership_updated(
            &really_added,
            &really_removed,
            &proto::new_id(),
            proto::now_millis(),
        );
        let topic = topic::node_topic(&self.node, "membership/updated");
        self.publish(&topic, &body).await;
    }

    /// A Device object metamanager stored (or deleted): membership and desired values.
    async fn device_object(&mut self, object: &StoredObject, deleted: bool) {
        let id = format!("{}/{}", object.namespace, object.name);
        if deleted {
            let m = Member {
                id,
                name: object.name.clone(),
                description: String::new(),
            };
            self.change_membership(Vec::new(), vec![m]).await;
            return;
        }
        let body: Value = serde_json::from_str(&object.value).unwrap_or(Value::Null);
        let description = twin::field(&body, "metadata")
            .and_then(|m| twin::field(m, "labels"))
            .and_then(|l| twin::field(l, "description"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let member = Member {
            id: id.clone(),
            name: object.name.clone(),
            description,
        };
        self.change_membership(vec![member], Vec::new()).await;
        let desired = twin::desired_of(&body);
        let Some(device) = self.devices.get(&id) else {
            return;
        };
        let mut changed = device.clone();
        let now = proto::now_millis();
        if !twin::apply_desired(&mut changed, &desired, now) {
            return;
        }
        if let Err(e) = self.store.save(&changed) {
            self.stats.store_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %id, error = %e, "devicetwin: desired values not stored");
            return;
        }
        let document = twin::document(device, &changed, now, &proto::new_id());
        let delta = twin::delta(&changed, now, &proto::new_id());
        self.devices.insert(id.clone(), changed);
        if let Some(document) = document {
            self.publish(&topic::device_topic(&id, "twin/update/document"), &document)
                .await;
        }
        if let Some(delta) = delta {
            self.publish(&topic::device_topic(&id, "twin/update/delta"), &delta)
                .await;
        }
    }

    /// Reads every Device object metamanager holds.
    async fn resync_from_meta(&mut self, meta: &MetaStore) {
        match meta.list("device", None) {
            Ok(objects) => {
                for o in objects {
                    self.device_object(&o, false).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "devicetwin: cannot read metamanager's devices"),
        }
    }

    /// Asks the cloud for the node's full device list (answered on `membership/detail`).
    async fn ask_membership_detail(&mut self) {
        let content = twin::detail_request(&self.node, &proto::new_id(), proto::now_millis());
        self.sync(
            "membership/detail".to_owned(),
            "get",
            Content::text(content),
        )
        .await;
    }

    /// Hands a message for the cloud to EdgeHub (its durable outbox).
    async fn sync(&mut self, resource: String, op: &str, content: Content) {
        let msg = Message::new("")
            .route(MODULE_NAME, "resource", resource, op)
            .content(content);
        match self.bus.send(MODULE_EDGEHUB, msg).await {
            Ok(()) => {
                self.stats.synced.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "devicetwin: EdgeHub did not take a sync message"),
        }
    }

    /// Asks eventbus to publish `payload` on `topic`.
    async fn publish(&mut self, topic: &str, payload: &Value) {
        let msg = Message::new("")
            .route(MODULE_NAME, GROUP_TWIN, topic, "publish")
            .content(Content::text(payload.to_string()));
        match self.bus.send(MODULE_EVENTBUS, msg).await {
            Ok(()) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.publish_failed.fetch_add(1, Ordering::Relaxed);
                if std::mem::replace(&mut self.publish_warned, true) {
                    tracing::debug!(%topic, error = %e, "devicetwin: not published");
                } else {
                    tracing::warn!(%topic, error = %e,
                        "devicetwin: eventbus did not take a publication (said once)");
                }
            }
        }
    }

    fn refused(&self, what: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!("{what}");
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
