//! QUIC and WebSocket across the same emulated lossy links (issue 14): the real adapters, the
//! server in the link lab's cloud namespace and the client in its edge namespace, every packet
//! through the lab's forwarder (`causeway-linklab`). Per scenario and protocol, in one run:
//!
//! - latency of 1 KiB messages offered at a fixed rate each way at once (p50 / p90 / p99 / max,
//!   from the scheduled send time to the receipt, so time spent waiting to send counts);
//! - goodput of pipelined 4 KiB messages edge → cloud, as a fraction of the link rate where the
//!   scenario has one;
//! - `blackhole`: after 5 s of total loss mid-stream, the time from the link's return to the
//!   first delivered message and to the backlog drained (the adapters only: no reconnect, so
//!   this is the transport's own retransmission timer);
//! - `rebind-port` / `rebind-addr`: whether the connection survived the NAT rebind;
//! - `handshake-loss`: connection set-up time under 30 % loss;
//! - `udp-blocked`: whether a connection could be made at all;
//! - head-of-line blocking (on `lossy-2`): the small messages' latency edge → cloud while
//!   another resource streams bulk data on the same connection (QUIC: its own stream;
//!   WebSocket: the one TCP stream).
//!
//! Root only (namespaces, TUN). Run: `cargo run -p causeway-benches --bin lossy_links`
//! (`LOSSY_SCENARIOS=clean,lossy-5` for some scenarios only). Prints tables in Markdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use certs::{CertificateAuthority, Identity, NodeId, TrustAnchors, Validity};
use linklab::model::{Impairment, Loss};
use linklab::scenario::{self, Disruption, Scenario};
use linklab::{CLOUD_ADDR, Lab, LabError, NetnsEntry};
use proto::{Content, Message};
use tokio::runtime::Runtime;
use transport::config::LinkConfig;
use transport::{Connection, DialConfig, ListenConfig, ListenSocket, Listener, Protocol};

/// Offered rate of the latency stream, each way.
const RATE_PER_S: u64 = 50;
/// Length of the latency stream.
const STREAM: Duration = Duration::from_secs(6);
/// Where in the stream a disruption (blackhole, rebind) starts.
const DISRUPT_AT: Duration = Duration::from_secs(3);
/// Latency message payload.
const SMALL: usize = 1024;
/// Goodput message payload.
const LARGE: usize = 4096;
/// Bulk message payload of the head-of-line measurement.
const BULK: usize = 64 * 1024;
/// The bulk resource (another QUIC stream than the small messages' `default/configmap/lossy`
/// with the default 8 message streams).
const BULK_RESOURCE: &str = "default/configmap/bulk";
/// Connection attempts timed under `handshake-loss`.
const CONNECTS: usize = 5;
/// How long a receiver waits past the stream for stragglers.
const GRACE: Duration = Duration::from_secs(20);

struct Pki {
    server: Identity,
    node: Identity,
    anchors: TrustAnchors,
}

impl Pki {
    fn new() -> Result<Self> {
        let now = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let ca = CertificateAuthority::generate(Validity::days_from(now, 2))?;
        let server = ca
            .issue_server(&[], &[CLOUD_ADDR.into()], Validity::days_from(now, 2))?
            .identity;
        let node = ca
            .issue_node(&NodeId::new("lossy-1")?, Validity::days_from(now, 2))?
            .identity;
        Ok(Self {
            server,
            node,
            anchors: ca.trust_anchors(),
        })
    }
}

/// The link settings of both ends: a read deadline long enough that a 5 s blackhole does not
/// end the connection (what is measured is the transport's recovery, not a reconnect).
fn link() -> LinkConfig {
    LinkConfig {
        handshake_timeout: Duration::from_secs(20),
        read_deadline: Duration::from_secs(30),
        write_deadline: Duration::from_secs(30),
        keep_alive_interval: Duration::from_secs(5),
        ..LinkConfig::default()
    }
}

/// A runtime whose threads live in a namespace: sockets its tasks open are there.
fn runtime_in(entry: NetnsEntry) -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = entry.enter() {
                panic!("{e}");
            }
        })
        .build()?)
}

/// Runs `fut` as a task of `rt` (on its namespace's threads) and waits for it.
fn on<T: Send + 'static>(
    rt: &Runtime,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    rt.block_on(rt.spawn(fut))?
}

/// One connected pair: the edge's client and the cloud's served end.
struct Pair {
    client: Arc<dyn Connection>,
    served: Arc<dyn Connection>,
    _listener: Box<dyn Listener>,
}

struct Ends<'a> {
    cloud: &'a Runtime,
    edge: &'a Runtime,
    pki: &'a Pki,
}

impl Ends<'_> {
    fn listen(&self, protocol: Protocol) -> Result<(SocketAddr, Box<dyn Listener>)> {
        let mut config = ListenConfig::new(self.pki.server.clone(), self.pki.anchors.clone());
        config.link = link();
        on(self.cloud, async move {
            let socket = ListenSocket::bind(protocol, (CLOUD_ADDR, 0).into()).await?;
            let addr = socket.local_addr()?;
            let listener =
                transport::listen(protocol, socket, config, Box::pin(std::future::pending()))?;
            Ok((addr, listener))
        })
    }

    fn connect(&self, protocol: Protocol, addr: SocketAddr) -> Result<Box<dyn Connection>> {
        let mut dial = DialConfig::new(
            addr.to_string(),
            NodeId::new("lossy-1")?,
            self.pki.node.clone(),
            self.pki.anchors.clone(),
        );
        dial.link = link();
        on(self.edge, async move {
            Ok(transport::connect(protocol, &dial).await?)
        })
    }

    fn pair(&self, protocol: Protocol) -> Result<Pair> {
        let (addr, mut listener) = self.listen(protocol)?;
        let client = self.connect(protocol, addr)?;
        let (served, listener) = on(self.cloud, async move {
            let served = listener
                .accept()
                .await
                .context("listener ended")?
                .context("accept")?;
            Ok((served, listener))
        })?;
        Ok(Pair {
            client: Arc::from(client),
            served: Arc::from(served),
            _listener: listener,
        })
    }
}

fn message(size: usize, seq: usize) -> Message {
    let mut msg = Message::new("")
        .route("lossy", "resource", "default/configmap/lossy", "update")
        .content(Content::text("x".repeat(size)));
    msg.header.id = seq.to_string();
    msg
}

/// A bulk message about [`BULK_RESOURCE`]; its id does not parse as a sequence number, so
/// [`take`] skips it.
fn bulk_message(seq: usize) -> Message {
    let mut msg = Message::new("")
        .route("lossy", "resource", BULK_RESOURCE, "update")
        .content(Content::text("b".repeat(BULK)));
    msg.header.id = format!("bulk-{seq}");
    msg
}

/// Latency samples of one direction: (scheduled send, receipt) offsets in µs by sequence.
struct Stream {
    sent: Vec<u64>,
    received: Vec<Option<u64>>,
    error: Option<String>,
}

fn micros(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// Sends `n` small messages at the fixed rate from `origin`; each message's send time is its
/// scheduled one.
async fn offer(conn: Arc<dyn Connection>, n: usize, origin: Instant) -> Result<()> {
    let interval = Duration::from_micros(1_000_000 / RATE_PER_S);
    for seq in 0..n {
        tokio::time::sleep_until((origin + interval * seq as u32).into()).await;
        conn.send(message(SMALL, seq)).await?;
    }
    Ok(())
}

/// Receives until `n` messages or `until`; receipt times by sequence.
async fn take(
    conn: Arc<dyn Connection>,
    n: usize,
    origin: Instant,
    until: Instant,
) -> (Vec<Option<u64>>, Option<String>) {
    let mut got = vec![None; n];
    let mut count = 0;
    while count < n {
        match tokio::time::timeout_at(until.into(), conn.recv()).await {
            Err(_) => return (got, Some("timed out".into())),
            Ok(Err(e)) => return (got, Some(e.to_string())),
            Ok(Ok(None)) => return (got, Some("closed".into())),
            Ok(Ok(Some(msg))) => {
                if let Some(slot) = msg
                    .header
                    .id
                    .parse::<usize>()
                    .ok()
                    .and_then(|s| got.get_mut(s))
                    && slot.is_none()
                {
                    *slot = Some(micros(origin));
                    count += 1;
                }
            }
        }
    }
    (got, None)
}

/// The fixed-rate stream both ways at once, with `disrupt` called at [`DISRUPT_AT`] and
/// `heal` (if any) after the given time. Returns (down, up, when healed in µs).
fn stream_both_ways(
    ends: &Ends<'_>,
    pair: &Pair,
    disrupt: impl FnOnce(),
    heal: Option<(Duration, Box<dyn FnOnce() + '_>)>,
) -> (Stream, Stream, Option<u64>) {
    let n = (STREAM.as_secs() * RATE_PER_S) as usize;
    let origin = Instant::now() + Duration::from_millis(100);
    let until = origin + STREAM + heal.as_ref().map_or(Duration::ZERO, |h| h.0) + GRACE;
    let interval = 1_000_000 / RATE_PER_S;
    let scheduled: Vec<u64> = (0..n as u64).map(|s| 100_000 + s * interval).collect();
    let down_send = ends.cloud.spawn(offer(pair.served.clone(), n, origin));
    let up_send = ends.edge.spawn(offer(pair.client.clone(), n, origin));
    let down_recv = ends.edge.spawn(take(
        pair.client.clone(),
        n,
        origin - Duration::from_millis(100),
        until,
    ));
    let up_recv = ends.cloud.spawn(take(
        pair.served.clone(),
        n,
        origin - Duration::from_millis(100),
        until,
    ));
    std::thread::sleep((origin + DISRUPT_AT).saturating_duration_since(Instant::now()));
    disrupt();
    let healed = heal.map(|(after, heal)| {
        std::thread::sleep(after);
        heal();
        (Instant::now() + Duration::from_millis(100) - origin).as_micros() as u64
    });
    let result =
        |send: tokio::task::JoinHandle<Result<()>>,
         recv: tokio::task::JoinHandle<(Vec<Option<u64>>, Option<String>)>| {
            let (received, mut error) = ends
                .edge
                .block_on(recv)
                .unwrap_or_else(|e| (vec![None; n], Some(e.to_string())));
            if let Ok(Ok(Err(e))) = ends
                .edge
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), send).await })
            {
                error.get_or_insert(format!("send: {e}"));
            }
            Stream {
                sent: scheduled.clone(),
                received,
                error,
            }
        };
    let down = result(down_send, down_recv);
    let up = result(up_send, up_recv);
    (down, up, healed)
}

/// p50 / p90 / p99 / max in ms of the delivered messages, and how many were delivered.
fn percentiles(s: &Stream) -> (usize, [f64; 4]) {
    let mut lat: Vec<u64> = s
        .sent
        .iter()
        .zip(&s.received)
        .filter_map(|(sent, got)| got.map(|g| g.saturating_sub(*sent)))
        .collect();
    lat.sort_unstable();
    if lat.is_empty() {
        return (0, [f64::NAN; 4]);
    }
    let at = |q: f64| {
        lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    (lat.len(), [at(0.50), at(0.90), at(0.99), at(1.0)])
}

/// After the link returned at `healed`: first delivery after it, and when every message
/// scheduled before it was delivered (ms), `None` if never.
fn recovery(s: &Stream, healed: u64) -> (Option<f64>, Option<f64>) {
    let first = s
        .received
        .iter()
        .flatten()
        .filter(|r| **r >= healed)
        .min()
        .map(|r| (r - healed) as f64 / 1000.0);
    let backlog: Vec<Option<u64>> = s
        .sent
        .iter()
        .zip(&s.received)
        .filter(|(sent, _)| **sent < healed)
        .map(|(_, r)| *r)
        .collect();
    let drained = if backlog.iter().all(Option::is_some) {
        backlog
            .iter()
            .flatten()
            .max()
            .map(|r| r.saturating_sub(healed) as f64 / 1000.0)
    } else {
        None
    };
    (first, drained)
}

/// Pipelined large messages edge → cloud: goodput in Mb/s.
fn goodput(ends: &Ends<'_>, pair: &Pair, rate_bps: Option<u64>) -> Result<f64> {
    let n = match rate_bps {
        Some(rate) => ((rate / 8 * 4) as usize / LARGE).max(50),
        None => 2500,
    };
    let served = pair.served.clone();
    let receiver = ends.cloud.spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(90);
        for _ in 0..n {
            match tokio::time::timeout_at(until, served.recv()).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => bail!("closed"),
                Ok(Err(e)) => bail!("{e}"),
                Err(_) => bail!("timed out"),
            }
        }
        Ok(Instant::now())
    });
    let client = pair.client.clone();
    let start = Instant::now();
    let sender = ends.edge.spawn(async move {
        let msg = message(LARGE, 0);
        for _ in 0..n {
            client.send(msg.clone()).await?;
        }
        anyhow::Ok(())
    });
    let end = ends.cloud.block_on(receiver)??;
    ends.edge.block_on(sender)??;
    Ok((n * LARGE * 8) as f64 / (end - start).as_secs_f64() / 1e6)
}

/// The small messages edge → cloud at the fixed rate while the edge pipelines bulk messages
/// about another resource as fast as the connection takes them.
fn head_of_line(ends: &Ends<'_>, pair: &Pair) -> Stream {
    let n = (STREAM.as_secs() * RATE_PER_S) as usize;
    let origin = Instant::now() + Duration::from_millis(100);
    let until = origin + STREAM + GRACE;
    let client = pair.client.clone();
    let bulk = ends.edge.spawn(async move {
        for seq in 0.. {
            client.send(bulk_message(seq)).await?;
        }
        anyhow::Ok(())
    });
    let small = ends.edge.spawn(offer(pair.client.clone(), n, origin));
    let served = pair.served.clone();
    let recv = ends.cloud.spawn(async move {
        // take() skips the bulk messages (their ids are not sequence numbers).
        take(served, n, origin - Duration::from_millis(100), until).await
    });
    let (received, mut error) = ends
        .cloud
        .block_on(recv)
        .unwrap_or_else(|e| (vec![None; n], Some(e.to_string())));
    bulk.abort();
    if let Ok(Err(e)) = ends.edge.block_on(small) {
        error.get_or_insert(format!("send: {e}"));
    }
    Stream {
        sent: (0..n as u64)
            .map(|s| 100_000 + s * (1_000_000 / RATE_PER_S))
            .collect(),
        received,
        error,
    }
}

/// What one protocol did on one scenario.
struct Outcome {
    protocol: Protocol,
    down: Option<Stream>,
    up: Option<Stream>,
    healed: Option<u64>,
    goodput: Option<Result<f64>>,
    hol: Option<Stream>,
    connect_ms: Vec<f64>,
    failure: Option<String>,
}

fn measure(lab: &Lab, scenario: &Scenario, protocol: Protocol, ends: &Ends<'_>) -> Outcome {
    let mut out = Outcome {
        protocol,
        down: None,
        up: None,
        healed: None,
        goodput: None,
        hol: None,
        connect_ms: Vec::new(),
        failure: None,
    };
    let control = lab.control();
    control.restore();
    if let Disruption::HandshakeLoss(loss) = scenario.disruption {
        let lossy = |i: Impairment| Impairment {
            loss: Loss::Random(loss),
            ..i
        };
        control.set_impairment(lossy(scenario.up), lossy(scenario.down));
        for _ in 0..CONNECTS {
            let start = Instant::now();
            match ends.pair(protocol) {
                Ok(_) => out.connect_ms.push(start.elapsed().as_secs_f64() * 1000.0),
                Err(e) => {
                    out.failure = Some(format!("connect: {e:#}"));
                    break;
                }
            }
        }
        control.restore();
    }
    let pair = match ends.pair(protocol) {
        Ok(p) => p,
        Err(e) => {
            out.failure = Some(format!("connect: {e:#}"));
            return out;
        }
    };
    let (down, up, healed) = match scenario.disruption {
        Disruption::Blackhole(length) => stream_both_ways(
            ends,
            &pair,
            || control.set_blackhole(true),
            Some((length, Box::new(|| control.set_blackhole(false)))),
        ),
        Disruption::RebindPort => stream_both_ways(ends, &pair, || control.rebind_port(), None),
        Disruption::RebindAddr => stream_both_ways(ends, &pair, || control.rebind_addr(), None),
        Disruption::None | Disruption::HandshakeLoss(_) => {
            stream_both_ways(ends, &pair, || {}, None)
        }
    };
    let broken = down.error.is_some() || up.error.is_some();
    out.down = Some(down);
    out.up = Some(up);
    out.healed = healed;
    if matches!(scenario.disruption, Disruption::None) && !broken {
        out.goodput = Some(goodput(ends, &pair, scenario.rate_bps()));
    }
    drop(pair);
    if scenario.name == "lossy-2" {
        // A fresh connection: the bulk stream is abandoned unread at the end.
        match ends.pair(protocol) {
            Ok(pair) => out.hol = Some(head_of_line(ends, &pair)),
            Err(e) => out.failure = Some(format!("connect (head-of-line): {e:#}")),
        }
    }
    out
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn print_latency(scenario: &Scenario, outcomes: &[Outcome]) {
    for o in outcomes {
        if let Some(failure) = &o.failure
            && o.down.is_none()
        {
            println!("| {} | {} | – | – | {failure} |", scenario.name, o.protocol);
            continue;
        }
        let mut cells = Vec::new();
        for (dir, s) in [("cloud→edge", &o.down), ("edge→cloud", &o.up)] {
            let Some(s) = s else { continue };
            let (n, p) = percentiles(s);
            let err = s
                .error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            cells.push(format!(
                "{dir} {n}/{}: {} / {} / {} / {}{err}",
                s.sent.len(),
                ms(p[0]),
                ms(p[1]),
                ms(p[2]),
                ms(p[3])
            ));
        }
        let goodput = match (&o.goodput, scenario.rate_bps()) {
            (Some(Ok(g)), Some(rate)) => {
                format!("{g:.2} Mb/s ({:.0} %)", g * 1e6 / rate as f64 * 100.0)
            }
            (Some(Ok(g)), None) => format!("{g:.1} Mb/s"),
            (Some(Err(e)), _) => format!("failed: {e}"),
            (None, _) => "–".into(),
        };
        let mut extra = String::new();
        if let (Some(healed), Some(down), Some(up)) = (o.healed, &o.down, &o.up) {
            let (f1, d1) = recovery(down, healed);
            let (f2, d2) = recovery(up, healed);
            let show = |v: Option<f64>| v.map_or("never".into(), ms);
            extra = format!(
                "after the blackhole: first {} / {} ms, drained {} / {} ms (down / up)",
                show(f1),
                show(f2),
                show(d1),
                show(d2)
            );
        }
        if matches!(
            scenario.disruption,
            Disruption::RebindPort | Disruption::RebindAddr
        ) {
            let broken = o
                .down
                .as_ref()
                .and_then(|s| s.error.clone())
                .or_else(|| o.up.as_ref().and_then(|s| s.error.clone()));
            extra = match broken {
                None => "connection survived the rebind".into(),
                Some(e) => format!("connection lost at the rebind ({e})"),
            };
        }
        if !o.connect_ms.is_empty() {
            let list: Vec<String> = o.connect_ms.iter().map(|v| ms(*v)).collect();
            extra = format!("set-up under 30 % loss: {} ms", list.join(", "));
        }
        if let Some(hol) = &o.hol {
            let (n, p) = percentiles(hol);
            extra = format!(
                "small messages beside bulk ({} KiB messages on another resource) edge→cloud \
                 {n}/{}: {} / {} / {} / {}{}",
                BULK / 1024,
                hol.sent.len(),
                ms(p[0]),
                ms(p[1]),
                ms(p[2]),
                ms(p[3]),
                hol.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
        }
        if let Some(f) = &o.failure {
            extra = format!("{extra} {f}");
        }
        println!(
            "| {} | {} | {} | {goodput} | {} |",
            scenario.name,
            o.protocol,
            cells.join("<br>"),
            extra.trim()
        );
    }
}

fn main() -> Result<()> {
    let wanted: Option<Vec<String>> = std::env::var("LOSSY_SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let scenarios: Vec<Scenario> = scenario::all()
        .into_iter()
        .filter(|s| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|n| n == s.name))
        })
        .collect();
    let pki = Pki::new()?;
    println!(
        "lossy_links: {RATE_PER_S} msg/s of {SMALL} B each way for {} s; latency ms p50 / p90 / \
         p99 / max from the scheduled send; goodput of pipelined {LARGE} B edge→cloud\n",
        STREAM.as_secs()
    );
    println!(
        "| scenario | protocol | latency (delivered/offered: p50 / p90 / p99 / max ms) | goodput | notes |"
    );
    println!("|---|---|---|---|---|");
    for scenario in &scenarios {
        let lab = match Lab::start(scenario, 14) {
            Ok(lab) => lab,
            Err(LabError::Unsupported(why)) => {
                println!("skipped: {why}");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let cloud = runtime_in(lab.cloud().entry())?;
        let edge = runtime_in(lab.edge().entry())?;
        let ends = Ends {
            cloud: &cloud,
            edge: &edge,
            pki: &pki,
        };
        let outcomes: Vec<Outcome> = [Protocol::Quic, Protocol::WebSocket]
            .into_iter()
            .map(|p| measure(&lab, scenario, p, &ends))
            .collect();
        print_latency(scenario, &outcomes);
        drop(outcomes);
        cloud.shutdown_timeout(Duration::from_secs(2));
        edge.shutdown_timeout(Duration::from_secs(2));
    }
    Ok(())
}
