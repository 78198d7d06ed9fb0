//! Test fixtures: builders for hosts, VMs and snapshots.

use std::collections::{BTreeMap, BTreeSet};

use super::snapshot::{HostInfo, HostPhase, LoadSample, Resources, VmInfo, VmPlacement};
use crate::core::time::{GIB, Timestamp};

/// An active, schedulable 16-CPU, 64 GiB host in cluster `c1` with no load.
pub(crate) fn host(name: &str) -> HostInfo {
    HostInfo {
        name: name.to_string(),
        cluster: "c1".to_string(),
        phase: HostPhase::Active,
        schedulable: true,
        capacity: Resources {
            cpus: 16,
            memory: 64 * GIB,
        },
        allocated: Resources::default(),
        cpu_model: "Skylake-Server".to_string(),
        cpu_features: ["avx2", "aes", "sse4_2"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        labels: BTreeMap::new(),
        agent_version: "1.0.0".to_string(),
        load: Vec::new(),
        control_host: false,
    }
}

/// A constant load series from `from` to `to` every 10 s.
pub(crate) fn flat_load(cpu: f64, from: i64, to: i64) -> Vec<LoadSample> {
    (from..=to)
        .step_by(10)
        .map(|t| LoadSample {
            at: Timestamp::from_secs(t),
            cpu_percent: cpu,
            free_memory: 32 * GIB,
        })
        .collect()
}

/// Builder-style tweaks on a host.
pub(crate) trait HostExt {
    fn cpu(self, pct: f64) -> Self;
    fn cluster(self, c: &str) -> Self;
    fn phase(self, p: HostPhase) -> Self;
    fn cpus(self, n: u32) -> Self;
    fn memory_gib(self, capacity: u64, allocated: u64) -> Self;
    fn version(self, v: &str) -> Self;
    fn label(self, k: &str, v: &str) -> Self;
}

impl HostExt for HostInfo {
    /// Load `pct` for the last 10 minutes before t = 1000 s.
    fn cpu(mut self, pct: f64) -> Self {
        self.load = flat_load(pct, 400, 1000);
        self
    }
    fn cluster(mut self, c: &str) -> Self {
        self.cluster = c.to_string();
        self
    }
    fn phase(mut self, p: HostPhase) -> Self {
        self.phase = p;
        self
    }
    fn cpus(mut self, n: u32) -> Self {
        self.capacity.cpus = n;
        self
    }
    fn memory_gib(mut self, capacity: u64, allocated: u64) -> Self {
        self.capacity.memory = capacity * GIB;
        self.allocated.memory = allocated * GIB;
        self
    }
    fn version(mut self, v: &str) -> Self {
        self.agent_version = v.to_string();
        self
    }
    fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_string(), v.to_string());
        self
    }
}

/// The time the fixtures' load series end at.
pub(crate) const NOW: Timestamp = Timestamp::from_secs(1000);

/// A migratable 2-vCPU, 4 GiB VM on `host`.
pub(crate) fn vm(id: &str, host: Option<&str>) -> VmInfo {
    VmInfo {
        id: id.to_string(),
        host: host.map(str::to_string),
        resources: Resources {
            cpus: 2,
            memory: 4 * GIB,
        },
        cpu_model: None,
        required_cpu_features: BTreeSet::new(),
        placement: VmPlacement::default(),
        migratable: true,
        quarantined: false,
        highly_available: false,
    }
}
