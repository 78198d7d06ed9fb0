//! Patches, schema admission, field validation, dry run and Tables.

mod common;

use common::*;
use serde_json::json;

const W: &str = "/apis/test.ferry.dev/v1/namespaces/default/widgets";
const CM: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    install_widget_crd(&c).await;
    post(&c, W, widget("p", 1)).await;

    let (code, o) = call(
        &c,
        "PATCH",
        &format!("{W}/p"),
        Some(json!({"spec": {"color": "red"}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(o["spec"], json!({"size": 1, "color": "red"}));
    assert_eq!(o["metadata"]["generation"], 2);

    let ops = json!([{"op": "test", "path": "/spec/size", "value": 1}, {"op": "replace", "path": "/spec/size", "value": 3}]);
    let (code, o) = call(
        &c,
        "PATCH",
        &format!("{W}/p"),
        Some(ops),
        "application/json-patch+json",
    )
    .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(o["spec"]["size"], 3);

    let failing = json!([{"op": "test", "path": "/spec/size", "value": 100}]);
    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{W}/p"),
        Some(failing),
        "application/json-patch+json",
    )
    .await;
    assert_eq!(code, 422);

    // Strategic merge is for built-in kinds only.
    let (code, st) = call(
        &c,
        "PATCH",
        &format!("{W}/p"),
        Some(json!({})),
        "application/strategic-merge-patch+json",
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    post(
        &c,
        CM,
        json!({"metadata": {"name": "c"}, "data": {"a": "1"}}),
    )
    .await;
    let (code, o) = call(
        &c,
        "PATCH",
        &format!("{CM}/c"),
        Some(json!({"data": {"b": "2"}})),
        "application/strategic-merge-patch+json",
    )
    .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(o["data"], json!({"a": "1", "b": "2"}));

    // Patch with a stale resourceVersion conflicts.
    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{W}/p"),
        Some(json!({"metadata": {"resourceVersion": "1"}, "spec": {"size": 4}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, 409);

    // Status patch touches only status.
    let (code, o) = call(
        &c,
        "PATCH",
        &format!("{W}/p/status"),
        Some(json!({"status": {"phase": "Ready"}, "spec": {"size": 9}})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(
        (o["status"]["phase"].as_str(), o["spec"]["size"].as_i64()),
        (Some("Ready"), Some(3))
    );

    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{W}/missing"),
        Some(json!({})),
        "application/merge-patch+json",
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn server_side_apply_creates_tracks_owners_and_conflicts() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    install_widget_crd(&c).await;
    let cfg = json!({"apiVersion": "test.ferry.dev/v1", "kind": "Widget", "metadata": {"name": "a"}, "spec": {"size": 1}});
    let (code, o) = call(
        &c,
        "PATCH",
        &format!("{W}/a?fieldManager=alice"),
        Some(cfg.clone()),
        "application/apply-patch+yaml",
    )
    .await;
    assert_eq!(code, 201, "{o}");
    assert_eq!(o["metadata"]["managedFields"][0]["manager"], "alice");

    let mut bob = cfg.clone();
    bob["spec"]["size"] = json!(2);
    let (code, st) = call(
        &c,
        "PATCH",
        &format!("{W}/a?fieldManager=bob"),
        Some(bob.clone()),
        "application/apply-patch+yaml",
    )
    .await;
    assert_eq!(code, 409, "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("conflict with \"alice\""),
        "{st}"
    );
    let (code, o) = call(
        &c,
        "PATCH",
        &format!("{W}/a?fieldManager=bob&force=true"),
        Some(bob),
        "application/apply-patch+yaml",
    )
    .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(o["spec"]["size"], 2);

    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{W}/a"),
        Some(cfg),
        "application/apply-patch+yaml",
    )
    .await;
    assert_eq!(code, 422, "fieldManager is required for apply");
}

#[tokio::test]
async fn schema_validation_pruning_and_field_validation() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    install_widget_crd(&c).await;
    let (code, st) = post(&c, W, widget("neg", -1)).await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (422, Some("Invalid")),
        "{st}"
    );
    assert_eq!(st["details"]["causes"][0]["field"], "spec.size");

    let mut extra = widget("x", 1);
    extra["spec"]["bogus"] = json!(true);
    let (code, st) = post(&c, &format!("{W}?fieldValidation=Strict"), extra.clone()).await;
    assert_eq!(code, 400, "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"spec.bogus\""),
        "{st}"
    );
    let (code, o) = post(&c, W, extra).await;
    assert_eq!(code, 201);
    assert!(
        o["spec"].get("bogus").is_none(),
        "unknown fields are pruned: {o}"
    );
}

#[tokio::test]
async fn dry_run_stores_nothing() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let (code, o) = post(
        &c,
        &format!("{CM}?dryRun=All"),
        json!({"metadata": {"name": "d"}}),
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(o["metadata"]["name"], "d");
    assert_eq!(get(&c, &format!("{CM}/d")).await.0, 404);
}

#[tokio::test]
async fn tables_use_printer_columns() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    install_widget_crd(&c).await;
    post(&c, W, widget("t", 7)).await;
    let req = axum::http::Request::get(W)
        .header(
            "accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let t: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(t["kind"], "Table");
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Name", "Size"]);
    assert_eq!(t["rows"][0]["cells"], json!(["t", 7]));
}

#[tokio::test]
async fn builtin_unknown_fields_and_invalid_crds() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    let cm = json!({"metadata": {"name": "u"}, "data": {"a": "b"}, "dataa": {"x": "y"}});
    let (code, st) = post(&c, &format!("{CM}?fieldValidation=Strict"), cm.clone()).await;
    assert_eq!(code, 400, "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"dataa\""),
        "{st}"
    );
    let req = axum::http::Request::post(CM)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(cm.to_string().into_bytes()))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 201);
    let warning = resp
        .headers()
        .get("warning")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(warning.contains("unknown field \\\"dataa\\\""), "{warning}");

    let mut crd = widget_crd();
    crd["metadata"]["name"] = json!("wrong.name");
    let (code, st) = post(
        &c,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        crd,
    )
    .await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (422, Some("Invalid")),
        "{st}"
    );
}
