#![recursion_limit = "256"]
//! The schema, patch, table and OpenAPI pieces driven by the real kubectl
//! through the small HTTP front in `schema_support`: what kubectl prints
//! for `explain`, `get`, `apply` (client- and server-side) and validation
//! errors is checked against kubectl itself.

mod schema_support;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use schema_support::{Kubectl, serve};
use serde_json::{Value, json};

fn crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualmachines.ferry.dev"},
        "spec": {"group": "ferry.dev", "scope": "Namespaced",
            "names": {"kind": "VirtualMachine", "plural": "virtualmachines", "singular": "virtualmachine",
                      "listKind": "VirtualMachineList", "shortNames": ["vm"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "additionalPrinterColumns": [
                    {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
                    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                    "spec": {"type": "object", "description": "The desired state of the virtual machine.",
                        "required": ["host"],
                        "properties": {
                            "host": {"type": "string", "description": "The Host the VM runs on."},
                            "mode": {"type": "string", "enum": ["Auto", "Custom"], "default": "Auto",
                                     "description": "How bandwidth is chosen."},
                            "disks": {"type": "array", "x-kubernetes-list-type": "map",
                                      "x-kubernetes-list-map-keys": ["name"],
                                      "items": {"type": "object", "required": ["name"], "properties": {
                                          "name": {"type": "string"}, "size": {"type": "string"}}}}}}}}}}]}
    }))
    .unwrap()
}

#[test]
fn kubectl_explain_apply_get_and_errors() {
    let k = Kubectl::new(serve(crd()));

    let explain = k.ok(&["explain", "virtualmachines.spec"]);
    assert!(explain.contains("FIELD: spec <Object>"), "{explain}");
    assert!(
        explain.contains("The desired state of the virtual machine."),
        "{explain}"
    );
    assert!(explain.contains("host\t<string> -required-"), "{explain}");
    assert!(explain.contains("The Host the VM runs on."), "{explain}");
    assert!(explain.contains("enum: Auto, Custom"), "{explain}");

    let vm = k.file("vm.yaml", "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: vm1\nspec:\n  host: h1\n  disks:\n  - name: root\n    size: 1Gi\n");
    let out = k.ok(&["apply", "--server-side", "-f", &vm]);
    assert_eq!(
        out.trim(),
        "virtualmachine.ferry.dev/vm1 serverside-applied"
    );
    let got: Value =
        serde_json::from_str(&k.ok(&["get", "vm", "vm1", "-o", "json", "--show-managed-fields"]))
            .unwrap();
    assert_eq!(got["spec"]["mode"], "Auto", "defaulted");
    assert_eq!(got["metadata"]["managedFields"][0]["manager"], "kubectl");
    assert_eq!(got["metadata"]["managedFields"][0]["operation"], "Apply");

    let other = k.file("other.yaml", "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: vm1\nspec:\n  host: h2\n  disks:\n  - name: data\n    size: 2Gi\n");
    let (ok, _, err) = k.run(&[
        "apply",
        "--server-side",
        "--field-manager",
        "ops",
        "-f",
        &other,
    ]);
    assert!(!ok);
    assert!(
        err.contains(r#"Apply failed with 1 conflict: conflict with "kubectl": .spec.host"#),
        "{err}"
    );
    k.ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        "ops",
        "-f",
        &other,
    ]);
    let got = k.json(&["vm", "vm1"]);
    assert_eq!(got["spec"]["host"], "h2");
    assert_eq!(
        got["spec"]["disks"],
        json!([{"name": "root", "size": "1Gi"}, {"name": "data", "size": "2Gi"}])
    );

    let table = k.ok(&["get", "vm"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["NAME", "HOST", "MODE", "AGE"], "{table}");
    assert_eq!(lines[1], ["vm1", "h2", "Auto", "5m"], "{table}");

    let bad = k.file("bad.yaml", "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: bad\nspec:\n  host: h\n  mode: Fast\n");
    let (ok, _, err) = k.run(&["create", "-f", &bad]);
    assert!(!ok);
    assert!(
        err.contains(r#"The VirtualMachine "bad" is invalid: "#),
        "{err}"
    );
    assert!(
        err.contains(r#"spec.mode: Unsupported value: "Fast": supported values: "Auto", "Custom""#),
        "{err}"
    );

    let unknown = k.file("unknown.yaml", "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: u\nspec:\n  host: h\n  colour: red\n");
    let (ok, _, err) = k.run(&["create", "-f", &unknown]);
    assert!(!ok);
    assert!(
        err.contains(r#"strict decoding error: unknown field "spec.colour""#),
        "{err}"
    );
    let (ok, _, err) = k.run(&["create", "--validate=warn", "-f", &unknown]);
    assert!(ok, "{err}");
    assert!(err.contains(r#"unknown field "spec.colour""#), "{err}");
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1
        env:
        - {name: A, value: '1'}
        - {name: B, value: '2'}
        ports:
        - containerPort: 80
      - name: sidecar
        image: side:1
";

#[test]
fn kubectl_client_side_apply_of_a_deployment_merges_by_key() {
    let k = Kubectl::new(serve(crd()));
    let explain = k.ok(&["explain", "deployments.spec.template.spec.containers.env"]);
    assert!(explain.contains("FIELD: env <[]EnvVar>"), "{explain}");
    let first = k.file("d1.yaml", DEPLOYMENT);
    assert_eq!(
        k.ok(&["apply", "-f", &first]).trim(),
        "deployment.apps/web created"
    );
    // Remove the sidecar and env B, change the image, add a port.
    let second = DEPLOYMENT
        .replace("image: nginx:1", "image: nginx:2")
        .replace("        - {name: B, value: '2'}\n", "")
        .replace(
            "        - containerPort: 80\n",
            "        - containerPort: 80\n        - containerPort: 443\n",
        )
        .replace("      - name: sidecar\n        image: side:1\n", "");
    let second = k.file("d2.yaml", &second);
    assert_eq!(
        k.ok(&["apply", "-f", &second]).trim(),
        "deployment.apps/web configured"
    );
    let d = k.json(&["deployment", "web"]);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"],
        json!([{"name": "web", "image": "nginx:2", "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 80}, {"containerPort": 443}]}])
    );
    let managers: Vec<&str> = d["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["kubectl-client-side-apply"]);

    k.ok(&["label", "deployment", "web", "tier=front"]);
    k.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
    ]);
    let (ok, _, err) = k.run(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/nope"}]"#,
    ]);
    assert!(!ok);
    assert!(err.contains("doc is missing path"), "{err}");
    let d = k.json(&["deployment", "web"]);
    assert_eq!(d["metadata"]["labels"]["tier"], "front");
    assert_eq!(d["spec"]["replicas"], 3);

    let table = k.ok(&["get", "deployments", "-o", "wide"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ],
        "{table}"
    );
    assert_eq!(
        lines[1],
        ["web", "0/3", "0", "0", "5m", "web", "nginx:2", "app=web"],
        "{table}"
    );
}

#[tokio::test]
async fn kube_rs_patch_apply_creates_conflicts_and_forces() {
    use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
    use kube::core::GroupVersionKind;

    let addr = serve(crd());
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let gvk = GroupVersionKind::gvk("ferry.dev", "v1alpha1", "VirtualMachine");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "virtualmachines");
    let api: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let vm = |host: &str| {
        json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
               "metadata": {"name": "vm2"}, "spec": {"host": host}})
    };
    let created = api
        .patch(
            "vm2",
            &PatchParams::apply("ferry-controller"),
            &Patch::Apply(vm("h1")),
        )
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["mode"], "Auto");
    let mf = created.metadata.managed_fields.unwrap();
    assert_eq!(mf[0].manager.as_deref(), Some("ferry-controller"));

    let err = api
        .patch(
            "vm2",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(vm("h2")),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}");
    };
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "Conflict");
    assert_eq!(
        status.message,
        r#"Apply failed with 1 conflict: conflict with "ferry-controller": .spec.host"#
    );
    let forced = api
        .patch(
            "vm2",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(vm("h2")),
        )
        .await
        .unwrap();
    assert_eq!(forced.data["spec"]["host"], "h2");
}

#[test]
fn kubectl_server_side_apply_of_a_deployment_drops_what_it_no_longer_states() {
    let k = Kubectl::new(serve(crd()));
    let first = k.file("d1.yaml", DEPLOYMENT);
    assert_eq!(
        k.ok(&["apply", "--server-side", "-f", &first]).trim(),
        "deployment.apps/web serverside-applied"
    );
    let second = DEPLOYMENT
        .replace("        - {name: B, value: '2'}\n", "")
        .replace("      - name: sidecar\n        image: side:1\n", "");
    let second = k.file("d2.yaml", &second);
    k.ok(&["apply", "--server-side", "-f", &second]);
    let d = k.json(&["deployment", "web"]);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"],
        json!([{"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 80}]}])
    );
    let fields = &d["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"];
    assert!(fields.get(r#"k:{"name":"web"}"#).is_some(), "{fields}");
    assert!(fields.get(r#"k:{"name":"sidecar"}"#).is_none(), "{fields}");
}
