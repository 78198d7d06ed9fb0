//! Strategic merge patch for the built-in kinds, as kubectl sends it
//! (`kubectl apply` client-side, `kubectl edit`, `kubectl patch`): objects
//! merge, `null` deletes, lists with a `patchMergeKey` merge by that key,
//! lists of scalars with the merge strategy are unioned, other lists are
//! replaced. Directives: `$patch: replace|delete|merge` on objects and list
//! items, `$deleteFromPrimitiveList/<f>`, `$setElementOrder/<f>` and
//! `$retainKeys`. Custom resources do not support it (the server answers
//! 415), so callers only use it for built-in kinds.

use serde_json::{Map, Value};

use super::PatchError;
use super::listtypes::{BuiltinListTypes, ListType, ListTypes};

const SET_ORDER: &str = "$setElementOrder/";
const DELETE_PRIMITIVE: &str = "$deleteFromPrimitiveList/";

/// Applies a strategic merge patch to a built-in object.
pub fn strategic_merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let (Some(t), Some(p)) = (target.as_object(), patch.as_object()) else {
        return Err(PatchError::BadRequest(
            "strategic merge patch must be a JSON object".into(),
        ));
    };
    let merged = merge_map(t, p, &mut Vec::new(), &BuiltinListTypes)?;
    Ok(Value::Object(merged.unwrap_or_default()))
}

fn directive(p: &Map<String, Value>) -> Result<Option<&str>, PatchError> {
    match p.get("$patch") {
        None => Ok(None),
        Some(Value::String(s)) if matches!(s.as_str(), "replace" | "delete" | "merge") => {
            Ok(Some(s.as_str()))
        }
        Some(other) => Err(PatchError::BadRequest(format!(
            "unknown patch type: {other} in map: {}",
            Value::Object(p.clone())
        ))),
    }
}

fn strip(p: &Map<String, Value>) -> Map<String, Value> {
    p.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Merges `patch` into `orig`; `None` means the object is deleted.
fn merge_map(
    orig: &Map<String, Value>,
    patch: &Map<String, Value>,
    names: &mut Vec<String>,
    types: &dyn ListTypes,
) -> Result<Option<Map<String, Value>>, PatchError> {
    match directive(patch)? {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let empty = Map::new();
            return merge_map(&empty, &strip(patch), names, types);
        }
        _ => {}
    }
    let mut out = orig.clone();
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, pv) in patch {
        if let Some(field) = k.strip_prefix(SET_ORDER) {
            if let Some(order) = pv.as_array() {
                orders.push((field.to_string(), order.clone()));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE) {
            if let (Some(Value::Array(list)), Some(del)) = (out.get_mut(field), pv.as_array()) {
                list.retain(|v| !del.contains(v));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        names.push(k.clone());
        match pv {
            Value::Null => {
                out.remove(k);
            }
            Value::Object(po) => {
                let empty = Map::new();
                let base = out.get(k).and_then(Value::as_object).unwrap_or(&empty);
                match merge_map(base, po, names, types)? {
                    Some(m) => {
                        out.insert(k.clone(), Value::Object(m));
                    }
                    None => {
                        out.remove(k);
                    }
                }
            }
            Value::Array(pl) => {
                let empty = Vec::new();
                let base = out.get(k).and_then(Value::as_array).unwrap_or(&empty);
                let merged = merge_list(base, pl, names, types)?;
                out.insert(k.clone(), Value::Array(merged));
            }
            scalar => {
                out.insert(k.clone(), scalar.clone());
            }
        }
        names.pop();
    }
    for (field, order) in orders {
        if let Some(Value::Array(list)) = out.get_mut(&field) {
            names.push(field.clone());
            reorder(list, &order, &types.list_type(&names_ref(names)));
            names.pop();
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        out.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(Some(out))
}

fn names_ref(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

fn merge_list(
    orig: &[Value],
    patch: &[Value],
    names: &mut Vec<String>,
    types: &dyn ListTypes,
) -> Result<Vec<Value>, PatchError> {
    let replace = patch.iter().any(|v| {
        v.as_object()
            .is_some_and(|o| o.get("$patch").and_then(Value::as_str) == Some("replace"))
    });
    let items: Vec<&Value> = patch
        .iter()
        .filter(|v| {
            !v.as_object()
                .is_some_and(|o| o.contains_key("$patch") && o.len() == 1)
        })
        .collect();
    let base: &[Value] = if replace { &[] } else { orig };
    match types.list_type(&names_ref(names)) {
        ListType::Atomic => Ok(items.into_iter().cloned().collect()),
        ListType::Set => {
            let mut out = base.to_vec();
            for v in items {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListType::Map(keys) => {
            let key = keys.first().cloned().unwrap_or_default();
            let mut out = base.to_vec();
            for item in items {
                let Some(po) = item.as_object() else {
                    return Err(PatchError::BadRequest(format!(
                        "unable to find api field in struct for the list item {item}: expected an object"
                    )));
                };
                let kv = po.get(&key);
                if kv.is_none() {
                    return Err(PatchError::BadRequest(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    )));
                }
                let pos = out.iter().position(|o| o.get(&key) == kv);
                if directive(po)? == Some("delete") {
                    out.retain(|o| o.get(&key) != kv);
                    continue;
                }
                let empty = Map::new();
                let base = pos
                    .and_then(|i| out[i].as_object())
                    .unwrap_or(&empty)
                    .clone();
                let merged = merge_map(&base, po, names, types)?;
                match (pos, merged) {
                    (Some(i), Some(m)) => out[i] = Value::Object(m),
                    (Some(i), None) => {
                        out.remove(i);
                    }
                    (None, Some(m)) => out.push(Value::Object(m)),
                    (None, None) => {}
                }
            }
            Ok(out)
        }
    }
}

/// `$setElementOrder`: listed items first, in the given order; others keep
/// their relative order after them.
fn reorder(list: &mut [Value], order: &[Value], lt: &ListType) {
    let key = match lt {
        ListType::Map(keys) => keys.first().cloned(),
        _ => None,
    };
    let rank = |v: &Value| -> usize {
        order
            .iter()
            .position(|o| match &key {
                Some(k) => o.get(k).is_some() && o.get(k) == v.get(k),
                None => o == v,
            })
            .unwrap_or(usize::MAX)
    };
    list.sort_by_key(|v| rank(v));
}
