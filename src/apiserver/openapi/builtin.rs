//! Schemas of the built-in kinds from k8s-openapi's schemars schemas, whose
//! names (`io.k8s.api.apps.v1.Deployment`) are the real server's.

use std::any::TypeId;
use std::collections::BTreeMap;

use k8s_openapi::api::{admissionregistration, apps, coordination, core, events, rbac};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status};
use k8s_openapi::{NamespaceResourceScope, Resource};
use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Value, json};

use super::{ApiResource, V3_REF};

fn generator() -> SchemaGenerator {
    SchemaSettings::openapi3()
        .with(|s| s.meta_schema = None)
        .into_generator()
}

/// The schemas of `T` and everything it refers to.
fn definitions<T: JsonSchema>() -> BTreeMap<String, Value> {
    let mut g = generator();
    let _ = g.subschema_for::<T>();
    let mut defs: BTreeMap<String, Value> = g.take_definitions(true).into_iter().collect();
    add_patch_extensions(&mut defs);
    defs
}

/// `(definition, property, patch strategy, merge key, list map keys)`: the
/// `patchStrategy`/`patchMergeKey`/`listMapKey` markers of the Go types,
/// which kubectl reads from OpenAPI to compute strategic merge patches.
/// An empty key list means `x-kubernetes-list-type: set`.
const PATCH_META: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "io.k8s.api.core.v1.PodSpec",
        "containers",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "merge,retainKeys",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "hostAliases",
        "merge",
        "ip",
        &["ip"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "topologySpreadConstraints",
        "merge",
        "topologyKey",
        &["topologyKey", "whenUnsatisfiable"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "resourceClaims",
        "merge,retainKeys",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        "merge",
        "containerPort",
        &["containerPort", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "env",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "merge",
        "mountPath",
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "merge",
        "devicePath",
        &["devicePath"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "env",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        "merge",
        "mountPath",
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeDevices",
        "merge",
        "devicePath",
        &["devicePath"],
    ),
    (
        "io.k8s.api.core.v1.ServiceSpec",
        "ports",
        "merge",
        "port",
        &["port", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.ServiceAccount",
        "secrets",
        "merge",
        "name",
        &["name"],
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "merge",
        "",
        &[],
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "merge",
        "uid",
        &["uid"],
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.DaemonSetStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.ServiceStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
];

fn add_patch_extensions(defs: &mut BTreeMap<String, Value>) {
    for (def, prop, strategy, key, map_keys) in PATCH_META {
        let Some(Value::Object(p)) = defs
            .get_mut(*def)
            .and_then(|d| d.get_mut("properties"))
            .and_then(|ps| ps.get_mut(*prop))
        else {
            continue;
        };
        p.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
        if key.is_empty() {
            p.insert("x-kubernetes-list-type".into(), json!("set"));
        } else {
            p.insert("x-kubernetes-patch-merge-key".into(), json!(key));
            p.insert("x-kubernetes-list-type".into(), json!("map"));
            p.insert("x-kubernetes-list-map-keys".into(), json!(map_keys));
        }
    }
    if let Some(Value::Object(sel)) =
        defs.get_mut("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")
    {
        sel.insert("x-kubernetes-map-type".into(), json!("atomic"));
    }
    if let Some(Value::Object(p)) = defs
        .get_mut("io.k8s.api.core.v1.ServiceSpec")
        .and_then(|d| d.get_mut("properties"))
        .and_then(|ps| ps.get_mut("selector"))
    {
        p.insert("x-kubernetes-map-type".into(), json!("atomic"));
    }
}

/// `ObjectMeta`, `ListMeta`, `Status` and their dependencies.
pub(super) fn meta_schemas() -> BTreeMap<String, Value> {
    let mut out = definitions::<ObjectMeta>();
    out.extend(definitions::<ListMeta>());
    out.extend(definitions::<Status>());
    out
}

/// The schema of a `<Kind>List`, as the real server publishes it.
pub(super) fn list_schema(group: &str, version: &str, kind: &str, item_ref: &str) -> Value {
    json!({
        "description": format!("{kind}List is a list of {kind}"),
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string", "description": API_VERSION_DOC},
            "items": {"type": "array", "description": format!("List of {}. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md", kind.to_lowercase()),
                       "items": {"$ref": format!("{V3_REF}{item_ref}")}},
            "kind": {"type": "string", "description": KIND_DOC},
            "metadata": {"allOf": [{"$ref": format!("{V3_REF}io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta")}],
                          "default": {},
                          "description": "Standard list metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"},
        },
        "x-kubernetes-group-version-kind": [{"group": group, "kind": format!("{kind}List"), "version": version}],
    })
}

/// `apiVersion`'s documentation.
pub(super) const API_VERSION_DOC: &str = "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources";
/// `kind`'s documentation.
pub(super) const KIND_DOC: &str = "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";

fn resource<T>(status_subresource: bool) -> ApiResource
where
    T: Resource + JsonSchema + 'static,
    T::Scope: 'static,
{
    let name = T::schema_name().to_string();
    let mut schemas = definitions::<T>();
    if let Some(Value::Object(s)) = schemas.get_mut(&name) {
        s.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([{"group": T::GROUP, "kind": T::KIND, "version": T::VERSION}]),
        );
    }
    let list_name = format!("{name}List");
    schemas.insert(
        list_name.clone(),
        list_schema(T::GROUP, T::VERSION, T::KIND, &name),
    );
    ApiResource {
        group: T::GROUP.into(),
        version: T::VERSION.into(),
        kind: T::KIND.into(),
        plural: T::URL_PATH_SEGMENT.into(),
        namespaced: TypeId::of::<T::Scope>() == TypeId::of::<NamespaceResourceScope>(),
        status_subresource,
        strategic_merge: true,
        schema_name: name,
        list_schema_name: list_name,
        schemas,
    }
}

/// The built-in kinds this server serves, with their schemas.
pub fn builtin_resources() -> Vec<ApiResource> {
    vec![
        resource::<core::v1::Namespace>(true),
        resource::<core::v1::ConfigMap>(false),
        resource::<core::v1::Secret>(false),
        resource::<core::v1::ServiceAccount>(false),
        resource::<core::v1::Service>(true),
        resource::<core::v1::Event>(false),
        resource::<events::v1::Event>(false),
        resource::<coordination::v1::Lease>(false),
        resource::<apps::v1::Deployment>(true),
        resource::<apps::v1::DaemonSet>(true),
        resource::<rbac::v1::Role>(false),
        resource::<rbac::v1::RoleBinding>(false),
        resource::<rbac::v1::ClusterRole>(false),
        resource::<rbac::v1::ClusterRoleBinding>(false),
        resource::<CustomResourceDefinition>(true),
        resource::<admissionregistration::v1::ValidatingAdmissionPolicy>(true),
        resource::<admissionregistration::v1::ValidatingAdmissionPolicyBinding>(false),
    ]
}
