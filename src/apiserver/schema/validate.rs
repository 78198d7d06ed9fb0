//! OpenAPI value validation of an already pruned and defaulted object, with
//! go-openapi's messages as apiextensions turns them into field errors
//! (`spec.x in body should be less than or equal to 10`, …), plus the
//! `x-kubernetes-list-type: set|map` uniqueness checks.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::field::{FieldError, child, index};
use super::formats;
use super::node::{Additional, Node, json_type};

/// Validates `value` against `s`; `path` is the field path of `value`.
pub(crate) fn validate(value: &Value, s: &Node, path: &str, errs: &mut Vec<FieldError>) {
    if value.is_null() && (s.nullable || s.ty.is_none() && !s.int_or_string) {
        return;
    }
    if !check_type(value, s, path, errs) {
        return;
    }
    match value {
        Value::Object(map) => {
            for r in &s.required {
                if !map.contains_key(r) {
                    errs.push(FieldError::required(&child(path, r), ""));
                }
            }
            let n = map.len() as i64;
            if let Some(max) = s.max_properties
                && n > max
            {
                errs.push(FieldError::too_many(path, n, max));
            }
            if let Some(min) = s.min_properties
                && n < min
            {
                errs.push(FieldError::invalid(
                    path,
                    json!(n),
                    format!("{} should have at least {min} properties", body(path)),
                ));
            }
            for (k, v) in map {
                if let Some(p) = s.properties.get(k) {
                    validate(v, p, &child(path, k), errs);
                } else if let Some(Additional::Schema(a)) = &s.additional {
                    validate(v, a, &child(path, k), errs);
                }
            }
        }
        Value::Array(items) => {
            let n = items.len() as i64;
            if let Some(min) = s.min_items
                && n < min
            {
                errs.push(FieldError::invalid(
                    path,
                    json!(n),
                    format!("{} should have at least {min} items", body(path)),
                ));
            }
            if let Some(max) = s.max_items
                && n > max
            {
                errs.push(FieldError::too_many(path, n, max));
            }
            if s.unique_items && has_duplicates(items) {
                errs.push(FieldError::invalid(
                    path,
                    json!(""),
                    format!("{} shouldn't contain duplicates", body(path)),
                ));
            }
            if let Some(item) = s.items.as_deref() {
                for (i, v) in items.iter().enumerate() {
                    validate(v, item, &index(path, i), errs);
                }
            }
            list_type(items, s, path, errs);
        }
        Value::String(text) => string(text, s, path, errs),
        Value::Number(_) => number(value, s, path, errs),
        _ => {}
    }
    if let Some(allowed) = &s.enum_values
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed
            .iter()
            .map(|a| match a {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        errs.push(FieldError::not_supported(path, value.clone(), &names));
    }
    for sub in &s.all_of {
        validate(value, sub, path, errs);
    }
    if !s.any_of.is_empty() && !s.any_of.iter().any(|b| passes(value, b, path)) {
        errs.push(FieldError::invalid(
            path,
            value.clone(),
            format!("{} must validate at least one schema (anyOf)", body(path)),
        ));
    }
    if !s.one_of.is_empty() && s.one_of.iter().filter(|b| passes(value, b, path)).count() != 1 {
        errs.push(FieldError::invalid(
            path,
            value.clone(),
            format!(
                "{} must validate one and only one schema (oneOf)",
                body(path)
            ),
        ));
    }
    if let Some(not) = &s.not
        && passes(value, not, path)
    {
        errs.push(FieldError::invalid(
            path,
            value.clone(),
            format!("{} must not validate the schema (not)", body(path)),
        ));
    }
}

fn passes(value: &Value, s: &Node, path: &str) -> bool {
    let mut e = Vec::new();
    validate(value, s, path, &mut e);
    e.is_empty()
}

/// `<path> in body`, go-openapi's subject of every message.
fn body(path: &str) -> String {
    format!("{path} in body")
}

/// Checks the value's JSON type; `false` stops further checks of this node.
fn check_type(value: &Value, s: &Node, path: &str, errs: &mut Vec<FieldError>) -> bool {
    let actual = json_type(value);
    let (ok, expected) = if s.int_or_string {
        (
            matches!(actual, "integer" | "string"),
            "integer,string".to_string(),
        )
    } else {
        match s.ty.as_deref() {
            None | Some("") => return true,
            Some("number") => (matches!(actual, "integer" | "number"), "number".into()),
            Some(t) => (actual == t, t.to_string()),
        }
    };
    if !ok {
        errs.push(FieldError::type_invalid(
            path,
            json!(actual),
            format!(
                "{} must be of type {expected}: {}",
                body(path),
                super::field::go_quote(actual)
            ),
        ));
    }
    ok
}

fn string(text: &str, s: &Node, path: &str, errs: &mut Vec<FieldError>) {
    let len = text.chars().count() as i64;
    if let Some(max) = s.max_length
        && len > max
    {
        errs.push(FieldError::too_long(path, max));
    }
    if let Some(min) = s.min_length
        && len < min
    {
        errs.push(FieldError::invalid(
            path,
            json!(text),
            format!("{} should be at least {min} chars long", body(path)),
        ));
    }
    if let Some((src, re)) = &s.pattern
        && !re.is_match(text)
    {
        errs.push(FieldError::invalid(
            path,
            json!(text),
            format!("{} should match '{src}'", body(path)),
        ));
    }
    if let Some(f) = s.format.as_deref()
        && !formats::string_matches(f, text)
    {
        errs.push(FieldError::type_invalid(
            path,
            json!(text),
            format!(
                "{} must be of type {f}: {}",
                body(path),
                super::field::go_quote(text)
            ),
        ));
    }
}

/// Formats a number as Go's `%v` of a float64 does for the values schemas use.
fn num(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

fn number(value: &Value, s: &Node, path: &str, errs: &mut Vec<FieldError>) {
    let Some(x) = value.as_f64() else { return };
    if let Some(m) = s.multiple_of
        && m != 0.0
        && (x / m).fract() != 0.0
    {
        errs.push(FieldError::invalid(
            path,
            value.clone(),
            format!("{} should be a multiple of {}", body(path), num(m)),
        ));
    }
    if let Some(max) = s.maximum {
        let (bad, word) = if s.exclusive_maximum {
            (x >= max, "less than")
        } else {
            (x > max, "less than or equal to")
        };
        if bad {
            errs.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} should be {word} {}", body(path), num(max)),
            ));
        }
    }
    if let Some(min) = s.minimum {
        let (bad, word) = if s.exclusive_minimum {
            (x <= min, "greater than")
        } else {
            (x < min, "greater than or equal to")
        };
        if bad {
            errs.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} should be {word} {}", body(path), num(min)),
            ));
        }
    }
    if s.format.as_deref() == Some("int32") && (x < i32::MIN as f64 || x > i32::MAX as f64) {
        errs.push(FieldError::type_invalid(
            path,
            value.clone(),
            format!("{} must be of type int32: \"{}\"", body(path), value),
        ));
    }
}

fn has_duplicates(items: &[Value]) -> bool {
    let mut seen = HashSet::new();
    items.iter().any(|v| !seen.insert(v.to_string()))
}

/// `x-kubernetes-list-type: set` items and `map` keys must be unique.
fn list_type(items: &[Value], s: &Node, path: &str, errs: &mut Vec<FieldError>) {
    match s.list_type.as_deref() {
        Some("set") => {
            let mut seen = HashSet::new();
            for (i, v) in items.iter().enumerate() {
                if !seen.insert(v.to_string()) {
                    errs.push(FieldError::duplicate(&index(path, i), v.clone()));
                }
            }
        }
        Some("map") => {
            let mut seen = HashSet::new();
            for (i, v) in items.iter().enumerate() {
                let Some(obj) = v.as_object() else { continue };
                let mut key = serde_json::Map::new();
                for k in &s.list_map_keys {
                    if let Some(kv) = obj.get(k) {
                        key.insert(k.clone(), kv.clone());
                    }
                }
                let key = Value::Object(key);
                if !seen.insert(key.to_string()) {
                    errs.push(FieldError::duplicate(&index(path, i), key));
                }
            }
        }
        _ => {}
    }
}
