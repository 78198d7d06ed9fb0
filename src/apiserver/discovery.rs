//! Discovery: `/version`, `/api`, `/apis` and the per group-version resource
//! lists that kubectl and kube-rs read to map kinds to resources.
//!
//! Both forms are served: the legacy documents (`APIVersions`,
//! `APIGroupList`, `APIResourceList`), and the aggregated
//! `apidiscovery.k8s.io/v2` `APIGroupDiscoveryList` when the `Accept` header
//! asks for it (kubectl does; kube-rs reads the legacy form).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{ApiState, json_response};
use super::openapi::{self, crd_resources};
use super::resources::{CRD_GROUP, ResourceInfo};
use super::store;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The Kubernetes version this server reports: within kubectl 1.37's
/// supported skew, so kubectl does not warn.
pub const KUBE_MAJOR: &str = "1";
/// See [`KUBE_MAJOR`].
pub const KUBE_MINOR: &str = "36";

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// `/version`.
pub fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "major": KUBE_MAJOR,
            "minor": KUBE_MINOR,
            "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0+ferry"),
            "gitCommit": env!("CARGO_PKG_VERSION"),
            "gitTreeState": "clean",
            "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "none (ferry, Rust)",
            "compiler": "rustc",
            "platform": "linux/amd64",
        }),
    )
}

/// Kubernetes version ordering of version names: GA > beta > alpha, then by
/// number, then anything else alphabetically (as kube-apiserver sorts them).
pub fn version_priority(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> Option<(u32, u8, u32)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: u32 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((major, 2, 0));
        }
        for (word, rank) in [("beta", 1), ("alpha", 0)] {
            if let Some(n) = tail.strip_prefix(word) {
                return Some((major, rank, n.parse().ok()?));
            }
        }
        None
    }
    match (parse(a), parse(b)) {
        (Some((ma, ra, na)), Some((mb, rb, nb))) => rb.cmp(&ra).then(mb.cmp(&ma)).then(nb.cmp(&na)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

fn wants_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.replace(' ', "").starts_with(AGGREGATED))
        })
}

/// The resources of one version.
type VersionResources = (String, Vec<Arc<ResourceInfo>>);

/// group → versions (preferred first) → resources.
fn grouped(state: &ApiState) -> BTreeMap<String, Vec<VersionResources>> {
    let mut map: BTreeMap<String, BTreeMap<String, Vec<Arc<ResourceInfo>>>> = BTreeMap::new();
    for r in state.registry.all() {
        map.entry(r.group.clone())
            .or_default()
            .entry(r.version.clone())
            .or_default()
            .push(r);
    }
    map.into_iter()
        .map(|(g, versions)| {
            let mut vs: Vec<_> = versions.into_iter().collect();
            vs.sort_by(|a, b| version_priority(&a.0, &b.0));
            (g, vs)
        })
        .collect()
}

fn aggregated_response(items: Vec<Value>) -> Response {
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    (
        StatusCode::OK,
        [("content-type", AGGREGATED)],
        body.to_string(),
    )
        .into_response()
}

fn aggregated_group(name: &str, versions: &[VersionResources]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|(v, resources)| {
            let resources: Vec<Value> = resources
                .iter()
                .map(|r| {
                    let kind = json!({"group": r.group, "version": r.version, "kind": r.kind});
                    let mut o = json!({
                        "resource": r.plural,
                        "responseKind": kind,
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.singular,
                        "verbs": r.verbs(),
                    });
                    if !r.short_names.is_empty() {
                        o["shortNames"] = json!(r.short_names);
                    }
                    if !r.categories.is_empty() {
                        o["categories"] = json!(r.categories);
                    }
                    let mut subs = Vec::new();
                    if r.status_subresource {
                        subs.push(json!({
                            "subresource": "status",
                            "responseKind": kind,
                            "verbs": ["get", "patch", "update"],
                        }));
                    }
                    if super::scale::paths(r).is_some() {
                        subs.push(json!({
                            "subresource": "scale",
                            "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                            "verbs": ["get", "patch", "update"],
                        }));
                    }
                    if !subs.is_empty() {
                        o["subresources"] = Value::Array(subs);
                    }
                    o
                })
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    json!({"metadata": {"name": name, "creationTimestamp": null}, "versions": versions})
}

/// `/api`.
pub fn core_versions(state: &ApiState, headers: &HeaderMap) -> Response {
    if wants_aggregated(headers) {
        let groups = grouped(state);
        let items = groups
            .get("")
            .map(|vs| vec![aggregated_group("", vs)])
            .unwrap_or_default();
        return aggregated_response(items);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }),
    )
}

/// `/apis`.
pub fn groups(state: &ApiState, headers: &HeaderMap) -> Response {
    let groups = grouped(state);
    if wants_aggregated(headers) {
        let items = groups
            .iter()
            .filter(|(g, _)| !g.is_empty())
            .map(|(g, vs)| aggregated_group(g, vs))
            .collect();
        return aggregated_response(items);
    }
    let list: Vec<Value> = groups
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|(v, _)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
    )
}

/// `/apis/G`: the versions of one group.
pub fn group(state: &ApiState, name: &str) -> Result<Response, ApiError> {
    let groups = grouped(state);
    let versions = groups
        .get(name)
        .filter(|_| !name.is_empty())
        .ok_or_else(ApiError::no_route)?;
    let versions: Vec<Value> = versions
        .iter()
        .map(|(v, _)| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": versions, "preferredVersion": versions[0]}),
    ))
}

/// `/api/v1` and `/apis/G/V`.
pub fn resource_list(state: &ApiState, group: &str, version: &str) -> Result<Response, ApiError> {
    if !state.registry.has_group_version(group, version) {
        return Err(ApiError::no_route());
    }
    let mut resources = Vec::new();
    for r in state
        .registry
        .all()
        .into_iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut o = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs(),
        });
        if !r.short_names.is_empty() {
            o["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            o["categories"] = json!(r.categories);
        }
        resources.push(o);
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if super::scale::paths(&r).is_some() {
            resources.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    ))
}

/// The built-in kinds' OpenAPI resources, generated once (schemars).
pub(crate) fn builtin_openapi() -> &'static [openapi::ApiResource] {
    static BUILTIN: std::sync::OnceLock<Vec<openapi::ApiResource>> = std::sync::OnceLock::new();
    BUILTIN.get_or_init(openapi::builtin_resources)
}

/// Everything served, as OpenAPI resources: the built-in kinds and the
/// versions of every CRD the registry currently serves.
fn openapi_resources(state: &ApiState) -> Vec<openapi::ApiResource> {
    let mut out = builtin_openapi().to_vec();
    let (crds, _) = state.store.list(
        &store::prefix(CRD_GROUP, "customresourcedefinitions", ""),
        None,
    );
    for (_, crd) in crds {
        let Ok(crd) = serde_json::from_value::<CustomResourceDefinition>((*crd).clone()) else {
            continue;
        };
        out.extend(crd_resources(&crd).into_iter().filter(|r| {
            state
                .registry
                .get(&r.group, &r.version, &r.plural)
                .is_some()
        }));
    }
    out
}

/// `/openapi/v2`, `/openapi/v3` and `/openapi/v3/{api/v1|apis/G/V}`.
pub fn openapi(state: &ApiState, rest: &[&str]) -> Result<Response, ApiError> {
    let resources = openapi_resources(state);
    let doc = match rest {
        ["v2"] => openapi::v2(&resources),
        ["v3"] => openapi::v3_index(&resources),
        ["v3", gv @ ..] => {
            openapi::v3_group_version(&resources, &gv.join("/")).ok_or_else(ApiError::no_route)?
        }
        _ => return Err(ApiError::no_route()),
    };
    Ok(json_response(StatusCode::OK, &doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_ga_then_beta_then_alpha() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "foo", "v1beta1", "v10"];
        v.sort_by(|a, b| version_priority(a, b));
        assert_eq!(
            v,
            vec!["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
