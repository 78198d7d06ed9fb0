//! The objects `ferry up` puts into its API server: the CRDs (and waiting
//! until they are Established), the `ferry-system` namespace, the RBAC of
//! the agents and the controller, the default `MigrationPolicy`, and the
//! demo VMs. Every step is idempotent, so a restart on the same data
//! directory changes nothing the user changed.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::api::{Host, MigrationPolicy, VirtualMachine};

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

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
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

/// The demo VMs: `demo-1`…`demo-N` in `default`, small memtest guests.
pub fn demo_vm(i: u32) -> Value {
    json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": format!("demo-{i}"), "namespace": "default", "labels": {"app": "demo"}},
        "spec": {
            "memory": "64Mi",
            "cpus": 1,
            "boot": {"memtest": {"fillMib": 32, "dirtyRateMib": 1}},
        },
    })
}

/// Create `count` demo VMs unless they exist, and place each one not yet
/// placed on a host, round-robin over `hosts` (as an operator would with
/// `kubectl patch --subresource=status`).
pub async fn install_demo(
    client: &kube::Client,
    count: u32,
    hosts: &[String],
) -> Result<(), ClusterError> {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    for i in 1..=count {
        let name = format!("demo-{i}");
        let vm: VirtualMachine =
            serde_json::from_value(demo_vm(i)).map_err(|e| ClusterError::Api {
                what: format!("building the demo VM {name}"),
                source: Box::new(kube::Error::SerdeError(e)),
            })?;
        let vm = match api.create(&PostParams::default(), &vm).await {
            Ok(vm) => vm,
            Err(kube::Error::Api(e)) if e.code == 409 => api
                .get(&name)
                .await
                .map_err(api_err(format!("reading the demo VM {name}")))?,
            Err(e) => return Err(api_err(format!("creating the demo VM {name}"))(e)),
        };
        let placed = vm.status.as_ref().and_then(|s| s.host.as_ref()).is_some();
        if !placed && !hosts.is_empty() {
            let host = &hosts[(i as usize - 1) % hosts.len()];
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"host": host}})),
            )
            .await
            .map_err(api_err(format!("placing the demo VM {name} on {host}")))?;
        }
    }
    Ok(())
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
    fn demo_vms_are_valid_virtual_machines() {
        let vm: VirtualMachine = serde_json::from_value(demo_vm(2)).unwrap();
        assert_eq!(vm.metadata.name.as_deref(), Some("demo-2"));
        assert_eq!(vm.spec.memory.bytes(), 64 << 20);
    }

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
