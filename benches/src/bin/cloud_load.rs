//! `cloud_load`: opens many node sessions from one process against a cloudcore and reports the
//! cloudcore's resident memory (`VmRSS` in `/proc/<pid>/status`) with 1 and with N nodes
//! connected, per protocol, and the memory per additional node. Each test node has its own
//! certificate (issued from the cloud's CA), sends a keepalive every heartbeat and reads what
//! the cloud sends, as an idle edge does.
//!
//! ```text
//! # start a private cloudcore (temporary PKI, state and free loopback ports) and measure it:
//! cloud_load --spawn target/release/cloudcore --nodes 1000
//! # or measure a running one (its CA key must be readable to issue node certificates):
//! cloud_load --pid 1234 --cert-dir /etc/causeway/pki --websocket 127.0.0.1:10000 \
//!            --quic 127.0.0.1:10001 --api 127.0.0.1:10003 --nodes 1000
//! ```
//!
//! Options: `--protocols websocket,quic` (default both), `--heartbeat SECS` (default 15),
//! `--connect-concurrency N` (handshakes in flight, default 64). The cloudcore's node limit must
//! allow N nodes (a spawned one is configured so). Needs about 2N file descriptors in total.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_benches::{SpawnedCloud, keepalive, rss_kib, wait_connected};
use certs::files::CertDir;
use certs::{NodeId, Validity};
use tokio::sync::Semaphore;
use transport::{Connection, DialConfig, Protocol};

/// Bound on waiting for the cloud to count its nodes.
const PATIENCE: Duration = Duration::from_secs(300);

/// Where the cloudcore under test is.
struct Target {
    pid: u32,
    cert_dir: PathBuf,
    addrs: HashMap<Protocol, String>,
    api: String,
    /// A cloudcore we started (stopped at the end) and its temporary directory.
    spawned: Option<(SpawnedCloud, tempfile::TempDir)>,
}

struct Options {
    nodes: usize,
    protocols: Vec<Protocol>,
    heartbeat: Duration,
    concurrency: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: cloud_load (--spawn CLOUDCORE | --pid PID --cert-dir DIR --websocket ADDR \
         --quic ADDR --api ADDR) [--nodes N] [--protocols websocket,quic] [--heartbeat SECS] \
         [--connect-concurrency N]"
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
    let parse = |name: &str, default: usize| -> usize {
        flags
            .get(name)
            .map_or(Some(default), |v| v.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let options = Options {
        nodes: parse("nodes", 1000).max(1),
        protocols: flags
            .get("protocols")
            .map_or("websocket,quic", String::as_str)
            .split(',')
            .map(|p| p.parse::<Protocol>().unwrap_or_else(|_| usage()))
            .collect(),
        heartbeat: Duration::from_secs(u64::try_from(parse("heartbeat", 15)).unwrap_or(15)),
        concurrency: parse("connect-concurrency", 64).max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "{} nodes per protocol; heartbeat {:?}",
        options.nodes, options.heartbeat
    );
    println!(
        "protocol   rss_idle_kib  rss_1_node_kib  rss_{}_nodes_kib  kib_per_node  connect_s",
        options.nodes
    );
    let result = match flags.get("spawn") {
        // A fresh cloudcore per protocol, so one protocol's freed memory does not hide the
        // other's growth.
        Some(bin) => options.protocols.iter().try_for_each(|&protocol| {
            let mut target = spawn(bin, options.nodes);
            let result = runtime.block_on(run(&target, &options, protocol));
            if let Some((cloud, _dir)) = target.spawned.take() {
                cloud.stop();
            }
            result
        }),
        None => {
            let target = Target {
                pid: flags
                    .get("pid")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| usage()),
                cert_dir: flags
                    .get("cert-dir")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| usage()),
                addrs: [
                    (Protocol::WebSocket, flags.get("websocket").cloned()),
                    (Protocol::Quic, flags.get("quic").cloned()),
                ]
                .into_iter()
                .filter_map(|(p, a)| a.map(|a| (p, a)))
                .collect(),
                api: flags.get("api").cloned().unwrap_or_else(|| usage()),
                spawned: None,
            };
            options
                .protocols
                .iter()
                .try_for_each(|&protocol| runtime.block_on(run(&target, &options, protocol)))
        }
    };
    if let Err(e) = result {
        eprintln!("cloud_load: {e}");
        std::process::exit(1);
    }
}

/// Starts a cloudcore on free loopback ports with a temporary PKI and state.
fn spawn(bin: &str, nodes: usize) -> Target {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = SpawnedCloud::start(bin, dir.path(), nodes, [0; 3]);
    Target {
        pid: cloud.pid(),
        cert_dir: cloud.cert_dir.clone(),
        addrs: cloud.addrs.clone(),
        api: cloud.api.clone(),
        spawned: Some((cloud, dir)),
    }
}

/// Measures one protocol: idle, one node, N nodes; then disconnects them all.
async fn run(target: &Target, options: &Options, protocol: Protocol) -> Result<(), String> {
    let ca = CertDir::new(&target.cert_dir)
        .load_ca()
        .map_err(|e| format!("loading the CA from {}: {e}", target.cert_dir.display()))?;
    let ca = Arc::new(ca);
    let anchors = ca.trust_anchors();
    {
        let Some(addr) = target.addrs.get(&protocol) else {
            return Err(format!("no address for {protocol}"));
        };
        let idle = rss_kib(target.pid)?;
        let dial = |i: usize| -> Result<DialConfig, String> {
            let node = NodeId::new(format!("load-{}-{i}", protocol.as_str()))
                .map_err(|e| e.to_string())?;
            let now = time::OffsetDateTime::now_utc();
            let identity = ca
                .issue_node(&node, Validity::days_from(now, 1))
                .map_err(|e| e.to_string())?
                .identity;
            Ok(DialConfig::new(
                addr.clone(),
                node,
                identity,
                anchors.clone(),
            ))
        };
        let first = connect(protocol, dial(0)?, options.heartbeat).await?;
        wait_connected(&target.api, protocol, 1, PATIENCE).await?;
        let one = rss_kib(target.pid)?;
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(options.concurrency));
        let mut tasks = Vec::new();
        for i in 1..options.nodes {
            let config = dial(i)?;
            let gate = Arc::clone(&gate);
            let heartbeat = options.heartbeat;
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
                connect(protocol, config, heartbeat).await
            }));
        }
        let mut sessions = vec![first];
        for task in tasks {
            sessions.push(task.await.map_err(|e| e.to_string())??);
        }
        wait_connected(&target.api, protocol, options.nodes, PATIENCE).await?;
        let connect_secs = started.elapsed().as_secs_f64();
        let all = rss_kib(target.pid)?;
        let per_node = if options.nodes > 1 {
            (all.saturating_sub(one)) as f64 / (options.nodes - 1) as f64
        } else {
            0.0
        };
        println!(
            "{:<9} {:>13} {:>15} {:>17} {:>13.1} {:>10.1}   (cloudcore pid {})",
            protocol.as_str(),
            idle,
            one,
            all,
            per_node,
            connect_secs,
            target.pid
        );
        for session in &sessions {
            session.stop();
        }
        for session in sessions {
            session.finish().await;
        }
        wait_connected(&target.api, protocol, 0, PATIENCE).await?;
    }
    Ok(())
}

/// One connected test node: a task heartbeating and reading until stopped.
struct Session {
    conn: Arc<dyn Connection>,
    task: tokio::task::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
}

impl Session {
    fn stop(&self) {
        self.stop.notify_one();
    }

    async fn finish(self) {
        let _ = self.task.await;
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.conn.close("load test done")).await;
    }
}

async fn connect(
    protocol: Protocol,
    config: DialConfig,
    heartbeat: Duration,
) -> Result<Session, String> {
    let conn: Arc<dyn Connection> = Arc::from(
        transport::connect(protocol, &config)
            .await
            .map_err(|e| format!("{protocol} connect: {e}"))?,
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = {
        let conn = Arc::clone(&conn);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tokio::select! {
                    () = stop.notified() => return,
                    _ = tick.tick() => {
                        if conn.send(keepalive()).await.is_err() {
                            return;
                        }
                    }
                    received = conn.recv() => match received {
                        Ok(Some(_)) => {}
                        _ => return,
                    },
                }
            }
        })
    };
    Ok(Session { conn, task, stop })
}
