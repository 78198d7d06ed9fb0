//! First-start and every-start setup: the namespaces every cluster has, and
//! the stored CustomResourceDefinitions served again before the first request.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::objmeta;
use super::resources::{CRD_GROUP, Registry};
use super::store::{self, Mutation, Store, StoreError};

/// The namespaces kube-apiserver creates.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Create the system namespaces if missing and serve the stored CRDs.
pub fn ensure(store: &Store, registry: &Registry) -> Result<(), StoreError> {
    for ns in SYSTEM_NAMESPACES {
        let key = store::key("", "namespaces", "", ns);
        store
            .mutate::<()>(&key, move |cur| {
                if cur.is_some() {
                    return Ok(Mutation::Unchanged);
                }
                Ok(Mutation::Put(json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": ns,
                        "uid": uuid::Uuid::new_v4().to_string(),
                        "creationTimestamp": objmeta::now(),
                        "labels": {"kubernetes.io/metadata.name": ns},
                    },
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                })))
            })?
            .ok();
    }
    let (crds, _) = store.list(
        &store::prefix(CRD_GROUP, "customresourcedefinitions", ""),
        None,
    );
    for (_, crd) in crds {
        if established(&crd)
            && let Ok(parsed) = serde_json::from_value::<CustomResourceDefinition>((*crd).clone())
            && let Err(e) = registry.install_crd(&parsed)
        {
            tracing::warn!(error = %e, "stored CRD cannot be served");
        }
    }
    Ok(())
}

/// Whether a CRD has the `Established=True` condition.
pub fn established(crd: &Value) -> bool {
    crd.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Established" && c["status"] == "True")
}
