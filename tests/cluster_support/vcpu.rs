//! Which QEMU executes a VM's guest, sampled from outside: the run time of
//! a QEMU's vCPU threads (`CPU n/TCG`, named because the agent passes
//! `-name …,debug-threads=on`) from `/proc/PID/task/TID/schedstat`, in
//! nanoseconds. A QEMU that is paused (a source after its switchover) or
//! waits for an incoming stream (a migration target) runs no vCPU; a guest
//! that runs does, even idle (its timer ticks at 1 kHz).
//!
//! ```text
//!  every PERIOD: for each VM, each host: qemu.pid ─► vCPU run time
//!  interval i:  executing(vm, host) = run time grew by ≥ MIN_RUN
//!  a VM executes on two hosts when two hosts execute it in two intervals
//!  in a row (a switchover, source then target, shares at most one)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the sampler looks.
const PERIOD: Duration = Duration::from_millis(100);
/// vCPU run time within one period that counts as executing: a running
/// idle guest takes several milliseconds per period under TCG; a paused
/// vCPU thread takes none.
const MIN_RUN_NS: u64 = 500_000;

/// The summed run time of a QEMU's vCPU threads, or `None` when the
/// process is gone or names no vCPU thread.
pub fn vcpu_run_ns(pid: i32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = None;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !(comm.starts_with("CPU ") && comm.trim_end().ends_with("/TCG")) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
        total = Some(total.unwrap_or(0) + ns);
    }
    total
}

/// What the sampler saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Intervals sampled.
    pub intervals: u64,
    /// VM → hosts on which it was seen executing.
    pub executed_on: BTreeMap<String, BTreeSet<String>>,
    /// VM → the most hosts that had a live QEMU of it at once.
    pub most_qemus: BTreeMap<String, usize>,
    /// Every instant at which a VM executed on two hosts, described.
    pub doubles: Vec<String>,
}

/// A sampler thread; [`Sampler::finish`] stops it and returns its report.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Report>>,
}

impl Sampler {
    /// Sample the VMs `vms` (names in namespace `default`) on `hosts`
    /// (host name, agent state directory).
    pub fn start(hosts: Vec<(String, PathBuf)>, vms: Vec<String>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || sample(&hosts, &vms, &flag));
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop sampling; what was seen.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn qemu_pid(state_dir: &std::path::Path, vm: &str) -> Option<i32> {
    let pid = std::fs::read_to_string(
        state_dir
            .join("vms")
            .join(format!("default.{vm}"))
            .join("qemu.pid"),
    )
    .ok()?
    .trim()
    .parse::<i32>()
    .ok()?;
    ferry::agent::qemu::pid_alive(pid).then_some(pid)
}

fn sample(hosts: &[(String, PathBuf)], vms: &[String], stop: &AtomicBool) -> Report {
    let mut report = Report::default();
    // (vm, host) → (pid, run ns) at the previous sample.
    let mut before: BTreeMap<(String, String), (i32, u64)> = BTreeMap::new();
    // vm → hosts executing it in the previous interval.
    let mut last_executing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while !stop.load(Ordering::Acquire) {
        let mut now = BTreeMap::new();
        let mut executing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for vm in vms {
            let mut live = 0;
            for (host, dir) in hosts {
                let Some(pid) = qemu_pid(dir, vm) else {
                    continue;
                };
                live += 1;
                let Some(ns) = vcpu_run_ns(pid) else { continue };
                let key = (vm.clone(), host.clone());
                if let Some((p, was)) = before.get(&key)
                    && *p == pid
                    && ns >= was + MIN_RUN_NS
                {
                    executing
                        .entry(vm.clone())
                        .or_default()
                        .insert(host.clone());
                }
                now.insert(key, (pid, ns));
            }
            let most = report.most_qemus.entry(vm.clone()).or_default();
            *most = (*most).max(live);
        }
        for (vm, hosts) in &executing {
            report
                .executed_on
                .entry(vm.clone())
                .or_default()
                .extend(hosts.iter().cloned());
        }
        for (vm, both) in doubles(&last_executing, &executing) {
            report.doubles.push(format!(
                "{vm} executed on {both:?} in intervals {} and {}",
                report.intervals.saturating_sub(1),
                report.intervals
            ));
        }
        report.intervals += 1;
        before = now;
        last_executing = executing;
        std::thread::sleep(PERIOD);
    }
    report
}

/// VM → hosts executing it in one interval.
pub type Executing = BTreeMap<String, BTreeSet<String>>;

/// The VMs that executed on two or more of the same hosts in both of two
/// consecutive intervals, with those hosts: a copy that runs on two hosts
/// for good. A switchover (the source executes up to a moment, the target
/// from a later one) puts both hosts in one interval at most.
pub fn doubles(previous: &Executing, now: &Executing) -> Vec<(String, BTreeSet<String>)> {
    now.iter()
        .filter_map(|(vm, hosts)| {
            let before = previous.get(vm)?;
            let both: BTreeSet<String> = hosts.intersection(before).cloned().collect();
            (both.len() >= 2).then(|| (vm.clone(), both))
        })
        .collect()
}
