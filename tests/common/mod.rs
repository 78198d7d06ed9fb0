//! Shared helpers for the API server tests: a server on port 0 in a temp
//! dir, and raw HTTP calls that return the status code and JSON body.
#![allow(dead_code)]

use axum::http::Request;
use ferry::apiserver::{ApiServerConfig, ApiServerHandle, start};
use serde_json::{Value, json};

pub mod kubectl;

/// A running server and its data directory (removed on drop).
pub struct TestServer {
    pub handle: ApiServerHandle,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ApiServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ApiServerConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.agents = vec!["host-a".into()];
        f(&mut config);
        let handle = start(config).await.unwrap();
        Self { handle, dir }
    }

    pub async fn admin(&self) -> kube::Client {
        self.handle.admin_client().await.unwrap()
    }
}

/// Send a raw request; returns (status code, JSON body or Null).
pub async fn call(
    client: &kube::Client,
    method: &str,
    path: &str,
    body: Option<Value>,
    content_type: &str,
) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .header("accept", "application/json")
        .body(kube::client::Body::from(bytes))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let code = resp.status().as_u16();
    let bytes = resp.into_body().collect_bytes().await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (code, v)
}

pub async fn get(c: &kube::Client, path: &str) -> (u16, Value) {
    call(c, "GET", path, None, "application/json").await
}
pub async fn post(c: &kube::Client, path: &str, body: Value) -> (u16, Value) {
    call(c, "POST", path, Some(body), "application/json").await
}
pub async fn put(c: &kube::Client, path: &str, body: Value) -> (u16, Value) {
    call(c, "PUT", path, Some(body), "application/json").await
}
pub async fn delete(c: &kube::Client, path: &str, body: Option<Value>) -> (u16, Value) {
    call(c, "DELETE", path, body, "application/json").await
}

/// A namespaced test CRD `widgets.test.ferry.dev` (kind Widget, v1) with a
/// status subresource, short name `wd` and a printer column.
pub fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.ferry.dev"},
        "spec": {
            "group": "test.ferry.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"], "categories": ["all"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "properties": {
                            "size": {"type": "integer", "minimum": 0},
                            "color": {"type": "string"}
                        }},
                        "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
                    }
                }}
            }]
        }
    })
}

/// Create the Widget CRD and wait until its resources are served.
pub async fn install_widget_crd(c: &kube::Client) {
    let (code, body) = post(
        c,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        widget_crd(),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    for _ in 0..200 {
        let (code, _) = get(c, "/apis/test.ferry.dev/v1/namespaces/default/widgets").await;
        if code == 200 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("widgets never served");
}

pub fn widget(name: &str, size: i64) -> Value {
    json!({"apiVersion": "test.ferry.dev/v1", "kind": "Widget", "metadata": {"name": name}, "spec": {"size": size}})
}

/// Poll `f` until it returns Some, for up to 10 s.
pub async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..500 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("condition never became true");
}
