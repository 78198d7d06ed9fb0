//! Server-side apply and field ownership (structured-merge-diff's model).
//!
//! ```text
//!  apply(live, config, manager M, force)
//!    A   = fields stated by config
//!    for p in A where live[p] != config[p]:
//!        every other manager owning p ──► conflict (409) unless force,
//!                                         with force: p leaves their sets
//!    obj = live ⊕ config             (lists merged by their ListType)
//!    for p in M.previous_apply − A, owned by nobody else: remove p from obj
//!    M.apply_set = A                  (written to metadata.managedFields)
//!
//!  update(old, new, manager U)       (POST/PUT/PATCH other than apply)
//!    changed fields move to U's Update entry; removed fields leave all sets
//! ```

use serde_json::{Map, Value, json};

use super::fieldset::{
    FieldPath, FieldSet, PathElement, apply_set, from_fields_v1, path_string, remove_at,
    to_fields_v1, value_at,
};
use super::listtypes::{ListType, ListTypes};

/// The manager the real server credits with an object's fields when it is
/// first applied to and has no managed fields yet.
const BEFORE_FIRST_APPLY: &str = "before-first-apply";

/// Options of one server-side apply.
#[derive(Clone, Debug)]
pub struct ApplyOptions<'a> {
    /// The `fieldManager` query parameter (required for apply).
    pub manager: &'a str,
    /// The `force` query parameter: take ownership instead of conflicting.
    pub force: bool,
    /// The time to record, RFC 3339 (`2026-01-02T03:04:05Z`).
    pub time: &'a str,
    /// `Some("status")` when applying to the status subresource: only
    /// `status` is taken from the config. `None`: the main resource.
    pub subresource: Option<&'a str>,
    /// On the main resource of a kind with a status subresource, `status`
    /// in the config is ignored.
    pub ignore_status: bool,
}

/// Options of one non-apply write, for [`track_update`].
#[derive(Clone, Debug)]
pub struct UpdateOptions<'a> {
    /// The field manager (from `fieldManager` or the user agent).
    pub manager: &'a str,
    /// The time to record, RFC 3339.
    pub time: &'a str,
    /// `Some("status")` for writes to the status subresource.
    pub subresource: Option<&'a str>,
}

/// One field two managers disagree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager as the server prints it: `"kubectl"`, or
    /// `"kubectl-edit" using v1` for an updater.
    pub manager: String,
    /// The field: `.spec.replicas`.
    pub field: String,
}

/// Why an apply failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Other managers own fields the config changes (409).
    #[error("{}", conflict_message(.0))]
    Conflicts(Vec<Conflict>),
    /// The config is not an object with `apiVersion` and `kind` (400).
    #[error("{0}")]
    BadRequest(String),
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: String,
    set: FieldSet,
}

impl Entry {
    fn display(&self) -> String {
        let mut s = super::super::schema::field::go_quote(&self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation));
        m.insert("apiVersion".into(), json!(self.api_version));
        m.insert("time".into(), json!(self.time));
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), to_fields_v1(&self.set));
        if !self.subresource.is_empty() {
            m.insert("subresource".into(), json!(self.subresource));
        }
        Value::Object(m)
    }

    fn from_json(v: &Value) -> Option<Self> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(Self {
            manager: s("manager"),
            operation: s("operation"),
            api_version: s("apiVersion"),
            time: s("time"),
            subresource: s("subresource"),
            set: from_fields_v1(v.get("fieldsV1")?),
        })
    }
}

fn read_entries(obj: Option<&Value>) -> Vec<Entry> {
    obj.and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Entry::from_json).collect())
        .unwrap_or_default()
}

/// Writes entries sorted as the real server sorts them (operation, time,
/// manager, apiVersion, subresource), dropping empty ones.
fn write_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|p, q| {
        (
            &p.operation,
            &p.time,
            &p.manager,
            &p.api_version,
            &p.subresource,
        )
            .cmp(&(
                &q.operation,
                &q.time,
                &q.manager,
                &q.api_version,
                &q.subresource,
            ))
    });
    if !obj.is_object() {
        return;
    }
    let meta = obj
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
    if let Some(Value::Object(m)) = meta {
        if entries.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert(
                "managedFields".into(),
                Value::Array(entries.iter().map(Entry::to_json).collect()),
            );
        }
    }
}

/// Keeps the paths a write to `subresource` may touch.
fn scope(set: &mut FieldSet, subresource: Option<&str>, ignore_status: bool) {
    let is_status =
        |p: &FieldPath| matches!(p.first(), Some(PathElement::Field(f)) if f == "status");
    match subresource {
        Some("status") => set.retain(is_status),
        _ if ignore_status => set.retain(|p| !is_status(p)),
        _ => {}
    }
}

fn has_prefix(p: &FieldPath, prefix: &FieldPath) -> bool {
    p.len() >= prefix.len() && p[..prefix.len()] == prefix[..]
}

/// A field is owned by `set` if the set holds it or anything below it.
fn owns(set: &FieldSet, p: &FieldPath) -> bool {
    set.range(p.clone()..)
        .next()
        .is_some_and(|q| has_prefix(q, p))
}

/// Applies `config` to `live` (absent on create) for `opts.manager`,
/// returning the new object with its `metadata.managedFields`.
pub fn server_side_apply(
    live: Option<&Value>,
    config: &Value,
    opts: &ApplyOptions<'_>,
    types: &dyn ListTypes,
) -> Result<Value, ApplyError> {
    let Some(cfg) = config.as_object() else {
        return Err(ApplyError::BadRequest(
            "the apply configuration must be an object".into(),
        ));
    };
    for f in ["apiVersion", "kind"] {
        if cfg.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(ApplyError::BadRequest(format!("{f} must be set")));
        }
    }
    let api_version = cfg
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut config = config.clone();
    if let Some(Value::Object(m)) = config.get_mut("metadata") {
        m.remove("managedFields");
    }
    let mut entries = read_entries(live);
    if let Some(l) = live
        && entries.is_empty()
    {
        entries.push(Entry {
            manager: BEFORE_FIRST_APPLY.into(),
            operation: "Update".into(),
            api_version: l
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or(api_version)
                .into(),
            time: opts.time.into(),
            subresource: String::new(),
            set: apply_set(l, types),
        });
    }
    let sub = opts.subresource.unwrap_or("");
    let is_mine =
        |e: &Entry| e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub;
    let mut applied = apply_set(&config, types);
    scope(&mut applied, opts.subresource, opts.ignore_status);

    let empty = json!({});
    let live_v = live.unwrap_or(&empty);
    let mut conflicts = Vec::new();
    for p in &applied {
        if matches!(p.last(), Some(PathElement::Key(_) | PathElement::Value(_))) {
            continue;
        }
        let lv = value_at(live_v, p);
        if lv.is_none() || lv == value_at(&config, p) {
            continue;
        }
        for e in entries.iter().filter(|e| !is_mine(e)) {
            if e.set.contains(p) {
                conflicts.push((e.display(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        if !opts.force {
            return Err(ApplyError::Conflicts(
                conflicts
                    .into_iter()
                    .map(|(manager, p)| Conflict {
                        manager,
                        field: path_string(&p),
                    })
                    .collect(),
            ));
        }
        for e in entries.iter_mut().filter(|e| !is_mine(e)) {
            for (_, p) in &conflicts {
                e.set.remove(p);
            }
        }
    }

    let mut scoped_config = config.clone();
    if let Value::Object(m) = &mut scoped_config {
        match opts.subresource {
            Some("status") => m.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind"),
            _ if opts.ignore_status => {
                m.remove("status");
            }
            _ => {}
        }
    }
    let mut out = merge(live_v, &scoped_config, &mut Vec::new(), types);

    let previous = entries
        .iter()
        .find(|e| is_mine(e))
        .map(|e| e.set.clone())
        .unwrap_or_default();
    let others: Vec<&FieldSet> = entries
        .iter()
        .filter(|e| !is_mine(e))
        .map(|e| &e.set)
        .collect();
    // Shallowest first: a removed list item takes its fields with it (and
    // must be found by its key fields before they are gone).
    let mut removed: Vec<&FieldPath> = Vec::new();
    for p in previous.difference(&applied) {
        if removed.iter().any(|r| has_prefix(p, r)) {
            continue;
        }
        if !owns(&applied, p) && !others.iter().any(|s| owns(s, p)) {
            remove_at(&mut out, p);
            removed.push(p);
        }
    }

    let before: Vec<Entry> = read_entries(live);
    let mine_before = before.iter().find(|e| is_mine(e)).cloned();
    entries.retain(|e| !is_mine(e));
    entries.push(Entry {
        manager: opts.manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        time: opts.time.into(),
        subresource: sub.into(),
        set: applied,
    });
    // A no-op apply changes nothing, not even the time of the entry: the
    // object (and so its resourceVersion) stays as it was.
    if let (Some(l), Some(prev)) = (live, mine_before)
        && without_managed_fields(l) == without_managed_fields(&out)
        && same_sets(&before, &entries)
        && prev.api_version == api_version
    {
        return Ok(l.clone());
    }
    write_entries(&mut out, entries);
    Ok(out)
}

fn without_managed_fields(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(Value::Object(m)) = v.get_mut("metadata") {
        m.remove("managedFields");
    }
    v
}

/// Whether two entry lists give every manager the same fields.
fn same_sets(a: &[Entry], b: &[Entry]) -> bool {
    let key = |e: &Entry| {
        (
            e.manager.clone(),
            e.operation.clone(),
            e.subresource.clone(),
            e.set.clone(),
        )
    };
    let mut x: Vec<_> = a.iter().filter(|e| !e.set.is_empty()).map(key).collect();
    let mut y: Vec<_> = b.iter().filter(|e| !e.set.is_empty()).map(key).collect();
    x.sort();
    y.sort();
    x == y
}

/// Merges an apply configuration into the live value.
fn merge(live: &Value, cfg: &Value, names: &mut Vec<String>, types: &dyn ListTypes) -> Value {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    match (live, cfg) {
        (Value::Object(l), Value::Object(c)) if names.is_empty() || !types.is_atomic_map(&refs) => {
            let mut out = l.clone();
            for (k, cv) in c {
                if cv.is_null() {
                    out.remove(k);
                    continue;
                }
                names.push(k.clone());
                let nv = match l.get(k) {
                    Some(lv) => merge(lv, cv, names, types),
                    None => cv.clone(),
                };
                names.pop();
                out.insert(k.clone(), nv);
            }
            Value::Object(out)
        }
        (Value::Array(l), Value::Array(c)) => match types.list_type(&refs) {
            ListType::Atomic => cfg.clone(),
            ListType::Set => {
                let mut out = l.clone();
                for v in c {
                    if !out.contains(v) {
                        out.push(v.clone());
                    }
                }
                Value::Array(out)
            }
            ListType::Map(keys) => {
                let mut out = l.clone();
                for ci in c {
                    let matches = |x: &Value| keys.iter().all(|k| x.get(k) == ci.get(k));
                    match out.iter().position(matches) {
                        Some(i) => out[i] = merge(&out[i], ci, names, types),
                        None => out.push(ci.clone()),
                    }
                }
                Value::Array(out)
            }
        },
        _ => cfg.clone(),
    }
}

/// Records a non-apply write (create, update, merge/JSON/strategic patch)
/// in `new`'s managed fields: the fields it changed move to `opts.manager`'s
/// `Update` entry; fields it removed leave every entry.
pub fn track_update(
    old: Option<&Value>,
    new: &mut Value,
    opts: &UpdateOptions<'_>,
    types: &dyn ListTypes,
) {
    let old_entries = read_entries(old);
    let requested = new.pointer("/metadata/managedFields").cloned();
    let old_fields = old
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .cloned();
    // A client that sends managed fields different from the stored ones
    // replaces them (this is how they are reset); otherwise they carry over.
    let mut entries = if requested.is_some() && requested != old_fields {
        read_entries(Some(new))
    } else {
        old_entries
    };
    let empty = json!({});
    let old_v = old.unwrap_or(&empty);
    let old_set = apply_set(old_v, types);
    let new_set = apply_set(new, types);
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| !old_set.contains(*p) || value_at(old_v, p) != value_at(new, p))
        .filter(|p| {
            !(old_set.contains(*p)
                && matches!(p.last(), Some(PathElement::Key(_) | PathElement::Value(_))))
        })
        .cloned()
        .collect();
    let removed: Vec<&FieldPath> = old_set.difference(&new_set).collect();
    for e in &mut entries {
        e.set.retain(|p| {
            !changed.contains(p) && !removed.iter().any(|r| has_prefix(p, r)) && !new_lacks(new, p)
        });
    }
    let sub = opts.subresource.unwrap_or("");
    let api_version = new
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !changed.is_empty() {
        let pos = entries.iter().position(|e| {
            e.manager == opts.manager
                && e.operation == "Update"
                && e.subresource == sub
                && e.api_version == api_version
        });
        let entry = match pos {
            Some(i) => &mut entries[i],
            None => {
                entries.push(Entry {
                    manager: opts.manager.into(),
                    operation: "Update".into(),
                    api_version,
                    time: String::new(),
                    subresource: sub.into(),
                    set: FieldSet::new(),
                });
                let last = entries.len() - 1;
                &mut entries[last]
            }
        };
        entry.time = opts.time.into();
        entry.set.extend(changed);
    }
    write_entries(new, entries);
}

/// A path some entry owns that the new object no longer has.
fn new_lacks(new: &Value, p: &FieldPath) -> bool {
    value_at(new, p).is_none()
}

fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [c] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.manager, c.field
        );
    }
    let mut managers: Vec<&str> = conflicts.iter().map(|c| c.manager.as_str()).collect();
    managers.sort();
    managers.dedup();
    let mut lines = Vec::new();
    for m in managers {
        lines.push(format!("conflicts with {m}:"));
        for c in conflicts.iter().filter(|c| c.manager == m) {
            lines.push(format!("- {}", c.field));
        }
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// The 409 `Status` body of an apply conflict, one
/// `FieldManagerConflict` cause per field.
pub fn conflict_status(conflicts: &[Conflict]) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": conflict_message(conflicts),
        "reason": "Conflict",
        "details": {
            "causes": conflicts.iter().map(|c| json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", c.manager),
                "field": c.field,
            })).collect::<Vec<_>>()
        },
        "code": 409
    })
}
