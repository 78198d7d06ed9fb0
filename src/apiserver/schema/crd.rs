//! Validation of a `CustomResourceDefinition` itself, as apiextensions
//! refuses one on create and update: names and versions, and every
//! version's schema must be structural (`ValidateStructural`), use only what
//! v1 CRDs allow, compile (patterns, CEL rules), and carry defaults that
//! validate. Errors name the schema node as the real server does:
//! `spec.versions[0].schema.openAPIV3Schema.properties[spec].type: Required value: must not be empty for specified object fields`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::field::{FieldError, child, index};
use super::node::Node;
use super::{SchemaError, validate};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Item,
    Field,
}

fn key(path: &str, k: &str) -> String {
    format!("{path}[{k}]")
}

fn ty(s: &Value) -> &str {
    s.get("type").and_then(Value::as_str).unwrap_or("")
}

fn flag(s: &Value, k: &str) -> bool {
    s.get(k).and_then(Value::as_bool).unwrap_or(false)
}

/// `ValidateStructural` plus the v1 API rules on one schema node.
fn structural(s: &Value, lvl: Level, path: &str, errs: &mut Vec<FieldError>) {
    let Some(m) = s.as_object() else { return };
    let t = ty(s);
    if t == "array" && !m.contains_key("items") {
        errs.push(FieldError::required(
            &child(path, "items"),
            "must be specified",
        ));
    }
    if let Some(items) = m.get("items") {
        structural(items, Level::Item, &child(path, "items"), errs);
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural(v, Level::Field, &key(&child(path, "properties"), k), errs);
        }
    }
    if let Some(ap) = m.get("additionalProperties") {
        if lvl == Level::Root {
            errs.push(FieldError::forbidden(
                &child(path, "additionalProperties"),
                "must not be used at the root",
            ));
        }
        if m.contains_key("properties") {
            errs.push(FieldError::forbidden(
                &child(path, "additionalProperties"),
                "additionalProperties and properties are mutual exclusive",
            ));
        }
        if ap.is_object() {
            structural(ap, Level::Field, &child(path, "additionalProperties"), errs);
        }
    }
    let int_or_string = flag(s, "x-kubernetes-int-or-string");
    let preserve = flag(s, "x-kubernetes-preserve-unknown-fields");
    let embedded = flag(s, "x-kubernetes-embedded-resource");
    if int_or_string && preserve {
        errs.push(FieldError::invalid(
            &child(path, "x-kubernetes-preserve-unknown-fields"),
            json!(true),
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    if int_or_string && embedded {
        errs.push(FieldError::invalid(
            &child(path, "x-kubernetes-embedded-resource"),
            json!(true),
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    let int_or_string_any_of =
        m.get("anyOf") == Some(&json!([{"type": "integer"}, {"type": "string"}]));
    for junctor in ["allOf", "anyOf", "oneOf"] {
        if junctor == "anyOf" && int_or_string_any_of {
            continue;
        }
        for (i, v) in m
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            nested(v, &index(&child(path, junctor), i), errs);
        }
    }
    if let Some(not) = m.get("not") {
        nested(not, &child(path, "not"), errs);
    }
    if let Some(p) = m.get("pattern").and_then(Value::as_str)
        && let Err(e) = regex::Regex::new(p)
    {
        errs.push(FieldError::invalid(
            &child(path, "pattern"),
            json!(p),
            format!("must be a valid regular expression, but isn't: {e}"),
        ));
    }
    if flag(s, "uniqueItems") {
        errs.push(FieldError::forbidden(
            &child(path, "uniqueItems"),
            "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
        ));
    }
    if m.contains_key("$ref") {
        errs.push(FieldError::forbidden(
            &child(path, "$ref"),
            "$ref is not supported",
        ));
    }
    if s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map")
        && s.get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
    {
        errs.push(FieldError::required(
            &child(path, "x-kubernetes-list-map-keys"),
            "must not be empty if x-kubernetes-list-type is map",
        ));
    }
    if embedded && t != "object" {
        if t.is_empty() {
            errs.push(FieldError::required(
                &child(path, "type"),
                "must be object if x-kubernetes-embedded-resource is true",
            ));
        } else {
            errs.push(FieldError::invalid(
                &child(path, "type"),
                json!(t),
                "must be object if x-kubernetes-embedded-resource is true",
            ));
        }
    } else if t.is_empty() && !int_or_string && !preserve {
        let detail = match lvl {
            Level::Root => "must not be empty at the root",
            Level::Item => "must not be empty for specified array items",
            Level::Field => "must not be empty for specified object fields",
        };
        errs.push(FieldError::required(&child(path, "type"), detail));
    }
    if embedded && m.contains_key("additionalProperties") {
        errs.push(FieldError::forbidden(
            &child(path, "additionalProperties"),
            "must not be used if x-kubernetes-embedded-resource is set",
        ));
    }
    if lvl == Level::Root && !t.is_empty() && t != "object" {
        errs.push(FieldError::invalid(
            &child(path, "type"),
            json!(t),
            "must be object at the root",
        ));
    }
    let check_meta = lvl == Level::Root || embedded;
    let props = m.get("properties");
    let prop_type = |name: &str| props.and_then(|p| p.get(name)).map(ty);
    if check_meta {
        for (name, want) in [
            ("kind", "string"),
            ("apiVersion", "string"),
            ("metadata", "object"),
        ] {
            if let Some(got) = prop_type(name)
                && got != want
            {
                errs.push(FieldError::invalid(
                    &child(&key(&child(path, "properties"), name), "type"),
                    json!(got),
                    format!("must be {want}"),
                ));
            }
        }
    }
    if lvl == Level::Root
        && let Some(meta) = props
            .and_then(|p| p.get("metadata"))
            .and_then(Value::as_object)
    {
        let only_names = meta.iter().all(|(k, v)| match k.as_str() {
            "type" | "description" => true,
            "properties" => v
                .as_object()
                .is_some_and(|p| p.keys().all(|k| k == "name" || k == "generateName")),
            _ => false,
        });
        if !only_names {
            errs.push(FieldError::forbidden(
                &key(&child(path, "properties"), "metadata"),
                "must not specify anything other than name and generateName, but metadata is implicitly specified",
            ));
        }
    }
    if embedded
        && !preserve
        && props
            .and_then(Value::as_object)
            .is_none_or(|p| p.is_empty())
    {
        errs.push(FieldError::required(&child(path, "properties"), "must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields"));
    }
}

/// A node under `allOf`/`anyOf`/`oneOf`/`not`: value validations only.
fn nested(s: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let Some(m) = s.as_object() else { return };
    for (k, msg) in [
        ("type", "must be empty to be structural"),
        ("additionalProperties", "must be undefined to be structural"),
        ("default", "must be undefined to be structural"),
        ("title", "must be empty to be structural"),
        ("description", "must be empty to be structural"),
        (
            "x-kubernetes-list-map-keys",
            "must be empty to be structural",
        ),
        (
            "x-kubernetes-list-type",
            "must be undefined to be structural",
        ),
    ] {
        if m.contains_key(k) {
            errs.push(FieldError::forbidden(&child(path, k), msg));
        }
    }
    for k in [
        "nullable",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-int-or-string",
    ] {
        if flag(s, k) {
            errs.push(FieldError::forbidden(
                &child(path, k),
                "must be false to be structural",
            ));
        }
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        if props.contains_key("metadata") {
            errs.push(FieldError::forbidden(
                &key(&child(path, "properties"), "metadata"),
                "must not be specified in a nested context",
            ));
        }
        for (k, v) in props {
            nested(v, &key(&child(path, "properties"), k), errs);
        }
    }
    if let Some(items) = m.get("items") {
        nested(items, &child(path, "items"), errs);
    }
    for junctor in ["allOf", "anyOf", "oneOf"] {
        for (i, v) in m
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            nested(v, &index(&child(path, junctor), i), errs);
        }
    }
}

/// Every `default` must itself be valid against its node.
fn defaults(s: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let Some(m) = s.as_object() else { return };
    if let Some(d) = m.get("default")
        && let Ok(node) = Node::compile(s, path)
    {
        let mut found = Vec::new();
        validate::validate(d, &node, "", &mut found);
        for mut e in found {
            let p = child(path, "default");
            e.field = if e.field == "<nil>" {
                p
            } else {
                format!("{p}.{}", e.field)
            };
            e.detail = e.detail.trim_start().to_string();
            errs.push(e);
        }
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            defaults(v, &key(&child(path, "properties"), k), errs);
        }
    }
    for k in ["items", "additionalProperties"] {
        if let Some(v) = m.get(k) {
            defaults(v, &child(path, k), errs);
        }
    }
}

/// Validates a CRD as the real server does before storing it; an empty
/// list means it is acceptable.
pub fn validate_crd(crd: &CustomResourceDefinition) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &crd.spec;
    let name = crd.metadata.name.as_deref().unwrap_or("");
    let want = format!("{}.{}", spec.names.plural, spec.group);
    if name != want {
        errs.push(FieldError::invalid(
            "metadata.name",
            json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    if spec.group.is_empty() {
        errs.push(FieldError::required("spec.group", ""));
    } else if !spec.group.contains('.') {
        errs.push(FieldError::invalid(
            "spec.group",
            json!(spec.group),
            "should be a domain with at least one dot",
        ));
    }
    if spec.scope != "Namespaced" && spec.scope != "Cluster" {
        errs.push(FieldError::not_supported(
            "spec.scope",
            json!(spec.scope),
            &["Cluster".into(), "Namespaced".into()],
        ));
    }
    for (f, v) in [
        ("spec.names.plural", &spec.names.plural),
        ("spec.names.kind", &spec.names.kind),
    ] {
        if v.is_empty() {
            errs.push(FieldError::required(f, ""));
        }
    }
    if spec.versions.is_empty() {
        errs.push(FieldError::invalid(
            "spec.versions",
            json!([]),
            "must have exactly one version marked as storage version",
        ));
    } else if spec.versions.iter().filter(|v| v.storage).count() != 1 {
        errs.push(FieldError::invalid(
            "spec.versions",
            json!(spec.versions.iter().map(|v| &v.name).collect::<Vec<_>>()),
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in spec.versions.iter().enumerate() {
        let vp = index("spec.versions", i);
        for (j, col) in v.additional_printer_columns.iter().flatten().enumerate() {
            let cp = index(&child(&vp, "additionalPrinterColumns"), j);
            if col.name.is_empty() {
                errs.push(FieldError::required(&child(&cp, "name"), ""));
            }
            const TYPES: [&str; 5] = ["integer", "number", "string", "boolean", "date"];
            if !TYPES.contains(&col.type_.as_str()) {
                let supported: Vec<String> = TYPES.iter().map(|t| t.to_string()).collect();
                errs.push(FieldError::not_supported(
                    &child(&cp, "type"),
                    json!(col.type_),
                    &supported,
                ));
            }
            if !col.json_path.starts_with('.')
                || crate::apiserver::table::jsonpath::JsonPath::parse(&col.json_path).is_err()
            {
                errs.push(FieldError::invalid(
                    &child(&cp, "jsonPath"),
                    json!(col.json_path),
                    "must be a simple json path starting with .",
                ));
            }
        }
        let schema = v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok());
        let sp = child(&child(&vp, "schema"), "openAPIV3Schema");
        let Some(schema) = schema else {
            errs.push(FieldError::required(&sp, "schemas are required"));
            continue;
        };
        let before = errs.len();
        structural(&schema, Level::Root, &sp, &mut errs);
        defaults(&schema, &sp, &mut errs);
        if errs.len() == before {
            match super::Validator::from_schema(&schema) {
                Err(SchemaError::Rule(e)) => errs.push(FieldError::invalid(
                    &child(&sp, "x-kubernetes-validations"),
                    json!(""),
                    format!("compilation failed: {e}"),
                )),
                Err(e) => errs.push(FieldError::invalid(&sp, json!(""), e.to_string())),
                Ok(_) => {}
            }
        }
    }
    errs.sort_by_key(ToString::to_string);
    errs
}
