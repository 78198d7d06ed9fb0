//! RBAC authorization for every resource request by a non-admin identity:
//! the rules of the ClusterRoles bound by ClusterRoleBindings, plus — in the
//! request's namespace — the Roles and ClusterRoles bound by RoleBindings.
//! Discovery and OpenAPI are open to every authenticated identity, as the
//! real server's `system:discovery` binding makes them.

use serde_json::Value;

use super::error::ApiError;
use super::http::{ApiState, ResourceRequest};
use super::objmeta::subject;
use super::pki::Identity;
use super::store;

const RBAC: &str = "rbac.authorization.k8s.io";

/// What is being asked.
pub struct Attributes<'a> {
    /// RBAC verb.
    pub verb: &'a str,
    /// API group.
    pub group: &'a str,
    /// `plural` or `plural/subresource`.
    pub resource: String,
    /// Namespace ("" for cluster scope).
    pub namespace: &'a str,
    /// Object name, if any.
    pub name: Option<&'a str>,
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let has = |field: &str, want: &str| {
        strings(&rule[field])
            .iter()
            .any(|x| *x == "*" || *x == want)
    };
    if !has("verbs", a.verb) || !has("apiGroups", a.group) {
        return false;
    }
    let resources = strings(&rule["resources"]);
    let res_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == a.resource
            || (r.starts_with("*/")
                && a.resource
                    .split_once('/')
                    .is_some_and(|(_, s)| r[2..] == *s))
    });
    if !res_ok {
        return false;
    }
    let names = strings(&rule["resourceNames"]);
    names.is_empty() || a.name.is_some_and(|n| names.contains(&n))
}

fn subject_matches(binding: &Value, who: &Identity) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s["name"].as_str().unwrap_or("");
            match s["kind"].as_str() {
                Some("User") => name == who.user,
                Some("Group") => who.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    let ns = s["namespace"].as_str().unwrap_or("");
                    who.user == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
}

fn role_rules(state: &ApiState, role_ref: &Value, namespace: &str) -> Vec<Value> {
    let name = role_ref["name"].as_str().unwrap_or("");
    let key = match role_ref["kind"].as_str() {
        Some("ClusterRole") => store::key(RBAC, "clusterroles", "", name),
        Some("Role") => store::key(RBAC, "roles", namespace, name),
        _ => return Vec::new(),
    };
    state
        .store
        .get(&key)
        .and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Whether `who` may do `a`.
pub fn allowed(state: &ApiState, who: &Identity, a: &Attributes) -> bool {
    if who.is_admin() {
        return true;
    }
    let mut rules = Vec::new();
    let (crbs, _) = state
        .store
        .list(&store::prefix(RBAC, "clusterrolebindings", ""), None);
    for (_, b) in crbs.iter().filter(|(_, b)| subject_matches(b, who)) {
        rules.extend(role_rules(state, &b["roleRef"], ""));
    }
    if !a.namespace.is_empty() {
        let (rbs, _) = state
            .store
            .list(&store::prefix(RBAC, "rolebindings", a.namespace), None);
        for (_, b) in rbs.iter().filter(|(_, b)| subject_matches(b, who)) {
            rules.extend(role_rules(state, &b["roleRef"], a.namespace));
        }
    }
    rules.iter().any(|r| rule_allows(r, a))
}

/// Authorize a resource request; 403 in the real server's words if denied.
pub fn authorize(state: &ApiState, rr: &ResourceRequest, verb: &str) -> Result<(), ApiError> {
    let resource = match &rr.subresource {
        Some(s) => format!("{}/{s}", rr.info.plural),
        None => rr.info.plural.clone(),
    };
    let a = Attributes {
        verb,
        group: &rr.info.group,
        resource: resource.clone(),
        namespace: &rr.namespace,
        name: rr.name.as_deref(),
    };
    if allowed(state, &rr.identity, &a) {
        return Ok(());
    }
    let subj = subject(&rr.info, rr.name.as_deref().unwrap_or(""));
    let scope = if rr.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", rr.namespace)
    };
    let reason = format!(
        "User \"{}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
        rr.identity.user, rr.info.group
    );
    let head = match &rr.name {
        Some(n) => format!("{} \"{n}\" is forbidden", subj.qualified()),
        None => format!("{} is forbidden", subj.qualified()),
    };
    Err(ApiError::forbidden(
        Some(&subj),
        format!("{head}: {reason}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs<'a>(verb: &'a str, resource: &str, name: Option<&'a str>) -> Attributes<'a> {
        Attributes {
            verb,
            group: "coordination.k8s.io",
            resource: resource.into(),
            namespace: "ns",
            name,
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let rule = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"]});
        assert!(rule_allows(&rule, &attrs("get", "leases", Some("x"))));
        assert!(!rule_allows(&rule, &attrs("delete", "leases", Some("x"))));
        assert!(!rule_allows(
            &rule,
            &attrs("get", "leases/status", Some("x"))
        ));
        let named = json!({"apiGroups": ["*"], "resources": ["leases"], "resourceNames": ["a"], "verbs": ["*"]});
        assert!(rule_allows(&named, &attrs("update", "leases", Some("a"))));
        assert!(!rule_allows(&named, &attrs("update", "leases", Some("b"))));
        assert!(!rule_allows(&named, &attrs("list", "leases", None)));
        let status = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["patch"]});
        assert!(rule_allows(
            &status,
            &attrs("patch", "leases/status", Some("a"))
        ));
        assert!(!rule_allows(&status, &attrs("patch", "leases", Some("a"))));
    }
}
