//! The controllers kube-apiserver and kube-controller-manager run that the
//! API's semantics depend on, as one loop woken after every write:
//!
//! - CRDs: accept names, set `NamesAccepted` and `Established`, serve the
//!   resources; on deletion remove every custom resource, then the
//!   `customresourcecleanup` finalizer.
//! - Namespaces: on deletion delete everything in the namespace, then the
//!   namespace.
//! - Garbage collection by owner references: dependents of vanished owners
//!   are deleted (background); `foregroundDeletion` owners wait for their
//!   dependents to go; `orphan` owners release them.
//! - ClusterRole aggregation ([`super::aggregation`]).
//!
//! Each pass reads the current state and writes only what differs, so a pass
//! that finds nothing to do writes nothing and the loop goes quiet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::crud::{self, CRD_CLEANUP_FINALIZER};
use super::delete::{self, DeleteOptions};
use super::error::ApiError;
use super::http::ApiState;
use super::objmeta;
use super::resources::{CRD_GROUP, ResourceInfo};
use super::store::{self, Mutation};

/// A periodic pass even without writes, to pick up anything a wake missed.
const RESYNC: Duration = Duration::from_secs(2);
/// How long a wake waits for more writes before the pass: each pass scans
/// every object, so a burst should cost one pass, not one per write.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// Run until `cancel`.
pub async fn run(state: ApiState, cancel: CancellationToken) {
    let mut installed: HashMap<String, String> = HashMap::new();
    let mut changes = state.store.subscribe();
    // The first pass and every resync scan everything.
    let mut full = true;
    loop {
        if let Err(e) = pass(&state, &mut installed, full).await {
            tracing::warn!(error = %e, "controller pass failed");
        }
        let resync = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = state.wake.notified() => {
                // Let a burst of writes land so one pass covers them all.
                tokio::time::sleep(DEBOUNCE).await;
                false
            }
            _ = tokio::time::sleep(RESYNC) => true,
        };
        full = resync | gc_relevant(&mut changes);
    }
}

/// Whether any change since the last pass can matter to the garbage
/// collector: a delete, a deletion request, or owner references. (Scanning
/// every object for it is the costly part of a pass.)
fn gc_relevant(changes: &mut tokio::sync::broadcast::Receiver<Arc<super::store::Event>>) -> bool {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut relevant = false;
    loop {
        match changes.try_recv() {
            Ok(ev) => {
                relevant |= ev.kind == super::store::EventType::Deleted
                    || objmeta::is_deleting(&ev.object)
                    || ev.object.pointer("/metadata/ownerReferences").is_some()
                    || ev
                        .old
                        .as_ref()
                        .is_some_and(|o| o.pointer("/metadata/ownerReferences").is_some());
            }
            Err(TryRecvError::Lagged(_)) => relevant = true,
            Err(TryRecvError::Empty | TryRecvError::Closed) => return relevant,
        }
    }
}

async fn pass(
    state: &ApiState,
    installed: &mut HashMap<String, String>,
    gc: bool,
) -> Result<(), ApiError> {
    crds(state, installed).await?;
    namespaces(state).await?;
    super::aggregation::aggregate_cluster_roles(state).await?;
    if gc {
        garbage_collect(state).await?;
    }
    Ok(())
}

/// A resource stored under `group/plural` (the storage group).
fn info_for(state: &ApiState, group: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
    state
        .registry
        .all()
        .into_iter()
        .find(|r| r.storage_group == group && r.group == group && r.plural == plural)
}

async fn delete_key(
    state: &ApiState,
    info: Arc<ResourceInfo>,
    key: String,
) -> Result<(), ApiError> {
    crud::mutate(state, key, false, move |cur| match cur {
        Some(old) => delete::delete_decision(&info, old, &DeleteOptions::default()),
        None => Ok(Mutation::Unchanged),
    })
    .await
    .map(|_| ())
}

async fn remove_finalizer(
    state: &ApiState,
    key: String,
    finalizer: &'static str,
) -> Result<(), ApiError> {
    crud::mutate(state, key, false, move |cur| {
        let Some(old) = cur else {
            return Ok(Mutation::Unchanged);
        };
        let mut new = old.clone();
        let fins: Vec<String> = objmeta::finalizers(old)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        new["metadata"]["finalizers"] = json!(fins);
        Ok(crud::finish(old, new))
    })
    .await
    .map(|_| ())
}

fn condition(kind: &str, reason: &str, message: &str, now: &str) -> Value {
    json!({"type": kind, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message})
}

async fn crds(state: &ApiState, installed: &mut HashMap<String, String>) -> Result<(), ApiError> {
    let (crds, _) = state.store.list(
        &store::prefix(CRD_GROUP, "customresourcedefinitions", ""),
        None,
    );
    let mut present = HashSet::new();
    for (key, crd) in crds {
        let name = objmeta::meta_str(&crd, "name").unwrap_or("").to_string();
        present.insert(name.clone());
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if objmeta::is_deleting(&crd) {
            let (objs, _) = state.store.list(&store::prefix(&group, &plural, ""), None);
            if objs.is_empty() {
                remove_finalizer(state, key, CRD_CLEANUP_FINALIZER).await?;
            } else if let Some(info) = info_for(state, &group, &plural) {
                for (k, _) in objs {
                    delete_key(state, info.clone(), k).await?;
                }
            }
            continue;
        }
        if state.registry.plural_taken(&group, &plural, &name) {
            continue;
        }
        if !crate::apiserver::bootstrap::established(&crd) {
            // Serve first, then say so: a client that sees Established
            // must find the resources.
            let parsed = match serde_json::from_value::<CustomResourceDefinition>((*crd).clone()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(crd = %name, error = %e, "stored CRD does not decode");
                    continue;
                }
            };
            if let Err(e) = state.registry.install_crd(&parsed) {
                tracing::warn!(crd = %name, error = %e, "CRD cannot be served");
                continue;
            }
            // Served from now on: remember it (with no version, so the next
            // pass records the Established one), or a CRD deleted before
            // that pass would never stop being served.
            installed.insert(name.clone(), String::new());
            let names = crd
                .pointer("/spec/names")
                .cloned()
                .unwrap_or_else(|| json!({}));
            crud::mutate(state, key.clone(), false, move |cur| {
                let Some(old) = cur else {
                    return Ok(Mutation::Unchanged);
                };
                let now = objmeta::now();
                let mut new = old.clone();
                new["status"]["acceptedNames"] = names;
                new["status"]["conditions"] = json!([
                    condition("NamesAccepted", "NoConflicts", "no conflicts found", &now),
                    condition(
                        "Established",
                        "InitialNamesAccepted",
                        "the initial names have been accepted",
                        &now
                    ),
                ]);
                Ok(crud::finish(old, new))
            })
            .await?;
            // The write wakes the next pass, which records the installed version.
            continue;
        }
        let rv = objmeta::meta_str(&crd, "resourceVersion")
            .unwrap_or("")
            .to_string();
        if installed.get(&name) != Some(&rv) {
            match serde_json::from_value::<CustomResourceDefinition>((*crd).clone()) {
                Ok(parsed) => {
                    if let Err(e) = state.registry.install_crd(&parsed) {
                        tracing::warn!(crd = %name, error = %e, "CRD cannot be served");
                    }
                    installed.insert(name, rv);
                }
                Err(e) => tracing::warn!(crd = %name, error = %e, "stored CRD does not decode"),
            }
        }
    }
    let gone: Vec<String> = installed
        .keys()
        .filter(|n| !present.contains(*n))
        .cloned()
        .collect();
    for name in gone {
        state.registry.remove_crd(&name);
        installed.remove(&name);
    }
    Ok(())
}

async fn namespaces(state: &ApiState) -> Result<(), ApiError> {
    let (nss, _) = state.store.list(&store::prefix("", "namespaces", ""), None);
    let namespaced: BTreeMap<(String, String), Arc<ResourceInfo>> = state
        .registry
        .all()
        .into_iter()
        .filter(|r| r.namespaced)
        .map(|r| ((r.storage_group.clone(), r.plural.clone()), r))
        .collect();
    for (key, ns) in nss.into_iter().filter(|(_, n)| objmeta::is_deleting(n)) {
        let name = objmeta::meta_str(&ns, "name").unwrap_or("").to_string();
        let mut left = 0;
        for ((group, plural), info) in &namespaced {
            let (objs, _) = state.store.list(&store::prefix(group, plural, &name), None);
            left += objs.len();
            for (k, obj) in objs {
                if !objmeta::is_deleting(&obj) {
                    delete_key(state, info.clone(), k).await?;
                }
            }
        }
        if left == 0 {
            crud::mutate(state, key, false, |cur| {
                let Some(old) = cur else {
                    return Ok(Mutation::Unchanged);
                };
                let mut new = old.clone();
                new["spec"]["finalizers"] = json!([]);
                Ok(crud::finish(old, new))
            })
            .await?;
        }
    }
    Ok(())
}

async fn garbage_collect(state: &ApiState) -> Result<(), ApiError> {
    let (all, _) = state.store.list("", None);
    let by_uid: HashMap<String, (String, Arc<Value>)> = all
        .iter()
        .filter_map(|(k, o)| {
            objmeta::meta_str(o, "uid").map(|u| (u.to_string(), (k.clone(), o.clone())))
        })
        .collect();
    let mut dependents: HashMap<String, Vec<String>> = HashMap::new();
    for (key, obj) in &all {
        let Some(refs) = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
        else {
            continue;
        };
        if refs.is_empty() {
            continue;
        }
        let uids: Vec<&str> = refs.iter().filter_map(|r| r["uid"].as_str()).collect();
        for u in &uids {
            dependents
                .entry(u.to_string())
                .or_default()
                .push(key.clone());
        }
        let (group, plural) = split_key(key);
        let Some(info) = info_for(state, group, plural) else {
            continue;
        };
        let live: Vec<&str> = uids
            .iter()
            .copied()
            .filter(|u| by_uid.contains_key(*u))
            .collect();
        let orphaning: Vec<&str> = live
            .iter()
            .copied()
            .filter(|u| {
                by_uid.get(*u).is_some_and(|(_, o)| {
                    objmeta::is_deleting(o) && objmeta::finalizers(o).iter().any(|f| f == "orphan")
                })
            })
            .collect();
        if live.is_empty() {
            if !objmeta::is_deleting(obj) {
                delete_key(state, info, key.clone()).await?;
            }
        } else if live.len() < uids.len() || !orphaning.is_empty() {
            let keep: HashSet<String> = live
                .iter()
                .filter(|u| !orphaning.contains(u))
                .map(|u| u.to_string())
                .collect();
            crud::mutate(state, key.clone(), false, move |cur| {
                let Some(old) = cur else {
                    return Ok(Mutation::Unchanged);
                };
                let mut new = old.clone();
                let refs: Vec<Value> = old["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["uid"].as_str().is_some_and(|u| keep.contains(u)))
                    .cloned()
                    .collect();
                if refs.is_empty() {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove("ownerReferences");
                    }
                } else {
                    new["metadata"]["ownerReferences"] = json!(refs);
                }
                Ok(crud::finish(old, new))
            })
            .await?;
        }
    }
    // Owners waiting on their dependents.
    for (uid, (key, owner)) in &by_uid {
        if !objmeta::is_deleting(owner) {
            continue;
        }
        let fins = objmeta::finalizers(owner);
        let deps = dependents.get(uid).cloned().unwrap_or_default();
        if fins.iter().any(|f| f == "foregroundDeletion") {
            if deps.is_empty() {
                remove_finalizer(state, key.clone(), "foregroundDeletion").await?;
            } else {
                for d in deps {
                    let (g, p) = split_key(&d);
                    if let Some(info) = info_for(state, g, p) {
                        delete_key(state, info, d.clone()).await?;
                    }
                }
            }
        } else if fins.iter().any(|f| f == "orphan") && deps.is_empty() {
            remove_finalizer(state, key.clone(), "orphan").await?;
        }
    }
    Ok(())
}

fn split_key(key: &str) -> (&str, &str) {
    let mut it = key.splitn(3, '/');
    (it.next().unwrap_or(""), it.next().unwrap_or(""))
}
