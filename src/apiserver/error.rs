//! Errors as the Kubernetes API reports them: a `meta/v1 Status` body with the
//! HTTP code, a machine-readable `reason` and, for validation failures, the
//! offending fields in `details.causes`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The resource an error is about, for `details` and the message.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// API group ("" for core).
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    /// Object name, if any.
    pub name: String,
}

impl Subject {
    /// `resource.group` as the real server prints it (`leases.coordination.k8s.io`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

/// One field-level cause of a 422 Invalid.
#[derive(Debug, Clone)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, ...
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// JSON path of the field, e.g. `spec.replicas`.
    pub field: String,
}

/// An API error, rendered as a `Status`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `metav1.StatusReason`.
    pub reason: &'static str,
    /// Human-readable message in the real server's wording.
    pub message: String,
    /// What the error is about.
    pub subject: Option<Box<Subject>>,
    /// Field causes (422).
    pub causes: Vec<Cause>,
    /// A complete `Status` built elsewhere (schema validation), sent as is.
    pub raw: Option<Box<Value>>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            subject: None,
            causes: Vec::new(),
            raw: None,
        }
    }
    /// An error whose `Status` body was built by someone else.
    pub fn from_status(status: Value) -> Self {
        let code = status["code"]
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(500);
        let mut e = Self::new(
            code,
            "Invalid",
            status["message"].as_str().unwrap_or("").to_string(),
        );
        e.raw = Some(Box::new(status));
        e
    }
    fn with_subject(mut self, s: &Subject) -> Self {
        self.subject = Some(Box::new(s.clone()));
        self
    }
    /// 404 for an object that does not exist.
    pub fn not_found(s: &Subject) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", s.qualified(), s.name),
        )
        .with_subject(s)
    }
    /// 404 for a path the server does not serve.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    /// 409 on create of an existing name.
    pub fn already_exists(s: &Subject) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", s.qualified(), s.name),
        )
        .with_subject(s)
    }
    /// 409 on a stale resourceVersion or failed precondition.
    pub fn conflict(s: &Subject, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": {why}",
                s.qualified(),
                s.name
            ),
        )
        .with_subject(s)
    }
    /// The message kube-apiserver uses for a stale resourceVersion.
    pub const MODIFIED: &'static str = "the object has been modified; please apply your changes to the latest version and try again";
    /// 422 with field causes.
    pub fn invalid(kind: &str, s: &Subject, causes: Vec<Cause>) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{}\" is invalid: {joined}",
                s.kind_qualified(kind),
                s.name
            ),
        )
        .with_subject(s);
        e.causes = causes;
        e
    }
    /// 400 for a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    /// 422 for a request that is well-formed but cannot be applied.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }
    /// 401 for a missing or unknown token.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    /// 403 with the given message.
    pub fn forbidden(s: Option<&Subject>, message: impl Into<String>) -> Self {
        let e = Self::new(403, "Forbidden", message);
        match s {
            Some(s) => e.with_subject(s),
            None => e,
        }
    }
    /// 405 for a verb the resource does not support.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    /// 410 for a compacted resourceVersion.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    /// 415 for a content type the server does not accept.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {content_type}"
            ),
        )
    }
    /// 415 for a body in a supported media type that this server cannot
    /// decode (a protobuf kind or field it has no table for).
    pub fn unsupported_media_type_because(content_type: &str, why: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request in {content_type} could not be decoded: {why}"),
        )
    }
    /// 406 for an Accept header the server cannot satisfy.
    pub fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf; got {accept}"
            ),
        )
    }
    /// 500 for a storage failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        if let Some(raw) = &self.raw {
            return (**raw).clone();
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if self.subject.is_some() || !self.causes.is_empty() {
            let mut details = serde_json::Map::new();
            if let Some(s) = &self.subject {
                if !s.name.is_empty() {
                    details.insert("name".into(), json!(s.name));
                }
                if !s.group.is_empty() {
                    details.insert("group".into(), json!(s.group));
                }
                details.insert("kind".into(), json!(s.resource));
            }
            if !self.causes.is_empty() {
                let causes: Vec<Value> = self
                    .causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                details.insert("causes".into(), Value::Array(causes));
            }
            status["details"] = Value::Object(details);
        }
        status
    }
}

impl Subject {
    fn kind_qualified(&self, kind: &str) -> String {
        if self.group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{}", self.group)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = self.status().to_string();
        (code, [("content-type", "application/json")], body).into_response()
    }
}
