//! The CEL side of a policy: the variables an expression sees (`object`,
//! `oldObject`, `request`, `params`, `namespaceObject`, `variables`) and the
//! evaluation of match conditions, variables and validations, with the
//! Kubernetes extension functions of `kube-cel` (the library the CRD
//! `x-kubernetes-validations` rules run on, in [`crate::apiserver::schema`]).

use std::collections::HashMap;
use std::sync::Arc;

use kube_cel::KubeCelExt;
use kube_cel::cel::objects::{Key, Map};
use kube_cel::cel::{Context, ExecutionError, Value as Cel};
use serde_json::{Value, json};

use super::spec::{CompiledValidation, Expr};
use crate::apiserver::pki::Identity;

/// kube-apiserver's limit on an evaluated `messageExpression`
/// (`celconfig.MaxEvaluatedMessageExpressionSizeBytes`).
const MAX_MESSAGE_BYTES: usize = 5 * 1024;

/// What a policy sees of one request (kube's `admission.Attributes`).
#[derive(Debug, Clone)]
pub struct RequestAttributes<'a> {
    /// `CREATE`, `UPDATE` or `DELETE`.
    pub operation: &'a str,
    /// API group ("" for core).
    pub group: &'a str,
    /// API version.
    pub version: &'a str,
    /// Plural resource.
    pub resource: &'a str,
    /// Kind.
    pub kind: &'a str,
    /// Subresource ("" for the main resource).
    pub subresource: &'a str,
    /// Object name ("" when the server will generate it).
    pub name: &'a str,
    /// Namespace ("" for cluster-scoped).
    pub namespace: &'a str,
    /// Who is asking.
    pub identity: &'a Identity,
    /// `dryRun=All`.
    pub dry_run: bool,
    /// The object after the write (None for DELETE).
    pub object: Option<&'a Value>,
    /// The object before the write (None for CREATE).
    pub old_object: Option<&'a Value>,
}

impl RequestAttributes<'_> {
    /// The `request` variable: an `admission.k8s.io/v1` AdmissionRequest as
    /// JSON, with the same omitted-when-empty fields (so `has()` behaves as
    /// on a real cluster).
    pub fn request(&self) -> Value {
        let gvr = json!({"group": self.group, "version": self.version, "resource": self.resource});
        let gvk = json!({"group": self.group, "version": self.version, "kind": self.kind});
        let mut user = serde_json::Map::new();
        let id = self.identity;
        if !id.user.is_empty() {
            user.insert("username".into(), json!(id.user));
        }
        if !id.uid.is_empty() {
            user.insert("uid".into(), json!(id.uid));
        }
        if !id.groups.is_empty() {
            user.insert("groups".into(), json!(id.groups));
        }
        if !id.extra.is_empty() {
            user.insert("extra".into(), json!(id.extra));
        }
        let options = match self.operation {
            "CREATE" => "CreateOptions",
            "DELETE" => "DeleteOptions",
            _ => "UpdateOptions",
        };
        let mut r = json!({
            "uid": uuid::Uuid::new_v4().to_string(),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "operation": self.operation,
            "userInfo": user,
            "dryRun": self.dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": options},
        });
        for (k, v) in [
            ("subResource", self.subresource),
            ("requestSubResource", self.subresource),
            ("name", self.name),
            ("namespace", self.namespace),
        ] {
            if !v.is_empty() {
                r[k] = json!(v);
            }
        }
        r
    }
}

/// JSON as a CEL value (integers as `int`, as Kubernetes' `int64` fields).
pub fn to_cel(v: &Value) -> Cel {
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Cel::Int(i),
            (None, Some(u)) => Cel::UInt(u),
            _ => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(a) => Cel::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(o) => Cel::Map(Map {
            map: Arc::new(
                o.iter()
                    .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
                    .collect(),
            ),
        }),
    }
}

/// The `namespaceObject` variable: the parts of the Namespace Kubernetes
/// exposes (metadata without managedFields, spec, status).
fn namespace_object(ns: &Value) -> Value {
    let mut meta = ns.get("metadata").cloned().unwrap_or_else(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.remove("managedFields");
    }
    json!({"metadata": meta, "spec": ns.get("spec").cloned().unwrap_or_else(|| json!({})),
           "status": ns.get("status").cloned().unwrap_or_else(|| json!({}))})
}

/// The result of a boolean expression list (match conditions).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All true.
    True,
    /// One was false.
    False,
    /// None was false, some failed.
    Error(String),
}

/// One evaluation's variables.
pub struct Scope {
    ctx: Context<'static>,
    variables: HashMap<Key, Cel>,
    /// Variables whose expression failed, with why.
    failed: Vec<(String, String)>,
}

fn eval_error(source: &str, e: &str) -> String {
    format!("expression '{source}' resulted in error: {e}")
}

impl Scope {
    /// The variables of a request; `namespace` is the request's Namespace.
    pub fn new(attrs: &RequestAttributes, namespace: Option<&Value>) -> Self {
        let mut ctx = Context::default();
        ctx.register_all();
        let obj = attrs.object.map(to_cel).unwrap_or(Cel::Null);
        let old = attrs.old_object.map(to_cel).unwrap_or(Cel::Null);
        ctx.add_variable_from_value("object", obj);
        ctx.add_variable_from_value("oldObject", old);
        ctx.add_variable_from_value("request", to_cel(&attrs.request()));
        ctx.add_variable_from_value("params", Cel::Null);
        let ns = namespace
            .map(|n| to_cel(&namespace_object(n)))
            .unwrap_or(Cel::Null);
        ctx.add_variable_from_value("namespaceObject", ns);
        let mut s = Self {
            ctx,
            variables: HashMap::new(),
            failed: Vec::new(),
        };
        s.publish_variables();
        s
    }

    fn publish_variables(&mut self) {
        let map = Cel::Map(Map {
            map: Arc::new(self.variables.clone()),
        });
        self.ctx.add_variable_from_value("variables", map);
    }

    /// Run `expr`; an error names the expression (and the failed variable
    /// it read, if that is why).
    fn run(&self, expr: &Expr) -> Result<Cel, String> {
        let program = expr
            .program
            .as_ref()
            .map_err(|e| format!("compilation failed: {e}"))?;
        program.execute(&self.ctx).map_err(|e| {
            if let ExecutionError::NoSuchKey(k) = &e
                && let Some((name, why)) = self.failed.iter().find(|(n, _)| n == k.as_str())
            {
                return eval_error(
                    &expr.source,
                    &format!("composited variable \"{name}\" fails to evaluate: {why}"),
                );
            }
            eval_error(&expr.source, &e.to_string())
        })
    }

    /// Evaluate `matchConditions`: false as soon as one is false; an error
    /// only if none is false.
    pub fn match_conditions(&self, conditions: &[(String, Expr)]) -> Outcome {
        let mut errors = Vec::new();
        for (_, c) in conditions {
            match self.run(c) {
                Ok(Cel::Bool(true)) => {}
                Ok(Cel::Bool(false)) => return Outcome::False,
                Ok(other) => errors.push(eval_error(
                    &c.source,
                    &format!("expected a bool, got {:?}", other.type_of()),
                )),
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Outcome::True,
            1 => Outcome::Error(errors.remove(0)),
            _ => Outcome::Error(format!("[{}]", errors.join(", "))),
        }
    }

    /// Evaluate `variables` in order (each sees the ones before it). A
    /// failed variable is left unset; expressions that read it fail.
    pub fn bind_variables(&mut self, variables: &[(String, Expr)]) {
        for (name, expr) in variables {
            match self.run(expr) {
                Ok(v) => {
                    self.variables
                        .insert(Key::String(Arc::new(name.clone())), v);
                    self.publish_variables();
                }
                Err(e) => self.failed.push((name.clone(), e)),
            }
        }
    }

    /// Evaluate one validation: `Ok(None)` if it holds, `Ok(Some(message))`
    /// if not, `Err` if it could not be evaluated.
    pub fn validate(&self, v: &CompiledValidation) -> Result<Option<String>, String> {
        if matches!(self.run(&v.expression)?, Cel::Bool(true)) {
            return Ok(None);
        }
        let evaluated = v
            .message_expression
            .as_ref()
            .and_then(|m| match self.run(m) {
                Ok(Cel::String(s)) => Some(s.trim().to_string()),
                _ => None,
            })
            .filter(|m| !m.is_empty() && m.len() <= MAX_MESSAGE_BYTES && !m.contains('\n'));
        let message = evaluated
            .or_else(|| Some(v.message.trim().to_string()).filter(|m| !m.is_empty()))
            .unwrap_or_else(|| format!("failed expression: {}", v.expression.source.trim()));
        Ok(Some(message))
    }
}
