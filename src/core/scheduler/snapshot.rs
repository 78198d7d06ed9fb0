//! The scheduler's view of the cluster: hosts, VMs, migrations in flight,
//! with the indexes that make one placement cost O(hosts).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use std::time::Duration;

use super::load::{self, rescale, vm_share};
use crate::core::migration::FailureReason;
use crate::core::time::Timestamp;

/// A host's lifecycle phase (the `Host` status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostPhase {
    /// In service.
    Active,
    /// Being drained or drained.
    Maintenance,
    /// Its Lease is not renewed.
    Unreachable,
    /// Declared dead; its VMs may be rebuilt elsewhere.
    Fenced,
    /// Broken.
    Failed,
}

impl HostPhase {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "Active",
            Self::Maintenance => "Maintenance",
            Self::Unreachable => "Unreachable",
            Self::Fenced => "Fenced",
            Self::Failed => "Failed",
        }
    }
}

/// CPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// Logical CPUs (vCPUs for a VM).
    pub cpus: u32,
    /// Bytes of memory.
    pub memory: u64,
}

/// One sample of a host's load series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSample {
    /// When it was taken.
    pub at: Timestamp,
    /// CPU utilisation of the whole host, 0..=100.
    pub cpu_percent: f64,
    /// Free memory in bytes.
    pub free_memory: u64,
}

/// A host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInfo {
    /// Host name.
    pub name: String,
    /// Its cluster.
    pub cluster: String,
    /// Phase.
    pub phase: HostPhase,
    /// False when cordoned (`spec.unschedulable`).
    pub schedulable: bool,
    /// Capacity.
    pub capacity: Resources,
    /// Resources already committed to VMs, as the agent reports them.
    pub allocated: Resources,
    /// CPU model name.
    pub cpu_model: String,
    /// CPU feature flags.
    pub cpu_features: BTreeSet<String>,
    /// Labels of the `Host` object.
    pub labels: BTreeMap<String, String>,
    /// Agent/hypervisor version (dotted numbers, e.g. `1.4.2`).
    pub agent_version: String,
    /// Load series, oldest first.
    pub load: Vec<LoadSample>,
    /// The cluster's control host (oVirt's SPM): `spmVmGrace` VMs fewer.
    pub control_host: bool,
}

/// Where a VM may run (`spec.placement`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmPlacement {
    /// Required cluster (else the current host's cluster).
    pub cluster: Option<String>,
    /// Host labels the host must carry.
    pub host_selector: BTreeMap<String, String>,
    /// The only host allowed.
    pub pinned_host: Option<String>,
    /// VMs of this group run on one host.
    pub affinity_group: Option<String>,
    /// VMs of this group run on different hosts.
    pub anti_affinity_group: Option<String>,
}

/// CPU model names meaning "the host's own CPU": such a VM can only move to
/// a host with the same model and at least the same features.
pub const HOST_CPU_MODELS: [&str; 3] = ["host", "host-passthrough", "host-model"];

/// A VM as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    /// `namespace/name`.
    pub id: String,
    /// Where it runs (`status.host`), if anywhere.
    pub host: Option<String>,
    /// Memory and vCPUs.
    pub resources: Resources,
    /// Requested CPU model, if any.
    pub cpu_model: Option<String>,
    /// Required CPU features.
    pub required_cpu_features: BTreeSet<String>,
    /// Placement constraints.
    pub placement: VmPlacement,
    /// `spec.migratable`.
    pub migratable: bool,
    /// Quarantined after repeated failures: left alone by automatic moves.
    pub quarantined: bool,
    /// `spec.highlyAvailable`: rebuilt elsewhere when its host fails, even
    /// under `MigrateHighlyAvailableOnly`.
    pub highly_available: bool,
}

/// A migration in flight (admitted and not finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The VM's id.
    pub vm: String,
    /// Source host.
    pub source: String,
    /// Target host, once assigned.
    pub target: Option<String>,
}

/// Hosts, VMs and migrations in flight, indexed.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub(crate) hosts: Vec<HostInfo>,
    pub(crate) vms: Vec<VmInfo>,
    pub(crate) in_flight: Vec<InFlight>,
    pub(crate) host_index: HashMap<String, usize>,
    pub(crate) vm_index: HashMap<String, usize>,
    /// VMs whose `host` is this host.
    pub(crate) vms_on: Vec<Vec<usize>>,
    /// Sum of vCPUs of the VMs on the host.
    pub(crate) vcpus_on: Vec<u32>,
    /// VMs arriving (in-flight targets).
    pub(crate) inbound: Vec<Vec<usize>>,
    /// Migrations leaving.
    pub(crate) outbound: Vec<u32>,
    /// Resources reserved by arriving VMs.
    pub(crate) reserved: Vec<Resources>,
    /// CPU load (percentage points) the arriving VMs will add.
    pub(crate) incoming_load: Vec<f64>,
    /// Members of each affinity group.
    pub(crate) affinity: HashMap<String, Vec<usize>>,
    /// Members of each anti-affinity group.
    pub(crate) anti_affinity: HashMap<String, Vec<usize>>,
    /// VM index → its in-flight migration's target host index.
    pub(crate) vm_target: HashMap<usize, usize>,
    /// Flat copies of what every placement reads for every host.
    pub(crate) hot: Hot,
    /// Hosts quarantined after repeated failed incoming migrations.
    pub(crate) quarantined: HashMap<usize, HostQuarantine>,
}

/// A host that no migration targets until `until`: too many incoming
/// migrations failed on its side lately (see `core::drain::quarantine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostQuarantine {
    /// When it ends.
    pub until: Timestamp,
    /// Failed incoming migrations within the window that started it.
    pub failures: u32,
    /// The last of them.
    pub last: FailureReason,
}

/// Flat, cache-friendly copies of the per-host data every placement reads
/// (a placement walks every host: at 10,000 hosts, chasing each host's heap
/// allocations costs more than the filters themselves).
#[derive(Debug, Clone, Default)]
pub(crate) struct Hot {
    /// Interned cluster of each host.
    pub cluster: Vec<u32>,
    cluster_ids: HashMap<String, u32>,
    cluster_names: Vec<Arc<str>>,
    /// Host names, shared by every decision that names them.
    pub names: Vec<Arc<str>>,
    /// CPU features of each host as a bit mask (when at most 64 distinct).
    pub features: Vec<u64>,
    feature_bits: HashMap<String, u32>,
    features_fit: bool,
    /// Every host's sample times, one after the other (`off` delimits them).
    at: Vec<Timestamp>,
    /// Minimum CPU from each sample to the end of its host's series.
    suffix_min: Vec<f64>,
    /// Maximum CPU from each sample to the end of its host's series.
    suffix_max: Vec<f64>,
    off: Vec<usize>,
}

impl Hot {
    fn new(hosts: &[HostInfo]) -> Self {
        let mut hot = Hot {
            features_fit: true,
            off: vec![0],
            ..Default::default()
        };
        for h in hosts {
            let next = u32::try_from(hot.cluster_ids.len()).unwrap_or(u32::MAX);
            let id = *hot.cluster_ids.entry(h.cluster.clone()).or_insert(next);
            if id == next {
                hot.cluster_names.push(Arc::from(h.cluster.as_str()));
            }
            hot.cluster.push(id);
            hot.names.push(Arc::from(h.name.as_str()));
            let mut mask = 0u64;
            for f in &h.cpu_features {
                let next = u32::try_from(hot.feature_bits.len()).unwrap_or(u32::MAX);
                let bit = *hot.feature_bits.entry(f.clone()).or_insert(next);
                if bit < 64 {
                    mask |= 1 << bit;
                } else {
                    hot.features_fit = false;
                }
            }
            hot.features.push(mask);
            let start = hot.at.len();
            hot.at.extend(h.load.iter().map(|l| l.at));
            hot.suffix_min.extend(h.load.iter().map(|l| l.cpu_percent));
            hot.suffix_max.extend(h.load.iter().map(|l| l.cpu_percent));
            for i in (start..hot.at.len().saturating_sub(1)).rev() {
                hot.suffix_min[i] = hot.suffix_min[i].min(hot.suffix_min[i + 1]);
                hot.suffix_max[i] = hot.suffix_max[i].max(hot.suffix_max[i + 1]);
            }
            hot.off.push(hot.at.len());
        }
        hot
    }

    /// The cluster of host `h`.
    pub fn cluster_name(&self, h: usize) -> Arc<str> {
        self.cluster_names[self.cluster[h] as usize].clone()
    }

    /// The interned id of a cluster (`u32::MAX`: no host is in it).
    pub fn cluster_id(&self, name: &str) -> u32 {
        self.cluster_ids.get(name).copied().unwrap_or(u32::MAX)
    }

    /// A feature set as a mask, when every feature is known and fits.
    pub fn feature_mask<'f>(&self, features: impl IntoIterator<Item = &'f String>) -> Option<u64> {
        if !self.features_fit {
            return None;
        }
        features
            .into_iter()
            .try_fold(0u64, |m, f| self.feature_bits.get(f).map(|b| m | (1 << b)))
    }

    /// The series of host `h` judged over `[now - d, now]` by the
    /// precomputed suffix extremes: `Some(min, max)` of the window, `None`
    /// when the series does not reach back to its start. Falls back to
    /// `slow` when samples after `now` exist (they must not count).
    fn window_extremes(&self, h: usize, d: Duration, now: Timestamp) -> Option<Option<(f64, f64)>> {
        let (lo, hi) = (self.off[h], self.off[h + 1]);
        let at = &self.at[lo..hi];
        let end = at.partition_point(|t| *t <= now);
        if end < at.len() {
            return None;
        }
        let first = at.partition_point(|t| *t <= now.minus(d));
        Some((first > 0).then(|| {
            (
                self.suffix_min[lo + first - 1],
                self.suffix_max[lo + first - 1],
            )
        }))
    }
}

impl Snapshot {
    /// Build the snapshot and its indexes. VMs or migrations naming unknown
    /// hosts are kept but count on no host.
    pub fn new(hosts: Vec<HostInfo>, vms: Vec<VmInfo>, in_flight: Vec<InFlight>) -> Self {
        let host_index: HashMap<String, usize> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect();
        let vm_index: HashMap<String, usize> = vms
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id.clone(), i))
            .collect();
        let n = hosts.len();
        let mut s = Self {
            hosts,
            vms,
            in_flight: Vec::new(),
            host_index,
            vm_index,
            vms_on: vec![Vec::new(); n],
            vcpus_on: vec![0; n],
            inbound: vec![Vec::new(); n],
            outbound: vec![0; n],
            reserved: vec![Resources::default(); n],
            incoming_load: vec![0.0; n],
            affinity: HashMap::new(),
            anti_affinity: HashMap::new(),
            vm_target: HashMap::new(),
            hot: Hot::default(),
            quarantined: HashMap::new(),
        };
        s.hot = Hot::new(&s.hosts);
        for (i, vm) in s.vms.iter().enumerate() {
            if let Some(h) = vm.host.as_ref().and_then(|h| s.host_index.get(h)) {
                s.vms_on[*h].push(i);
                s.vcpus_on[*h] += vm.resources.cpus;
            }
            if let Some(g) = &vm.placement.affinity_group {
                s.affinity.entry(g.clone()).or_default().push(i);
            }
            if let Some(g) = &vm.placement.anti_affinity_group {
                s.anti_affinity.entry(g.clone()).or_default().push(i);
            }
        }
        for m in in_flight {
            s.add_in_flight(m);
        }
        s
    }

    /// Record a migration in flight (also used by planners to reserve a
    /// target for a VM they have just placed).
    pub fn add_in_flight(&mut self, m: InFlight) {
        if let Some(src) = self.host_index.get(&m.source) {
            self.outbound[*src] += 1;
        }
        let vm = self.vm_index.get(&m.vm).copied();
        if let (Some(t), Some(v)) = (
            m.target
                .as_ref()
                .and_then(|t| self.host_index.get(t))
                .copied(),
            vm,
        ) {
            self.inbound[t].push(v);
            let r = self.vms[v].resources;
            self.reserved[t].cpus += r.cpus;
            self.reserved[t].memory += r.memory;
            self.vm_target.insert(v, t);
            // The VM's share of its source's latest load, moved to the target.
            let (share, from_cpus) = match self.host_index.get(&m.source).copied() {
                Some(src) => {
                    let host = &self.hosts[src];
                    let load = host.load.last().map_or(0.0, |l| l.cpu_percent);
                    (
                        vm_share(load, host.capacity.cpus, self.vcpus_on[src], r.cpus),
                        host.capacity.cpus,
                    )
                }
                None => (100.0, r.cpus),
            };
            self.incoming_load[t] += rescale(share, from_cpus, self.hosts[t].capacity.cpus);
        }
        self.in_flight.push(m);
    }

    /// All hosts.
    pub fn hosts(&self) -> &[HostInfo] {
        &self.hosts
    }

    /// All VMs.
    pub fn vms(&self) -> &[VmInfo] {
        &self.vms
    }

    /// Migrations in flight.
    pub fn in_flight(&self) -> &[InFlight] {
        &self.in_flight
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Option<&HostInfo> {
        self.host_index.get(name).map(|i| &self.hosts[*i])
    }

    /// A VM by id.
    pub fn vm(&self, id: &str) -> Option<&VmInfo> {
        self.vm_index.get(id).map(|i| &self.vms[*i])
    }

    /// VMs running on a host.
    pub fn vms_on(&self, host: &str) -> impl Iterator<Item = &VmInfo> {
        let list = self
            .host_index
            .get(host)
            .map(|i| self.vms_on[*i].as_slice())
            .unwrap_or(&[]);
        list.iter().map(|v| &self.vms[*v])
    }

    /// Migrations in flight arriving at a host.
    pub fn inbound_count(&self, host: &str) -> usize {
        self.host_index
            .get(host)
            .map_or(0, |i| self.inbound[*i].len())
    }

    /// Memory still free on host `h` for a new VM: capacity minus what the
    /// agent reports as allocated minus VMs on their way in.
    pub(crate) fn free_memory(&self, h: usize) -> u64 {
        let host = &self.hosts[h];
        host.capacity
            .memory
            .saturating_sub(host.allocated.memory)
            .saturating_sub(self.reserved[h].memory)
    }

    /// Whether host `h`'s CPU stayed over `threshold` % for the whole
    /// `duration` (same answer as [`load::cpu_over`], from the flat copy).
    pub(crate) fn cpu_over(
        &self,
        h: usize,
        threshold: u32,
        duration: Duration,
        now: Timestamp,
    ) -> bool {
        match self.hot.window_extremes(h, duration, now) {
            Some(w) => w.is_some_and(|(min, _)| min > f64::from(threshold)),
            None => load::cpu_over(&self.hosts[h], threshold, duration, now),
        }
    }

    /// Whether host `h`'s CPU stayed under `threshold` % for the whole
    /// `duration` (same answer as [`load::cpu_under`]).
    pub(crate) fn cpu_under(
        &self,
        h: usize,
        threshold: u32,
        duration: Duration,
        now: Timestamp,
    ) -> bool {
        match self.hot.window_extremes(h, duration, now) {
            Some(w) => w.is_some_and(|(_, max)| max < f64::from(threshold)),
            None => load::cpu_under(&self.hosts[h], threshold, duration, now),
        }
    }

    /// Whether the host is source or target of a migration in flight.
    /// Quarantine a host (a name not in the snapshot is ignored).
    pub fn quarantine(&mut self, host: &str, q: HostQuarantine) {
        if let Some(h) = self.host_index.get(host) {
            self.quarantined.insert(*h, q);
        }
    }

    /// The quarantine of host `h` in force at `now`.
    pub(crate) fn quarantine_of(&self, h: usize, now: Timestamp) -> Option<&HostQuarantine> {
        self.quarantined.get(&h).filter(|q| q.until > now)
    }

    pub(crate) fn busy(&self, h: usize) -> bool {
        self.outbound[h] > 0 || !self.inbound[h].is_empty()
    }
}
