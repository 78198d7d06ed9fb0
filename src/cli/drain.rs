//! `drain`, `undrain` and `evacuate`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};

use crate::api::maintenance::NonMigratable;
use crate::api::{
    HostMaintenance, HostMaintenanceSpec, MaintenancePhase, Migration, MigrationSpec,
    MigrationType, VirtualMachine,
};

use super::output::print_structured;
use super::progress::follow_maintenance;
use super::{GlobalArgs, WaitArgs};

/// `drain HOST [--to HOST] [--dry-run]`.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The host to drain.
    pub host: String,
    /// Move every VM to this host (default: the scheduler chooses per VM).
    #[arg(long)]
    pub to: Option<String>,
    /// Move nothing: print where each VM would go, what blocks it, and the estimated time.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop VMs that cannot live-migrate instead of blocking the drain.
    #[arg(long)]
    pub stop_non_migratable: bool,
    /// Why the host is drained, for the record.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Create a HostMaintenance and follow it (a dry run prints its plan).
pub async fn drain(
    client: &kube::Client,
    global: &GlobalArgs,
    args: DrainArgs,
) -> anyhow::Result<ExitCode> {
    let api: Api<HostMaintenance> = Api::all(client.clone());
    let (name, generate_name) = if args.dry_run {
        (None, Some(format!("{}-dry-run-", args.host)))
    } else {
        (Some(args.host.clone()), None)
    };
    let hm = HostMaintenance {
        metadata: ObjectMeta {
            name,
            generate_name,
            ..ObjectMeta::default()
        },
        spec: HostMaintenanceSpec {
            host: args.host.clone(),
            target_host: args.to.clone(),
            reason: args.reason.clone(),
            policy: None,
            non_migratable: if args.stop_non_migratable {
                NonMigratable::Stop
            } else {
                NonMigratable::Block
            },
            deadline: None,
            dry_run: args.dry_run,
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &hm)
        .await
        .with_context(|| format!("creating the HostMaintenance for {}", args.host))?;
    let name = created.name_any();
    eprintln!("host maintenance {name} created");
    if !args.wait.follow() && !args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    let hm = follow_maintenance(&api, &name, Duration::from_secs(args.wait.timeout)).await?;
    if args.dry_run {
        // The plan has been read; a dry run leaves nothing behind.
        api.delete(&name, &DeleteParams::default()).await.ok();
    }
    let status = hm.status.clone().unwrap_or_default();
    if !print_structured(global.output, &hm)? {
        if let Some(plan) = &status.plan {
            println!(
                "plan for draining {} (estimated {}s):",
                args.host, plan.estimated_seconds
            );
            for (i, entry) in plan.entries.iter().enumerate() {
                match (&entry.target, &entry.blocker) {
                    (Some(target), _) => println!(
                        "  {:>2}. {}/{} -> {target} (~{}s)",
                        i + 1,
                        entry.namespace,
                        entry.vm,
                        entry.estimated_seconds
                    ),
                    (None, blocker) => println!(
                        "  {:>2}. {}/{} BLOCKED: {}",
                        i + 1,
                        entry.namespace,
                        entry.vm,
                        blocker.as_deref().unwrap_or("no target")
                    ),
                }
            }
        } else {
            println!(
                "{name}: {:?}, {} of {} VMs moved, {} blocked",
                status.phase,
                status.vms_total.saturating_sub(status.vms_remaining),
                status.vms_total,
                status.vms_blocked
            );
        }
        for blocker in &status.blockers {
            println!(
                "  blocked: {}/{}: {} ({})",
                blocker.namespace, blocker.vm, blocker.message, blocker.reason
            );
        }
    }
    Ok(match status.phase {
        MaintenancePhase::Completed | MaintenancePhase::Planned => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// `undrain HOST`.
#[derive(Args, Debug)]
pub struct UndrainArgs {
    /// The host to return to service.
    pub host: String,
}

/// Delete the host's maintenances; the controller cancels what is in flight
/// and makes the host schedulable again.
pub async fn undrain(
    client: &kube::Client,
    _global: &GlobalArgs,
    args: UndrainArgs,
) -> anyhow::Result<ExitCode> {
    let api: Api<HostMaintenance> = Api::all(client.clone());
    let all = api
        .list(&ListParams::default())
        .await
        .context("listing host maintenances")?;
    let mine: Vec<_> = all
        .items
        .into_iter()
        .filter(|hm| hm.spec.host == args.host)
        .collect();
    if mine.is_empty() {
        eprintln!("{} is not in maintenance", args.host);
        return Ok(ExitCode::SUCCESS);
    }
    for hm in mine {
        let name = hm.name_any();
        api.delete(&name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting host maintenance {name}"))?;
        eprintln!(
            "host maintenance {name} deleted: {} returns to service",
            args.host
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `evacuate HOST`.
#[derive(Args, Debug)]
pub struct EvacuateArgs {
    /// The failed host whose VMs to rebuild elsewhere.
    pub host: String,
    /// Rebuild every VM on this host (default: the scheduler chooses).
    #[arg(long)]
    pub to: Option<String>,
}

/// Create an Evacuate migration for every VM of the host, in every namespace.
/// The controller holds them until the host is Fenced.
pub async fn evacuate(
    client: &kube::Client,
    global: &GlobalArgs,
    args: EvacuateArgs,
) -> anyhow::Result<ExitCode> {
    let vms: Api<VirtualMachine> = Api::all(client.clone());
    let list = vms
        .list(&ListParams::default())
        .await
        .context("listing virtual machines")?;
    let mut created = Vec::new();
    for vm in list.items {
        if vm.status.as_ref().and_then(|s| s.host.as_deref()) != Some(args.host.as_str()) {
            continue;
        }
        let namespace = vm.namespace().unwrap_or_else(|| global.namespace.clone());
        let api: Api<Migration> = Api::namespaced(client.clone(), &namespace);
        let m = Migration {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-evacuate-", vm.name_any())),
                ..ObjectMeta::default()
            },
            spec: MigrationSpec {
                vm_name: vm.name_any(),
                migration_type: MigrationType::Evacuate,
                target_host: args.to.clone(),
                policy: None,
                cancel: false,
            },
            status: None,
        };
        let m = api
            .create(&PostParams::default(), &m)
            .await
            .with_context(|| format!("creating the evacuation of {namespace}/{}", vm.name_any()))?;
        created.push(format!("{namespace}/{}", m.name_any()));
    }
    if !print_structured(global.output, &created)? {
        if created.is_empty() {
            println!("no VMs on {}", args.host);
        }
        for name in &created {
            println!(
                "evacuation {name} created (waits until {} is fenced)",
                args.host
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
