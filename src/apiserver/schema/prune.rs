//! Pruning of fields the schema does not specify (apiextensions'
//! `structural/pruning`), collecting the paths it dropped so that
//! `fieldValidation=Warn|Strict` can name them.
//!
//! At the resource root and in every `x-kubernetes-embedded-resource`
//! object, `apiVersion` and `kind` are always kept and `metadata` is reduced
//! to the fields of `ObjectMeta`. Below `x-kubernetes-preserve-unknown-fields`
//! unknown fields are kept, but specified fields are still pruned inside.

use serde_json::Value;

use super::field::{child, index};
use super::node::{Additional, Node};

/// The fields of `meta/v1 ObjectMeta`; anything else under `metadata` is
/// unknown and dropped.
pub(crate) const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Prunes `value` against `schema` (the resource root), returning the paths
/// of the fields it removed, sorted.
pub(crate) fn prune_root(value: &mut Value, schema: &Node) -> Vec<String> {
    let mut pruned = Vec::new();
    prune(value, Some(schema), true, "", &mut pruned);
    pruned.sort();
    pruned
}

fn prune_metadata(meta: &mut Value, path: &str, pruned: &mut Vec<String>) {
    if let Value::Object(m) = meta {
        m.retain(|k, _| {
            let keep = OBJECT_META_FIELDS.contains(&k.as_str());
            if !keep {
                pruned.push(child(path, k));
            }
            keep
        });
    }
}

fn prune(
    value: &mut Value,
    schema: Option<&Node>,
    resource_root: bool,
    path: &str,
    pruned: &mut Vec<String>,
) {
    if let Some(s) = schema
        && s.preserve_unknown
    {
        skip_prune(value, s, resource_root, path, pruned);
        return;
    }
    match value {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let p = child(path, &k);
                if resource_root && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if resource_root && k == "metadata" {
                    if let Some(m) = map.get_mut(&k) {
                        prune_metadata(m, &p, pruned);
                    }
                    continue;
                }
                let sub = schema.and_then(|s| {
                    s.properties.get(&k).map(Some).or(match &s.additional {
                        Some(Additional::Schema(a)) => Some(Some(a.as_ref())),
                        Some(Additional::Any) => Some(None),
                        _ => None,
                    })
                });
                match sub {
                    Some(Some(sub)) => {
                        if let Some(v) = map.get_mut(&k) {
                            prune(v, Some(sub), sub.embedded_resource, &p, pruned);
                        }
                    }
                    // `additionalProperties: true`: keep the value as it is.
                    Some(None) => {}
                    None => {
                        map.remove(&k);
                        pruned.push(p);
                    }
                }
            }
        }
        Value::Array(items) => {
            let item_schema = schema.and_then(|s| s.items.as_deref());
            for (i, item) in items.iter_mut().enumerate() {
                let embedded = item_schema.is_some_and(|s| s.embedded_resource);
                prune(item, item_schema, embedded, &index(path, i), pruned);
            }
        }
        _ => {}
    }
}

/// Below `x-kubernetes-preserve-unknown-fields`: keep unknown fields, but
/// prune inside the specified ones.
fn skip_prune(
    value: &mut Value,
    s: &Node,
    resource_root: bool,
    path: &str,
    pruned: &mut Vec<String>,
) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let p = child(path, k);
                if resource_root && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if resource_root && k == "metadata" {
                    prune_metadata(v, &p, pruned);
                    continue;
                }
                if let Some(sub) = s.properties.get(k) {
                    prune(v, Some(sub), sub.embedded_resource, &p, pruned);
                } else if let Some(Additional::Schema(sub)) = &s.additional {
                    prune(v, Some(sub), sub.embedded_resource, &p, pruned);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.items.as_deref() {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(
                        item,
                        Some(item_schema),
                        item_schema.embedded_resource,
                        &index(path, i),
                        pruned,
                    );
                }
            }
        }
        _ => {}
    }
}
