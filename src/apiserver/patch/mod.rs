//! The four patch types of `PATCH` requests, pure functions over JSON:
//!
//! - `application/merge-patch+json` (RFC 7386) by [`merge_patch`];
//! - `application/json-patch+json` (RFC 6902) by [`json_patch()`](fn@json_patch);
//! - `application/strategic-merge-patch+json` by [`strategic_merge_patch`],
//!   for the built-in kinds only (lists merged by their `patchMergeKey`);
//! - `application/apply-patch+yaml` by [`server_side_apply`], with field
//!   ownership recorded in `metadata.managedFields` (FieldsV1), conflicts
//!   between managers and `force`; [`track_update`] records ownership for
//!   every other write so that later applies see who owns what.
//!
//! List semantics for apply come from a [`ListTypes`]: the CRD schema's
//! `x-kubernetes-list-type`/`x-kubernetes-list-map-keys` ([`SchemaListTypes`])
//! or the built-in kinds' table ([`BuiltinListTypes`]).

mod apply;
mod fieldset;
mod listtypes;
mod strategic;

#[cfg(test)]
mod tests;

use serde_json::Value;

pub use apply::{
    ApplyError, ApplyOptions, Conflict, UpdateOptions, conflict_status, server_side_apply,
    track_update,
};
pub use fieldset::{FieldPath, FieldSet, PathElement};
pub use listtypes::{BuiltinListTypes, ListType, ListTypes, SchemaListTypes};
pub use strategic::strategic_merge_patch;

/// Why a patch could not be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is malformed (the server answers 400).
    #[error("{0}")]
    BadRequest(String),
    /// The patch is well-formed but cannot apply to this object (422).
    #[error("{0}")]
    Unprocessable(String),
}

impl PatchError {
    /// The HTTP status code the real server answers with.
    pub fn code(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::Unprocessable(_) => 422,
        }
    }
}

/// Applies an RFC 7386 JSON merge patch: objects merge recursively, `null`
/// deletes, anything else (lists included) replaces.
pub fn merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !patch.is_object() {
        return Err(PatchError::BadRequest(
            "json: cannot unmarshal patch into Go value of type map[string]interface {}"
                .to_string(),
        ));
    }
    let mut out = target.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

/// Applies an RFC 6902 JSON patch; a malformed patch is a 400, an operation
/// that does not apply is a 422 with evanphx/json-patch's wording.
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::BadRequest(format!("invalid JSON patch: {e}")))?;
    let mut out = target.clone();
    json_patch::patch(&mut out, &ops).map_err(|e| {
        let op = ops.0.get(e.operation);
        let name = match op {
            Some(json_patch::PatchOperation::Add(_)) => "add",
            Some(json_patch::PatchOperation::Remove(_)) => "remove",
            Some(json_patch::PatchOperation::Replace(_)) => "replace",
            Some(json_patch::PatchOperation::Move(_)) => "move",
            Some(json_patch::PatchOperation::Copy(_)) => "copy",
            Some(json_patch::PatchOperation::Test(_)) | None => "test",
        };
        let path = e.path.to_string();
        PatchError::Unprocessable(match e.kind {
            json_patch::PatchErrorKind::TestFailed => {
                format!("testing value {path} failed: test failed")
            }
            json_patch::PatchErrorKind::InvalidFromPointer => {
                format!("{name} operation does not apply: doc is missing from path: {path}: missing value")
            }
            json_patch::PatchErrorKind::CannotMoveInsideItself => {
                format!("{name} operation does not apply: cannot move {path} inside itself")
            }
            _ => format!(
                "{name} operation does not apply: doc is missing path: \"{path}\": missing value"
            ),
        })
    })?;
    Ok(out)
}
