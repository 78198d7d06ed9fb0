//! Policy semantics on plain requests: matching, match conditions,
//! variables, messages, reasons, failure policy and binding actions.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::apiserver::pki::{Identity, NODE_NAME_EXTRA};

fn agent(node: Option<&str>) -> Identity {
    Identity {
        user: "system:serviceaccount:ferry-system:ferry-agent".into(),
        uid: "u-1".into(),
        groups: vec!["system:serviceaccounts".into()],
        extra: node
            .map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])]))
            .unwrap_or_default(),
    }
}

/// A request builder over a Lease in namespace `ns` by `who`.
struct Req {
    operation: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
    namespace: &'static str,
    name: String,
    who: Identity,
    object: Option<Value>,
    old: Option<Value>,
}

impl Req {
    fn lease(name: &str, who: Identity) -> Self {
        Self {
            operation: "UPDATE",
            group: "coordination.k8s.io",
            resource: "leases",
            subresource: "",
            namespace: "ferry-system",
            name: name.into(),
            who,
            object: Some(
                json!({"metadata": {"name": name, "labels": {"app": "ferry"}}, "spec": {}}),
            ),
            old: Some(json!({"metadata": {"name": name}, "spec": {}})),
        }
    }
    fn op(mut self, op: &'static str) -> Self {
        self.operation = op;
        if op == "CREATE" {
            self.old = None;
        }
        if op == "DELETE" {
            self.old = self.object.take();
        }
        self
    }
    fn sub(mut self, s: &'static str) -> Self {
        self.subresource = s;
        self
    }
    fn judge(&self, set: &PolicySet, ns_labels: Value) -> Result<Vec<String>, Denial> {
        let attrs = RequestAttributes {
            operation: self.operation,
            group: self.group,
            version: "v1",
            resource: self.resource,
            kind: "Lease",
            subresource: self.subresource,
            name: &self.name,
            namespace: self.namespace,
            identity: &self.who,
            dry_run: false,
            object: self.object.as_ref(),
            old_object: self.old.as_ref(),
        };
        let ns = json!({"metadata": {"name": self.namespace, "labels": ns_labels}});
        set.validate(&attrs, &|_| Some(ns.clone()))
    }
}

fn policy(spec: Value) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
           "metadata": {"name": "p", "resourceVersion": "1"}, "spec": spec})
}

fn binding(name: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["policyName"] = json!("p");
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
           "metadata": {"name": name}, "spec": spec})
}

fn leases_rule(resources: Value) -> Value {
    json!({"resourceRules": [{"apiGroups": ["coordination.k8s.io"], "apiVersions": ["v1"],
                              "operations": ["CREATE", "UPDATE"], "resources": resources}]})
}

fn set(spec: Value, actions: Value) -> PolicySet {
    PolicySet::compile(
        &[policy(spec)],
        &[binding("b", json!({"validationActions": actions}))],
    )
}

fn own_lease_policy() -> Value {
    json!({
        "matchConstraints": leases_rule(json!(["leases"])),
        "matchConditions": [{"name": "is-agent",
            "expression": "request.userInfo.username.startsWith('system:serviceaccount:ferry-system:')"}],
        "variables": [{"name": "node", "expression":
            "has(request.userInfo.extra) && 'authentication.kubernetes.io/node-name' in request.userInfo.extra ? request.userInfo.extra['authentication.kubernetes.io/node-name'][0] : ''"}],
        "validations": [
            {"expression": "variables.node != ''", "message": "no node"},
            {"expression": "object.metadata.name == variables.node",
             "messageExpression": "'an agent on ' + variables.node + ' may write only its own Lease'",
             "reason": "Forbidden"}]
    })
}

#[test]
fn own_object_rule_admits_the_owner_and_denies_others_with_the_evaluated_message() {
    let s = set(own_lease_policy(), json!(["Deny"]));
    assert_eq!(
        Req::lease("node-a", agent(Some("node-a"))).judge(&s, json!({})),
        Ok(vec![])
    );
    let d = Req::lease("node-b", agent(Some("node-a")))
        .judge(&s, json!({}))
        .unwrap_err();
    assert_eq!(d.message, "an agent on node-a may write only its own Lease");
    assert_eq!((d.reason.as_str(), d.code()), ("Forbidden", 403));
    assert_eq!(
        d.cause(),
        "ValidatingAdmissionPolicy 'p' with binding 'b' denied request: an agent on node-a may write only its own Lease"
    );
    // No extra at all: the first validation's static message, reason Invalid.
    let d = Req::lease("node-a", agent(None))
        .judge(&s, json!({}))
        .unwrap_err();
    assert_eq!((d.message.as_str(), d.code()), ("no node", 422));
}

#[test]
fn match_conditions_that_are_false_skip_the_policy() {
    let s = set(own_lease_policy(), json!(["Deny"]));
    let mut other = agent(Some("node-a"));
    other.user = "ferry:controller".into();
    assert_eq!(Req::lease("node-b", other).judge(&s, json!({})), Ok(vec![]));
}

#[test]
fn resource_rules_match_operations_groups_and_subresources() {
    let s = set(own_lease_policy(), json!(["Deny"]));
    let stranger = || Req::lease("node-b", agent(Some("node-a")));
    assert!(stranger().op("CREATE").judge(&s, json!({})).is_err());
    // DELETE and the status subresource are not listed.
    assert_eq!(stranger().op("DELETE").judge(&s, json!({})), Ok(vec![]));
    assert_eq!(stranger().sub("status").judge(&s, json!({})), Ok(vec![]));
    let mut other_group = stranger();
    other_group.group = "apps";
    assert_eq!(other_group.judge(&s, json!({})), Ok(vec![]));

    let mut spec = own_lease_policy();
    spec["matchConstraints"] = leases_rule(json!(["leases/status"]));
    let status_only = set(spec.clone(), json!(["Deny"]));
    assert!(
        stranger()
            .sub("status")
            .judge(&status_only, json!({}))
            .is_err()
    );
    assert_eq!(stranger().judge(&status_only, json!({})), Ok(vec![]));
    spec["matchConstraints"] = leases_rule(json!(["*/*"]));
    assert!(
        stranger()
            .sub("status")
            .judge(&set(spec.clone(), json!(["Deny"])), json!({}))
            .is_err()
    );
    spec["matchConstraints"] = leases_rule(json!(["*"]));
    assert_eq!(
        stranger()
            .sub("status")
            .judge(&set(spec.clone(), json!(["Deny"])), json!({})),
        Ok(vec![])
    );
    spec["matchConstraints"]["resourceRules"][0]["resourceNames"] = json!(["node-c"]);
    assert_eq!(
        stranger().judge(&set(spec, json!(["Deny"])), json!({})),
        Ok(vec![])
    );
}

#[test]
fn namespace_and_object_selectors_narrow_the_match() {
    let mut spec = own_lease_policy();
    spec["matchConstraints"]["namespaceSelector"] = json!({"matchLabels": {"policed": "yes"}});
    let s = set(spec.clone(), json!(["Deny"]));
    let stranger = || Req::lease("node-b", agent(Some("node-a")));
    assert_eq!(stranger().judge(&s, json!({})), Ok(vec![]));
    assert!(stranger().judge(&s, json!({"policed": "yes"})).is_err());

    spec["matchConstraints"]["namespaceSelector"] = json!({});
    spec["matchConstraints"]["objectSelector"] =
        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["other"]}]});
    assert_eq!(
        stranger().judge(&set(spec, json!(["Deny"])), json!({})),
        Ok(vec![])
    );

    // A binding's matchResources narrows further.
    let p = policy(own_lease_policy());
    let b = binding(
        "b",
        json!({"validationActions": ["Deny"],
        "matchResources": {"namespaceSelector": {"matchLabels": {"policed": "yes"}}}}),
    );
    let s = PolicySet::compile(&[p], &[b]);
    assert_eq!(stranger().judge(&s, json!({})), Ok(vec![]));
    assert!(stranger().judge(&s, json!({"policed": "yes"})).is_err());
}

#[test]
fn warn_bindings_admit_with_a_warning_and_audit_does_nothing() {
    let s = set(own_lease_policy(), json!(["Warn"]));
    assert_eq!(
        Req::lease("node-b", agent(Some("node-a"))).judge(&s, json!({})),
        Ok(vec![
            "Validation failed for ValidatingAdmissionPolicy 'p' with binding 'b': an agent on node-a may write only its own Lease"
                .to_string()
        ])
    );
    let s = set(own_lease_policy(), json!(["Audit"]));
    assert_eq!(
        Req::lease("node-b", agent(Some("node-a"))).judge(&s, json!({})),
        Ok(vec![])
    );
}

#[test]
fn messages_fall_back_from_message_expression_to_message_to_the_expression() {
    let spec =
        |v: Value| json!({"matchConstraints": leases_rule(json!(["leases"])), "validations": [v]});
    let denial = |v: Value| {
        Req::lease("x", agent(None))
            .judge(&set(spec(v), json!(["Deny"])), json!({}))
            .unwrap_err()
            .message
    };
    assert_eq!(
        denial(json!({"expression": " object.metadata.name == 'y' "})),
        "failed expression: object.metadata.name == 'y'"
    );
    assert_eq!(
        denial(
            json!({"expression": "false", "message": " static ", "messageExpression": "'a\\nb'"})
        ),
        "static"
    );
    assert_eq!(
        denial(json!({"expression": "false", "message": "static", "messageExpression": "1"})),
        "static"
    );
    assert_eq!(
        denial(
            json!({"expression": "false", "messageExpression": "'name ' + object.metadata.name + ' by ' + request.userInfo.uid + ' ' + request.operation"})
        ),
        "name x by u-1 UPDATE"
    );
}

#[test]
fn evaluation_errors_follow_the_failure_policy() {
    let spec = |failure: &str| {
        json!({"failurePolicy": failure, "matchConstraints": leases_rule(json!(["leases"])),
               "validations": [{"expression": "object.spec.missing == 1"}]})
    };
    let d = Req::lease("x", agent(None))
        .judge(&set(spec("Fail"), json!(["Deny"])), json!({}))
        .unwrap_err();
    assert!(
        d.message
            .starts_with("expression 'object.spec.missing == 1' resulted in error:"),
        "{}",
        d.message
    );
    assert_eq!(
        Req::lease("x", agent(None)).judge(&set(spec("Ignore"), json!(["Deny"])), json!({})),
        Ok(vec![])
    );
    // A failed variable is named when a validation reads it.
    let s = set(
        json!({"matchConstraints": leases_rule(json!(["leases"])),
               "variables": [{"name": "bad", "expression": "object.nope"}],
               "validations": [{"expression": "variables.bad == 1"}]}),
        json!(["Deny"]),
    );
    let d = Req::lease("x", agent(None))
        .judge(&s, json!({}))
        .unwrap_err();
    assert!(
        d.message.contains("composited variable \"bad\""),
        "{}",
        d.message
    );
}

#[test]
fn request_has_the_kubernetes_admission_request_fields() {
    let s = set(
        json!({"matchConstraints": leases_rule(json!(["leases/status"])),
               "validations": [{"expression": "false", "messageExpression":
                 "[request.resource.group, request.resource.version, request.resource.resource, request.subResource, request.kind.kind, request.name, request.namespace, request.userInfo.username, request.userInfo.groups[0], has(request.userInfo.extra) ? 'T' : 'F', request.dryRun ? 'T' : 'F', request.options.kind, oldObject == null ? 'T' : 'F', params == null ? 'T' : 'F', namespaceObject.metadata.name].join('|')"}]}),
        json!(["Deny"]),
    );
    let d = Req::lease("n1", agent(None))
        .op("CREATE")
        .sub("status")
        .judge(&s, json!({}))
        .unwrap_err();
    assert_eq!(
        d.message,
        "coordination.k8s.io|v1|leases|status|Lease|n1|ferry-system|system:serviceaccount:ferry-system:ferry-agent|system:serviceaccounts|F|F|CreateOptions|T|T|ferry-system"
    );
}

#[test]
fn definitions_that_do_not_compile_or_name_unknown_values_are_invalid() {
    use crate::apiserver::resources::Registry;
    let reg = Registry::with_builtins();
    let info = reg.get(GROUP, "v1", POLICIES).unwrap();
    let bad = policy(json!({"matchConstraints": leases_rule(json!(["leases"])),
        "failurePolicy": "Sometimes",
        "validations": [{"expression": "object.(", "reason": "Teapot"}]}));
    let e = check_definition(&info, &bad).unwrap_err();
    let fields: Vec<&str> = e.causes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.failurePolicy",
            "spec.validations[0].expression",
            "spec.validations[0].reason"
        ]
    );
    assert_eq!(e.code, 422);
    assert!(check_definition(&info, &policy(own_lease_policy())).is_ok());
    let binfo = reg.get(GROUP, "v1", BINDINGS).unwrap();
    let e = check_definition(
        &binfo,
        &binding("b", json!({"validationActions": ["Deny", "Warn"]})),
    )
    .unwrap_err();
    assert_eq!(e.causes[0].field, "spec.validationActions");
    assert!(check_definition(&binfo, &binding("b", json!({"validationActions": []}))).is_err());
}

#[test]
fn policies_do_not_apply_to_admission_configuration_or_without_bindings() {
    let everything = json!({"matchConstraints": {"resourceRules": [{"apiGroups": ["*"],
        "apiVersions": ["*"], "operations": ["*"], "resources": ["*/*"]}]},
        "validations": [{"expression": "false"}]});
    let s = set(everything.clone(), json!(["Deny"]));
    let mut r = Req::lease("x", agent(None));
    assert!(r.judge(&s, json!({})).is_err());
    r.group = GROUP;
    assert_eq!(r.judge(&s, json!({})), Ok(vec![]));
    let unbound = PolicySet::compile(&[policy(everything)], &[]);
    assert_eq!(
        Req::lease("x", agent(None)).judge(&unbound, json!({})),
        Ok(vec![])
    );
}

#[test]
fn static_token_extras_become_user_extra() {
    let t = crate::apiserver::pki::static_tokens(
        "tok,system:serviceaccount:ns:sa,uid-1,\"g1,g2\",\"authentication.kubernetes.io/node-name=node-a,k=v1,k=v2\"\nold,alice,uid-2\n",
    );
    let (token, id) = &t[0];
    assert_eq!(token, "tok");
    assert_eq!(id.uid, "uid-1");
    assert_eq!(&id.groups[..2], ["g1", "g2"]);
    assert_eq!(id.extra[NODE_NAME_EXTRA], ["node-a"]);
    assert_eq!(id.extra["k"], ["v1", "v2"]);
    assert!(t[1].1.extra.is_empty());
    assert_eq!(t[1].1.groups, ["system:authenticated"]);
}
