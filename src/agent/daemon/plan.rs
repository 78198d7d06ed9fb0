//! What the agent should do with the VMs of its host: a pure function from
//! what the API wants and what runs here to a list of actions.
//!
//! ```text
//!   desired (VMs whose status.host is this host)   running (QEMUs here)
//!                         \                          /
//!                          plan(desired, running, reserved)
//!                                       |
//!                 Start / Stop(reason) / Report, in that order:
//!                 stops first, so a VM evacuated while this host was cut
//!                 off is stopped before anything else happens.
//! ```
//!
//! `reserved` names the QEMUs a migration owns on this host (an incoming
//! target before switchover, a source being sent): the plan leaves them to
//! the migration.

use std::collections::{BTreeMap, BTreeSet};

/// A VM the API places on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVm {
    /// Local name (`<namespace>.<name>`, see [`local_name`]).
    pub name: String,
    /// Whether it should run (`runStrategy: Running`).
    pub run: bool,
}

/// Why a QEMU is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The API places the VM on another host, or the VM no longer exists:
    /// it was moved or evacuated, and must never run twice.
    NotOnThisHost,
    /// The VM's run strategy is `Stopped`.
    RunStrategyStopped,
}

impl StopReason {
    /// A stable reason string for logs and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::NotOnThisHost => "NotOnThisHost",
            StopReason::RunStrategyStopped => "RunStrategyStopped",
        }
    }
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmAction {
    /// Stop this QEMU.
    Stop {
        /// Local name.
        name: String,
        /// Why.
        reason: StopReason,
    },
    /// Start this VM.
    Start {
        /// Local name.
        name: String,
    },
}

/// The actions that bring this host to what the API wants. Stops come first.
pub fn plan(
    desired: &[DesiredVm],
    running: &BTreeSet<String>,
    reserved: &BTreeSet<String>,
) -> Vec<VmAction> {
    let wanted: BTreeMap<&str, bool> = desired.iter().map(|d| (d.name.as_str(), d.run)).collect();
    let mut actions = Vec::new();
    for name in running.difference(reserved) {
        match wanted.get(name.as_str()) {
            None => actions.push(VmAction::Stop {
                name: name.clone(),
                reason: StopReason::NotOnThisHost,
            }),
            Some(false) => actions.push(VmAction::Stop {
                name: name.clone(),
                reason: StopReason::RunStrategyStopped,
            }),
            Some(true) => {}
        }
    }
    for d in desired {
        if d.run && !running.contains(&d.name) && !reserved.contains(&d.name) {
            actions.push(VmAction::Start {
                name: d.name.clone(),
            });
        }
    }
    actions
}

/// The local (state directory) name of a VM: `<namespace>.<name>`, or a
/// shortened form with a hash when that exceeds 63 characters.
pub fn local_name(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}.{name}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut prefix: String = full.chars().take(46).collect();
    while prefix.ends_with('.') || prefix.ends_with('-') {
        prefix.pop();
    }
    format!("{prefix}-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn want(name: &str, run: bool) -> DesiredVm {
        DesiredVm {
            name: name.into(),
            run,
        }
    }

    #[test]
    fn a_vm_placed_here_and_not_running_is_started() {
        assert_eq!(
            plan(&[want("a", true)], &set(&[]), &set(&[])),
            vec![VmAction::Start { name: "a".into() }]
        );
    }

    #[test]
    fn a_vm_placed_elsewhere_is_stopped_first() {
        let actions = plan(&[want("b", true)], &set(&["a"]), &set(&[]));
        assert_eq!(
            actions,
            vec![
                VmAction::Stop {
                    name: "a".into(),
                    reason: StopReason::NotOnThisHost
                },
                VmAction::Start { name: "b".into() }
            ]
        );
    }

    #[test]
    fn a_stopped_run_strategy_stops_the_vm() {
        assert_eq!(
            plan(&[want("a", false)], &set(&["a"]), &set(&[])),
            vec![VmAction::Stop {
                name: "a".into(),
                reason: StopReason::RunStrategyStopped
            }]
        );
    }

    #[test]
    fn reserved_qemus_are_left_to_their_migration() {
        // An incoming target: the API still places the VM on the source.
        assert_eq!(plan(&[], &set(&["a"]), &set(&["a"])), vec![]);
        // A reserved name is not started by the plan either.
        assert_eq!(plan(&[want("a", true)], &set(&[]), &set(&["a"])), vec![]);
    }

    #[test]
    fn local_names_are_short_and_distinct() {
        assert_eq!(local_name("default", "vm-1"), "default.vm-1");
        let long_a = local_name("default", &"a".repeat(100));
        let long_b = local_name("default", &format!("{}b", "a".repeat(99)));
        assert!(long_a.len() <= 63 && long_b.len() <= 63);
        assert_ne!(long_a, long_b);
    }

    proptest! {
        #[test]
        fn after_the_plan_exactly_the_wanted_vms_run(
            desired in proptest::collection::btree_map("[a-e]", any::<bool>(), 0..5),
            running in proptest::collection::btree_set("[a-e]", 0..5),
            reserved in proptest::collection::btree_set("[a-e]", 0..2),
        ) {
            let desired: Vec<DesiredVm> = desired.into_iter().map(|(name, run)| DesiredVm { name, run }).collect();
            let mut now = running.clone();
            let actions = plan(&desired, &running, &reserved);
            let first_start = actions.iter().position(|a| matches!(a, VmAction::Start { .. })).unwrap_or(actions.len());
            prop_assert!(actions[first_start..].iter().all(|a| matches!(a, VmAction::Start { .. })), "stops come first");
            for a in &actions {
                match a {
                    VmAction::Stop { name, .. } => { prop_assert!(!reserved.contains(name)); now.remove(name); }
                    VmAction::Start { name } => { prop_assert!(!reserved.contains(name)); now.insert(name.clone()); }
                }
            }
            for name in now.difference(&reserved) {
                prop_assert!(desired.iter().any(|d| &d.name == name && d.run), "{} runs but is not wanted", name);
            }
            for d in desired.iter().filter(|d| d.run && !reserved.contains(&d.name)) {
                prop_assert!(now.contains(&d.name), "{} is wanted but not running", d.name);
            }
        }
    }
}
