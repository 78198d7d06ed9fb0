//! Patch semantics checked against what kube-apiserver does with the same
//! requests.

use serde_json::{Value, json};

use super::*;

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T00:01:00Z";

#[test]
fn merge_patch_merges_objects_deletes_nulls_replaces_lists() {
    let t = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"list": [1, 2], "x": 1}});
    let p = json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"list": [3]}});
    assert_eq!(
        merge_patch(&t, &p).unwrap(),
        json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"list": [3], "x": 1}})
    );
    assert_eq!(merge_patch(&t, &json!([1])).unwrap_err().code(), 400);
}

#[test]
fn json_patch_applies_and_maps_failures() {
    let t = json!({"spec": {"replicas": 1, "tags": ["a"]}});
    let p = json!([
        {"op": "replace", "path": "/spec/replicas", "value": 3},
        {"op": "add", "path": "/spec/tags/-", "value": "b"},
        {"op": "test", "path": "/spec/replicas", "value": 3}
    ]);
    assert_eq!(
        json_patch(&t, &p).unwrap(),
        json!({"spec": {"replicas": 3, "tags": ["a", "b"]}})
    );
    let e = json_patch(
        &t,
        &json!([{"op": "test", "path": "/spec/replicas", "value": 9}]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        PatchError::Unprocessable("testing value /spec/replicas failed: test failed".into())
    );
    let e = json_patch(&t, &json!([{"op": "remove", "path": "/spec/nope"}])).unwrap_err();
    assert_eq!(e.code(), 422);
    assert_eq!(
        e.to_string(),
        r#"remove operation does not apply: doc is missing path: "/spec/nope": missing value"#
    );
    assert_eq!(json_patch(&t, &json!({"op": "x"})).unwrap_err().code(), 400);
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d", "finalizers": ["a"]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
            "template": {"spec": {
                "containers": [
                    {"name": "app", "image": "app:1",
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                     "ports": [{"containerPort": 80}]},
                    {"name": "sidecar", "image": "side:1"}
                ],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            }}}
    })
}

#[test]
fn strategic_merge_merges_containers_and_env_by_name() {
    let p = json!({"spec": {"template": {"spec": {
        "containers": [{"name": "app", "image": "app:2", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}],
        "tolerations": [{"key": "other", "operator": "Exists"}]
    }}}});
    let out = strategic_merge_patch(&deployment(), &p).unwrap();
    let containers = &out["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers.as_array().unwrap().len(), 2, "sidecar kept");
    assert_eq!(containers[0]["image"], "app:2");
    assert_eq!(
        containers[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
    );
    assert_eq!(containers[0]["ports"], json!([{"containerPort": 80}]));
    assert_eq!(
        out["spec"]["template"]["spec"]["tolerations"],
        json!([{"key": "other", "operator": "Exists"}]),
        "lists without a merge key are replaced"
    );
}

#[test]
fn strategic_merge_directives() {
    let p = json!({
        "metadata": {"finalizers": ["b"], "$deleteFromPrimitiveList/finalizers": ["a"]},
        "spec": {"selector": {"$patch": "replace", "matchLabels": {"app": "e"}},
            "template": {"spec": {
                "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "app"}],
                "containers": [{"name": "app", "$patch": "delete"}, {"name": "new", "image": "n"}]
            }}}
    });
    let out = strategic_merge_patch(&deployment(), &p).unwrap();
    assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    assert_eq!(
        out["spec"]["selector"],
        json!({"matchLabels": {"app": "e"}})
    );
    let names: Vec<&str> = out["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sidecar", "new"]);
    let e = strategic_merge_patch(
        &deployment(),
        &json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}}),
    )
    .unwrap_err();
    assert_eq!(e.code(), 400);
}

#[test]
fn strategic_merge_service_ports_by_port() {
    let svc =
        json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
    let out = strategic_merge_patch(
        &svc,
        &json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}),
    )
    .unwrap();
    assert_eq!(
        out["spec"]["ports"],
        json!([{"port": 80, "name": "http"}, {"port": 443, "name": "https", "targetPort": 8443}])
    );
}

fn apply(
    live: Option<&Value>,
    cfg: &Value,
    manager: &str,
    force: bool,
    time: &str,
) -> Result<Value, ApplyError> {
    let opts = ApplyOptions {
        manager,
        force,
        time,
        subresource: None,
        ignore_status: false,
    };
    server_side_apply(live, cfg, &opts, &BuiltinListTypes)
}

fn cm(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}, "data": data})
}

#[test]
fn apply_creates_and_records_fields_v1() {
    let out = apply(None, &cm(json!({"a": "1", "b": "2"})), "kubectl", false, T0).unwrap();
    assert_eq!(out["data"], json!({"a": "1", "b": "2"}));
    assert_eq!(
        out["metadata"]["managedFields"],
        json!([{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1", "time": T0,
                "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:a": {}, "f:b": {}}}}])
    );
}

#[test]
fn apply_conflicts_with_another_manager_unless_forced() {
    let live = apply(None, &cm(json!({"a": "1"})), "alice", false, T0).unwrap();
    // Same value: shared ownership, no conflict.
    let shared = apply(
        Some(&live),
        &cm(json!({"a": "1", "z": "0"})),
        "bob",
        false,
        T1,
    )
    .unwrap();
    assert_eq!(
        shared["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Different value: conflict, reported like the real server.
    let e = apply(Some(&live), &cm(json!({"a": "2"})), "bob", false, T1).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"Apply failed with 1 conflict: conflict with "alice": .data.a"#
    );
    let ApplyError::Conflicts(c) = &e else {
        panic!("{e:?}")
    };
    let status = conflict_status(c);
    assert_eq!(status["code"], 409);
    assert_eq!(status["reason"], "Conflict");
    assert_eq!(
        status["details"]["causes"],
        json!([{"reason": "FieldManagerConflict", "message": "conflict with \"alice\"", "field": ".data.a"}])
    );
    // Forced: bob takes the field, alice loses it (and her now empty entry).
    let forced = apply(Some(&live), &cm(json!({"a": "2"})), "bob", true, T1).unwrap();
    assert_eq!(forced["data"]["a"], "2");
    let mf = forced["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0]["manager"], "bob");
}

#[test]
fn apply_removes_fields_the_manager_stopped_stating() {
    let live = apply(None, &cm(json!({"a": "1", "b": "2"})), "alice", false, T0).unwrap();
    let live = apply(Some(&live), &cm(json!({"b": "2"})), "bob", false, T0).unwrap();
    let out = apply(Some(&live), &cm(json!({})), "alice", false, T1).unwrap();
    assert_eq!(
        out["data"],
        json!({"b": "2"}),
        "a removed; b still owned by bob"
    );
}

#[test]
fn updates_are_tracked_and_conflict_with_appliers() {
    let mut created = cm(json!({"a": "1"}));
    track_update(
        None,
        &mut created,
        &UpdateOptions {
            manager: "kubectl-create",
            time: T0,
            subresource: None,
        },
        &BuiltinListTypes,
    );
    assert_eq!(
        created["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:data": {"f:a": {}}})
    );
    let e = apply(Some(&created), &cm(json!({"a": "2"})), "kubectl", false, T1).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"Apply failed with 1 conflict: conflict with "kubectl-create" using v1: .data.a"#
    );
    let mut edited = created.clone();
    edited["data"] = json!({"b": "1"});
    track_update(
        Some(&created),
        &mut edited,
        &UpdateOptions {
            manager: "kubectl-edit",
            time: T1,
            subresource: None,
        },
        &BuiltinListTypes,
    );
    let mf = edited["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(mf.len(), 1, "kubectl-create lost its only field");
    assert_eq!(mf[0]["manager"], "kubectl-edit");
    assert_eq!(mf[0]["fieldsV1"], json!({"f:data": {"f:b": {}}}));
}

#[test]
fn first_apply_to_an_unmanaged_object_credits_before_first_apply() {
    let live = cm(json!({"a": "1"}));
    let e = apply(Some(&live), &cm(json!({"a": "2"})), "kubectl", false, T1).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"Apply failed with 1 conflict: conflict with "before-first-apply" using v1: .data.a"#
    );
}

#[test]
fn apply_merges_map_lists_by_schema_keys() {
    let types = SchemaListTypes::new(
        json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "disks": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "string"}}}},
        "args": {"type": "array", "items": {"type": "string"}}}}}}),
    );
    let vm = |disks: Value, args: Value| {
        json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm"}, "spec": {"disks": disks, "args": args}})
    };
    let opts = |m| ApplyOptions {
        manager: m,
        force: false,
        time: T0,
        subresource: None,
        ignore_status: false,
    };
    let live = server_side_apply(
        None,
        &vm(json!([{"name": "root", "size": "1Gi"}]), json!(["a"])),
        &opts("alice"),
        &types,
    )
    .unwrap();
    assert_eq!(
        live["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:spec": {"f:args": {}, "f:disks": {"k:{\"name\":\"root\"}": {".": {}, "f:name": {}, "f:size": {}}}}})
    );
    let cfg = json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "vm"},
        "spec": {"disks": [{"name": "data", "size": "2Gi"}]}});
    let out = server_side_apply(Some(&live), &cfg, &opts("bob"), &types).unwrap();
    assert_eq!(
        out["spec"]["disks"],
        json!([{"name": "root", "size": "1Gi"}, {"name": "data", "size": "2Gi"}]),
        "items keyed by name are merged, not replaced"
    );
    let cfg = json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "vm"},
        "spec": {"disks": [{"name": "root", "size": "5Gi"}]}});
    let e = server_side_apply(Some(&out), &cfg, &opts("bob"), &types).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"Apply failed with 1 conflict: conflict with "alice": .spec.disks[name="root"].size"#
    );
}

#[test]
fn apply_to_status_subresource_only_takes_status() {
    let live =
        json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "x"}, "spec": {"a": 1}});
    let cfg = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "x"}, "spec": {"a": 2}, "status": {"phase": "Ready"}});
    let opts = ApplyOptions {
        manager: "ctrl",
        force: false,
        time: T0,
        subresource: Some("status"),
        ignore_status: false,
    };
    let out = server_side_apply(Some(&live), &cfg, &opts, &BuiltinListTypes).unwrap();
    assert_eq!(out["spec"]["a"], 1);
    assert_eq!(out["status"]["phase"], "Ready");
    let mf = out["metadata"]["managedFields"].as_array().unwrap();
    let ctrl = mf.iter().find(|e| e["manager"] == "ctrl").unwrap();
    assert_eq!(ctrl["subresource"], "status");
    assert_eq!(ctrl["fieldsV1"], json!({"f:status": {"f:phase": {}}}));
}

#[test]
fn a_repeated_apply_changes_nothing() {
    let live = apply(None, &cm(json!({"a": "1"})), "ctrl", false, T0).unwrap();
    let again = apply(Some(&live), &cm(json!({"a": "1"})), "ctrl", false, T1).unwrap();
    assert_eq!(again, live, "same object, same managedFields time");
    let changed = apply(Some(&live), &cm(json!({"a": "2"})), "ctrl", false, T1).unwrap();
    assert_eq!(changed["metadata"]["managedFields"][0]["time"], T1);
    let mut updated = live.clone();
    track_update(
        Some(&live),
        &mut updated,
        &UpdateOptions {
            manager: "other",
            time: T1,
            subresource: None,
        },
        &BuiltinListTypes,
    );
    assert_eq!(
        updated, live,
        "an update that changes nothing records nothing"
    );
}

#[test]
fn custom_resource_metadata_lists_merge_like_object_meta() {
    let types = SchemaListTypes::new(
        json!({"type": "object", "properties": {"metadata": {"type": "object"}}}),
    );
    assert_eq!(types.list_type(&["metadata", "finalizers"]), ListType::Set);
    assert_eq!(
        types.list_type(&["metadata", "ownerReferences"]),
        ListType::Map(vec!["uid".into()])
    );
    let cr = |fin: Value| json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": "h", "finalizers": fin}});
    let opts = |m| ApplyOptions {
        manager: m,
        force: false,
        time: T0,
        subresource: None,
        ignore_status: false,
    };
    let live = server_side_apply(None, &cr(json!(["a"])), &opts("one"), &types).unwrap();
    let out = server_side_apply(Some(&live), &cr(json!(["b"])), &opts("two"), &types).unwrap();
    assert_eq!(
        out["metadata"]["finalizers"],
        json!(["a", "b"]),
        "each manager owns its finalizer"
    );
}

#[test]
fn apply_removes_list_items_the_manager_dropped() {
    let d = |containers: Value| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"template": {"spec": {"containers": containers}}}})
    };
    let both = d(json!([{"name": "web", "image": "a"}, {"name": "sidecar", "image": "b"}]));
    let live = apply(None, &both, "kubectl", false, T0).unwrap();
    let out = apply(
        Some(&live),
        &d(json!([{"name": "web", "image": "a"}])),
        "kubectl",
        false,
        T1,
    )
    .unwrap();
    assert_eq!(
        out["spec"]["template"]["spec"]["containers"],
        json!([{"name": "web", "image": "a"}])
    );
    assert_eq!(
        out["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}}}})
    );
    // An item another manager also states survives the first one dropping it.
    let shared = apply(
        Some(&live),
        &d(json!([{"name": "sidecar", "image": "b"}])),
        "ops",
        false,
        T1,
    )
    .unwrap();
    let out = apply(
        Some(&shared),
        &d(json!([{"name": "web", "image": "a"}])),
        "kubectl",
        false,
        T1,
    )
    .unwrap();
    assert_eq!(
        out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
