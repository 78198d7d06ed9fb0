//! `x-kubernetes-validations` rules, compiled once with kube-cel (the `cel`
//! crate plus the Kubernetes CEL libraries) and evaluated with `self` bound
//! to each node's value and, for transition rules on update, `oldSelf` to
//! the old value. Failures become field errors as apiextensions reports
//! them: `<path>: Invalid value: "<schema type>": <message>`, or the kind the
//! rule's `reason` names.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::SchemaError;
use super::field::{FieldError, FieldErrorKind};
use super::node::{Additional, Node, RuleMeta};

/// The compiled rules of one schema.
pub(crate) struct CelRules {
    compiled: kube_cel::CompiledSchema,
    /// rule text → the type of the schema node declaring it (the bad value
    /// the real server prints) and the rule's `fieldPath`.
    rule_types: HashMap<String, (String, RuleMeta)>,
    /// Whether the schema has `x-kubernetes-list-type: map` lists, whose
    /// items need `oldSelf` matched by key.
    pub(crate) has_map_lists: bool,
}

fn has_map_lists(n: &Node) -> bool {
    n.list_type.as_deref() == Some("map")
        || n.properties.values().any(has_map_lists)
        || matches!(&n.additional, Some(Additional::Schema(a)) if has_map_lists(a))
        || n.items.as_deref().is_some_and(has_map_lists)
}

impl std::fmt::Debug for CelRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelRules")
            .field("rules", &self.rule_types.len())
            .finish()
    }
}

fn collect_rule_types(n: &Node, out: &mut HashMap<String, (String, RuleMeta)>) {
    for r in &n.rules {
        out.insert(r.rule.clone(), (n.type_name().to_string(), r.clone()));
    }
    for p in n.properties.values() {
        collect_rule_types(p, out);
    }
    if let Some(Additional::Schema(a)) = &n.additional {
        collect_rule_types(a, out);
    }
    if let Some(i) = &n.items {
        collect_rule_types(i, out);
    }
    for b in n.all_of.iter().chain(&n.any_of).chain(&n.one_of) {
        collect_rule_types(b, out);
    }
}

impl CelRules {
    /// Compiles every rule of `schema`; `None` when it has none.
    pub(crate) fn compile(schema: &Value, root: &Node) -> Result<Option<Self>, SchemaError> {
        let mut rule_types = HashMap::new();
        collect_rule_types(root, &mut rule_types);
        if rule_types.is_empty() {
            return Ok(None);
        }
        let compiled = kube_cel::compile_schema(schema);
        if let Some(e) = compiled_errors(&compiled).into_iter().next() {
            return Err(SchemaError::Rule(e));
        }
        Ok(Some(Self {
            compiled,
            rule_types,
            has_map_lists: has_map_lists(root),
        }))
    }

    /// Evaluates the rules against `obj` (and `old` on update), returning
    /// each failure with the path of the schema node that declares the rule.
    pub(crate) fn validate(&self, obj: &Value, old: Option<&Value>) -> Vec<(FieldError, String)> {
        let Err(errors) = kube_cel::validate_compiled(&self.compiled, obj, old) else {
            return Vec::new();
        };
        errors
            .iter()
            .map(|e| {
                let (ty, meta) = self
                    .rule_types
                    .get(&e.rule)
                    .cloned()
                    .unwrap_or_else(|| ("object".to_string(), RuleMeta::default()));
                let field = e.field_path.as_str();
                let node = declaring_path(field, meta.field_path.as_deref());
                let error = match e.kind {
                    kube_cel::ErrorKind::ValidationFailure => {
                        match e
                            .reason
                            .as_deref()
                            .and_then(FieldErrorKind::from_rule_reason)
                        {
                            Some(FieldErrorKind::Forbidden) => {
                                FieldError::forbidden(field, e.message.clone())
                            }
                            Some(FieldErrorKind::Required) => {
                                FieldError::required(field, e.message.clone())
                            }
                            Some(FieldErrorKind::Duplicate) => {
                                FieldError::duplicate(field, json!(ty))
                            }
                            _ => FieldError::invalid(field, json!(ty), e.message.clone()),
                        }
                    }
                    kube_cel::ErrorKind::EvaluationError => {
                        FieldError::invalid(field, json!(ty), evaluation_detail(e, &meta))
                    }
                    _ => FieldError::invalid(field, json!(ty), e.message.clone()),
                };
                (error, node)
            })
            .collect()
    }
}

/// apiextensions' text for a rule that failed to evaluate:
/// `no such key: limit evaluating rule: <message or rule>`.
fn evaluation_detail(e: &kube_cel::ValidationError, meta: &RuleMeta) -> String {
    use kube_cel::cel::ExecutionError as X;
    let rule = match meta.message.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => e.rule.trim().to_string(),
    };
    let cause = std::error::Error::source(e).and_then(|s| s.downcast_ref::<X>());
    let what = match cause {
        Some(X::NoSuchKey(k)) => format!("no such key: {k}"),
        Some(X::IndexOutOfBounds(i)) => format!("index out of bounds: {i:?}"),
        Some(X::DivisionByZero(_)) => "division by zero".to_string(),
        Some(X::RemainderByZero(_)) => "modulus by zero".to_string(),
        Some(X::Overflow(..)) => "integer overflow".to_string(),
        Some(X::NoSuchOverload) => {
            return format!(
                "'no such overload': call arguments did not match a supported operator, function or macro signature for rule: {rule}"
            );
        }
        Some(other) => other.to_string(),
        None => e.message.clone(),
    };
    format!("{what} evaluating rule: {rule}")
}

/// The path of the node declaring a rule, from the path an error was
/// reported at and the rule's `fieldPath`.
fn declaring_path(reported: &str, field_path: Option<&str>) -> String {
    let Some(fp) = field_path else {
        return reported.to_string();
    };
    let fp = fp.strip_prefix('.').unwrap_or(fp);
    reported
        .strip_suffix(fp)
        .map(|p| p.strip_suffix('.').unwrap_or(p).to_string())
        .unwrap_or_else(|| reported.to_string())
}

/// The compile errors anywhere in the tree, as text.
fn compiled_errors(c: &kube_cel::CompiledSchema) -> Vec<String> {
    let mut out: Vec<String> = c
        .compilation_errors()
        .into_iter()
        .map(|e| format!("{e:?}"))
        .collect();
    for p in c.properties.values() {
        out.extend(compiled_errors(p));
    }
    for b in [&c.items, &c.additional_properties].into_iter().flatten() {
        out.extend(compiled_errors(b));
    }
    for b in c.all_of.iter().chain(&c.one_of).chain(&c.any_of) {
        out.extend(compiled_errors(b));
    }
    out
}
