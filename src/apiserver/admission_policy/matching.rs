//! Whether a request is in a policy's `matchConstraints` or a binding's
//! `matchResources`: namespaceSelector, objectSelector, then resource rules
//! (kube-apiserver's `generic.PolicyMatcher` and webhook `rules.Matcher`).

use k8s_openapi::api::admissionregistration::v1::{MatchResources, NamedRuleWithOperations};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as MetaSelector;
use serde_json::Value;

use super::eval::RequestAttributes;
use crate::apiserver::selector::LabelSelector;

fn listed(list: &Option<Vec<String>>, value: &str) -> bool {
    list.iter().flatten().any(|v| v == "*" || v == value)
}

/// `resources` semantics: `pods` (main resource only), `pods/status`,
/// `pods/*`, `*` (every main resource), `*/status`, `*/*` (everything).
fn resource_listed(list: &Option<Vec<String>>, resource: &str, sub: &str) -> bool {
    list.iter().flatten().any(|r| {
        if r == "*/*" {
            return true;
        }
        let (res, rsub) = r.split_once('/').unwrap_or((r.as_str(), ""));
        let res_ok = res == "*" || res == resource;
        if rsub.is_empty() {
            res_ok && sub.is_empty()
        } else {
            res_ok && (rsub == "*" || rsub == sub)
        }
    })
}

/// One rule against the request (with `resourceNames`).
pub fn rule_matches(rule: &NamedRuleWithOperations, a: &RequestAttributes) -> bool {
    let scope_ok = match rule.scope.as_deref().unwrap_or("*") {
        "Cluster" => a.namespace.is_empty(),
        "Namespaced" => !a.namespace.is_empty(),
        _ => true,
    };
    scope_ok
        && listed(&rule.operations, a.operation)
        && listed(&rule.api_groups, a.group)
        && listed(&rule.api_versions, a.version)
        && resource_listed(&rule.resources, a.resource, a.subresource)
        && rule
            .resource_names
            .as_ref()
            .is_none_or(|names| names.is_empty() || names.iter().any(|n| n == a.name))
}

fn selector_matches(sel: &Option<MetaSelector>, labelled: &Value) -> bool {
    match sel {
        None => true,
        Some(s) => match serde_json::to_value(s) {
            Ok(v) => LabelSelector::from_object(&v).matches(labelled),
            Err(_) => false,
        },
    }
}

/// Whether `m` selects the request. `namespace` is the Namespace whose
/// labels `namespaceSelector` reads (the object itself for a Namespace).
/// `require_rules`: a policy's `matchConstraints` must list resources; a
/// binding's `matchResources` without rules keeps the policy's.
pub fn matches(
    m: &MatchResources,
    a: &RequestAttributes,
    namespace: Option<&Value>,
    require_rules: bool,
) -> bool {
    let is_namespace = a.group.is_empty() && a.resource == "namespaces";
    // Cluster-scoped objects other than Namespaces are never exempted by a
    // namespaceSelector.
    let ns_ok = (a.namespace.is_empty() && !is_namespace)
        || selector_matches(&m.namespace_selector, namespace.unwrap_or(&Value::Null));
    let obj_ok = m.object_selector.is_none()
        || [a.object, a.old_object]
            .into_iter()
            .flatten()
            .any(|o| selector_matches(&m.object_selector, o));
    if !ns_ok || !obj_ok {
        return false;
    }
    if m.exclude_resource_rules
        .iter()
        .flatten()
        .any(|r| rule_matches(r, a))
    {
        return false;
    }
    match &m.resource_rules {
        Some(rules) if !rules.is_empty() => rules.iter().any(|r| rule_matches(r, a)),
        _ => !require_rules,
    }
}
