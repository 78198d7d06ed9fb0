//! ValidatingAdmissionPolicy enforced by the embedded API server.
//!
//! The chart's agent policy, installed by Helm v4 (`helm-python-sdk`) with
//! RBAC on, confines each agent (one ServiceAccount, tokens naming their
//! node like Kubernetes 1.32+ pod-bound tokens) to its own Host, Lease and
//! the status of the VMs and Migrations on its node; the controller is not
//! affected. Then the policy semantics over HTTP: discovery, a policy that
//! does not compile (422), reasons and codes, messageExpression, match
//! conditions, DELETE rules and Warn bindings (`Warning` header).

mod common;
mod helm_support;

use axum::http::Request;
use common::*;
use helm_support::{chart, helm};
use serde_json::{Value, json};

const NS: &str = "ferry-system";
const FERRY: &str = "/apis/ferry.dev/v1alpha1";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases";
const AGENT_SA: &str = "system:serviceaccount:ferry-system:ferry-agent";
const CONTROLLER_TOKEN: &str = "controller-sa-token-0123456789";
const POLICY: &str = "ferry-agent-own-objects";
const AR: &str = "/apis/admissionregistration.k8s.io/v1";

fn agent_token(node: &str) -> String {
    format!("agent-sa-token-{node}")
}

async fn merge(c: &kube::Client, path: &str, body: Value) -> (u16, Value) {
    call(c, "PATCH", path, Some(body), "application/merge-patch+json").await
}

/// A raw call that also returns the `Warning` headers.
async fn call_warned(
    c: &kube::Client,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value, Vec<String>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(body.to_string().into_bytes()))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let code = resp.status().as_u16();
    let warnings = resp
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let bytes = resp.into_body().collect_bytes().await.unwrap();
    (
        code,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        warnings,
    )
}

/// Assert the request was refused by `policy` with `message`, in
/// kube-apiserver's words (reason unset: 422 Invalid).
#[track_caller]
fn assert_denied(answer: &(u16, Value), resource: &str, name: &str, policy: &str, message: &str) {
    let (code, body) = answer;
    let cause = format!(
        "ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request: {message}"
    );
    assert_eq!(*code, 422, "{body}");
    assert_eq!(body["reason"], "Invalid", "{body}");
    assert_eq!(
        body["message"],
        format!("{resource} \"{name}\" is forbidden: {cause}"),
        "{body}"
    );
    assert_eq!(
        body["details"]["causes"],
        json!([{"message": cause}]),
        "{body}"
    );
}

fn host(name: &str) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": name},
           "spec": {"cluster": "default"}})
}
fn lease(name: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
           "spec": {"holderIdentity": name}})
}
fn vm(name: &str) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": name},
           "spec": {"boot": {"kernel": {"kernel": "/boot/vmlinuz"}}, "memory": "128Mi"}})
}
fn migration(name: &str, vm: &str) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration", "metadata": {"name": name},
           "spec": {"vmName": vm}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_policy_confines_each_agent_to_its_own_node() {
    let s = TestServer::start_with(|c| {
        let node = "authentication.kubernetes.io/node-name";
        let tokens = format!(
            "{},{AGENT_SA},agent-uid,,\"{node}=node-a\"\n\
             {},{AGENT_SA},agent-uid,,\"{node}=node-b\"\n\
             agent-sa-token-nonode,{AGENT_SA},agent-uid\n\
             {CONTROLLER_TOKEN},system:serviceaccount:ferry-system:ferry-controller,controller-uid\n",
            agent_token("node-a"),
            agent_token("node-b"),
        );
        std::fs::create_dir_all(&c.data_dir).unwrap();
        std::fs::write(c.data_dir.join("tokens.csv"), tokens).unwrap();
    })
    .await;
    let admin = s.admin().await;
    let kubeconfig = s.handle.kubeconfig_path().to_path_buf();

    // Helm sees the API in discovery and installs the policy ("auto").
    let release = tokio::task::spawn_blocking(move || {
        helm(
            "install",
            &json!({"kubeconfig": kubeconfig, "chart": chart(), "values": {},
                    "namespace": NS, "name": "ferry"}),
        )
        .unwrap_or_else(|e| panic!("helm install: {e}"))
    })
    .await
    .unwrap();
    assert_eq!(release["status"], "deployed", "{release}");
    let (code, p) = get(
        &admin,
        &format!("{AR}/validatingadmissionpolicies/{POLICY}"),
    )
    .await;
    assert_eq!(code, 200, "the chart installed its policy: {p}");
    let (code, b) = get(
        &admin,
        &format!("{AR}/validatingadmissionpolicybindings/{POLICY}"),
    )
    .await;
    assert_eq!(
        (code, &b["spec"]["validationActions"]),
        (200, &json!(["Deny"]))
    );

    let a = s.handle.client_for(&agent_token("node-a")).await.unwrap();
    let b = s.handle.client_for(&agent_token("node-b")).await.unwrap();
    let nonode = s.handle.client_for("agent-sa-token-nonode").await.unwrap();
    let controller = s.handle.client_for(CONTROLLER_TOKEN).await.unwrap();
    let hosts = format!("{FERRY}/hosts");
    let vms = format!("{FERRY}/namespaces/default/virtualmachines");
    let migrations = format!("{FERRY}/namespaces/default/migrations");
    let own = |n: &str| format!("an agent on {n} may write only its own Host and Lease");

    // Hosts: each agent registers and reports its own, not the other's.
    assert_eq!(post(&a, &hosts, host("node-a")).await.0, 201);
    assert_denied(
        &post(&a, &hosts, host("node-b")).await,
        "hosts.ferry.dev",
        "node-b",
        POLICY,
        &own("node-a"),
    );
    assert_eq!(post(&b, &hosts, host("node-b")).await.0, 201);
    let status = json!({"status": {"vmCount": 0}});
    assert_eq!(
        merge(&a, &format!("{hosts}/node-a/status"), status.clone())
            .await
            .0,
        200
    );
    assert_eq!(
        merge(
            &a,
            &format!("{hosts}/node-a"),
            json!({"metadata": {"labels": {"rack": "r1"}}})
        )
        .await
        .0,
        200
    );
    assert_denied(
        &merge(&a, &format!("{hosts}/node-b/status"), status.clone()).await,
        "hosts.ferry.dev",
        "node-b",
        POLICY,
        &own("node-a"),
    );
    assert_denied(
        &merge(
            &b,
            &format!("{hosts}/node-a"),
            json!({"metadata": {"labels": {"rack": "r2"}}}),
        )
        .await,
        "hosts.ferry.dev",
        "node-a",
        POLICY,
        &own("node-b"),
    );

    // Leases: the same.
    assert_eq!(post(&a, LEASES, lease("node-a")).await.0, 201);
    assert_eq!(post(&b, LEASES, lease("node-b")).await.0, 201);
    let renew = json!({"spec": {"leaseDurationSeconds": 40}});
    assert_eq!(
        merge(&a, &format!("{LEASES}/node-a"), renew.clone())
            .await
            .0,
        200
    );
    assert_denied(
        &merge(&a, &format!("{LEASES}/node-b"), renew.clone()).await,
        "leases.coordination.k8s.io",
        "node-b",
        POLICY,
        &own("node-a"),
    );
    assert_denied(
        &post(&b, LEASES, lease("node-c")).await,
        "leases.coordination.k8s.io",
        "node-c",
        POLICY,
        &own("node-b"),
    );

    // VM status: only the VMs on the agent's node, and it may not hand one
    // to another node.
    for (name, node) in [("vm-a", "node-a"), ("vm-b", "node-b")] {
        assert_eq!(post(&admin, &vms, vm(name)).await.0, 201);
        let st = json!({"status": {"host": node}});
        assert_eq!(
            merge(&admin, &format!("{vms}/{name}/status"), st).await.0,
            200
        );
    }
    let running = json!({"status": {"message": "running"}});
    assert_eq!(
        merge(&a, &format!("{vms}/vm-a/status"), running.clone())
            .await
            .0,
        200
    );
    let vms_msg = "an agent on node-a may report only VMs it runs";
    assert_denied(
        &merge(&a, &format!("{vms}/vm-b/status"), running.clone()).await,
        "virtualmachines.ferry.dev",
        "vm-b",
        POLICY,
        vms_msg,
    );
    assert_denied(
        &merge(
            &a,
            &format!("{vms}/vm-a/status"),
            json!({"status": {"host": "node-b"}}),
        )
        .await,
        "virtualmachines.ferry.dev",
        "vm-a",
        POLICY,
        vms_msg,
    );
    assert_eq!(
        merge(&b, &format!("{vms}/vm-b/status"), running.clone())
            .await
            .0,
        200
    );

    // Migration status: only migrations from or to the agent's node.
    for (name, source, target) in [("m-ab", "node-a", "node-b"), ("m-bc", "node-b", "node-c")] {
        assert_eq!(
            post(&admin, &migrations, migration(name, "vm-a")).await.0,
            201
        );
        let st = json!({"status": {"sourceHost": source, "targetHost": target}});
        assert_eq!(
            merge(&admin, &format!("{migrations}/{name}/status"), st)
                .await
                .0,
            200
        );
    }
    let sending = json!({"status": {"message": "sending"}});
    assert_eq!(
        merge(&a, &format!("{migrations}/m-ab/status"), sending.clone())
            .await
            .0,
        200
    );
    assert_eq!(
        merge(&b, &format!("{migrations}/m-ab/status"), sending.clone())
            .await
            .0,
        200
    );
    assert_eq!(
        merge(&b, &format!("{migrations}/m-bc/status"), sending.clone())
            .await
            .0,
        200
    );
    assert_denied(
        &merge(&a, &format!("{migrations}/m-bc/status"), sending.clone()).await,
        "migrations.ferry.dev",
        "m-bc",
        POLICY,
        "an agent on node-a may report only migrations from or to it",
    );

    // A token without the node-name claim is refused outright.
    assert_denied(
        &merge(&nonode, &format!("{hosts}/node-a/status"), status.clone()).await,
        "hosts.ferry.dev",
        "node-a",
        POLICY,
        "the agent's token names no node; Kubernetes 1.32+ pod-bound tokens do",
    );

    // The controller is not matched by the policy.
    for (path, body) in [
        (
            format!("{hosts}/node-b"),
            json!({"spec": {"unschedulable": true}}),
        ),
        (
            format!("{hosts}/node-a/status"),
            json!({"status": {"phase": "Maintenance"}}),
        ),
        (
            format!("{vms}/vm-b/status"),
            json!({"status": {"migration": "m-ab"}}),
        ),
        (
            format!("{migrations}/m-bc/status"),
            json!({"status": {"message": "scheduling"}}),
        ),
    ] {
        let (code, answer) = merge(&controller, &path, body).await;
        assert_eq!(code, 200, "controller: PATCH {path}: {answer}");
    }
    assert_eq!(
        post(&controller, LEASES, lease("ferry-controller")).await.0,
        201
    );
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
           "metadata": {"name": name}, "spec": spec})
}
fn binding(name: &str, actions: Value) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
           "metadata": {"name": name}, "spec": {"policyName": name, "validationActions": actions}})
}
fn configmap(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_served_checked_and_enforced_over_http() {
    let s = TestServer::start().await;
    let admin = s.admin().await;
    let (code, list) = get(&admin, AR).await;
    assert_eq!(code, 200);
    let names: Vec<&str> = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for r in [
        "validatingadmissionpolicies",
        "validatingadmissionpolicies/status",
        "validatingadmissionpolicybindings",
    ] {
        assert!(names.contains(&r), "discovery lists {r}: {names:?}");
    }

    // A policy whose CEL does not compile is refused.
    let rules = json!({"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE", "DELETE"], "resources": ["configmaps"]}]});
    let (code, e) = post(
        &admin,
        &format!("{AR}/validatingadmissionpolicies"),
        policy(
            "broken",
            json!({"matchConstraints": rules, "validations": [{"expression": "object.("}]}),
        ),
    )
    .await;
    assert_eq!(code, 422, "{e}");
    assert_eq!(
        e["details"]["causes"][0]["field"],
        "spec.validations[0].expression"
    );

    // Small ConfigMaps only, outside namespace kube-public; a keep=true
    // ConfigMap cannot be deleted.
    let spec = json!({
        "matchConstraints": rules,
        "matchConditions": [{"name": "not-public", "expression": "request.namespace != 'kube-public'"}],
        "variables": [{"name": "size", "expression":
            "request.operation == 'DELETE' || !has(object.data) ? 0 : size(object.data)"}],
        "validations": [
            {"expression": "variables.size <= 2", "reason": "Forbidden",
             "messageExpression": "'at most 2 keys, got ' + string(variables.size) + ' from ' + request.userInfo.username"},
            {"expression": "request.operation != 'DELETE' || !has(oldObject.data) || !has(oldObject.data.keep)",
             "message": "kept"}]
    });
    assert_eq!(
        post(
            &admin,
            &format!("{AR}/validatingadmissionpolicies"),
            policy("small", spec)
        )
        .await
        .0,
        201
    );
    assert_eq!(
        post(
            &admin,
            &format!("{AR}/validatingadmissionpolicybindings"),
            binding("small", json!(["Deny"]))
        )
        .await
        .0,
        201
    );
    let cms = "/api/v1/namespaces/default/configmaps";
    let big = json!({"a": "1", "b": "2", "c": "3"});
    let (code, e) = post(&admin, cms, configmap("big", big.clone())).await;
    assert_eq!(code, 403, "reason Forbidden: {e}");
    assert_eq!(e["reason"], "Forbidden");
    assert_eq!(
        e["message"],
        "configmaps \"big\" is forbidden: ValidatingAdmissionPolicy 'small' with binding 'small' denied request: at most 2 keys, got 3 from ferry:admin"
    );
    assert_eq!(
        post(
            &admin,
            "/api/v1/namespaces/kube-public/configmaps",
            configmap("big", big.clone())
        )
        .await
        .0,
        201,
        "matchConditions exclude kube-public"
    );
    assert_eq!(
        post(&admin, cms, configmap("keep", json!({"keep": "yes"})))
            .await
            .0,
        201
    );
    let (code, e) = merge(&admin, &format!("{cms}/keep"), json!({"data": big.clone()})).await;
    assert_eq!(code, 403, "an update is judged too: {e}");
    let (code, e) = delete(&admin, &format!("{cms}/keep"), None).await;
    assert_eq!((code, e["reason"].as_str()), (422, Some("Invalid")), "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .ends_with("denied request: kept"),
        "{e}"
    );
    assert_eq!(get(&admin, &format!("{cms}/keep")).await.0, 200);

    // Switched to Warn: admitted, with the failure in a Warning header.
    let path = format!("{AR}/validatingadmissionpolicybindings/small");
    let (code, e) = merge(
        &admin,
        &path,
        json!({"spec": {"validationActions": ["Warn"]}}),
    )
    .await;
    assert_eq!(code, 200, "{e}");
    let (code, body, warnings) = call_warned(&admin, "POST", cms, configmap("big", big)).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        warnings,
        [
            "299 - \"Validation failed for ValidatingAdmissionPolicy 'small' with binding 'small': at most 2 keys, got 3 from ferry:admin\""
        ]
    );
    // Without its binding the policy does nothing.
    assert_eq!(delete(&admin, &path, None).await.0, 200);
    assert_eq!(delete(&admin, &format!("{cms}/keep"), None).await.0, 200);
}
