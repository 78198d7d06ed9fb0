//! From a `VirtualMachine` to the QEMU machine definition that runs it.
//!
//! The mapping is deterministic: the source and the target of a migration
//! compute the same definition from the same object, so their QEMUs have
//! identical devices, RAM blocks, UUID and MACs (QEMU-FACTS: the block lists
//! must match, and the memtest guest's `-kernel`/`-append` too).

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use uuid::Uuid;

use crate::agent::guest::{self, DirtyRate, GuestConfig};
use crate::agent::qemu::{Boot, CacheMode, DiskSpec, MachineSpec, NicSpec};
use crate::api::VirtualMachine;
use crate::api::vm::DiskCache;

use super::plan::local_name;

/// Why a VM cannot be turned into a machine definition.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The spec is unusable here; the message names the field.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault, e.g. `spec.uuid`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The test guest's kernel could not be written to the state directory.
    #[error("installing the memtest kernel in {dir}")]
    Kernel {
        /// Where.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl MachineError {
    /// Stable reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            MachineError::Invalid { .. } => "InvalidSpec",
            MachineError::Kernel { .. } => "KernelInstallFailed",
        }
    }
}

/// The UUID the guest runs with: `spec.uuid`, else the object's uid.
pub fn effective_uuid(vm: &VirtualMachine) -> Result<Uuid, MachineError> {
    let text = vm
        .spec
        .uuid
        .clone()
        .or_else(|| vm.uid())
        .ok_or(MachineError::Invalid {
            field: "metadata.uid",
            message: "the VM has neither spec.uuid nor a uid".into(),
        })?;
    Uuid::parse_str(&text).map_err(|e| MachineError::Invalid {
        field: "spec.uuid",
        message: format!("{text:?} is not a UUID: {e}"),
    })
}

/// The MAC of a network: as given, else derived from the VM's UUID and the
/// network name (locally administered `52:54:00` prefix, stable forever).
pub fn effective_mac(uuid: &Uuid, network: &str, given: Option<&str>) -> String {
    if let Some(mac) = given {
        return mac.to_ascii_lowercase();
    }
    let hash = uuid
        .as_bytes()
        .iter()
        .chain(network.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    let b = hash.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The machine definition of `vm`; the memtest kernel is installed under
/// `state_dir/kernels` when the VM boots it.
pub fn machine_spec(vm: &VirtualMachine, state_dir: &Path) -> Result<MachineSpec, MachineError> {
    let namespace = vm.namespace().unwrap_or_else(|| "default".into());
    let name = local_name(&namespace, &vm.name_any());
    let memory_mib = u32::try_from(vm.spec.memory.mib()).map_err(|_| MachineError::Invalid {
        field: "spec.memory",
        message: format!("{} is too large", vm.spec.memory),
    })?;
    let uuid = effective_uuid(vm)?;
    let mut extra_args = Vec::new();
    let boot = if let Some(k) = &vm.spec.boot.kernel {
        Boot::Kernel {
            kernel: PathBuf::from(&k.kernel),
            initrd: k.initrd.as_ref().map(PathBuf::from),
            cmdline: k.cmdline.clone(),
        }
    } else if let Some(m) = &vm.spec.boot.memtest {
        let dir = state_dir.join("kernels");
        std::fs::create_dir_all(&dir).map_err(|source| MachineError::Kernel {
            dir: dir.clone(),
            source,
        })?;
        let kernel =
            guest::install_kernel(&dir).map_err(|source| MachineError::Kernel { dir, source })?;
        let config = GuestConfig {
            fill_mib: m.fill_mib,
            rate: DirtyRate::from(m.dirty_rate_mib),
        };
        extra_args.extend([
            "-device".to_string(),
            format!(
                "isa-debug-exit,iobase={:#x},iosize=0x04",
                guest::DEBUG_EXIT_IOBASE
            ),
        ]);
        Boot::Kernel {
            kernel,
            initrd: None,
            cmdline: Some(config.append()),
        }
    } else if vm.spec.boot.disk.is_some() {
        Boot::Disk
    } else {
        return Err(MachineError::Invalid {
            field: "spec.boot",
            message: "no boot source".into(),
        });
    };
    let mut disks: Vec<DiskSpec> = vm
        .spec
        .disks
        .iter()
        .map(|d| DiskSpec {
            path: PathBuf::from(&d.path),
            format: if d.path.ends_with(".qcow2") {
                "qcow2".into()
            } else {
                "raw".into()
            },
            cache: match d.cache {
                DiskCache::None => CacheMode::None,
                DiskCache::Writeback => CacheMode::Writeback,
                DiskCache::Writethrough => CacheMode::Writethrough,
                DiskCache::Directsync => CacheMode::Directsync,
                DiskCache::Unsafe => CacheMode::Unsafe,
            },
        })
        .collect();
    if let Some(boot_disk) = &vm.spec.boot.disk {
        // The boot disk goes first.
        let index = vm
            .spec
            .disks
            .iter()
            .position(|d| &d.name == boot_disk)
            .ok_or(MachineError::Invalid {
                field: "spec.boot.disk",
                message: format!("no disk named {boot_disk:?} in spec.disks"),
            })?;
        let first = disks.remove(index);
        disks.insert(0, first);
    }
    let nics = vm
        .spec
        .networks
        .iter()
        .map(|n| NicSpec {
            mac: effective_mac(&uuid, &n.name, n.mac.as_deref()),
            tap: None,
        })
        .collect();
    let mut spec = MachineSpec::new(name, memory_mib, boot);
    spec.uuid = uuid;
    spec.cpus = vm.spec.cpus;
    spec.disks = disks;
    spec.nics = nics;
    spec.extra_args = extra_args;
    spec.validate().map_err(|e| MachineError::Invalid {
        field: "spec",
        message: e.to_string(),
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VirtualMachineSpec;

    fn vm(yaml: &str) -> VirtualMachine {
        let spec: VirtualMachineSpec = serde_yaml::from_str(yaml).unwrap();
        let mut vm = VirtualMachine::new("vm-1", spec);
        vm.metadata.namespace = Some("default".into());
        vm.metadata.uid = Some("3f1c1d4e-0000-4000-8000-000000000001".into());
        vm
    }

    #[test]
    fn the_uuid_defaults_to_the_object_uid_and_macs_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let v = vm(
            "{memory: 64Mi, boot: {memtest: {fillMib: 32}}, networks: [{name: default}, {name: storage, mac: '52:54:00:AA:BB:CC'}]}",
        );
        let a = machine_spec(&v, dir.path()).unwrap();
        let b = machine_spec(&v, dir.path()).unwrap();
        assert_eq!(a, b, "source and target must compute the same machine");
        assert_eq!(a.uuid.to_string(), "3f1c1d4e-0000-4000-8000-000000000001");
        assert_eq!(a.name, "default.vm-1");
        assert_eq!(a.nics[1].mac, "52:54:00:aa:bb:cc");
        assert!(a.nics[0].mac.starts_with("52:54:00:"));
        assert_ne!(a.nics[0].mac, effective_mac(&a.uuid, "other", None));
        match &a.boot {
            Boot::Kernel {
                kernel, cmdline, ..
            } => {
                assert!(kernel.exists());
                assert_eq!(cmdline.as_deref(), Some("fill=32 rate=0"));
            }
            other => panic!("memtest boots a kernel, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_boot_disk_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let v = vm("{memory: 64Mi, boot: {disk: root}, disks: [{name: data, path: /x.img}]}");
        let err = machine_spec(&v, dir.path()).unwrap_err();
        assert!(err.to_string().starts_with("spec.boot.disk:"), "{err}");
    }
}
