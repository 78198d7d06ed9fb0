//! The resource types the server serves: the built-in kinds, fixed at start,
//! and the resources of every Established CustomResourceDefinition, added and
//! removed as CRDs come and go.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use serde_json::Value;

use super::patch::SchemaListTypes;
use super::schema::Validator;

/// Checks that an object decodes as its built-in type.
pub type Decoder = fn(&Value) -> Result<(), String>;

/// Everything the server knows about one served resource in one version.
#[derive(Clone)]
pub struct ResourceInfo {
    /// API group, "" for core.
    pub group: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Plural name, e.g. `leases`.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names (`kubectl get cm`).
    pub short_names: Vec<String>,
    /// Categories (`kubectl get all`).
    pub categories: Vec<String>,
    /// Has a `/status` subresource.
    pub status_subresource: bool,
    /// For built-in kinds: checks the object decodes as the k8s-openapi type.
    pub decoder: Option<Decoder>,
    /// For custom resources: the CRD version this resource is served from.
    pub crd_version: Option<Arc<CustomResourceDefinitionVersion>>,
    /// The group whose storage holds the objects (`""` for events.k8s.io
    /// Events, stored with core Events); otherwise `group`.
    pub storage_group: String,
    /// For custom resources: the storage version (objects are stored under it).
    pub storage_version: String,
    /// For custom resources: the compiled structural schema (None when the
    /// version's schema does not compile; the CRD is then not served).
    pub validator: Option<Arc<Validator>>,
    /// For custom resources: list semantics for server-side apply.
    pub list_types: Option<Arc<SchemaListTypes>>,
}

impl ResourceInfo {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// The storage key of an object.
    pub fn key(&self, namespace: &str, name: &str) -> String {
        super::store::key(&self.storage_group, &self.plural, namespace, name)
    }
    /// The storage key prefix of a collection (`namespace` empty: all).
    pub fn prefix(&self, namespace: &str) -> String {
        super::store::prefix(&self.storage_group, &self.plural, namespace)
    }
    /// Whether this is a custom resource.
    pub fn is_custom(&self) -> bool {
        self.crd_version.is_some()
    }
    /// The verbs of the main resource.
    pub fn verbs(&self) -> Vec<&'static str> {
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(v.clone())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
    decoder: Decoder,
}

use k8s_openapi::api::{admissionregistration, apps, coordination, core, events, rbac};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
        categories: &[],
        status: true,
        decoder: decode::<core::v1::Namespace>,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
        categories: &[],
        status: false,
        decoder: decode::<core::v1::ConfigMap>,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        decoder: decode::<core::v1::Secret>,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short: &["sa"],
        categories: &[],
        status: false,
        decoder: decode::<core::v1::ServiceAccount>,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
        categories: &["all"],
        status: true,
        decoder: decode::<core::v1::Service>,
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        categories: &[],
        status: false,
        decoder: decode::<core::v1::Event>,
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
        categories: &["all"],
        status: true,
        decoder: decode::<apps::v1::Deployment>,
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short: &["ds"],
        categories: &["all"],
        status: true,
        decoder: decode::<apps::v1::DaemonSet>,
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        decoder: decode::<coordination::v1::Lease>,
    },
    Builtin {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        categories: &[],
        status: false,
        decoder: decode::<events::v1::Event>,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        decoder: decode::<rbac::v1::Role>,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        decoder: decode::<rbac::v1::RoleBinding>,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        decoder: decode::<rbac::v1::ClusterRole>,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        decoder: decode::<rbac::v1::ClusterRoleBinding>,
    },
    Builtin {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short: &["crd", "crds"],
        categories: &["api-extensions"],
        status: true,
        decoder: decode::<apiext::CustomResourceDefinition>,
    },
    Builtin {
        group: "admissionregistration.k8s.io",
        version: "v1",
        plural: "validatingadmissionpolicies",
        singular: "validatingadmissionpolicy",
        kind: "ValidatingAdmissionPolicy",
        namespaced: false,
        short: &[],
        categories: &["api-extensions"],
        status: true,
        decoder: decode::<admissionregistration::v1::ValidatingAdmissionPolicy>,
    },
    Builtin {
        group: "admissionregistration.k8s.io",
        version: "v1",
        plural: "validatingadmissionpolicybindings",
        singular: "validatingadmissionpolicybinding",
        kind: "ValidatingAdmissionPolicyBinding",
        namespaced: false,
        short: &[],
        categories: &["api-extensions"],
        status: false,
        decoder: decode::<admissionregistration::v1::ValidatingAdmissionPolicyBinding>,
    },
];

/// The group that core resources are keyed under in storage.
pub const CRD_GROUP: &str = "apiextensions.k8s.io";

/// The registry of served resources. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// (group, version, plural) → info
    resources: BTreeMap<(String, String, String), Arc<ResourceInfo>>,
    /// CRD name → the (group, version, plural) keys it contributed
    crds: BTreeMap<String, Vec<(String, String, String)>>,
}

impl Registry {
    /// A registry with the built-in kinds.
    pub fn with_builtins() -> Self {
        let reg = Self::default();
        {
            let mut inner = reg.write();
            for b in BUILTINS {
                let info = ResourceInfo {
                    group: b.group.into(),
                    version: b.version.into(),
                    plural: b.plural.into(),
                    singular: b.singular.into(),
                    kind: b.kind.into(),
                    namespaced: b.namespaced,
                    short_names: b.short.iter().map(|s| s.to_string()).collect(),
                    categories: b.categories.iter().map(|s| s.to_string()).collect(),
                    status_subresource: b.status,
                    decoder: Some(b.decoder),
                    crd_version: None,
                    storage_group: if b.group == "events.k8s.io" {
                        String::new()
                    } else {
                        b.group.into()
                    },
                    storage_version: b.version.into(),
                    validator: None,
                    list_types: None,
                };
                inner.resources.insert(
                    (b.group.into(), b.version.into(), b.plural.into()),
                    Arc::new(info),
                );
            }
        }
        reg
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The resource at `group/version/plural`.
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        self.read()
            .resources
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Every served resource, ordered by group, version, plural.
    pub fn all(&self) -> Vec<Arc<ResourceInfo>> {
        self.read().resources.values().cloned().collect()
    }

    /// Whether a group/version has any resource.
    pub fn has_group_version(&self, group: &str, version: &str) -> bool {
        self.read()
            .resources
            .keys()
            .any(|(g, v, _)| g == group && v == version)
    }

    /// Serve the resources of `crd` (all its served versions), replacing
    /// whatever it served before. Fails, serving nothing, if a served
    /// version's schema does not compile.
    pub fn install_crd(&self, crd: &CustomResourceDefinition) -> Result<(), String> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let spec = &crd.spec;
        let storage = spec
            .versions
            .iter()
            .find(|v| v.storage)
            .or(spec.versions.first())
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let mut compiled = Vec::new();
        for v in spec.versions.iter().filter(|v| v.served) {
            let validator = Validator::new(v).map_err(|e| format!("version {}: {e}", v.name))?;
            compiled.push((
                v,
                Arc::new(validator),
                Arc::new(SchemaListTypes::from_version(v)),
            ));
        }
        let mut inner = self.write();
        if let Some(keys) = inner.crds.remove(&name) {
            for k in keys {
                inner.resources.remove(&k);
            }
        }
        let mut keys = Vec::new();
        for (v, validator, list_types) in compiled {
            let info = ResourceInfo {
                group: spec.group.clone(),
                version: v.name.clone(),
                plural: spec.names.plural.clone(),
                singular: spec
                    .names
                    .singular
                    .clone()
                    .unwrap_or_else(|| spec.names.kind.to_lowercase()),
                kind: spec.names.kind.clone(),
                namespaced: spec.scope == "Namespaced",
                short_names: spec.names.short_names.clone().unwrap_or_default(),
                categories: spec.names.categories.clone().unwrap_or_default(),
                status_subresource: v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                decoder: None,
                crd_version: Some(Arc::new(v.clone())),
                storage_group: spec.group.clone(),
                storage_version: storage.clone(),
                validator: Some(validator),
                list_types: Some(list_types),
            };
            let key = (
                spec.group.clone(),
                v.name.clone(),
                spec.names.plural.clone(),
            );
            inner.resources.insert(key.clone(), Arc::new(info));
            keys.push(key);
        }
        inner.crds.insert(name, keys);
        Ok(())
    }

    /// Stop serving the resources of the CRD named `name`.
    pub fn remove_crd(&self, name: &str) {
        let mut inner = self.write();
        if let Some(keys) = inner.crds.remove(name) {
            for k in keys {
                inner.resources.remove(&k);
            }
        }
    }

    /// Whether a group (any version) is served by a CRD other than `crd_name`
    /// with the same plural, for the `NamesAccepted` check.
    pub fn plural_taken(&self, group: &str, plural: &str, crd_name: &str) -> bool {
        let inner = self.read();
        inner.crds.iter().any(|(name, keys)| {
            name != crd_name && keys.iter().any(|(g, _, p)| g == group && p == plural)
        }) || BUILTINS
            .iter()
            .any(|b| b.group == group && b.plural == plural)
    }
}
