//! Where a drain's hand-over time goes: a watch on every Migration records
//! when each step of each migration was first seen, and each hand-over of
//! a slot (one transfer's end → the next transfer's start) is broken down
//! into the steps between them.
//!
//! ```text
//!  slot:  … P transferring ─┤end            N transferring ├─ …
//!                           │                              │
//!   P: SwitchedOver report seen                            │
//!   N:          (admitted) Scheduled ─► target Ready ─► Running ─► start
//! ```
//!
//! At most `slots` transfers run at once, so the k-th transfer to start
//! (k ≥ slots) follows the (k − slots)-th to end: that pair is one
//! hand-over, whatever rule the controller uses to free a slot. A step of
//! N already taken before P's end (a target prepared ahead) costs nothing
//! in the chain; the segments add up to the gap.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use ferry::api::{AgentState, Migration, MigrationPhase};

/// A step of a migration, as the watch sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mark {
    Scheduled,
    PreparingTarget,
    TargetReady,
    Running,
    SwitchedOver,
    Completing,
    Succeeded,
}

impl Mark {
    /// Every step, in lifecycle order.
    const ALL: [Mark; 7] = [
        Mark::Scheduled,
        Mark::PreparingTarget,
        Mark::TargetReady,
        Mark::Running,
        Mark::SwitchedOver,
        Mark::Completing,
        Mark::Succeeded,
    ];
}

/// VM → step → when first seen.
pub type Marks = HashMap<String, BTreeMap<Mark, Instant>>;

/// Record the steps of every Migration until `stop`.
pub fn record(client: kube::Client, stop: CancellationToken) -> Arc<Mutex<Marks>> {
    let marks = Arc::new(Mutex::new(Marks::new()));
    let out = marks.clone();
    tokio::spawn(async move {
        let stream = watcher(Api::<Migration>::all(client), watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = stream.next() => n,
            };
            let Some(Ok(m)) = next else { continue };
            let at = Instant::now();
            let status = m.status.clone().unwrap_or_default();
            let mut seen = Vec::new();
            match status.phase {
                MigrationPhase::Scheduled => seen.push(Mark::Scheduled),
                MigrationPhase::PreparingTarget => seen.push(Mark::PreparingTarget),
                MigrationPhase::Running => seen.push(Mark::Running),
                MigrationPhase::Completing => seen.push(Mark::Completing),
                MigrationPhase::Succeeded => seen.push(Mark::Succeeded),
                _ => {}
            }
            if status.target.as_ref().map(|r| r.state) == Some(AgentState::Ready) {
                seen.push(Mark::TargetReady);
            }
            if status.source.as_ref().map(|r| r.state) == Some(AgentState::SwitchedOver) {
                seen.push(Mark::SwitchedOver);
            }
            let mut marks = marks.lock().expect("marks");
            let steps = marks.entry(m.spec.vm_name.clone()).or_default();
            // A step never seen on its own (two steps in one write) is
            // dated by the first later one seen.
            for s in seen {
                for earlier in Mark::ALL.iter().filter(|e| **e <= s) {
                    steps.entry(*earlier).or_insert(at);
                }
            }
        }
    });
    out
}

/// One transfer as the simulated agents ran it.
pub struct Transfer {
    pub vm: String,
    pub start: Instant,
    pub end: Instant,
    /// What the transfer should take (memory ÷ bandwidth).
    pub ideal: Duration,
}

/// The segments of a hand-over, in order, with their names: the chain of
/// steps from one transfer's end to the next one's start. With targets
/// prepared ahead (the next migration waits in `PreparingTarget`, its
/// target ready) that is the whole path; a step of N seen only after P's
/// end is counted from the step before it.
pub const SEGMENTS: [&str; 5] = [
    "P end → SwitchedOver seen",
    "→ N admitted (Scheduled)",
    "→ N target Ready",
    "→ N Running",
    "→ N transfer starts",
];

/// Steps seen around a hand-over, relative to P's end (seconds; negative:
/// before it). They do not add up: they say what was done ahead.
pub const AROUND: [&str; 3] = ["N target Ready", "P Completing", "P Succeeded"];

/// One hand-over: the gap and its segments (seconds).
pub struct Handover {
    pub gap: f64,
    pub segments: [f64; SEGMENTS.len()],
    pub around: [f64; AROUND.len()],
}

fn secs(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64()
    } else {
        -(from - to).as_secs_f64()
    }
}

/// Pair the transfers into hand-overs and break each down (those with a
/// step missing from the watch are left out).
pub fn handovers(transfers: &[Transfer], marks: &Marks, slots: usize) -> Vec<Handover> {
    let mut starts: Vec<&Transfer> = transfers.iter().collect();
    starts.sort_by_key(|t| t.start);
    let mut ends: Vec<&Transfer> = transfers.iter().collect();
    ends.sort_by_key(|t| t.end);
    let mut out = Vec::new();
    for (k, n) in starts.iter().enumerate().skip(slots) {
        let p = ends[k - slots];
        let (Some(pm), Some(nm)) = (marks.get(&p.vm), marks.get(&n.vm)) else {
            continue;
        };
        let steps = [
            pm.get(&Mark::SwitchedOver).copied(),
            nm.get(&Mark::Scheduled).copied(),
            nm.get(&Mark::TargetReady).copied(),
            nm.get(&Mark::Running).copied(),
        ];
        let around = [
            nm.get(&Mark::TargetReady).copied(),
            pm.get(&Mark::Completing).copied(),
            pm.get(&Mark::Succeeded).copied(),
        ];
        let (Some(steps), Some(around)) = (
            steps.into_iter().collect::<Option<Vec<Instant>>>(),
            around.into_iter().collect::<Option<Vec<Instant>>>(),
        ) else {
            continue;
        };
        // The chain: each step at the latest of its own time and the one
        // before (what was done ahead of P's end costs nothing here).
        let mut at = p.end;
        let mut segments = [0.0; SEGMENTS.len()];
        for (i, s) in steps.iter().chain(std::iter::once(&n.start)).enumerate() {
            let t = (*s).max(at);
            segments[i] = secs(at, t);
            at = t;
        }
        let mut rel = [0.0; AROUND.len()];
        for (r, t) in rel.iter_mut().zip(&around) {
            *r = secs(p.end, *t);
        }
        out.push(Handover {
            gap: secs(p.end, n.start),
            segments,
            around: rel,
        });
    }
    out
}

/// The mean of some values (0 for none).
pub fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The q-quantile of some values (0 for none).
pub fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i]
}

/// Print the breakdown of one drain.
pub fn print(vms: usize, transfers: &[Transfer], marks: &Marks, slots: usize) {
    let h = handovers(transfers, marks, slots);
    let overshoot = mean(
        transfers
            .iter()
            .map(|t| (t.end - t.start).as_secs_f64() - t.ideal.as_secs_f64()),
    );
    println!(
        "  {vms} VMs: {} hand-overs; gap mean {:.3} s, p50 {:.3} s, p90 {:.3} s; \
         transfer longer than memory ÷ bandwidth by {:.3} s on average",
        h.len(),
        mean(h.iter().map(|x| x.gap)),
        quantile(h.iter().map(|x| x.gap).collect(), 0.5),
        quantile(h.iter().map(|x| x.gap).collect(), 0.9),
        overshoot,
    );
    for (i, name) in SEGMENTS.iter().enumerate() {
        let v: Vec<f64> = h.iter().map(|x| x.segments[i]).collect();
        println!(
            "    {name:<28} mean {:>7.3} s  p50 {:>7.3} s  p90 {:>7.3} s",
            mean(v.iter().copied()),
            quantile(v.clone(), 0.5),
            quantile(v, 0.9),
        );
    }
    println!("    relative to P's end (negative: before it):");
    for (i, name) in AROUND.iter().enumerate() {
        let v: Vec<f64> = h.iter().map(|x| x.around[i]).collect();
        println!(
            "      {name:<26} mean {:>7.3} s  p50 {:>7.3} s  p90 {:>7.3} s",
            mean(v.iter().copied()),
            quantile(v.clone(), 0.5),
            quantile(v, 0.9),
        );
    }
}

/// The first transfer's steps, from the HostMaintenance's creation.
pub fn print_head(begun: Instant, transfers: &[Transfer], marks: &Marks) {
    let Some(first) = transfers.iter().min_by_key(|t| t.start) else {
        return;
    };
    let Some(m) = marks.get(&first.vm) else {
        return;
    };
    let at = |mark: Mark| m.get(&mark).map_or(f64::NAN, |t| secs(begun, *t));
    println!(
        "    first transfer ({}): admitted {:.3} s, target Ready {:.3} s, Running {:.3} s, starts {:.3} s",
        first.vm,
        at(Mark::Scheduled),
        at(Mark::TargetReady),
        at(Mark::Running),
        secs(begun, first.start)
    );
}
