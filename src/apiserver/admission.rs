//! Admission of an object about to be stored, and rendering of responses.
//!
//! Built-in kinds must decode as their k8s-openapi type (the real server
//! would fail to decode them otherwise: 400). Custom resources are checked
//! against their CRD version's structural schema by [`super::schema`] once
//! that module provides a validator.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use super::http::ResourceRequest;
use super::resources::ResourceInfo;

/// Check `obj` before it is stored; returns warnings for the `Warning` header.
pub fn admit(
    info: &ResourceInfo,
    _rr: &ResourceRequest,
    obj: &mut Value,
    _old: Option<&Value>,
) -> Result<Vec<String>, ApiError> {
    if let Some(decode) = info.decoder
        && let Err(e) = decode(obj)
    {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        )));
    }
    Ok(Vec::new())
}

fn with_warnings(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - {:?}", w);
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append("warning", v);
        }
    }
    resp
}

/// A single-object response.
pub fn respond(
    _rr: &ResourceRequest,
    code: StatusCode,
    obj: Value,
    warnings: &[String],
) -> Response {
    let resp = (
        code,
        [("content-type", "application/json")],
        obj.to_string(),
    )
        .into_response();
    with_warnings(resp, warnings)
}

/// A list response.
pub fn respond_list(_rr: &ResourceRequest, list: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        list.to_string(),
    )
        .into_response()
}
