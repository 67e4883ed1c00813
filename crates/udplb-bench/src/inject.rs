//! `udplb-bench inject`: a new client in every datagram, open loop, as fast as the sending
//! CPUs go: how many new flows a forwarder can place per second, with no reply to wait for.
//!
//! The UDP stack cannot send from a new source port per datagram without a socket per port,
//! so this sends whole Ethernet frames from an `AF_PACKET` socket (udplb-sys's
//! [`FrameSender`]) to a next hop's MAC address. Client `i` of `--clients` is the source
//! `first + i / 64512` : `1024 + i % 64512`; each thread takes every `threads`-th client, so no
//! two datagrams of a run share a client until all have sent once (the report says whether
//! that happened). Every frame carries valid IPv4 and UDP checksums, as a NIC's traffic would.
//!
//! Prints one JSON object: frames sent, per second, and send errors. Counting what arrived is
//! the caller's (the receiving interface's counters), as is dropping it there.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use udplb_sys::packet::{FrameSender, MAX_BATCH};

use crate::parse_duration;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const HEADERS: usize = ETH_LEN + IP_LEN + UDP_LEN;
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
    /// Where every datagram goes.
    #[arg(long)]
    pub target: SocketAddrV4,
    /// The first client's source address.
    #[arg(long)]
    pub first_source: Ipv4Addr,
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
    let source_mac = read_mac(&format!("/sys/class/net/{}/address", args.interface))?;
    let gateway_mac = parse_mac(&args.gateway_mac)?;
    let template = frame_template(
        source_mac,
        gateway_mac,
        *args.target.ip(),
        args.target.port(),
        args.size,
    );
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
fn client_source(first: Ipv4Addr, i: u32) -> (Ipv4Addr, u16) {
    let address = Ipv4Addr::from(u32::from(first).wrapping_add(i / PORTS));
    (address, (1024 + i % PORTS) as u16)
}

/// An Ethernet + IPv4 + UDP frame to `target`, the source still to be set.
fn frame_template(
    source_mac: [u8; 6],
    gateway_mac: [u8; 6],
    target: Ipv4Addr,
    port: u16,
    size: usize,
) -> Vec<u8> {
    let mut f = vec![0u8; HEADERS + size];
    f[0..6].copy_from_slice(&gateway_mac);
    f[6..12].copy_from_slice(&source_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[ETH_LEN..ETH_LEN + IP_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_LEN + UDP_LEN + size) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[16..20].copy_from_slice(&target.octets());
    let udp = &mut f[ETH_LEN + IP_LEN..HEADERS];
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((UDP_LEN + size) as u16).to_be_bytes());
    for (i, b) in f[HEADERS..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// Sets the frame's source address and port and both checksums.
fn set_source(frame: &mut [u8], address: Ipv4Addr, port: u16) {
    frame[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&address.octets());
    frame[ETH_LEN + 10..ETH_LEN + 12].fill(0);
    let ip_sum = checksum(0, &frame[ETH_LEN..ETH_LEN + IP_LEN]);
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp = ETH_LEN + IP_LEN;
    frame[udp..udp + 2].copy_from_slice(&port.to_be_bytes());
    frame[udp + 6..udp + 8].fill(0);
    // The pseudo header: both addresses, the protocol and the UDP length.
    let mut pseudo = [0u8; 12];
    pseudo[0..8].copy_from_slice(&frame[ETH_LEN + 12..ETH_LEN + 20]);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&frame[udp + 4..udp + 6]);
    let partial = sum_words(0, &pseudo);
    let mut udp_sum = checksum(partial, &frame[udp..]);
    if udp_sum == 0 {
        udp_sum = 0xffff; // zero means "no checksum" in IPv4
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

    /// A frame whose checksums verify: summed with their checksum fields, both come to 0xffff.
    #[test]
    fn frames_carry_valid_checksums() {
        let mut f = frame_template([2; 6], [4; 6], Ipv4Addr::new(10, 0, 0, 1), 53, 33);
        set_source(&mut f, Ipv4Addr::new(10, 1, 2, 3), 40000);
        assert_eq!(checksum(0, &f[ETH_LEN..ETH_LEN + IP_LEN]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&f[ETH_LEN + 12..ETH_LEN + 20]);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&f[ETH_LEN + IP_LEN + 4..ETH_LEN + IP_LEN + 6]);
        assert_eq!(checksum(sum_words(0, &pseudo), &f[ETH_LEN + IP_LEN..]), 0);
        assert_eq!(&f[ETH_LEN + 12..ETH_LEN + 16], &[10, 1, 2, 3]);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 40000);
    }

    #[test]
    fn clients_wrap_ports_then_addresses() {
        let first = Ipv4Addr::new(10, 77, 128, 0);
        assert_eq!(client_source(first, 0), (first, 1024));
        assert_eq!(client_source(first, PORTS - 1), (first, 65535));
        assert_eq!(
            client_source(first, PORTS),
            (Ipv4Addr::new(10, 77, 128, 1), 1024)
        );
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
