//! The compiled form of a structural `openAPIV3Schema`: one [`Node`] per
//! schema node with its value validations pre-parsed (patterns compiled once).

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::Value;

use super::SchemaError;

/// `additionalProperties` of an object node.
#[derive(Debug)]
pub(crate) enum Additional {
    /// `additionalProperties: false`.
    Deny,
    /// `additionalProperties: true`: any value is kept.
    Any,
    /// `additionalProperties: {schema}`: a map whose values follow the schema.
    Schema(Box<Node>),
}

/// What the error texts need of one `x-kubernetes-validations` rule.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleMeta {
    pub rule: String,
    pub field_path: Option<String>,
    pub message: Option<String>,
}

/// One compiled schema node.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub ty: Option<String>,
    pub format: Option<String>,
    pub properties: BTreeMap<String, Node>,
    pub additional: Option<Additional>,
    pub items: Option<Box<Node>>,
    pub enum_values: Option<Vec<Value>>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: bool,
    pub exclusive_maximum: bool,
    pub multiple_of: Option<f64>,
    pub min_length: Option<i64>,
    pub max_length: Option<i64>,
    pub pattern: Option<(String, Regex)>,
    pub min_items: Option<i64>,
    pub max_items: Option<i64>,
    pub unique_items: bool,
    pub min_properties: Option<i64>,
    pub max_properties: Option<i64>,
    pub required: Vec<String>,
    pub nullable: bool,
    pub default: Option<Value>,
    pub preserve_unknown: bool,
    pub embedded_resource: bool,
    pub int_or_string: bool,
    pub list_type: Option<String>,
    pub list_map_keys: Vec<String>,
    pub all_of: Vec<Node>,
    pub any_of: Vec<Node>,
    pub one_of: Vec<Node>,
    pub not: Option<Box<Node>>,
    /// This node's `x-kubernetes-validations`.
    pub rules: Vec<RuleMeta>,
}

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn float(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

impl Node {
    /// Compiles a schema given as JSON (a serialized `JSONSchemaProps`).
    pub(crate) fn compile(v: &Value, path: &str) -> Result<Node, SchemaError> {
        let Some(obj) = v.as_object() else {
            return Ok(Node::default());
        };
        let mut n = Node {
            ty: obj.get("type").and_then(Value::as_str).map(str::to_string),
            format: obj
                .get("format")
                .and_then(Value::as_str)
                .map(str::to_string),
            enum_values: obj.get("enum").and_then(Value::as_array).cloned(),
            minimum: float(v, "minimum"),
            maximum: float(v, "maximum"),
            exclusive_minimum: flag(v, "exclusiveMinimum"),
            exclusive_maximum: flag(v, "exclusiveMaximum"),
            multiple_of: float(v, "multipleOf"),
            min_length: int(v, "minLength"),
            max_length: int(v, "maxLength"),
            min_items: int(v, "minItems"),
            max_items: int(v, "maxItems"),
            unique_items: flag(v, "uniqueItems"),
            min_properties: int(v, "minProperties"),
            max_properties: int(v, "maxProperties"),
            nullable: flag(v, "nullable"),
            default: obj.get("default").cloned(),
            preserve_unknown: flag(v, "x-kubernetes-preserve-unknown-fields"),
            embedded_resource: flag(v, "x-kubernetes-embedded-resource"),
            int_or_string: flag(v, "x-kubernetes-int-or-string"),
            list_type: obj
                .get("x-kubernetes-list-type")
                .and_then(Value::as_str)
                .map(str::to_string),
            ..Node::default()
        };
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            n.required = req
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        if let Some(keys) = obj
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
        {
            n.list_map_keys = keys
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        if let Some(p) = obj.get("pattern").and_then(Value::as_str) {
            let re = Regex::new(p).map_err(|e| SchemaError::Pattern {
                path: path.to_string(),
                pattern: p.to_string(),
                reason: e.to_string(),
            })?;
            n.pattern = Some((p.to_string(), re));
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                let child = Node::compile(s, &format!("{path}.properties[{k}]"))?;
                n.properties.insert(k.clone(), child);
            }
        }
        n.additional = match obj.get("additionalProperties") {
            Some(Value::Bool(false)) => Some(Additional::Deny),
            Some(Value::Bool(true)) => Some(Additional::Any),
            Some(s @ Value::Object(_)) => Some(Additional::Schema(Box::new(Node::compile(
                s,
                &format!("{path}.additionalProperties"),
            )?))),
            _ => None,
        };
        if let Some(items) = obj.get("items") {
            // `items` may be a schema or (not structural, but accepted) an array.
            let first = match items {
                Value::Array(a) => a.first().cloned().unwrap_or(Value::Null),
                other => other.clone(),
            };
            n.items = Some(Box::new(Node::compile(&first, &format!("{path}.items"))?));
        }
        for (key, dst) in [
            ("allOf", &mut n.all_of),
            ("anyOf", &mut n.any_of),
            ("oneOf", &mut n.one_of),
        ] {
            if let Some(arr) = obj.get(key).and_then(Value::as_array) {
                for (i, s) in arr.iter().enumerate() {
                    dst.push(Node::compile(s, &format!("{path}.{key}[{i}]"))?);
                }
            }
        }
        if let Some(s) = obj.get("not") {
            n.not = Some(Box::new(Node::compile(s, &format!("{path}.not"))?));
        }
        if let Some(rules) = obj
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            for r in rules {
                if let Some(rule) = r.get("rule").and_then(Value::as_str) {
                    let text = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
                    n.rules.push(RuleMeta {
                        rule: rule.to_string(),
                        field_path: text("fieldPath"),
                        message: text("message"),
                    });
                }
            }
        }
        Ok(n)
    }

    /// The type name used as the bad value of CEL rule errors (`sts.Type`).
    pub(crate) fn type_name(&self) -> &str {
        self.ty.as_deref().unwrap_or("")
    }
}

/// The JSON type name go-openapi reports for a value.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
