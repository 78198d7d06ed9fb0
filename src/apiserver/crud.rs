//! The verbs on objects: get, list, create, update (main resource and
//! `/status`). Delete lives in [`super::delete`], patch in
//! [`super::patching`] and watch in [`super::watch`].
//!
//! Every write is one [`Store::mutate`](super::store::Store::mutate): the
//! preconditions (resourceVersion, uid, existence) are checked against the
//! stored object under the store's writer lock, so concurrent writers see
//! 409s, never lost updates.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::error::{ApiError, Cause};
use super::http::{ApiState, ResourceRequest};
use super::objmeta::{self, meta_str, present, subject};
use super::resources::ResourceInfo;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{self, EventType, Mutation, Outcome};
use super::{admission, convert, patching};

/// The finalizer the real server puts on CRDs so their objects are removed
/// before the CRD goes.
pub const CRD_CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// The storage key of the request's object.
pub fn object_key(rr: &ResourceRequest, name: &str) -> String {
    rr.info.key(&rr.namespace, name)
}

/// The object name of a request on a single object.
pub fn require_name(rr: &ResourceRequest) -> Result<String, ApiError> {
    let name = rr.name.clone().ok_or_else(ApiError::no_route)?;
    if rr.info.namespaced && rr.namespace.is_empty() {
        return Err(ApiError::no_route());
    }
    Ok(name)
}

/// Run a read-modify-write on the store off the async runtime (it fsyncs),
/// then wake the controllers. With `dry_run` the decision is computed
/// against the current object and nothing is written.
pub async fn mutate(
    state: &ApiState,
    key: String,
    dry_run: bool,
    f: impl FnOnce(Option<&Value>) -> Result<Mutation, ApiError> + Send + 'static,
) -> Result<Outcome, ApiError> {
    if dry_run {
        let current = state.store.get(&key);
        return Ok(match f(current.as_deref())? {
            Mutation::Put(v) => Outcome {
                event: Some(if current.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                }),
                object: Some(Arc::new(v)),
            },
            Mutation::Delete => Outcome {
                object: current,
                event: Some(EventType::Deleted),
            },
            Mutation::Unchanged => Outcome {
                object: current,
                event: None,
            },
        });
    }
    let store = state.store.clone();
    let out = tokio::task::spawn_blocking(move || store.mutate(&key, f))
        .await
        .map_err(|e| ApiError::internal(format!("storage task failed: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))??;
    if out.event.is_some() {
        state.wake.notify_one();
    }
    Ok(out)
}

/// `GET .../NAME`.
pub fn get(state: &ApiState, rr: &ResourceRequest) -> Result<Response, ApiError> {
    let name = require_name(rr)?;
    let obj = state
        .store
        .get(&object_key(rr, &name))
        .ok_or_else(|| ApiError::not_found(&subject(&rr.info, &name)))?;
    Ok(admission::respond(
        rr,
        StatusCode::OK,
        present(&rr.info, &obj),
        &[],
    ))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    /// The resourceVersion of the first page; -1 for "the latest" (the
    /// token a 410 hands out to continue inconsistently).
    rv: i64,
    start: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// kube-apiserver's message for a continue token whose snapshot is gone.
const INCONSISTENT_CONTINUE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// The field selectors a resource supports beyond `metadata.name` and
/// `metadata.namespace` (those `kubectl describe` and event tooling use).
fn extra_fields(info: &ResourceInfo) -> &'static [&'static str] {
    match (info.group.as_str(), info.plural.as_str()) {
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
        ("", "secrets") => &["type"],
        ("", "namespaces") => &["status.phase"],
        _ => &[],
    }
}

/// Parsed `labelSelector` and `fieldSelector`.
pub fn selectors(rr: &ResourceRequest) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(rr.param("labelSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse_with(
        rr.param("fieldSelector").unwrap_or(""),
        extra_fields(&rr.info),
    )
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

/// `GET` on a collection.
pub fn list(state: &ApiState, rr: &ResourceRequest) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(rr)?;
    let limit: usize = match rr.param("limit") {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?
            .max(0) as usize,
        None => 0,
    };
    let token = match rr.param("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .map_err(|_| ApiError::bad_request("continue key is not valid"))?;
            Some(
                serde_json::from_slice::<ContinueToken>(&bytes)
                    .map_err(|_| ApiError::bad_request("continue key is not valid"))?,
            )
        }
        None => None,
    };
    let prefix = rr.info.prefix(&rr.namespace);
    // Later pages come from the first page's snapshot.
    let (all, list_rv) = match &token {
        Some(t) if t.rv >= 0 => {
            let items = state
                .store
                .list_at(&prefix, &t.start, t.rv as u64)
                .ok_or_else(|| {
                    let fresh = ContinueToken {
                        rv: -1,
                        start: t.start.clone(),
                    };
                    let mut e = ApiError::gone(INCONSISTENT_CONTINUE);
                    let mut status = e.status();
                    status["metadata"] = json!({"continue": fresh.encode()});
                    e.raw = Some(Box::new(status));
                    e
                })?;
            (items, t.rv as u64)
        }
        _ => state
            .store
            .list(&prefix, token.as_ref().map(|t| t.start.as_str())),
    };
    // Selectors read metadata only, which storage does not reshape: the
    // stored objects are matched as they are, and presented (apiVersion,
    // kind, the events.k8s.io shape) only as they are written out.
    let mut items: Vec<(&String, &Arc<Value>)> = Vec::new();
    let mut more = false;
    let mut remaining = 0usize;
    for (key, stored) in &all {
        if !(labels.matches(stored) && fields.matches(stored)) {
            continue;
        }
        if limit > 0 && items.len() == limit {
            more = true;
            remaining += 1;
            continue;
        }
        items.push((key, stored));
    }
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if more && let Some((last, _)) = items.last() {
        let t = ContinueToken {
            rv: list_rv as i64,
            start: (*last).clone(),
        };
        metadata["continue"] = json!(t.encode());
        metadata["remainingItemCount"] = json!(remaining);
    }
    if admission::wants_table(rr) || convert::is_events_v1(&rr.info) {
        let body = json!({
            "kind": format!("{}List", rr.info.kind),
            "apiVersion": rr.info.api_version(),
            "metadata": metadata,
            "items": items.iter().map(|(_, v)| present(&rr.info, v)).collect::<Vec<_>>(),
        });
        return Ok(admission::respond_list(rr, body));
    }
    // Written straight from the stored objects: no copy of each object is
    // built and kept until the whole list is serialised.
    let api_version = rr.info.api_version();
    let body = ListBody {
        kind: format!("{}List", rr.info.kind),
        api_version: &api_version,
        metadata,
        items: items
            .iter()
            .map(|(_, obj)| Presented {
                api_version: &api_version,
                kind: &rr.info.kind,
                obj,
            })
            .collect(),
    };
    let json = serde_json::to_string(&body).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((StatusCode::OK, [("content-type", "application/json")], json).into_response())
}

/// A list response, serialised from borrowed objects.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    kind: String,
    api_version: &'a str,
    metadata: Value,
    items: Vec<Presented<'a>>,
}

/// A stored object as a client sees it: with its `apiVersion` and `kind`
/// first (storage may lack them), everything else as stored.
struct Presented<'a> {
    api_version: &'a str,
    kind: &'a str,
    obj: &'a Value,
}

impl serde::Serialize for Presented<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Value::Object(fields) = self.obj else {
            return self.obj.serialize(s);
        };
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("apiVersion", self.api_version)?;
        map.serialize_entry("kind", self.kind)?;
        for (k, v) in fields {
            if k != "apiVersion" && k != "kind" {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// Refuse writes into a namespace that is missing (404) or terminating (403).
pub fn namespace_gate(
    state: &ApiState,
    info: &ResourceInfo,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    if !info.namespaced {
        return Ok(());
    }
    let ns_obj = state
        .store
        .get(&store::key("", "namespaces", "", ns))
        .ok_or_else(|| {
            ApiError::not_found(&super::error::Subject {
                group: String::new(),
                resource: "namespaces".into(),
                name: ns.into(),
            })
        })?;
    if objmeta::is_deleting(&ns_obj) {
        return Err(ApiError::forbidden(
            Some(&subject(info, name)),
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                subject(info, name).qualified()
            ),
        ));
    }
    Ok(())
}

/// Server-set fields of a new object; shared by create and apply-creates.
pub fn prepare_create(
    info: &ResourceInfo,
    obj: &mut Value,
    namespace: &str,
) -> Result<String, ApiError> {
    let meta = obj
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    if info.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() && ns != namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {
                meta.insert("namespace".into(), json!(namespace));
            }
        }
    } else {
        meta.remove("namespace");
    }
    let mut name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        let prefix = meta
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                &info.kind,
                &subject(info, ""),
                vec![Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value: name or generateName is required".into(),
                    field: "metadata.name".into(),
                }],
            ));
        }
        name = format!("{prefix}{}", objmeta::name_suffix());
        meta.insert("name".into(), json!(name));
    }
    if let Some(cause) = objmeta::name_error(info, &name) {
        return Err(ApiError::invalid(
            &info.kind,
            &subject(info, &name),
            vec![cause],
        ));
    }
    if meta
        .get("resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| !v.is_empty())
    {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(objmeta::now()));
    meta.insert("generation".into(), json!(1));
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    meta.remove("resourceVersion");
    let o = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("not an object"))?;
    if info.status_subresource {
        o.remove("status");
    }
    match (info.group.as_str(), info.plural.as_str()) {
        ("", "namespaces") => {
            o.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            o.insert("status".into(), json!({"phase": "Active"}));
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let storage = o
                .get("spec")
                .and_then(|s| s.get("versions"))
                .and_then(Value::as_array)
                .and_then(|vs| vs.iter().find(|v| v["storage"] == json!(true)))
                .and_then(|v| v["name"].as_str())
                .unwrap_or("")
                .to_string();
            o.insert(
                "status".into(),
                json!({"conditions": [], "acceptedNames": {"plural": "", "kind": ""}, "storedVersions": [storage]}),
            );
            let meta = o
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
            let fins = meta.entry("finalizers").or_insert_with(|| json!([]));
            if let Some(a) = fins.as_array_mut()
                && !a.iter().any(|f| f == CRD_CLEANUP_FINALIZER)
            {
                a.push(json!(CRD_CLEANUP_FINALIZER));
            }
        }
        _ => {}
    }
    objmeta::fold_string_data(info, obj);
    Ok(name)
}

/// `POST` on a collection.
pub async fn create(state: &ApiState, rr: ResourceRequest) -> Result<Response, ApiError> {
    if rr.name.is_some() || (rr.info.namespaced && rr.namespace.is_empty()) {
        return Err(ApiError::method_not_allowed(
            "the server does not allow this method on the requested resource",
        ));
    }
    let info = rr.info.clone();
    let mut obj = objmeta::decode_body(&rr.headers, &rr.body)?;
    objmeta::check_type(&info, &mut obj)?;
    let name = prepare_create(&info, &mut obj, &rr.namespace)?;
    namespace_gate(state, &info, &rr.namespace, &name)?;
    let warnings = admission::admit(&info, &rr, &mut obj, None)?;
    patching::track(&info, &rr, None, &mut obj);
    let obj = convert::to_storage(&info, obj);
    let key = object_key(&rr, &name);
    let subj = subject(&info, &name);
    let out = mutate(state, key, rr.dry_run(), move |cur| match cur {
        Some(_) => Err(ApiError::already_exists(&subj)),
        None => Ok(Mutation::Put(obj)),
    })
    .await?;
    let obj = out
        .object
        .ok_or_else(|| ApiError::internal("create stored nothing"))?;
    Ok(admission::respond(
        &rr,
        StatusCode::CREATED,
        present(&info, &obj),
        &warnings,
    ))
}

/// Apply an update of `old` to `new` as the real server does: check the
/// preconditions, keep what the client may not change, honour the status
/// subresource and count generations.
pub fn apply_update(
    info: &ResourceInfo,
    rr: &ResourceRequest,
    old: &Value,
    mut new: Value,
    warnings: &mut Vec<String>,
) -> Result<Value, ApiError> {
    let name = meta_str(old, "name").unwrap_or("").to_string();
    let subj = subject(info, &name);
    let old_rv = meta_str(old, "resourceVersion").unwrap_or("");
    match meta_str(&new, "resourceVersion").filter(|v| !v.is_empty()) {
        Some(rv) if rv != old_rv => return Err(ApiError::conflict(&subj, ApiError::MODIFIED)),
        Some(_) => {}
        None if info.is_custom() => {
            return Err(ApiError::invalid(
                &info.kind,
                &subj,
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: 0x0: must be specified for an update".into(),
                    field: "metadata.resourceVersion".into(),
                }],
            ));
        }
        None => {}
    }
    if let Some(uid) = meta_str(&new, "uid").filter(|u| !u.is_empty())
        && Some(uid) != meta_str(old, "uid")
    {
        return Err(ApiError::conflict(
            &subj,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(old, "uid").unwrap_or("")
            ),
        ));
    }
    objmeta::fold_string_data(info, &mut new);
    let mut result = match rr.subresource.as_deref() {
        Some("status") => {
            let mut r = old.clone();
            match new.get("status") {
                Some(s) => r["status"] = s.clone(),
                None => {
                    if let Some(o) = r.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            r
        }
        Some("finalize") => {
            let mut r = old.clone();
            r["spec"]["finalizers"] = new
                .pointer("/spec/finalizers")
                .cloned()
                .unwrap_or_else(|| json!([]));
            r
        }
        _ => {
            if info.status_subresource {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            new
        }
    };
    // Fields the client cannot change.
    let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let meta = result
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "namespace",
        "name",
        "resourceVersion",
    ] {
        match old_meta.get(f) {
            Some(v) => {
                meta.insert(f.into(), v.clone());
            }
            None => {
                meta.remove(f);
            }
        }
    }
    if objmeta::is_deleting(old) {
        let old_f = objmeta::finalizers(old);
        let added: Vec<String> = objmeta::finalizers(&result)
            .into_iter()
            .filter(|f| !old_f.contains(f))
            .collect();
        if !added.is_empty() {
            return Err(ApiError::invalid(
                &info.kind,
                &subj,
                vec![Cause {
                    reason: "FieldValueForbidden".into(),
                    message: format!(
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                        added
                            .iter()
                            .map(|f| format!("{f:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    field: "metadata.finalizers".into(),
                }],
            ));
        }
    }
    if objmeta::bumps_generation(info, old, &result) {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        result["metadata"]["generation"] = json!(g + 1);
    }
    warnings.extend(admission::admit(info, rr, &mut result, Some(old))?);
    Ok(result)
}

/// Decide what an accepted update means for storage: nothing, a put, or —
/// when the last finalizer of a deleting object went — the delete.
pub fn finish(old: &Value, new: Value) -> Mutation {
    if !objmeta::changed(old, &new) {
        return Mutation::Unchanged;
    }
    let spec_fins_empty = new
        .pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .is_none_or(|a| a.is_empty())
        || new["kind"] != "Namespace";
    if objmeta::is_deleting(&new) && objmeta::finalizers(&new).is_empty() && spec_fins_empty {
        return Mutation::Delete;
    }
    Mutation::Put(new)
}

/// `PUT .../NAME[/status]`.
pub async fn update(state: &ApiState, rr: ResourceRequest) -> Result<Response, ApiError> {
    let name = require_name(&rr)?;
    let info = rr.info.clone();
    let mut obj = objmeta::decode_body(&rr.headers, &rr.body)?;
    objmeta::check_type(&info, &mut obj)?;
    let body_name = meta_str(&obj, "name").unwrap_or("");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if info.namespaced
        && let Some(ns) = meta_str(&obj, "namespace").filter(|n| !n.is_empty())
        && ns != rr.namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let key = object_key(&rr, &name);
    let rr = Arc::new(rr);
    let rr2 = rr.clone();
    let warnings = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w2 = warnings.clone();
    let out = mutate(state, key, rr.dry_run(), move |cur| {
        let old = cur.ok_or_else(|| ApiError::not_found(&subject(&rr2.info, &name)))?;
        let mut w = Vec::new();
        let old_view = present(&rr2.info, old);
        let mut new = apply_update(&rr2.info, &rr2, &old_view, obj, &mut w)?;
        patching::track(&rr2.info, &rr2, Some(&old_view), &mut new);
        let new = convert::to_storage(&rr2.info, new);
        if let Ok(mut g) = w2.lock() {
            g.extend(w);
        }
        Ok(finish(old, new))
    })
    .await?;
    let obj = out
        .object
        .ok_or_else(|| ApiError::internal("update stored nothing"))?;
    let warnings = warnings.lock().map(|g| g.clone()).unwrap_or_default();
    Ok(admission::respond(
        &rr,
        StatusCode::OK,
        present(&info, &obj),
        &warnings,
    ))
}
