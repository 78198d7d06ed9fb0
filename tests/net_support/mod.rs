//! Shared by the `net_*` tests: an L2 segment of network namespaces
//! (`ferry::agent::net::Segment`), the Linux test guest in a real QEMU on a
//! tap in a host namespace (killed on Drop), a blocking QMP client, and a
//! TCP client that keeps exchanging a counter with the guest's echo service.

#![allow(dead_code)] // each test binary uses a different part

pub mod echo;
pub mod hosts;
pub mod outage;

pub use echo::EchoReport;
use echo::exchange;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferry::agent::linux_guest::{self, ECHO_PORT, LinuxGuest, MEMORY_MIB, READY_MARKER};
use ferry::agent::net::{self, Segment};
use serde_json::{Value, json};
use tempfile::TempDir;

/// TCG on a loaded 2-core machine: boots take ~3 s idle, far more loaded.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's MAC in every test (unique per segment is all that matters).
pub const MAC: &str = "52:54:00:fe:00:05";

/// The guest's address and the client's, on the segment's /24.
pub const GUEST_IP: &str = "10.80.0.5";
pub const CLIENT_CIDR: &str = "10.80.0.1/24";

/// The Linux guest, built once (and cached across runs); a clear failure
/// when `apt-get download` is impossible here.
pub fn guest() -> LinuxGuest {
    linux_guest::ensure().unwrap_or_else(|e| {
        panic!("the network tests need the Linux test guest: {e}");
    })
}

/// A segment with hosts `a` and `b` and unique namespace names.
pub fn segment(tag: &str) -> Segment {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!(
        "fn{}-{}-{}",
        std::process::id() % 100_000,
        tag,
        N.fetch_add(1, Ordering::SeqCst)
    );
    Segment::create(&prefix, &["a", "b"], "br-ferry", CLIENT_CIDR).unwrap()
}

/// A QEMU running the Linux guest inside a host namespace.
pub struct GuestVm {
    child: Child,
    pub qmp_path: PathBuf,
    pub serial: PathBuf,
    pub incoming: PathBuf,
}

impl GuestVm {
    /// Creates tap `tap` on the host namespace's bridge and starts the guest
    /// on it; `incoming` starts it as a migration target (`-incoming defer`).
    pub fn start(dir: &TempDir, name: &str, ns: &str, tap: &str, incoming: bool) -> GuestVm {
        let g = guest();
        let path = |suffix: &str| dir.path().join(format!("{name}-{suffix}"));
        // The tap is created inside the host namespace, as the agent there would.
        let status = Command::new("ip")
            .args([
                "netns", "exec", ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "creating tap {tap} in {ns}");
        let status = Command::new("ip")
            .args([
                "-n", ns, "link", "set", "dev", tap, "master", "br-ferry", "up",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "attaching tap {tap} in {ns}");
        let qmp_path = path("qmp.sock");
        let serial = path("serial.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-nodefaults", "-nographic"])
            .args(["-m", &MEMORY_MIB.to_string()])
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&g.initrd)
            .arg("-append")
            .arg(LinuxGuest::cmdline(&format!("{GUEST_IP}/24"), None))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={MAC}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(path("stderr.log")).unwrap());
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let child = cmd.spawn().unwrap();
        GuestVm {
            child,
            qmp_path,
            serial,
            incoming: path("incoming.sock"),
        }
    }

    /// Waits for the guest's ready line on its console.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if log.contains(READY_MARKER) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited ({status}) before the guest was ready:\n{log}");
            }
            assert!(Instant::now() < deadline, "guest not ready:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path)
    }

    /// Waits for QEMU to exit (after `quit`), killing it after `within`.
    pub fn wait_exit(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Blocking QMP: greeting, `qmp_capabilities`, then one command at a time.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "not QMP: {greeting}");
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Runs a command, returns its `return` value (events are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({ "execute": command, "arguments": arguments });
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .unwrap();
        loop {
            let reply = self.read();
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            if let Some(error) = reply.get("error") {
                panic!("QMP {command} failed: {error}");
            }
        }
    }

    /// Polls `query-status` until the VM runs.
    pub fn wait_running(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.execute("query-status", json!({}));
            if s["running"] == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "VM not running: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `query-migrate` until `completed` (panics on `failed`).
    pub fn wait_migrated(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let m = self.execute("query-migrate", json!({}));
            match m["status"].as_str() {
                Some("completed") => return m,
                Some("failed") | Some("cancelled") => panic!("migration failed: {m}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "migration unfinished: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        net::enter(&ns).unwrap();
        f()
    })
}

/// Pings the guest from the client namespace with the busybox built with
/// the guest; true when a reply came.
pub fn ping(client_ns: &str, count: u32) -> bool {
    Command::new("ip")
        .args(["netns", "exec", client_ns])
        .arg(guest().busybox)
        .args(["ping", "-c", &count.to_string(), "-W", "2", GUEST_IP])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A TCP client in the client namespace sending `N\n` every 20 ms and
/// checking each echo; runs until [`CounterClient::stop`].
pub struct CounterClient {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    echoed: Arc<AtomicU32>,
    handle: std::thread::JoinHandle<EchoReport>,
}

impl CounterClient {
    /// Connects (retrying while the guest's service comes up) and starts.
    pub fn start(client_ns: &str) -> CounterClient {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU32::new(0));
        let flags = Flags {
            stop: stop.clone(),
            pause: pause.clone(),
            idle: idle.clone(),
            echoed: echoed.clone(),
        };
        let handle = in_ns(client_ns, move || run_counter(&flags));
        let c = CounterClient {
            stop,
            pause,
            idle,
            echoed,
            handle,
        };
        c.wait_echoed(5);
        c
    }

    /// Waits until at least `n` counters have come back (or 60 s).
    pub fn wait_echoed(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.echoed.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops sending (the connection stays open, idle) once the current
    /// counter is echoed; the pause does not count as a gap.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.idle.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends again after [`CounterClient::pause`].
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Counters echoed so far.
    pub fn echoed(&self) -> u32 {
        self.echoed.load(Ordering::SeqCst)
    }

    pub fn stop(self) -> EchoReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// Between two counters (what the issue's measurements used).
const INTERVAL: Duration = Duration::from_millis(20);

struct Flags {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    echoed: Arc<AtomicU32>,
}

fn run_counter(flags: &Flags) -> EchoReport {
    let (stop, echoed) = (&flags.stop, &flags.echoed);
    let addr: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse().unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return EchoReport {
                    echoed: 0,
                    longest_gap: Duration::ZERO,
                    error: Some(format!("connect: {e}")),
                };
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    stream.set_nodelay(true).unwrap();
    // Generous: a stall this long means the connection is lost.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut report = EchoReport {
        echoed: 0,
        longest_gap: Duration::ZERO,
        error: None,
    };
    let mut last = Instant::now();
    let mut n: u32 = 0;
    while !stop.load(Ordering::SeqCst) {
        while flags.pause.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            flags.idle.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            last = Instant::now();
        }
        flags.idle.store(false, Ordering::SeqCst);
        n += 1;
        if let Err(e) = exchange(&mut writer, &mut reader, n) {
            report.error = Some(e);
            break;
        }
        let now = Instant::now();
        report.longest_gap = report.longest_gap.max(now - last);
        last = now;
        report.echoed = n;
        echoed.store(n, Ordering::SeqCst);
        std::thread::sleep(INTERVAL);
    }
    report
}

/// The switch port (`h0` → host a, `h1` → host b) that the switch's bridge
/// forwards `mac` to, if it has learnt one.
pub fn switch_port_of(segment: &Segment, mac: &str) -> Option<String> {
    let out = Command::new("bridge")
        .args(["-n", segment.switch_ns(), "fdb", "show", "br", "sw"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(mac) && !l.contains("permanent"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
}

/// A scratch directory with a short path (unix sockets ≤ 108 bytes).
pub fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-net-")
        .tempdir_in("/tmp")
        .unwrap()
}
