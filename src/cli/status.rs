//! `status`: hosts with load and VM counts, and the migrations in flight.

use std::process::ExitCode;

use anyhow::Context;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde::Serialize;

use crate::api::{Host, Migration};

use super::GlobalArgs;
use super::output::print_structured;
use super::progress::{migration_done, migration_line};

#[derive(Serialize)]
struct Status {
    hosts: Vec<HostRow>,
    migrations: Vec<MigrationRow>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HostRow {
    name: String,
    phase: String,
    schedulable: bool,
    vms: u32,
    cpu_percent: Option<u32>,
    free_memory: Option<String>,
}

#[derive(Serialize)]
struct MigrationRow {
    namespace: String,
    name: String,
    vm: String,
    summary: String,
}

/// Print the cluster's hosts and the migrations in flight.
pub async fn status(client: &kube::Client, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let hosts: Api<Host> = Api::all(client.clone());
    let migrations: Api<Migration> = Api::all(client.clone());
    let mut host_rows: Vec<HostRow> = hosts
        .list(&ListParams::default())
        .await
        .context("listing hosts")?
        .items
        .into_iter()
        .map(|h| {
            let status = h.status.clone().unwrap_or_default();
            HostRow {
                name: h.name_any(),
                phase: format!("{:?}", status.phase),
                schedulable: !h.spec.unschedulable,
                vms: status.vm_count,
                cpu_percent: status.cpu_percent,
                free_memory: status.free_memory.map(|q| q.to_string()),
            }
        })
        .collect();
    host_rows.sort_by(|a, b| a.name.cmp(&b.name));
    let migration_rows: Vec<MigrationRow> = migrations
        .list(&ListParams::default())
        .await
        .context("listing migrations")?
        .items
        .into_iter()
        .filter(|m| !migration_done(m.status.as_ref().map(|s| s.phase).unwrap_or_default()))
        .map(|m| MigrationRow {
            namespace: m.namespace().unwrap_or_default(),
            name: m.name_any(),
            vm: m.spec.vm_name.clone(),
            summary: migration_line(&m),
        })
        .collect();
    let status = Status {
        hosts: host_rows,
        migrations: migration_rows,
    };
    if print_structured(global.output, &status)? {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<12} {:<12} {:>4} {:>5} {:>10}",
        "HOST", "PHASE", "SCHEDULABLE", "VMS", "CPU%", "FREE"
    );
    for h in &status.hosts {
        println!(
            "{:<16} {:<12} {:<12} {:>4} {:>5} {:>10}",
            h.name,
            h.phase,
            if h.schedulable { "yes" } else { "no" },
            h.vms,
            h.cpu_percent
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            h.free_memory.as_deref().unwrap_or("-")
        );
    }
    if status.migrations.is_empty() {
        println!("\nno migrations in flight");
    } else {
        println!("\nMIGRATIONS IN FLIGHT");
        for m in &status.migrations {
            println!("{}/{} ({}): {}", m.namespace, m.name, m.vm, m.summary);
        }
    }
    Ok(ExitCode::SUCCESS)
}
