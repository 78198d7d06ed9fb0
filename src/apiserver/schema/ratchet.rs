//! Validation ratcheting on update (`CRDValidationRatcheting`, on by
//! default since Kubernetes 1.30): an error about a value the update did not
//! change is dropped, so objects stored before a schema tightened can still
//! be updated elsewhere. Values are correlated with the old object through
//! object fields and `x-kubernetes-list-type: map` keys; items of other
//! lists cannot be correlated and keep their errors.

use serde_json::Value;

use super::node::{Additional, Node};

/// One step of a field path as printed in errors.
#[derive(Debug, PartialEq)]
enum Seg<'a> {
    Field(&'a str),
    Index(usize),
}

fn parse(path: &str) -> Option<Vec<Seg<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Seg::Field(name));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            out.push(Seg::Index(r[..end].parse().ok()?));
            rest = &r[end + 1..];
        }
    }
    Some(out)
}

/// Whether the value at `path` is the same in `new` and `old` (both absent
/// counts as the same). `false` when the path cannot be correlated.
pub(crate) fn unchanged(root: &Node, new: &Value, old: &Value, path: &str) -> bool {
    if path.is_empty() || path == "<nil>" {
        return new == old;
    }
    let Some(segs) = parse(path) else {
        return false;
    };
    let mut node = Some(root);
    let mut n = Some(new);
    let mut o = Some(old);
    for seg in segs {
        match seg {
            Seg::Field(f) => {
                node = node.and_then(|s| {
                    s.properties.get(f).or(match &s.additional {
                        Some(Additional::Schema(a)) => Some(a.as_ref()),
                        _ => None,
                    })
                });
                n = n.and_then(|v| v.get(f));
                o = o.and_then(|v| v.get(f));
            }
            Seg::Index(i) => {
                let Some(list_node) = node else { return false };
                if list_node.list_type.as_deref() != Some("map") {
                    return false;
                }
                let keys = &list_node.list_map_keys;
                let item = n.and_then(|v| v.get(i));
                o = match (item, o.and_then(Value::as_array)) {
                    (Some(item), Some(olds)) => olds
                        .iter()
                        .find(|x| keys.iter().all(|k| x.get(k) == item.get(k))),
                    _ => None,
                };
                n = item;
                node = list_node.items.as_deref();
            }
        }
    }
    n == o
}

/// Whether `path` lies inside an item of an `x-kubernetes-list-type: map`
/// list (where `oldSelf` is the old item with the same keys).
pub(crate) fn inside_map_item(root: &Node, path: &str) -> bool {
    let Some(segs) = parse(path) else {
        return false;
    };
    let mut node = Some(root);
    for seg in segs {
        match seg {
            Seg::Field(f) => {
                node = node.and_then(|s| {
                    s.properties.get(f).or(match &s.additional {
                        Some(Additional::Schema(a)) => Some(a.as_ref()),
                        _ => None,
                    })
                });
            }
            Seg::Index(_) => {
                if node.is_some_and(|n| n.list_type.as_deref() == Some("map")) {
                    return true;
                }
                node = node.and_then(|n| n.items.as_deref());
            }
        }
    }
    false
}

/// The old value re-ordered to line up with the new one: the items of
/// every map list are matched by key, and a new item without an old one
/// is paired with itself (no transition to judge). Used so that index-wise
/// `oldSelf` correlation sees the item with the same keys.
pub(crate) fn align_old(node: &Node, new: &Value, old: &Value) -> Value {
    match (new, old) {
        (Value::Object(n), Value::Object(o)) => {
            let mut out = o.clone();
            for (k, nv) in n {
                let child = node.properties.get(k).or(match &node.additional {
                    Some(Additional::Schema(a)) => Some(a.as_ref()),
                    _ => None,
                });
                if let (Some(child), Some(ov)) = (child, o.get(k)) {
                    out.insert(k.clone(), align_old(child, nv, ov));
                }
            }
            Value::Object(out)
        }
        (Value::Array(n), Value::Array(o)) if node.list_type.as_deref() == Some("map") => {
            let keys = &node.list_map_keys;
            let items = n
                .iter()
                .map(|ni| {
                    match o
                        .iter()
                        .find(|oi| keys.iter().all(|k| oi.get(k) == ni.get(k)))
                    {
                        Some(oi) => match node.items.as_deref() {
                            Some(item) => align_old(item, ni, oi),
                            None => oi.clone(),
                        },
                        None => ni.clone(),
                    }
                })
                .collect();
            Value::Array(items)
        }
        _ => old.clone(),
    }
}

/// The path of the parent of `path` (`spec.a[0].b` → `spec.a[0]`).
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Node {
        Node::compile(
            &json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
                "a": {"type": "string"},
                "m": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"],
                      "items": {"type": "object", "properties": {"k": {"type": "string"}, "v": {"type": "string"}}}},
                "l": {"type": "array", "items": {"type": "string"}}}}}}),
            "",
        )
        .unwrap()
    }

    #[test]
    fn correlates_fields_and_map_list_items() {
        let s = schema();
        let old = json!({"spec": {"a": "x", "m": [{"k": "1", "v": "a"}, {"k": "2", "v": "b"}], "l": ["p"]}});
        let new = json!({"spec": {"a": "x", "m": [{"k": "2", "v": "b"}, {"k": "1", "v": "c"}], "l": ["p"]}});
        assert!(unchanged(&s, &new, &old, "spec.a"));
        assert!(
            unchanged(&s, &new, &old, "spec.m[0].v"),
            "item k=2 moved but did not change"
        );
        assert!(!unchanged(&s, &new, &old, "spec.m[1].v"));
        assert!(
            !unchanged(&s, &new, &old, "spec.l[0]"),
            "atomic list items do not correlate"
        );
        assert!(unchanged(&s, &new, &old, "spec.l"));
        assert!(unchanged(&s, &new, &old, "spec.missing"));
        assert_eq!(parent("spec.m[0].v"), "spec.m[0]");
        assert_eq!(parent("spec.m[0]"), "spec.m");
        assert_eq!(parent("spec"), "");
    }
}
