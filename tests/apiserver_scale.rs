//! The scale subresource of Deployments and of custom resources whose CRD
//! declares it (raw HTTP and `kubectl scale`), and ClusterRole aggregation
//! as kube-controller-manager fills aggregated roles.

mod common;

use common::kubectl::Kubectl;
use common::*;
use serde_json::{Value, json};

const DEPLOY: &str = "/apis/apps/v1/namespaces/default/deployments";

fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}
            }
        }
    })
}

fn gadget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.test.ferry.dev"},
        "spec": {
            "group": "test.ferry.dev",
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"}
                },
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "properties": {
                            "replicas": {"type": "integer", "minimum": 0, "maximum": 10}}},
                        "status": {"type": "object", "properties": {
                            "replicas": {"type": "integer"}, "selector": {"type": "string"}}}
                    }
                }}
            }]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_scale_through_the_subresource() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    assert_eq!(post(&c, DEPLOY, deployment("web")).await.0, 201);
    let scale_path = format!("{DEPLOY}/web/scale");

    let (code, scale) = get(&c, &scale_path).await;
    assert_eq!(code, 200, "{scale}");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["apiVersion"], "autoscaling/v1");
    assert_eq!(scale["spec"]["replicas"], 1);
    assert_eq!(
        scale["status"],
        json!({"replicas": 0, "selector": "app=web"})
    );
    let rv = scale["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // PUT with a stale resourceVersion is a conflict; with the current one
    // it sets the Deployment's replicas.
    let mut stale = scale.clone();
    stale["spec"]["replicas"] = json!(3);
    stale["metadata"]["resourceVersion"] = json!("1");
    assert_eq!(put(&c, &scale_path, stale).await.0, 409);
    let mut want = scale.clone();
    want["spec"]["replicas"] = json!(3);
    let (code, after) = put(&c, &scale_path, want).await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["spec"]["replicas"], 3);
    assert_ne!(after["metadata"]["resourceVersion"], json!(rv));
    let (_, d) = get(&c, &format!("{DEPLOY}/web")).await;
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["metadata"]["generation"], 2);

    // Merge patch, as kubectl scale sends.
    let (code, after) = call(
        &c,
        "PATCH",
        &scale_path,
        Some(json!({"spec": {"replicas": 5}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!((code, after["spec"]["replicas"].clone()), (200, json!(5)));
    let mut bad = after.clone();
    bad["spec"]["replicas"] = json!(-1);
    let (code, err) = put(&c, &scale_path, bad).await;
    assert_eq!(code, 422, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "spec.replicas");

    // Discovery names the subresource and its kind, for scale clients.
    let (_, apps) = get(&c, "/apis/apps/v1").await;
    let sub = apps["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "deployments/scale")
        .cloned()
        .expect("deployments/scale listed");
    assert_eq!(
        (sub["group"].clone(), sub["kind"].clone()),
        (json!("autoscaling"), json!("Scale"))
    );
    // DaemonSets have no scale subresource.
    assert_eq!(
        get(&c, "/apis/apps/v1/namespaces/default/daemonsets/x/scale")
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_deployments_and_custom_resources() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let k = Kubectl::new(&s);
    assert_eq!(post(&c, DEPLOY, deployment("web")).await.0, 201);
    k.ok(&["scale", "deployment", "web", "--replicas=4"]).await;
    assert_eq!(
        k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "4"
    );
    // --current-replicas is a precondition.
    let (ok, _, err) = k
        .run(&[
            "scale",
            "deployment",
            "web",
            "--current-replicas=2",
            "--replicas=1",
        ])
        .await;
    assert!(!ok, "{err}");

    let (code, body) = post(
        &c,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        gadget_crd(),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let gadgets = "/apis/test.ferry.dev/v1/namespaces/default/gadgets";
    eventually(|| async { (get(&c, gadgets).await.0 == 200).then_some(()) }).await;
    let g = json!({"apiVersion": "test.ferry.dev/v1", "kind": "Gadget", "metadata": {"name": "g1"},
        "spec": {"replicas": 1}});
    assert_eq!(post(&c, gadgets, g).await.0, 201);
    k.ok(&["scale", "gadget", "g1", "--replicas=2"]).await;
    let (_, g) = get(&c, &format!("{gadgets}/g1")).await;
    assert_eq!(g["spec"]["replicas"], 2);
    // The CRD's schema still applies to the scaled field.
    let (ok, _, err) = k.run(&["scale", "gadget", "g1", "--replicas=11"]).await;
    assert!(!ok && err.contains("spec.replicas"), "{err}");
    let (_, scale) = get(&c, &format!("{gadgets}/g1/scale")).await;
    assert_eq!(scale["spec"]["replicas"], 2);
}

const ROLES: &str = "/apis/rbac.authorization.k8s.io/v1/clusterroles";

fn rule(verb: &str, resource: &str) -> Value {
    json!({"verbs": [verb], "apiGroups": [""], "resources": [resource]})
}

async fn rules_of(c: &kube::Client, name: &str) -> Value {
    let (_, r) = get(c, &format!("{ROLES}/{name}")).await;
    r.get("rules").cloned().unwrap_or(json!([]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_cluster_roles_collect_the_rules_of_matching_roles() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let label = "rbac.example.com/aggregate-to-monitoring";
    let agg = json!({"metadata": {"name": "monitoring"},
        "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label: "true"}}]},
        "rules": [rule("delete", "secrets")]});
    assert_eq!(post(&c, ROLES, agg).await.0, 201);
    // Nothing matches yet: the controller owns the rules and empties them.
    eventually(|| async { (rules_of(&c, "monitoring").await == json!([])).then_some(()) }).await;

    let pods = json!({"metadata": {"name": "b-pods", "labels": {label: "true"}},
        "rules": [rule("get", "pods"), rule("list", "pods")]});
    let svcs = json!({"metadata": {"name": "a-services", "labels": {label: "true"}},
        "rules": [rule("get", "services"), rule("get", "pods")]});
    let other = json!({"metadata": {"name": "c-other"}, "rules": [rule("*", "*")]});
    for r in [pods, svcs, other] {
        assert_eq!(post(&c, ROLES, r).await.0, 201);
    }
    let want = json!([
        rule("get", "services"),
        rule("get", "pods"),
        rule("list", "pods")
    ]);
    eventually(|| async { (rules_of(&c, "monitoring").await == want).then_some(()) }).await;

    // A role that stops matching takes its rules away.
    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{ROLES}/a-services"),
        Some(json!({"metadata": {"labels": null}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, 200);
    let want = json!([rule("get", "pods"), rule("list", "pods")]);
    eventually(|| async { (rules_of(&c, "monitoring").await == want).then_some(()) }).await;
}
