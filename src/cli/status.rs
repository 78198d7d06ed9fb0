//! `status`: hosts with load and VM counts, the migrations in flight, and
//! the VMs with network interfaces: MAC and static IP per interface (from
//! `status.networks`, which the agents fill), and — on a `ferry up`
//! cluster, whose ConfigMap `ferry-system/ferry-up-network` names the
//! client namespace on its VM network — the command that reaches them.

use std::process::ExitCode;

use anyhow::Context;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde::Serialize;

use crate::api::{Host, Migration, VirtualMachine};
use crate::cli::up::cluster::{NetworkInfo, read_network};

use super::GlobalArgs;
use super::output::print_structured;
use super::progress::{migration_done, migration_line};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    hosts: Vec<HostRow>,
    migrations: Vec<MigrationRow>,
    networked_vms: Vec<NicRow>,
}

/// One network interface of a VM.
#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct NicRow {
    vm: String,
    host: Option<String>,
    network: String,
    mac: String,
    ip: Option<String>,
    /// The command that reaches the address, when known.
    reach: Option<String>,
}

/// The interfaces of `vms` as their status reports them, with the command
/// that reaches each address on `ferry up`'s VM network.
fn nic_rows(vms: &[VirtualMachine], net: Option<&NetworkInfo>) -> Vec<NicRow> {
    let mut rows = Vec::new();
    for vm in vms {
        let status = vm.status.clone().unwrap_or_default();
        for nic in &status.networks {
            let reach = match (net, &nic.ip) {
                (Some(net), Some(ip)) if net.network == nic.name => Some(format!(
                    "ip netns exec {} {} {}",
                    net.client_namespace,
                    net.ping,
                    ip.split('/').next().unwrap_or(ip)
                )),
                _ => None,
            };
            rows.push(NicRow {
                vm: format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()),
                host: status.host.clone(),
                network: nic.name.clone(),
                mac: nic.mac.clone(),
                ip: nic.ip.clone(),
                reach,
            });
        }
    }
    rows.sort_by(|a, b| a.vm.cmp(&b.vm));
    rows
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
    let vms: Api<VirtualMachine> = Api::all(client.clone());
    let vms = vms
        .list(&ListParams::default())
        .await
        .context("listing virtual machines")?
        .items;
    let net = read_network(client).await;
    let status = Status {
        hosts: host_rows,
        migrations: migration_rows,
        networked_vms: nic_rows(&vms, net.as_ref()),
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
    if !status.networked_vms.is_empty() {
        println!("\nVM NETWORK INTERFACES");
        println!(
            "{:<24} {:<10} {:<10} {:<18} IP",
            "VM", "HOST", "NETWORK", "MAC"
        );
        for n in &status.networked_vms {
            println!(
                "{:<24} {:<10} {:<10} {:<18} {}",
                n.vm,
                n.host.as_deref().unwrap_or("-"),
                n.network,
                n.mac,
                n.ip.as_deref().unwrap_or("-")
            );
        }
        for n in status.networked_vms.iter().filter(|n| n.reach.is_some()) {
            println!("reach {}: {}", n.vm, n.reach.as_deref().unwrap_or_default());
        }
    }
    if let Some(net) = &net {
        println!(
            "\nVM network {} ({}): reach it from network namespace {}",
            net.network, net.subnet, net.client_namespace
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_show_mac_ip_and_how_to_reach_them_on_ferry_ups_network() {
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"memory": "128Mi", "boot": {"memtest": {}},
                     "networks": [{"name": "default", "ip": "10.78.0.7/24"}, {"name": "other"}]},
            "status": {"host": "host-2", "networks": [
                {"name": "default", "mac": "52:54:00:00:00:01", "ip": "10.78.0.7/24"},
                {"name": "other", "mac": "52:54:00:00:00:02"}]},
        }))
        .unwrap();
        let net = NetworkInfo {
            network: "default".into(),
            subnet: "10.78.0.0/24".into(),
            client_namespace: "ferry-abc123-cl".into(),
            ping: "ping".into(),
        };
        let rows = nic_rows(std::slice::from_ref(&vm), Some(&net));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].mac, "52:54:00:00:00:01");
        assert_eq!(rows[0].host.as_deref(), Some("host-2"));
        assert_eq!(
            rows[0].reach.as_deref(),
            Some("ip netns exec ferry-abc123-cl ping 10.78.0.7")
        );
        assert_eq!(rows[1].reach, None, "no address, no way to reach it");
        assert!(nic_rows(&[vm], None).iter().all(|r| r.reach.is_none()));
    }
}
