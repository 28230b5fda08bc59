//! `reconnect_storm`: N edge nodes connected to one cloudcore, the cloudcore SIGKILLed and
//! restarted at once on the same ports and state, and the fleet's way back measured: when each
//! node noticed the loss, when it was back, the shape of the reconnects over time, the restarted
//! cloudcore's peak memory and CPU until every node is back, and whether any node was left
//! half-registered (the cloud's node list must show each node once, connected).
//!
//! Each node is driven by the real edge session state machine (`session::edge::EdgeSession`,
//! the one edgecore runs: dead-cloud detection, the reconnect wait of two heartbeats plus
//! jitter, exponential backoff with full jitter on failed attempts) over the real transport;
//! only the modules are left out: a node sends keepalives and reads what comes.
//!
//! ```text
//! cargo build --release -p causeway-cloudcore -p causeway-benches
//! target/release/reconnect_storm --spawn target/release/cloudcore --nodes 1000 \
//!     [--protocol websocket|quic] [--heartbeat SECS]
//! ```
//! A measurement, not a test: it prints figures and fails only if the fleet does not come back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_benches::{SpawnedCloud, cpu_time, http_get, rss_kib, wait_connected};
use certs::files::CertDir;
use certs::{NodeId, Validity};
use session::edge::{Action, EdgeSession, Event, Generation, SessionConfig, SessionEvent};
use tokio::sync::{Semaphore, mpsc};
use transport::{Connection, DialConfig, Protocol};

/// Bound on the fleet's return.
const PATIENCE: Duration = Duration::from_secs(600);

/// What a node reports, with when.
#[derive(Debug, Clone, Copy)]
enum Report {
    Connected,
    Disconnected,
    ConnectFailed,
}

fn usage() -> ! {
    eprintln!(
        "usage: reconnect_storm --spawn CLOUDCORE [--nodes N] [--protocol websocket|quic] \
         [--heartbeat SECS]"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut flags: HashMap<String, String> = HashMap::new();
    while let Some(flag) = args.next() {
        let Some(name) = flag.strip_prefix("--") else {
            usage()
        };
        let Some(value) = args.next() else { usage() };
        flags.insert(name.to_owned(), value);
    }
    let bin = flags.get("spawn").cloned().unwrap_or_else(|| usage());
    let nodes: usize = flags
        .get("nodes")
        .map_or(Some(1000), |v| v.parse().ok())
        .unwrap_or_else(|| usage())
        .max(1);
    let protocol: Protocol = flags
        .get("protocol")
        .map_or("websocket", String::as_str)
        .parse()
        .unwrap_or_else(|_| usage());
    let heartbeat = Duration::from_secs(
        flags
            .get("heartbeat")
            .map_or(Some(5), |v| v.parse().ok())
            .unwrap_or_else(|| usage()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(storm(&bin, nodes, protocol, heartbeat)) {
        eprintln!("reconnect_storm: {e}");
        std::process::exit(1);
    }
}

async fn storm(
    bin: &str,
    nodes: usize,
    protocol: Protocol,
    heartbeat: Duration,
) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cloud = SpawnedCloud::start(bin, dir.path(), nodes, [0; 3]);
    let ports = cloud.ports();
    let api = cloud.api.clone();
    let server = cloud.addrs[&protocol].clone();
    let ca = CertDir::new(&cloud.cert_dir)
        .load_ca()
        .map_err(|e| format!("loading the CA: {e}"))?;
    let anchors = ca.trust_anchors();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant, Report)>();
    // The first connects go through a gate, as a fleet boots spread out; reconnects do not.
    let gate = Arc::new(Semaphore::new(64));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let node = NodeId::new(format!("storm-{i}")).map_err(|e| e.to_string())?;
        let identity = ca
            .issue_node(
                &node,
                Validity::days_from(time::OffsetDateTime::now_utc(), 1),
            )
            .map_err(|e| e.to_string())?
            .identity;
        // edgecore's own settings for this heartbeat: session timing and transport deadlines.
        let mut edge = edgehub::EdgeHubConfig::new(node.clone());
        edge.controller.protocol = protocol;
        edge.controller.heartbeat =
            edgehub::config::Seconds::new(u32::try_from(heartbeat.as_secs()).unwrap_or(u32::MAX))
                .map_err(|e| e.to_string())?;
        let mut dial = DialConfig::new(server.clone(), node, identity, anchors.clone());
        dial.link = edge.link_config();
        tasks.push(tokio::spawn(run_node(
            i,
            protocol,
            dial,
            edge.session_config(),
            Arc::clone(&gate),
            tx.clone(),
            Arc::clone(&stop),
        )));
    }
    drop(tx);
    let started = Instant::now();
    wait_connected(&api, protocol, nodes, PATIENCE).await?;
    println!(
        "{nodes} {protocol} nodes connected in {:.1} s (heartbeat {heartbeat:?}); killing \
         cloudcore after two heartbeats of steady state",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(heartbeat * 2).await;
    while rx.try_recv().is_ok() {}

    let killed_at = Instant::now();
    cloud.kill();
    let cloud = SpawnedCloud::start(bin, dir.path(), nodes, ports);
    let up_at = cloud.listening_at;
    let pid = cloud.pid();
    let cpu_start = cpu_time(pid)?;
    let mut peak_rss = rss_kib(pid)?;
    let mut noticed: HashMap<usize, Instant> = HashMap::new();
    let mut back: HashMap<usize, Instant> = HashMap::new();
    let mut failed_attempts = 0u64;
    let deadline = Instant::now() + PATIENCE;
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    while back.len() < nodes {
        tokio::select! {
            report = rx.recv() => match report {
                Some((i, at, Report::Disconnected)) => { noticed.entry(i).or_insert(at); }
                Some((i, at, Report::Connected)) => { back.entry(i).or_insert(at); }
                Some((_, _, Report::ConnectFailed)) => failed_attempts += 1,
                None => return Err("every node task ended".into()),
            },
            _ = sample.tick() => {
                peak_rss = peak_rss.max(rss_kib(pid)?);
                if Instant::now() > deadline {
                    return Err(format!("only {} of {nodes} nodes came back", back.len()));
                }
            }
        }
    }
    let all_back = Instant::now();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_start);
    peak_rss = peak_rss.max(rss_kib(pid)?);
    wait_connected(&cloud.api, protocol, nodes, PATIENCE).await?;
    let registered = registered_nodes(&cloud.api)?;

    let after_up = |t: &Instant| t.saturating_duration_since(up_at).as_secs_f64();
    let mut detect: Vec<f64> = noticed
        .values()
        .map(|t| t.saturating_duration_since(killed_at).as_secs_f64())
        .collect();
    let mut returns: Vec<f64> = back.values().map(after_up).collect();
    println!(
        "cloudcore restarted {:.2} s after the kill",
        up_at.saturating_duration_since(killed_at).as_secs_f64()
    );
    println!("loss noticed after the kill (s): {}", summary(&mut detect));
    println!("back after the restart (s):      {}", summary(&mut returns));
    println!(
        "all {nodes} back {:.2} s after the restart; {failed_attempts} failed attempts meanwhile",
        after_up(&all_back)
    );
    println!(
        "restarted cloudcore until all were back: peak RSS {:.1} MiB, CPU {:.2} s",
        peak_rss as f64 / 1024.0,
        cpu.as_secs_f64()
    );
    println!(
        "node list: {} nodes, {} connected, {} listed twice",
        registered.total, registered.connected, registered.duplicates
    );
    println!("reconnects per 500 ms after the restart:");
    let mut buckets: Vec<usize> = Vec::new();
    for t in &returns {
        let b = (t / 0.5) as usize;
        if buckets.len() <= b {
            buckets.resize(b + 1, 0);
        }
        buckets[b] += 1;
    }
    let widest = buckets.iter().copied().max().unwrap_or(1).max(1);
    for (b, n) in buckets.iter().enumerate() {
        if *n > 0 {
            println!(
                "  {:>6.1} s {:>5}  {}",
                b as f64 * 0.5,
                n,
                "#".repeat((n * 60).div_ceil(widest))
            );
        }
    }
    stop.notify_waiters();
    for task in tasks {
        task.abort();
    }
    cloud.stop();
    if registered.total != nodes || registered.connected != nodes || registered.duplicates != 0 {
        return Err("the node list does not show every node once, connected".into());
    }
    Ok(())
}

/// Min / median / p90 / max of `values` (sorted in place).
fn summary(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "none".into();
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:.2}  p50 {:.2}  p90 {:.2}  max {:.2}  (n={})",
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0),
        values.len()
    )
}

struct Registered {
    total: usize,
    connected: usize,
    duplicates: usize,
}

/// What `GET /v1/nodes` says of the storm's nodes.
fn registered_nodes(api: &str) -> Result<Registered, String> {
    let text = http_get(api, "/v1/nodes")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value: serde_json::Value = serde_json::from_str(body.trim())
        .or_else(|_| serde_json::from_str(&dechunk(body)))
        .map_err(|e| format!("node list: {e}"))?;
    let list = value
        .get("nodes")
        .and_then(|n| n.as_array())
        .or_else(|| value.as_array())
        .ok_or("node list: no array")?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut connected = 0;
    for node in list {
        let id = node["id"].as_str().unwrap_or_default();
        if !id.starts_with("storm-") {
            continue;
        }
        *seen.entry(id).or_default() += 1;
        if node["connected"] == true {
            connected += 1;
        }
    }
    Ok(Registered {
        total: seen.len(),
        connected,
        duplicates: seen.values().filter(|n| **n > 1).count(),
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One node: the real edge session over the real transport, keepalives only.
async fn run_node(
    index: usize,
    protocol: Protocol,
    dial: DialConfig,
    config: SessionConfig,
    gate: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<(usize, Instant, Report)>,
    stop: Arc<tokio::sync::Notify>,
) {
    let now = || tokio::time::Instant::now().into_std();
    let mut session = EdgeSession::with_seed(config, now(), index as u64);
    let mut link: Option<(Generation, Arc<dyn Connection>)> = None;
    // As in edgecore, a reader task per connection: a write that waits never hides a failure.
    let (inbound_tx, mut inbound_rx) = mpsc::unbounded_channel();
    let mut first = true;
    loop {
        loop {
            let mut progress = false;
            while let Some(action) = session.poll_action() {
                progress = true;
                match action {
                    Action::Connect { generation } => {
                        let permit = if first {
                            gate.clone().acquire_owned().await.ok()
                        } else {
                            None
                        };
                        first = false;
                        match transport::connect(protocol, &dial).await {
                            Ok(conn) => {
                                let upstream_ack = conn.peer().capabilities.upstream_ack;
                                let conn: Arc<dyn Connection> = Arc::from(conn);
                                let reader = Arc::clone(&conn);
                                let inbound = inbound_tx.clone();
                                tokio::spawn(async move {
                                    loop {
                                        let result = reader.recv().await;
                                        let last = !matches!(result, Ok(Some(_)));
                                        if inbound.send((generation, result)).is_err() || last {
                                            return;
                                        }
                                    }
                                });
                                link = Some((generation, conn));
                                session.handle_event(
                                    now(),
                                    Event::Connected {
                                        generation,
                                        upstream_ack,
                                    },
                                );
                            }
                            Err(e) => session.handle_event(
                                now(),
                                Event::ConnectFailed {
                                    generation,
                                    fault: e.fault(),
                                },
                            ),
                        }
                        drop(permit);
                    }
                    Action::Close { generation, reason } => {
                        if let Some((_, conn)) = link.take_if(|(g, _)| *g == generation) {
                            let reason = reason.to_string();
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(2),
                                    conn.close(&reason),
                                )
                                .await;
                            });
                        }
                    }
                    Action::Forget { .. } => {}
                }
            }
            while let Some(transmit) = session.poll_transmit(now()) {
                progress = true;
                if let Some((generation, conn)) = &link
                    && *generation == transmit.generation
                    && let Err(e) = conn.send(transmit.message).await
                {
                    session.handle_event(
                        now(),
                        Event::Failed {
                            generation: *generation,
                            fault: e.fault(),
                        },
                    );
                }
            }
            while let Some(event) = session.poll_event() {
                progress = true;
                let report = match event {
                    SessionEvent::Connected { .. } => Report::Connected,
                    SessionEvent::Disconnected { .. } => Report::Disconnected,
                    SessionEvent::ConnectFailed { .. } => Report::ConnectFailed,
                    _ => continue,
                };
                let _ = reports.send((index, Instant::now(), report));
            }
            if !progress {
                break;
            }
        }
        let deadline = session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = stop.notified() => return,
            Some((generation, result)) = inbound_rx.recv() => match result {
                Ok(Some(message)) => session.handle_message(now(), generation, message),
                Ok(None) => session.handle_event(now(), Event::Failed {
                    generation,
                    fault: proto::Fault::network("closed by the cloud"),
                }),
                Err(e) => session.handle_event(now(), Event::Failed {
                    generation,
                    fault: e.fault(),
                }),
            },
            () = tokio::time::sleep_until(deadline) => session.handle_timeout(now()),
        }
    }
}
