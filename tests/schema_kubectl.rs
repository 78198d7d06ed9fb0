//! The schema, patch, table and OpenAPI pieces driven by the real kubectl.
//!
//! A deliberately small HTTP front (discovery for one CRD, an in-memory map
//! of objects) calls the pure functions the embedded API server uses, so
//! that what kubectl prints — `explain`, `get` tables, `apply
//! --server-side` results and conflicts, validation errors — is checked
//! against kubectl itself rather than against our reading of it.

#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ferry::apiserver::openapi::{ApiResource, crd_resources, v2, v3_group_version, v3_index};
use ferry::apiserver::patch::{
    ApplyError, ApplyOptions, SchemaListTypes, conflict_status, server_side_apply,
};
use ferry::apiserver::schema::{AdmitError, AdmitOptions, FieldValidation, Validator};
use ferry::apiserver::table::{IncludeObjectPolicy, render};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

const BASE: &str = "/apis/ferry.dev/v1alpha1/namespaces/default/virtualmachines";
const NOW: &str = "2026-01-01T00:00:00Z";

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

struct Server {
    validator: Validator,
    types: SchemaListTypes,
    resources: Vec<ApiResource>,
    crd: CustomResourceDefinition,
    objects: Mutex<BTreeMap<String, Value>>,
}

fn status(code: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    status(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn query(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

fn admit(
    s: &Server,
    obj: &mut Value,
    old: Option<&Value>,
    uri: &Uri,
) -> Result<Vec<String>, (u16, Value)> {
    let fv = query(uri, "fieldValidation")
        .and_then(|v| FieldValidation::parse(&v))
        .unwrap_or_default();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match s.validator.admit(
        obj,
        old,
        &AdmitOptions {
            field_validation: fv,
        },
    ) {
        Ok(a) => Ok(a.warnings),
        Err(e @ (AdmitError::Invalid(_) | AdmitError::UnknownFields(_))) => Err((
            e.code(),
            e.status("ferry.dev", "v1alpha1", "VirtualMachine", &name),
        )),
    }
}

fn handle(s: &Server, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let path = uri.path();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match (method.as_str(), path) {
        ("GET", "/version") => {
            return status(
                200,
                json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0"}),
            );
        }
        ("GET", "/api") => {
            return status(
                200,
                json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            );
        }
        ("GET", "/api/v1") => {
            return status(
                200,
                json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": []}),
            );
        }
        ("GET", "/apis") => {
            return status(
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
            "name": "ferry.dev", "versions": [{"groupVersion": "ferry.dev/v1alpha1", "version": "v1alpha1"}],
            "preferredVersion": {"groupVersion": "ferry.dev/v1alpha1", "version": "v1alpha1"}}]}),
            );
        }
        ("GET", "/apis/ferry.dev/v1alpha1") => {
            return status(
                200,
                json!({"kind": "APIResourceList",
            "apiVersion": "v1", "groupVersion": "ferry.dev/v1alpha1", "resources": [{
                "name": "virtualmachines", "singularName": "virtualmachine", "namespaced": true,
                "kind": "VirtualMachine", "shortNames": ["vm"],
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}]}),
            );
        }
        ("GET", "/openapi/v3") => return status(200, v3_index(&s.resources)),
        ("GET", "/openapi/v2") if accept.contains("application/json") => {
            return status(200, v2(&s.resources));
        }
        ("GET", "/openapi/v2") => return status(406, json!({})),
        _ => {}
    }
    if let Some(gv) = path.strip_prefix("/openapi/v3/") {
        return match v3_group_version(&s.resources, gv) {
            Some(doc) => status(200, doc),
            None => not_found(gv),
        };
    }
    let Some(rest) = path.strip_prefix(BASE) else {
        return not_found(path);
    };
    let name = rest.trim_start_matches('/');
    let mut objects = s.objects.lock().unwrap();
    let columns = s.crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default();
    let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:05:00Z")
        .unwrap()
        .to_utc();
    match (method.as_str(), name) {
        ("GET", "") => {
            let items: Vec<Value> = objects.values().cloned().collect();
            if accept.contains("as=Table") {
                return status(
                    200,
                    render(&columns, &items, IncludeObjectPolicy::Metadata, now),
                );
            }
            status(
                200,
                json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineList",
                               "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ("GET", n) => match objects.get(n) {
            Some(o) if accept.contains("as=Table") => status(
                200,
                render(
                    &columns,
                    std::slice::from_ref(o),
                    IncludeObjectPolicy::Metadata,
                    now,
                ),
            ),
            Some(o) => status(200, o.clone()),
            None => not_found(&format!("virtualmachines.ferry.dev \"{n}\"")),
        },
        ("POST", "") => {
            let mut obj: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        400,
                        json!({"kind": "Status", "code": 400, "message": e.to_string()}),
                    );
                }
            };
            obj["metadata"]["creationTimestamp"] = json!(NOW);
            let warnings = match admit(s, &mut obj, None, uri) {
                Ok(w) => w,
                Err((code, body)) => return status(code, body),
            };
            let n = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            objects.insert(n, obj.clone());
            let mut r = status(201, obj);
            for w in warnings {
                let v = format!("299 - {}", serde_json::to_string(&w).unwrap_or_default());
                if let Ok(v) = header::HeaderValue::from_str(&v) {
                    r.headers_mut().append(header::WARNING, v);
                }
            }
            r
        }
        ("PATCH", n) => {
            let cfg: Value = match serde_yaml::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        400,
                        json!({"kind": "Status", "code": 400, "message": e.to_string()}),
                    );
                }
            };
            let manager = query(uri, "fieldManager").unwrap_or_default();
            let force = query(uri, "force").as_deref() == Some("true");
            let live = objects.get(n).cloned();
            let opts = ApplyOptions {
                manager: &manager,
                force,
                time: NOW,
                subresource: None,
                ignore_status: false,
            };
            let mut out = match server_side_apply(live.as_ref(), &cfg, &opts, &s.types) {
                Ok(o) => o,
                Err(ApplyError::Conflicts(c)) => return status(409, conflict_status(&c)),
                Err(e) => {
                    return status(
                        400,
                        json!({"kind": "Status", "code": 400, "message": e.to_string()}),
                    );
                }
            };
            if live.is_none() {
                out["metadata"]["creationTimestamp"] = json!(NOW);
            }
            if let Err((code, body)) = admit(s, &mut out, live.as_ref(), uri) {
                return status(code, body);
            }
            objects.insert(n.to_string(), out.clone());
            status(if live.is_some() { 200 } else { 201 }, out)
        }
        _ => not_found(path),
    }
}

/// Serves the test front on a loopback port from a thread of its own.
fn serve() -> SocketAddr {
    let crd = crd();
    let server = Arc::new(Server {
        validator: Validator::new(&crd.spec.versions[0]).unwrap(),
        types: SchemaListTypes::from_version(&crd.spec.versions[0]),
        resources: crd_resources(&crd),
        crd,
        objects: Mutex::new(BTreeMap::new()),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new().fallback(
                move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                    let s = server.clone();
                    async move { handle(&s, &method, &uri, &headers, &body) }
                },
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

fn kubectl_path() -> PathBuf {
    std::env::var_os("FERRY_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

struct Kubectl {
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(addr: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: t\n  user:\n    token: t\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n    namespace: default\n\
             current-context: t\n")).unwrap();
        Self { kubeconfig, dir }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let cache = self.dir.path().join("cache");
        let out = Command::new(kubectl_path())
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "kubectl ({}) did not start: {e}; set FERRY_KUBECTL",
                    kubectl_path().display()
                )
            });
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "kubectl {args:?} failed:\n{out}\n{err}");
        out
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn kubectl_explain_apply_get_and_errors() {
    let k = Kubectl::new(serve());

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
    let out = k.ok(&["apply", "--server-side", "-f", path_str(&vm)]);
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
        path_str(&other),
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
        path_str(&other),
    ]);
    let got: Value = serde_json::from_str(&k.ok(&["get", "vm", "vm1", "-o", "json"])).unwrap();
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
    let (ok, _, err) = k.run(&["create", "-f", path_str(&bad)]);
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
    let (ok, _, err) = k.run(&["create", "-f", path_str(&unknown)]);
    assert!(!ok);
    assert!(
        err.contains(r#"strict decoding error: unknown field "spec.colour""#),
        "{err}"
    );
    let (ok, _, err) = k.run(&["create", "--validate=warn", "-f", path_str(&unknown)]);
    assert!(ok, "{err}");
    assert!(err.contains(r#"unknown field "spec.colour""#), "{err}");
}
