//! A deliberately small HTTP front over the pure schema, patch, table and
//! OpenAPI functions, so the real kubectl can be pointed at them: discovery
//! for the built-in kinds and one CRD, an in-memory map of objects, and the
//! four patch types. It is a test fixture, not the embedded API server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ferry::apiserver::openapi::{
    ApiResource, builtin_resources, crd_resources, v2, v3_group_version, v3_index,
};
use ferry::apiserver::patch::{
    ApplyError, ApplyOptions, BuiltinListTypes, ListTypes, SchemaListTypes, UpdateOptions,
    conflict_status, json_patch, merge_patch, server_side_apply, strategic_merge_patch,
    track_update,
};
use ferry::apiserver::schema::{AdmitOptions, FieldValidation, Validator};
use ferry::apiserver::table::{IncludeObjectPolicy, render, render_builtin};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

/// The creation time of every object; tables are rendered five minutes on.
pub const NOW: &str = "2026-01-01T00:00:00Z";

struct Server {
    validator: Validator,
    crd_types: SchemaListTypes,
    crd: CustomResourceDefinition,
    resources: Vec<ApiResource>,
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

fn failure(code: u16, reason: &str, message: &str) -> Response {
    status(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn query(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// `(resource, namespace, name)` of a resource URL.
fn route<'a>(s: &'a Server, path: &str) -> Option<(&'a ApiResource, String, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, String::new()),
        [plural, name] => (*plural, name.to_string()),
        _ => return None,
    };
    let r = s
        .resources
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)?;
    Some((r, ns, name))
}

fn discovery(s: &Server, path: &str) -> Option<Value> {
    let resource_list = |group: &str, version: &str| {
        let resources: Vec<Value> = s
            .resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .map(|r| {
                let short = if r.group == s.crd.spec.group {
                    s.crd.spec.names.short_names.clone().unwrap_or_default()
                } else {
                    Vec::new()
                };
                json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                       "kind": r.kind, "shortNames": short,
                       "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
    };
    match path
        .trim_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        ["api", "v1"] => Some(resource_list("", "v1")),
        ["apis"] => {
            let mut groups: Vec<(&str, &str)> = s
                .resources
                .iter()
                .filter(|r| !r.group.is_empty())
                .map(|r| (r.group.as_str(), r.version.as_str()))
                .collect();
            groups.sort();
            groups.dedup();
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv], "preferredVersion": gv})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", g, v] => Some(resource_list(g, v)),
        _ => None,
    }
}

fn handle(s: &Server, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let path = uri.path();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if method == Method::GET {
        match path {
            "/version" => {
                return status(
                    200,
                    json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0"}),
                );
            }
            "/openapi/v3" => return status(200, v3_index(&s.resources)),
            "/openapi/v2" if accept.contains("application/json") => {
                return status(200, v2(&s.resources));
            }
            "/openapi/v2" => return failure(406, "NotAcceptable", "only JSON is served"),
            _ => {}
        }
        if let Some(gv) = path.strip_prefix("/openapi/v3/") {
            return match v3_group_version(&s.resources, gv) {
                Some(doc) => status(200, doc),
                None => failure(404, "NotFound", gv),
            };
        }
        if let Some(d) = discovery(s, path) {
            return status(200, d);
        }
    }
    let Some((res, ns, name)) = route(s, path) else {
        return failure(404, "NotFound", &format!("{path} not found"));
    };
    let is_crd = res.group == s.crd.spec.group;
    let types: &dyn ListTypes = if is_crd {
        &s.crd_types
    } else {
        &BuiltinListTypes
    };
    let key = format!("{}/{}/{ns}/{name}", res.gv_path(), res.plural);
    let not_found = || {
        failure(
            404,
            "NotFound",
            &format!("{}.{} \"{name}\" not found", res.plural, res.group),
        )
    };
    let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:05:00Z")
        .unwrap()
        .to_utc();
    let table = |items: &[Value]| {
        if is_crd {
            let cols = s.crd.spec.versions[0]
                .additional_printer_columns
                .clone()
                .unwrap_or_default();
            render(&cols, items, IncludeObjectPolicy::Metadata, now)
        } else {
            render_builtin(&res.kind, items, IncludeObjectPolicy::Metadata, now)
        }
    };
    let manager = query(uri, "fieldManager").unwrap_or_else(|| "test".into());
    let mut objects = s.objects.lock().unwrap();
    let live = objects.get(&key).cloned();
    let mut obj = match (method.as_str(), name.as_str()) {
        ("GET", "") => {
            let prefix = format!("{}/{}/{ns}/", res.gv_path(), res.plural);
            let items: Vec<Value> = objects
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v.clone())
                .collect();
            if accept.contains("as=Table") {
                return status(200, table(&items));
            }
            return status(
                200,
                json!({"kind": format!("{}List", res.kind), "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
            );
        }
        ("GET", _) => {
            return match live {
                Some(o) if accept.contains("as=Table") => {
                    status(200, table(std::slice::from_ref(&o)))
                }
                Some(o) => status(200, o),
                None => not_found(),
            };
        }
        ("POST", "") => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                return failure(400, "BadRequest", "body is not JSON");
            };
            let n = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if objects.contains_key(&format!("{key}{n}")) {
                return failure(
                    409,
                    "AlreadyExists",
                    &format!("{}.{} \"{n}\" already exists", res.plural, res.group),
                );
            }
            obj["metadata"]["creationTimestamp"] = json!(NOW);
            track_update(
                None,
                &mut obj,
                &UpdateOptions {
                    manager: &manager,
                    time: NOW,
                    subresource: None,
                },
                types,
            );
            obj
        }
        ("PATCH", n) if !n.is_empty() => {
            if content_type.starts_with("application/apply-patch") {
                let Ok(cfg) = serde_yaml::from_slice::<Value>(body) else {
                    return failure(400, "BadRequest", "apply body is not YAML");
                };
                let force = query(uri, "force").as_deref() == Some("true");
                let opts = ApplyOptions {
                    manager: &manager,
                    force,
                    time: NOW,
                    subresource: None,
                    ignore_status: false,
                };
                match server_side_apply(live.as_ref(), &cfg, &opts, types) {
                    Ok(mut o) => {
                        if live.is_none() {
                            o["metadata"]["creationTimestamp"] = json!(NOW);
                        }
                        o
                    }
                    Err(ApplyError::Conflicts(c)) => return status(409, conflict_status(&c)),
                    Err(e) => return failure(400, "BadRequest", &e.to_string()),
                }
            } else {
                let Some(l) = &live else { return not_found() };
                let Ok(p) = serde_json::from_slice::<Value>(body) else {
                    return failure(400, "BadRequest", "patch is not JSON");
                };
                let patched = match content_type {
                    t if t.starts_with("application/strategic-merge-patch") && !is_crd => {
                        strategic_merge_patch(l, &p)
                    }
                    t if t.starts_with("application/strategic-merge-patch") => {
                        return failure(
                            415,
                            "UnsupportedMediaType",
                            "strategic merge patch is not supported for custom resources",
                        );
                    }
                    t if t.starts_with("application/merge-patch") => merge_patch(l, &p),
                    t if t.starts_with("application/json-patch") => json_patch(l, &p),
                    t => {
                        return failure(
                            415,
                            "UnsupportedMediaType",
                            &format!("unsupported patch type {t}"),
                        );
                    }
                };
                match patched {
                    Ok(mut o) => {
                        track_update(
                            Some(l),
                            &mut o,
                            &UpdateOptions {
                                manager: &manager,
                                time: NOW,
                                subresource: None,
                            },
                            types,
                        );
                        o
                    }
                    Err(e) => return failure(e.code(), "Invalid", &e.to_string()),
                }
            }
        }
        _ => return failure(405, "MethodNotAllowed", "not served by this fixture"),
    };
    let mut warnings = Vec::new();
    if is_crd {
        let fv = query(uri, "fieldValidation")
            .and_then(|v| FieldValidation::parse(&v))
            .unwrap_or_default();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match s.validator.admit(
            &mut obj,
            live.as_ref(),
            &AdmitOptions {
                field_validation: fv,
            },
        ) {
            Ok(a) => warnings = a.warnings,
            Err(e) => {
                return status(
                    e.code(),
                    e.status(&res.group, &res.version, &res.kind, &name),
                );
            }
        }
    }
    let n = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let store_key = if name.is_empty() {
        format!("{key}{n}")
    } else {
        key
    };
    objects.insert(store_key, obj.clone());
    let mut r = status(if live.is_some() { 200 } else { 201 }, obj);
    for w in warnings {
        if let Ok(v) = header::HeaderValue::from_str(&format!(
            "299 - {}",
            serde_json::to_string(&w).unwrap_or_default()
        )) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

/// Serves the fixture for `crd` on a loopback port from a thread of its own.
pub fn serve(crd: CustomResourceDefinition) -> SocketAddr {
    let mut resources = builtin_resources();
    resources.extend(crd_resources(&crd));
    let server = Arc::new(Server {
        validator: Validator::new(&crd.spec.versions[0]).unwrap(),
        crd_types: SchemaListTypes::from_version(&crd.spec.versions[0]),
        crd,
        resources,
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

/// kubectl with a kubeconfig for the fixture and a private cache.
pub struct Kubectl {
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    /// A kubectl talking to `addr`, namespace `default`.
    pub fn new(addr: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: t\n  user:\n    token: t\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n    namespace: default\n\
             current-context: t\n")).unwrap();
        Self { kubeconfig, dir }
    }

    /// Writes a manifest into the temp dir and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(kubectl_path())
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
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

    /// Runs kubectl and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "kubectl {args:?} failed:\n{out}\n{err}");
        out
    }

    /// `kubectl get <what> -o json` parsed.
    pub fn json(&self, what: &[&str]) -> Value {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json", "--show-managed-fields"]);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }
}
