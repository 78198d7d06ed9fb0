//! `migrate`, `cancel` and `explain`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

use crate::api::{Migration, MigrationPhase, MigrationSpec, MigrationType, VirtualMachine};

use super::output::print_structured;
use super::progress::{follow_migration, migration_line};
use super::{GlobalArgs, WaitArgs};

/// `migrate VM [--to HOST] [--cold] [--policy P]`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VirtualMachine to move.
    pub vm: String,
    /// The host to move to (default: the scheduler chooses).
    #[arg(long)]
    pub to: Option<String>,
    /// Stop the VM and start it on the target (offline, `xm migrate`).
    #[arg(long)]
    pub cold: bool,
    /// The MigrationPolicy to use (default: the one matching the VM).
    #[arg(long)]
    pub policy: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Create a Migration for the VM and follow it.
pub async fn migrate(
    client: &kube::Client,
    global: &GlobalArgs,
    args: MigrateArgs,
) -> anyhow::Result<ExitCode> {
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &global.namespace);
    vms.get(&args.vm)
        .await
        .with_context(|| format!("VirtualMachine {}/{} not found", global.namespace, args.vm))?;
    let migrations: Api<Migration> = Api::namespaced(client.clone(), &global.namespace);
    let migration = Migration {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", args.vm)),
            namespace: Some(global.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: MigrationSpec {
            vm_name: args.vm.clone(),
            migration_type: if args.cold {
                MigrationType::Cold
            } else {
                MigrationType::Live
            },
            target_host: args.to.clone(),
            policy: args.policy.clone(),
            cancel: false,
        },
        status: None,
    };
    let created = migrations
        .create(&PostParams::default(), &migration)
        .await
        .context("creating the Migration")?;
    let name = created.name_any();
    eprintln!("migration {}/{name} created", global.namespace);
    finish(&migrations, &name, global, args.wait).await
}

/// Follow (or not) and print the result; the exit code says how it ended.
async fn finish(
    api: &Api<Migration>,
    name: &str,
    global: &GlobalArgs,
    wait: WaitArgs,
) -> anyhow::Result<ExitCode> {
    let m = if wait.follow() {
        follow_migration(api, name, Duration::from_secs(wait.timeout)).await?
    } else {
        api.get(name).await?
    };
    if !print_structured(global.output, &m)? {
        println!("{name}: {}", migration_line(&m));
    }
    let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
    Ok(match phase {
        MigrationPhase::Failed | MigrationPhase::Cancelled if wait.follow() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// `cancel MIGRATION`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The Migration to cancel.
    pub migration: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Ask for the cancel and follow the migration to its end.
pub async fn cancel(
    client: &kube::Client,
    global: &GlobalArgs,
    args: CancelArgs,
) -> anyhow::Result<ExitCode> {
    let api: Api<Migration> = Api::namespaced(client.clone(), &global.namespace);
    api.patch(
        &args.migration,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await
    .with_context(|| {
        format!(
            "cancelling migration {}/{}",
            global.namespace, args.migration
        )
    })?;
    eprintln!("cancel requested for {}", args.migration);
    let m = if args.wait.follow() {
        follow_migration(
            &api,
            &args.migration,
            Duration::from_secs(args.wait.timeout),
        )
        .await?
    } else {
        api.get(&args.migration).await?
    };
    if !print_structured(global.output, &m)? {
        println!("{}: {}", args.migration, migration_line(&m));
    }
    let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
    // A cancel that lost the race to a completed switchover is reported, not hidden.
    Ok(
        if phase == MigrationPhase::Succeeded && args.wait.follow() {
            eprintln!(
                "the migration completed before the cancel took effect: the VM runs on the target"
            );
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// `explain MIGRATION`.
#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The Migration whose scheduling decision to show.
    pub migration: String,
}

/// Print the scheduling decision: chosen host and why every other host was not.
pub async fn explain(
    client: &kube::Client,
    global: &GlobalArgs,
    args: ExplainArgs,
) -> anyhow::Result<ExitCode> {
    let api: Api<Migration> = Api::namespaced(client.clone(), &global.namespace);
    let m = api.get(&args.migration).await.with_context(|| {
        format!(
            "migration {}/{} not found",
            global.namespace, args.migration
        )
    })?;
    let status = m.status.clone().unwrap_or_default();
    let Some(decision) = status.scheduling_decision else {
        if let Some(target) = &m.spec.target_host {
            println!(
                "{}: target {target} was named by the user; no scheduling was needed",
                args.migration
            );
        } else {
            println!(
                "{}: not scheduled yet (phase {:?})",
                args.migration, status.phase
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    if print_structured(global.output, &decision)? {
        return Ok(ExitCode::SUCCESS);
    }
    match &decision.chosen {
        Some(host) => println!(
            "chosen: {host}{}{}",
            decision
                .policy
                .as_deref()
                .map(|p| format!(" (policy {p})"))
                .unwrap_or_default(),
            decision
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        None => println!("no host fits"),
    }
    for rejected in &decision.rejected {
        println!(
            "  {:<20} {:<24} {}",
            rejected.host, rejected.reason, rejected.message
        );
    }
    Ok(ExitCode::SUCCESS)
}
