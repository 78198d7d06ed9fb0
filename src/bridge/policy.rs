//! `MigrationPolicy` objects onto the core's policy model.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::ResourceExt;

use crate::api::MigrationPolicy;
use crate::api::policy::{
    BandwidthMode, ConvergenceMode, MigrationPolicySpec, ResiliencePolicy, SchedulingPolicy,
};
use crate::core::policy::{
    self as core_policy, EffectivePolicy, LabelSelector, PolicyCandidate, PolicyError,
    PolicyOverrides, PolicySource, Requirement, Selection, SelectorOp,
};

/// The overrides a policy object writes (every field the API defaulted is
/// present, so in practice nothing is left to the core's defaults but the
/// balancing guards the API does not expose).
pub fn overrides(spec: &MigrationPolicySpec) -> PolicyOverrides {
    let s = &spec.scheduling;
    PolicyOverrides {
        convergence: Some(match spec.convergence.mode {
            ConvergenceMode::MinimalDowntime => core_policy::ConvergenceMode::MinimalDowntime,
            ConvergenceMode::PostCopy => core_policy::ConvergenceMode::PostCopy,
            ConvergenceMode::SuspendWorkloadIfNeeded => {
                core_policy::ConvergenceMode::SuspendWorkloadIfNeeded
            }
            ConvergenceMode::Legacy => core_policy::ConvergenceMode::Legacy,
        }),
        downtime_limit: Some(spec.convergence.downtime_limit.get()),
        completion_timeout_per_gib: Some(spec.convergence.completion_timeout_per_gib.get()),
        progress_timeout: Some(spec.convergence.progress_timeout.get()),
        bandwidth: Some(match (spec.bandwidth.mode, &spec.bandwidth.limit) {
            (BandwidthMode::Custom, Some(limit)) => core_policy::Bandwidth::Custom {
                bytes_per_sec: limit.bytes_per_second(),
            },
            (BandwidthMode::HypervisorDefault, _) => core_policy::Bandwidth::HypervisorDefault,
            // The schema requires a limit with Custom; Auto otherwise.
            (BandwidthMode::Auto | BandwidthMode::Custom, _) => core_policy::Bandwidth::Auto,
        }),
        parallel_migrations_per_cluster: Some(spec.limits.parallel_migrations_per_cluster),
        parallel_outbound_per_host: Some(spec.limits.parallel_outbound_per_host),
        parallel_inbound_per_host: Some(spec.limits.parallel_inbound_per_host),
        scheduling_policy: Some(match s.policy {
            SchedulingPolicy::None => core_policy::SchedulingPolicyKind::None,
            SchedulingPolicy::EvenlyDistributed => {
                core_policy::SchedulingPolicyKind::EvenlyDistributed
            }
            SchedulingPolicy::PowerSaving => core_policy::SchedulingPolicyKind::PowerSaving,
            SchedulingPolicy::VmEvenlyDistributed => {
                core_policy::SchedulingPolicyKind::VmEvenlyDistributed
            }
            SchedulingPolicy::InClusterUpgrade => {
                core_policy::SchedulingPolicyKind::InClusterUpgrade
            }
        }),
        high_utilization: Some(s.high_utilization),
        low_utilization: Some(s.low_utilization),
        over_commit_duration: Some(s.over_commit_duration.get()),
        high_vm_count: Some(s.high_vm_count),
        migration_threshold: Some(s.migration_threshold),
        spm_vm_grace: Some(s.spm_vm_grace),
        max_free_memory_for_over_utilized: s
            .max_free_memory_for_over_utilized
            .as_ref()
            .map(|q| q.bytes()),
        min_free_memory_for_under_utilized: s
            .min_free_memory_for_under_utilized
            .as_ref()
            .map(|q| q.bytes()),
        balancing_enabled: Some(s.balancing.enabled),
        balancing_interval: Some(s.balancing.interval.get()),
        resilience: Some(match spec.resilience.policy {
            ResiliencePolicy::MigrateAll => core_policy::ResiliencePolicy::MigrateAll,
            ResiliencePolicy::MigrateHighlyAvailableOnly => {
                core_policy::ResiliencePolicy::MigrateHighlyAvailableOnly
            }
            ResiliencePolicy::DoNotMigrate => core_policy::ResiliencePolicy::DoNotMigrate,
        }),
        fence_after: Some(spec.resilience.fence_after.get()),
        evacuate_after: Some(spec.resilience.evacuate_after.get()),
        allow_unsafe: Some(spec.allow_unsafe),
        ..PolicyOverrides::default()
    }
}

/// A Kubernetes label selector as the core's plain selector.
pub fn selector(s: Option<&meta::LabelSelector>) -> LabelSelector {
    let Some(s) = s else {
        return LabelSelector::default();
    };
    LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|e| Requirement {
                key: e.key.clone(),
                op: match e.operator.as_str() {
                    "In" => SelectorOp::In,
                    "NotIn" => SelectorOp::NotIn,
                    "Exists" => SelectorOp::Exists,
                    // The API server only admits the four operators.
                    _ => SelectorOp::DoesNotExist,
                },
                values: e.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// The policy that applies to a VM (by the rule of `core::policy::select`)
/// and its effective settings.
pub fn resolve(
    policies: &[MigrationPolicy],
    explicit: Option<&str>,
    vm_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<(Selection, EffectivePolicy), PolicyError> {
    let candidates: Vec<PolicyCandidate> = policies
        .iter()
        .map(|p| PolicyCandidate {
            name: p.name_any(),
            selector: selector(p.spec.selector.as_ref()),
            namespace_selector: selector(p.spec.namespace_selector.as_ref()),
        })
        .collect();
    let selection = core_policy::select(explicit, &candidates, vm_labels, namespace_labels);
    let effective = match selection
        .name()
        .and_then(|name| policies.iter().find(|p| p.name_any() == name))
    {
        Some(p) => {
            EffectivePolicy::resolve(PolicySource::Named(p.name_any()), &overrides(&p.spec))?
        }
        None => EffectivePolicy::default(),
    };
    Ok((selection, effective))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, yaml: &str) -> MigrationPolicy {
        MigrationPolicy::new(name, serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn an_empty_policy_resolves_to_the_api_defaults() {
        let p = policy("default", "{}");
        let effective =
            EffectivePolicy::resolve(PolicySource::Named("default".into()), &overrides(&p.spec))
                .unwrap();
        assert_eq!(
            effective.convergence.downtime_limit,
            std::time::Duration::from_millis(300)
        );
        assert_eq!(effective.limits.per_cluster, 5);
        assert!(effective.resilience.fence_after < effective.resilience.evacuate_after);
    }

    #[test]
    fn the_most_specific_matching_policy_wins() {
        let policies = [
            policy("everyone", "{}"),
            policy(
                "databases",
                "{selector: {matchLabels: {tier: database}}, convergence: {mode: PostCopy}}",
            ),
        ];
        let labels: BTreeMap<String, String> =
            [("tier".to_string(), "database".to_string())].into();
        let (selection, effective) = resolve(&policies, None, &labels, &BTreeMap::new()).unwrap();
        assert_eq!(selection.name(), Some("databases"));
        assert_eq!(
            effective.convergence.mode,
            core_policy::ConvergenceMode::PostCopy
        );
        let (selection, _) = resolve(&policies, None, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert_eq!(selection.name(), Some("everyone"));
    }

    #[test]
    fn a_custom_bandwidth_carries_its_limit() {
        let p = policy("capped", "{bandwidth: {mode: Custom, limit: 100Mi}}");
        assert_eq!(
            overrides(&p.spec).bandwidth,
            Some(core_policy::Bandwidth::Custom {
                bytes_per_sec: 100 << 20
            })
        );
    }
}
