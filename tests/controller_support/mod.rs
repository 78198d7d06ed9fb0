//! A cluster for controller tests: the embedded API server with Ferry's
//! CRDs, Host objects with renewed Leases, and *simulated agents*
//! ([`agents`]) — a watch-driven test double that obeys the agent protocol
//! by patching Migration status (target `Ready`; source `Transferring`,
//! then `SwitchedOver` after a set transfer time, or `Aborted` when the
//! controller asks) — plus a watcher that records, at every change the API
//! records, what the concurrency limits count ([`limits`]).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry::api::{Host, VirtualMachine};
use ferry::controller::ControllerConfig;

use crate::common::TestServer;

mod agents;
mod limits;
use agents::simulate_agents;
#[allow(unused_imports)]
pub use limits::{Counts, Peaks, watch_limits};

/// The namespace of the test VMs.
pub const NS: &str = "default";

/// A running API server with CRDs, hosts and simulated agents.
pub struct Cluster {
    pub server: TestServer,
    pub client: kube::Client,
    pub stop: CancellationToken,
    pub agents: Arc<AgentLog>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the simulated agents did.
#[derive(Default)]
pub struct AgentLog {
    /// VM → how many times it switched over to another host.
    pub moves: Mutex<BTreeMap<String, u32>>,
    /// Migration → when its transfer began (on the agents' clock).
    started: Mutex<BTreeMap<String, tokio::time::Instant>>,
    /// Hosts whose target agent fails to prepare every incoming VM
    /// (`TargetPreparationFailed`, retryable).
    pub broken_targets: Mutex<BTreeSet<String>>,
    /// VMs whose transfers never converge (`NotConverging`, retryable).
    pub unconvergeable: Mutex<BTreeSet<String>>,
    /// Migration → the target host each attempt was prepared on.
    pub prepared_on: Mutex<BTreeMap<String, String>>,
    /// When set (bytes/s), a transfer takes the VM's memory over this
    /// bandwidth instead of the fixed transfer time.
    pub bandwidth: Mutex<Option<u64>>,
    /// VM → memory (bytes), recorded by `add_vm`.
    pub memory: Mutex<BTreeMap<String, u64>>,
    /// Each completed transfer: VM, start, switchover.
    pub spans: Mutex<Vec<(String, tokio::time::Instant, tokio::time::Instant)>>,
}

impl AgentLog {
    /// How long the transfer of `vm` takes.
    fn transfer_of(&self, vm: &str, fixed: Duration) -> Duration {
        let bandwidth = *self.bandwidth.lock().unwrap();
        match (bandwidth, self.memory.lock().unwrap().get(vm)) {
            (Some(b), Some(m)) if b > 0 => Duration::from_secs_f64(*m as f64 / b as f64),
            _ => fixed,
        }
    }
}

/// An Event as `kubectl describe` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenEvent {
    /// Kind of the object it is about.
    pub kind: String,
    /// Name of the object it is about.
    pub name: String,
    /// Normal or Warning.
    pub type_: String,
    /// Reason.
    pub reason: String,
    /// Note.
    pub note: String,
    /// How many times it happened (series count, else 1).
    pub count: i32,
    /// The related object's name.
    pub related: Option<String>,
}

impl Cluster {
    /// Start a server, install the CRDs, create `hosts` hosts (`h0`, …)
    /// with Leases renewed every 300 ms, and run simulated agents whose
    /// transfers take `transfer`.
    pub async fn start(hosts: usize, transfer: Duration) -> Self {
        let server = TestServer::start().await;
        let client = server.admin().await;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in ferry::api::crds() {
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
        // Every CRD is served before the test writes any of its kinds.
        for crd in ferry::api::crds() {
            let name = crd.metadata.name.clone().unwrap();
            crate::common::eventually(|| {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            })
            .await;
        }
        let ns: Api<Namespace> = Api::all(client.clone());
        ns.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "ferry-system"}})).unwrap(),
        )
        .await
        .unwrap();
        let stop = CancellationToken::new();
        let mut cluster = Self {
            server,
            client: client.clone(),
            stop: stop.clone(),
            agents: Arc::new(AgentLog::default()),
            tasks: Vec::new(),
        };
        for i in 0..hosts {
            cluster.add_host(&format!("h{i}")).await;
        }
        let names: Vec<String> = (0..hosts).map(|i| format!("h{i}")).collect();
        cluster.tasks.push(tokio::spawn(renew_leases(
            client.clone(),
            names,
            stop.clone(),
        )));
        cluster.tasks.push(tokio::spawn(simulate_agents(
            client.clone(),
            cluster.agents.clone(),
            transfer,
            stop.clone(),
        )));
        cluster
    }

    /// Create a host with room for many VMs.
    pub async fn add_host(&self, name: &str) {
        let api: Api<Host> = Api::all(self.client.clone());
        let host: Host = serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Host",
            "metadata": {"name": name},
            "spec": {"cluster": "default"},
        }))
        .unwrap();
        api.create(&PostParams::default(), &host).await.unwrap();
        let status = json!({"status": {
            "phase": "Active",
            "capacity": {"cpus": 64, "memory": "256Gi"},
            "cpuModel": "qemu64",
            "agentVersion": "0.1.0",
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "ferry-system");
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 10},
        }))
        .unwrap();
        leases.create(&PostParams::default(), &lease).await.unwrap();
    }

    /// Create a running VM placed on `host`.
    pub async fn add_vm(&self, name: &str, host: &str, memory_mib: u32, migratable: bool) {
        self.agents
            .memory
            .lock()
            .unwrap()
            .insert(name.to_string(), u64::from(memory_mib) << 20);
        let api: Api<VirtualMachine> = Api::namespaced(self.client.clone(), NS);
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"memory": format!("{memory_mib}Mi"), "cpus": 1, "migratable": migratable,
                     "boot": {"kernel": {"kernel": "/images/vmlinuz"}}},
        }))
        .unwrap();
        api.create(&PostParams::default(), &vm).await.unwrap();
        let status = json!({"status": {"phase": "Running", "host": host}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    /// Set the cluster-wide policy's limits (a MigrationPolicy with empty
    /// selectors applies to every VM).
    pub async fn set_limits(&self, cluster: u32, outbound: u32, inbound: u32) {
        let (code, body) = crate::common::post(
            &self.client,
            "/apis/ferry.dev/v1alpha1/migrationpolicies",
            json!({
                "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
                "metadata": {"name": "cluster"},
                "spec": {"limits": {
                    "parallelMigrationsPerCluster": cluster,
                    "parallelOutboundPerHost": outbound,
                    "parallelInboundPerHost": inbound,
                }},
            }),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }

    /// Where each VM runs.
    pub async fn placement(&self) -> BTreeMap<String, Option<String>> {
        let api: Api<VirtualMachine> = Api::namespaced(self.client.clone(), NS);
        api.list(&Default::default())
            .await
            .unwrap()
            .into_iter()
            .map(|v| (v.name_any(), v.status.and_then(|s| s.host)))
            .collect()
    }

    /// Start a controller (fast ticks, a short leader Lease).
    pub fn controller(&self, identity: &str) -> Controller {
        self.controller_with(identity, None)
    }

    /// Run the real kubectl against the cluster; its stdout (panics on failure).
    pub async fn kubectl(&self, args: &[&str]) -> String {
        let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| {
            let pyenv = "/root/.pyenv/versions/3.11.7/bin/kubectl";
            if std::path::Path::new(pyenv).exists() {
                pyenv.into()
            } else {
                "kubectl".into()
            }
        });
        let out = tokio::process::Command::new(kubectl)
            .args(args)
            .env("KUBECONFIG", self.server.handle.kubeconfig_path())
            .env("HOME", self.server.dir.path())
            .output()
            .await
            .expect("kubectl runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "kubectl {args:?}: {stderr}\n{stdout}");
        stdout
    }

    /// Every Event recorded, oldest first.
    pub async fn events(&self) -> Vec<SeenEvent> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.client.clone());
        let mut list: Vec<_> = api.list(&Default::default()).await.unwrap().items;
        list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        list.into_iter()
            .map(|e| {
                let regarding = e.regarding.unwrap_or_default();
                SeenEvent {
                    kind: regarding.kind.unwrap_or_default(),
                    name: regarding.name.unwrap_or_default(),
                    type_: e.type_.unwrap_or_default(),
                    reason: e.reason.unwrap_or_default(),
                    note: e.note.unwrap_or_default(),
                    count: e.series.map_or(1, |s| s.count),
                    related: e.related.and_then(|r| r.name),
                }
            })
            .collect()
    }

    /// The Events about one object, oldest first.
    pub async fn events_about(&self, kind: &str, name: &str) -> Vec<SeenEvent> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e.kind == kind && e.name == name)
            .collect()
    }

    /// Wait until an Event about `kind/name` with `reason` whose note
    /// contains `text` is recorded, and return it.
    pub async fn event(&self, kind: &str, name: &str, reason: &str, text: &str) -> SeenEvent {
        within(
            60,
            &format!("a {reason} event about {kind} {name} ({text})"),
            || async {
                self.events_about(kind, name)
                    .await
                    .into_iter()
                    .find(|e| e.reason == reason && e.note.contains(text))
            },
        )
        .await
    }

    /// Start a controller with this retry and quarantine policy.
    pub fn controller_with_retry(
        &self,
        identity: &str,
        retry: ferry::core::drain::RetryPolicy,
    ) -> Controller {
        let config = ControllerConfig {
            drain_retry: retry,
            ..self.config(identity)
        };
        self.spawn_controller(config, None)
    }

    /// Start a controller serving metrics on `listener`.
    pub fn controller_with(
        &self,
        identity: &str,
        listener: Option<tokio::net::TcpListener>,
    ) -> Controller {
        self.spawn_controller(self.config(identity), listener)
    }

    /// The test controllers' configuration: fast ticks, a short leader
    /// Lease, retries after 200 ms.
    pub fn config(&self, identity: &str) -> ControllerConfig {
        ControllerConfig {
            tick: Duration::from_millis(200),
            identity: identity.to_string(),
            leader_lease: Duration::from_secs(3),
            drain_retry: ferry::core::drain::RetryPolicy {
                base: Duration::from_millis(200),
                ..Default::default()
            },
            ..ControllerConfig::default()
        }
    }

    /// Start a controller with this configuration.
    pub fn spawn_controller(
        &self,
        config: ControllerConfig,
        listener: Option<tokio::net::TcpListener>,
    ) -> Controller {
        let stop = self.stop.child_token();
        let task = tokio::spawn(ferry::controller::run_with(
            self.client.clone(),
            config,
            listener,
            stop.clone(),
        ));
        Controller { stop, task }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A running controller.
pub struct Controller {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), ferry::controller::ControllerError>>,
}

impl Controller {
    /// Stop it gracefully (it releases the Lease) and wait.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Kill it: no graceful shutdown, the Lease is left to lapse.
    pub fn kill(self) {
        self.task.abort();
    }
}

async fn renew_leases(client: kube::Client, hosts: Vec<String>, stop: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client, "ferry-system");
    loop {
        for h in &hosts {
            let patch =
                json!({"spec": {"renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now())}});
            let _ = leases
                .patch(h, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// Poll `f` every 100 ms until it returns Some, for up to `secs` seconds.
pub async fn within<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..secs * 10 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {secs} s");
}
