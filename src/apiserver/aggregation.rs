//! ClusterRole aggregation, as kube-controller-manager's
//! `clusterrole-aggregation` controller fills it: a ClusterRole with an
//! `aggregationRule` gets as its `rules` the rules of every other
//! ClusterRole matched by one of its `clusterRoleSelectors`, taken in name
//! order with duplicates dropped. Rules the aggregated role declares itself
//! are replaced: the controller owns the field.
//!
//! ```text
//! any write ─► controllers pass ─► for each ClusterRole with aggregationRule:
//!     wanted = ∪ rules of matching roles (by name, first occurrence kept)
//!     wanted == rules (absent ≡ empty)?  nothing : write rules
//! ```
//!
//! Runs as part of the controllers loop ([`super::controllers`]).

use serde_json::{Value, json};

use super::crud;
use super::error::ApiError;
use super::http::ApiState;
use super::selector::LabelSelector;
use super::store::Mutation;

/// The group of the RBAC kinds.
const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// The rules `role` should have given every ClusterRole (in name order);
/// `None` if `role` does not aggregate.
pub fn aggregated_rules(role: &Value, all: &[&Value]) -> Option<Vec<Value>> {
    let selectors: Vec<LabelSelector> = role
        .pointer("/aggregationRule/clusterRoleSelectors")?
        .as_array()?
        .iter()
        .map(LabelSelector::from_object)
        .collect();
    let name = role.pointer("/metadata/name");
    let mut rules: Vec<Value> = Vec::new();
    for other in all {
        if other.pointer("/metadata/name") == name || !selectors.iter().any(|s| s.matches(other)) {
            continue;
        }
        for rule in other
            .get("rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !rules.contains(rule) {
                rules.push(rule.clone());
            }
        }
    }
    Some(rules)
}

fn rules_of(role: &Value) -> &[Value] {
    role.get("rules")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// One pass over the ClusterRoles, writing the aggregated ones that differ.
pub async fn aggregate_cluster_roles(state: &ApiState) -> Result<(), ApiError> {
    let prefix = super::store::prefix(RBAC_GROUP, "clusterroles", "");
    let (roles, _) = state.store.list(&prefix, None);
    let all: Vec<&Value> = roles.iter().map(|(_, r)| r.as_ref()).collect();
    for (key, role) in &roles {
        let Some(wanted) = aggregated_rules(role, &all) else {
            continue;
        };
        if rules_of(role) == wanted.as_slice() {
            continue;
        }
        let expected_rv = role.pointer("/metadata/resourceVersion").cloned();
        // Written only if the role has not changed since it was read; a
        // changed role wakes the loop again.
        crud::mutate(state, key.clone(), false, move |cur| {
            let Some(cur) = cur else {
                return Ok(Mutation::Unchanged);
            };
            if cur.pointer("/metadata/resourceVersion").cloned() != expected_rv {
                return Ok(Mutation::Unchanged);
            }
            let mut new = cur.clone();
            new["rules"] = json!(wanted);
            Ok(Mutation::Put(new))
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str, labels: Value, rules: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "rules": rules})
    }

    #[test]
    fn rules_of_matching_roles_are_joined_in_name_order_without_duplicates() {
        let get = json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]});
        let list = json!({"verbs": ["list"], "apiGroups": [""], "resources": ["pods"]});
        let a = role("a-view", json!({"agg": "view"}), json!([get]));
        let b = role("b-view", json!({"agg": "view"}), json!([get, list]));
        let c = role("c-edit", json!({"agg": "edit"}), json!([{"verbs": ["*"]}]));
        let agg = json!({"metadata": {"name": "view"},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "view"}}]},
            "rules": [{"verbs": ["stale"]}]});
        let all = [&a, &agg, &b, &c];
        assert_eq!(aggregated_rules(&agg, &all).unwrap(), vec![get, list]);
        assert!(aggregated_rules(&a, &all).is_none());
    }

    #[test]
    fn an_empty_selector_list_aggregates_nothing() {
        let a = role("a", json!({}), json!([{"verbs": ["get"]}]));
        let agg =
            json!({"metadata": {"name": "x"}, "aggregationRule": {"clusterRoleSelectors": []}});
        assert_eq!(
            aggregated_rules(&agg, &[&a, &agg]).unwrap(),
            Vec::<Value>::new()
        );
        assert!(rules_of(&agg).is_empty());
    }
}
