//! The documents checked the way kubectl reads them: `kubectl explain`
//! finds a kind by `x-kubernetes-group-version-kind` and follows `$ref`s;
//! kubectl's query-parameter verifier looks for `fieldValidation` on the
//! kind's PATCH operation.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::*;

fn crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualmachines.ferry.dev"},
        "spec": {"group": "ferry.dev", "scope": "Namespaced",
            "names": {"kind": "VirtualMachine", "plural": "virtualmachines", "singular": "virtualmachine", "listKind": "VirtualMachineList"},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "description": "What the VM should be.", "properties": {
                        "host": {"type": "string", "description": "The host to run on."},
                        "port": {"x-kubernetes-int-or-string": true, "nullable": true}}}}}}},
                {"name": "v0", "served": false, "storage": false}]}
    }))
    .unwrap()
}

/// Every `$ref` in `doc` points at a schema the document defines.
fn assert_refs_resolve(doc: &Value, prefix: &str, defs: &Value) {
    match doc {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                let name = r
                    .strip_prefix(prefix)
                    .unwrap_or_else(|| panic!("ref {r} outside {prefix}"));
                assert!(defs.get(name).is_some(), "dangling ref {r}");
            }
            m.values()
                .for_each(|v| assert_refs_resolve(v, prefix, defs));
        }
        Value::Array(a) => a.iter().for_each(|v| assert_refs_resolve(v, prefix, defs)),
        _ => {}
    }
}

/// kubectl's `supportsQueryParamV3`.
fn supports_field_validation(doc: &Value, group: &str, version: &str, kind: &str) -> bool {
    let want = json!({"group": group, "version": version, "kind": kind});
    doc["paths"].as_object().unwrap().values().any(|item| {
        item.get("patch").is_some_and(|op| {
            op["x-kubernetes-group-version-kind"] == want
                && op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
        })
    })
}

/// kubectl explain's lookup: the schema whose GVK extension names the kind.
fn find_kind<'a>(defs: &'a Value, group: &str, version: &str, kind: &str) -> &'a Value {
    defs.as_object()
        .unwrap()
        .values()
        .find(|s| {
            s["x-kubernetes-group-version-kind"]
                .as_array()
                .is_some_and(|a| {
                    a.contains(&json!({"group": group, "version": version, "kind": kind}))
                })
        })
        .unwrap_or_else(|| panic!("no schema for {kind}"))
}

#[test]
fn crd_v3_document_serves_explain_and_field_validation() {
    let res = crd_resources(&crd());
    assert_eq!(res.len(), 1, "only served versions");
    let index = v3_index(&res);
    let url = index["paths"]["apis/ferry.dev/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .unwrap();
    assert!(
        url.starts_with("/openapi/v3/apis/ferry.dev/v1alpha1?hash="),
        "{url}"
    );
    let doc = v3_group_version(&res, "apis/ferry.dev/v1alpha1").unwrap();
    assert_eq!(doc["openapi"], "3.0.0");
    let defs = &doc["components"]["schemas"];
    assert_refs_resolve(&doc, "#/components/schemas/", defs);
    let vm = find_kind(defs, "ferry.dev", "v1alpha1", "VirtualMachine");
    assert_eq!(
        vm["properties"]["spec"]["properties"]["host"]["description"],
        "The host to run on."
    );
    assert_eq!(
        vm["properties"]["metadata"]["allOf"][0]["$ref"],
        "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    );
    assert!(
        vm["properties"]["kind"]["description"]
            .as_str()
            .unwrap()
            .starts_with("Kind is a string")
    );
    assert!(
        defs["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]["properties"]["name"].is_object()
    );
    find_kind(defs, "ferry.dev", "v1alpha1", "VirtualMachineList");
    assert!(supports_field_validation(
        &doc,
        "ferry.dev",
        "v1alpha1",
        "VirtualMachine"
    ));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key(
        "/apis/ferry.dev/v1alpha1/namespaces/{namespace}/virtualmachines/{name}/status"
    ));
    let patch =
        &paths["/apis/ferry.dev/v1alpha1/namespaces/{namespace}/virtualmachines/{name}"]["patch"];
    assert!(
        patch["requestBody"]["content"]
            .get("application/strategic-merge-patch+json")
            .is_none()
    );
    assert!(v3_group_version(&res, "apis/ferry.dev/v0").is_none());
}

#[test]
fn builtin_documents_carry_the_real_schema_names() {
    let res = builtin_resources();
    let index = v3_index(&res);
    for gv in [
        "api/v1",
        "apis/apps/v1",
        "apis/coordination.k8s.io/v1",
        "apis/events.k8s.io/v1",
        "apis/rbac.authorization.k8s.io/v1",
        "apis/apiextensions.k8s.io/v1",
    ] {
        assert!(index["paths"].get(gv).is_some(), "{gv} missing from index");
    }
    let doc = v3_group_version(&res, "apis/apps/v1").unwrap();
    let defs = &doc["components"]["schemas"];
    assert_refs_resolve(&doc, "#/components/schemas/", defs);
    let d = find_kind(defs, "apps", "v1", "Deployment");
    assert_eq!(d, &defs["io.k8s.api.apps.v1.Deployment"]);
    assert!(defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"].is_object());
    assert!(supports_field_validation(&doc, "apps", "v1", "Deployment"));
    let containers = &defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
    assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
    assert_eq!(containers["x-kubernetes-patch-strategy"], "merge");
    assert_eq!(containers["x-kubernetes-list-map-keys"], json!(["name"]));
    let ports = &defs["io.k8s.api.core.v1.Container"]["properties"]["ports"];
    assert_eq!(ports["x-kubernetes-patch-merge-key"], "containerPort");
    assert_eq!(
        defs["io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"]["x-kubernetes-map-type"],
        "atomic"
    );
    let core = v3_group_version(&res, "api/v1").unwrap();
    assert!(
        core["paths"]
            .get("/api/v1/namespaces/{namespace}/configmaps/{name}")
            .is_some()
    );
    assert!(
        core["paths"].get("/api/v1/namespaces/{name}").is_some(),
        "namespaces are cluster-scoped"
    );
    assert!(supports_field_validation(&core, "", "v1", "Secret"));
}

#[test]
fn v2_document_uses_definitions_and_v2_parameters() {
    let mut res = builtin_resources();
    res.extend(crd_resources(&crd()));
    let doc = v2(&res);
    assert_eq!(doc["swagger"], "2.0");
    let defs = &doc["definitions"];
    assert_refs_resolve(&doc, "#/definitions/", defs);
    let vm = find_kind(defs, "ferry.dev", "v1alpha1", "VirtualMachine");
    assert_eq!(
        vm["properties"]["metadata"]["$ref"],
        "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    );
    let port = &vm["properties"]["spec"]["properties"]["port"];
    assert!(port.get("nullable").is_none() && port.get("type").is_none());
    let patch = &doc["paths"]["/apis/ferry.dev/v1alpha1/namespaces/{namespace}/virtualmachines/{name}"]
        ["patch"];
    let fv = patch["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fieldValidation")
        .unwrap();
    assert_eq!(fv["type"], "string");
    assert!(
        patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["in"] == "body" && p["schema"]["$ref"].is_string())
    );
    assert_eq!(
        patch["responses"]["200"]["schema"]["$ref"],
        "#/definitions/dev.ferry.v1alpha1.VirtualMachine"
    );
}

#[test]
fn unknown_fields_of_builtin_kinds_are_named_by_path() {
    let res = builtin_resources();
    let deploy = res.iter().find(|r| r.kind == "Deployment").unwrap();
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"a": "b"}, "bogus": 1},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
                {"name": "web", "imagee": "nginx", "resources": {"limits": {"cpu": "1"}},
                 "ports": [{"containerPort": 80, "protocl": "TCP"}]}]}}}});
    assert_eq!(
        unknown_fields(deploy, &d),
        vec![
            "metadata.bogus",
            "spec.template.spec.containers[0].imagee",
            "spec.template.spec.containers[0].ports[0].protocl",
        ]
    );
    let cm = res.iter().find(|r| r.kind == "ConfigMap").unwrap();
    assert!(
        unknown_fields(
            cm,
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"}})
        )
        .is_empty()
    );
    let crd = res
        .iter()
        .find(|r| r.kind == "CustomResourceDefinition")
        .unwrap();
    let c = json!({"spec": {"group": "g", "versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {"a": {"type": "string", "x-kubernetes-validations": [{"rule": "true"}]}}}}}],
        "nope": true}});
    assert_eq!(unknown_fields(crd, &c), vec!["spec.nope"]);
}
