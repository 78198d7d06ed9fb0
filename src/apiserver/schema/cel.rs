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
use super::node::{Additional, Node};

/// The compiled rules of one schema.
pub(crate) struct CelRules {
    compiled: kube_cel::CompiledSchema,
    /// rule text → the type of the schema node declaring it (the bad value
    /// the real server prints).
    rule_types: HashMap<String, String>,
}

impl std::fmt::Debug for CelRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelRules")
            .field("rules", &self.rule_types.len())
            .finish()
    }
}

fn collect_rule_types(n: &Node, out: &mut HashMap<String, String>) {
    for (rule, _) in &n.rules {
        out.insert(rule.clone(), n.type_name().to_string());
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
        }))
    }

    /// Evaluates the rules against `obj` (and `old` on update).
    pub(crate) fn validate(&self, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let Err(errors) = kube_cel::validate_compiled(&self.compiled, obj, old) else {
            return Vec::new();
        };
        errors
            .iter()
            .map(|e| {
                let ty = self
                    .rule_types
                    .get(&e.rule)
                    .cloned()
                    .unwrap_or_else(|| "object".to_string());
                let field = e.field_path.as_str();
                match e.kind {
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
                    _ => FieldError::invalid(field, json!(ty), e.message.clone()),
                }
            })
            .collect()
    }
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
