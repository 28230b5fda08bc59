//! The lab's I/O on the machine: packets cross between the namespaces, the blackhole and UDP
//! blocking hold, NAT rebinding shows the cloud a new source port or address while replies
//! still reach the edge, and a TCP stream survives random loss intact (retransmitted, not
//! corrupted). Root only; skipped with a message elsewhere.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use causeway_linklab::model::{Impairment, Loss};
use causeway_linklab::scenario::{self, Scenario};
use causeway_linklab::{CLOUD_ADDR, EDGE_ADDR, EDGE_REBOUND_ADDR, Lab, LabError};

const PATIENCE: Duration = Duration::from_secs(20);

fn lab(scenario: &Scenario) -> Option<Lab> {
    match Lab::start(scenario, 42) {
        Ok(lab) => Some(lab),
        Err(LabError::Unsupported(why)) => {
            println!("skipped: {why}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn clean() -> Scenario {
    scenario::by_name("clean").expect("clean")
}

/// A UDP socket in the cloud's namespace and one in the edge's, the edge's connected to it.
fn udp_pair(lab: &Lab) -> (UdpSocket, UdpSocket) {
    let cloud = lab
        .cloud()
        .run(|| UdpSocket::bind((CLOUD_ADDR, 0)).expect("cloud bind"));
    let to = cloud.local_addr().expect("cloud addr");
    let edge = lab.edge().run(|| {
        let s = UdpSocket::bind((EDGE_ADDR, 0)).expect("edge bind");
        s.connect(to).expect("edge connect");
        s
    });
    for s in [&cloud, &edge] {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
    }
    (cloud, edge)
}

/// Sends from the edge until the cloud receives one datagram (a freshly configured link may
/// lose the first while routes settle); returns where it came from.
fn edge_to_cloud(cloud: &UdpSocket, edge: &UdpSocket, text: &[u8]) -> SocketAddr {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 2048];
    loop {
        edge.send(text).expect("edge send");
        if let Ok((n, from)) = cloud.recv_from(&mut buf) {
            if &buf[..n] == text {
                return from;
            }
        }
        assert!(Instant::now() < deadline, "nothing crossed edge to cloud");
    }
}

fn cloud_to_edge(cloud: &UdpSocket, edge: &UdpSocket, to: SocketAddr, text: &[u8]) {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 2048];
    loop {
        cloud.send_to(text, to).expect("cloud send");
        if let Ok(n) = edge.recv(&mut buf) {
            if &buf[..n] == text {
                return;
            }
        }
        assert!(Instant::now() < deadline, "nothing crossed cloud to edge");
    }
}

#[test]
fn datagrams_cross_and_the_blackhole_holds() {
    let Some(lab) = lab(&clean()) else { return };
    let (cloud, edge) = udp_pair(&lab);
    let seen = edge_to_cloud(&cloud, &edge, b"ping");
    assert_eq!(seen.ip(), EDGE_ADDR);
    cloud_to_edge(&cloud, &edge, seen, b"pong");

    lab.control().set_blackhole(true);
    let before = lab.control().stats();
    for _ in 0..5 {
        edge.send(b"lost").expect("send");
        cloud.send_to(b"lost", seen).expect("send");
    }
    let mut buf = [0u8; 64];
    assert!(
        cloud.recv_from(&mut buf).is_err(),
        "the blackhole let a packet through"
    );
    assert!(
        edge.recv(&mut buf).is_err(),
        "the blackhole let a packet through"
    );
    let after = lab.control().stats();
    assert!(after.0.blackholed >= before.0.blackholed + 5);
    assert!(after.1.blackholed >= before.1.blackholed + 5);

    lab.control().set_blackhole(false);
    edge_to_cloud(&cloud, &edge, b"back");
    assert!(lab.forwarding());
}

#[test]
fn udp_blocked_drops_datagrams_only() {
    let Some(lab) = lab(&scenario::by_name("udp-blocked").expect("udp-blocked")) else {
        return;
    };
    let (cloud, edge) = udp_pair(&lab);
    for _ in 0..5 {
        edge.send(b"udp").expect("send");
    }
    let mut buf = [0u8; 64];
    assert!(
        cloud.recv_from(&mut buf).is_err(),
        "UDP crossed a UDP-blocked link"
    );
    let listener = lab
        .cloud()
        .run(|| TcpListener::bind((CLOUD_ADDR, 0)).expect("listen"));
    let addr = listener.local_addr().expect("addr");
    let mut client = lab
        .edge()
        .run(|| TcpStream::connect_timeout(&addr, PATIENCE).expect("TCP crosses"));
    let (mut server, _) = listener.accept().expect("accept");
    client.write_all(b"tcp").expect("write");
    let mut got = [0u8; 3];
    server.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"tcp");
    assert!(lab.control().stats().0.udp_blocked >= 5);
}

#[test]
fn port_and_address_rebinds_are_seen_by_the_cloud_and_answers_reach_the_edge() {
    let Some(lab) = lab(&clean()) else { return };
    let (cloud, edge) = udp_pair(&lab);
    let first = edge_to_cloud(&cloud, &edge, b"one");

    lab.control().rebind_port();
    let second = edge_to_cloud(&cloud, &edge, b"two");
    assert_eq!(second.ip(), EDGE_ADDR);
    assert_ne!(
        second.port(),
        first.port(),
        "the port rebind changed nothing"
    );
    cloud_to_edge(&cloud, &edge, second, b"to the new port");

    lab.control().rebind_addr();
    let third = edge_to_cloud(&cloud, &edge, b"three");
    assert_eq!(third.ip(), EDGE_REBOUND_ADDR);
    assert_eq!(third.port(), second.port());
    cloud_to_edge(&cloud, &edge, third, b"to the new address");
}

#[test]
fn a_tcp_stream_crosses_random_loss_intact() {
    let lossy = Impairment {
        loss: Loss::Random(0.05),
        delay: Duration::from_millis(5),
        ..Impairment::default()
    };
    let scenario = Scenario {
        up: lossy,
        down: lossy,
        ..clean()
    };
    let Some(lab) = lab(&scenario) else { return };
    let listener = lab
        .cloud()
        .run(|| TcpListener::bind((CLOUD_ADDR, 0)).expect("listen"));
    let addr = listener.local_addr().expect("addr");
    let data: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let writer = std::thread::spawn({
        let client = lab
            .edge()
            .run(|| TcpStream::connect_timeout(&addr, PATIENCE).expect("connect"));
        move || {
            let mut client = client;
            client.write_all(&sent).expect("write");
        }
    });
    let (mut server, _) = listener.accept().expect("accept");
    server.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut got = vec![0u8; data.len()];
    server.read_exact(&mut got).expect("read everything");
    writer.join().expect("writer");
    assert!(got == data, "the stream arrived corrupted");
    let (up, _) = lab.control().stats();
    assert!(up.lost > 0, "5 % loss lost nothing: {up:?}");
}
