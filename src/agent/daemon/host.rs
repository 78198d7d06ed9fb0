//! Publishing the host: its `Host` object (spec once, status every few
//! seconds) and its `Lease` in `ferry-system`, renewed on every beat.
//!
//! Each successful renewal also touches the heartbeat file that the fencing
//! watchdog reads ([`super::watchdog`]): a host that cannot renew its Lease
//! for `fenceAfter` stops its VMs, whether or not the agent still runs.

use std::collections::VecDeque;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};

use crate::agent::qemu::{self, QemuError};
use crate::api::host::{Hypervisor, LoadSample, Resources};
use crate::api::{Host, HostSpec, Quantity, SYSTEM_NAMESPACE};

use super::load;
use super::{AgentConfig, AgentError};

/// How many load samples the Host keeps (at one per beat: the last few
/// minutes, enough to judge `overCommitDuration`).
pub const LOAD_SAMPLES: usize = 60;

/// The host-level state carried between beats.
pub struct HostPublisher {
    hosts: Api<Host>,
    leases: Api<Lease>,
    last_cpu: Option<(u64, u64)>,
    samples: VecDeque<LoadSample>,
    cpu_model: Option<String>,
    cpu_features: Vec<String>,
    qemu_version: String,
    created: bool,
}

impl HostPublisher {
    /// A publisher for this agent's host.
    pub fn new(client: &kube::Client, qemu_version: String) -> HostPublisher {
        let (cpu_model, cpu_features) = load::cpu_info();
        HostPublisher {
            hosts: Api::all(client.clone()),
            leases: Api::namespaced(client.clone(), SYSTEM_NAMESPACE),
            last_cpu: load::cpu_times(),
            samples: VecDeque::new(),
            cpu_model,
            cpu_features,
            qemu_version,
            created: false,
        }
    }

    /// Create the Host if it does not exist, with this agent's spec fields.
    async fn ensure_host(&mut self, config: &AgentConfig) -> Result<(), AgentError> {
        if self.created {
            return Ok(());
        }
        let host = Host {
            metadata: ObjectMeta {
                name: Some(config.host.clone()),
                labels: Some(config.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: HostSpec {
                cluster: config.cluster.clone(),
                migration_endpoint: Some(config.migration_endpoint()),
                unschedulable: false,
            },
            status: None,
        };
        match self.hosts.create(&PostParams::default(), &host).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Exists (an earlier run): keep `unschedulable` as the
                // controller set it, refresh what the agent owns.
                let patch = serde_json::json!({
                    "metadata": {"labels": config.labels},
                    "spec": {"cluster": config.cluster, "migrationEndpoint": config.migration_endpoint()}
                });
                self.hosts
                    .patch(&config.host, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(AgentError::api("updating the Host"))?;
            }
            Err(e) => return Err(AgentError::api("creating the Host")(e)),
        }
        self.created = true;
        Ok(())
    }

    /// Renew the Lease; create it on first use.
    pub async fn renew_lease(&self, config: &AgentConfig) -> Result<(), AgentError> {
        let now = MicroTime(Timestamp::now());
        let patch = serde_json::json!({
            "spec": {
                "holderIdentity": config.host,
                "leaseDurationSeconds": config.lease_duration.as_secs(),
                "renewTime": now,
            }
        });
        match self
            .leases
            .patch(&config.host, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(config.host.clone()),
                        namespace: Some(SYSTEM_NAMESPACE.into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(config.host.clone()),
                        lease_duration_seconds: i32::try_from(config.lease_duration.as_secs()).ok(),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        ..LeaseSpec::default()
                    }),
                };
                self.leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
                    .map_err(AgentError::api("creating the host Lease"))
            }
            Err(e) => Err(AgentError::api("renewing the host Lease")(e)),
        }
    }

    /// Make sure the Host exists, then renew the Lease.
    pub async fn renew(&mut self, config: &AgentConfig) -> Result<(), AgentError> {
        self.ensure_host(config).await?;
        self.renew_lease(config).await
    }

    /// Refresh the Host's status with the VMs this agent runs (`vms`: memory
    /// MiB and vCPUs of each).
    pub async fn refresh(
        &mut self,
        config: &AgentConfig,
        vms: &[(u32, u32)],
    ) -> Result<(), AgentError> {
        let (mem_total, mem_available) = load::memory();
        let cpu_now = load::cpu_times();
        let cpu_percent = match (self.last_cpu, cpu_now) {
            (Some(before), Some(after)) => load::cpu_percent(before, after),
            _ => 0,
        };
        self.last_cpu = cpu_now;
        let cpu_percent = config.simulated_cpu_percent().unwrap_or(cpu_percent);
        let capacity_memory = config.capacity_memory.unwrap_or(mem_total);
        let allocated_mib: u64 = vms.iter().map(|(m, _)| u64::from(*m)).sum();
        let allocated_cpus: u32 = vms.iter().map(|(_, c)| *c).sum();
        // Simulated hosts (a configured capacity) report what their VMs
        // leave free; real ones what the kernel says.
        let free = if config.capacity_memory.is_some() {
            capacity_memory.saturating_sub(allocated_mib << 20)
        } else {
            mem_available
        };
        self.samples.push_back(LoadSample {
            time: Time(Timestamp::now()),
            cpu_percent,
            free_memory: Quantity::from_bytes(free),
        });
        while self.samples.len() > LOAD_SAMPLES {
            self.samples.pop_front();
        }
        let status = serde_json::json!({
            "status": {
                "capacity": Resources { cpus: config.capacity_cpus, memory: Quantity::from_bytes(capacity_memory) },
                "allocated": Resources { cpus: allocated_cpus, memory: Quantity::from_mib(allocated_mib) },
                "cpuModel": self.cpu_model,
                "cpuFeatures": self.cpu_features,
                "cpuPercent": cpu_percent,
                "freeMemory": Quantity::from_bytes(free),
                "load": self.samples,
                "vmCount": vms.len(),
                "agentVersion": env!("CARGO_PKG_VERSION"),
                "hypervisor": Hypervisor { qemu_version: self.qemu_version.clone(), accelerator: "tcg".into() },
            }
        });
        self.hosts
            .patch_status(
                &config.host,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .map_err(AgentError::api("updating the Host status"))?;
        Ok(())
    }
}

/// `qemu-system-x86_64 --version`, as `10.0.2`; a release older than
/// [`qemu::MIN_VERSION`] is refused.
pub async fn qemu_version(binary: &str) -> Result<String, AgentError> {
    let version = qemu::binary_version(binary).await.map_err(|e| match e {
        QemuError::Spawn { binary, source } => AgentError::QemuMissing { binary, source },
        other => AgentError::QemuUnusable {
            binary: binary.into(),
            why: other.to_string(),
        },
    })?;
    if !qemu::version_supported(&version) {
        return Err(AgentError::QemuTooOld {
            binary: binary.into(),
            found: version,
        });
    }
    Ok(version)
}
