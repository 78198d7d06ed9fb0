use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

fn cand(name: &str, vm: &[(&str, &str)], ns: &[(&str, &str)]) -> PolicyCandidate {
    PolicyCandidate {
        name: name.into(),
        selector: sel(vm),
        namespace_selector: sel(ns),
    }
}

#[test]
fn defaults_come_from_ovirt_kubevirt_and_nova() {
    let p = EffectivePolicy::default();
    assert_eq!(p.source, PolicySource::Defaults);
    assert_eq!(p.convergence.mode, ConvergenceMode::MinimalDowntime);
    assert_eq!(p.convergence.downtime_limit, Duration::from_millis(300));
    assert_eq!(
        p.convergence.completion_timeout_per_gib,
        Duration::from_secs(150)
    );
    assert_eq!(p.convergence.progress_timeout, Duration::from_secs(150));
    assert_eq!(p.bandwidth, Bandwidth::Auto);
    assert_eq!(
        p.limits,
        Limits {
            per_cluster: 5,
            outbound_per_host: 2,
            inbound_per_host: 2
        }
    );
    let s = p.scheduling;
    assert_eq!(s.policy, SchedulingPolicyKind::None);
    assert_eq!((s.high_utilization, s.low_utilization), (80, 20));
    assert_eq!(s.over_commit_duration, Duration::from_secs(120));
    assert_eq!(
        (s.high_vm_count, s.migration_threshold, s.spm_vm_grace),
        (10, 5, 5)
    );
    assert!(!s.balancing.enabled, "balancing is opt-in");
    assert!(p.resilience.evacuate_after > p.resilience.fence_after);
    assert_eq!(p.resilience.policy, ResiliencePolicy::MigrateAll);
    assert!(!p.allow_unsafe);
}

#[test]
fn overrides_replace_only_the_fields_they_set() {
    let o = PolicyOverrides {
        convergence: Some(ConvergenceMode::PostCopy),
        parallel_outbound_per_host: Some(4),
        high_utilization: Some(70),
        balancing_enabled: Some(true),
        ..Default::default()
    };
    let p = EffectivePolicy::resolve(PolicySource::Named("gold".into()), &o).unwrap();
    assert_eq!(p.source, PolicySource::Named("gold".into()));
    assert_eq!(p.convergence.mode, ConvergenceMode::PostCopy);
    assert_eq!(p.convergence.downtime_limit, defaults::DOWNTIME_LIMIT);
    assert_eq!(p.limits.outbound_per_host, 4);
    assert_eq!(
        p.limits.inbound_per_host,
        defaults::PARALLEL_INBOUND_PER_HOST
    );
    assert_eq!(p.scheduling.high_utilization, 70);
    assert!(p.scheduling.balancing.enabled);
}

#[test]
fn invalid_overrides_are_refused_naming_the_field() {
    let cases: Vec<(PolicyOverrides, &str)> = vec![
        (
            PolicyOverrides {
                high_utilization: Some(101),
                ..Default::default()
            },
            "PercentOutOfRange",
        ),
        (
            PolicyOverrides {
                low_utilization: Some(80),
                high_utilization: Some(80),
                ..Default::default()
            },
            "LowUtilizationNotBelowHigh",
        ),
        (
            PolicyOverrides {
                parallel_inbound_per_host: Some(0),
                ..Default::default()
            },
            "ZeroValue",
        ),
        (
            PolicyOverrides {
                high_vm_count: Some(0),
                ..Default::default()
            },
            "ZeroValue",
        ),
        (
            PolicyOverrides {
                progress_timeout: Some(Duration::ZERO),
                ..Default::default()
            },
            "ZeroValue",
        ),
        (
            PolicyOverrides {
                bandwidth: Some(Bandwidth::Custom { bytes_per_sec: 0 }),
                ..Default::default()
            },
            "ZeroValue",
        ),
        (
            PolicyOverrides {
                fence_after: Some(Duration::from_secs(60)),
                evacuate_after: Some(Duration::from_secs(60)),
                ..Default::default()
            },
            "EvacuateNotAfterFence",
        ),
        (
            PolicyOverrides {
                improvement_margin: Some(f64::NAN),
                ..Default::default()
            },
            "BadImprovementMargin",
        ),
    ];
    for (o, reason) in cases {
        let err = EffectivePolicy::resolve(PolicySource::Defaults, &o).unwrap_err();
        assert_eq!(err.reason(), reason, "{o:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn error_messages_name_the_field() {
    let o = PolicyOverrides {
        parallel_inbound_per_host: Some(0),
        ..Default::default()
    };
    let err = EffectivePolicy::resolve(PolicySource::Defaults, &o).unwrap_err();
    assert!(err.to_string().contains("parallelInboundPerHost"), "{err}");
}

#[test]
fn selector_operators_follow_kubernetes_semantics() {
    let l = labels(&[("tier", "db"), ("zone", "a")]);
    let req = |key: &str, op, values: &[&str]| LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![Requirement {
            key: key.into(),
            op,
            values: values.iter().map(|s| s.to_string()).collect(),
        }],
    };
    let table = [
        (req("tier", SelectorOp::In, &["db", "web"]), true),
        (req("tier", SelectorOp::In, &["web"]), false),
        (req("tier", SelectorOp::NotIn, &["web"]), true),
        (req("missing", SelectorOp::NotIn, &["x"]), true),
        (req("tier", SelectorOp::NotIn, &["db"]), false),
        (req("zone", SelectorOp::Exists, &[]), true),
        (req("missing", SelectorOp::Exists, &[]), false),
        (req("missing", SelectorOp::DoesNotExist, &[]), true),
        (req("zone", SelectorOp::DoesNotExist, &[]), false),
        (LabelSelector::default(), true),
        (sel(&[("tier", "db"), ("zone", "b")]), false),
    ];
    for (s, want) in table {
        assert_eq!(s.matches(&l), want, "{s:?}");
    }
}

#[test]
fn explicit_policy_wins_even_when_its_selector_does_not_match() {
    let c = vec![cand("gold", &[("tier", "db")], &[]), cand("any", &[], &[])];
    let s = select(
        Some("gold"),
        &c,
        &labels(&[("tier", "web")]),
        &BTreeMap::new(),
    );
    assert_eq!(
        s,
        Selection::Explicit {
            name: "gold".into()
        }
    );
}

#[test]
fn explicit_policy_that_does_not_exist_is_reported() {
    let s = select(Some("nope"), &[], &BTreeMap::new(), &BTreeMap::new());
    assert_eq!(
        s,
        Selection::ExplicitMissing {
            name: "nope".into()
        }
    );
    assert_eq!(s.name(), None);
    assert!(s.explain().contains("does not exist"));
}

#[test]
fn most_matching_terms_wins() {
    let c = vec![
        cand("broad", &[], &[]),
        cand("db", &[("tier", "db")], &[]),
        cand("db-prod", &[("tier", "db")], &[("env", "prod")]),
        cand("web", &[("tier", "web")], &[("env", "prod")]),
    ];
    let s = select(
        None,
        &c,
        &labels(&[("tier", "db")]),
        &labels(&[("env", "prod")]),
    );
    assert_eq!(
        s,
        Selection::Matched {
            name: "db-prod".into(),
            terms: 2,
            beaten: vec!["db".into(), "broad".into()]
        }
    );
    assert!(s.explain().contains("ahead of"));
}

#[test]
fn on_equal_terms_the_vm_selector_beats_the_namespace_selector() {
    let c = vec![
        cand("by-ns", &[], &[("env", "prod")]),
        cand("by-vm", &[("tier", "db")], &[]),
    ];
    let s = select(
        None,
        &c,
        &labels(&[("tier", "db")]),
        &labels(&[("env", "prod")]),
    );
    assert_eq!(s.name(), Some("by-vm"));
}

#[test]
fn on_a_full_tie_the_first_name_wins() {
    let c = vec![
        cand("zeta", &[("a", "1")], &[]),
        cand("alpha", &[("b", "2")], &[]),
    ];
    let s = select(
        None,
        &c,
        &labels(&[("a", "1"), ("b", "2")]),
        &BTreeMap::new(),
    );
    assert_eq!(s.name(), Some("alpha"));
}

#[test]
fn no_match_means_defaults() {
    let c = vec![cand("db", &[("tier", "db")], &[])];
    let s = select(None, &c, &labels(&[("tier", "web")]), &BTreeMap::new());
    assert_eq!(s, Selection::Defaults);
    assert!(s.explain().contains("defaults"));
}

proptest! {
    #[test]
    fn selection_does_not_depend_on_the_listing_order(
        specs in prop::collection::vec((0u8..3, 0u8..3, 0u8..2), 1..8),
        shift in 0usize..8,
    ) {
        let vm = labels(&[("k0", "v"), ("k1", "v"), ("k2", "v")]);
        let ns = labels(&[("n0", "v"), ("n1", "v")]);
        let mut c: Vec<PolicyCandidate> = specs.iter().enumerate().map(|(i, (a, b, n))| {
            let vm_terms: Vec<(String, String)> = (0..*a).map(|j| (format!("k{j}"), "v".to_string()))
                .chain((0..*b).map(|j| (format!("x{j}"), "v".to_string()))).collect();
            let ns_terms: Vec<(String, String)> = (0..*n).map(|j| (format!("n{j}"), "v".to_string())).collect();
            PolicyCandidate {
                name: format!("p{i}"),
                selector: LabelSelector { match_labels: vm_terms.into_iter().collect(), match_expressions: vec![] },
                namespace_selector: LabelSelector { match_labels: ns_terms.into_iter().collect(), match_expressions: vec![] },
            }
        }).collect();
        let first = select(None, &c, &vm, &ns);
        let len = c.len();
        c.rotate_left(shift % len);
        c.reverse();
        prop_assert_eq!(select(None, &c, &vm, &ns), first.clone());
        // The winner really matches and no matching candidate has more terms.
        if let Selection::Matched { name, terms, .. } = first {
            let w = c.iter().find(|p| p.name == name).unwrap();
            prop_assert!(w.selector.matches(&vm) && w.namespace_selector.matches(&ns));
            for p in &c {
                if p.selector.matches(&vm) && p.namespace_selector.matches(&ns) {
                    prop_assert!(p.selector.terms() + p.namespace_selector.terms() <= terms);
                }
            }
        }
    }
}
