//! Policies and bindings compiled from their stored JSON, and the check of
//! a policy or binding when it is written (422 on what Kubernetes refuses).

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube_cel::cel::Program;
use serde_json::Value;

use super::eval::{self, Outcome, RequestAttributes};
use super::{BINDINGS, GROUP, POLICIES};
use crate::apiserver::error::{ApiError, Cause};
use crate::apiserver::objmeta::{meta_str, subject};
use crate::apiserver::resources::ResourceInfo;

/// What a binding does with a failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refuse the request.
    Deny,
    /// Admit with a `Warning` header.
    Warn,
    /// Record in the audit log (this server has none: nothing happens).
    Audit,
}

/// A failed validation (or configuration / evaluation error under
/// `failurePolicy: Fail`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The request is refused by this validation.
    Deny {
        /// The message.
        message: String,
        /// The StatusReason.
        reason: String,
    },
}

/// A CEL expression and its program (or why it did not compile).
#[derive(Debug)]
pub struct Expr {
    /// The source.
    pub source: String,
    /// The program.
    pub program: Result<Program, String>,
}

impl Expr {
    fn new(source: &str) -> Self {
        Self {
            source: source.to_string(),
            program: Program::compile(source).map_err(|e| e.to_string()),
        }
    }
}

impl std::fmt::Debug for CompiledValidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledValidation")
            .field("expression", &self.expression.source)
            .finish_non_exhaustive()
    }
}

/// One `spec.validations[]` entry.
pub struct CompiledValidation {
    /// `expression`.
    pub expression: Expr,
    /// `message`.
    pub message: String,
    /// `messageExpression`.
    pub message_expression: Option<Expr>,
    /// `reason` (default Invalid).
    pub reason: String,
}

/// A compiled ValidatingAdmissionPolicy and its bindings.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `failurePolicy: Ignore`.
    pub ignore_failures: bool,
    /// `matchConstraints` (empty: matches nothing, as it is required).
    pub match_constraints: MatchResources,
    /// `matchConditions` (name, expression).
    pub match_conditions: Vec<(String, Expr)>,
    /// `variables` (name, expression).
    pub variables: Vec<(String, Expr)>,
    /// `validations`.
    pub validations: Vec<CompiledValidation>,
    /// Why the policy cannot be used (failurePolicy decides), if it cannot.
    pub config_error: Option<String>,
    /// The bindings naming this policy, by name.
    pub bindings: Vec<CompiledBinding>,
}

/// A compiled ValidatingAdmissionPolicyBinding.
#[derive(Debug)]
pub struct CompiledBinding {
    /// `metadata.name`.
    pub name: String,
    /// `spec.policyName`.
    pub policy_name: String,
    /// `spec.matchResources` (None: everything the policy matches).
    pub match_resources: Option<MatchResources>,
    /// `spec.validationActions`.
    pub actions: Vec<Action>,
}

impl CompiledPolicy {
    /// Compile a stored policy. A policy that does not decode is kept as a
    /// configuration error (it cannot be stored: [`check_definition`]).
    pub fn new(obj: &Value) -> Self {
        let name = meta_str(obj, "name").unwrap_or("").to_string();
        let mut p = CompiledPolicy {
            name,
            ignore_failures: false,
            match_constraints: MatchResources::default(),
            match_conditions: Vec::new(),
            variables: Vec::new(),
            validations: Vec::new(),
            config_error: None,
            bindings: Vec::new(),
        };
        let policy: ValidatingAdmissionPolicy = match serde_json::from_value(obj.clone()) {
            Ok(v) => v,
            Err(e) => {
                p.config_error = Some(format!("failed to configure policy: {e}"));
                return p;
            }
        };
        let spec = policy.spec.unwrap_or_default();
        p.ignore_failures = spec.failure_policy.as_deref() == Some("Ignore");
        p.match_constraints = spec.match_constraints.unwrap_or_default();
        p.match_conditions = spec
            .match_conditions
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.name, Expr::new(&c.expression)))
            .collect();
        p.variables = spec
            .variables
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.name, Expr::new(&v.expression)))
            .collect();
        p.validations = spec
            .validations
            .unwrap_or_default()
            .into_iter()
            .map(|v| CompiledValidation {
                expression: Expr::new(&v.expression),
                message: v.message.unwrap_or_default(),
                message_expression: v
                    .message_expression
                    .filter(|m| !m.is_empty())
                    .map(|m| Expr::new(&m)),
                reason: v.reason.unwrap_or_else(|| "Invalid".into()),
            })
            .collect();
        if spec.param_kind.is_some() {
            p.config_error = Some(
                "failed to configure binding: paramKind is not supported by this API server".into(),
            );
        }
        p
    }

    /// The failed validations of one matching binding, in order.
    pub fn decide(&self, attrs: &RequestAttributes, namespace: Option<&Value>) -> Vec<Decision> {
        let fail = |message: String| {
            if self.ignore_failures {
                Vec::new()
            } else {
                vec![Decision::Deny {
                    message,
                    reason: "Invalid".into(),
                }]
            }
        };
        if let Some(e) = &self.config_error {
            return fail(e.clone());
        }
        let mut scope = eval::Scope::new(attrs, namespace);
        match scope.match_conditions(&self.match_conditions) {
            Outcome::False => return Vec::new(),
            Outcome::Error(e) => return fail(e),
            Outcome::True => {}
        }
        scope.bind_variables(&self.variables);
        let mut out = Vec::new();
        for v in &self.validations {
            match scope.validate(v) {
                Ok(None) => {}
                Ok(Some(message)) => out.push(Decision::Deny {
                    message,
                    reason: v.reason.clone(),
                }),
                Err(e) => out.extend(fail(e)),
            }
        }
        out
    }
}

impl CompiledBinding {
    /// Compile a stored binding.
    pub fn new(obj: &Value) -> Self {
        let name = meta_str(obj, "name").unwrap_or("").to_string();
        let binding: Option<ValidatingAdmissionPolicyBinding> =
            serde_json::from_value(obj.clone()).ok();
        let spec = binding.map(|b| b.spec).unwrap_or_default();
        let actions = spec
            .validation_actions
            .iter()
            .filter_map(|a| match a.as_str() {
                "Deny" => Some(Action::Deny),
                "Warn" => Some(Action::Warn),
                "Audit" => Some(Action::Audit),
                _ => None,
            })
            .collect();
        Self {
            name,
            policy_name: spec.policy_name,
            match_resources: spec.match_resources,
            actions,
        }
    }
}

fn invalid(field: String, value: &str, why: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message: format!("Invalid value: {value:?}: {why}"),
        field,
    }
}

fn unsupported(field: String, value: &str, allowed: &[&str]) -> Cause {
    let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    Cause {
        reason: "FieldValueNotSupported".into(),
        message: format!(
            "Unsupported value: {value:?}: supported values: {}",
            list.join(", ")
        ),
        field,
    }
}

fn required(field: &str, why: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired".into(),
        message: format!("Required value: {why}"),
        field: field.into(),
    }
}

fn compile_cause(field: String, source: &str) -> Option<Cause> {
    Program::compile(source)
        .err()
        .map(|e| invalid(field, source, &format!("compilation failed: {e}")))
}

const OPERATIONS: &[&str] = &["*", "CREATE", "UPDATE", "DELETE", "CONNECT"];

fn rule_causes(m: &MatchResources, path: &str) -> Vec<Cause> {
    let mut out = Vec::new();
    let lists = [
        ("resourceRules", &m.resource_rules),
        ("excludeResourceRules", &m.exclude_resource_rules),
    ];
    for (list, rules) in lists {
        for (i, r) in rules.iter().flatten().enumerate() {
            for (j, op) in r.operations.iter().flatten().enumerate() {
                if !OPERATIONS.contains(&op.as_str()) {
                    out.push(unsupported(
                        format!("{path}.{list}[{i}].operations[{j}]"),
                        op,
                        &OPERATIONS[1..],
                    ));
                }
            }
            if let Some(s) = &r.scope
                && !["*", "Cluster", "Namespaced"].contains(&s.as_str())
            {
                out.push(unsupported(
                    format!("{path}.{list}[{i}].scope"),
                    s,
                    &["*", "Cluster", "Namespaced"],
                ));
            }
        }
    }
    out
}

fn policy_causes(obj: &Value) -> Result<Vec<Cause>, String> {
    let policy: ValidatingAdmissionPolicy =
        serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let spec = policy.spec.unwrap_or_default();
    let mut out = Vec::new();
    if let Some(f) = &spec.failure_policy
        && f != "Fail"
        && f != "Ignore"
    {
        out.push(unsupported(
            "spec.failurePolicy".into(),
            f,
            &["Fail", "Ignore"],
        ));
    }
    match &spec.match_constraints {
        None => out.push(required("spec.matchConstraints", "")),
        Some(m) => {
            if m.resource_rules.as_ref().is_none_or(Vec::is_empty) {
                out.push(required("spec.matchConstraints.resourceRules", ""));
            }
            out.extend(rule_causes(m, "spec.matchConstraints"));
        }
    }
    for (i, c) in spec.match_conditions.iter().flatten().enumerate() {
        out.extend(compile_cause(
            format!("spec.matchConditions[{i}].expression"),
            &c.expression,
        ));
    }
    for (i, v) in spec.variables.iter().flatten().enumerate() {
        out.extend(compile_cause(
            format!("spec.variables[{i}].expression"),
            &v.expression,
        ));
    }
    let validations = spec.validations.unwrap_or_default();
    if validations.is_empty() && spec.audit_annotations.as_ref().is_none_or(Vec::is_empty) {
        out.push(required(
            "spec.validations",
            "validations or auditAnnotations must contain at least one item",
        ));
    }
    for (i, v) in validations.iter().enumerate() {
        out.extend(compile_cause(
            format!("spec.validations[{i}].expression"),
            &v.expression,
        ));
        if let Some(m) = v.message_expression.as_deref().filter(|m| !m.is_empty()) {
            out.extend(compile_cause(
                format!("spec.validations[{i}].messageExpression"),
                m,
            ));
        }
        if let Some(r) = &v.reason {
            const REASONS: &[&str] = &[
                "Unauthorized",
                "Forbidden",
                "Invalid",
                "RequestEntityTooLarge",
            ];
            if !REASONS.contains(&r.as_str()) {
                out.push(unsupported(
                    format!("spec.validations[{i}].reason"),
                    r,
                    REASONS,
                ));
            }
        }
    }
    Ok(out)
}

fn binding_causes(obj: &Value) -> Result<Vec<Cause>, String> {
    let binding: ValidatingAdmissionPolicyBinding =
        serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let spec = binding.spec;
    let mut out = Vec::new();
    if spec.policy_name.is_empty() {
        out.push(required("spec.policyName", ""));
    }
    let actions = &spec.validation_actions;
    if actions.is_empty() {
        out.push(required("spec.validationActions", ""));
    }
    for (i, a) in actions.iter().enumerate() {
        if !["Deny", "Warn", "Audit"].contains(&a.as_str()) {
            out.push(unsupported(
                format!("spec.validationActions[{i}]"),
                a,
                &["Audit", "Deny", "Warn"],
            ));
        } else if actions[..i].contains(a) {
            out.push(Cause {
                reason: "FieldValueDuplicate".into(),
                message: format!("Duplicate value: {a:?}"),
                field: format!("spec.validationActions[{i}]"),
            });
        }
    }
    if actions.iter().any(|a| a == "Deny") && actions.iter().any(|a| a == "Warn") {
        out.push(invalid(
            "spec.validationActions".into(),
            &actions.join(", "),
            "must not contain both Deny and Warn (repeating the same validation failure information in the API response and headers serves no purpose)",
        ));
    }
    if let Some(m) = &spec.match_resources {
        out.extend(rule_causes(m, "spec.matchResources"));
    }
    Ok(out)
}

/// Check a ValidatingAdmissionPolicy or Binding about to be stored: 422
/// with the fields Kubernetes would refuse (expressions that do not
/// compile, unknown enums, missing required fields).
pub fn check_definition(info: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    if info.group != GROUP {
        return Ok(());
    }
    let causes = match info.plural.as_str() {
        POLICIES => policy_causes(obj),
        BINDINGS => binding_causes(obj),
        _ => return Ok(()),
    }
    .map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        ))
    })?;
    if causes.is_empty() {
        return Ok(());
    }
    let name = meta_str(obj, "name").unwrap_or("");
    Err(ApiError::invalid(&info.kind, &subject(info, name), causes))
}
