//! DELETE: deletion options and preconditions, finalizers and
//! `deletionTimestamp`, propagation policies (the garbage collector in
//! [`super::controllers`] carries them out), and deletecollection.
//!
//! ```text
//! delete(obj) ─► preconditions (uid, resourceVersion) ─► 409 on mismatch
//!   finalizers (+ foregroundDeletion / orphan by policy) empty? ─► removed now
//!   otherwise ─► deletionTimestamp set; removed when the last finalizer goes
//!   (namespaces always wait for their contents)
//! ```

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::crud::{mutate, object_key, selectors};
use super::error::ApiError;
use super::http::{ApiState, ResourceRequest, json_response};
use super::objmeta::{self, meta_str, present, subject};
use super::resources::ResourceInfo;
use super::store::Mutation;

/// Delete options from the body and query.
#[derive(Default, Clone)]
pub struct DeleteOptions {
    /// `Foreground`, `Background` or `Orphan`.
    pub propagation: Option<String>,
    /// Precondition on uid.
    pub uid: Option<String>,
    /// Precondition on resourceVersion.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    fn from_request(rr: &ResourceRequest) -> Result<Self, ApiError> {
        let body: Value = if rr.body.is_empty() {
            json!({})
        } else {
            objmeta::decode_body(&rr.headers, &rr.body)?
        };
        let mut propagation = body["propagationPolicy"]
            .as_str()
            .or(rr.param("propagationPolicy"))
            .map(String::from);
        if propagation.is_none() && body["orphanDependents"] == json!(true) {
            propagation = Some("Orphan".into());
        }
        if let Some(p) = &propagation
            && !matches!(p.as_str(), "Foreground" | "Background" | "Orphan")
        {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {p:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
            )));
        }
        Ok(Self {
            propagation,
            uid: body
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(String::from),
            resource_version: body
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }
}

/// The deletion decision for one object: remove it now, or mark it deleting
/// and leave the rest to its finalizers.
pub fn delete_decision(
    info: &ResourceInfo,
    old: &Value,
    opts: &DeleteOptions,
) -> Result<Mutation, ApiError> {
    let name = meta_str(old, "name").unwrap_or("");
    let subj = subject(info, name);
    if let Some(uid) = &opts.uid
        && Some(uid.as_str()) != meta_str(old, "uid")
    {
        return Err(ApiError::conflict(
            &subj,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(old, "uid").unwrap_or("")
            ),
        ));
    }
    if let Some(rv) = &opts.resource_version
        && Some(rv.as_str()) != meta_str(old, "resourceVersion")
    {
        return Err(ApiError::conflict(
            &subj,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                meta_str(old, "resourceVersion").unwrap_or("")
            ),
        ));
    }
    let mut fins = objmeta::finalizers(old);
    let deleting = objmeta::is_deleting(old);
    if !deleting {
        match opts.propagation.as_deref() {
            Some("Foreground") if !fins.iter().any(|f| f == "foregroundDeletion") => {
                fins.push("foregroundDeletion".into())
            }
            Some("Orphan") if !fins.iter().any(|f| f == "orphan") => fins.push("orphan".into()),
            _ => {}
        }
    }
    let is_namespace = info.group.is_empty() && info.plural == "namespaces";
    if fins.is_empty() && !is_namespace {
        return Ok(Mutation::Delete);
    }
    if deleting {
        return Ok(Mutation::Unchanged);
    }
    let mut new = old.clone();
    new["metadata"]["deletionTimestamp"] = json!(objmeta::now());
    new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    if !fins.is_empty() {
        new["metadata"]["finalizers"] = json!(fins);
    }
    if is_namespace {
        new["status"]["phase"] = json!("Terminating");
    }
    Ok(Mutation::Put(new))
}

/// `DELETE .../NAME`.
pub async fn delete(state: &ApiState, rr: ResourceRequest) -> Result<Response, ApiError> {
    let name = super::crud::require_name(&rr)?;
    let opts = DeleteOptions::from_request(&rr)?;
    let info = rr.info.clone();
    let key = object_key(&rr, &name);
    let info2 = info.clone();
    let rr = std::sync::Arc::new(rr);
    let rr2 = rr.clone();
    let out = mutate(state, key, rr.dry_run(), move |cur| {
        let old = cur.ok_or_else(|| ApiError::not_found(&subject(&info2, &name)))?;
        rr2.policies.check(&rr2, &info2, None, Some(old))?;
        delete_decision(&info2, old, &opts)
    })
    .await?;
    let obj = out
        .object
        .ok_or_else(|| ApiError::internal("delete found nothing"))?;
    Ok(json_response(StatusCode::OK, &present(&info, &obj)))
}

/// `DELETE` on a collection.
pub async fn delete_collection(
    state: &ApiState,
    rr: ResourceRequest,
) -> Result<Response, ApiError> {
    let rr = std::sync::Arc::new(rr);
    let (labels, fields) = selectors(&rr)?;
    let opts = DeleteOptions::from_request(&rr)?;
    let prefix = rr.info.prefix(&rr.namespace);
    let (all, _) = state.store.list(&prefix, None);
    let mut deleted = Vec::new();
    for (key, obj) in all {
        let view = present(&rr.info, &obj);
        if !(labels.matches(&view) && fields.matches(&view)) {
            continue;
        }
        let info = rr.info.clone();
        let opts = opts.clone();
        let rr2 = rr.clone();
        let out = mutate(state, key, rr.dry_run(), move |cur| match cur {
            Some(old) => {
                rr2.policies.check(&rr2, &info, None, Some(old))?;
                delete_decision(&info, old, &opts)
            }
            None => Ok(Mutation::Unchanged),
        })
        .await?;
        if let Some(o) = out.object {
            deleted.push(present(&rr.info, &o));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", rr.info.kind),
            "apiVersion": rr.info.api_version(),
            "metadata": {"resourceVersion": state.store.current_rv().to_string()},
            "items": deleted,
        }),
    ))
}
