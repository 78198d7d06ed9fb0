//! Restart drills (issue 7, story 9): a drain (HostMaintenance) of a host
//! with three memtest guests on an in-process cluster with real QEMU, during
//! which one component dies and comes back — the controller, the source
//! host's agent, or the API server (stopped and started on its data dir).
//!
//! Each drill checks Ferry's promise: the drain completes; every VM ends on
//! exactly one host, its guest never rebooted (its timer ticks went on) and
//! its memory intact; no VM moved twice (one Succeeded Migration each); and
//! at no sample did a VM execute on two hosts (vCPU run time of every QEMU,
//! sampled from /proc, see `cluster_support::vcpu`).

mod cluster_support;

use std::collections::BTreeMap;
use std::time::Duration;

use ferry::agent::guest::GuestConsole;
use ferry::api::maintenance::MaintenancePhase;
use ferry::api::{
    AgentState, Host, HostMaintenance, Migration, MigrationPhase, MigrationPolicy, VirtualMachine,
    VmPhase,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use cluster_support::vcpu::Sampler;
use cluster_support::{Cluster, Options, wait_for};

const SOURCE: &str = "host-1";
const VMS: [&str; 3] = ["drill-a", "drill-b", "drill-c"];

/// What dies in the middle of the drain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    Controller,
    SourceAgent,
    ApiServer,
    /// The source agent dies after its QEMU completed the transfer, before
    /// it learned that the guest runs on the target (the API server is down
    /// meanwhile, so the target's report cannot reach it).
    SourceAgentAtSwitchover,
    /// The target agent dies once the guest runs on its host, before it
    /// could say so (the API server is down meanwhile).
    TargetAgentAtSwitchover,
}

async fn cordon(cluster: &Cluster, host: &str, unschedulable: bool) {
    Api::<Host>::all(cluster.client.clone())
        .patch(
            host,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": unschedulable}})),
        )
        .await
        .unwrap();
}

/// Three memtest guests on the source host, and a policy that moves one VM
/// at a time at 8 MiB/s, so each transfer of 24 MiB takes seconds.
async fn prepare(cluster: &Cluster) {
    let policies: Api<MigrationPolicy> = Api::all(cluster.client.clone());
    let policy: MigrationPolicy = serde_yaml::from_str(
        "apiVersion: ferry.dev/v1alpha1\nkind: MigrationPolicy\nmetadata: {name: drill}\n\
         spec: {bandwidth: {mode: Custom, limit: 8Mi}, limits: {parallelMigrationsPerCluster: 1}}\n",
    )
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    // Only the source takes new VMs while they are created.
    for host in &cluster.hosts {
        if host != SOURCE {
            cordon(cluster, host, true).await;
        }
    }
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    for name in VMS {
        let vm: VirtualMachine = serde_yaml::from_str(&format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\n\
             metadata: {{name: {name}, namespace: default}}\n\
             spec: {{memory: 64Mi, boot: {{memtest: {{fillMib: 24}}}}}}\n"
        ))
        .unwrap();
        vms.create(&PostParams::default(), &vm).await.unwrap();
    }
    for name in VMS {
        let running = wait_for(Duration::from_secs(240), || async {
            let s = vms.get(name).await.ok()?.status?;
            (s.phase == VmPhase::Running && s.host.as_deref() == Some(SOURCE)).then_some(())
        })
        .await;
        if running.is_none() {
            let now = vms.get(name).await.ok().and_then(|v| v.status);
            panic!("{name} does not run on {SOURCE}: {now:#?}");
        }
    }
    for host in &cluster.hosts {
        if host != SOURCE {
            cordon(cluster, host, false).await;
        }
    }
}

/// Each guest's timer ticks, once it is ready (the drill later checks they
/// went on: a rebooted guest starts again from zero).
async fn guest_ticks(cluster: &Cluster, host: &str) -> BTreeMap<String, u64> {
    let mut ticks = BTreeMap::new();
    for name in VMS {
        let mut console = GuestConsole::connect_timeout(
            &cluster.serial_socket(host, "default", name),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        console.wait_ready(Duration::from_secs(60)).await.unwrap();
        ticks.insert(name.to_string(), console.status().await.unwrap().ticks);
    }
    ticks
}

/// The drain's Migrations now.
async fn migrations(cluster: &Cluster) -> Vec<Migration> {
    Api::<Migration>::namespaced(cluster.client.clone(), "default")
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Wait until a transfer is under way: a Migration Running whose bytes
/// are moving, not yet near its end.
async fn wait_mid_transfer(cluster: &Cluster) -> String {
    let found = wait_for(Duration::from_secs(120), || async {
        migrations(cluster).await.into_iter().find_map(|m| {
            let s = m.status?;
            let p = s.progress?;
            (s.phase == MigrationPhase::Running && p.memory_transferred > 0 && p.percent < 70)
                .then(|| m.metadata.name.unwrap_or_default())
        })
    })
    .await;
    found.expect("a drain migration transfers")
}

async fn drill(victim: Victim) {
    let mut options = Options::hosts(&[SOURCE, "host-2", "host-3"]);
    // A killed controller's term lapses in 3 s; a failed attempt is retried
    // after 1 s.
    options.leader_lease = Duration::from_secs(3);
    options.drain_retry.base = Duration::from_secs(1);
    let mut cluster = Cluster::start_with(options).await;
    prepare(&cluster).await;
    let before = guest_ticks(&cluster, SOURCE).await;
    let source_pids = cluster.running_qemus(SOURCE);
    assert_eq!(source_pids.len(), VMS.len());
    let sampler = Sampler::start(
        cluster
            .hosts
            .iter()
            .map(|h| (h.clone(), cluster.state_dir(h)))
            .collect(),
        VMS.iter().map(|v| v.to_string()).collect(),
    );

    let maintenances: Api<HostMaintenance> = Api::all(cluster.client.clone());
    let hm: HostMaintenance = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: HostMaintenance\nmetadata: {{name: drill}}\n\
         spec: {{host: {SOURCE}}}\n"
    ))
    .unwrap();
    maintenances
        .create(&PostParams::default(), &hm)
        .await
        .unwrap();

    // Let one VM move first, then strike during the next transfer.
    wait_for(Duration::from_secs(180), || async {
        migrations(&cluster)
            .await
            .iter()
            .any(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
            })
            .then_some(())
    })
    .await
    .expect("a first VM moves");
    let struck = wait_mid_transfer(&cluster).await;
    eprintln!("{victim:?} dies while {struck} transfers");
    match victim {
        Victim::Controller => {
            cluster.kill_controller();
            cluster.restart_controller();
        }
        Victim::SourceAgent => {
            let alive = cluster.running_qemus(SOURCE);
            cluster.kill_agent(SOURCE);
            // Its QEMUs outlive it; a moment later it comes back and adopts them.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut still = cluster.running_qemus(SOURCE);
            still.sort();
            let mut alive = alive;
            alive.sort();
            assert_eq!(still, alive, "the source's QEMUs outlive its agent");
            cluster.restart_agent(SOURCE);
        }
        // Down for longer than the rest of the transfer (the switchover is
        // reported while nobody can write it) and shorter than a host Lease.
        Victim::ApiServer => cluster.restart_api(Duration::from_secs(5)).await,
        Victim::SourceAgentAtSwitchover | Victim::TargetAgentAtSwitchover => {
            let m = migrations(&cluster)
                .await
                .into_iter()
                .find(|m| m.metadata.name.as_deref() == Some(struck.as_str()))
                .unwrap();
            let vm = m.spec.vm_name.clone();
            let victim_host = match victim {
                Victim::SourceAgentAtSwitchover => SOURCE.to_string(),
                _ => m.status.and_then(|s| s.target_host).unwrap(),
            };
            cluster.stop_api().await;
            wait_for(Duration::from_secs(120), || async {
                executes_off_source(&cluster, &vm).await.then_some(())
            })
            .await
            .expect("the guest runs on the target");
            cluster.kill_agent(&victim_host);
            cluster.start_api().await;
            cluster.restart_agent(&victim_host);
        }
    }

    let maintenances: Api<HostMaintenance> = Api::all(cluster.client.clone());
    let done = wait_for(Duration::from_secs(300), || async {
        let s = maintenances.get("drill").await.ok()?.status?;
        matches!(
            s.phase,
            MaintenancePhase::Completed | MaintenancePhase::Failed
        )
        .then_some(s)
    })
    .await;
    let report = sampler.finish();
    if done
        .as_ref()
        .is_none_or(|s| s.phase != MaintenancePhase::Completed)
    {
        panic!(
            "the drain does not complete: {:#?}\n{:#?}",
            maintenances.get("drill").await.ok().and_then(|m| m.status),
            migrations(&cluster)
                .await
                .into_iter()
                .map(|m| (m.metadata.name, m.status))
                .collect::<Vec<_>>()
        );
    }
    let done = done.unwrap();
    assert_eq!(done.vms_remaining, 0, "{done:#?}");
    eprintln!("{victim:?}: sampler {report:?}");
    assert!(report.doubles.is_empty(), "{:#?}", report.doubles);
    for vm in VMS {
        assert!(
            report.executed_on.get(vm).is_some_and(|h| !h.is_empty()),
            "the sampler saw {vm} execute somewhere: {report:?}"
        );
    }

    // One move per VM: exactly one Succeeded Migration each, and every
    // Migration of the drain final.
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    let all = wait_for(Duration::from_secs(60), || async {
        let all = migrations(&cluster).await;
        all.iter()
            .all(|m| {
                m.status.as_ref().is_some_and(|s| {
                    matches!(
                        s.phase,
                        MigrationPhase::Succeeded
                            | MigrationPhase::Failed
                            | MigrationPhase::Cancelled
                    )
                })
            })
            .then_some(all)
    })
    .await
    .expect("every Migration of the drain ends");
    for m in &all {
        let s = m.status.clone().unwrap_or_default();
        eprintln!(
            "{victim:?}: {} {:?} {:?} {:?} source {:?} target {:?} times {:?}",
            m.metadata.name.as_deref().unwrap_or_default(),
            s.phase,
            s.failure_reason,
            s.message,
            s.source.as_ref().map(|r| (r.state, r.time.clone())),
            s.target.as_ref().map(|r| (r.state, r.time.clone())),
            s.timestamps
        );
    }
    // No report of an agent was lost: each move's target said its guest
    // runs, and its source that it switched over.
    for m in &all {
        let s = m.status.clone().unwrap_or_default();
        if s.phase == MigrationPhase::Succeeded {
            assert_eq!(
                (s.source.map(|r| r.state), s.target.map(|r| r.state)),
                (Some(AgentState::SwitchedOver), Some(AgentState::Running)),
                "{:?}'s agents' reports",
                m.metadata.name
            );
        }
    }
    // A guest that ran on the target never goes back to its source (its
    // source copy is older: it would resume in the past).
    if matches!(
        victim,
        Victim::SourceAgentAtSwitchover | Victim::TargetAgentAtSwitchover
    ) {
        let m = all
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(struck.as_str()))
            .unwrap();
        let s = m.status.clone().unwrap_or_default();
        assert_eq!(s.phase, MigrationPhase::Succeeded, "{struck}: {s:#?}");
    }
    for vm in VMS {
        let succeeded: Vec<_> = all
            .iter()
            .filter(|m| m.spec.vm_name == vm)
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
            })
            .collect();
        assert_eq!(
            succeeded.len(),
            1,
            "{vm} moved once: {:#?}",
            all.iter()
                .map(|m| (
                    &m.metadata.name,
                    m.status
                        .as_ref()
                        .map(|s| (s.phase, &s.failure_reason, &s.message))
                ))
                .collect::<Vec<_>>()
        );
    }

    // Every VM on exactly one host, not the source; its guest went on.
    for vm in VMS {
        let status = wait_for(Duration::from_secs(60), || async {
            let s = vms.get(vm).await.ok()?.status?;
            (s.phase == VmPhase::Running && s.migration.is_none()).then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("{vm} runs"));
        let host = status.host.clone().unwrap();
        assert_ne!(host, SOURCE, "{vm} left the drained host");
        let holders = wait_for(Duration::from_secs(30), || async {
            let holders: Vec<&String> = cluster
                .hosts
                .iter()
                .filter(|h| qemu_of(&cluster, h, vm).is_some())
                .collect();
            (holders.len() == 1).then_some(holders)
        })
        .await
        .unwrap_or_else(|| panic!("{vm} has one QEMU"));
        assert_eq!(holders[0], &host, "{vm} runs where the API says");
        let mut console = GuestConsole::connect_timeout(
            &cluster.serial_socket(&host, "default", vm),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        let now = console.status().await.unwrap();
        assert!(
            now.ticks > before[vm],
            "{vm}'s guest was never restarted: ticks {} then {}",
            before[vm],
            now.ticks
        );
        assert!(
            console.verify().await.unwrap().is_intact(),
            "{vm}'s memory is intact"
        );
    }
    assert!(
        cluster.running_qemus(SOURCE).is_empty(),
        "nothing runs on the drained host"
    );
    drop(cluster);
}

/// Whether the guest of `vm` executes on a host other than the source.
async fn executes_off_source(cluster: &Cluster, vm: &str) -> bool {
    for host in cluster.hosts.iter().filter(|h| *h != SOURCE) {
        let Some(pid) = qemu_of(cluster, host, vm) else {
            continue;
        };
        let Some(before) = cluster_support::vcpu::vcpu_run_ns(pid) else {
            continue;
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        if cluster_support::vcpu::vcpu_run_ns(pid).is_some_and(|after| after > before + 1_000_000) {
            return true;
        }
    }
    false
}

/// The live QEMU pid of `vm` on `host`.
fn qemu_of(cluster: &Cluster, host: &str, vm: &str) -> Option<i32> {
    let pid = std::fs::read_to_string(
        cluster
            .state_dir(host)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_killed_mid_drain_is_replaced_and_the_drain_completes_with_no_vm_moved_twice()
{
    drill(Victim::Controller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_agent_killed_mid_drain_adopts_its_qemus_and_the_drain_completes() {
    drill(Victim::SourceAgent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_agent_killed_between_transfer_and_switchover_loses_no_vm() {
    drill(Victim::SourceAgentAtSwitchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_agent_killed_as_the_guest_starts_there_never_lets_it_run_twice() {
    drill(Victim::TargetAgentAtSwitchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_server_restarted_mid_drain_loses_nothing_and_the_drain_completes() {
    drill(Victim::ApiServer).await;
}

/// The sampler's rule, on made-up intervals: a switchover (source, both,
/// target) is not two copies; two hosts in two intervals in a row are.
#[test]
fn the_sampler_tells_a_switchover_from_a_vm_running_on_two_hosts() {
    use cluster_support::vcpu::{Executing, doubles};
    let at = |hosts: &[&str]| -> Executing {
        [(
            "vm".to_string(),
            hosts.iter().map(|h| h.to_string()).collect(),
        )]
        .into()
    };
    let switchover = [at(&["a"]), at(&["a", "b"]), at(&["b"]), at(&["b"])];
    for pair in switchover.windows(2) {
        assert!(doubles(&pair[0], &pair[1]).is_empty(), "{pair:?}");
    }
    let twice = [at(&["a"]), at(&["a", "b"]), at(&["a", "b"])];
    assert!(doubles(&twice[0], &twice[1]).is_empty());
    let found = doubles(&twice[1], &twice[2]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].1.len(), 2);
    // Other VMs in the same intervals do not mix in.
    let mut other = at(&["a"]);
    other.insert("other".into(), ["b".to_string()].into());
    assert!(doubles(&other, &other).is_empty());
}
