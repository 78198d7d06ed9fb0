//! Unknown-field detection for the built-in kinds against their published
//! schemas, for `fieldValidation=Warn|Strict`: the real server reports
//! `unknown field "spec.template.spec.containers[0].imagee"` where a typed
//! decode would silently drop the field.

use serde_json::Value;

use super::{ApiResource, V3_REF};

/// The paths of the fields of `obj` that the kind's schema does not know,
/// in document order. Opaque nodes (no `properties`, or with
/// `additionalProperties` or `x-kubernetes-preserve-unknown-fields`) accept
/// anything.
pub fn unknown_fields(resource: &ApiResource, obj: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(root) = resource.schemas.get(&resource.schema_name) {
        walk(resource, root, obj, "", &mut out, 0);
    }
    out
}

/// Follows `$ref` and single-`allOf` wrappers to the schema they name.
fn resolve<'a>(resource: &'a ApiResource, mut s: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let r = s
            .get("$ref")
            .or_else(|| {
                s.get("allOf")
                    .and_then(|a| a.get(0))
                    .and_then(|f| f.get("$ref"))
            })
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix(V3_REF));
        match r.and_then(|name| resource.schemas.get(name)) {
            Some(next) => s = next,
            None => return s,
        }
    }
    s
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// Schemas nest only as deep as the Go types; this bounds a hostile
/// object against a recursive schema (JSONSchemaProps).
const MAX_DEPTH: usize = 64;

fn walk(
    resource: &ApiResource,
    schema: &Value,
    v: &Value,
    path: &str,
    out: &mut Vec<String>,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let s = resolve(resource, schema);
    match v {
        Value::Object(m) => {
            if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
                return;
            }
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            let Some(props) = props else {
                if let Some(a) = additional {
                    for (k, c) in m {
                        walk(resource, a, c, &child(path, k), out, depth + 1);
                    }
                }
                return;
            };
            for (k, c) in m {
                match props.get(k) {
                    Some(ps) => walk(resource, ps, c, &child(path, k), out, depth + 1),
                    None if depth == 0 && (k == "apiVersion" || k == "kind") => {}
                    None => out.push(child(path, k)),
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = s.get("items") {
                for (i, c) in items.iter().enumerate() {
                    walk(resource, is, c, &format!("{path}[{i}]"), out, depth + 1);
                }
            }
        }
        _ => {}
    }
}
