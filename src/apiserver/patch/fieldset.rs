//! Field paths and sets as structured-merge-diff models them, their
//! `FieldsV1` encoding in `metadata.managedFields`
//! (`{"f:spec":{"f:ports":{"k:{\"port\":80}":{".":{},"f:port":{}}}}}`) and
//! their text form in conflict messages (`.spec.ports[port=80].name`).

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

use super::listtypes::{ListType, ListTypes};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathElement {
    /// An object field: `f:name`.
    Field(String),
    /// An associative-list item, by its key fields as a canonical JSON
    /// object (keys sorted): `k:{"name":"c"}`.
    Key(String),
    /// A set item, by its JSON value: `v:"a"`.
    Value(String),
    /// A list item by position: `i:0`.
    Index(usize),
}

/// A path from the object root.
pub type FieldPath = Vec<PathElement>;

/// A set of field paths (one manager's ownership).
pub type FieldSet = BTreeSet<FieldPath>;

impl PathElement {
    fn encode(&self) -> String {
        match self {
            Self::Field(f) => format!("f:{f}"),
            Self::Key(k) => format!("k:{k}"),
            Self::Value(v) => format!("v:{v}"),
            Self::Index(i) => format!("i:{i}"),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        let (kind, rest) = s.split_at_checked(2)?;
        match kind {
            "f:" => Some(Self::Field(rest.to_string())),
            "k:" => {
                let v: Value = serde_json::from_str(rest).ok()?;
                Some(Self::Key(v.to_string()))
            }
            "v:" => {
                let v: Value = serde_json::from_str(rest).ok()?;
                Some(Self::Value(v.to_string()))
            }
            "i:" => rest.parse().ok().map(Self::Index),
            _ => None,
        }
    }
}

impl fmt::Display for PathElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Field(n) => write!(f, ".{n}"),
            Self::Key(k) => {
                let parsed: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = parsed.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "[{}]", parts.join(","))
            }
            Self::Value(v) => write!(f, "[={v}]"),
            Self::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// `.spec.containers[name="c"].image`, as structured-merge-diff prints it.
pub fn path_string(p: &[PathElement]) -> String {
    p.iter().map(ToString::to_string).collect()
}

/// Encodes a set as a `fieldsV1` object.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    fn insert(node: &mut Map<String, Value>, path: &[PathElement]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let child = node
            .entry(first.encode())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(c) = child {
            if rest.is_empty() {
                c.insert(".".into(), Value::Object(Map::new()));
            } else {
                insert(c, rest);
            }
        }
    }
    /// A member with no children is written `{}`, not `{".":{}}`.
    fn tidy(v: &mut Value) {
        if let Value::Object(m) = v {
            if m.len() == 1 && m.contains_key(".") {
                m.clear();
                return;
            }
            for (_, c) in m.iter_mut() {
                tidy(c);
            }
        }
    }
    let mut root = Map::new();
    for p in set {
        insert(&mut root, p);
    }
    let mut v = Value::Object(root);
    tidy(&mut v);
    v
}

/// Decodes a `fieldsV1` object; unknown keys are skipped.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, prefix: &mut FieldPath, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() && !prefix.is_empty() {
            out.insert(prefix.clone());
            return;
        }
        for (k, c) in m {
            if k == "." {
                out.insert(prefix.clone());
            } else if let Some(e) = PathElement::decode(k) {
                prefix.push(e);
                walk(c, prefix, out);
                prefix.pop();
            }
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Metadata fields the server owns; they never appear in managed fields.
const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
];

/// Whether a root-level path is one that managed fields never track.
pub(crate) fn is_ignored(path: &[PathElement]) -> bool {
    match path {
        [PathElement::Field(f), ..] if f == "apiVersion" || f == "kind" => true,
        [PathElement::Field(m), PathElement::Field(f), ..] if m == "metadata" => {
            SERVER_META.contains(&f.as_str())
        }
        _ => false,
    }
}

/// The key element of an associative-list item.
pub(crate) fn item_key(item: &Value, keys: &[String]) -> PathElement {
    let mut m: Vec<(&String, Value)> = keys
        .iter()
        .filter_map(|k| item.get(k).map(|v| (k, v.clone())))
        .collect();
    m.sort_by(|a, b| a.0.cmp(b.0));
    let obj: Map<String, Value> = m.into_iter().map(|(k, v)| (k.clone(), v)).collect();
    PathElement::Key(Value::Object(obj).to_string())
}

/// The field set of a value as an applier states it: every leaf, every
/// atomic list or map as one field, and every associative-list item.
pub fn apply_set(value: &Value, types: &dyn ListTypes) -> FieldSet {
    let mut out = FieldSet::new();
    collect(value, &mut Vec::new(), &mut Vec::new(), types, &mut out);
    out.retain(|p| !p.is_empty() && !is_ignored(p));
    out
}

fn collect(
    v: &Value,
    path: &mut FieldPath,
    names: &mut Vec<String>,
    types: &dyn ListTypes,
    out: &mut FieldSet,
) {
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    match v {
        Value::Object(m) => {
            if m.is_empty() || (!path.is_empty() && types.is_atomic_map(&name_refs)) {
                out.insert(path.clone());
                return;
            }
            for (k, c) in m {
                path.push(PathElement::Field(k.clone()));
                names.push(k.clone());
                collect(c, path, names, types, out);
                names.pop();
                path.pop();
            }
        }
        Value::Array(items) => match types.list_type(&name_refs) {
            ListType::Atomic => {
                out.insert(path.clone());
            }
            ListType::Set => {
                for it in items {
                    path.push(PathElement::Value(it.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Map(keys) => {
                for it in items {
                    path.push(item_key(it, &keys));
                    out.insert(path.clone());
                    if let Value::Object(m) = it {
                        for (k, c) in m {
                            path.push(PathElement::Field(k.clone()));
                            names.push(k.clone());
                            collect(c, path, names, types, out);
                            names.pop();
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path` in `v`, if present.
pub fn value_at<'a>(v: &'a Value, path: &[PathElement]) -> Option<&'a Value> {
    let mut cur = v;
    for e in path {
        cur = match e {
            PathElement::Field(f) => cur.get(f)?,
            PathElement::Index(i) => cur.get(*i)?,
            PathElement::Value(s) => {
                let want: Value = serde_json::from_str(s).ok()?;
                cur.as_array()?.iter().find(|x| **x == want)?
            }
            PathElement::Key(k) => {
                let want: Map<String, Value> = serde_json::from_str(k).ok()?;
                cur.as_array()?
                    .iter()
                    .find(|x| want.iter().all(|(kk, vv)| x.get(kk) == Some(vv)))?
            }
        };
    }
    Some(cur)
}

/// Removes the value at `path` from `v` (a field, a list item, a set value).
pub(crate) fn remove_at(v: &mut Value, path: &[PathElement]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for e in parent {
        let next = match e {
            PathElement::Field(f) => cur.get_mut(f),
            PathElement::Index(i) => cur.get_mut(*i),
            PathElement::Value(_) | PathElement::Key(_) => {
                let idx = position(cur, e);
                match idx {
                    Some(i) => cur.get_mut(i),
                    None => None,
                }
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        PathElement::Field(f) => {
            if let Value::Object(m) = cur {
                m.remove(f);
            }
        }
        other => {
            if let Some(i) = position(cur, other)
                && let Value::Array(a) = cur
            {
                a.remove(i);
            }
        }
    }
}

fn position(list: &Value, e: &PathElement) -> Option<usize> {
    let a = list.as_array()?;
    match e {
        PathElement::Index(i) => (*i < a.len()).then_some(*i),
        PathElement::Value(s) => {
            let want: Value = serde_json::from_str(s).ok()?;
            a.iter().position(|x| *x == want)
        }
        PathElement::Key(k) => {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            a.iter()
                .position(|x| want.iter().all(|(kk, vv)| x.get(kk) == Some(vv)))
        }
        PathElement::Field(_) => None,
    }
}
