//! Defaulting (apiextensions' `structural/defaulting`): a missing property,
//! or a `null` one that is not `nullable`, takes its schema `default`, and
//! defaulting descends into the result, so defaults nest. Non-nullable
//! `null`s without a default are dropped, as the real server drops them.

use serde_json::Value;

use super::node::{Additional, Node};

fn is_non_nullable_null(v: &Value, s: &Node) -> bool {
    v.is_null() && !s.nullable
}

/// Applies the schema's defaults to `value` in place.
pub(crate) fn apply(value: &mut Value, s: &Node) {
    match value {
        Value::Object(map) => {
            for (k, prop) in &s.properties {
                match &prop.default {
                    Some(d) => {
                        let missing = map.get(k).is_none_or(|v| is_non_nullable_null(v, prop));
                        if missing {
                            map.insert(k.clone(), d.clone());
                        }
                    }
                    None => {
                        if map.get(k).is_some_and(|v| is_non_nullable_null(v, prop)) {
                            map.remove(k);
                        }
                    }
                }
            }
            for (k, v) in map.iter_mut() {
                if let Some(prop) = s.properties.get(k) {
                    apply(v, prop);
                } else if let Some(Additional::Schema(a)) = &s.additional {
                    apply(v, a);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.items.as_deref() {
                for v in items {
                    apply(v, item);
                }
            }
        }
        _ => {}
    }
}
