//! PATCH: decode the patch by content type, apply it to the stored object
//! with the pure functions of [`super::patch`], then store the result like an
//! update (same preconditions, status-subresource and generation rules).
//! Server-side apply may also create the object. Every non-apply write
//! records its fields in `metadata.managedFields` ([`track`]).

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::crud::{self, object_key};
use super::error::ApiError;
use super::http::{ApiState, ResourceRequest};
use super::objmeta::{self, present, subject};
use super::patch::{
    self, ApplyError, ApplyOptions, BuiltinListTypes, ListTypes, PatchError, UpdateOptions,
};
use super::resources::ResourceInfo;
use super::store::Mutation;
use super::{admission, convert};

enum Kind {
    Json,
    Merge,
    Strategic,
    Apply,
}

fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::BadRequest(m) => ApiError::bad_request(m),
        PatchError::Unprocessable(m) => ApiError::unprocessable(m),
    }
}

fn apply_error(e: ApplyError) -> ApiError {
    match e {
        ApplyError::Conflicts(c) => ApiError::from_status(patch::conflict_status(&c)),
        ApplyError::BadRequest(m) => ApiError::bad_request(m),
    }
}

/// The list semantics of a resource.
pub fn list_types(info: &ResourceInfo) -> &dyn ListTypes {
    match &info.list_types {
        Some(t) => t.as_ref(),
        None => &BuiltinListTypes,
    }
}

/// The field manager of a non-apply write: `fieldManager`, else the user
/// agent's program name (as the real server derives it).
pub fn manager(rr: &ResourceRequest) -> String {
    if let Some(m) = rr.param("fieldManager").filter(|m| !m.is_empty()) {
        return m.to_string();
    }
    rr.headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

/// Record a non-apply write's fields in `new`'s managed fields.
pub fn track(info: &ResourceInfo, rr: &ResourceRequest, old: Option<&Value>, new: &mut Value) {
    let time = objmeta::now();
    let mgr = manager(rr);
    let opts = UpdateOptions {
        manager: &mgr,
        time: &time,
        subresource: rr.subresource.as_deref(),
    };
    patch::track_update(old, new, &opts, list_types(info));
}

/// RFC 6902 as kube-apiserver's evanphx/json-patch applies it: a `test`
/// of `null` succeeds on a missing path (kube-runtime's finalizer helper
/// relies on this to add the first finalizer). The operations run one at a
/// time through [`patch::json_patch`] on a copy, so the patch stays atomic.
fn json_patch_go(target: &Value, ops: &Value) -> Result<Value, PatchError> {
    let Some(list) = ops.as_array() else {
        return patch::json_patch(target, ops);
    };
    let mut doc = target.clone();
    for op in list {
        let missing_null_test = op.get("op").and_then(Value::as_str) == Some("test")
            && op.get("value").is_some_and(Value::is_null)
            && op
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| doc.pointer(p).is_none());
        if missing_null_test {
            continue;
        }
        doc = patch::json_patch(&doc, &Value::Array(vec![op.clone()]))?;
    }
    Ok(doc)
}

/// `PATCH .../NAME[/status]`.
pub async fn patch(state: &ApiState, rr: ResourceRequest) -> Result<Response, ApiError> {
    let name = rr.name.clone().ok_or_else(ApiError::no_route)?;
    if rr.info.namespaced && rr.namespace.is_empty() {
        return Err(ApiError::no_route());
    }
    let ct = rr
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let kind = match ct.split(';').next().unwrap_or("").trim() {
        "application/json-patch+json" => Kind::Json,
        "application/merge-patch+json" => Kind::Merge,
        "application/strategic-merge-patch+json" if !rr.info.is_custom() => Kind::Strategic,
        "application/apply-patch+yaml" | "application/apply-patch+json" => Kind::Apply,
        _ => return Err(ApiError::unsupported_media_type(&ct)),
    };
    let body: Value = match kind {
        Kind::Apply => serde_yaml::from_slice(&rr.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        _ => serde_json::from_slice(&rr.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
    };
    let force = rr.param("force") == Some("true");
    if matches!(kind, Kind::Apply) {
        if rr.param("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::unprocessable(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
    } else if force {
        return Err(ApiError::unprocessable(
            "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    let info = rr.info.clone();
    let key = object_key(&rr, &name);
    let dry = rr.dry_run();
    let rr = Arc::new(rr);
    let rr2 = rr.clone();
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let w2 = warnings.clone();
    let creating = Arc::new(Mutex::new(false));
    let c2 = creating.clone();
    // An apply that creates must pass the namespace gate first.
    if matches!(kind, Kind::Apply) && state.store.get(&key).is_none() {
        crud::namespace_gate(state, &info, &rr.namespace, &name)?;
    }
    let out = crud::mutate(state, key, dry, move |cur| {
        let rr = &*rr2;
        let info = &rr.info;
        let time = objmeta::now();
        let mgr = rr.param("fieldManager").unwrap_or("").to_string();
        let apply_opts = ApplyOptions {
            manager: &mgr,
            force,
            time: &time,
            subresource: rr.subresource.as_deref(),
            ignore_status: info.status_subresource && rr.subresource.is_none(),
        };
        let mut w = Vec::new();
        let result = match cur {
            None => {
                if !matches!(kind, Kind::Apply) || rr.subresource.is_some() {
                    return Err(ApiError::not_found(&subject(info, &name)));
                }
                let mut obj = patch::server_side_apply(None, &body, &apply_opts, list_types(info))
                    .map_err(apply_error)?;
                objmeta::check_type(info, &mut obj)?;
                if objmeta::meta_str(&obj, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({}) does not match the name on the URL ({name})",
                        objmeta::meta_str(&obj, "name").unwrap_or("")
                    )));
                }
                obj["metadata"]["name"] = Value::String(name.clone());
                crud::prepare_create(info, &mut obj, &rr.namespace)?;
                w.extend(admission::admit(info, rr, &mut obj, None)?);
                let obj = convert::to_storage(info, obj);
                if let Ok(mut c) = c2.lock() {
                    *c = true;
                }
                Mutation::Put(obj)
            }
            Some(old) => {
                let current = present(info, old);
                let patched = match kind {
                    Kind::Json => json_patch_go(&current, &body).map_err(patch_error)?,
                    Kind::Merge => patch::merge_patch(&current, &body).map_err(patch_error)?,
                    Kind::Strategic => {
                        patch::strategic_merge_patch(&current, &body).map_err(patch_error)?
                    }
                    Kind::Apply => patch::server_side_apply(
                        Some(&current),
                        &body,
                        &apply_opts,
                        list_types(info),
                    )
                    .map_err(apply_error)?,
                };
                let mut patched = patched;
                objmeta::check_type(info, &mut patched)?;
                let mut new = crud::apply_update(info, rr, &current, patched, &mut w)?;
                if !matches!(kind, Kind::Apply) {
                    track(info, rr, Some(&current), &mut new);
                }
                crud::finish(old, convert::to_storage(info, new))
            }
        };
        if let Ok(mut g) = w2.lock() {
            g.extend(w);
        }
        Ok(result)
    })
    .await?;
    let obj = out
        .object
        .ok_or_else(|| ApiError::internal("patch stored nothing"))?;
    let warnings = warnings.lock().map(|g| g.clone()).unwrap_or_default();
    let code = if creating.lock().map(|c| *c).unwrap_or(false) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(admission::respond(
        &rr,
        code,
        present(&info, &obj),
        &warnings,
    ))
}
