//! `udplb-bench inject`: a new client in every datagram, open loop, as fast as the sending
//! CPUs go: how many new flows a forwarder can place per second, with no reply to wait for.
//!
//! The UDP stack cannot send from a new source port per datagram without a socket per port,
//! so this sends whole Ethernet frames from an `AF_PACKET` socket (udplb-sys's
//! [`FrameSender`]) to a next hop's MAC address. Client `i` of `--clients` is the source
//! `first + i / 64512` : `1024 + i % 64512`; each thread takes every `threads`-th client, so no
//! two datagrams of a run share a client until all have sent once (the report says whether
//! that happened). Every frame carries valid IP (IPv4 or IPv6, as the target) and UDP
//! checksums, as a NIC's traffic would.
//!
//! Prints one JSON object: frames sent, per second, and send errors. Counting what arrived is
//! the caller's (the receiving interface's counters), as is dropping it there.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use udplb_sys::packet::{FrameSender, MAX_BATCH};

use crate::parse_duration;

const ETH_LEN: usize = 14;
const UDP_LEN: usize = 8;
/// Source ports per source address (1024 to 65535).
const PORTS: u32 = 65536 - 1024;

/// Options of `udplb-bench inject`.
#[derive(Args, Debug, Clone)]
pub struct InjectArgs {
    /// Interface to send out of (in this network namespace).
    #[arg(long)]
    pub interface: String,
    /// The next hop's MAC address (the balancer's interface on this link).
    #[arg(long)]
    pub gateway_mac: String,
    /// Where every datagram goes (IPv4 or IPv6).
    #[arg(long)]
    pub target: SocketAddr,
    /// The first client's source address (of the target's family).
    #[arg(long)]
    pub first_source: IpAddr,
    /// Distinct clients (source address and port pairs) before one repeats.
    #[arg(long, default_value_t = 16_000_000)]
    pub clients: u32,
    /// UDP payload bytes.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Sending threads.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
}

/// What one thread sent.
#[derive(Default)]
struct Sent {
    frames: u64,
    errors: u64,
}

pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.threads == 0 {
        bail!("--clients and --threads must be at least 1");
    }
    if args.size > 1400 {
        bail!("--size must be at most 1400 bytes");
    }
    if args.first_source.is_ipv4() != args.target.is_ipv4() {
        bail!("--first-source and --target must be of one family");
    }
    let source_mac = read_mac(&format!("/sys/class/net/{}/address", args.interface))?;
    let gateway_mac = parse_mac(&args.gateway_mac)?;
    let template = frame_template(source_mac, gateway_mac, args.target, args.size);
    let start = Instant::now();
    let totals = thread::scope(|scope| {
        let workers: Vec<_> = (0..args.threads)
            .map(|t| {
                let template = &template;
                scope.spawn(move || send_for(args, template, t))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("sender thread panicked"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let frames: u64 = totals.iter().map(|s| s.frames).sum();
    let errors: u64 = totals.iter().map(|s| s.errors).sum();
    println!(
        "{}",
        serde_json::json!({
            "sent": frames,
            "sent_per_sec": (frames as f64 / elapsed).round(),
            "send_errors": errors,
            "duration_s": elapsed,
            "clients": args.clients,
            "clients_repeated": frames > u64::from(args.clients),
        })
    );
    Ok(())
}

/// One thread's loop: batches of frames, each from the thread's next client.
fn send_for(args: &InjectArgs, template: &[u8], thread: u32) -> anyhow::Result<Sent> {
    let sender = FrameSender::bind(&args.interface)
        .with_context(|| format!("AF_PACKET socket on {} (needs CAP_NET_RAW)", args.interface))?;
    let mut frames: Vec<Vec<u8>> = (0..MAX_BATCH).map(|_| template.to_vec()).collect();
    let mut client = thread % args.clients;
    let mut sent = Sent::default();
    let deadline = Instant::now() + args.duration;
    while Instant::now() < deadline {
        for frame in &mut frames {
            let (address, port) = client_source(args.first_source, client);
            set_source(frame, address, port);
            client = (client + args.threads) % args.clients;
        }
        let batch: [&[u8]; MAX_BATCH] = std::array::from_fn(|i| frames[i].as_slice());
        match sender.send(&batch) {
            Ok(n) => sent.frames += n as u64,
            Err(_) => sent.errors += 1,
        }
    }
    Ok(sent)
}

/// Client `i`'s source address and port.
fn client_source(first: IpAddr, i: u32) -> (IpAddr, u16) {
    let address = match first {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(i / PORTS).into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(u128::from(i / PORTS)).into()),
    };
    (address, (1024 + i % PORTS) as u16)
}

/// The IP header's length in the frame (by its version).
fn ip_len(frame: &[u8]) -> usize {
    if frame[ETH_LEN] >> 4 == 4 { 20 } else { 40 }
}

/// An Ethernet + IP + UDP frame to `target`, the source still to be set.
fn frame_template(
    source_mac: [u8; 6],
    gateway_mac: [u8; 6],
    target: SocketAddr,
    size: usize,
) -> Vec<u8> {
    let ip_len = if target.is_ipv4() { 20 } else { 40 };
    let headers = ETH_LEN + ip_len + UDP_LEN;
    let mut f = vec![0u8; headers + size];
    f[0..6].copy_from_slice(&gateway_mac);
    f[6..12].copy_from_slice(&source_mac);
    let ethertype: u16 = if target.is_ipv4() { 0x0800 } else { 0x86dd };
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let ip = &mut f[ETH_LEN..ETH_LEN + ip_len];
    match target.ip() {
        IpAddr::V4(to) => {
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((ip_len + UDP_LEN + size) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64; // TTL
            ip[9] = 17; // UDP
            ip[16..20].copy_from_slice(&to.octets());
        }
        IpAddr::V6(to) => {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((UDP_LEN + size) as u16).to_be_bytes());
            ip[6] = 17; // UDP
            ip[7] = 64; // hop limit
            ip[24..40].copy_from_slice(&to.octets());
        }
    }
    let udp = &mut f[ETH_LEN + ip_len..headers];
    udp[2..4].copy_from_slice(&target.port().to_be_bytes());
    udp[4..6].copy_from_slice(&((UDP_LEN + size) as u16).to_be_bytes());
    for (i, b) in f[headers..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// Sets the frame's source address and port and the checksums (IPv4's header and UDP's).
fn set_source(frame: &mut [u8], address: IpAddr, port: u16) {
    let ip = ETH_LEN;
    let ip_len = ip_len(frame);
    let udp = ip + ip_len;
    // The pseudo header's addresses; the protocol and the UDP length are added below.
    let addresses = match address {
        IpAddr::V4(a) => {
            frame[ip + 12..ip + 16].copy_from_slice(&a.octets());
            frame[ip + 10..ip + 12].fill(0);
            let ip_sum = checksum(0, &frame[ip..udp]);
            frame[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
            sum_words(0, &frame[ip + 12..ip + 20])
        }
        IpAddr::V6(a) => {
            frame[ip + 8..ip + 24].copy_from_slice(&a.octets());
            sum_words(0, &frame[ip + 8..ip + 40])
        }
    };
    let udp_len = u16::from_be_bytes([frame[udp + 4], frame[udp + 5]]);
    frame[udp..udp + 2].copy_from_slice(&port.to_be_bytes());
    frame[udp + 6..udp + 8].fill(0);
    let mut udp_sum = checksum(addresses + 17 + u32::from(udp_len), &frame[udp..]);
    if udp_sum == 0 {
        udp_sum = 0xffff; // zero means "no checksum" (IPv4) or is not allowed (IPv6)
    }
    frame[udp + 6..udp + 8].copy_from_slice(&udp_sum.to_be_bytes());
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words (odd length padded), on
/// top of `sum`, not yet folded.
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum of `bytes` on top of the partial `sum`.
fn checksum(sum: u32, bytes: &[u8]) -> u16 {
    let mut sum = sum_words(sum, bytes);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn read_mac(path: &str) -> anyhow::Result<[u8; 6]> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_mac(text.trim())
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{text:?} is not a MAC address"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{text:?} is not a MAC address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A frame whose checksums verify: summed with their checksum fields, both come to 0xffff.
    #[test]
    fn ipv4_frames_carry_valid_checksums() {
        let mut f = frame_template([2; 6], [4; 6], "10.0.0.1:53".parse().unwrap(), 33);
        set_source(&mut f, Ipv4Addr::new(10, 1, 2, 3).into(), 40000);
        assert_eq!(checksum(0, &f[ETH_LEN..ETH_LEN + 20]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&f[ETH_LEN + 12..ETH_LEN + 20]);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&f[ETH_LEN + 24..ETH_LEN + 26]);
        assert_eq!(checksum(sum_words(0, &pseudo), &f[ETH_LEN + 20..]), 0);
        assert_eq!(&f[ETH_LEN + 12..ETH_LEN + 16], &[10, 1, 2, 3]);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 40000);
    }

    #[test]
    fn ipv6_frames_carry_a_valid_udp_checksum() {
        let mut f = frame_template([2; 6], [4; 6], "[fd00::1]:53".parse().unwrap(), 33);
        let source: Ipv6Addr = "fd00:77:128::5".parse().unwrap();
        set_source(&mut f, source.into(), 40000);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), 0x86dd);
        assert_eq!(&f[ETH_LEN + 8..ETH_LEN + 24], &source.octets());
        // The pseudo header: both addresses, the UDP length (32 bits), the next header.
        let udp = ETH_LEN + 40;
        let mut pseudo = [0u8; 40];
        pseudo[0..32].copy_from_slice(&f[ETH_LEN + 8..ETH_LEN + 40]);
        pseudo[34..36].copy_from_slice(&f[udp + 4..udp + 6]);
        pseudo[39] = 17;
        assert_eq!(checksum(sum_words(0, &pseudo), &f[udp..]), 0);
        assert_eq!(u16::from_be_bytes([f[udp], f[udp + 1]]), 40000);
    }

    #[test]
    fn clients_wrap_ports_then_addresses() {
        let first = IpAddr::from(Ipv4Addr::new(10, 77, 128, 0));
        assert_eq!(client_source(first, 0), (first, 1024));
        assert_eq!(client_source(first, PORTS - 1), (first, 65535));
        let next = IpAddr::from(Ipv4Addr::new(10, 77, 128, 1));
        assert_eq!(client_source(first, PORTS), (next, 1024));
        let first6: IpAddr = "fd00:77:128::".parse().unwrap();
        let next6: IpAddr = "fd00:77:128::1".parse().unwrap();
        assert_eq!(client_source(first6, PORTS), (next6, 1024));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:00:0a:ff:10:01").unwrap(),
            [2, 0, 10, 255, 16, 1]
        );
        assert!(parse_mac("02:00:0a").is_err());
        assert!(parse_mac("zz:00:0a:ff:10:01").is_err());
    }
}
