//! IPv4 packets as the forwarder sees them: the protocol, and NAT rebinding (the edge's source
//! address or port changes mid-connection, as when a home router or a carrier-grade NAT drops
//! its mapping). The rewrite fixes the IP header checksum and the TCP/UDP checksum, so the
//! receiving kernel accepts the packet as if it came from the new address. Pure.

use std::net::Ipv4Addr;

/// IP protocol numbers the lab cares about.
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The IP protocol number of an IPv4 packet, `None` if it is not one.
pub fn protocol(packet: &[u8]) -> Option<u8> {
    (packet.len() >= 20 && packet[0] >> 4 == 4).then(|| packet[9])
}

/// Whether `packet` is IPv4 UDP.
pub fn is_udp(packet: &[u8]) -> bool {
    protocol(packet) == Some(UDP)
}

/// A NAT mapping of the edge, applied by the forwarder: the edge's packets leave with
/// `outside` as their source address and every source port shifted by `port_shift`; the
/// cloud's answers to that address and port are mapped back. The identity (`inside ==
/// outside`, shift 0) changes nothing; each rebind changes the mapping for every flow at once,
/// as a NAT losing its state does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatMap {
    /// The edge's own address.
    pub inside: Ipv4Addr,
    /// The address the cloud sees.
    pub outside: Ipv4Addr,
    /// Added (wrapping) to the edge's source ports.
    pub port_shift: u16,
}

impl NatMap {
    /// No translation for `edge`.
    pub fn identity(edge: Ipv4Addr) -> Self {
        Self {
            inside: edge,
            outside: edge,
            port_shift: 0,
        }
    }

    /// Rewrites a packet from the edge; returns whether it changed.
    pub fn outbound(&self, packet: &mut [u8]) -> bool {
        if self.inside == self.outside && self.port_shift == 0 {
            return false;
        }
        rewrite(packet, Side::Source, self.inside, self.outside, |p| {
            p.wrapping_add(self.port_shift)
        })
    }

    /// Rewrites a packet to the edge (sent to the mapped address); returns whether it changed.
    pub fn inbound(&self, packet: &mut [u8]) -> bool {
        if self.inside == self.outside && self.port_shift == 0 {
            return false;
        }
        rewrite(packet, Side::Destination, self.outside, self.inside, |p| {
            p.wrapping_sub(self.port_shift)
        })
    }
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Replaces the address `from` by `to` on `side`, maps the port on that side of TCP and UDP,
/// and recomputes the checksums. Leaves other packets (and non-first fragments' ports) alone.
fn rewrite(
    packet: &mut [u8],
    side: Side,
    from: Ipv4Addr,
    to: Ipv4Addr,
    port: impl Fn(u16) -> u16,
) -> bool {
    let Some(proto) = protocol(packet) else {
        return false;
    };
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < 20 || total_len < header_len || total_len > packet.len() {
        return false;
    }
    let (addr_at, port_at) = match side {
        Side::Source => (12, 0),
        Side::Destination => (16, 2),
    };
    if packet[addr_at..addr_at + 4] != from.octets() {
        return false;
    }
    packet[addr_at..addr_at + 4].copy_from_slice(&to.octets());
    packet[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&[&packet[..header_len]]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());

    let first_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0;
    let checksum_at = match proto {
        TCP if total_len >= header_len + 20 => 16,
        UDP if total_len >= header_len + 8 => 6,
        _ => return true,
    };
    if !first_fragment {
        return true;
    }
    let l4 = header_len;
    let p = l4 + port_at;
    let mapped = port(u16::from_be_bytes([packet[p], packet[p + 1]]));
    packet[p..p + 2].copy_from_slice(&mapped.to_be_bytes());
    let c = l4 + checksum_at;
    // UDP over IPv4 may carry no checksum (0): keep it so.
    if proto == UDP && packet[c..c + 2] == [0, 0] {
        return true;
    }
    packet[c..c + 2].copy_from_slice(&[0, 0]);
    let mut sum = transport_checksum(&packet[..total_len], header_len);
    if proto == UDP && sum == 0 {
        sum = 0xffff;
    }
    packet[c..c + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// The TCP/UDP checksum of an IPv4 packet's payload with its pseudo-header.
fn transport_checksum(packet: &[u8], header_len: usize) -> u16 {
    let segment = &packet[header_len..];
    let len = u16::try_from(segment.len())
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    let pseudo = [0, packet[9], len[0], len[1]];
    checksum(&[&packet[12..20], &pseudo, segment])
}

/// The Internet checksum (RFC 1071) of the concatenated parts (each even-length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const ALIAS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
    const CLOUD: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    /// A valid IPv4 packet with a TCP or UDP header and an odd-length payload.
    fn packet(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let l4_len = if proto == TCP { 20 } else { 8 };
        let payload = b"hello, lossy link";
        let total = 20 + l4_len + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let sum = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        if proto == TCP {
            p[32] = 5 << 4;
        } else {
            p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        }
        p[20 + l4_len..].copy_from_slice(payload);
        let at = if proto == TCP { 36 } else { 26 };
        let sum = transport_checksum(&p, 20);
        p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// Whether both checksums verify (the sum over a correct header or segment is zero).
    fn valid(p: &[u8]) -> bool {
        checksum(&[&p[..20]]) == 0 && {
            let len = ((p.len() - 20) as u16).to_be_bytes();
            checksum(&[&p[12..20], &[0, p[9], len[0], len[1]], &p[20..]]) == 0
        }
    }

    fn ports(p: &[u8]) -> (u16, u16) {
        (
            u16::from_be_bytes([p[20], p[21]]),
            u16::from_be_bytes([p[22], p[23]]),
        )
    }

    #[test]
    fn the_built_packets_verify() {
        assert!(valid(&packet(TCP, EDGE, 40000, CLOUD, 443)));
        assert!(valid(&packet(UDP, EDGE, 40000, CLOUD, 443)));
    }

    #[test]
    fn port_rebind_rewrites_both_ways_with_valid_checksums() {
        for proto in [TCP, UDP] {
            let nat = NatMap {
                port_shift: 1000,
                ..NatMap::identity(EDGE)
            };
            let mut up = packet(proto, EDGE, 40000, CLOUD, 443);
            assert!(nat.outbound(&mut up));
            assert!(valid(&up), "proto {proto}");
            assert_eq!(ports(&up), (41000, 443));
            assert_eq!(up[12..16], EDGE.octets());

            let mut down = packet(proto, CLOUD, 443, EDGE, 41000);
            assert!(nat.inbound(&mut down));
            assert!(valid(&down));
            assert_eq!(ports(&down), (443, 40000));
        }
    }

    #[test]
    fn address_rebind_rewrites_the_address_and_checksums() {
        let nat = NatMap {
            inside: EDGE,
            outside: ALIAS,
            port_shift: 0,
        };
        let mut up = packet(UDP, EDGE, 40000, CLOUD, 443);
        assert!(nat.outbound(&mut up));
        assert!(valid(&up));
        assert_eq!(up[12..16], ALIAS.octets());
        assert_eq!(ports(&up), (40000, 443));
        let mut down = packet(TCP, CLOUD, 443, ALIAS, 40000);
        assert!(nat.inbound(&mut down));
        assert!(valid(&down));
        assert_eq!(down[16..20], EDGE.octets());
    }

    #[test]
    fn identity_and_foreign_packets_are_left_alone() {
        let original = packet(UDP, EDGE, 40000, CLOUD, 443);
        let mut p = original.clone();
        assert!(!NatMap::identity(EDGE).outbound(&mut p));
        let other = NatMap {
            port_shift: 7,
            ..NatMap::identity(ALIAS)
        };
        assert!(!other.outbound(&mut p));
        assert!(!other.inbound(&mut p));
        assert_eq!(p, original);
        let mut junk = vec![0x60u8; 40];
        assert!(!other.outbound(&mut junk), "IPv6 is not rewritten");
        let mut short = vec![0x45u8; 10];
        assert!(!other.outbound(&mut short));
    }

    #[test]
    fn udp_without_checksum_keeps_none() {
        let mut p = packet(UDP, EDGE, 40000, CLOUD, 443);
        p[26..28].copy_from_slice(&[0, 0]);
        let nat = NatMap {
            port_shift: 5,
            ..NatMap::identity(EDGE)
        };
        assert!(nat.outbound(&mut p));
        assert_eq!(p[26..28], [0, 0]);
        assert_eq!(ports(&p).0, 40005);
        assert!(is_udp(&p));
    }
}
