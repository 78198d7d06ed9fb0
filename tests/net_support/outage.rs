//! What a client sees during a migration, recorded as timestamps: a TCP
//! counter client and a fast pinger in the client namespace, each logging
//! the instant of every answer, and the longest gap between answers in a
//! time window. Used by `benches/outage.rs`; also the migration network (a
//! veth between two host namespaces) that carries QEMU's stream there.
//!
//! ```text
//!  client ns                                guest (10.80.0.5)
//!  EchoLog: "n\n" ──► echo ──► read "n\n", log Instant, sleep interval, n+1
//!  Pinger:  ICMP echo every interval ──►  reply ──► log Instant (receiver thread)
//!  longest_gap(log, from, to): max of consecutive differences touching [from, to]
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry::agent::net::Segment;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};

use super::{BOOT_TIMEOUT, in_ns};

/// A log of answer instants shared between a worker thread and the caller.
#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Instant>>>);

impl Log {
    fn push(&self, t: Instant) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }

    /// Every instant so far, in order.
    pub fn times(&self) -> Vec<Instant> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many answers came at or after `t`.
    pub fn count_since(&self, t: Instant) -> usize {
        let log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        log.len() - log.partition_point(|x| *x < t)
    }
}

/// The longest time between two consecutive answers where that interval
/// touches `[from, to]`; `None` with fewer than two answers there.
pub fn longest_gap(times: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    times
        .windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
}

/// A TCP client sending `n\n` to the guest's echo service, waiting for the
/// echo, then `interval` later the next counter; logs each echo's arrival.
pub struct EchoLog {
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    log: Log,
    handle: Option<JoinHandle<()>>,
}

impl EchoLog {
    /// Connects from `client_ns` (retrying while the guest boots) and starts.
    pub fn start(client_ns: &str, addr: SocketAddr, interval: Duration) -> EchoLog {
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let log = Log::default();
        let (s, e, l) = (stop.clone(), error.clone(), log.clone());
        let handle = in_ns(client_ns, move || {
            if let Err(msg) = run_echo(addr, interval, &s, &l) {
                *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
            }
        });
        EchoLog {
            stop,
            error,
            log,
            handle: Some(handle),
        }
    }

    /// The echo instants.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The first failure (connection lost, wrong echo), if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for EchoLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run_echo(
    addr: SocketAddr,
    interval: Duration,
    stop: &AtomicBool,
    log: &Log,
) -> Result<(), String> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    stream.set_nodelay(true).map_err(|e| io("nodelay", e))?;
    // A stall this long means the connection is lost.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| io("timeout", e))?;
    let mut writer = stream.try_clone().map_err(|e| io("clone", e))?;
    let mut reader = BufReader::new(stream);
    let mut n: u64 = 0;
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        writer
            .write_all(format!("{n}\n").as_bytes())
            .map_err(|e| io(&format!("send {n}"), e))?;
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("closed before echoing {n}")),
            Err(e) => return Err(format!("no echo of {n}: {e}")),
            Ok(_) if line.trim() != n.to_string() => {
                return Err(format!("sent {n}, got {line:?}"));
            }
            Ok(_) => log.push(Instant::now()),
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

/// ICMP echo requests every `interval` from a raw socket in the client
/// namespace (root only); a receiver thread logs each matching reply. The
/// socket is driven through std's `UdpSocket`, which only issues `sendto`
/// and `recv` on it (the port of the address is ignored for raw sockets).
pub struct Pinger {
    stop: Arc<AtomicBool>,
    log: Log,
    /// Each request's sequence number and when it was sent.
    sent: Arc<Mutex<Vec<(u16, Instant)>>>,
    /// The sequence numbers answered.
    answered: Arc<Mutex<std::collections::BTreeSet<u16>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Pinger {
    /// Opens the socket in `client_ns` and starts pinging `dst`.
    pub fn start(client_ns: &str, dst: Ipv4Addr, interval: Duration) -> Result<Pinger, String> {
        let fd = in_ns(client_ns, || {
            socket::socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
        })
        .join()
        .map_err(|_| "opening the ICMP socket panicked".to_string())?
        .map_err(|e| format!("raw ICMP socket (needs root): {e}"))?;
        let tx = UdpSocket::from(fd);
        let rx = tx.try_clone().map_err(|e| format!("dup: {e}"))?;
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Log::default();
        let ident = (std::process::id() as u16) ^ 0x5a5a;
        let (s1, s2, l) = (stop.clone(), stop.clone(), log.clone());
        let sent = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let (sent_log, answered_log) = (sent.clone(), answered.clone());
        let sender = std::thread::spawn(move || {
            let to = SocketAddrV4::new(dst, 0);
            let mut next = Instant::now();
            let mut seq: u16 = 0;
            while !s1.load(Ordering::SeqCst) {
                seq = seq.wrapping_add(1);
                // A send failing (no route for a moment) is a lost ping.
                let _ = tx.send_to(&echo_request(ident, seq), to);
                sent_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((seq, Instant::now()));
                next += interval;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s2.load(Ordering::SeqCst) {
                let Ok(n) = rx.recv(&mut buf) else {
                    continue; // timeout: check the stop flag
                };
                if let Some(seq) = echo_reply_seq(&buf[..n], ident) {
                    l.push(Instant::now());
                    answered_log
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(seq);
                }
            }
        });
        Ok(Pinger {
            stop,
            log,
            sent,
            answered,
            handles: vec![sender, receiver],
        })
    }

    /// The reply instants.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The requests sent in `[from, to]` that have had no reply (so far).
    pub fn unanswered(&self, from: Instant, to: Instant) -> Vec<u16> {
        let answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(seq, at)| *at >= from && *at <= to && !answered.contains(seq))
            .map(|(seq, _)| *seq)
            .collect()
    }

    /// How many requests were sent in `[from, to]`.
    pub fn sent_between(&self, from: Instant, to: Instant) -> usize {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, at)| *at >= from && *at <= to)
            .count()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// An ICMP echo request (type 8) with 16 bytes of payload.
fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"ferry-outage-pin");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sequence number of an IPv4 packet (as a raw socket delivers it)
/// that is an echo reply to `ident`.
fn echo_reply_seq(packet: &[u8], ident: u16) -> Option<u16> {
    let first = packet.first()?;
    let icmp = packet.get(usize::from(first & 0x0f) * 4..)?;
    (icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes())
        .then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// A point-to-point link `mig` between the namespaces of hosts `a` and `b`
/// (`10.81.0.1/24` and `10.81.0.2/24`): the hosts' migration network,
/// separate from the VMs' segment. It goes with the namespaces.
pub fn migration_link(seg: &Segment, a: &str, b: &str) -> (Ipv4Addr, Ipv4Addr) {
    let (ns_a, ns_b) = (seg.host_ns(a).unwrap(), seg.host_ns(b).unwrap());
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 81, 0, 1), Ipv4Addr::new(10, 81, 0, 2));
    let run = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "-n", ns_a, "link", "add", "mig", "type", "veth", "peer", "name", "mig", "netns", ns_b,
    ]);
    for (ns, ip) in [(ns_a, ip_a), (ns_b, ip_b)] {
        run(&["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "mig"]);
        run(&["-n", ns, "link", "set", "mig", "up"]);
    }
    (ip_a, ip_b)
}

// Full paths, no imports: a bench that includes this file compiles it
// with `cfg(test)` but without the test functions.
#[cfg(test)]
mod tests {
    #[test]
    fn the_longest_gap_counts_intervals_touching_the_window() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let ms = std::time::Duration::from_millis;
        let times = [at(0), at(10), at(20), at(300), at(310), at(1000)];
        // 20 → 300 lies in the window; 310 → 1000 starts after it.
        assert_eq!(super::longest_gap(&times, at(15), at(305)), Some(ms(280)));
        // The interval that straddles the window's start counts.
        assert_eq!(super::longest_gap(&times, at(100), at(305)), Some(ms(280)));
        assert_eq!(super::longest_gap(&times, at(400), at(900)), Some(ms(690)));
        assert_eq!(super::longest_gap(&times[..1], at(0), at(10)), None);
    }

    #[test]
    fn an_echo_request_checksums_to_zero_and_a_reply_is_recognised() {
        let req = super::echo_request(0x1234, 7);
        assert_eq!(super::checksum(&req), 0);
        let mut reply = vec![0x45u8; 20];
        reply.extend_from_slice(&req);
        reply[20] = 0; // type 0: echo reply
        assert_eq!(super::echo_reply_seq(&reply, 0x1234), Some(7));
        assert_eq!(super::echo_reply_seq(&reply, 0x4321), None);
        reply[20] = 8;
        assert_eq!(super::echo_reply_seq(&reply, 0x1234), None);
        assert_eq!(super::echo_reply_seq(&reply[..10], 0x1234), None);
    }
}
