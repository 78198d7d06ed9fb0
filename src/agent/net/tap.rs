//! Tap devices: one per VM NIC, named from the VM, on the mapped bridge.
//!
//! All changes go through `ip` (iproute2) in the caller's network
//! namespace; each call takes a few milliseconds, so async callers run them
//! inline.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use crate::agent::qemu::MachineSpec;

/// Every tap Ferry creates starts with this, so [`sweep_taps`] never
/// touches anyone else's devices.
pub const TAP_PREFIX: &str = "fy";

/// Why a host network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A `--network` entry is not `NAME=BRIDGE`.
    #[error("network mapping {0:?} is not NAME=BRIDGE")]
    BadMapping(String),
    /// The bridge a network maps to does not exist on this host.
    #[error("bridge {bridge} (network {network}) does not exist on this host")]
    BridgeMissing {
        /// The network name.
        network: String,
        /// The bridge.
        bridge: String,
    },
    /// `ip` could not be run.
    #[error("running ip {args}")]
    Spawn {
        /// The arguments.
        args: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("ip {args}: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What `ip` said.
        stderr: String,
    },
    /// Opening or using a tap's file failed.
    #[error("tap {tap}: {what}")]
    Tap {
        /// The tap.
        tap: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl NetError {
    /// Stable reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            NetError::BadMapping(_) => "BadNetworkMapping",
            NetError::BridgeMissing { .. } => "BridgeMissing",
            NetError::Spawn { .. } | NetError::Ip { .. } | NetError::Tap { .. } => "TapSetupFailed",
        }
    }
}

/// Which bridge each network name maps to on this host (agent
/// configuration: `--network default=br-ferry`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeMap(BTreeMap<String, String>);

impl BridgeMap {
    /// Parses `NAME=BRIDGE` entries; a later entry for a name wins.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<BridgeMap, NetError> {
        let mut map = BTreeMap::new();
        for entry in entries {
            let entry = entry.as_ref();
            let (name, bridge) = entry
                .split_once('=')
                .filter(|(n, b)| !n.is_empty() && valid_ifname(b))
                .ok_or_else(|| NetError::BadMapping(entry.to_string()))?;
            map.insert(name.to_string(), bridge.to_string());
        }
        Ok(BridgeMap(map))
    }

    /// The bridge of `network`, if mapped.
    pub fn bridge(&self, network: &str) -> Option<&str> {
        self.0.get(network).map(String::as_str)
    }

    /// True when no network is mapped (every NIC uses user networking).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Linux interface names: 1–15 bytes, no `/`, whitespace or `:`.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The tap of NIC `nic` of the VM with local name `vm`: `fy` + 8 hex digits
/// of a hash of the name + `n<nic>` (≤ 15 bytes for up to 1000 NICs). The
/// same on every host, so a migration's source and target agree.
pub fn tap_name(vm: &str, nic: usize) -> String {
    let hash = vm.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{TAP_PREFIX}{hash:08x}n{nic}")
}

/// Points the NICs of `spec` whose network (`networks[i]` names NIC `i`) is
/// mapped in `bridges` at their taps; returns `(tap, bridge)` for each, to
/// be created with [`ensure_tap`] before QEMU starts. Unmapped NICs keep
/// user networking.
pub fn attach_taps(
    spec: &mut MachineSpec,
    networks: &[String],
    bridges: &BridgeMap,
) -> Vec<(String, String)> {
    let mut wanted = Vec::new();
    for (i, (nic, network)) in spec.nics.iter_mut().zip(networks).enumerate() {
        if let Some(bridge) = bridges.bridge(network) {
            let tap = tap_name(&spec.name, i);
            nic.tap = Some(tap.clone());
            wanted.push((tap, bridge.to_string()));
        }
    }
    wanted
}

/// [`attach_taps`], then [`ensure_tap`] for each: what an agent does before
/// starting a VM's QEMU (plain start or migration target).
pub fn prepare_taps(
    spec: &mut MachineSpec,
    networks: &[String],
    bridges: &BridgeMap,
) -> Result<(), NetError> {
    for (tap, bridge) in attach_taps(spec, networks, bridges) {
        // For the error message only: a network mapped to this bridge.
        let network = networks
            .iter()
            .find(|n| bridges.bridge(n) == Some(bridge.as_str()))
            .map(String::as_str)
            .unwrap_or_default();
        ensure_tap(&tap, &bridge, network)?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Ip {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all links in this network namespace (`ip -o link show`).
fn links() -> Result<Vec<String>, NetError> {
    let out = ip(&["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

/// Creates tap `tap` (unless it exists, e.g. left by a QEMU that was
/// adopted) and puts it up on `bridge`. `network` names the mapping in
/// errors.
pub fn ensure_tap(tap: &str, bridge: &str, network: &str) -> Result<(), NetError> {
    let present = links()?;
    if !present.iter().any(|l| l == bridge) {
        return Err(NetError::BridgeMissing {
            network: network.to_string(),
            bridge: bridge.to_string(),
        });
    }
    if !present.iter().any(|l| l == tap) {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    ip(&["link", "set", "dev", tap, "master", bridge, "up"])?;
    Ok(())
}

/// Removes tap `tap`; a tap that is already gone is fine.
pub fn delete_tap(tap: &str) -> Result<(), NetError> {
    if links()?.iter().any(|l| l == tap) {
        ip(&["link", "del", "dev", tap])?;
    }
    Ok(())
}

/// Ferry's taps in this network namespace.
pub fn list_taps() -> Result<Vec<String>, NetError> {
    Ok(links()?
        .into_iter()
        .filter(|l| l.starts_with(TAP_PREFIX))
        .collect())
}

/// Removes every Ferry tap not in `keep` (the taps of QEMUs alive here and
/// of migrations preparing a target); returns what it removed. Run on each
/// agent pass, it also cleans up after a source QEMU quit at switchover, a
/// stopped VM or a crash.
pub fn sweep_taps(keep: &BTreeSet<String>) -> Result<Vec<String>, NetError> {
    let mut removed = Vec::new();
    for tap in list_taps()? {
        if !keep.contains(&tap) {
            delete_tap(&tap)?;
            removed.push(tap);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::qemu::{Boot, NicSpec};

    #[test]
    fn tap_names_are_short_stable_and_distinct() {
        let a = tap_name("default.web-1", 0);
        assert_eq!(a, tap_name("default.web-1", 0));
        assert!(a.len() <= 15 && a.starts_with(TAP_PREFIX), "{a}");
        assert!(tap_name("default.web-1", 999).len() <= 15);
        assert_ne!(a, tap_name("default.web-1", 1));
        assert_ne!(a, tap_name("default.web-2", 0));
    }

    #[test]
    fn mappings_parse_and_reject_what_is_not_a_bridge() {
        let m = BridgeMap::parse(&["default=br-ferry", "storage=br1"]).unwrap();
        assert_eq!(m.bridge("default"), Some("br-ferry"));
        assert_eq!(m.bridge("other"), None);
        for bad in [
            "default",
            "=br0",
            "x=",
            "x=a-very-long-bridge-name",
            "x=a b",
        ] {
            assert!(
                matches!(BridgeMap::parse(&[bad]), Err(NetError::BadMapping(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_mapped_networks_get_a_tap() {
        let mut spec = MachineSpec::new("default.vm", 64, Boot::Disk);
        for mac in ["52:54:00:00:00:01", "52:54:00:00:00:02"] {
            spec.nics.push(NicSpec {
                mac: mac.into(),
                tap: None,
            });
        }
        let bridges = BridgeMap::parse(&["default=br-ferry"]).unwrap();
        let wanted = attach_taps(&mut spec, &["default".into(), "other".into()], &bridges);
        let tap = tap_name("default.vm", 0);
        assert_eq!(wanted, vec![(tap.clone(), "br-ferry".to_string())]);
        assert_eq!(spec.nics[0].tap.as_deref(), Some(tap.as_str()));
        assert_eq!(spec.nics[1].tap, None);
    }
}
