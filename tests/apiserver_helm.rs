//! Helm (v4, through the `helm-python-sdk` PyPI package) installs, upgrades
//! and uninstalls a small chart against the embedded server.
//!
//! Python is found through `$FERRY_PYTHON`, else the pyenv install of the
//! dev machines, else `python3` on `PATH`.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn python() -> String {
    if let Ok(p) = std::env::var("FERRY_PYTHON") {
        return p;
    }
    let pyenv = "/root/.pyenv/versions/3.11.7/bin/python";
    if Path::new(pyenv).exists() {
        pyenv.into()
    } else {
        "python3".into()
    }
}

const TEMPLATES: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-cm
data:
  greeting: {{ .Values.greeting }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .Release.Name }}-sa
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}-svc
spec:
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-web
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "nginx:1.27"}]
"#;

async fn helm(dir: &Path, step: &str) {
    let script = format!(
        r#"
import helm_python as helm, sys
with helm.Config(kubeconfig_path={kc:?}, namespace="default") as cfg:
    step = {step:?}
    if step == "install":
        cfg.install({chart:?}, "demo", values={{"greeting": "hi", "replicas": 1}}, timeout=20)
    elif step == "upgrade":
        cfg.upgrade({chart:?}, "demo", values={{"greeting": "yo", "replicas": 2}}, timeout=20)
    else:
        cfg.uninstall("demo", wait="watcher", timeout=20)
"#,
        kc = dir.join("kubeconfig").display().to_string(),
        chart = dir.join("chart").display().to_string(),
    );
    let out = tokio::process::Command::new(python())
        .args(["-c", &script])
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "helm {step} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_uninstall() {
    let s = TestServer::start().await;
    let dir = s.dir.path();
    std::fs::create_dir_all(dir.join("chart/templates")).unwrap();
    std::fs::write(
        dir.join("chart/Chart.yaml"),
        "apiVersion: v2\nname: demo\nversion: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("chart/values.yaml"),
        "greeting: hello\nreplicas: 1\n",
    )
    .unwrap();
    std::fs::write(dir.join("chart/templates/all.yaml"), TEMPLATES).unwrap();
    let c = s.admin().await;
    let cm = "/api/v1/namespaces/default/configmaps/demo-cm";
    let releases = "/api/v1/namespaces/default/secrets?labelSelector=owner%3Dhelm";
    let count = |v: &Value| v["items"].as_array().map(Vec::len).unwrap_or(0);

    helm(dir, "install").await;
    assert_eq!(get(&c, cm).await.1["data"]["greeting"], "hi");
    assert_eq!(
        get(&c, "/apis/apps/v1/namespaces/default/deployments/demo-web")
            .await
            .1["spec"]["replicas"],
        1
    );
    assert_eq!(
        get(&c, "/api/v1/namespaces/default/services/demo-svc")
            .await
            .0,
        200
    );
    assert_eq!(count(&get(&c, releases).await.1), 1);

    helm(dir, "upgrade").await;
    assert_eq!(get(&c, cm).await.1["data"]["greeting"], "yo");
    assert_eq!(
        get(&c, "/apis/apps/v1/namespaces/default/deployments/demo-web")
            .await
            .1["spec"]["replicas"],
        2
    );
    assert_eq!(count(&get(&c, releases).await.1), 2);

    helm(dir, "uninstall").await;
    assert_eq!(get(&c, cm).await.0, 404);
    assert_eq!(
        get(&c, "/api/v1/namespaces/default/serviceaccounts/demo-sa")
            .await
            .0,
        404
    );
    assert_eq!(count(&get(&c, releases).await.1), 0);
}
