//! Protocol-level tests of the embedded API server: discovery, CRUD with the
//! real server's status codes and `Status` bodies, selectors, pagination,
//! status subresource and generation, finalizers, namespaces, GC.

mod common;

use common::*;
use serde_json::{Value, json};

const CM: &str = "/api/v1/namespaces/default/configmaps";

fn cm(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}})
}

#[tokio::test]
async fn discovery_lists_builtin_and_custom_resources() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let v = c.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
    let core = c.list_core_api_resources("v1").await.unwrap();
    let cm = core
        .resources
        .iter()
        .find(|r| r.name == "configmaps")
        .unwrap();
    assert_eq!(cm.short_names.as_deref(), Some(&["cm".to_string()][..]));
    assert!(cm.namespaced);
    assert!(core.resources.iter().any(|r| r.name == "namespaces/status"));
    let groups = c.list_api_groups().await.unwrap();
    assert!(
        groups
            .groups
            .iter()
            .any(|g| g.name == "coordination.k8s.io")
    );
    assert!(!groups.groups.iter().any(|g| g.name == "test.ferry.dev"));

    install_widget_crd(&c).await;
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "test.ferry.dev"));
    let res = c
        .list_api_group_resources("test.ferry.dev/v1")
        .await
        .unwrap();
    let w = res.resources.iter().find(|r| r.name == "widgets").unwrap();
    assert_eq!(w.kind, "Widget");
    assert_eq!(w.categories.as_deref(), Some(&["all".to_string()][..]));
    assert!(res.resources.iter().any(|r| r.name == "widgets/status"));

    let (code, g) = get(&c, "/apis/test.ferry.dev").await;
    assert_eq!(
        (code, g["preferredVersion"]["groupVersion"].as_str()),
        (200, Some("test.ferry.dev/v1"))
    );

    let agg = c.list_api_groups_aggregated().await.unwrap();
    let g = agg
        .items
        .iter()
        .find(|g| g.metadata.as_ref().and_then(|m| m.name.as_deref()) == Some("test.ferry.dev"))
        .unwrap();
    let r = &g.versions[0].resources[0];
    assert_eq!(r.resource.as_deref(), Some("widgets"));
    assert_eq!(r.scope.as_deref(), Some("Namespaced"));
    let core = c.list_core_api_versions_aggregated().await.unwrap();
    assert!(
        core.items[0].versions[0]
            .resources
            .iter()
            .any(|r| r.resource.as_deref() == Some("secrets"))
    );

    // kube-rs discovery end to end.
    let d = kube::Discovery::new(c.clone()).run().await.unwrap();
    assert!(d.has_group("test.ferry.dev"));
    let (ar, caps) = d
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "test.ferry.dev",
            "v1",
            "Widget",
        ))
        .unwrap();
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
}

#[tokio::test]
async fn crud_round_trip_with_server_set_metadata() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let (code, created) = post(&c, CM, cm("a")).await;
    assert_eq!(code, 201, "{created}");
    let meta = &created["metadata"];
    assert_eq!(meta["namespace"], "default");
    assert!(meta["uid"].as_str().unwrap().len() >= 32);
    assert!(meta["creationTimestamp"].is_string());
    let rv: u64 = meta["resourceVersion"].as_str().unwrap().parse().unwrap();

    let (code, got) = get(&c, &format!("{CM}/a")).await;
    assert_eq!(code, 200);
    assert_eq!(got, created);

    // generateName
    let (code, gen_obj) = post(
        &c,
        CM,
        json!({"metadata": {"generateName": "gen-"}, "data": {}}),
    )
    .await;
    assert_eq!(code, 201, "{gen_obj}");
    let name = gen_obj["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    // update bumps resourceVersion
    let mut upd = got.clone();
    upd["data"]["k"] = json!("w");
    let (code, updated) = put(&c, &format!("{CM}/a"), upd).await;
    assert_eq!(code, 200, "{updated}");
    let rv2: u64 = updated["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv);
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);

    // an identical update is not a write
    let (_, same) = put(&c, &format!("{CM}/a"), updated.clone()).await;
    assert_eq!(
        same["metadata"]["resourceVersion"],
        updated["metadata"]["resourceVersion"]
    );

    let (code, _) = delete(&c, &format!("{CM}/a"), None).await;
    assert_eq!(code, 200);
    let (code, status) = get(&c, &format!("{CM}/a")).await;
    assert_eq!(code, 404);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["message"], "configmaps \"a\" not found");
    assert_eq!(status["details"]["name"], "a");
    assert_eq!(status["details"]["kind"], "configmaps");

    // Typed access through kube-rs.
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(c.clone(), "default");
    let got = api.get(name).await.unwrap();
    assert_eq!(got.metadata.name.as_deref(), Some(name));
    let err = api.get("missing").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
}

#[tokio::test]
async fn error_statuses_match_the_real_server() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    post(&c, CM, cm("a")).await;

    let (code, st) = post(&c, CM, cm("a")).await;
    assert_eq!((code, st["reason"].as_str()), (409, Some("AlreadyExists")));
    assert_eq!(st["message"], "configmaps \"a\" already exists");

    let (_, cur) = get(&c, &format!("{CM}/a")).await;
    let mut stale = cur.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, st) = put(&c, &format!("{CM}/a"), stale).await;
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
    assert_eq!(
        st["message"],
        "Operation cannot be fulfilled on configmaps \"a\": the object has been modified; please apply your changes to the latest version and try again"
    );

    let (code, st) = post(&c, CM, cm("Not_Valid")).await;
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.name");

    let (code, st) = post(&c, CM, json!({"metadata": {}})).await;
    assert_eq!(code, 422);
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.name");

    // Built-in kinds must decode as their type.
    let (code, st) = post(&c, CM, json!({"metadata": {"name": "b"}, "data": {"k": 5}})).await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (400, Some("BadRequest")),
        "{st}"
    );

    let (code, _) = post(&c, "/api/v1/namespaces/nope/configmaps", cm("x")).await;
    assert_eq!(code, 404);
    let (code, st) = get(&c, "/apis/nothing.example/v1/things").await;
    assert_eq!((code, st["kind"].as_str()), (404, Some("Status")));

    let (code, st) = call(
        &c,
        "PATCH",
        &format!("{CM}/a"),
        Some(json!({})),
        "text/plain",
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );

    // Wrong token.
    let bad = s.handle.client_for("not-a-token").await.unwrap();
    let (code, st) = get(&bad, CM).await;
    assert_eq!((code, st["reason"].as_str()), (401, Some("Unauthorized")));
}

#[tokio::test]
async fn list_selectors_and_pagination() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    for (i, tier) in ["web", "web", "db", "cache", "web"].iter().enumerate() {
        let mut o = cm(&format!("c{i}"));
        o["metadata"]["labels"] = json!({"tier": tier, "idx": i.to_string()});
        assert_eq!(post(&c, CM, o).await.0, 201);
    }
    post(&c, "/api/v1/namespaces/kube-system/configmaps", cm("other")).await;

    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, l) = get(&c, &format!("{CM}?labelSelector=tier%3Dweb")).await;
    assert_eq!(names(&l), ["c0", "c1", "c4"]);
    let (_, l) = get(
        &c,
        &format!("{CM}?labelSelector=tier%20in%20(db,cache),idx!%3D2"),
    )
    .await;
    assert_eq!(names(&l), ["c3"]);
    let (_, l) = get(&c, &format!("{CM}?labelSelector=!tier")).await;
    assert!(names(&l).is_empty());
    let (_, l) = get(&c, &format!("{CM}?fieldSelector=metadata.name%3Dc2")).await;
    assert_eq!(names(&l), ["c2"]);
    let (code, _) = get(&c, &format!("{CM}?fieldSelector=spec.x%3D1")).await;
    assert_eq!(code, 400);
    let (_, all) = get(
        &c,
        "/api/v1/configmaps?fieldSelector=metadata.namespace%3Dkube-system",
    )
    .await;
    assert_eq!(names(&all), ["other"]);
    assert_eq!(all["kind"], "ConfigMapList");

    // limit/continue walks everything exactly once
    let mut seen = Vec::new();
    let mut cont = String::new();
    loop {
        let (code, page) = get(&c, &format!("{CM}?limit=2&continue={cont}")).await;
        assert_eq!(code, 200);
        seen.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => cont = t.to_string(),
            _ => break,
        }
    }
    assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4"]);
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    install_widget_crd(&c).await;
    let base = "/apis/test.ferry.dev/v1/namespaces/default/widgets";
    let mut w = widget("w", 1);
    w["status"] = json!({"phase": "Ignored"});
    let (code, created) = post(&c, base, w).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(
        created.get("status").is_none(),
        "status is dropped on create"
    );

    // status write: spec change ignored, generation unchanged
    let mut st = created.clone();
    st["status"] = json!({"phase": "Ready"});
    st["spec"]["size"] = json!(99);
    let (code, after) = put(&c, &format!("{base}/w/status"), st).await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["status"]["phase"], "Ready");
    assert_eq!(after["spec"]["size"], 1);
    assert_eq!(after["metadata"]["generation"], 1);

    // main write: status change ignored, spec change bumps generation
    let mut m = after.clone();
    m["status"] = json!({"phase": "Hacked"});
    m["spec"]["size"] = json!(2);
    let (_, after) = put(&c, &format!("{base}/w"), m).await;
    assert_eq!(after["status"]["phase"], "Ready");
    assert_eq!(after["metadata"]["generation"], 2);

    // metadata-only change does not bump generation
    let mut m = after.clone();
    m["metadata"]["labels"] = json!({"a": "b"});
    let (_, after) = put(&c, &format!("{base}/w"), m).await;
    assert_eq!(after["metadata"]["generation"], 2);

    // Custom resources need a resourceVersion for update.
    let mut m = after.clone();
    m["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (code, st) = put(&c, &format!("{base}/w"), m).await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(
        st["details"]["causes"][0]["field"],
        "metadata.resourceVersion"
    );
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let mut o = cm("f");
    o["metadata"]["finalizers"] = json!(["test/hold"]);
    post(&c, CM, o).await;
    let (code, pending) = delete(&c, &format!("{CM}/f"), None).await;
    assert_eq!(code, 200);
    assert!(pending["metadata"]["deletionTimestamp"].is_string());
    let (code, still) = get(&c, &format!("{CM}/f")).await;
    assert_eq!(code, 200);

    let mut add = still.clone();
    add["metadata"]["finalizers"] = json!(["test/hold", "test/new"]);
    let (code, st) = put(&c, &format!("{CM}/f"), add).await;
    assert_eq!(code, 422, "{st}");

    let mut clear = still.clone();
    clear["metadata"]["finalizers"] = json!([]);
    let (code, _) = put(&c, &format!("{CM}/f"), clear).await;
    assert_eq!(code, 200);
    assert_eq!(get(&c, &format!("{CM}/f")).await.0, 404);

    // Preconditions.
    post(&c, CM, cm("p")).await;
    let (code, st) = delete(
        &c,
        &format!("{CM}/p"),
        Some(json!({"preconditions": {"uid": "nope"}})),
    )
    .await;
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
}

#[tokio::test]
async fn namespace_deletion_removes_contents() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let (code, ns) = post(
        &c,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "tmp"}}),
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(ns["status"]["phase"], "Active");
    for n in ["a", "b"] {
        assert_eq!(
            post(&c, "/api/v1/namespaces/tmp/configmaps", cm(n)).await.0,
            201
        );
    }
    post(
        &c,
        "/api/v1/namespaces/tmp/secrets",
        json!({"metadata": {"name": "s"}, "stringData": {"x": "y"}}),
    )
    .await;
    let (code, terminating) = delete(&c, "/api/v1/namespaces/tmp", None).await;
    assert_eq!(code, 200);
    assert_eq!(terminating["status"]["phase"], "Terminating");
    eventually(|| async { (get(&c, "/api/v1/namespaces/tmp").await.0 == 404).then_some(()) }).await;
    let (_, l) = get(&c, "/api/v1/namespaces/tmp/configmaps").await;
    assert!(l["items"].as_array().unwrap().is_empty());
    // system namespaces exist
    for ns in ["default", "kube-system", "kube-public"] {
        assert_eq!(get(&c, &format!("/api/v1/namespaces/{ns}")).await.0, 200);
    }
}

#[tokio::test]
async fn owner_references_are_garbage_collected() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let owner_ref = |o: &Value| json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]}]);
    // Background: owner gone at once, dependent collected after.
    let (_, owner) = post(&c, CM, cm("owner")).await;
    let mut dep = cm("dep");
    dep["metadata"]["ownerReferences"] = owner_ref(&owner);
    post(&c, CM, dep).await;
    delete(&c, &format!("{CM}/owner"), None).await;
    eventually(|| async { (get(&c, &format!("{CM}/dep")).await.0 == 404).then_some(()) }).await;

    // Foreground: owner stays (deleting) until dependent is gone.
    let (_, owner) = post(&c, CM, cm("fowner")).await;
    let mut dep = cm("fdep");
    dep["metadata"]["ownerReferences"] = owner_ref(&owner);
    dep["metadata"]["finalizers"] = json!(["test/hold"]);
    post(&c, CM, dep).await;
    let (_, pending) = delete(
        &c,
        &format!("{CM}/fowner"),
        Some(json!({"propagationPolicy": "Foreground"})),
    )
    .await;
    assert_eq!(
        pending["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    let dep = eventually(|| async {
        let (_, d) = get(&c, &format!("{CM}/fdep")).await;
        d["metadata"]["deletionTimestamp"].is_string().then_some(d)
    })
    .await;
    assert_eq!(get(&c, &format!("{CM}/fowner")).await.0, 200);
    let mut clear = dep.clone();
    clear["metadata"]["finalizers"] = json!([]);
    put(&c, &format!("{CM}/fdep"), clear).await;
    eventually(|| async { (get(&c, &format!("{CM}/fowner")).await.0 == 404).then_some(()) }).await;

    // Orphan: dependent survives without the reference.
    let (_, owner) = post(&c, CM, cm("oowner")).await;
    let mut dep = cm("odep");
    dep["metadata"]["ownerReferences"] = owner_ref(&owner);
    post(&c, CM, dep).await;
    delete(
        &c,
        &format!("{CM}/oowner"),
        Some(json!({"propagationPolicy": "Orphan"})),
    )
    .await;
    eventually(|| async { (get(&c, &format!("{CM}/oowner")).await.0 == 404).then_some(()) }).await;
    let (code, d) = get(&c, &format!("{CM}/odep")).await;
    assert_eq!(code, 200);
    assert!(d["metadata"].get("ownerReferences").is_none(), "{d}");
}

#[tokio::test]
async fn crd_deletion_removes_its_objects_and_stops_serving() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    install_widget_crd(&c).await;
    let base = "/apis/test.ferry.dev/v1/namespaces/default/widgets";
    assert_eq!(post(&c, base, widget("x", 1)).await.0, 201);
    let (_, crd) = get(
        &c,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.test.ferry.dev",
    )
    .await;
    let conds: Vec<&str> = crd["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert!(conds.contains(&"Established") && conds.contains(&"NamesAccepted"));
    assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget");
    delete(
        &c,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.test.ferry.dev",
        None,
    )
    .await;
    eventually(|| async { (get(&c, base).await.0 == 404).then_some(()) }).await;
}
