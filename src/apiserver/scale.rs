//! The `scale` subresource: an `autoscaling/v1` `Scale` view of a
//! Deployment, or of a custom resource whose CRD version declares
//! `subresources.scale` (`kubectl scale`, HorizontalPodAutoscalers).
//!
//! ```text
//! GET   .../NAME/scale  ─► Scale{spec.replicas ← specReplicasPath,
//!                                status.replicas ← statusReplicasPath,
//!                                status.selector ← labelSelectorPath}
//! PUT   .../NAME/scale  ─► set specReplicasPath on the parent (409 on a
//!                          stale metadata.resourceVersion), answer the Scale
//! PATCH .../NAME/scale  ─► merge / JSON / strategic patch of the Scale,
//!                          then as PUT, atomically
//! ```
//!
//! The parent is written like any update of it: generation rules, managed
//! fields (subresource `scale`), CRD schema validation of the new replicas.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::crud::{self, object_key};
use super::error::{ApiError, Cause};
use super::http::{ApiState, ResourceRequest};
use super::objmeta::{self, present, subject};
use super::patch::{self, PatchError};
use super::resources::ResourceInfo;
use super::{admission, convert, patching};

/// Where a resource keeps what its Scale shows, as JSON pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    /// Desired replicas (`/spec/replicas`).
    pub spec_replicas: String,
    /// Observed replicas (`/status/replicas`).
    pub status_replicas: String,
    /// The label selector: a string for custom resources, a `LabelSelector`
    /// object for Deployments.
    pub label_selector: Option<String>,
}

/// A CRD's `.spec.replicas` JSON path as a pointer.
fn pointer(path: &str) -> String {
    path.trim_start_matches('.')
        .split('.')
        .fold(String::new(), |mut p, s| {
            p.push('/');
            p.push_str(s);
            p
        })
}

/// The scale subresource of `info`, if it has one.
pub fn paths(info: &ResourceInfo) -> Option<ScalePaths> {
    if let Some(v) = &info.crd_version {
        let s = v.subresources.as_ref()?.scale.as_ref()?;
        return Some(ScalePaths {
            spec_replicas: pointer(&s.spec_replicas_path),
            status_replicas: pointer(&s.status_replicas_path),
            label_selector: s.label_selector_path.as_deref().map(pointer),
        });
    }
    (info.group == "apps" && info.plural == "deployments").then(|| ScalePaths {
        spec_replicas: "/spec/replicas".into(),
        status_replicas: "/status/replicas".into(),
        label_selector: Some("/spec/selector".into()),
    })
}

/// A `LabelSelector` object as the selector string `labels.Selector`
/// prints (requirements sorted by key).
fn selector_string(sel: &Value) -> String {
    let mut reqs: Vec<(String, String)> = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            reqs.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or(""))));
        }
    }
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("").to_string();
        let mut values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        values.sort_unstable();
        let r = match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.clone(),
            _ => format!("!{key}"),
        };
        reqs.push((key, r));
    }
    reqs.sort();
    reqs.into_iter()
        .map(|(_, r)| r)
        .collect::<Vec<_>>()
        .join(",")
}

/// The Scale of `obj` (served shape).
pub fn to_scale(paths: &ScalePaths, obj: &Value) -> Value {
    let mut meta = json!({});
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = obj.pointer(&format!("/metadata/{f}")) {
            meta[f] = v.clone();
        }
    }
    let mut spec = json!({});
    if let Some(r) = obj
        .pointer(&paths.spec_replicas)
        .filter(|r| r.as_i64() != Some(0))
    {
        spec["replicas"] = r.clone();
    }
    let mut status = json!({
        "replicas": obj.pointer(&paths.status_replicas).cloned().unwrap_or(json!(0)),
    });
    let selector = match paths.label_selector.as_deref().and_then(|p| obj.pointer(p)) {
        Some(Value::String(s)) => s.clone(),
        Some(o @ Value::Object(_)) => selector_string(o),
        _ => String::new(),
    };
    if !selector.is_empty() {
        status["selector"] = json!(selector);
    }
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": meta, "spec": spec, "status": status})
}

fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::BadRequest(m) => ApiError::bad_request(m),
        PatchError::Unprocessable(m) => ApiError::unprocessable(m),
    }
}

/// Set the replicas a Scale asks for on the parent `old` (served shape),
/// with the Scale's resourceVersion as precondition.
fn scaled_parent(
    info: &ResourceInfo,
    rr: &ResourceRequest,
    paths: &ScalePaths,
    old: &Value,
    scale: &Value,
    name: &str,
) -> Result<Value, ApiError> {
    let replicas = match scale.pointer("/spec/replicas") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_i64().filter(|r| *r >= 0).ok_or_else(|| {
            ApiError::invalid(
                "Scale",
                &subject(info, name),
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: {v}: must be greater than or equal to 0"),
                    field: "spec.replicas".into(),
                }],
            )
        })?,
    };
    let mut new = old.clone();
    set_pointer(&mut new, &paths.spec_replicas, json!(replicas));
    // The Scale's resourceVersion, if any, is the precondition.
    if let Some(rv) = objmeta::meta_str(scale, "resourceVersion").filter(|v| !v.is_empty()) {
        new["metadata"]["resourceVersion"] = json!(rv);
    }
    let mut w = Vec::new();
    let mut new = crud::apply_update(info, rr, old, new, &mut w)?;
    patching::track(info, rr, Some(old), &mut new);
    Ok(new)
}

/// Write `v` at JSON pointer `p`, creating objects on the way.
fn set_pointer(doc: &mut Value, p: &str, v: Value) {
    let mut cur = doc;
    let parts: Vec<&str> = p.split('/').skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let Some(o) = cur.as_object_mut() else { return };
        if i + 1 == parts.len() {
            o.insert((*part).to_string(), v);
            return;
        }
        cur = o.entry((*part).to_string()).or_insert_with(|| json!({}));
    }
}

/// What a write makes of the current Scale: the Scale to apply.
type Change = Box<dyn Fn(&Value) -> Result<Value, ApiError> + Send>;

/// Serve `verb` on `.../NAME/scale`.
pub async fn handle(
    state: &ApiState,
    rr: ResourceRequest,
    verb: &str,
) -> Result<Response, ApiError> {
    let paths = paths(&rr.info).ok_or_else(ApiError::no_route)?;
    let name = rr.name.clone().ok_or_else(ApiError::no_route)?;
    let key = object_key(&rr, &name);
    let info = rr.info.clone();
    if verb == "get" {
        let obj = state
            .store
            .get(&key)
            .ok_or_else(|| ApiError::not_found(&subject(&info, &name)))?;
        let scale = to_scale(&paths, &present(&info, &obj));
        return Ok(admission::respond(&rr, StatusCode::OK, scale, &[]));
    }
    // The Scale the client sends (PUT) or the patch of the current one.
    let change: Change = match verb {
        "update" => {
            let scale = objmeta::decode_body(&rr.headers, &rr.body)?;
            if scale
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| k != "Scale")
            {
                return Err(ApiError::bad_request(
                    "the kind in the data does not match the expected kind (Scale)",
                ));
            }
            Box::new(move |_| Ok(scale.clone()))
        }
        "patch" => {
            let ct = rr
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body: Value = serde_json::from_slice(&rr.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            match ct.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    Box::new(move |cur| patch::merge_patch(cur, &body).map_err(patch_error))
                }
                "application/json-patch+json" => {
                    Box::new(move |cur| patch::json_patch(cur, &body).map_err(patch_error))
                }
                _ => return Err(ApiError::unsupported_media_type(&ct)),
            }
        }
        _ => {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ));
        }
    };
    let rr = Arc::new(rr);
    let rr2 = rr.clone();
    let p2 = paths.clone();
    let out = crud::mutate(state, key, rr.dry_run(), move |cur| {
        let info = &rr2.info;
        let old = cur.ok_or_else(|| ApiError::not_found(&subject(info, &name)))?;
        let current = present(info, old);
        let wanted = change(&to_scale(&p2, &current))?;
        let new = scaled_parent(info, &rr2, &p2, &current, &wanted, &name)?;
        Ok(crud::finish(old, convert::to_storage(info, new)))
    })
    .await?;
    let obj = out
        .object
        .ok_or_else(|| ApiError::internal("scale stored nothing"))?;
    let scale = to_scale(&paths, &present(&info, &obj));
    Ok(admission::respond(&rr, StatusCode::OK, scale, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_print_like_labels_selector() {
        let sel = json!({"matchLabels": {"b": "2", "a": "1"},
            "matchExpressions": [{"key": "c", "operator": "In", "values": ["y", "x"]},
                                 {"key": "d", "operator": "DoesNotExist"}]});
        assert_eq!(selector_string(&sel), "a=1,b=2,c in (x,y),!d");
    }

    #[test]
    fn a_scale_shows_replicas_selector_and_identity() {
        let paths = ScalePaths {
            spec_replicas: pointer(".spec.size"),
            status_replicas: pointer(".status.size"),
            label_selector: Some(pointer(".status.selector")),
        };
        let obj = json!({"metadata": {"name": "w", "namespace": "n", "resourceVersion": "5", "labels": {"x": "y"}},
            "spec": {"size": 3}, "status": {"size": 2, "selector": "app=w"}});
        assert_eq!(
            to_scale(&paths, &obj),
            json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": "w", "namespace": "n", "resourceVersion": "5"},
                "spec": {"replicas": 3}, "status": {"replicas": 2, "selector": "app=w"}})
        );
    }

    #[test]
    fn set_pointer_creates_the_path() {
        let mut v = json!({"metadata": {}});
        set_pointer(&mut v, "/spec/replicas", json!(4));
        assert_eq!(v, json!({"metadata": {}, "spec": {"replicas": 4}}));
    }
}
