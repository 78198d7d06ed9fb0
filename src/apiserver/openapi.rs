//! OpenAPI documents describing the served resources, built from the
//! installed CRDs and the built-in kinds' schemas (k8s-openapi's schemars
//! schemas, named as the real server names them):
//!
//! - [`v3_index`] answers `/openapi/v3`: one `serverRelativeURL` per
//!   group-version (`apis/ferry.dev/v1alpha1`, `api/v1`);
//! - [`v3_group_version`] answers `/openapi/v3/apis/<group>/<version>`;
//! - [`v2`] answers `/openapi/v2` (JSON).
//!
//! Every kind's schema carries `x-kubernetes-group-version-kind`, which is
//! how `kubectl explain` finds it, and every `PATCH` operation declares the
//! `fieldValidation` query parameter, which is how kubectl decides to let
//! the server validate fields (`kubectl apply --validate=strict`).

mod builtin;
mod crd;
mod unknown;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde_json::{Map, Value, json};

pub use builtin::builtin_resources;
pub use crd::crd_resources;
pub use unknown::unknown_fields;

/// The `info.version` of the documents: the Kubernetes version this server
/// speaks for.
pub const KUBERNETES_VERSION: &str = "v1.37.0";

/// Where OpenAPI v3 schemas live; v2 documents rewrite it to `#/definitions/`.
const V3_REF: &str = "#/components/schemas/";
const V2_REF: &str = "#/definitions/";

/// One served resource and the schemas describing it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiResource {
    /// API group, empty for the core group.
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Resource (plural) name in URLs.
    pub plural: String,
    /// Whether the resource lives in namespaces.
    pub namespaced: bool,
    /// Whether it has a `status` subresource.
    pub status_subresource: bool,
    /// Whether strategic merge patch is accepted (built-in kinds only).
    pub strategic_merge: bool,
    /// The schema name of the kind (`dev.ferry.v1alpha1.VirtualMachine`).
    pub schema_name: String,
    /// The schema name of the list kind.
    pub list_schema_name: String,
    /// Every schema the kind needs, by name, with `#/components/schemas/` refs.
    pub schemas: BTreeMap<String, Value>,
}

impl ApiResource {
    /// `apis/<group>/<version>` or `api/v1`: the key of the v3 index.
    pub fn gv_path(&self) -> String {
        if self.group.is_empty() {
            format!("api/{}", self.version)
        } else {
            format!("apis/{}/{}", self.group, self.version)
        }
    }

    fn gvk(&self, kind: &str) -> Value {
        json!({"group": self.group, "version": self.version, "kind": kind})
    }

    /// The operations of this resource, keyed by URL path.
    fn paths(&self) -> Vec<(String, Value)> {
        let base = format!("/{}", self.gv_path());
        let (collection, item) = if self.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", self.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", self.plural),
            )
        } else {
            (
                format!("{base}/{}", self.plural),
                format!("{base}/{}/{{name}}", self.plural),
            )
        };
        let obj_ref = json!({"$ref": format!("{V3_REF}{}", self.schema_name)});
        let list_ref = json!({"$ref": format!("{V3_REF}{}", self.list_schema_name)});
        let ok = |r: &Value| json!({"200": {"description": "OK", "content": {"application/json": {"schema": r}}}});
        let gvk = self.gvk(&self.kind);
        let op = |verb: &str, action: &str, response: Value, extra: Value| {
            let mut o = json!({
                "operationId": format!("{verb}{}", self.op_suffix()),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "responses": response,
            });
            if let (Value::Object(m), Value::Object(x)) = (&mut o, extra) {
                m.extend(x);
            }
            o
        };
        let body = |r: &Value| json!({"requestBody": {"required": true, "content": {"*/*": {"schema": r}}}});
        let mut patch_types = vec![
            "application/apply-patch+yaml",
            "application/json-patch+json",
            "application/merge-patch+json",
        ];
        if self.strategic_merge {
            patch_types.push("application/strategic-merge-patch+json");
        }
        let patch_body: Map<String, Value> = patch_types
            .into_iter()
            .map(|t| {
                (
                    t.to_string(),
                    json!({"schema": {"$ref": format!("{V3_REF}io.k8s.apimachinery.pkg.apis.meta.v1.Patch")}}),
                )
            })
            .collect();
        let patch = |action: &str| {
            op(
                "patch",
                action,
                ok(&obj_ref),
                json!({
                    "parameters": [
                        query("dryRun", "string", "When present, indicates that modifications should not be persisted."),
                        query("fieldManager", "string", "fieldManager is a name associated with the actor or entity that is making these changes."),
                        query("fieldValidation", "string", "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict"),
                        query("force", "boolean", "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people."),
                    ],
                    "requestBody": {"required": true, "content": patch_body}
                }),
            )
        };
        let write_params = json!({"parameters": [
            query("dryRun", "string", "When present, indicates that modifications should not be persisted."),
            query("fieldManager", "string", "fieldManager is a name associated with the actor or entity that is making these changes."),
            query("fieldValidation", "string", "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict"),
        ]});
        let with = |a: Value, b: &Value| {
            let mut a = a;
            if let (Value::Object(m), Value::Object(x)) = (&mut a, b) {
                m.extend(x.clone());
            }
            a
        };
        let mut path_params = Vec::new();
        if self.namespaced {
            path_params.push(json!({"name": "namespace", "in": "path", "required": true,
                "description": "object name and auth scope, such as for teams and projects",
                "schema": {"type": "string", "uniqueItems": true}}));
        }
        let mut item_params = path_params.clone();
        item_params.push(json!({"name": "name", "in": "path", "required": true,
            "description": format!("name of the {}", self.kind),
            "schema": {"type": "string", "uniqueItems": true}}));
        let mut out = vec![
            (
                collection,
                json!({
                    "get": op("list", "list", ok(&list_ref), json!({})),
                    "post": op("create", "post", ok(&obj_ref), with(body(&obj_ref), &write_params)),
                    "delete": op("deletecollection", "deletecollection", ok(&json!({"$ref": format!("{V3_REF}io.k8s.apimachinery.pkg.apis.meta.v1.Status")})), json!({})),
                    "parameters": path_params,
                }),
            ),
            (
                item.clone(),
                json!({
                    "get": op("read", "get", ok(&obj_ref), json!({})),
                    "put": op("replace", "put", ok(&obj_ref), with(body(&obj_ref), &write_params)),
                    "patch": patch("patch"),
                    "delete": op("delete", "delete", ok(&obj_ref), json!({})),
                    "parameters": item_params.clone(),
                }),
            ),
        ];
        if self.status_subresource {
            out.push((
                format!("{item}/status"),
                json!({
                    "get": op("readStatus", "get", ok(&obj_ref), json!({})),
                    "put": op("replaceStatus", "put", ok(&obj_ref), with(body(&obj_ref), &write_params)),
                    "patch": patch("patch"),
                    "parameters": item_params,
                }),
            ));
        }
        out
    }

    /// `FerryDevV1alpha1NamespacedVirtualMachine`, the operationId suffix.
    fn op_suffix(&self) -> String {
        let group: String = if self.group.is_empty() {
            "Core".into()
        } else {
            self.group.split(['.', '-']).map(capitalize).collect()
        };
        format!(
            "{group}{}{}{}",
            capitalize(&self.version),
            if self.namespaced { "Namespaced" } else { "" },
            self.kind
        )
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn query(name: &str, ty: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description,
           "schema": {"type": ty, "uniqueItems": true}})
}

/// `dev.ferry` for `ferry.dev`: the reversed group used in schema names.
pub fn reverse_group(group: &str) -> String {
    let mut parts: Vec<&str> = group.split('.').collect();
    parts.reverse();
    parts.join(".")
}

/// The `/openapi/v3` index: one entry per group-version.
pub fn v3_index(resources: &[ApiResource]) -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<String> = resources.iter().map(ApiResource::gv_path).collect();
    gvs.sort();
    gvs.dedup();
    for gv in gvs {
        if let Some(doc) = v3_group_version(resources, &gv) {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            doc.to_string().hash(&mut h);
            paths.insert(
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={:016X}", h.finish())}),
            );
        }
    }
    json!({"paths": paths})
}

/// The OpenAPI v3 document of one group-version (`apis/ferry.dev/v1alpha1`,
/// `api/v1`), or `None` when no resource is served there.
pub fn v3_group_version(resources: &[ApiResource], gv_path: &str) -> Option<Value> {
    let gv_path = gv_path.trim_matches('/');
    let selected: Vec<&ApiResource> = resources
        .iter()
        .filter(|r| r.gv_path() == gv_path)
        .collect();
    if selected.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = common_schemas();
    for r in &selected {
        for (p, item) in r.paths() {
            paths.insert(p, item);
        }
        for (k, v) in &r.schemas {
            schemas.insert(k.clone(), v.clone());
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The OpenAPI v2 (Swagger 2.0) document of everything served.
pub fn v2(resources: &[ApiResource]) -> Value {
    let mut definitions = common_schemas();
    let mut paths = Map::new();
    for r in resources {
        for (k, v) in &r.schemas {
            definitions.insert(k.clone(), v.clone());
        }
        for (p, item) in r.paths() {
            paths.insert(p, item);
        }
    }
    let mut defs = Value::Object(definitions.into_iter().collect());
    to_v2_schema(&mut defs);
    let mut paths = Value::Object(paths);
    to_v2_paths(&mut paths);
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
        "paths": paths,
        "definitions": defs,
    })
}

/// Schemas every document refers to (`Patch`, `Status`, `ObjectMeta`,
/// `ListMeta` and what they use).
fn common_schemas() -> BTreeMap<String, Value> {
    let mut out = builtin::meta_schemas();
    out.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(),
        json!({"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."}),
    );
    out
}

/// Rewrites v3 refs to v2 and drops what Swagger 2.0 cannot say, as the
/// real server does when it publishes CRD schemas in v2.
fn to_v2_schema(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref") {
                *r = r.replace(V3_REF, V2_REF);
            }
            m.remove("nullable");
            m.remove("anyOf");
            m.remove("oneOf");
            m.remove("not");
            if m.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                m.remove("type");
            }
            // `allOf: [{$ref}]` wrappers become the plain `$ref` in v2.
            if let Some(Value::Array(all)) = m.get("allOf")
                && all.len() == 1
                && let Some(r) = all[0].get("$ref").cloned()
            {
                m.remove("allOf");
                m.insert("$ref".into(), r);
                to_v2_schema(v);
                return;
            }
            for (_, c) in m.iter_mut() {
                to_v2_schema(c);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(to_v2_schema),
        _ => {}
    }
}

/// Turns v3 operations (requestBody, responses with content) into v2 ones.
fn to_v2_paths(paths: &mut Value) {
    let Some(paths) = paths.as_object_mut() else {
        return;
    };
    for (_, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (key, op) in item.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            if key == "parameters" {
                continue;
            }
            let mut params: Vec<Value> = op
                .remove("parameters")
                .and_then(|p| p.as_array().cloned())
                .unwrap_or_default();
            if let Some(body) = op.remove("requestBody") {
                let consumes: Vec<String> = body
                    .get("content")
                    .and_then(Value::as_object)
                    .map(|c| c.keys().cloned().collect())
                    .unwrap_or_default();
                let schema = body
                    .pointer("/content")
                    .and_then(Value::as_object)
                    .and_then(|c| c.values().next())
                    .and_then(|c| c.get("schema"))
                    .cloned()
                    .unwrap_or(json!({}));
                params.push(
                    json!({"name": "body", "in": "body", "required": true, "schema": schema}),
                );
                op.insert("consumes".into(), json!(consumes));
            }
            for p in &mut params {
                if p.get("in").and_then(Value::as_str) == Some("body") {
                    continue;
                }
                if let Value::Object(pm) = p
                    && let Some(Value::Object(s)) = pm.remove("schema")
                {
                    pm.extend(s);
                }
            }
            op.insert("parameters".into(), Value::Array(params));
            if let Some(Value::Object(resp)) = op.get_mut("responses") {
                for (_, r) in resp.iter_mut() {
                    let schema = r.pointer("/content/application~1json/schema").cloned();
                    if let (Some(s), Value::Object(rm)) = (schema, r) {
                        rm.remove("content");
                        rm.insert("schema".into(), s);
                    }
                }
            }
            op.insert(
                "produces".into(),
                json!(["application/json", "application/yaml"]),
            );
        }
        if let Some(Value::Array(ps)) = item.get_mut("parameters") {
            for p in ps.iter_mut() {
                if let Value::Object(pm) = p
                    && let Some(Value::Object(s)) = pm.remove("schema")
                {
                    pm.extend(s);
                }
            }
        }
    }
    let mut whole = Value::Object(std::mem::take(paths));
    to_v2_schema(&mut whole);
    if let Value::Object(m) = whole {
        *paths = m;
    }
}

#[cfg(test)]
#[path = "openapi/tests.rs"]
mod tests;
