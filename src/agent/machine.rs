//! A VM's machine definition and the QEMU command line it becomes.
//!
//! The definition is the VM's identity (name, UUID, MACs) and shape
//! (memory, vCPUs, boot, disks, NICs). Source and target of a migration
//! build their command lines from the same definition, so their device and
//! RAM block lists match; the target only adds `-incoming defer`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::qemu::{QemuError, VmDir};

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Optional initrd.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: Option<String>,
    },
    /// Firmware boot from the first disk.
    Disk,
}

/// Host page-cache mode of a disk (QEMU `cache=`). Live migration needs a
/// mode without host caching of shared storage (`none` or `directsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum CacheMode {
    /// O_DIRECT, no host cache: safe for migration on shared storage.
    #[default]
    None,
    /// Host cache, write-back.
    Writeback,
    /// Host cache, write-through.
    Writethrough,
    /// O_DIRECT and O_DSYNC.
    Directsync,
    /// No flushes at all (tests only).
    Unsafe,
}

impl CacheMode {
    fn as_qemu(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

/// A disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// Image path (on shared storage for live migration).
    pub path: PathBuf,
    /// Image format (`raw`, `qcow2`).
    pub format: String,
    /// Cache mode.
    pub cache: CacheMode,
}

/// A network interface of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicSpec {
    /// MAC address `xx:xx:xx:xx:xx:xx`, kept across migrations.
    pub mac: String,
    /// Existing tap device to attach to; `None` uses QEMU's user network.
    pub tap: Option<String>,
}

/// Everything that defines a VM's QEMU (identical on source and target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// VM name (also the state directory name); `[a-z0-9.-]`, ≤ 63 chars.
    pub name: String,
    /// SMBIOS UUID, kept across migrations.
    pub uuid: Uuid,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// QEMU machine type (the same on both sides of a migration).
    pub machine_type: String,
    /// How the guest boots.
    pub boot: Boot,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// NICs.
    pub nics: Vec<NicSpec>,
    /// Extra QEMU arguments appended verbatim (e.g. the test guest's devices).
    pub extra_args: Vec<String>,
}

impl MachineSpec {
    /// A spec with defaults for everything but identity and size.
    pub fn new(name: impl Into<String>, memory_mib: u32, boot: Boot) -> MachineSpec {
        MachineSpec {
            name: name.into(),
            uuid: Uuid::new_v4(),
            memory_mib,
            cpus: 1,
            machine_type: "pc".into(),
            boot,
            disks: Vec::new(),
            nics: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// Checks what QEMU would otherwise reject late or misread.
    pub fn validate(&self) -> Result<(), QemuError> {
        let bad = |m: String| Err(QemuError::InvalidSpec(m));
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return bad(format!("name {:?} is not a DNS label", self.name));
        }
        if self.memory_mib < 16 {
            return bad(format!("memory {} MiB is below 16 MiB", self.memory_mib));
        }
        if self.cpus == 0 {
            return bad("cpus must be at least 1".into());
        }
        if self.boot == Boot::Disk && self.disks.is_empty() {
            return bad("disk boot without a disk".into());
        }
        for nic in &self.nics {
            let parts: Vec<&str> = nic.mac.split(':').collect();
            if parts.len() != 6
                || !parts
                    .iter()
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return bad(format!("MAC address {:?} is malformed", nic.mac));
            }
        }
        for d in &self.disks {
            if d.path.to_string_lossy().contains(',') {
                return bad(format!("disk path {} contains a comma", d.path.display()));
            }
        }
        Ok(())
    }

    /// The QEMU command line (without the binary) for this VM in `dir`;
    /// `incoming` adds `-incoming defer` for a migration target. `tap_fds`
    /// has, for each NIC with a tap, the descriptor the agent opened for it
    /// and QEMU inherits (`-netdev tap,fd=N`); a tap NIC without one has
    /// QEMU open the tap by name.
    pub fn argv(&self, dir: &VmDir, incoming: bool, tap_fds: &[(usize, i32)]) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        let path = |p: &Path| p.to_string_lossy().into_owned();
        push(&["-accel", "tcg", "-nodefaults", "-nographic"]);
        push(&["-machine", &self.machine_type]);
        push(&[
            "-name",
            &format!("{},process=ferry-{},debug-threads=on", self.name, self.name),
        ]);
        push(&["-uuid", &self.uuid.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-pidfile", &path(&dir.pid_file())]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp,path={},server=on,wait=off",
                path(&dir.qmp_socket())
            ),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=serial0,path={},server=on,wait=off",
                path(&dir.serial_socket())
            ),
            "-serial",
            "chardev:serial0",
        ]);
        if let Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            push(&["-kernel", &path(kernel)]);
            if let Some(i) = initrd {
                push(&["-initrd", &path(i)]);
            }
            if let Some(c) = cmdline {
                push(&["-append", c]);
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            push(&[
                "-drive",
                &format!(
                    "file={},format={},if=virtio,cache={},id=disk{i}",
                    path(&d.path),
                    d.format,
                    d.cache.as_qemu()
                ),
            ]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let fd = tap_fds.iter().find(|(nic, _)| *nic == i).map(|(_, fd)| fd);
            let backend = match (&n.tap, fd) {
                (Some(_), Some(fd)) => format!("tap,id=net{i},fd={fd}"),
                (Some(tap), None) => format!("tap,id=net{i},ifname={tap},script=no,downscript=no"),
                (None, _) => format!("user,id=net{i}"),
            };
            push(&["-netdev", &backend]);
            push(&[
                "-device",
                &format!("virtio-net-pci,netdev=net{i},mac={}", n.mac),
            ]);
        }
        if incoming {
            push(&["-incoming", "defer"]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        let mut s = MachineSpec::new(
            "web-1",
            128,
            Boot::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: Some("fill=8".into()),
            },
        );
        s.nics.push(NicSpec {
            mac: "52:54:00:12:34:56".into(),
            tap: None,
        });
        s
    }

    #[test]
    fn argv_carries_identity_sockets_and_tcg() {
        let s = spec();
        let dir = VmDir::new(Path::new("/state"), &s.name);
        let a = s.argv(&dir, false, &[]).join(" ");
        for want in [
            "-accel tcg",
            "-nodefaults -nographic",
            &format!("-uuid {}", s.uuid),
            "-name web-1,process=ferry-web-1,debug-threads=on",
            "-m 128M",
            "-pidfile /state/vms/web-1/qemu.pid",
            "socket,id=qmp,path=/state/vms/web-1/qmp.sock,server=on,wait=off",
            "-kernel /k -append fill=8",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
        ] {
            assert!(a.contains(want), "{want:?} missing from {a}");
        }
        assert!(!a.contains("-incoming"));
        assert!(
            s.argv(&dir, true, &[])
                .join(" ")
                .contains("-incoming defer")
        );
    }

    #[test]
    fn a_tap_is_inherited_when_the_agent_opened_it() {
        let mut s = spec();
        s.nics[0].tap = Some("fy0000abcdn0".into());
        s.nics.push(NicSpec {
            mac: "52:54:00:12:34:57".into(),
            tap: Some("fy0000abcdn1".into()),
        });
        let dir = VmDir::new(Path::new("/state"), &s.name);
        let a = s.argv(&dir, false, &[(0, 7)]).join(" ");
        assert!(a.contains("-netdev tap,id=net0,fd=7 "), "{a}");
        assert!(
            a.contains("-netdev tap,id=net1,ifname=fy0000abcdn1,script=no,downscript=no"),
            "{a}"
        );
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let mut s = spec();
        s.validate().unwrap();
        s.nics[0].mac = "52:54:00:12:34".into();
        assert!(s.validate().unwrap_err().to_string().contains("MAC"));
        let mut s = spec();
        s.name = "Bad_Name".into();
        assert!(s.validate().unwrap_err().to_string().contains("DNS label"));
        let mut s = spec();
        s.boot = Boot::Disk;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("without a disk")
        );
    }
}
