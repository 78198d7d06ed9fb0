//! The objects `ferry up` puts into its API server: the CRDs (and waiting
//! until they are Established), the `ferry-system` namespace, the RBAC of
//! the agents and the controller, the default `MigrationPolicy`, and the
//! ConfigMap that tells `kubectl ferry status` how to reach the VM network
//! (the demo VMs are in [`super::demo`]). Every step is idempotent, so a restart on the same data
//! directory changes nothing the user changed.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::api::{Host, MigrationPolicy};

/// The field manager of everything `ferry up` writes.
const MANAGER: &str = "ferry-up";
/// How long the CRDs may take to become Established.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Failure to install the cluster's objects.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An API call failed.
    #[error("{what}")]
    Api {
        /// What was being done.
        what: String,
        /// The cause.
        source: Box<kube::Error>,
    },
    /// A CRD did not become Established in time.
    #[error("the CRD {0} did not become Established within {ESTABLISH_TIMEOUT:?}")]
    NotEstablished(String),
}

pub(super) fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Api {
        what,
        source: Box::new(source),
    }
}

/// Apply Ferry's CRDs and wait until every one is Established.
pub async fn install_crds(client: &kube::Client) -> Result<(), ClusterError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    let mut names = Vec::new();
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(api_err(format!("applying the CRD {name}")))?;
        names.push(name);
    }
    let deadline = Instant::now() + ESTABLISH_TIMEOUT;
    for name in names {
        loop {
            let crd = api
                .get(&name)
                .await
                .map_err(api_err(format!("reading the CRD {name}")))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NotEstablished(name));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The RBAC objects: full access to Ferry's kinds, Leases and Events for
/// the `ferry:agents` and `ferry:controllers` groups of the API server's
/// tokens (one machine, one trust domain).
fn rbac_objects() -> Vec<Value> {
    let rules = json!([
        {"apiGroups": ["ferry.dev"], "resources": ["*"], "verbs": ["*"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["*"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    ]);
    let mut out = Vec::new();
    for (name, group) in [
        ("ferry-agent", "ferry:agents"),
        ("ferry-controller", "ferry:controllers"),
    ] {
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        }));
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }));
    }
    out
}

/// Apply the `ferry-system` namespace and the RBAC of agents and controller.
pub async fn install_access(client: &kube::Client) -> Result<(), ClusterError> {
    let params = PatchParams::apply(MANAGER).force();
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.patch(
        crate::api::SYSTEM_NAMESPACE,
        &params,
        &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": crate::api::SYSTEM_NAMESPACE},
        })),
    )
    .await
    .map_err(api_err("creating the ferry-system namespace"))?;
    for obj in rbac_objects() {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let resource = if kind == "ClusterRole" {
            "clusterroles"
        } else {
            "clusterrolebindings"
        };
        let ar = kube::discovery::ApiResource {
            group: "rbac.authorization.k8s.io".into(),
            version: "v1".into(),
            api_version: "rbac.authorization.k8s.io/v1".into(),
            kind: kind.clone(),
            plural: resource.into(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        api.patch(&name, &params, &Patch::Apply(&obj))
            .await
            .map_err(api_err(format!("applying the {kind} {name}")))?;
    }
    Ok(())
}

/// Create the `MigrationPolicy` named `default` (all defaults) unless it
/// exists; a user's edits survive restarts.
pub async fn install_default_policy(client: &kube::Client) -> Result<(), ClusterError> {
    let api: Api<MigrationPolicy> = Api::all(client.clone());
    let policy: MigrationPolicy = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": "default"},
        "spec": {},
    }))
    .map_err(|e| ClusterError::Api {
        what: "building the default MigrationPolicy".into(),
        source: Box::new(kube::Error::SerdeError(e)),
    })?;
    match api.create(&PostParams::default(), &policy).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(api_err("creating the default MigrationPolicy")(e)),
    }
}

/// The ConfigMap in `ferry-system` that describes `ferry up`'s VM network:
/// `kubectl ferry status` reads it to say how to reach a VM's address.
pub const NETWORK_CONFIGMAP: &str = "ferry-up-network";

/// How the user reaches the VM network of `ferry up` (the data of
/// [`NETWORK_CONFIGMAP`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    /// The VM network's name (`spec.networks[].name`).
    pub network: String,
    /// Its subnet.
    pub subnet: String,
    /// The client namespace on it.
    pub client_namespace: String,
    /// The command that pings from there (`ping`, or a busybox's).
    pub ping: String,
}

/// Write [`NETWORK_CONFIGMAP`] for `info`, or delete it when `ferry up`
/// runs without a VM network.
pub async fn publish_network(
    client: &kube::Client,
    info: Option<&NetworkInfo>,
) -> Result<(), ClusterError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), crate::api::SYSTEM_NAMESPACE);
    let Some(info) = info else {
        return match api.delete(NETWORK_CONFIGMAP, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(api_err(format!(
                "deleting the ConfigMap {NETWORK_CONFIGMAP}"
            ))(e)),
        };
    };
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": NETWORK_CONFIGMAP, "namespace": crate::api::SYSTEM_NAMESPACE},
        "data": {
            "network": info.network,
            "subnet": info.subnet,
            "clientNamespace": info.client_namespace,
            "ping": info.ping,
        },
    });
    api.patch(
        NETWORK_CONFIGMAP,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(api_err(format!(
        "applying the ConfigMap {NETWORK_CONFIGMAP}"
    )))?;
    Ok(())
}

/// Read [`NETWORK_CONFIGMAP`]: `None` when absent (not a `ferry up`
/// cluster, or one without a VM network) or unreadable.
pub async fn read_network(client: &kube::Client) -> Option<NetworkInfo> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), crate::api::SYSTEM_NAMESPACE);
    let data = api.get_opt(NETWORK_CONFIGMAP).await.ok()??.data?;
    Some(NetworkInfo {
        network: data.get("network")?.clone(),
        subnet: data.get("subnet").cloned().unwrap_or_default(),
        client_namespace: data.get("clientNamespace")?.clone(),
        ping: data
            .get("ping")
            .cloned()
            .unwrap_or_else(|| "ping".to_string()),
    })
}

/// Wait until every host in `hosts` has published its Host object.
pub async fn wait_for_hosts(
    client: &kube::Client,
    hosts: &[String],
    timeout: Duration,
) -> Result<(), Vec<String>> {
    let api: Api<Host> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        for h in hosts {
            if !matches!(api.get_opt(h).await, Ok(Some(_))) {
                missing.push(h.clone());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(missing);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_and_controller_each_get_a_role_and_a_binding() {
        let objs = rbac_objects();
        assert_eq!(objs.len(), 4);
        let groups: Vec<&str> = objs
            .iter()
            .filter_map(|o| o["subjects"][0]["name"].as_str())
            .collect();
        assert_eq!(groups, ["ferry:agents", "ferry:controllers"]);
    }
}
