//! RHV's resilience policies on a failed host (issue 7, story 5), on an
//! in-process cluster with real QEMU guests and the fencing watchdog.
//!
//! One host dies (its agent killed; its watchdog kills its QEMUs) with six
//! VMs on it, two under each policy (one highly available, one not):
//!
//! | policy                       | HA VM      | other VM   |
//! |------------------------------|------------|------------|
//! | `MigrateAll`                 | rebuilt    | rebuilt    |
//! | `MigrateHighlyAvailableOnly` | rebuilt    | left down  |
//! | `DoNotMigrate`               | left down  | left down  |
//!
//! Rebuilt VMs get one `Evacuate` Migration each (label
//! `ferry.dev/evacuated-host`, annotation `ferry.dev/reason`, Event
//! `Evacuating`) and keep their UUID; a VM left down gets a Warning Event
//! `NotEvacuated` naming its policy and no Migration. At no sample does a
//! VM have QEMUs on two hosts. When the host comes back it runs the VMs
//! left on it again, and none of those rebuilt elsewhere.

mod cluster_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use ferry::api::{
    Host, HostPhase, Migration, MigrationPhase, MigrationPolicy, MigrationType, VirtualMachine,
    VmPhase,
};

use cluster_support::vcpu::Sampler;
use cluster_support::{Cluster, Options, wait_for};

const FAILED: &str = "host-1";

/// (VM, resilience label, highly available, rebuilt by its policy).
const VMS: [(&str, &str, bool, bool); 6] = [
    ("all-ha", "all", true, true),
    ("all-plain", "all", false, true),
    ("haonly-ha", "ha-only", true, true),
    ("haonly-plain", "ha-only", false, false),
    ("none-ha", "none", true, false),
    ("none-plain", "none", false, false),
];

async fn policy(cluster: &Cluster, name: &str, selector: &str, resilience: &str) {
    let api: Api<MigrationPolicy> = Api::all(cluster.client.clone());
    let p: MigrationPolicy = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: MigrationPolicy\nmetadata: {{name: {name}}}\n\
         spec: {{{selector} resilience: {{policy: {resilience}, fenceAfter: 3s, evacuateAfter: 6s}}}}\n"
    ))
    .unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_resilience_policy_rebuilds_exactly_the_vms_it_names_and_says_why_it_leaves_the_others()
 {
    let mut options = Options::hosts(&[FAILED, "host-2", "host-3"]);
    options.lease_duration = Duration::from_secs(2);
    options.fence_after = Duration::from_secs(3);
    options.watchdog = true;
    let cluster = Cluster::start_with(options).await;
    policy(&cluster, "default", "", "MigrateAll").await;
    policy(
        &cluster,
        "ha-only",
        "selector: {matchLabels: {resilience: ha-only}},",
        "MigrateHighlyAvailableOnly",
    )
    .await;
    policy(
        &cluster,
        "none",
        "selector: {matchLabels: {resilience: none}},",
        "DoNotMigrate",
    )
    .await;
    for host in ["host-2", "host-3"] {
        cordon(&cluster, host, true).await;
    }
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    for (name, label, ha, _) in VMS {
        let vm: VirtualMachine = serde_yaml::from_str(&format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\n\
             metadata: {{name: {name}, namespace: default, labels: {{resilience: {label}}}}}\n\
             spec: {{memory: 64Mi, highlyAvailable: {ha}, boot: {{memtest: {{fillMib: 8}}}}}}\n"
        ))
        .unwrap();
        vms.create(&PostParams::default(), &vm).await.unwrap();
    }
    let mut uuids = BTreeMap::new();
    for (name, ..) in VMS {
        let s = wait_for(Duration::from_secs(240), || async {
            let s = vms.get(name).await.ok()?.status?;
            (s.phase == VmPhase::Running && s.host.as_deref() == Some(FAILED)).then_some(s)
        })
        .await;
        let Some(s) = s else {
            let now = vms.get(name).await.ok().and_then(|v| v.status);
            panic!("{name} does not run on {FAILED}: {now:#?}");
        };
        uuids.insert(name, s.uuid.clone());
    }
    for host in ["host-2", "host-3"] {
        cordon(&cluster, host, false).await;
    }
    let sampler = Sampler::start(
        cluster
            .hosts
            .iter()
            .map(|h| (h.clone(), cluster.state_dir(h)))
            .collect(),
        VMS.iter().map(|v| v.0.to_string()).collect(),
    );

    // Power loss, as far as the cluster can tell: the agent dies, and its
    // watchdog kills the QEMUs fenceAfter after the last renewal.
    cluster.kill_agent(FAILED);
    let rebuilt: BTreeSet<&str> = VMS.iter().filter(|v| v.3).map(|v| v.0).collect();
    let migrations: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    wait_for(Duration::from_secs(120), || async {
        for name in &rebuilt {
            let s = vms.get(name).await.ok()?.status?;
            if s.phase != VmPhase::Running || s.host.as_deref() == Some(FAILED) {
                return None;
            }
        }
        let list = migrations.list(&ListParams::default()).await.ok()?;
        let done: Vec<Migration> = list
            .items
            .into_iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
            })
            .collect();
        (done.len() >= rebuilt.len()).then_some(done)
    })
    .await
    .expect("the VMs their policies name are rebuilt elsewhere");
    let host = Api::<Host>::all(cluster.client.clone())
        .get(FAILED)
        .await
        .unwrap();
    assert_eq!(host.status.unwrap().phase, HostPhase::Fenced);

    // Each left VM says why; give the controller its Events before the
    // Migration count is final.
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    for (name, _, ha, rebuild) in VMS {
        if rebuild {
            continue;
        }
        let event = wait_for(Duration::from_secs(30), || async {
            let list = events
                .list(
                    &ListParams::default()
                        .fields(&format!("involvedObject.name={name},reason=NotEvacuated")),
                )
                .await
                .ok()?;
            list.items.into_iter().next()
        })
        .await
        .unwrap_or_else(|| panic!("{name} has a NotEvacuated event"));
        let message = event.message.unwrap_or_default();
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert!(message.contains(FAILED), "{message}");
        let policy = if name.starts_with("none") {
            "DoNotMigrate of MigrationPolicy none"
        } else {
            "MigrateHighlyAvailableOnly of MigrationPolicy ha-only"
        };
        assert!(message.contains(policy), "{name}: {message}");
        assert_eq!(message.contains("not highlyAvailable"), !ha, "{message}");
        let s = vms.get(name).await.unwrap().status.unwrap();
        assert_eq!(
            s.host.as_deref(),
            Some(FAILED),
            "{name} is left on its host"
        );
    }

    // Exactly one Evacuate Migration per rebuilt VM, and none for the others.
    let all = migrations.list(&ListParams::default()).await.unwrap().items;
    let mut per_vm: BTreeMap<String, Vec<&Migration>> = BTreeMap::new();
    for m in &all {
        assert_eq!(m.spec.migration_type, MigrationType::Evacuate);
        per_vm.entry(m.spec.vm_name.clone()).or_default().push(m);
    }
    assert_eq!(
        per_vm.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        rebuilt,
        "evacuated are exactly the VMs the policies name"
    );
    for (vm, ms) in &per_vm {
        assert_eq!(ms.len(), 1, "{vm}: one evacuation");
        let m = ms[0];
        let name = m.metadata.name.clone().unwrap();
        assert_eq!(
            m.metadata.labels.as_ref().unwrap()["ferry.dev/evacuated-host"],
            FAILED
        );
        let reason = &m.metadata.annotations.as_ref().unwrap()["ferry.dev/reason"];
        assert!(reason.contains(&format!("{FAILED} was fenced")), "{reason}");
        let s = m.status.clone().unwrap();
        assert_eq!(s.phase, MigrationPhase::Succeeded, "{s:?}");
        assert_eq!(s.source_host.as_deref(), Some(FAILED));
        // Events are recorded after the status that they tell of.
        let fenced = format!("{FAILED} is fenced");
        let said = wait_for(Duration::from_secs(10), || async {
            let evacuating = events
                .list(
                    &ListParams::default()
                        .fields(&format!("involvedObject.name={name},reason=Evacuating")),
                )
                .await
                .ok()?
                .items;
            evacuating
                .iter()
                .any(|e| e.message.as_deref().is_some_and(|t| t.contains(&fenced)))
                .then_some(())
        })
        .await;
        assert!(
            said.is_some(),
            "{name}: no Evacuating Event saying {fenced}"
        );
        let now = vms.get(vm).await.unwrap().status.unwrap();
        assert_eq!(now.uuid, uuids[vm.as_str()], "{vm} keeps its identity");
        assert_eq!(now.host, s.target_host, "{vm} runs where it was rebuilt");
    }
    assert!(
        cluster.running_qemus(FAILED).is_empty(),
        "the watchdog stopped every QEMU of {FAILED}"
    );

    // The host comes back: it runs again what was left on it, and nothing
    // that was rebuilt elsewhere.
    cluster.restart_agent(FAILED);
    for (name, _, _, rebuild) in VMS {
        let s = wait_for(Duration::from_secs(120), || async {
            let s = vms.get(name).await.ok()?.status?;
            (s.phase == VmPhase::Running).then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("{name} runs"));
        assert_eq!(s.host.as_deref() == Some(FAILED), !rebuild, "{name}: {s:?}");
    }
    wait_for(Duration::from_secs(60), || async {
        let h = Api::<Host>::all(cluster.client.clone())
            .get(FAILED)
            .await
            .ok()?;
        (h.status?.phase == HostPhase::Active).then_some(())
    })
    .await
    .expect("the host returns to service");
    let left = VMS.iter().filter(|v| !v.3).count();
    let restarted = wait_for(Duration::from_secs(120), || async {
        (cluster.running_qemus(FAILED).len() == left).then_some(())
    })
    .await;
    if restarted.is_none() {
        let statuses: Vec<_> = vms
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|v| (v.metadata.name, v.status))
            .collect();
        panic!("the returned host does not start again the VMs left on it: {statuses:#?}");
    }
    let report = sampler.finish();
    eprintln!("{report:?}");
    assert!(report.doubles.is_empty(), "{:?}", report.doubles);
    for (name, ..) in VMS {
        assert_eq!(
            report.most_qemus.get(name),
            Some(&1),
            "{name} never had QEMUs on two hosts: {report:?}"
        );
    }
    assert_eq!(
        cluster.running_qemus(FAILED).len(),
        left,
        "the returned host runs only what was left on it"
    );
}
