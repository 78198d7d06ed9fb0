//! Field-level validation errors, rendered exactly as apimachinery's
//! `field.Error` renders them, and the `meta/v1 Status` bodies built from them.
//!
//! A [`FieldError`] prints as `<field>: <body>` where the body is the error
//! type's text, then the bad value (strings quoted Go-style, numbers and
//! booleans bare, anything else as JSON), then `: <detail>`. Required,
//! Forbidden, TooLong and Internal errors never print their value.

use std::fmt;

use serde_json::{Value, json};

/// The machine-readable type of a field error; its [`reason`](Self::reason)
/// is the `StatusCause.reason` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldErrorKind {
    /// `FieldValueNotFound`.
    NotFound,
    /// `FieldValueRequired`.
    Required,
    /// `FieldValueDuplicate`.
    Duplicate,
    /// `FieldValueInvalid`.
    Invalid,
    /// `FieldValueNotSupported`.
    NotSupported,
    /// `FieldValueForbidden`.
    Forbidden,
    /// `FieldValueTooLong`.
    TooLong,
    /// `FieldValueTooMany`.
    TooMany,
    /// `InternalError`.
    Internal,
    /// `FieldValueTypeInvalid`.
    TypeInvalid,
}

impl FieldErrorKind {
    /// The cause type string (`FieldValueInvalid`, …).
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotFound => "FieldValueNotFound",
            Self::Required => "FieldValueRequired",
            Self::Duplicate => "FieldValueDuplicate",
            Self::Invalid => "FieldValueInvalid",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Forbidden => "FieldValueForbidden",
            Self::TooLong => "FieldValueTooLong",
            Self::TooMany => "FieldValueTooMany",
            Self::Internal => "InternalError",
            Self::TypeInvalid => "FieldValueTypeInvalid",
        }
    }

    /// The human text of the type (`Invalid value`, `Required value`, …).
    pub fn text(self) -> &'static str {
        match self {
            Self::NotFound => "Not found",
            Self::Required => "Required value",
            Self::Duplicate => "Duplicate value",
            Self::Invalid | Self::TypeInvalid => "Invalid value",
            Self::NotSupported => "Unsupported value",
            Self::Forbidden => "Forbidden",
            Self::TooLong => "Too long",
            Self::TooMany => "Too many",
            Self::Internal => "Internal error",
        }
    }

    /// Parses an `x-kubernetes-validations[].reason` value.
    pub fn from_rule_reason(reason: &str) -> Option<Self> {
        match reason {
            "FieldValueForbidden" => Some(Self::Forbidden),
            "FieldValueRequired" => Some(Self::Required),
            "FieldValueDuplicate" => Some(Self::Duplicate),
            "FieldValueInvalid" => Some(Self::Invalid),
            _ => None,
        }
    }
}

/// One field-level validation error (`field.Error`).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// The field path, e.g. `spec.bandwidth.limit` or `spec.ports[0].name`;
    /// `<nil>` for an error about no particular field.
    pub field: String,
    /// What kind of error this is.
    pub kind: FieldErrorKind,
    /// The offending value; `None` means the value is omitted from the text.
    pub bad_value: Option<Value>,
    /// Free-form detail appended after the value.
    pub detail: String,
}

impl FieldError {
    fn new(field: &str, kind: FieldErrorKind, bad_value: Option<Value>, detail: String) -> Self {
        let field = if field.is_empty() {
            "<nil>".to_string()
        } else {
            field.to_string()
        };
        Self {
            field,
            kind,
            bad_value,
            detail,
        }
    }

    /// `field.Invalid`.
    pub fn invalid(field: &str, value: Value, detail: impl Into<String>) -> Self {
        Self::new(field, FieldErrorKind::Invalid, Some(value), detail.into())
    }

    /// `field.TypeInvalid`.
    pub fn type_invalid(field: &str, value: Value, detail: impl Into<String>) -> Self {
        Self::new(
            field,
            FieldErrorKind::TypeInvalid,
            Some(value),
            detail.into(),
        )
    }

    /// `field.Required`.
    pub fn required(field: &str, detail: impl Into<String>) -> Self {
        Self::new(field, FieldErrorKind::Required, None, detail.into())
    }

    /// `field.Forbidden`.
    pub fn forbidden(field: &str, detail: impl Into<String>) -> Self {
        Self::new(field, FieldErrorKind::Forbidden, None, detail.into())
    }

    /// `field.Duplicate`.
    pub fn duplicate(field: &str, value: Value) -> Self {
        Self::new(field, FieldErrorKind::Duplicate, Some(value), String::new())
    }

    /// `field.NotSupported` with the list of supported values.
    pub fn not_supported(field: &str, value: Value, supported: &[String]) -> Self {
        let detail = if supported.is_empty() {
            String::new()
        } else {
            let quoted: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
            format!("supported values: {}", quoted.join(", "))
        };
        Self::new(field, FieldErrorKind::NotSupported, Some(value), detail)
    }

    /// `field.TooLong` (byte length).
    pub fn too_long(field: &str, max: i64) -> Self {
        let detail = if max >= 0 {
            format!(
                "may not be more than {max} {}",
                if max == 1 { "byte" } else { "bytes" }
            )
        } else {
            "value is too long".to_string()
        };
        Self::new(field, FieldErrorKind::TooLong, None, detail)
    }

    /// `field.TooMany` (list items or object properties).
    pub fn too_many(field: &str, actual: i64, max: i64) -> Self {
        let detail = if max >= 0 {
            format!(
                "must have at most {max} {}",
                if max == 1 { "item" } else { "items" }
            )
        } else {
            "has too many items".to_string()
        };
        let value = (actual >= 0).then(|| json!(actual));
        Self::new(field, FieldErrorKind::TooMany, value, detail)
    }

    /// `field.InternalError`.
    pub fn internal(field: &str, detail: impl Into<String>) -> Self {
        Self::new(field, FieldErrorKind::Internal, None, detail.into())
    }

    /// The error without its field (`ErrorBody`), used as `StatusCause.message`.
    pub fn body(&self) -> String {
        let mut s = match self.kind {
            FieldErrorKind::Required
            | FieldErrorKind::Forbidden
            | FieldErrorKind::TooLong
            | FieldErrorKind::Internal => self.kind.text().to_string(),
            _ => match &self.bad_value {
                None => self.kind.text().to_string(),
                Some(v) => format!("{}: {}", self.kind.text(), render_value(v)),
            },
        };
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }

    /// The `StatusCause` object for this error.
    pub fn cause(&self) -> Value {
        json!({"reason": self.kind.reason(), "message": self.body(), "field": self.field})
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

impl std::error::Error for FieldError {}

/// Renders a bad value as Go's `field.Error` does: strings `%q`, simple
/// scalars `%v`, everything else as JSON.
fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => go_quote(s),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// Quotes a string the way Go's `strconv.Quote` does for printable text.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Joins messages as `utilerrors.Aggregate` does: one message alone, several
/// as `[a, b]`, duplicates dropped.
pub fn aggregate_message(messages: &[String]) -> String {
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&String> = messages
        .iter()
        .filter(|m| seen.insert(m.as_str()))
        .collect();
    match unique.as_slice() {
        [] => String::new(),
        [one] => (*one).clone(),
        many => format!(
            "[{}]",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `Kind.group` as `schema.GroupKind.String()` prints it.
fn qualified_kind(group: &str, kind: &str) -> String {
    if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    }
}

/// The 422 `Status` body of `apierrors.NewInvalid`: message
/// `<Kind>.<group> "<name>" is invalid: <errors>` and one cause per error.
pub fn invalid_status(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> Value {
    let qk = qualified_kind(group, kind);
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let message = if errors.is_empty() {
        format!("{qk} {} is invalid", go_quote(name))
    } else {
        format!(
            "{qk} {} is invalid: {}",
            go_quote(name),
            aggregate_message(&messages)
        )
    };
    let mut details = serde_json::Map::new();
    details.insert("name".into(), json!(name));
    if !group.is_empty() {
        details.insert("group".into(), json!(group));
    }
    details.insert("kind".into(), json!(kind));
    details.insert(
        "causes".into(),
        Value::Array(errors.iter().map(FieldError::cause).collect()),
    );
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Invalid",
        "details": details,
        "code": 422
    })
}

/// The 400 `Status` body the real server returns for unknown fields under
/// `fieldValidation=Strict`:
/// `<Kind> in version "<v>" cannot be handled as a <Kind>: strict decoding error: unknown field "spec.x", …`.
pub fn strict_decoding_status(kind: &str, version: &str, unknown: &[String]) -> Value {
    let fields: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field {}", go_quote(f)))
        .collect();
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "{kind} in version {} cannot be handled as a {kind}: strict decoding error: {}",
            go_quote(version),
            fields.join(", ")
        ),
        "reason": "BadRequest",
        "code": 400
    })
}

/// Builds field paths the way `field.Path` prints them.
pub(crate) fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// `path[i]`.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_supported_lists_quoted_values() {
        let e = FieldError::not_supported(
            "spec.mode",
            json!("Fast"),
            &["Auto".into(), "Custom".into()],
        );
        assert_eq!(
            e.to_string(),
            r#"spec.mode: Unsupported value: "Fast": supported values: "Auto", "Custom""#
        );
        assert_eq!(e.cause()["reason"], "FieldValueNotSupported");
    }

    #[test]
    fn required_and_too_long_omit_the_value() {
        assert_eq!(
            FieldError::required("spec.x", "").to_string(),
            "spec.x: Required value"
        );
        assert_eq!(
            FieldError::too_long("spec.startCommand", 4096).to_string(),
            "spec.startCommand: Too long: may not be more than 4096 bytes"
        );
        assert_eq!(
            FieldError::too_many("spec.rules", 65, 64).to_string(),
            "spec.rules: Too many: 65: must have at most 64 items"
        );
    }

    #[test]
    fn values_render_like_go() {
        let e = FieldError::invalid("spec.port", json!(66666), "too big");
        assert_eq!(e.to_string(), "spec.port: Invalid value: 66666: too big");
        let e = FieldError::invalid("", Value::Null, "some validation rules were not checked");
        assert_eq!(
            e.to_string(),
            "<nil>: Invalid value: null: some validation rules were not checked"
        );
        let e = FieldError::duplicate("spec.ports[1]", json!({"name": "a"}));
        assert_eq!(
            e.to_string(),
            r#"spec.ports[1]: Duplicate value: {"name":"a"}"#
        );
        assert_eq!(go_quote("a\"b\n"), r#""a\"b\n""#);
    }

    #[test]
    fn invalid_status_matches_new_invalid() {
        let errs = vec![
            FieldError::required("spec.selector", ""),
            FieldError::invalid("spec.x", json!("y"), "bad"),
        ];
        let s = invalid_status("ferry.dev", "VirtualMachine", "vm1", &errs);
        assert_eq!(
            s["message"],
            r#"VirtualMachine.ferry.dev "vm1" is invalid: [spec.selector: Required value, spec.x: Invalid value: "y": bad]"#
        );
        assert_eq!(s["code"], 422);
        assert_eq!(s["reason"], "Invalid");
        assert_eq!(s["details"]["causes"][1]["field"], "spec.x");
        assert_eq!(
            s["details"]["causes"][1]["message"],
            r#"Invalid value: "y": bad"#
        );
        let one = invalid_status("", "ConfigMap", "c", &errs[..1]);
        assert_eq!(
            one["message"],
            r#"ConfigMap "c" is invalid: spec.selector: Required value"#
        );
    }

    #[test]
    fn strict_status_names_every_unknown_field() {
        let s = strict_decoding_status("Widget", "v1", &["spec.colour".into(), "spec.b".into()]);
        assert_eq!(
            s["message"],
            r#"Widget in version "v1" cannot be handled as a Widget: strict decoding error: unknown field "spec.colour", unknown field "spec.b""#
        );
        assert_eq!(s["code"], 400);
    }
}
