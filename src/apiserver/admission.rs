//! Admission of an object about to be stored, and rendering of responses.
//!
//! - Built-in kinds must decode as their k8s-openapi type (the real server
//!   could not decode them otherwise: 400).
//! - CustomResourceDefinitions must have schemas that compile (422).
//! - Custom resources are pruned, defaulted and validated against their CRD
//!   version's structural schema by [`super::schema::Validator`], honouring
//!   `fieldValidation` (Strict: 400 on unknown fields; Warn: `Warning`
//!   headers; Ignore).
//!
//! Responses are JSON, or a `meta.k8s.io/v1` Table when the `Accept` header
//! prefers one (`kubectl get`), rendered by [`super::table`].

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::ResourceRequest;
use super::objmeta::meta_str;
use super::openapi;
use super::resources::ResourceInfo;
use super::schema::{self, AdmitOptions, FieldValidation, Validator};
use super::table::{self, IncludeObjectPolicy};

/// The `fieldValidation` query parameter (default `Warn`, as the server's).
pub fn field_validation(rr: &ResourceRequest) -> Result<FieldValidation, ApiError> {
    match rr.param("fieldValidation") {
        None | Some("") => Ok(FieldValidation::Warn),
        Some(v) => FieldValidation::parse(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {v}; supported values: Ignore, Warn, Strict"
            ))
        }),
    }
}

fn check_crd(info: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    let crd: CustomResourceDefinition = serde_json::from_value(obj.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "CustomResourceDefinition in version \"v1\" cannot be handled as a CustomResourceDefinition: {e}"
        ))
    })?;
    let name = crd.metadata.name.clone().unwrap_or_default();
    let mut errs = schema::validate_crd(&crd);
    if errs.is_empty() {
        // Schemas the validator cannot compile (a CEL rule, a pattern) would
        // make the CRD unservable: refuse them now.
        for (i, v) in crd.spec.versions.iter().enumerate() {
            if let Err(e) = Validator::new(v) {
                errs.push(schema::FieldError::invalid(
                    &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    Value::Null,
                    e.to_string(),
                ));
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::from_status(schema::invalid_status(
            &info.group,
            &info.kind,
            &name,
            &errs,
        )))
    }
}

/// Unknown fields of a built-in object, by its OpenAPI schema.
fn builtin_unknown_fields(info: &ResourceInfo, obj: &Value) -> Vec<String> {
    super::discovery::builtin_openapi()
        .iter()
        .find(|r| r.group == info.group && r.version == info.version && r.kind == info.kind)
        .map(|r| openapi::unknown_fields(r, obj))
        .unwrap_or_default()
}

/// Check `obj` (and, for custom resources, prune and default it) before it
/// is stored; returns warnings for the `Warning` header.
pub fn admit(
    info: &ResourceInfo,
    rr: &ResourceRequest,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<Vec<String>, ApiError> {
    let fv = field_validation(rr)?;
    if let Some(decode) = info.decoder
        && let Err(e) = decode(obj)
    {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        )));
    }
    let mut warnings = Vec::new();
    if info.decoder.is_some() && fv != FieldValidation::Ignore {
        let unknown = builtin_unknown_fields(info, obj);
        if !unknown.is_empty() {
            if fv == FieldValidation::Strict {
                return Err(ApiError::from_status(schema::strict_decoding_status(
                    &info.kind,
                    &info.version,
                    &unknown,
                )));
            }
            warnings.extend(unknown.iter().map(|f| format!("unknown field {f:?}")));
        }
    }
    if info.group == "apiextensions.k8s.io" && info.plural == "customresourcedefinitions" {
        check_crd(info, obj)?;
    }
    super::admission_policy::check_definition(info, obj)?;
    if let Some(validator) = &info.validator {
        let opts = AdmitOptions {
            field_validation: fv,
        };
        match validator.admit(obj, old, &opts) {
            Ok(admitted) => warnings = admitted.warnings,
            Err(e) => {
                let name = meta_str(obj, "name").unwrap_or("").to_string();
                return Err(ApiError::from_status(e.status(
                    &info.group,
                    &info.version,
                    &info.kind,
                    &name,
                )));
            }
        }
    }
    // ValidatingAdmissionPolicies judge the object after schema validation.
    warnings.extend(rr.policies.check(rr, info, Some(obj), old)?);
    Ok(warnings)
}

fn with_warnings(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - {w:?}");
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append("warning", v);
        }
    }
    resp
}

/// Whether the client prefers a `meta.k8s.io` Table over the object.
pub fn wants_table(rr: &ResourceRequest) -> bool {
    let accept = rr
        .headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for media in accept.split(',') {
        let parts: Vec<&str> = media.split(';').map(str::trim).collect();
        let base = parts.first().copied().unwrap_or("");
        let param = |k: &str| {
            parts[1..]
                .iter()
                .find_map(|p| p.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
        };
        if base == "application/json" && param("as") == Some("Table") {
            if param("g") == Some("meta.k8s.io") && matches!(param("v"), Some("v1" | "v1beta1")) {
                return true;
            }
            continue;
        }
        if base == "application/json" || base == "*/*" || base == "application/yaml" {
            return false;
        }
    }
    false
}

/// The `includeObject` parameter of a Table request.
pub fn include_policy(rr: &ResourceRequest) -> Result<IncludeObjectPolicy, ApiError> {
    match rr.param("includeObject") {
        None | Some("") => Ok(IncludeObjectPolicy::Metadata),
        Some(v) => IncludeObjectPolicy::parse(v).ok_or_else(|| {
            ApiError::bad_request(format!("includeObject: unsupported value {v:?}"))
        }),
    }
}

/// `objects` of resource `info` as a Table: the CRD version's printer
/// columns, or the built-in printer of the kind.
pub fn table_of(info: &ResourceInfo, include: IncludeObjectPolicy, objects: &[Value]) -> Value {
    let now = chrono::Utc::now();
    match &info.crd_version {
        Some(v) => table::render(
            v.additional_printer_columns.as_deref().unwrap_or(&[]),
            objects,
            include,
            now,
        ),
        None => table::render_builtin(&info.kind, objects, include, now),
    }
}

fn render_table(rr: &ResourceRequest, objects: &[Value]) -> Result<Value, ApiError> {
    Ok(table_of(&rr.info, include_policy(rr)?, objects))
}

/// A single-object response.
pub fn respond(
    rr: &ResourceRequest,
    code: StatusCode,
    obj: Value,
    warnings: &[String],
) -> Response {
    let body = if wants_table(rr) && code == StatusCode::OK && rr.method == axum::http::Method::GET
    {
        match render_table(rr, std::slice::from_ref(&obj)) {
            Ok(mut t) => {
                t["metadata"] =
                    json!({"resourceVersion": obj.pointer("/metadata/resourceVersion")});
                t
            }
            Err(e) => return e.into_response(),
        }
    } else {
        obj
    };
    let resp = (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    with_warnings(resp, warnings)
}

/// A list response.
pub fn respond_list(rr: &ResourceRequest, list: Value) -> Response {
    let body = if wants_table(rr) {
        let items = list["items"].as_array().cloned().unwrap_or_default();
        match render_table(rr, &items) {
            Ok(mut t) => {
                t["metadata"] = list["metadata"].clone();
                t
            }
            Err(e) => return e.into_response(),
        }
    } else {
        list
    };
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}
