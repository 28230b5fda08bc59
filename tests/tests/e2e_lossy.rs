//! The real daemons across an impaired link (issue 14's behaviour test): cloudcore in the link
//! lab's cloud namespace, edgecore in its edge namespace, every packet between them through the
//! lab's forwarder. Over each protocol, in three phases on one pair of daemons — `lossy-5`
//! (5 % random loss, 100 ms RTT), `blackhole` (5 s of total loss mid-traffic) and
//! `rebind-port` (the edge's NAT changes its source ports mid-traffic) — ACK-required messages
//! go down over several resources and messages go up; every id must arrive exactly once, in
//! order per resource, and every queue drain. QUIC must survive the rebind without a new
//! session (connection migration); WebSocket's TCP connection cannot, and reconnects.
//!
//! Root only (network namespaces, TUN devices): skipped with a message elsewhere. Behaviour
//! only: the numbers are the `lossy_links` benchmark's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Placement, Sse, binary, http, json_of,
    outbox_rows, wait_until,
};
use linklab::scenario::{self, Scenario};
use linklab::{CLOUD_ADDR, Lab, LabError, Netns};
use serde_json::{Value, json};

/// Bound on each wait; generous, since the suite runs beside builds on two cores.
const PATIENCE: Duration = Duration::from_secs(120);
/// Downstream messages go to this many resources (order is kept per resource).
const RESOURCES: usize = 4;

fn scenario(name: &str) -> Scenario {
    scenario::by_name(name).unwrap_or_else(|| panic!("scenario {name}"))
}

/// What one protocol's run sent, to check at the end.
struct Traffic<'a> {
    lab: &'a Lab,
    cloud_api: SocketAddr,
    edge_api: SocketAddr,
    node: String,
    down: Vec<String>,
    up: Vec<String>,
}

impl Traffic<'_> {
    fn cloud_http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.lab
            .cloud()
            .run(|| http(self.cloud_api, method, path, body))
    }

    fn edge_http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.lab
            .edge()
            .run(|| http(self.edge_api, method, path, body))
    }

    /// Queues `count` ACK-required messages for the node, round-robin over the resources;
    /// each is durable at the cloud once its POST returned.
    fn send_down(&mut self, phase: &str, count: usize) {
        for _ in 0..count {
            let n = self.down.len();
            let id = format!("{}-{phase}-down-{n}", self.node);
            let msg = json!({
                "header": {"msg_id": id},
                "route": {"source": "lossy", "group": "resource", "operation": "update",
                          "resource": format!("default/configmap/cm{}", n % RESOURCES)},
                "content": {"n": n}
            });
            let path = format!("/v1/nodes/{}/messages?ack=true", self.node);
            let (code, body) = self.cloud_http("POST", &path, &msg.to_string());
            assert_eq!(code, 202, "{body}");
            self.down.push(id);
        }
    }

    /// Sends `count` messages from the edge's local API (one resource); each is in the edge's
    /// outbox once its POST returned.
    fn send_up(&mut self, count: usize) {
        for _ in 0..count {
            let n = self.up.len();
            let body = json!({"group": "user", "resource": "sensors/t1",
                              "operation": "upload", "content": {"n": n}});
            let (code, body) = self.edge_http("POST", "/v1/upstream", &body.to_string());
            assert_eq!(code, 202, "{body}");
            self.up
                .push(json_of(&body)["id"].as_str().expect("id").to_owned());
        }
    }

    fn node_view(&self) -> Value {
        let (code, body) = self.cloud_http("GET", &format!("/v1/nodes/{}", self.node), "");
        assert_eq!(code, 200, "{body}");
        json_of(&body)
    }

    fn wait_connected(&self) -> Value {
        wait_until("edge connected to the cloud", PATIENCE, || {
            let (code, body) = self.edge_http("GET", "/v1/status", "");
            // The cloud knows the node (200) once it first connected.
            let path = format!("/v1/nodes/{}", self.node);
            let (cloud_code, view) = self.cloud_http("GET", &path, "");
            let connected = code == 200
                && json_of(&body)["cloud"] == "connected"
                && cloud_code == 200
                && json_of(&view)["connected"] == true;
            if connected {
                Ok(json_of(&view))
            } else {
                Err(format!("edge {body}; cloud {view}"))
            }
        })
    }

    /// Waits until the cloud's queue for the node has nothing open and the edge's outbox no row.
    fn wait_drained(&self, outbox: &Path) {
        wait_until("every queue drained", PATIENCE, || {
            let rows = outbox_rows(outbox);
            let view = self.node_view();
            let queue = &view["queue"];
            if rows == 0 && queue["pending"] == 0 && queue["in_flight"] == 0 {
                Ok(())
            } else {
                Err(format!("outbox {rows} rows; cloud: {view}"))
            }
        });
    }

    /// The cloud messages the edge's metamanager journaled, in journal order.
    fn journal(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let path = format!("/v1/messages?after={after}&limit=1000");
            let (code, body) = self.edge_http("GET", &path, "");
            assert_eq!(code, 200, "{body}");
            let page = json_of(&body);
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return all;
            }
            all.extend(messages.into_iter().map(|m| m["message"].clone()));
            after = page["next"].as_u64().expect("next cursor");
        }
    }
}

/// Each of `ids` exactly once among `messages`, and per resource in the order sent (`n`
/// increasing).
fn exactly_once_in_order(what: &str, messages: &[Value], ids: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in messages {
        let Some(id) = m["header"]["msg_id"].as_str() else {
            continue;
        };
        if !ids.iter().any(|i| i == id) {
            continue;
        }
        *counts.entry(id).or_default() += 1;
        let resource = m["route"]["resource"].as_str().unwrap_or("").to_owned();
        let n = m["content"]["n"].as_i64().expect("n");
        if let Some(before) = last.insert(resource.clone(), n) {
            assert!(n > before, "{what}: {resource} got n={n} after n={before}");
        }
    }
    let wrong: Vec<(&String, Option<&usize>)> = ids
        .iter()
        .map(|id| (id, counts.get(id.as_str())))
        .filter(|(_, n)| *n != Some(&1))
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} ids not seen exactly once, e.g. {:?}",
        wrong.len(),
        ids.len(),
        &wrong[..wrong.len().min(5)]
    );
}

fn edge_config(dir: &Path, protocol: &str, node: &str, cloud: &Cloud) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, node, cloud).write_in(dir)
}

fn in_namespace(ns: &Netns) -> impl Fn(&Path) -> Command + '_ {
    move |binary| ns.command(binary)
}

fn across_impaired_links(protocol: &str) {
    let lossy5 = scenario("lossy-5");
    let lab = match Lab::start(&lossy5, 14) {
        Ok(lab) => lab,
        Err(LabError::Unsupported(why)) => {
            println!("skipped: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = format!("edge-lossy-{protocol}");
    let outbox = root.join("edge/outbox.db");
    let cloud_command = in_namespace(lab.cloud());
    let placement = Placement {
        host: CLOUD_ADDR.into(),
        command: &cloud_command,
    };
    let extra = "";
    let cloud = Cloud::start_placed(root, [0; 4], 30, extra, PATIENCE, &placement);
    let config = edge_config(root, protocol, &node, &cloud);
    let edge = Edge::spawn(lab.edge().command(binary("edgecore")), &config, PATIENCE);
    let mut traffic = Traffic {
        lab: &lab,
        cloud_api: cloud.api,
        edge_api: edge.local,
        node: node.clone(),
        down: Vec::new(),
        up: Vec::new(),
    };
    traffic.wait_connected();

    // lossy-5: the steady link the lab started with.
    traffic.send_down("lossy5", 40);
    traffic.send_up(20);
    traffic.wait_drained(&outbox);

    // blackhole: traffic before, during and after 5 s of total loss.
    let blackhole = scenario("blackhole");
    let control = lab.control();
    control.set_impairment(blackhole.up, blackhole.down);
    traffic.send_down("blackhole", 20);
    traffic.send_up(10);
    control.set_blackhole(true);
    let dark = Instant::now();
    traffic.send_down("blackhole", 20);
    traffic.send_up(10);
    let scenario::Disruption::Blackhole(length) = blackhole.disruption else {
        panic!("the blackhole scenario is a blackhole");
    };
    // The outage's length is the scenario's, not a wait for state.
    std::thread::sleep(length.saturating_sub(dark.elapsed()));
    control.set_blackhole(false);
    traffic.send_down("blackhole", 10);
    traffic.wait_drained(&outbox);

    // rebind-port: the edge's source ports change under a live session.
    let rebind = scenario("rebind-port");
    control.set_impairment(rebind.up, rebind.down);
    let before = traffic.wait_connected();
    traffic.send_down("rebind", 20);
    traffic.send_up(10);
    control.rebind_port();
    traffic.send_down("rebind", 20);
    traffic.send_up(10);
    traffic.wait_drained(&outbox);
    let after = traffic.wait_connected();
    if protocol == "quic" {
        assert_eq!(
            after["connected_since_ms"], before["connected_since_ms"],
            "QUIC reconnected after a port rebind instead of migrating: {before} then {after}"
        );
    }
    assert_ne!(control.nat().port_shift, 0);

    let journal = traffic.journal();
    exactly_once_in_order("downstream", &journal, &traffic.down);
    let mut sse = lab
        .cloud()
        .run(|| Sse::open(traffic.cloud_api, PATIENCE, &format!("node={node}&since=0")));
    sse.until_all(&traffic.up);
    exactly_once_in_order("upstream", &sse.messages(), &traffic.up);
    let (up, down) = control.stats();
    println!(
        "{protocol}: {} ACKed downstream and {} upstream messages across lossy-5, a 5 s \
         blackhole and a port rebind: each exactly once, in order, queues empty; link edge→cloud \
         {up:?}, cloud→edge {down:?}; session since {} (before the rebind {})",
        traffic.down.len(),
        traffic.up.len(),
        after["connected_since_ms"],
        before["connected_since_ms"],
    );
    assert!(up.lost > 0 && down.lost > 0, "lossy-5 lost nothing");
    assert!(up.blackholed > 0 || down.blackholed > 0);
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn quic_across_lossy_blackhole_and_port_rebind() {
    across_impaired_links("quic");
}

#[test]
fn websocket_across_lossy_blackhole_and_port_rebind() {
    across_impaired_links("websocket");
}
