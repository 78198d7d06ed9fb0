//! PATCH: decode the patch by content type, apply it to the stored object
//! with the functions of [`super::patch`], then store the result like an
//! update (same preconditions, status-subresource and generation rules).

use axum::response::Response;

use super::error::ApiError;
use super::http::{ApiState, ResourceRequest};

/// The patch types kube-apiserver accepts.
pub const PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

/// `PATCH .../NAME[/status]`: the patch functions are not available yet, so
/// every patch type answers 415 (the answer of a server that does not accept
/// that media type).
pub async fn patch(_state: &ApiState, rr: ResourceRequest) -> Result<Response, ApiError> {
    let ct = rr
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Err(ApiError::unsupported_media_type(&ct))
}
