//! Filters and weights: one VM against one host.
//!
//! Filters follow oVirt's policy units; every filter that rejects a host says
//! why with a [`Rejection`] (see `rejection.rs`). In "explain" mode every filter runs so that the
//! decision lists all the reasons a host was refused; in "fast" mode (the
//! balancer's inner loop) evaluation stops at the first rejection.

use std::collections::HashMap;
use std::sync::Arc;

use super::load::{compare_versions, cpu_now, rescale, vm_share};
pub use super::rejection::Rejection;
use super::snapshot::{HOST_CPU_MODELS, HostPhase, Snapshot, VmInfo};
use crate::core::policy::{EffectivePolicy, SchedulingPolicyKind};
use crate::core::time::Timestamp;

/// How a host that passed every filter was weighed.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Higher is better.
    pub score: f64,
    /// CPU load (%) now.
    pub cpu_now: f64,
    /// CPU load (%) expected with the VM.
    pub cpu_projected: f64,
    /// Free memory after placement (bytes).
    pub free_memory_after: u64,
    /// VMs on or arriving at the host, with `spmVmGrace` added on the
    /// control host.
    pub vm_count: u32,
}

/// One VM being placed, with everything precomputed that does not depend on
/// the candidate host.
pub(crate) struct Request<'a> {
    pub vm: &'a VmInfo,
    pub source: Option<usize>,
    pub cluster: Option<&'a str>,
    /// `cluster`, interned.
    pub cluster_id: u32,
    /// `cluster`, shared by every rejection that names it.
    pub cluster_name: Option<Arc<str>>,
    /// Required CPU features (with the source's, for host-passthrough) as a
    /// mask, when every one is known.
    pub feature_mask: Option<u64>,
    pub policy: &'a EffectivePolicy,
    pub now: Timestamp,
    pub ignore_inbound_limit: bool,
    /// CPU share of the VM in percentage points of `share_cpus` CPUs.
    pub share: f64,
    pub share_cpus: u32,
    /// Hosts of the other members of the VM's affinity group, with counts.
    pub affinity_hosts: Vec<(usize, usize)>,
    /// Hosts holding a member of the VM's anti-affinity group → that member.
    pub anti_hosts: HashMap<usize, usize>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(
        s: &'a Snapshot,
        vm_idx: usize,
        policy: &'a EffectivePolicy,
        now: Timestamp,
        ignore_inbound_limit: bool,
    ) -> Self {
        let vm = &s.vms[vm_idx];
        let source = vm.host.as_ref().and_then(|h| s.host_index.get(h)).copied();
        let cluster = vm
            .placement
            .cluster
            .as_deref()
            .or(source.map(|h| s.hosts[h].cluster.as_str()));
        let (share, share_cpus) = match source {
            Some(h) => {
                let host = &s.hosts[h];
                let load = cpu_now(host, now);
                (
                    vm_share(load, host.capacity.cpus, s.vcpus_on[h], vm.resources.cpus),
                    host.capacity.cpus,
                )
            }
            None => (100.0, vm.resources.cpus),
        };
        // Where a VM is, or is going: the target of its migration in flight
        // counts too, so two members never race onto one host.
        let location = |m: usize| {
            s.vm_target.get(&m).copied().or_else(|| {
                s.vms[m]
                    .host
                    .as_ref()
                    .and_then(|h| s.host_index.get(h))
                    .copied()
            })
        };
        let mut affinity_hosts: Vec<(usize, usize)> = Vec::new();
        if let Some(members) = vm
            .placement
            .affinity_group
            .as_ref()
            .and_then(|g| s.affinity.get(g))
        {
            for h in members
                .iter()
                .filter(|m| **m != vm_idx)
                .filter_map(|m| location(*m))
            {
                match affinity_hosts.iter_mut().find(|(x, _)| *x == h) {
                    Some((_, n)) => *n += 1,
                    None => affinity_hosts.push((h, 1)),
                }
            }
        }
        let mut anti_hosts = HashMap::new();
        if let Some(members) = vm
            .placement
            .anti_affinity_group
            .as_ref()
            .and_then(|g| s.anti_affinity.get(g))
        {
            for m in members.iter().filter(|m| **m != vm_idx) {
                if let Some(h) = s.vms[*m].host.as_ref().and_then(|h| s.host_index.get(h)) {
                    anti_hosts.insert(*h, *m);
                }
                if let Some(t) = s.vm_target.get(m) {
                    anti_hosts.insert(*t, *m);
                }
            }
        }
        let passthrough = vm
            .cpu_model
            .as_deref()
            .is_some_and(|m| HOST_CPU_MODELS.contains(&m));
        let feature_mask = s
            .hot
            .feature_mask(&vm.required_cpu_features)
            .map(|m| match source {
                Some(src) if passthrough => m | s.hot.features[src],
                _ => m,
            });
        Self {
            vm,
            source,
            cluster,
            cluster_id: cluster.map_or(u32::MAX, |c| s.hot.cluster_id(c)),
            cluster_name: cluster.map(Arc::from),
            feature_mask,
            policy,
            now,
            ignore_inbound_limit,
            share,
            share_cpus,
            affinity_hosts,
            anti_hosts,
        }
    }

    /// The VM's CPU share, in percentage points of a host of `cpus` CPUs.
    pub(crate) fn share_on(&self, cpus: u32) -> f64 {
        rescale(self.share, self.share_cpus, cpus)
    }

    /// Run the filters on host `h`. With `all`, collect every rejection;
    /// otherwise stop at the first. Returns the rejections (empty: fit).
    pub(crate) fn filter(&self, s: &Snapshot, h: usize, all: bool) -> Vec<Rejection> {
        let mut out = Vec::new();
        macro_rules! reject {
            ($r:expr) => {{
                out.push($r);
                if !all {
                    return out;
                }
            }};
        }
        let host = &s.hosts[h];
        let sched = &self.policy.scheduling;
        let vm = self.vm;
        if self.source == Some(h) {
            reject!(Rejection::IsSource);
        }
        if host.phase != HostPhase::Active {
            reject!(Rejection::NotActive { phase: host.phase });
        }
        if !host.schedulable {
            reject!(Rejection::Unschedulable);
        }
        if let Some(q) = s.quarantine_of(h, self.now) {
            reject!(Rejection::Quarantined {
                remaining: q.until.since(self.now),
                failures: q.failures,
                last: q.last,
            });
        }
        let free = s.free_memory(h);
        if free < vm.resources.memory {
            reject!(Rejection::Memory {
                free,
                needed: vm.resources.memory
            });
        }
        if host.capacity.cpus < vm.resources.cpus {
            reject!(Rejection::Cpus {
                host: host.capacity.cpus,
                needed: vm.resources.cpus
            });
        }
        let limit = self.policy.limits.inbound_per_host;
        let arriving = u32::try_from(s.inbound[h].len()).unwrap_or(u32::MAX);
        if !self.ignore_inbound_limit && arriving >= limit {
            reject!(Rejection::InboundLimit {
                in_flight: arriving,
                limit
            });
        }
        if let Some(required) = &self.cluster_name
            && s.hot.cluster[h] != self.cluster_id
        {
            reject!(Rejection::WrongCluster {
                host: s.hot.cluster_name(h),
                required: required.clone()
            });
        }
        if let Some(pinned) = &vm.placement.pinned_host
            && *pinned != host.name
        {
            reject!(Rejection::NotPinned {
                pinned: pinned.clone()
            });
        }
        for (key, want) in &vm.placement.host_selector {
            let got = host.labels.get(key);
            if got != Some(want) {
                reject!(Rejection::HostSelector {
                    key: key.clone(),
                    want: want.clone(),
                    got: got.cloned()
                });
            }
        }
        self.filter_cpu(s, h, &mut out);
        if !all && !out.is_empty() {
            return out;
        }
        if !self.affinity_hosts.is_empty() && !self.affinity_hosts.iter().any(|(x, _)| *x == h) {
            let group = vm.placement.affinity_group.clone().unwrap_or_default();
            let hosts = self
                .affinity_hosts
                .iter()
                .map(|(x, _)| s.hosts[*x].name.clone())
                .collect();
            reject!(Rejection::Affinity { group, hosts });
        }
        if let Some(m) = self.anti_hosts.get(&h) {
            let group = vm.placement.anti_affinity_group.clone().unwrap_or_default();
            reject!(Rejection::AntiAffinity {
                group,
                vm: s.vms[*m].id.clone()
            });
        }
        let duration = sched.over_commit_duration;
        if s.cpu_over(h, sched.high_utilization, duration, self.now) {
            let percent = cpu_now(host, self.now);
            reject!(Rejection::Overloaded {
                percent,
                threshold: sched.high_utilization,
                duration
            });
        }
        if sched.policy == SchedulingPolicyKind::PowerSaving {
            let projected =
                cpu_now(host, self.now) + s.incoming_load[h] + self.share_on(host.capacity.cpus);
            if projected > f64::from(sched.high_utilization) {
                reject!(Rejection::WouldExceedHighUtilization {
                    projected,
                    threshold: sched.high_utilization
                });
            }
        }
        if let Some(threshold) = sched.max_free_memory_for_over_utilized {
            let free_after = free.saturating_sub(vm.resources.memory);
            if free_after < threshold {
                reject!(Rejection::MemoryOverUtilized {
                    free_after,
                    threshold
                });
            }
        }
        if sched.policy == SchedulingPolicyKind::InClusterUpgrade
            && let Some(src) = self.source
        {
            let source = &s.hosts[src].agent_version;
            if compare_versions(&host.agent_version, source).is_lt() {
                reject!(Rejection::OlderVersion {
                    host: host.agent_version.clone(),
                    source: source.clone()
                });
            }
        }
        out
    }

    /// CPU model and features: a named model must match the host's; the
    /// host's own model ("host-passthrough") must match the source's model
    /// with at least its features.
    fn filter_cpu(&self, s: &Snapshot, h: usize, out: &mut Vec<Rejection>) {
        let host = &s.hosts[h];
        let vm = self.vm;
        let passthrough = vm
            .cpu_model
            .as_deref()
            .is_some_and(|m| HOST_CPU_MODELS.contains(&m));
        let required_model = match (&vm.cpu_model, passthrough, self.source) {
            (Some(m), false, _) => Some(m.as_str()),
            (_, true, Some(src)) => Some(s.hosts[src].cpu_model.as_str()),
            _ => None,
        };
        if let Some(m) = required_model
            && host.cpu_model != m
        {
            out.push(Rejection::CpuModel {
                host: host.cpu_model.clone(),
                required: m.to_string(),
            });
        }
        // Fast path: every required feature present, by mask.
        if let Some(mask) = self.feature_mask
            && s.hot.features[h] & mask == mask
        {
            return;
        }
        let mut missing: Vec<String> = vm
            .required_cpu_features
            .iter()
            .filter(|f| !host.cpu_features.contains(*f))
            .cloned()
            .collect();
        if passthrough && let Some(src) = self.source {
            for f in s.hosts[src]
                .cpu_features
                .iter()
                .filter(|f| !host.cpu_features.contains(*f))
            {
                if !missing.contains(f) {
                    missing.push(f.clone());
                }
            }
        }
        if !missing.is_empty() {
            missing.sort();
            out.push(Rejection::MissingCpuFeatures { missing });
        }
    }

    /// Weigh a host that passed the filters (higher is better).
    pub(crate) fn score(&self, s: &Snapshot, h: usize) -> Score {
        let host = &s.hosts[h];
        let sched = &self.policy.scheduling;
        // Load now, plus what VMs on their way here will add.
        let cpu = cpu_now(host, self.now) + s.incoming_load[h];
        let projected = cpu + self.share_on(host.capacity.cpus);
        let free_after = s.free_memory(h).saturating_sub(self.vm.resources.memory);
        let free_pct = 100.0 * free_after as f64 / host.capacity.memory.max(1) as f64;
        let grace = if host.control_host {
            sched.spm_vm_grace
        } else {
            0
        };
        let count =
            u32::try_from(s.vms_on[h].len() + s.inbound[h].len()).unwrap_or(u32::MAX) + grace;
        let affinity_bonus = self
            .affinity_hosts
            .iter()
            .find(|(x, _)| *x == h)
            .map_or(0.0, |(_, n)| *n as f64);
        let score = match sched.policy {
            // Capacity only: the host with the most memory left.
            SchedulingPolicyKind::None => free_pct,
            // Spread CPU; memory breaks near-ties.
            SchedulingPolicyKind::EvenlyDistributed | SchedulingPolicyKind::InClusterUpgrade => {
                (100.0 - projected) + free_pct / 100.0
            }
            // Pack: the busiest host that stays under the threshold (the
            // filter guarantees it does); empty hosts last, so they can be
            // switched off.
            SchedulingPolicyKind::PowerSaving => {
                if s.vms_on[h].is_empty() && s.inbound[h].is_empty() {
                    projected - 100.0
                } else {
                    projected
                }
            }
            SchedulingPolicyKind::VmEvenlyDistributed => -f64::from(count) + free_pct / 1000.0,
        } + affinity_bonus * 1000.0;
        Score {
            score,
            cpu_now: cpu,
            cpu_projected: projected,
            free_memory_after: free_after,
            vm_count: count,
        }
    }
}
