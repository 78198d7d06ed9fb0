//! SIGKILL of an agent process in the middle of a live migration, once the
//! source's and once the target's: the migration fails with a reason, the
//! guest keeps running on exactly one host (the source) with its memory
//! intact, and the restarted agent re-adopts the running QEMU without
//! stopping it.
//!
//! The API server and the controller run in the test process; each host's
//! agent is a separate `ferry-agent` process, so that killing it is a real
//! crash: its relay, its tasks and its connections die with it, and its
//! QEMUs do not.

mod cluster_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry::agent::guest::GuestConsole;
use ferry::agent::pki::ClusterCa;
use ferry::api::migration::AgentState;
use ferry::api::{Migration, MigrationPhase, MigrationPolicy, VirtualMachine, VmPhase};
use ferry::apiserver::{ApiServerConfig, ApiServerHandle};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

use cluster_support::{install_crds, wait_for};

const HOSTS: [&str; 2] = ["host-1", "host-2"];

/// An API server and controller in the test, agents as processes.
struct ProcessCluster {
    dir: tempfile::TempDir,
    api: Option<ApiServerHandle>,
    client: kube::Client,
    controller: CancellationToken,
    agents: Vec<(String, Child)>,
}

impl ProcessCluster {
    async fn start() -> ProcessCluster {
        let dir = tempfile::Builder::new()
            .prefix("fk")
            .tempdir_in("/tmp")
            .unwrap();
        let mut config = ApiServerConfig::new(dir.path().join("api"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.agents = HOSTS.iter().map(|h| h.to_string()).collect();
        let api = ferry::apiserver::start(config).await.unwrap();
        let client = api.admin_client().await.unwrap();
        install_crds(&client).await;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(ferry::api::SYSTEM_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let _ = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await;
        let ca = ClusterCa::generate("ferry test CA").unwrap();
        for host in HOSTS {
            ca.issue_host(host)
                .unwrap()
                .save(&dir.path().join(host).join("pki"))
                .unwrap();
            // The agents' own identities need the RBAC that `ferry up` and
            // the chart install; what is tested here is the crash.
            let token = api.admin_token().to_string();
            std::fs::write(
                dir.path().join(host).join("kubeconfig"),
                api.kubeconfig_for(&token),
            )
            .unwrap();
        }
        let controller = CancellationToken::new();
        let stop = controller.clone();
        let controller_client = client.clone();
        tokio::spawn(async move {
            let config = ferry::controller::ControllerConfig {
                lease_duration: Duration::from_secs(10),
                ..ferry::controller::ControllerConfig::default()
            };
            ferry::controller::run(controller_client, config, stop)
                .await
                .unwrap();
        });
        let mut cluster = ProcessCluster {
            dir,
            api: Some(api),
            client,
            controller,
            agents: Vec::new(),
        };
        for host in HOSTS {
            cluster.start_agent(host);
        }
        cluster.wait_active().await;
        cluster
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    fn state_dir(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("state")
    }

    /// Starts (or restarts) `host`'s agent process.
    fn start_agent(&mut self, host: &str) {
        let dir = self.host_dir(host);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .arg("run")
            .args(["--host", host])
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .arg("--state-dir")
            .arg(self.state_dir(host))
            .arg("--pki-dir")
            .arg(dir.join("pki"))
            .args(["--migration-listen", "127.0.0.1:0"])
            .args(["--capacity-cpus", "4", "--capacity-memory", "1Gi"])
            .args(["--lease-duration", "10s", "--renew-interval", "500ms"])
            .args(["--fence-after", "40s", "--stall-timeout", "10s"])
            .arg("--no-watchdog")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.retain(|(h, _)| h != host);
        self.agents.push((host.to_string(), child));
    }

    /// SIGKILL of `host`'s agent process (its QEMUs keep running).
    fn kill_agent(&mut self, host: &str) {
        for (h, child) in &mut self.agents {
            if h == host {
                child.kill().unwrap();
                child.wait().unwrap();
            }
        }
    }

    async fn wait_active(&self) {
        let hosts: Api<ferry::api::Host> = Api::all(self.client.clone());
        wait_for(Duration::from_secs(60), || async {
            let list = hosts.list(&Default::default()).await.ok()?;
            let active = list
                .items
                .iter()
                .filter(|h| {
                    h.status.as_ref().is_some_and(|s| {
                        s.phase == ferry::api::HostPhase::Active && s.capacity.is_some()
                    })
                })
                .count();
            (active == HOSTS.len()).then_some(())
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "every host is published and Active; logs: {:?}",
                HOSTS.map(|h| tail(&self.agent_log(h)).to_string())
            )
        });
    }

    /// Pids of the QEMUs alive under a host's state directory.
    fn running_qemus(&self, host: &str) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.state_dir(host).join("vms")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
            .filter_map(|s| s.trim().parse::<i32>().ok())
            .filter(|pid| ferry::agent::qemu::pid_alive(*pid))
            .collect()
    }

    fn serial_socket(&self, host: &str, vm: &str) -> PathBuf {
        self.state_dir(host)
            .join("vms")
            .join(format!("default.{vm}"))
            .join("serial.sock")
    }

    fn agent_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.host_dir(host).join("agent.log")).unwrap_or_default()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        self.controller.cancel();
        for (_, child) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
        for host in HOSTS {
            for pid in self.running_qemus(host) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        drop(self.api.take());
    }
}

/// Creates the policy `policy` (its spec in YAML flow style), a 64 MiB
/// memtest guest `busy` dirtying `dirty_mib` MiB/s and, once it runs, a
/// Migration `move-busy` of it to the other host under that policy.
/// Returns (source, target, the guest's QEMU pid on the source).
async fn begin_migration(
    c: &ProcessCluster,
    policy: &str,
    spec: &str,
    dirty_mib: u32,
) -> (String, String, i32) {
    let policies: Api<MigrationPolicy> = Api::all(c.client.clone());
    let policy_obj: MigrationPolicy = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: MigrationPolicy\nmetadata: {{name: {policy}}}\nspec: {spec}\n"
    ))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy_obj)
        .await
        .unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(c.client.clone(), "default");
    let vm: VirtualMachine = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: busy, namespace: default}}\n\
         spec: {{memory: 64Mi, boot: {{memtest: {{fillMib: 48, dirtyRateMib: {dirty_mib}}}}}}}\n"
    ))
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let source = wait_for(Duration::from_secs(60), || async {
        let s = vms.get("busy").await.ok()?.status?;
        (s.phase == VmPhase::Running).then_some(s.host?)
    })
    .await
    .expect("the VM runs");
    let pid = *c.running_qemus(&source).first().expect("its QEMU");
    let target = HOSTS.iter().find(|h| **h != source).unwrap().to_string();
    let migrations: Api<Migration> = Api::namespaced(c.client.clone(), "default");
    let m: Migration = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: move-busy, namespace: default}}\n\
         spec: {{vmName: busy, targetHost: {target}, policy: {policy}}}\n"
    ))
    .unwrap();
    migrations.create(&PostParams::default(), &m).await.unwrap();
    (source, target, pid)
}

/// A guest rewriting its memory faster than a 4 MiB/s link: the transfer
/// goes on until the test kills an agent (the policy waits minutes).
async fn start_endless_migration(c: &ProcessCluster) -> (String, String, i32) {
    let started = begin_migration(
        c,
        "slow",
        "{convergence: {mode: MinimalDowntime, downtimeLimit: 20ms, progressTimeout: 300s, \
         completionTimeoutPerGiB: 3000s}, bandwidth: {mode: Custom, limit: 4Mi}}",
        16,
    )
    .await;
    // Mid-transfer: the source sends and has reported progress.
    let migrations: Api<Migration> = Api::namespaced(c.client.clone(), "default");
    wait_for(Duration::from_secs(120), || async {
        let s = migrations.get("move-busy").await.ok()?.status?;
        let sending = s.source?.state == AgentState::Transferring;
        let moved = s.progress.is_some_and(|p| p.memory_transferred > 4 << 20);
        (sending && moved).then_some(())
    })
    .await
    .expect("the transfer runs");
    started
}

async fn wait_failed(c: &ProcessCluster) -> ferry::api::MigrationStatus {
    let migrations: Api<Migration> = Api::namespaced(c.client.clone(), "default");
    wait_for(Duration::from_secs(120), || async {
        let s = migrations.get("move-busy").await.ok()?.status?;
        matches!(
            s.phase,
            MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
        .then_some(s)
    })
    .await
    .expect("the migration ends")
}

/// The guest runs on `host` only, in the QEMU of pid `pid`, its memory
/// intact, and the VM's status says so.
async fn still_on(c: &ProcessCluster, host: &str, pid: i32) {
    let other = HOSTS.iter().find(|h| **h != host).unwrap();
    wait_for(Duration::from_secs(30), || async {
        c.running_qemus(other).is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("QEMUs left on {other}: {:?}", c.running_qemus(other)));
    assert_eq!(c.running_qemus(host), vec![pid], "the same QEMU runs on");
    let vms: Api<VirtualMachine> = Api::namespaced(c.client.clone(), "default");
    let status = wait_for(Duration::from_secs(30), || async {
        let s = vms.get("busy").await.ok()?.status?;
        (s.phase == VmPhase::Running && s.migration.is_none()).then_some(s)
    })
    .await
    .expect("the VM is reported Running, no migration in flight");
    assert_eq!(status.host.as_deref(), Some(host));
    let mut console =
        GuestConsole::connect_timeout(&c.serial_socket(host, "busy"), Duration::from_secs(10))
            .await
            .unwrap();
    let report = console.verify().await.unwrap();
    assert!(report.is_intact(), "memory on {host}: {report:?}");
}

/// The end of a log.
fn tail(log: &str) -> &str {
    let from = log.len().saturating_sub(3000);
    log.get(from..).unwrap_or(log)
}

fn adopted(log: &str) -> bool {
    log.contains("adopted running QEMU")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_source_agent_mid_transfer_keeps_the_guest_on_the_source() {
    let mut c = ProcessCluster::start().await;
    let (source, _target, pid) = start_endless_migration(&c).await;
    c.kill_agent(&source);
    // The relay died with the agent: QEMU fails the stream, the target's
    // QEMU exits, the target agent reports it.
    let done = wait_failed(&c).await;
    assert_eq!(done.phase, MigrationPhase::Failed, "{done:#?}");
    assert!(done.failure_reason.is_some(), "{done:#?}");
    eprintln!(
        "source agent killed: {:?}: {}",
        done.failure_reason,
        done.message.clone().unwrap_or_default()
    );
    c.start_agent(&source);
    c.wait_active().await;
    still_on(&c, &source, pid).await;
    assert!(
        adopted(&c.agent_log(&source)),
        "{}",
        tail(&c.agent_log(&source))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_target_agent_mid_transfer_keeps_the_guest_on_the_source() {
    let mut c = ProcessCluster::start().await;
    let (source, target, pid) = start_endless_migration(&c).await;
    c.kill_agent(&target);
    let done = wait_failed(&c).await;
    assert_eq!(done.phase, MigrationPhase::Failed, "{done:#?}");
    assert!(done.failure_reason.is_some(), "{done:#?}");
    eprintln!(
        "target agent killed: {:?}: {}",
        done.failure_reason,
        done.message.clone().unwrap_or_default()
    );
    c.start_agent(&target);
    c.wait_active().await;
    // The restarted target agent leaves nothing behind on its host.
    still_on(&c, &source, pid).await;
}

/// A guest rewriting its memory faster than a 4 MiB/s link under the
/// PostCopy policy: pre-copy cannot finish, the guest switches to the
/// target, and post-copy pulls the rest at 4 MiB/s — seconds in which the
/// guest's memory is split between the two hosts. Returns (source, target)
/// once the source reports post-copy.
async fn start_postcopy_migration(c: &ProcessCluster) -> (String, String) {
    let (source, target, _) = begin_migration(
        c,
        "postcopy",
        "{convergence: {mode: PostCopy, downtimeLimit: 50ms, progressTimeout: 30s, \
         completionTimeoutPerGiB: 3000s}, bandwidth: {mode: Custom, limit: 4Mi}}",
        32,
    )
    .await;
    let migrations: Api<Migration> = Api::namespaced(c.client.clone(), "default");
    wait_for(Duration::from_secs(120), || async {
        let s = migrations.get("move-busy").await.ok()?.status?;
        (s.source?.state == AgentState::PostCopyActive).then_some(())
    })
    .await
    .expect("the migration switches to post-copy");
    (source, target)
}

/// Killing `victim`'s agent in post-copy and starting it again: the
/// restarted agent takes its half up from its adopted QEMU, the stream
/// resumes, and the guest ends on the target only, memory intact.
async fn agent_killed_in_post_copy(victim_is_source: bool) {
    let mut c = ProcessCluster::start().await;
    let (source, target) = start_postcopy_migration(&c).await;
    let victim = if victim_is_source { &source } else { &target };
    c.kill_agent(victim);
    // Both QEMUs wait in postcopy-paused meanwhile: the guest runs on the
    // target, missing the pages still on the source.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.start_agent(victim);
    let done = wait_failed(&c).await;
    let log = c.agent_log(victim);
    assert_eq!(
        done.phase,
        MigrationPhase::Succeeded,
        "{done:#?}\n{victim}'s agent: {}",
        tail(&log)
    );
    assert!(
        log.contains("the agent restarted during post-copy"),
        "{}",
        tail(&log)
    );
    let rounds = done.source.as_ref().and_then(|s| s.recovery);
    assert!(rounds.is_some_and(|r| r >= 1), "{done:#?}");
    // The guest's stop was seen by the agent before the restart; the real
    // pause is still measured from it.
    assert!(done.pause_ms.is_some(), "no real pause recorded: {done:#?}");
    eprintln!(
        "{} agent killed in post-copy: recovery rounds {rounds:?}: {}",
        if victim_is_source { "source" } else { "target" },
        done.message.clone().unwrap_or_default()
    );
    let pid = *c
        .running_qemus(&target)
        .first()
        .expect("the guest's QEMU on the target");
    still_on(&c, &target, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_agent_killed_in_post_copy_resumes_the_stream_when_it_restarts() {
    agent_killed_in_post_copy(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_target_agent_killed_in_post_copy_serves_the_recovery_when_it_restarts() {
    agent_killed_in_post_copy(false).await;
}
