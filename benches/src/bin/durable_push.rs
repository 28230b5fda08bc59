//! `durable_push`: durable delivery rate end to end through the real daemons, per protocol and
//! durability level, beside KubeEdge's figures from `PERFORMANCE.md` (KubeEdge cannot run here,
//! so its column is the published one, not an in-run baseline).
//!
//! ```text
//! cargo build --release -p causeway-benches -p causeway-cloudcore -p causeway-edgecore
//! target/release/durable_push [--messages 20000] [--senders 32] [--upstream 5000]
//!                             [--protocols websocket,quic] [--durability full,normal]
//! ```
//!
//! Each run starts a private cloudcore and one edgecore (found next to this binary), then:
//! - **downstream with ACK**: `--senders` clients POST `--messages` messages (group `resource`,
//!   one configmap each, so metamanager stores each and its ACK goes back) to the cloud API on
//!   kept-alive connections; measured from the first POST until the node's queue is empty (every
//!   message acknowledged: API → cloud store → link → edge store → ACK → cloud store). The edge
//!   runs with the default upstream limit (30 msg/s, burst 60): the ACKs must not pay for it.
//! - **upstream durable**: the edge restarted with the upstream limit lifted, `--senders` local
//!   applications POST `--upstream` messages to the edge's `/v1/upstream` (202 once in the
//!   outbox), measured until the cloud counts them all accepted (outbox → link → cloud store).
//!
//! `--durability full` is the default of both daemons (every commit fsynced, `synchronous=FULL`);
//! `normal` sets the cloud's store and the edge's outbox to `synchronous=NORMAL` (metamanager's
//! store stays FULL: it has no such setting).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_benches::{KeepAlive, SpawnedCloud, SpawnedEdge, metrics, rss_kib, wait_connected};
use certs::files::CertDir;
use certs::{NodeId, Validity};
use transport::Protocol;

/// The node the edge runs as.
const NODE: &str = "bench-edge";
/// Bound on any one wait (connect, drain).
const PATIENCE: Duration = Duration::from_secs(300);

struct Options {
    messages: u64,
    senders: u64,
    upstream: u64,
    protocols: Vec<Protocol>,
    durabilities: Vec<String>,
}

/// What one run measured.
struct Figures {
    /// POSTs answered 202 per second (API → cloud store).
    accepted: f64,
    /// Messages acknowledged by the edge per second, end to end.
    acked: f64,
    /// Downstream resends the cloud made (a missing or late ACK).
    resends: u64,
    /// Upstream messages stored in the outbox per second (202 from the local API).
    outboxed: f64,
    /// Upstream messages accepted by the cloud per second, end to end.
    upstream_accepted: f64,
    /// edgecore's resident memory, connected and idle, before the traffic.
    edge_idle_rss_kib: u64,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut flags: HashMap<String, String> = HashMap::new();
    while let Some(flag) = args.next() {
        let name = flag
            .strip_prefix("--")
            .with_context(|| format!("unexpected argument {flag}"))?;
        let value = args
            .next()
            .with_context(|| format!("--{name} needs a value"))?;
        flags.insert(name.to_owned(), value);
    }
    let number = |name: &str, default: u64| -> Result<u64> {
        flags
            .get(name)
            .map_or(Ok(default), |v| v.parse())
            .with_context(|| format!("--{name}"))
    };
    let list = |name: &str, default: &str| -> Vec<String> {
        flags
            .get(name)
            .map_or(default, String::as_str)
            .split(',')
            .map(str::to_owned)
            .collect()
    };
    let options = Options {
        messages: number("messages", 20_000)?.max(1),
        senders: number("senders", 32)?.max(1),
        upstream: number("upstream", 5_000)?,
        protocols: list("protocols", "websocket,quic")
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|_| anyhow::anyhow!("unknown protocol {p}"))
            })
            .collect::<Result<_>>()?,
        durabilities: list("durability", "full,normal"),
    };
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("the executable's directory")?
        .to_owned();
    println!(
        "durable_push: {} messages downstream, {} upstream, {} senders; one run each (repeat \
         and take medians)",
        options.messages, options.upstream, options.senders
    );
    println!(
        "{:<10} {:<7} {:>12} {:>12} {:>8} {:>12} {:>12} {:>14} {:>12}",
        "protocol",
        "sync",
        "API msg/s",
        "acked msg/s",
        "resends",
        "outbox msg/s",
        "up msg/s",
        "vs KubeEdge",
        "edge idle"
    );
    for &protocol in &options.protocols {
        for durability in &options.durabilities {
            let f = run(&bin_dir, &options, protocol, durability)?;
            // PERFORMANCE.md: KubeEdge's push with ACK per message on this machine kind.
            let kubeedge = match protocol {
                Protocol::Quic => 2_300.0,
                _ => 5_800.0,
            };
            println!(
                "{:<10} {:<7} {:>12.0} {:>12.0} {:>8} {:>12.0} {:>12.0} {:>13.1}x {:>8.1} MiB",
                protocol.as_str(),
                durability,
                f.accepted,
                f.acked,
                f.resends,
                f.outboxed,
                f.upstream_accepted,
                f.acked / kubeedge,
                f.edge_idle_rss_kib as f64 / 1024.0
            );
        }
    }
    Ok(())
}

fn run(bin_dir: &Path, options: &Options, protocol: Protocol, durability: &str) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let cloud = SpawnedCloud::start_with(
        &bin_dir.join("cloudcore").to_string_lossy(),
        dir.path(),
        1,
        [0, 0, 0],
        durability,
    );
    let result = run_with_cloud(bin_dir, options, protocol, durability, dir.path(), &cloud);
    cloud.stop();
    result
}

fn run_with_cloud(
    bin_dir: &Path,
    options: &Options,
    protocol: Protocol,
    durability: &str,
    dir: &Path,
    cloud: &SpawnedCloud,
) -> Result<Figures> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = NodeId::new(NODE)?;
    let pki = CertDir::new(&cloud.cert_dir);
    let now = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let issued = pki
        .load_ca()?
        .issue_node(&node, Validity::days_from(now, 2))?;
    pki.write_node(&node, &issued)?;
    let edgecore = bin_dir.join("edgecore").to_string_lossy().into_owned();
    let yaml = |qps: &str| {
        edge_yaml(
            protocol,
            &cloud.addrs[&protocol],
            &pki,
            &node,
            dir,
            durability,
            qps,
        )
    };

    // Downstream with ACK, the edge at its default upstream limit.
    let edge = SpawnedEdge::start(&edgecore, dir, &yaml("30, message-burst: 60"));
    runtime
        .block_on(wait_connected(&cloud.api, protocol, 1, PATIENCE))
        .map_err(anyhow::Error::msg)?;
    // edgecore idle with its default modules, connected, before any traffic.
    std::thread::sleep(Duration::from_secs(2));
    let edge_idle_rss_kib = rss_kib(edge.pid()).map_err(anyhow::Error::msg)?;
    let resends_before = counter(&cloud.api, "cloudhub_resends_total")?;
    let start = Instant::now();
    post_all(&cloud.api, options.senders, options.messages, |i| {
        (
            format!("/v1/nodes/{NODE}/messages"),
            format!(
                r#"{{"header":{{"msg_id":"dp-{i}"}},"route":{{"source":"bench","group":"resource","operation":"update","resource":"default/configmap/dp-{i}"}},"content":{{"data":{{"n":"{i}"}}}}}}"#
            ),
        )
    })?;
    let accepted_in = start.elapsed();
    let mut api = KeepAlive::connect(&cloud.api).map_err(anyhow::Error::msg)?;
    wait_for("the node's queue to drain", || {
        let (status, body) = api
            .request("GET", &format!("/v1/nodes/{NODE}"), "")
            .map_err(anyhow::Error::msg)?;
        let node: serde_json::Value = serde_json::from_str(&body)?;
        Ok(status == 200 && node["queue"]["pending"] == 0 && node["queue"]["in_flight"] == 0)
    })?;
    let acked_in = start.elapsed();
    let resends = counter(&cloud.api, "cloudhub_resends_total")? - resends_before;
    edge.stop();
    runtime
        .block_on(wait_connected(&cloud.api, protocol, 0, PATIENCE))
        .map_err(anyhow::Error::msg)?;

    // Upstream durable, the limit lifted (it protects the cloud from a runaway edge).
    let (mut outboxed, mut upstream_accepted) = (0.0, 0.0);
    if options.upstream > 0 {
        let edge = SpawnedEdge::start(&edgecore, dir, &yaml("1000000, message-burst: 1000000"));
        runtime
            .block_on(wait_connected(&cloud.api, protocol, 1, PATIENCE))
            .map_err(anyhow::Error::msg)?;
        let accepted_before = counter(&cloud.api, "cloudhub_upstream_accepted_total")?;
        let start = Instant::now();
        post_all(&edge.local, options.senders, options.upstream, |i| {
            (
                "/v1/upstream".to_owned(),
                format!(
                    r#"{{"group":"user","resource":"bench/up","operation":"upload","id":"up-{i}","content":{{"n":{i}}}}}"#
                ),
            )
        })?;
        outboxed = rate(options.upstream, start.elapsed());
        wait_for("the cloud to accept every upstream message", || {
            Ok(
                counter(&cloud.api, "cloudhub_upstream_accepted_total")? - accepted_before
                    >= options.upstream,
            )
        })?;
        upstream_accepted = rate(options.upstream, start.elapsed());
        edge.stop();
    }
    Ok(Figures {
        accepted: rate(options.messages, accepted_in),
        acked: rate(options.messages, acked_in),
        resends,
        outboxed,
        upstream_accepted,
        edge_idle_rss_kib,
    })
}

/// POSTs `n` requests from `senders` threads, each on its own kept-alive connection; `request`
/// gives the path and body of request `i`. Every answer must be 202.
fn post_all(
    addr: &str,
    senders: u64,
    n: u64,
    request: impl Fn(u64) -> (String, String) + Send + Sync + 'static,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let threads: Vec<_> = (0..senders)
        .map(|_| {
            let (next, request, addr) = (next.clone(), request.clone(), addr.to_owned());
            std::thread::spawn(move || -> Result<()> {
                let mut client = KeepAlive::connect(&addr).map_err(anyhow::Error::msg)?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok(());
                    }
                    let (path, body) = (*request)(i);
                    let (status, answer) = client
                        .request("POST", &path, &body)
                        .map_err(anyhow::Error::msg)?;
                    if status != 202 {
                        bail!("POST {path}: {status} {answer}");
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
    }
    Ok(())
}

/// Polls `done` every 20 ms until it holds, for at most [`PATIENCE`].
fn wait_for(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !done()? {
        if Instant::now() > deadline {
            bail!("gave up waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A counter without labels from the cloud's `/metrics`.
fn counter(api: &str, name: &str) -> Result<u64> {
    let text = metrics(api).map_err(anyhow::Error::msg)?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("{name} in /metrics"))
}

fn rate(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

/// The edge's configuration: the default modules, stores in `dir`, the local API on a free
/// port, `message-qps: {qps}` (the rest of that flow mapping included).
fn edge_yaml(
    protocol: Protocol,
    server: &str,
    pki: &CertDir,
    node: &NodeId,
    dir: &Path,
    durability: &str,
    qps: &str,
) -> String {
    let path = |p: PathBuf| p.display().to_string();
    format!(
        "edgehub:
  controller: {{ protocol: {protocol}, heartbeat: 15, node-id: {node}, message-qps: {qps} }}
  {protocol}: {{ server: '{server}' }}
  tls: {{ ca-file: {ca}, cert-file: {cert}, key-file: {key} }}
  outbox: {{ path: {outbox}, durability: {durability} }}
modules:
  metamanager: {{ path: {meta} }}
  local-api: {{ listen: '127.0.0.1:0' }}
",
        protocol = protocol.as_str(),
        node = node.as_str(),
        ca = path(pki.ca_cert()),
        cert = path(pki.node_cert(node)),
        key = path(pki.node_key(node)),
        outbox = path(dir.join("outbox.db")),
        meta = path(dir.join("meta.db")),
    )
}
