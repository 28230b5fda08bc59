//! The lab: a cloud namespace and an edge namespace, each with a TUN device as its only link,
//! and a forwarder in this process that carries every IP packet between the two devices
//! through the [`LinkModel`] of its direction and the edge's [`NatMap`]. The I/O here is thin:
//! read a packet, ask the model, hold it until its time, write it.
//!
//! A TUN device without offloads (no `IFF_VNET_HDR`) hands over one wire packet per read, so
//! TSO/GSO/GRO cannot merge segments: one drop is one packet, as on a real link.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tun_rs::{AsyncDevice, DeviceBuilder, SyncDevice};

use crate::LabError;
use crate::model::{Impairment, LinkModel, LinkStats, Verdict};
use crate::netns::{Netns, ip};
use crate::packet::{NatMap, is_udp};
use crate::scenario::Scenario;

/// The cloud's address in its namespace.
pub const CLOUD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The edge's address in its namespace.
pub const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The address the cloud sees the edge at after [`Control::rebind_addr`].
pub const EDGE_REBOUND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// How far each [`Control::rebind_port`] shifts the edge's source ports.
const PORT_SHIFT: u16 = 1009;
/// Labs started by this process, for unique device names.
static LABS: AtomicU32 = AtomicU32::new(0);
/// The TUN devices' MTU (Ethernet's).
const MTU: u16 = 1500;

/// Both directions' state, shared by the forwarder and the harness.
#[derive(Debug)]
struct Link {
    up: LinkModel,
    down: LinkModel,
    steady: (Impairment, Impairment),
    nat: NatMap,
}

/// The harness's handle on a running lab: switch the blackhole, change loss, rebind the edge,
/// read the counters. Cheap to clone; every change applies from the next packet on.
#[derive(Clone, Debug)]
pub struct Control {
    link: Arc<Mutex<Link>>,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops every packet both ways while `on`.
    pub fn set_blackhole(&self, on: bool) {
        let mut link = self.lock();
        link.up.set_blackhole(on);
        link.down.set_blackhole(on);
    }

    /// Replaces both directions' impairments (e.g. heavy loss during set-up).
    pub fn set_impairment(&self, up: Impairment, down: Impairment) {
        let mut link = self.lock();
        link.up.set_impairment(up);
        link.down.set_impairment(down);
    }

    /// Back to the scenario's steady impairments (the blackhole and the NAT stay as they are).
    pub fn restore(&self) {
        let mut link = self.lock();
        let (up, down) = link.steady;
        link.up.set_impairment(up);
        link.down.set_impairment(down);
    }

    /// The edge's NAT mapping changes its source ports (every flow at once).
    pub fn rebind_port(&self) {
        let mut link = self.lock();
        link.nat.port_shift = link.nat.port_shift.wrapping_add(PORT_SHIFT);
    }

    /// The edge's NAT mapping changes its source address (alternating between two).
    pub fn rebind_addr(&self) {
        let mut link = self.lock();
        link.nat.outside = if link.nat.outside == EDGE_ADDR {
            EDGE_REBOUND_ADDR
        } else {
            EDGE_ADDR
        };
    }

    /// The NAT mapping in force.
    pub fn nat(&self) -> NatMap {
        self.lock().nat
    }

    /// Counters (edge to cloud, cloud to edge) since the lab started.
    pub fn stats(&self) -> (LinkStats, LinkStats) {
        let link = self.lock();
        (link.up.stats(), link.down.stats())
    }
}

/// A running lab; dropping it stops the forwarder and deletes both namespaces (and so the TUN
/// devices), also when a test panics.
#[derive(Debug)]
pub struct Lab {
    // Fields drop in order: the forwarder stops before its devices' namespaces go.
    forwarder: Forwarder,
    control: Control,
    edge: Netns,
    cloud: Netns,
}

#[derive(Debug)]
struct Forwarder {
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Lab {
    /// Sets up the namespaces and devices for `scenario`'s steady link (its disruption is the
    /// harness's to trigger through [`Lab::control`]); `seed` fixes the losses and jitter.
    /// [`LabError::Unsupported`] says why this machine cannot run it (not root, no TUN, no
    /// `ip`): callers print it and skip.
    pub fn start(scenario: &Scenario, seed: u64) -> Result<Self, LabError> {
        check_supported()?;
        let cloud = Netns::create("cloud")?;
        let edge = Netns::create("edge")?;
        // Device names are global until moved: unique per process and lab (at most 15 bytes).
        let tag = format!(
            "{:x}{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let cloud_dev = device(&cloud, &format!("cwc{tag}"), CLOUD_ADDR, EDGE_ADDR)?;
        // The cloud routes the edge's other address (after an address rebind) to the link too.
        ip(&[
            "-n",
            cloud.name(),
            "route",
            "add",
            &format!("{EDGE_REBOUND_ADDR}/32"),
            "dev",
            &cloud_dev.1,
        ])?;
        let edge_dev = device(&edge, &format!("cwe{tag}"), EDGE_ADDR, CLOUD_ADDR)?;
        let link = Arc::new(Mutex::new(Link {
            up: LinkModel::new(scenario.up, seed),
            down: LinkModel::new(scenario.down, seed.wrapping_add(1)),
            steady: (scenario.up, scenario.down),
            nat: NatMap::identity(EDGE_ADDR),
        }));
        let control = Control { link };
        let forwarder = Forwarder::start(cloud_dev.0, edge_dev.0, control.clone())?;
        Ok(Self {
            forwarder,
            control,
            edge,
            cloud,
        })
    }

    /// The cloud's namespace.
    pub fn cloud(&self) -> &Netns {
        &self.cloud
    }

    /// The edge's namespace.
    pub fn edge(&self) -> &Netns {
        &self.edge
    }

    /// The handle to disrupt the link and read its counters.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Whether the forwarder still runs (it stops only on a device error, which it prints).
    pub fn forwarding(&self) -> bool {
        self.forwarder
            .thread
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}

/// Root, `/dev/net/tun` and `ip`: what the lab needs, or why it cannot run here.
fn check_supported() -> Result<(), LabError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::Unsupported(
            "network namespaces and TUN devices need root".into(),
        ));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(LabError::Unsupported(
            "no /dev/net/tun on this machine".into(),
        ));
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(LabError::Unsupported(
            "`ip` (iproute2) is not installed".into(),
        )),
    }
}

/// A TUN device named `name`, created here and moved into `ns`, with `addr` and the peer
/// `peer` as a point-to-point link, up. Returns the open device and its name.
fn device(
    ns: &Netns,
    name: &str,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
) -> Result<(SyncDevice, String), LabError> {
    let dev = DeviceBuilder::new()
        .name(name)
        .mtu(MTU)
        .packet_information(false)
        .build_sync()
        .map_err(|e| LabError::Setup(format!("creating TUN device {name}: {e}")))?;
    ip(&["link", "set", "dev", name, "netns", ns.name()])?;
    ip(&[
        "-n",
        ns.name(),
        "addr",
        "add",
        &addr.to_string(),
        "peer",
        &format!("{peer}/32"),
        "dev",
        name,
    ])?;
    ip(&["-n", ns.name(), "link", "set", "dev", name, "up"])?;
    Ok((dev, name.to_owned()))
}

/// Which way a packet goes.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// Edge to cloud.
    Up,
    /// Cloud to edge.
    Down,
}

impl Forwarder {
    fn start(cloud: SyncDevice, edge: SyncDevice, control: Control) -> Result<Self, LabError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("linklab-forwarder".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("forwarder runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let devices =
                        AsyncDevice::new(cloud).and_then(|c| Ok((c, AsyncDevice::new(edge)?)));
                    let (cloud, edge) = match devices {
                        Ok((c, e)) => (Arc::new(c), Arc::new(e)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("async TUN devices: {e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let origin = Instant::now();
                    let up = pump(
                        Direction::Up,
                        edge.clone(),
                        cloud.clone(),
                        control.clone(),
                        origin,
                        stopped.clone(),
                    );
                    let down = pump(Direction::Down, cloud, edge, control, origin, stopped);
                    tokio::join!(up, down);
                });
            })
            .map_err(|e| LabError::Setup(format!("forwarder thread: {e}")))?;
        let forwarder = Self {
            stop: Some(stop),
            thread: Some(thread),
        };
        match ready.recv() {
            Ok(Ok(())) => Ok(forwarder),
            Ok(Err(e)) => Err(LabError::Setup(e)),
            Err(_) => Err(LabError::Setup(
                "the forwarder thread ended at start".into(),
            )),
        }
    }
}

/// Carries packets one way until `stop`: each read packet gets its verdict at once (so the
/// model's queue and loss see arrival order), waits in a heap until its delivery time, and is
/// written then. The edge's NAT applies where its router would: on leaving (up) and on
/// arrival (down).
async fn pump(
    direction: Direction,
    from: Arc<AsyncDevice>,
    to: Arc<AsyncDevice>,
    control: Control,
    origin: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut held: BinaryHeap<Reverse<(Duration, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut buf = vec![0u8; 65_536];
    loop {
        let next = held.peek().map(|Reverse((at, _, _))| origin + *at);
        tokio::select! {
            _ = stop.changed() => return,
            read = from.recv(&mut buf) => {
                let n = match read {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("linklab: {direction:?} read failed, forwarder stops: {e}");
                        return;
                    }
                };
                let mut packet = buf[..n].to_vec();
                let now = origin.elapsed();
                let verdict = {
                    let mut link = control.lock();
                    match direction {
                        Direction::Up => {
                            link.nat.outbound(&mut packet);
                            link.up.offer(now, n, is_udp(&packet))
                        }
                        Direction::Down => link.down.offer(now, n, is_udp(&packet)),
                    }
                };
                if let Verdict::Deliver(at) = verdict {
                    order += 1;
                    held.push(Reverse((at, order, packet)));
                }
            }
            () = sleep_until(next), if next.is_some() => {}
        }
        let now = origin.elapsed();
        while held.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Some(Reverse((_, _, mut packet))) = held.pop() else {
                break;
            };
            if let Direction::Down = direction {
                control.lock().nat.inbound(&mut packet);
            }
            if let Err(e) = to.send(&packet).await {
                eprintln!("linklab: {direction:?} write failed (packet dropped): {e}");
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
