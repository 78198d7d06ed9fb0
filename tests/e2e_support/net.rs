//! Networked VMs on `ferry up` (root only): the Linux test guest with a
//! static address on the VM network `default`, and clients in the client
//! namespace — a TCP client exchanging a counter with the guest's echo
//! service and a fast ping — that measure what a user of the VM sees.
//!
//! ```text
//!  ferry-<id>-cl (client)            switch            ferry-<id>-host-N
//!  CounterClient ── TCP :7 "n\n" ──────────────────────► guest (echo)
//!  Pinger ── ICMP every 20 ms ─────────────────────────► guest (kernel)
//! ```

#[path = "../net_support/echo.rs"]
mod echo;
pub use echo::EchoReport;
use echo::exchange;

use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferry::agent::linux_guest::{self, ECHO_PORT, LinuxGuest, MEMORY_MIB};
use ferry::cli::up::netns;

use super::Cluster;

/// How long a guest may take to boot and answer (TCG, loaded machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Between two counters, and between two pings.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// The Linux guest, built once and cached; a clear failure when it cannot
/// be built here.
pub fn guest() -> LinuxGuest {
    linux_guest::ensure()
        .unwrap_or_else(|e| panic!("the network tests need the Linux test guest: {e}"))
}

/// A VM manifest: the Linux guest with one NIC on network `default` at
/// `10.78.0.<octet>/24`, configured in the guest from its command line.
pub fn linux_vm(name: &str, octet: u8) -> String {
    let g = guest();
    let cidr = format!("10.78.0.{octet}/24");
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  memory: {MEMORY_MIB}Mi\n  cpus: 1\n  boot:\n    kernel:\n      kernel: {}\n      initrd: {}\n      cmdline: \"{}\"\n  networks:\n  - name: {}\n    ip: {cidr}\n",
        g.kernel.display(),
        g.initrd.display(),
        LinuxGuest::cmdline(&cidr, None),
        netns::VM_NETWORK,
    )
}

/// The address of a VM made with [`linux_vm`].
pub fn vm_address(octet: u8) -> String {
    format!("10.78.0.{octet}")
}

impl Cluster {
    /// The client namespace on the VM network.
    pub fn client_namespace(&self) -> String {
        netns::client_namespace_name(&self.instance_id())
    }

    /// The MAC and IP of a VM's first interface, as its status reports.
    pub fn vm_nic(&self, vm: &str) -> (String, String) {
        (
            self.jsonpath(&["get", "fvm", vm], "{.status.networks[0].mac}"),
            self.jsonpath(&["get", "fvm", vm], "{.status.networks[0].ip}"),
        )
    }

    /// Wait until `vm` is Running and its QEMU runs on its host.
    pub fn wait_vm_running(&self, vm: &str) -> String {
        self.wait_for(&format!("{vm} Running"), BOOT_TIMEOUT, || {
            self.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
        });
        self.vm_host("default", vm).unwrap()
    }
}

/// A TCP client in a network namespace sending `N\n` every 20 ms to the
/// echo service at `address` and checking that `N` comes back, on one
/// connection, until [`CounterClient::stop`].
pub struct CounterClient {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU32>,
    handle: std::thread::JoinHandle<EchoReport>,
}

impl CounterClient {
    /// Connects from `ns` (retrying while the guest boots) and starts;
    /// returns once 5 counters came back, or panics.
    pub fn start(ns: &str, address: &str) -> CounterClient {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU32::new(0));
        let (ns, addr) = (
            ns.to_string(),
            format!("{address}:{ECHO_PORT}")
                .parse::<SocketAddr>()
                .unwrap(),
        );
        let (s, e) = (stop.clone(), echoed.clone());
        let handle = std::thread::spawn(move || {
            ferry::agent::net::enter(&ns).unwrap();
            run_counter(addr, &s, &e)
        });
        let client = CounterClient {
            stop,
            echoed,
            handle,
        };
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while client.echoed() < 5 {
            if client.handle.is_finished() {
                let report = client.stop();
                panic!("the counter client to {address} ended: {report:?}");
            }
            assert!(Instant::now() < deadline, "no echo from {address}");
            std::thread::sleep(Duration::from_millis(50));
        }
        client
    }

    /// Counters echoed so far.
    pub fn echoed(&self) -> u32 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// Waits until `n` counters came back, the client failed, or 120 s.
    pub fn wait_echoed(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.echoed() < n && !self.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and reports.
    pub fn stop(self) -> EchoReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

fn run_counter(addr: SocketAddr, stop: &AtomicBool, echoed: &AtomicU32) -> EchoReport {
    let mut report = EchoReport {
        echoed: 0,
        longest_gap: Duration::ZERO,
        error: None,
    };
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline || stop.load(Ordering::SeqCst) => {
                report.error = Some(format!("connect to {addr}: {e}"));
                return report;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    stream.set_nodelay(true).unwrap();
    // Generous: a stall this long means the connection is lost.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut last = Instant::now();
    let mut n: u32 = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        if let Err(e) = exchange(&mut writer, &mut reader, n) {
            report.error = Some(e);
            break;
        }
        let now = Instant::now();
        // The first echo's wait includes the connection's set-up.
        if n > 1 {
            report.longest_gap = report.longest_gap.max(now - last);
        }
        last = now;
        report.echoed = n;
        echoed.store(n, Ordering::SeqCst);
        std::thread::sleep(INTERVAL);
    }
    report
}

/// What the pinger saw.
#[derive(Debug)]
pub struct PingReport {
    /// Echo requests answered.
    pub received: u32,
    /// The highest sequence number answered, +1 (≈ requests sent).
    pub sent: u32,
    /// The longest run between two answered requests, in intervals: the
    /// ping's view of the outage.
    pub longest_gap: Duration,
}

/// Busybox `ping -i 0.02` from a namespace, until [`Pinger::stop`].
pub struct Pinger {
    child: Child,
}

impl Pinger {
    /// Starts pinging `address` from `ns` every 20 ms.
    pub fn start(ns: &str, address: &str) -> Pinger {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(guest().busybox)
            .args(["ping", "-i", "0.02", address])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Pinger { child }
    }

    /// Stops (SIGINT) and reads the replies' sequence numbers.
    pub fn stop(mut self) -> PingReport {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = self.child.wait();
        ping_report(&out)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses busybox ping's `… seq=N ttl=…` lines.
pub fn ping_report(output: &str) -> PingReport {
    let seqs: Vec<u32> = output
        .lines()
        .filter_map(|l| {
            l.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let longest = seqs
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    PingReport {
        received: seqs.len() as u32,
        sent: seqs.last().map_or(0, |s| s + 1),
        longest_gap: INTERVAL * longest,
    }
}
