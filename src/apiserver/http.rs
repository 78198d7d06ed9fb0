//! Request routing: authentication, path parsing and dispatch to discovery or
//! the resource handlers.
//!
//! ```text
//! /version /healthz /livez /readyz            unauthenticated-safe probes
//! /api, /apis, /api/v1, /apis/G/V              discovery
//! /openapi/v2, /openapi/v3[/...]               OpenAPI documents
//! /api/v1/[namespaces/NS/]RES[/NAME[/SUB]]     core resources
//! /apis/G/V/[namespaces/NS/]RES[/NAME[/SUB]]   everything else
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::pki::{Identity, Tokens};
use super::resources::{Registry, ResourceInfo};
use super::store::Store;
use super::{crud, discovery, rbac, watch};

/// Request bodies above this are refused (kube-apiserver's limit is 3 MiB
/// per object; a little headroom for patches).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Shared server state. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// Objects and events.
    pub store: Store,
    /// Served resources.
    pub registry: Registry,
    /// Bearer tokens.
    pub tokens: Arc<Tokens>,
    /// Wakes the background controllers after a write.
    pub wake: Arc<Notify>,
    /// Cancelled on shutdown (ends watches).
    pub cancel: CancellationToken,
    /// The compiled ValidatingAdmissionPolicies.
    pub policies: Arc<super::admission_policy::PolicyCache>,
}

impl ApiState {
    /// New shared state.
    pub fn new(
        store: Store,
        registry: Registry,
        tokens: Tokens,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
            registry,
            tokens: Arc::new(tokens),
            wake: Arc::new(Notify::new()),
            cancel,
            policies: Arc::default(),
        }
    }
}

/// One parsed resource request.
pub struct ResourceRequest {
    /// The HTTP method.
    pub method: Method,
    /// The resource.
    pub info: Arc<ResourceInfo>,
    /// Namespace from the path ("" for cluster-scoped or all namespaces).
    pub namespace: String,
    /// Object name, if the path names one.
    pub name: Option<String>,
    /// `status`, if the path names the subresource.
    pub subresource: Option<String>,
    /// Query parameters.
    pub query: HashMap<String, String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// Who is asking.
    pub identity: Identity,
    /// The admission policies in force for this request.
    pub policies: super::admission_policy::Admission,
}

impl ResourceRequest {
    /// A query parameter.
    pub fn param(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
    /// Whether `dryRun=All` was asked for.
    pub fn dry_run(&self) -> bool {
        self.param("dryRun").is_some_and(|v| v == "All")
    }
}

/// The axum router serving everything.
pub fn router(state: ApiState) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// A JSON response.
pub fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    state
        .tokens
        .authenticate(token.trim())
        .cloned()
        .ok_or_else(ApiError::unauthorized)
}

async fn dispatch(State(state): State<ApiState>, req: Request<Body>) -> Response {
    let accept = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let resp = match handle(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    super::protobuf::negotiate(accept.as_deref(), resp).await
}

async fn handle(state: ApiState, req: Request<Body>) -> Result<Response, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
        return Ok((StatusCode::OK, "ok").into_response());
    }
    let identity = authenticate(&state, req.headers())?;
    let query: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or_default();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let headers = req.headers().clone();

    // Discovery and OpenAPI.
    match seg.as_slice() {
        ["version"] => return Ok(discovery::version()),
        ["api"] => return Ok(discovery::core_versions(&state, &headers)),
        ["apis"] => return Ok(discovery::groups(&state, &headers)),
        ["api", "v1"] => return discovery::resource_list(&state, "", "v1"),
        ["apis", g] => return discovery::group(&state, g),
        ["apis", g, v] => return discovery::resource_list(&state, g, v),
        ["openapi", ..] => return discovery::openapi(&state, &seg[1..]),
        _ => {}
    }

    let (group, version, rest) = match seg.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route()),
    };
    let (namespace, plural, name, subresource) = parse_rest(group, rest)?;
    let info = state
        .registry
        .get(group, version, plural)
        .ok_or_else(ApiError::no_route)?;
    if !info.namespaced && !namespace.is_empty() {
        return Err(ApiError::no_route());
    }
    if let Some(sub) = subresource {
        let known = (sub == "status" && info.status_subresource)
            || (sub == "finalize" && info.plural == "namespaces" && info.group.is_empty())
            || (sub == "scale" && super::scale::paths(&info).is_some());
        if !known {
            return Err(ApiError::no_route());
        }
    }
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
    let rr = ResourceRequest {
        method,
        info,
        namespace: namespace.to_string(),
        name: name.map(String::from),
        subresource: subresource.map(String::from),
        query,
        headers,
        body,
        identity,
        policies: state.policies.admission(&state.store),
    };
    let verb = verb_of(&rr);
    rbac::authorize(&state, &rr, verb)?;
    if rr.subresource.as_deref() == Some("scale") {
        return super::scale::handle(&state, rr, verb).await;
    }
    match verb {
        "watch" => watch::watch(&state, rr).await,
        "list" => crud::list(&state, &rr),
        "get" => crud::get(&state, &rr),
        "create" => crud::create(&state, rr).await,
        "update" => crud::update(&state, rr).await,
        "patch" => super::patching::patch(&state, rr).await,
        "delete" => super::delete::delete(&state, rr).await,
        "deletecollection" => super::delete::delete_collection(&state, rr).await,
        _ => Err(ApiError::method_not_allowed(
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// The RBAC verb of a request.
pub fn verb_of(rr: &ResourceRequest) -> &'static str {
    let watch = rr.param("watch").is_some_and(|v| v == "true" || v == "1");
    match (&rr.method, rr.name.is_some()) {
        (&Method::GET, _) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unsupported",
    }
}

type Parsed<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);

fn parse_rest<'a>(group: &str, rest: &[&'a str]) -> Result<Parsed<'a>, ApiError> {
    let core_ns = group.is_empty();
    Ok(match rest {
        // /api/v1/namespaces/NAME[/status|finalize] — the namespace object itself
        ["namespaces", name] if core_ns => ("", "namespaces", Some(*name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] if core_ns => {
            ("", "namespaces", Some(*name), Some(*sub))
        }
        ["namespaces", ns, res] => (*ns, *res, None, None),
        ["namespaces", ns, res, name] => (*ns, *res, Some(*name), None),
        ["namespaces", ns, res, name, sub] => (*ns, *res, Some(*name), Some(*sub)),
        [res] => ("", *res, None, None),
        [res, name] => ("", *res, Some(*name), None),
        [res, name, sub] => ("", *res, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    })
}
