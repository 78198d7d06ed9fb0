//! Which `MigrationPolicy` applies to a VM.
//!
//! # The rule
//!
//! 1. A Migration that names a policy (`spec.policy`) gets that policy, even
//!    if its selectors do not match the VM: the user said so.
//! 2. Otherwise a policy is a candidate when both its `selector` matches the
//!    VM's labels and its `namespaceSelector` matches the labels of the VM's
//!    namespace (Kubernetes semantics: an empty selector matches everything).
//! 3. Among candidates the most specific wins: the one with the most selector
//!    terms in total (each `matchLabels` entry and each `matchExpressions`
//!    requirement is one term, VM selector and namespace selector added).
//! 4. On a tie, the one with more VM-selector terms wins: a policy written for
//!    these VMs is more specific than one written for their namespace.
//! 5. On a further tie, the name that sorts first wins, so the choice never
//!    depends on the order in which the API listed the policies.
//! 6. No candidate: the built-in defaults.
//!
//! The result says which rule decided, so the controller can write it in a
//! condition ("policy `gold` selected: 3 matching terms, more than `silver`").

use std::collections::BTreeMap;

/// The operator of a set-based requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorOp {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is not one of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub op: SelectorOp,
    /// Values (for `In` / `NotIn`).
    pub values: Vec<String>,
}

/// A Kubernetes label selector as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// `matchLabels`.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether the selector matches these labels (all terms must hold).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.op {
                    SelectorOp::In => value.is_some_and(|v| r.values.contains(v)),
                    SelectorOp::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    SelectorOp::Exists => value.is_some(),
                    SelectorOp::DoesNotExist => value.is_none(),
                }
            })
    }

    /// The number of terms: the measure of specificity.
    pub fn terms(&self) -> usize {
        self.match_labels.len() + self.match_expressions.len()
    }
}

/// A policy as seen by selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCandidate {
    /// The policy's name.
    pub name: String,
    /// `selector` over VM labels.
    pub selector: LabelSelector,
    /// `namespaceSelector` over the VM's namespace's labels.
    pub namespace_selector: LabelSelector,
}

/// The outcome of selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The Migration named this policy and it exists.
    Explicit {
        /// The policy.
        name: String,
    },
    /// The Migration named a policy that does not exist.
    ExplicitMissing {
        /// The name asked for.
        name: String,
    },
    /// The most specific matching policy.
    Matched {
        /// The winner.
        name: String,
        /// Its total number of selector terms.
        terms: usize,
        /// The other matching policies it won over, best first.
        beaten: Vec<String>,
    },
    /// Nothing matched: the built-in defaults.
    Defaults,
}

impl Selection {
    /// The selected policy's name, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Explicit { name } | Self::Matched { name, .. } => Some(name),
            Self::ExplicitMissing { .. } | Self::Defaults => None,
        }
    }

    /// A sentence for a condition message.
    pub fn explain(&self) -> String {
        match self {
            Self::Explicit { name } => format!("policy {name:?} named by the migration"),
            Self::ExplicitMissing { name } => {
                format!("policy {name:?} named by the migration does not exist")
            }
            Self::Matched {
                name,
                terms,
                beaten,
            } if beaten.is_empty() => {
                format!("policy {name:?} is the only one whose selectors match ({terms} terms)")
            }
            Self::Matched {
                name,
                terms,
                beaten,
            } => format!(
                "policy {name:?} is the most specific match ({terms} terms), ahead of {}",
                beaten
                    .iter()
                    .map(|b| format!("{b:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Defaults => "no policy matches: built-in defaults".to_string(),
        }
    }
}

/// Choose the policy for a VM (see the module documentation for the rule).
pub fn select(
    explicit: Option<&str>,
    candidates: &[PolicyCandidate],
    vm_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> Selection {
    if let Some(name) = explicit {
        return if candidates.iter().any(|c| c.name == name) {
            Selection::Explicit {
                name: name.to_string(),
            }
        } else {
            Selection::ExplicitMissing {
                name: name.to_string(),
            }
        };
    }
    let mut matching: Vec<&PolicyCandidate> = candidates
        .iter()
        .filter(|c| c.selector.matches(vm_labels) && c.namespace_selector.matches(namespace_labels))
        .collect();
    // Rules 3, 4, 5: total terms desc, VM terms desc, name asc.
    matching.sort_by(|a, b| {
        let total = |c: &PolicyCandidate| c.selector.terms() + c.namespace_selector.terms();
        total(b)
            .cmp(&total(a))
            .then(b.selector.terms().cmp(&a.selector.terms()))
            .then(a.name.cmp(&b.name))
    });
    match matching.split_first() {
        None => Selection::Defaults,
        Some((winner, rest)) => Selection::Matched {
            name: winner.name.clone(),
            terms: winner.selector.terms() + winner.namespace_selector.terms(),
            beaten: rest.iter().map(|c| c.name.clone()).collect(),
        },
    }
}
