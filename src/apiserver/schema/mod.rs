//! Admission of custom resources against their CRD version's structural
//! schema, pure and I/O-free, doing what kube-apiserver's apiextensions
//! handler does to an object on create and update:
//!
//! ```text
//!  request body ──► prune unknown fields ──► default ──► validate ──► CEL rules
//!                   (Ignore: drop silently,   (missing /  (types, formats,  (skipped when a
//!                    Warn: warnings,           non-null-  enum, ranges,     blocking error
//!                    Strict: 400 error)        able null) lengths, list     was found)
//!                                                         types, metadata)
//! ```
//!
//! A [`Validator`] is compiled once per CRD version (patterns and CEL
//! programs included) and shared. Errors are [`FieldError`]s printed as the
//! real server prints them, and [`AdmitError::status`] builds the `Status`
//! body the server answers with (422 `Invalid` or 400 `BadRequest`).

mod cel;
mod crd;
mod defaults;
pub mod field;
mod formats;
pub mod meta;
mod node;
mod prune;
mod ratchet;
mod validate;

#[cfg(test)]
mod tests;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion;
use serde_json::Value;

pub use crd::validate_crd;
pub use field::{FieldError, FieldErrorKind, invalid_status, strict_decoding_status};
pub use meta::{validate_name, validate_object_meta};
use node::Node;

/// Why a schema could not be compiled into a [`Validator`].
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The CRD version has no `schema.openAPIV3Schema`.
    #[error("CRD version {0:?} has no openAPIV3Schema")]
    Missing(String),
    /// A `pattern` is not a valid regular expression.
    #[error("schema {path}: pattern {pattern:?} does not compile: {reason}")]
    Pattern {
        /// Where in the schema.
        path: String,
        /// The pattern text.
        pattern: String,
        /// The regex error.
        reason: String,
    },
    /// An `x-kubernetes-validations` rule does not compile.
    #[error("x-kubernetes-validations rule does not compile: {0}")]
    Rule(String),
    /// The schema does not serialize to JSON.
    #[error("schema is not representable as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The `fieldValidation` query parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop unknown fields silently.
    Ignore,
    /// Drop unknown fields and warn about each (the server's default).
    #[default]
    Warn,
    /// Reject the request if it has unknown fields.
    Strict,
}

impl FieldValidation {
    /// Parses the query parameter value (`Ignore`, `Warn`, `Strict`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Ignore" => Some(Self::Ignore),
            "Warn" => Some(Self::Warn),
            "Strict" => Some(Self::Strict),
            _ => None,
        }
    }
}

/// Options of one admission.
#[derive(Clone, Debug, Default)]
pub struct AdmitOptions {
    /// How to treat fields the schema does not know.
    pub field_validation: FieldValidation,
}

/// A successful admission.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Admitted {
    /// Warnings for the `Warning` response header (`unknown field "spec.x"`).
    pub warnings: Vec<String>,
}

/// Why an object was not admitted.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AdmitError {
    /// `fieldValidation=Strict` and the object had unknown fields (400).
    #[error("strict decoding error: {}", .0.iter().map(|f| format!("unknown field {}", field::go_quote(f))).collect::<Vec<_>>().join(", "))]
    UnknownFields(Vec<String>),
    /// The object failed validation (422).
    #[error("{}", field::aggregate_message(&.0.iter().map(ToString::to_string).collect::<Vec<_>>()))]
    Invalid(Vec<FieldError>),
    /// Part of the object cannot be decoded at all, such as a `metadata`
    /// that is not an `ObjectMeta` (400).
    #[error("{0}")]
    Undecodable(String),
}

impl AdmitError {
    /// The HTTP status code the server answers with.
    pub fn code(&self) -> u16 {
        match self {
            Self::UnknownFields(_) | Self::Undecodable(_) => 400,
            Self::Invalid(_) => 422,
        }
    }

    /// The `Status` body for an object of `group`/`version`/`kind` named `name`.
    pub fn status(&self, group: &str, version: &str, kind: &str, name: &str) -> Value {
        match self {
            Self::UnknownFields(f) => strict_decoding_status(kind, version, f),
            Self::Invalid(errs) => invalid_status(group, kind, name, errs),
            Self::Undecodable(why) => serde_json::json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!(
                    "{kind} in version {} cannot be handled as a {kind}: {why}",
                    field::go_quote(version)
                ),
                "reason": "BadRequest",
                "code": 400
            }),
        }
    }
}

/// The detail of the error added when CEL rules were skipped.
const RULES_NOT_CHECKED: &str = "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

/// A CRD version's schema, compiled for admission.
#[derive(Debug)]
pub struct Validator {
    root: Node,
    cel: Option<cel::CelRules>,
}

impl Validator {
    /// Compiles the `openAPIV3Schema` of a CRD version.
    pub fn new(version: &CustomResourceDefinitionVersion) -> Result<Self, SchemaError> {
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| SchemaError::Missing(version.name.clone()))?;
        Self::from_schema(&serde_json::to_value(schema)?)
    }

    /// Compiles a schema given as JSON.
    pub fn from_schema(schema: &Value) -> Result<Self, SchemaError> {
        let root = Node::compile(schema, "openAPIV3Schema")?;
        let cel = cel::CelRules::compile(schema, &root)?;
        Ok(Self { root, cel })
    }

    /// Prunes, defaults and validates `obj` in place, as on create (`old`
    /// is `None`) or update (`old` is the stored object; transition rules
    /// with `oldSelf` run only then).
    pub fn admit(
        &self,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &AdmitOptions,
    ) -> Result<Admitted, AdmitError> {
        let unknown = prune::prune_root(obj, &self.root);
        if let Some(m) = obj.get("metadata")
            && let Err(e) = serde_json::from_value::<
                k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            >(m.clone())
        {
            return Err(AdmitError::Undecodable(format!("metadata: {e}")));
        }
        let mut admitted = Admitted::default();
        match opts.field_validation {
            FieldValidation::Strict if !unknown.is_empty() => {
                return Err(AdmitError::UnknownFields(unknown));
            }
            FieldValidation::Warn => {
                admitted.warnings = unknown
                    .iter()
                    .map(|f| format!("unknown field {}", field::go_quote(f)))
                    .collect();
            }
            _ => {}
        }
        defaults::apply(obj, &self.root);
        let errs = self.validate(obj, old);
        if errs.is_empty() {
            Ok(admitted)
        } else {
            Err(AdmitError::Invalid(errs))
        }
    }

    /// Applies defaults only, as the server does to objects read from
    /// storage.
    pub fn apply_defaults(&self, obj: &mut Value) {
        defaults::apply(obj, &self.root);
    }

    /// Prunes unknown fields only, returning their paths.
    pub fn prune(&self, obj: &mut Value) -> Vec<String> {
        prune::prune_root(obj, &self.root)
    }

    /// Validates an already pruned and defaulted object: metadata, schema,
    /// embedded resources, then (unless a blocking error was found) the
    /// CEL rules. On update, errors about values the update did not change
    /// are dropped (validation ratcheting).
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let unchanged =
            |path: &str| old.is_some_and(|o| ratchet::unchanged(&self.root, obj, o, path));
        let mut errs = validate_object_meta(obj.get("metadata"), "metadata");
        validate::validate(obj, &self.root, "", &mut errs);
        meta::validate_embedded(obj, &self.root, "", &mut errs);
        errs.retain(|e| {
            let path = match e.kind {
                FieldErrorKind::Required => ratchet::parent(&e.field),
                _ => e.field.as_str(),
            };
            !unchanged(path)
        });
        if let Some(cel) = &self.cel {
            let blocking = errs.iter().any(|e| {
                matches!(
                    e.kind,
                    FieldErrorKind::NotSupported
                        | FieldErrorKind::Required
                        | FieldErrorKind::TooLong
                        | FieldErrorKind::TooMany
                        | FieldErrorKind::TypeInvalid
                )
            });
            if blocking {
                errs.push(FieldError::invalid("", Value::Null, RULES_NOT_CHECKED));
            } else {
                let mut failures = cel.validate(obj, old);
                if let Some(o) = old
                    && cel.has_map_lists
                {
                    // Inside map-list items `oldSelf` is the item with the
                    // same keys, not the one at the same index.
                    let aligned = ratchet::align_old(&self.root, obj, o);
                    failures.retain(|(_, node)| !ratchet::inside_map_item(&self.root, node));
                    failures.extend(
                        cel.validate(obj, Some(&aligned))
                            .into_iter()
                            .filter(|(_, node)| ratchet::inside_map_item(&self.root, node)),
                    );
                }
                errs.extend(
                    failures
                        .into_iter()
                        .filter(|(_, node)| !unchanged(node))
                        .map(|(e, _)| e),
                );
            }
        }
        errs
    }
}
