//! The demo VMs of `ferry up --demo`: `demo-1`…`demo-N` in `default`,
//! placed round-robin over the hosts by hand (as an operator would with
//! `kubectl patch --subresource=status`), so they are spread whatever the
//! scheduling policy says.
//!
//! ```text
//!  --demo-guest auto    ─► VM network (root) and Linux test guest built?
//!                            yes ─► demo-1: Linux guest on network `default`, 10.78.0.101/24
//!                                   demo-2…: memtest guest
//!                            no  ─► every demo VM: memtest guest (ferry up says why)
//!  --demo-guest linux   ─► as `auto`, but a guest that cannot be built is an error
//!  --demo-guest memtest ─► every demo VM: memtest guest
//! ```
//!
//! The Linux guest ([`crate::agent::linux_guest`]) answers ping and serves
//! TCP echo on port 7, so a client in the client namespace can watch a
//! connection survive a migration; the memtest guest proves memory
//! integrity (`ferry guest verify`). VMs that exist already are left as
//! they are (a restart resumes them), and described as they are.

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::cluster::{ClusterError, NetworkInfo, api_err};
use super::netns;
use crate::agent::linux_guest::{self, LinuxGuest};
use crate::api::VirtualMachine;

/// Which guest the demo VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DemoGuest {
    /// `demo-1` runs the Linux test guest on the VM network when both are
    /// available; the memtest guest otherwise.
    #[default]
    Auto,
    /// `demo-1` runs the Linux test guest; failing to build it is an error.
    Linux,
    /// Every demo VM runs the memtest guest.
    Memtest,
}

/// The Linux guest could not be had when `--demo-guest linux` asked for it.
#[derive(Debug, thiserror::Error)]
#[error("--demo-guest linux: {0}")]
pub struct DemoGuestUnavailable(#[from] pub linux_guest::LinuxGuestError);

/// What the demo VMs will run, and the sentence that says so.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The Linux guest for `demo-1`, if it runs one.
    pub linux: Option<LinuxGuest>,
    /// Why the demo runs what it runs (printed by `ferry up`).
    pub note: String,
}

/// Decide what the demo VMs run; `networked` is whether `ferry up` has a
/// VM network. Building the Linux guest (when not cached) runs its build
/// script, so this blocks: call it from a blocking task.
pub fn choose(requested: DemoGuest, networked: bool) -> Result<Choice, DemoGuestUnavailable> {
    let memtest = |why: String| Choice {
        linux: None,
        note: format!("demo VMs run the memtest guest ({why})"),
    };
    match requested {
        DemoGuest::Memtest => Ok(memtest("--demo-guest memtest".into())),
        DemoGuest::Auto if !networked => Ok(memtest(
            "no VM network: that needs root and no --no-netns".into(),
        )),
        DemoGuest::Auto => match linux_guest::ensure() {
            Ok(guest) => Ok(Choice {
                linux: Some(guest),
                note: "demo-1 runs the Linux test guest on network default; the other demo VMs run the memtest guest".into(),
            }),
            Err(e) => Ok(memtest(format!("the Linux test guest is unavailable: {e}"))),
        },
        DemoGuest::Linux => {
            let guest = linux_guest::ensure()?;
            let note = if networked {
                "demo-1 runs the Linux test guest on network default; the other demo VMs run the memtest guest"
            } else {
                "demo-1 runs the Linux test guest, unreachable: no VM network without root"
            };
            Ok(Choice {
                linux: Some(guest),
                note: note.into(),
            })
        }
    }
}

/// Demo VM `i` running the memtest guest.
pub fn memtest_vm(i: u32) -> Value {
    json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": format!("demo-{i}"), "namespace": "default", "labels": {"app": "demo"}},
        "spec": {
            "memory": "64Mi",
            "cpus": 1,
            "boot": {"memtest": {"fillMib": 32, "dirtyRateMib": 1}},
        },
    })
}

/// Demo VM `i` running the Linux guest with one NIC on network `default`
/// at [`netns::demo_vm_cidr`]`(i)` (the same address on the kernel command
/// line, which the guest configures, and in `spec.networks[].ip`).
pub fn linux_vm(i: u32, guest: &LinuxGuest) -> Value {
    let cidr = netns::demo_vm_cidr(i);
    json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": format!("demo-{i}"), "namespace": "default", "labels": {"app": "demo"}},
        "spec": {
            "memory": format!("{}Mi", linux_guest::MEMORY_MIB),
            "cpus": 1,
            "boot": {"kernel": {
                "kernel": guest.kernel.display().to_string(),
                "initrd": guest.initrd.display().to_string(),
                "cmdline": LinuxGuest::cmdline(&cidr, None),
            }},
            "networks": [{"name": netns::VM_NETWORK, "ip": cidr}],
        },
    })
}

/// A demo VM as it is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoVm {
    /// Its name.
    pub name: String,
    /// Where it is placed.
    pub host: Option<String>,
    /// Whether it boots a kernel (the Linux guest) rather than memtest.
    pub linux: bool,
    /// Its first network and static address, if any.
    pub network: Option<(String, Option<String>)>,
}

impl DemoVm {
    fn of(vm: &VirtualMachine) -> DemoVm {
        DemoVm {
            name: vm.metadata.name.clone().unwrap_or_default(),
            host: vm.status.as_ref().and_then(|s| s.host.clone()),
            linux: vm.spec.boot.kernel.is_some(),
            network: vm
                .spec
                .networks
                .first()
                .map(|n| (n.name.clone(), n.ip.clone())),
        }
    }

    /// One line for the banner; with `net`, how to reach its address.
    pub fn describe(&self, net: Option<&NetworkInfo>) -> String {
        let guest = if self.linux {
            "Linux test guest"
        } else {
            "memtest guest"
        };
        let mut line = format!("{} ({guest})", self.name);
        if let Some(host) = &self.host {
            line.push_str(&format!(" on {host}"));
        }
        if let Some((network, ip)) = &self.network {
            line.push_str(&format!(", network {network}"));
            if let Some(ip) = ip {
                line.push_str(&format!(" {ip}"));
                let address = ip.split('/').next().unwrap_or(ip);
                if let Some(net) = net.filter(|n| &n.network == network) {
                    line.push_str(&format!(
                        ": ip netns exec {} {} {address}",
                        net.client_namespace, net.ping
                    ));
                }
            }
        }
        line
    }
}

/// Create `count` demo VMs unless they exist (`demo-1` on the Linux guest
/// when `linux` is given), place each one not yet placed round-robin over
/// `hosts`, and return them as they are.
pub async fn install(
    client: &kube::Client,
    count: u32,
    hosts: &[String],
    linux: Option<&LinuxGuest>,
) -> Result<Vec<DemoVm>, ClusterError> {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let mut out = Vec::new();
    for i in 1..=count {
        let name = format!("demo-{i}");
        let manifest = match linux {
            Some(guest) if i == 1 => linux_vm(i, guest),
            _ => memtest_vm(i),
        };
        let vm: VirtualMachine =
            serde_json::from_value(manifest).map_err(|e| ClusterError::Api {
                what: format!("building the demo VM {name}"),
                source: Box::new(kube::Error::SerdeError(e)),
            })?;
        let mut vm = match api.create(&PostParams::default(), &vm).await {
            Ok(vm) => vm,
            Err(kube::Error::Api(e)) if e.code == 409 => api
                .get(&name)
                .await
                .map_err(api_err(format!("reading the demo VM {name}")))?,
            Err(e) => return Err(api_err(format!("creating the demo VM {name}"))(e)),
        };
        let placed = vm.status.as_ref().and_then(|s| s.host.as_ref()).is_some();
        if !placed && !hosts.is_empty() {
            let host = &hosts[(i as usize - 1) % hosts.len()];
            vm = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"host": host}})),
                )
                .await
                .map_err(api_err(format!("placing the demo VM {name} on {host}")))?;
        }
        out.push(DemoVm::of(&vm));
    }
    Ok(out)
}

/// The ping command to suggest: `ping` when on `PATH`, else the static
/// busybox kept next to a built Linux guest (`… busybox ping`), else
/// `ping`.
pub fn ping_command() -> String {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("ping").is_file()));
    if on_path {
        return "ping".into();
    }
    let cached = linux_guest::cache_root().ok().and_then(|root| {
        std::fs::read_dir(root)
            .ok()?
            .flatten()
            .map(|e| e.path().join("busybox"))
            .find(|b| b.is_file())
    });
    match cached {
        Some(busybox) => format!("{} ping", busybox.display()),
        None => "ping".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn guest() -> LinuxGuest {
        LinuxGuest {
            kernel: PathBuf::from("/cache/vmlinuz"),
            initrd: PathBuf::from("/cache/initrd.gz"),
            busybox: PathBuf::from("/cache/busybox"),
        }
    }

    #[test]
    fn demo_vms_are_valid_virtual_machines() {
        let vm: VirtualMachine = serde_json::from_value(memtest_vm(2)).unwrap();
        assert_eq!(vm.metadata.name.as_deref(), Some("demo-2"));
        assert_eq!(vm.spec.memory.bytes(), 64 << 20);
        assert!(vm.spec.networks.is_empty());
    }

    #[test]
    fn the_linux_demo_vm_configures_the_address_it_declares() {
        let vm: VirtualMachine = serde_json::from_value(linux_vm(1, &guest())).unwrap();
        let kernel = vm.spec.boot.kernel.clone().unwrap();
        assert_eq!(kernel.kernel, "/cache/vmlinuz");
        assert!(kernel.cmdline.unwrap().contains("ferry.ip=10.78.0.101/24"));
        assert_eq!(vm.spec.networks.len(), 1);
        assert_eq!(vm.spec.networks[0].name, "default");
        assert_eq!(vm.spec.networks[0].ip.as_deref(), Some("10.78.0.101/24"));
    }

    #[test]
    fn a_networked_demo_vm_is_described_with_how_to_reach_it() {
        let mut vm: VirtualMachine = serde_json::from_value(linux_vm(1, &guest())).unwrap();
        vm.status = Some(crate::api::VirtualMachineStatus {
            host: Some("host-1".into()),
            ..Default::default()
        });
        let info = NetworkInfo {
            network: "default".into(),
            subnet: "10.78.0.0/24".into(),
            client_namespace: "ferry-abc123-cl".into(),
            ping: "ping".into(),
        };
        assert_eq!(
            DemoVm::of(&vm).describe(Some(&info)),
            "demo-1 (Linux test guest) on host-1, network default 10.78.0.101/24: ip netns exec ferry-abc123-cl ping 10.78.0.101"
        );
        let memtest: VirtualMachine = serde_json::from_value(memtest_vm(2)).unwrap();
        assert_eq!(
            DemoVm::of(&memtest).describe(Some(&info)),
            "demo-2 (memtest guest)"
        );
    }

    #[test]
    fn without_a_network_auto_and_memtest_choose_memtest_without_building() {
        for requested in [DemoGuest::Auto, DemoGuest::Memtest] {
            let choice = choose(requested, false).unwrap();
            assert!(choice.linux.is_none());
            assert!(choice.note.contains("memtest"), "{}", choice.note);
        }
    }
}
