//! Validation of `metadata` the way `ValidateObjectMeta` does it for custom
//! resources (names are DNS-1123 subdomains, labels are qualified names and
//! label values), and of `x-kubernetes-embedded-resource` objects.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Value, json};

use super::field::{FieldError, child, index};
use super::node::{Additional, Node};

const DNS1123_SUBDOMAIN_FMT: &str =
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_MAX: usize = 63;
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_MAX: usize = 63;

static DNS1123_SUBDOMAIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{DNS1123_SUBDOMAIN_FMT}$")).expect("static regex"));
static QUALIFIED_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{QUALIFIED_NAME_FMT}$")).expect("static regex"));
static LABEL_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{LABEL_VALUE_FMT}$")).expect("static regex"));

/// `IsDNS1123Subdomain`: the problems with `value`, empty when it is valid.
pub fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        out.push(format!(
            "must be no more than {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    if !DNS1123_SUBDOMAIN.is_match(value) {
        out.push(format!(
            "{DNS1123_SUBDOMAIN_MSG} (e.g. 'example.com', regex used for validation is '{DNS1123_SUBDOMAIN_FMT}')"
        ));
    }
    out
}

/// Validates an object name (`metadata.name` of a custom resource and of
/// most built-in kinds) as a DNS-1123 subdomain.
pub fn validate_name(name: &str, path: &str) -> Vec<FieldError> {
    dns1123_subdomain_errors(name)
        .into_iter()
        .map(|msg| FieldError::invalid(path, json!(name), msg))
        .collect()
}

fn qualified_name_errors(value: &str) -> Vec<String> {
    let (prefix, name) = match value.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, value),
    };
    let mut out = Vec::new();
    if let Some(p) = prefix {
        if p.is_empty() {
            out.push("prefix part must be non-empty".to_string());
        } else {
            out.extend(
                dns1123_subdomain_errors(p)
                    .into_iter()
                    .map(|m| format!("prefix part {m}")),
            );
        }
    }
    if name.is_empty() {
        out.push("name part must be non-empty".to_string());
    } else if name.len() > QUALIFIED_NAME_MAX {
        out.push(format!(
            "name part must be no more than {QUALIFIED_NAME_MAX} characters"
        ));
    }
    if !name.is_empty() && !QUALIFIED_NAME.is_match(name) {
        out.push(format!("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME_FMT}')"));
    }
    out
}

fn label_value_errors(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    if value.len() > LABEL_VALUE_MAX {
        out.push(format!("must be no more than {LABEL_VALUE_MAX} characters"));
    }
    if !LABEL_VALUE.is_match(value) {
        out.push(format!("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '{LABEL_VALUE_FMT}')"));
    }
    out
}

/// `ValidateObjectMeta` for the parts that do not need the store: name or
/// generateName present and well-formed, label keys and values.
/// `path` is the path of the `metadata` object itself.
pub fn validate_object_meta(meta: Option<&Value>, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let empty = serde_json::Map::new();
    let m = meta.and_then(Value::as_object).unwrap_or(&empty);
    let name = m.get("name").and_then(Value::as_str).unwrap_or("");
    let generate = m.get("generateName").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() && generate.is_empty() {
        errs.push(FieldError::required(
            &child(path, "name"),
            "name or generateName is required",
        ));
    }
    if !name.is_empty() {
        errs.extend(validate_name(name, &child(path, "name")));
    }
    if !generate.is_empty() {
        // The prefix is validated as a name after a trailing '-' is dropped.
        let trimmed = generate.strip_suffix('-').unwrap_or(generate);
        let gp = child(path, "generateName");
        errs.extend(
            dns1123_subdomain_errors(trimmed)
                .into_iter()
                .map(|msg| FieldError::invalid(&gp, json!(generate), msg)),
        );
    }
    if let Some(labels) = m.get("labels").and_then(Value::as_object) {
        let lp = child(path, "labels");
        for (k, v) in labels {
            for msg in qualified_name_errors(k) {
                errs.push(FieldError::invalid(&lp, json!(k), msg));
            }
            let v = v.as_str().unwrap_or("");
            for msg in label_value_errors(v) {
                errs.push(FieldError::invalid(&lp, json!(v), msg));
            }
        }
    }
    if let Some(ann) = m.get("annotations").and_then(Value::as_object) {
        let ap = child(path, "annotations");
        for k in ann.keys() {
            for msg in qualified_name_errors(&k.to_lowercase()) {
                errs.push(FieldError::invalid(&ap, json!(k), msg));
            }
        }
    }
    errs
}

/// Checks every `x-kubernetes-embedded-resource` object below `s`: it needs
/// a non-empty `apiVersion` and `kind`, and a valid `metadata.name` if set.
pub(crate) fn validate_embedded(value: &Value, s: &Node, path: &str, errs: &mut Vec<FieldError>) {
    match value {
        Value::Object(map) => {
            if s.embedded_resource {
                for f in ["apiVersion", "kind"] {
                    match map.get(f) {
                        None => {
                            errs.push(FieldError::required(&child(path, f), "must not be empty"))
                        }
                        Some(Value::String(v)) if v.is_empty() => errs.push(FieldError::invalid(
                            &child(path, f),
                            json!(v),
                            "must not be empty",
                        )),
                        Some(Value::String(_)) => {}
                        Some(other) => errs.push(FieldError::invalid(
                            &child(path, f),
                            other.clone(),
                            "must be a string",
                        )),
                    }
                }
                if let Some(name) = map
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                {
                    errs.extend(validate_name(
                        name,
                        &child(&child(path, "metadata"), "name"),
                    ));
                }
            }
            for (k, v) in map {
                if let Some(p) = s.properties.get(k) {
                    validate_embedded(v, p, &child(path, k), errs);
                } else if let Some(Additional::Schema(a)) = &s.additional {
                    validate_embedded(v, a, &child(path, k), errs);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.items.as_deref() {
                for (i, v) in items.iter().enumerate() {
                    validate_embedded(v, item, &index(path, i), errs);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_get_the_dns1123_message() {
        let errs = validate_name("Foo_Bar", "metadata.name");
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            r#"metadata.name: Invalid value: "Foo_Bar": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"#
        );
        assert!(validate_name("vm-1.example", "metadata.name").is_empty());
        let long = "a".repeat(254);
        assert_eq!(
            validate_name(&long, "metadata.name")[0].detail,
            "must be no more than 253 characters"
        );
    }

    #[test]
    fn metadata_needs_a_name_and_valid_labels() {
        let errs = validate_object_meta(Some(&json!({})), "metadata");
        assert_eq!(
            errs[0].to_string(),
            "metadata.name: Required value: name or generateName is required"
        );
        assert!(validate_object_meta(Some(&json!({"generateName": "vm-"})), "metadata").is_empty());
        let errs = validate_object_meta(
            Some(&json!({"name": "a", "labels": {"ok/k": "v", "k": "bad value"}})),
            "metadata",
        );
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "metadata.labels");
        assert!(
            errs[0]
                .to_string()
                .starts_with(r#"metadata.labels: Invalid value: "bad value": a valid label"#)
        );
    }
}
