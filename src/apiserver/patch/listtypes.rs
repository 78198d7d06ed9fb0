//! How each list (and map) of an object merges: atomic, set of scalars, or
//! a map keyed by some of its items' fields. Strategic merge patch and
//! server-side apply both ask this.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion;
use serde_json::Value;

/// The merge semantics of one list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole, owned as one field.
    Atomic,
    /// Scalars merged by value (`x-kubernetes-list-type: set`).
    Set,
    /// Objects merged by these key fields (`x-kubernetes-list-type: map`).
    Map(Vec<String>),
}

/// Answers list and map semantics by field path. `path` holds the field
/// names from the object root; list items are transparent (the path of
/// `spec.containers[0].ports` is `["spec", "containers", "ports"]`).
pub trait ListTypes {
    /// The semantics of the list at `path`.
    fn list_type(&self, path: &[&str]) -> ListType;
    /// Whether the object at `path` is atomic (`x-kubernetes-map-type:
    /// atomic`): replaced and owned as a whole.
    fn is_atomic_map(&self, path: &[&str]) -> bool;
}

/// List semantics read from a CRD version's structural schema. Lists
/// without `x-kubernetes-list-type` are atomic, as in the real server.
#[derive(Clone, Debug)]
pub struct SchemaListTypes {
    schema: Value,
}

impl SchemaListTypes {
    /// From an `openAPIV3Schema` as JSON.
    pub fn new(schema: Value) -> Self {
        Self { schema }
    }

    /// From a CRD version (no schema: every list atomic).
    pub fn from_version(version: &CustomResourceDefinitionVersion) -> Self {
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null);
        Self { schema }
    }

    fn node(&self, path: &[&str]) -> Option<&Value> {
        let mut cur = &self.schema;
        for name in path {
            if let Some(items) = cur.get("items") {
                cur = items;
            }
            cur = match cur.get("properties").and_then(|p| p.get(*name)) {
                Some(n) => n,
                None => cur.get("additionalProperties").filter(|a| a.is_object())?,
            };
        }
        Some(cur)
    }
}

impl ListTypes for SchemaListTypes {
    fn list_type(&self, path: &[&str]) -> ListType {
        // `metadata` is ObjectMeta for custom resources too.
        if path.first() == Some(&"metadata") {
            return BuiltinListTypes.list_type(path);
        }
        let Some(n) = self.node(path) else {
            return ListType::Atomic;
        };
        match n.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListType::Set,
            Some("map") => ListType::Map(
                n.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            _ => ListType::Atomic,
        }
    }

    fn is_atomic_map(&self, path: &[&str]) -> bool {
        self.node(path)
            .and_then(|n| n.get("x-kubernetes-map-type"))
            .and_then(Value::as_str)
            == Some("atomic")
    }
}

/// The list semantics of the built-in kinds this server serves (Pods'
/// templates in Deployments and DaemonSets, Services, ServiceAccounts,
/// metadata and status conditions), from their Go types' `listType`,
/// `listMapKey` and `patchMergeKey` markers.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinListTypes;

const CONTAINER_LISTS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

fn keys(k: &[&str]) -> ListType {
    ListType::Map(k.iter().map(|s| s.to_string()).collect())
}

impl ListTypes for BuiltinListTypes {
    fn list_type(&self, path: &[&str]) -> ListType {
        let Some((last, rest)) = path.split_last() else {
            return ListType::Atomic;
        };
        let parent = rest.last().copied().unwrap_or("");
        match *last {
            "containers"
            | "initContainers"
            | "ephemeralContainers"
            | "volumes"
            | "imagePullSecrets"
            | "env"
            | "resourceClaims"
            | "schedulingGates" => keys(&["name"]),
            "secrets" if path == ["secrets"] => keys(&["name"]),
            "ports" if CONTAINER_LISTS.contains(&parent) => keys(&["containerPort", "protocol"]),
            "ports" if path == ["spec", "ports"] => keys(&["port", "protocol"]),
            "volumeMounts" => keys(&["mountPath"]),
            "volumeDevices" => keys(&["devicePath"]),
            "conditions" => keys(&["type"]),
            "finalizers" if parent == "metadata" => ListType::Set,
            "ownerReferences" if parent == "metadata" => keys(&["uid"]),
            "hostAliases" => keys(&["ip"]),
            "topologySpreadConstraints" => keys(&["topologyKey", "whenUnsatisfiable"]),
            _ => ListType::Atomic,
        }
    }

    fn is_atomic_map(&self, path: &[&str]) -> bool {
        matches!(path, ["spec", "selector"] | ["roleRef"])
    }
}
