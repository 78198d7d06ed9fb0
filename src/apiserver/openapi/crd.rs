//! Schemas of custom resources, published as the real server publishes
//! them: the version's `openAPIV3Schema` under
//! `<reversed group>.<version>.<Kind>`, with `metadata` referring to
//! `ObjectMeta`, documented `apiVersion`/`kind`, and the list kind beside it.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::builtin::{API_VERSION_DOC, KIND_DOC, list_schema};
use super::{ApiResource, V3_REF, reverse_group};

const METADATA_DOC: &str = "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

/// The published schema of one CRD version's kind.
fn kind_schema(schema: Option<Value>, group: &str, version: &str, kind: &str) -> Value {
    let mut s = match schema {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    s.entry("type").or_insert_with(|| json!("object"));
    let props = s
        .entry("properties")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut props = props;
    for (field, doc) in [("apiVersion", API_VERSION_DOC), ("kind", KIND_DOC)] {
        let entry = props
            .entry(field)
            .or_insert_with(|| json!({"type": "string"}));
        if let Value::Object(e) = entry {
            e.entry("description").or_insert_with(|| json!(doc));
        }
    }
    props.insert(
        "metadata".into(),
        json!({"allOf": [{"$ref": format!("{V3_REF}io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")}],
               "description": METADATA_DOC}),
    );
    s.insert("properties".into(), Value::Object(props));
    s.insert(
        "x-kubernetes-group-version-kind".into(),
        json!([{"group": group, "kind": kind, "version": version}]),
    );
    Value::Object(s)
}

/// One [`ApiResource`] per served version of a CRD.
pub fn crd_resources(crd: &CustomResourceDefinition) -> Vec<ApiResource> {
    let spec = &crd.spec;
    let group = spec.group.as_str();
    let kind = spec.names.kind.as_str();
    let list_kind = spec
        .names
        .list_kind
        .clone()
        .unwrap_or_else(|| format!("{kind}List"));
    spec.versions
        .iter()
        .filter(|v| v.served)
        .map(|v| {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| serde_json::to_value(s).ok());
            let prefix = format!("{}.{}", reverse_group(group), v.name);
            let name = format!("{prefix}.{kind}");
            let list_name = format!("{prefix}.{list_kind}");
            let mut list = list_schema(group, &v.name, kind, &name);
            list["x-kubernetes-group-version-kind"][0]["kind"] = json!(list_kind);
            let mut schemas = BTreeMap::new();
            schemas.insert(name.clone(), kind_schema(schema, group, &v.name, kind));
            schemas.insert(list_name.clone(), list);
            ApiResource {
                group: group.into(),
                version: v.name.clone(),
                kind: kind.into(),
                plural: spec.names.plural.clone(),
                namespaced: spec.scope == "Namespaced",
                status_subresource: v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                strategic_merge: false,
                schema_name: name,
                list_schema_name: list_name,
                schemas,
            }
        })
        .collect()
}
