//! devicecontroller: the cloud half of the device path (KubeEdge's devicecontroller,
//! MODULES.md §6). It owns what is particular to devices and leaves object sync to
//! edgecontroller:
//!
//! - **Device and DeviceModel objects** reach their nodes through edgecontroller's placement and
//!   ObjectSync engine (`modules/edgecontroller`: a device by `spec.nodeName`, its model with it),
//!   so there is one reliable sync engine with ACKs, superseding and refusal handling, not two;
//!   this module sends none of them.
//! - **Membership**: a device added to, moved between or removed from nodes becomes KubeEdge's
//!   membership `update` to the node (no-ACK, as KubeEdge); reliability comes from the edge
//!   asking for `membership/detail` on every connect, which this module answers with the node's
//!   whole list (KubeEdge ignored the request, M9/#1736), so a device added while the node was
//!   offline reaches it after the reconnect.
//! - **Reports**: `device/<ns>/<name>/twin/edge_updated` and `…/state/update` from devicetwin
//!   are written into the device's **DeviceStatus** object (KubeEdge v1.23's own place), merged
//!   by property name; a DeviceStatus is placed on no node, so a status write never causes a
//!   downstream resend of the Device (writing `Device.status` would bump the Device's
//!   resourceVersion and make edgecontroller send it again). Each handled report is answered
//!   `"OK"` to its id (§5.6).
//!
//! It takes the edges' messages (source `twin`) either from CloudHub's hand-over on the bus
//! (`node/<id>/<resource>`, answered once handled, after which CloudHub ACKs the edge) or, when
//! CloudHub stores them on the application path, from the cloud store's durable upstream log,
//! keeping its position in its own SQLite file, so a report the cloud ACKed to the edge is
//! handled even if cloudcore stops in between.

pub mod status;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use beehive::{BoxFuture, Module, ModuleContext, ModuleError};
use cloudhub::Hub;
use cloudhub::objects::{ObjectError, ObjectSource, StoredObject};
use cloudhub::store::UpstreamRecord;
use proto::{Content, Message};

use status::Upstream;

/// The module's name and group (the cloud routes edge messages with source `twin` here).
pub const MODULE_NAME: &str = "devicecontroller";
/// The route source of devicetwin's messages.
pub const SOURCE_TWIN: &str = "twin";
/// Upstream records read per step.
const BATCH: usize = 512;
/// Objects read per step when loading.
const LOAD_BATCH: usize = 1024;

/// What the module did. Every counter only grows.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Reports written into a DeviceStatus.
    pub reports: AtomicU64,
    /// Reports not handled (unknown device, bad content): not answered, as KubeEdge.
    pub refused: AtomicU64,
    /// Membership messages queued.
    pub membership: AtomicU64,
}

/// The devicecontroller beehive module.
#[derive(Debug)]
pub struct DeviceController {
    hub: Hub,
    objects: Arc<dyn ObjectSource>,
    cursor_path: PathBuf,
    stats: Arc<DeviceStats>,
}

impl DeviceController {
    /// A controller for the nodes of `hub` and the devices in `objects`, keeping its place in
    /// the upstream log in `cursor_path` (SQLite).
    pub fn new(hub: Hub, objects: Arc<dyn ObjectSource>, cursor_path: PathBuf) -> Self {
        Self {
            hub,
            objects,
            cursor_path,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<DeviceStats> {
        Arc::clone(&self.stats)
    }
}

impl Module for DeviceController {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            let cursor = Cursor::open(&self.cursor_path)
                .map_err(|e| ModuleError::opening(MODULE_NAME, &self.cursor_path, e))?;
            // How far into the upstream log this module had read when it last stopped.
            let upstream_at = cursor.get().map_err(|e| ModuleError::msg(e.to_string()))?;
            let mut c = Controller {
                hub: self.hub.clone(),
                objects: Arc::clone(&self.objects),
                stats: Arc::clone(&self.stats),
                upstream_at,
                cursor,
                devices: BTreeMap::new(),
                objects_at: 0,
            };
            c.run(ctx).await;
            Ok(())
        })
    }
}

/// A device as membership sees it.
#[derive(Debug, Clone, PartialEq)]
struct Placed {
    node: String,
    member: Value,
}

struct Controller {
    hub: Hub,
    objects: Arc<dyn ObjectSource>,
    stats: Arc<DeviceStats>,
    cursor: Cursor,
    upstream_at: u64,
    /// Live devices with a node: (namespace, name) → placement.
    devices: BTreeMap<(String, String), Placed>,
    objects_at: u64,
}

impl Controller {
    async fn run(&mut self, mut ctx: ModuleContext) {
        let mut upstream = self.hub.store().subscribe_upstream();
        let mut changes = self.objects.subscribe();
        // The devices as they are now; membership changes from here on are sent.
        self.load_objects(false).await;
        self.catch_up_upstream().await;
        let shutdown = ctx.shutdown_signal();
        let bus = ctx.bus().clone();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = shutdown.triggered() => break,
                msg = ctx.recv() => match msg {
                    Some(msg) => self.handed_over(&bus, msg).await,
                    None => break,
                },
                rec = upstream.recv() => match rec {
                    Ok(rec) if rec.seq > self.upstream_at => {
                        if rec.seq == self.upstream_at + 1 {
                            self.handle_record(&rec).await;
                        } else {
                            self.catch_up_upstream().await;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => self.catch_up_upstream().await,
                    Err(RecvError::Closed) => break,
                },
                change = changes.recv() => match change {
                    Ok(change) => {
                        self.objects_at = self.objects_at.max(change.object.rv);
                        self.device_changed(&change.object).await;
                    }
                    Err(RecvError::Lagged(_)) => self.load_objects(true).await,
                    Err(RecvError::Closed) => break,
                },
                // The upstream feed only carries what was accepted after it was subscribed to;
                // a periodic look keeps a gap from lasting.
                _ = tick.tick() => self.catch_up_upstream().await,
            }
        }
    }

    /// Reads every object changed since the last read; with `announce`, membership changes are
    /// sent.
    async fn load_objects(&mut self, announce: bool) {
        loop {
            match self.objects.changed_since(self.objects_at, LOAD_BATCH) {
                Ok(batch) if batch.is_empty() => return,
                Ok(batch) => {
                    for o in batch {
                        self.objects_at = self.objects_at.max(o.rv);
                        if announce {
                            self.device_changed(&o).await;
                        } else if let Some(placed) = placed(&o) {
                            self.devices
                                .insert((o.namespace.clone(), o.name.clone()), placed);
                        }
                    }
                }
                Err(ObjectError::Gone { floor, .. }) => self.objects_at = floor,
                Err(e) => {
                    tracing::warn!(error = %e, "devicecontroller: cannot read the object store");
                    return;
                }
            }
        }
    }

    /// A Device added, changed, moved or deleted: membership to the nodes concerned.
    async fn device_changed(&mut self, o: &StoredObject) {
        if o.resource != "devices" {
            return;
        }
        let key = (o.namespace.clone(), o.name.clone());
        let now = placed(o);
        let before = self.devices.get(&key).cloned();
        if before == now {
            return;
        }
        if let Some(b) = &before {
            if now.as_ref().is_none_or(|n| n.node != b.node) {
                self.membership(&b.node, Vec::new(), vec![b.member.clone()])
                    .await;
            }
        }
        match now {
            Some(n) => {
                self.ensure_status(o);
                self.membership(&n.node, vec![n.member.clone()], Vec::new())
                    .await;
                self.devices.insert(key, n);
            }
            None => {
                self.devices.remove(&key);
            }
        }
    }

    /// Makes sure the device's DeviceStatus exists (KubeEdge creates it with the device).
    fn ensure_status(&self, o: &StoredObject) {
        let body = json!({
            "apiVersion": cloudhub::objects::model::DEVICES_API_VERSION,
            "kind": "DeviceStatus",
            "metadata": {"name": o.name, "namespace": o.namespace,
                "ownerReferences": [{"apiVersion": cloudhub::objects::model::DEVICES_API_VERSION,
                    "kind": "Device", "name": o.name, "uid": o.uid}]},
            "status": {"twins": []},
        });
        if let Err(e) = self
            .objects
            .create_if_absent("devicestatuses", &o.namespace, &o.name, body)
        {
            tracing::warn!(device = %o.name, error = %e, "devicecontroller: DeviceStatus not created");
        }
    }

    async fn membership(&self, node: &str, added: Vec<Value>, removed: Vec<Value>) {
        let content =
            status::membership_update(added, removed, &proto::new_id(), proto::now_millis());
        let msg = Message::new("")
            .route(MODULE_NAME, "twin", "membership", "update")
            .content(Content::Json(content));
        self.send(node, msg).await;
        self.stats.membership.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a no-ACK message for `node` (one that never connected asks for its list when it
    /// does).
    async fn send(&self, node: &str, msg: Message) {
        match self.hub.send(node, msg, false).await {
            Ok(_) | Err(cloudhub::hub::SendError::UnknownNode(_)) => {}
            Err(e) => tracing::warn!(%node, error = %e, "devicecontroller: message not queued"),
        }
    }

    /// Handles every upstream record after the cursor.
    async fn catch_up_upstream(&mut self) {
        loop {
            let batch = match self
                .hub
                .store()
                .upstream_since(self.upstream_at, BATCH)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "devicecontroller: cannot read the upstream log");
                    return;
                }
            };
            if batch.is_empty() {
                return;
            }
            for rec in batch {
                self.handle_record(&rec).await;
            }
        }
    }

    async fn handle_record(&mut self, rec: &UpstreamRecord) {
        if rec.message.route.source == SOURCE_TWIN {
            self.handle_twin(&rec.node, &rec.message).await;
        }
        self.upstream_at = rec.seq;
        if let Err(e) = self.cursor.set(rec.seq) {
            tracing::warn!(error = %e, "devicecontroller: position in the upstream log not saved");
        }
    }

    /// An edge message CloudHub hands over on the bus (KubeEdge's routing by source: `twin` →
    /// devicecontroller), resource `node/<id>/<resource>`, as a sync request: answered `"OK"`
    /// once handled (CloudHub then ACKs it to the edge). A report this module cannot use is
    /// answered too (logged and counted, as KubeEdge drops it), so it is not retried for ever.
    async fn handed_over(&mut self, bus: &beehive::Bus, msg: Message) {
        let split = msg
            .route
            .resource
            .strip_prefix("node/")
            .and_then(|r| r.split_once('/'))
            .map(|(node, rest)| (node.to_owned(), rest.to_owned()));
        match split {
            Some((node, rest)) if msg.route.source == SOURCE_TWIN && !node.is_empty() => {
                let mut edge = msg.clone();
                edge.route.resource = rest;
                self.handle_twin(&node, &edge).await;
            }
            _ => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(source = %msg.route.source, resource = %msg.route.resource,
                    "devicecontroller: message not handled");
            }
        }
        if msg.header.sync {
            let _ = bus.send_resp(Message::response_to(&msg, Content::text("OK")));
        }
    }

    async fn handle_twin(&mut self, node: &str, msg: &Message) {
        let content = msg.content.to_bytes();
        let done = match status::parse_resource(&msg.route.resource) {
            Some(Upstream::MembershipDetail) => {
                let devices: Vec<Value> = self
                    .devices
                    .values()
                    .filter(|p| p.node == node)
                    .map(|p| p.member.clone())
                    .collect();
                let detail =
                    status::membership_detail(devices, &proto::new_id(), proto::now_millis());
                let answer = Message::new("")
                    .route(MODULE_NAME, "twin", "membership/detail", "update")
                    .content(Content::Json(detail));
                self.send(node, answer).await;
                Ok(())
            }
            Some(Upstream::TwinReported { namespace, name }) => {
                self.report(node, &namespace, &name, &content, true)
            }
            Some(Upstream::State { namespace, name }) => {
                self.report(node, &namespace, &name, &content, false)
            }
            None => Err(format!("resource {:?} is not handled", msg.route.resource)),
        };
        match done {
            Ok(()) => {
                let ok = Message::response_to(msg, Content::text("OK")).route(
                    MODULE_NAME,
                    "twin",
                    "twin",
                    proto::message::OP_RESPONSE,
                );
                self.send(node, ok).await;
            }
            Err(why) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%node, id = %msg.header.id, resource = %msg.route.resource,
                    reason = %why, "devicecontroller: report not taken");
            }
        }
    }

    /// Writes a report into the device's DeviceStatus.
    fn report(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        content: &[u8],
        twins: bool,
    ) -> Result<(), String> {
        let device = match self.objects.get("devices", namespace, name) {
            Ok(Some(d)) => d,
            Ok(None) => return Err(format!("no device {namespace}/{name}")),
            Err(e) => return Err(e.to_string()),
        };
        if device.body["spec"]["nodeName"].as_str() != Some(node) {
            return Err(format!(
                "device {namespace}/{name} is not bound to node {node}"
            ));
        }
        let report = status::content_object(content).ok_or("the content is not a JSON object")?;
        self.ensure_status(&device);
        let current = self
            .objects
            .get("devicestatuses", namespace, name)
            .map_err(|e| e.to_string())?
            .map(|o| o.body["status"].clone())
            .unwrap_or(Value::Null);
        let new = if twins {
            status::merge_reported(&current, &report, &status::property_names(&device.body)).0
        } else {
            status::merge_state(&current, &report).ok_or("the state report has no state")?
        };
        self.objects
            .write_status("devicestatuses", namespace, name, None, new)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("DeviceStatus {namespace}/{name} vanished"))?;
        self.stats.reports.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The node and membership entry of a live device bound to a node.
fn placed(o: &StoredObject) -> Option<Placed> {
    if o.resource != "devices" || o.deleted {
        return None;
    }
    let node = o.body["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())?;
    Some(Placed {
        node: node.to_owned(),
        member: status::member(&o.namespace, &o.name, &o.body),
    })
}

/// The position in the upstream log, durable. (A mutex only to make the controller `Sync`: the
/// module's one task is its only user.)
#[derive(Debug)]
struct Cursor {
    conn: std::sync::Mutex<Connection>,
}

impl Cursor {
    fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS cursor (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);",
        )?;
        Ok(Self {
            conn: std::sync::Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self) -> rusqlite::Result<u64> {
        let seq: Option<i64> = self
            .conn()
            .query_row("SELECT seq FROM cursor WHERE name = 'upstream'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(seq.map_or(0, |s| s.max(0) as u64))
    }

    fn set(&self, seq: u64) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO cursor (name, seq) VALUES ('upstream', ?1)
             ON CONFLICT(name) DO UPDATE SET seq = excluded.seq",
            [seq as i64],
        )?;
        Ok(())
    }
}
