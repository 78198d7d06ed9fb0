//! ValidatingAdmissionPolicy and ValidatingAdmissionPolicyBinding
//! (`admissionregistration.k8s.io/v1`): CEL checks on writes, enforced after
//! schema validation and before storage, with kube-apiserver's semantics.
//!
//! ```text
//!  write (create / update / patch / status / delete)
//!    └─ admission::admit ─► Admission::check(request, object, oldObject)
//!         for each policy (by name) whose matchConstraints match:
//!           for each binding naming it (by name) whose matchResources match:
//!             matchConditions ── any false ─► skip; error ─► failurePolicy
//!             variables (in order) ─► validations:
//!               true ─► admit
//!               false ─► message / messageExpression, reason (Invalid)
//!               error ─► failurePolicy (Fail: deny, Ignore: admit)
//!             binding validationActions: Deny ─► refuse · Warn ─► `Warning`
//!    first denial ─► Status {code by reason (422 Invalid, 403 Forbidden, ...),
//!      "<res>.<group> \"<name>\" is forbidden: ValidatingAdmissionPolicy
//!       '<policy>' with binding '<binding>' denied request: <message>"}
//! ```
//!
//! The compiled set is cached per server ([`PolicyCache`]) and rebuilt when
//! any policy or binding changes (their keys and resourceVersions are the
//! fingerprint). Policies are checked when they are written: expressions
//! that do not compile and invalid enums are a 422, as in Kubernetes.
//!
//! Differences from kube-apiserver, all absent rather than approximated:
//! `paramKind`/`paramRef` (a binding of a policy with `paramKind` is a
//! configuration error, handled by `failurePolicy`), `auditAnnotations` and
//! the `Audit` action (no audit log), the `authorizer` variable, CEL type
//! checking at write time and cost budgets, `matchPolicy: Equivalent`
//! conversion (each resource is served in one version), and the
//! `status.typeChecking` the real server reports.

mod eval;
mod matching;
mod spec;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

pub use eval::{RequestAttributes, to_cel};
pub use spec::check_definition;

use super::error::ApiError;
use super::http::ResourceRequest;
use super::objmeta::{meta_str, present};
use super::resources::ResourceInfo;
use super::store::{self, Store};
use spec::{Action, CompiledBinding, CompiledPolicy, Decision};

/// The API group of the policy resources.
pub const GROUP: &str = "admissionregistration.k8s.io";
/// The policies' plural.
pub const POLICIES: &str = "validatingadmissionpolicies";
/// The bindings' plural.
pub const BINDINGS: &str = "validatingadmissionpolicybindings";

/// Every policy with the bindings that name it, compiled.
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<CompiledPolicy>,
}

impl PolicySet {
    /// Compile policies and bindings (their stored JSON). Bindings naming no
    /// existing policy do nothing, as in Kubernetes.
    pub fn compile(policies: &[Value], bindings: &[Value]) -> Self {
        let mut compiled: Vec<CompiledPolicy> = policies.iter().map(CompiledPolicy::new).collect();
        compiled.sort_by(|a, b| a.name.cmp(&b.name));
        let mut bindings: Vec<CompiledBinding> =
            bindings.iter().map(CompiledBinding::new).collect();
        bindings.sort_by(|a, b| a.name.cmp(&b.name));
        for b in bindings {
            if let Some(p) = compiled.iter_mut().find(|p| p.name == b.policy_name) {
                p.bindings.push(b);
            }
        }
        Self { policies: compiled }
    }

    /// Whether no binding is in force (nothing to check).
    pub fn is_empty(&self) -> bool {
        self.policies.iter().all(|p| p.bindings.is_empty())
    }

    /// Judge one request. `namespace` looks up a Namespace object by name
    /// (for `namespaceSelector` and `namespaceObject`). Returns the
    /// `Warning`s of `Warn` bindings, or the first denial.
    pub fn validate(
        &self,
        attrs: &RequestAttributes,
        namespace: &dyn Fn(&str) -> Option<Value>,
    ) -> Result<Vec<String>, Denial> {
        if self.is_empty() || attrs.group == GROUP {
            // Kubernetes exempts the admission configuration resources, so
            // a bad policy can always be fixed.
            return Ok(Vec::new());
        }
        let ns_object = if attrs.namespace.is_empty() {
            None
        } else {
            namespace(attrs.namespace)
        };
        let ns_labels = if attrs.group.is_empty() && attrs.resource == "namespaces" {
            attrs.object.or(attrs.old_object).cloned()
        } else {
            ns_object.clone()
        };
        let mut warnings = Vec::new();
        for policy in &self.policies {
            if policy.bindings.is_empty()
                || !matching::matches(&policy.match_constraints, attrs, ns_labels.as_ref(), true)
            {
                continue;
            }
            // Without params every binding sees the same evaluation.
            let mut decisions: Option<Vec<Decision>> = None;
            for binding in &policy.bindings {
                if let Some(m) = &binding.match_resources
                    && !matching::matches(m, attrs, ns_labels.as_ref(), false)
                {
                    continue;
                }
                let decided =
                    decisions.get_or_insert_with(|| policy.decide(attrs, ns_object.as_ref()));
                for Decision::Deny { message, reason } in decided.iter() {
                    for action in &binding.actions {
                        match action {
                            Action::Deny => {
                                return Err(Denial {
                                    policy: policy.name.clone(),
                                    binding: binding.name.clone(),
                                    message: message.clone(),
                                    reason: reason.clone(),
                                });
                            }
                            Action::Warn => warnings.push(format!(
                                "Validation failed for ValidatingAdmissionPolicy '{}' with binding '{}': {message}",
                                policy.name, binding.name
                            )),
                            Action::Audit => {}
                        }
                    }
                }
            }
        }
        Ok(warnings)
    }
}

/// A request refused by a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The policy.
    pub policy: String,
    /// The binding.
    pub binding: String,
    /// Why (the validation's message).
    pub message: String,
    /// The `metav1.StatusReason` (`Invalid` unless the validation says).
    pub reason: String,
}

impl Denial {
    /// The text kube-apiserver puts in the Status cause.
    pub fn cause(&self) -> String {
        format!(
            "ValidatingAdmissionPolicy '{}' with binding '{}' denied request: {}",
            self.policy, self.binding, self.message
        )
    }

    /// The HTTP code of `reason`, as kube-apiserver maps it.
    pub fn code(&self) -> u16 {
        match self.reason.as_str() {
            "Forbidden" => 403,
            "Unauthorized" => 401,
            "RequestEntityTooLarge" => 413,
            _ => 422,
        }
    }

    /// The error response: admission's "forbidden" wording with the
    /// validation's reason and code (kube-apiserver's `admission.NewForbidden`
    /// with the reason and code replaced).
    pub fn into_error(self, group: &str, resource: &str, name: &str) -> ApiError {
        let cause = self.cause();
        let qualified = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        let mut details = json!({"kind": resource, "causes": [{"message": cause}]});
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        if !name.is_empty() {
            details["name"] = json!(name);
        }
        let message = if name.is_empty() {
            format!("{qualified} is forbidden: {cause}")
        } else {
            format!("{qualified} \"{name}\" is forbidden: {cause}")
        };
        ApiError::from_status(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": self.reason,
            "details": details,
            "code": self.code(),
        }))
    }
}

/// The storage keys and resourceVersions of every policy and binding.
type Fingerprint = Vec<(String, String)>;

/// The compiled policies of one server, rebuilt when they change.
#[derive(Default)]
pub struct PolicyCache {
    current: Mutex<Option<(Fingerprint, Arc<PolicySet>)>>,
}

impl PolicyCache {
    /// The policies in force now, with `store` for namespace look-ups.
    pub fn admission(&self, store: &Store) -> Admission {
        let (policies, _) = store.list(&store::prefix(GROUP, POLICIES, ""), None);
        let (bindings, _) = store.list(&store::prefix(GROUP, BINDINGS, ""), None);
        let fingerprint: Fingerprint = policies
            .iter()
            .chain(bindings.iter())
            .map(|(k, v)| {
                (
                    k.clone(),
                    meta_str(v, "resourceVersion").unwrap_or("").to_string(),
                )
            })
            .collect();
        let mut guard = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = match &*guard {
            Some((fp, set)) if *fp == fingerprint => set.clone(),
            _ => {
                let p: Vec<Value> = policies.iter().map(|(_, v)| (**v).clone()).collect();
                let b: Vec<Value> = bindings.iter().map(|(_, v)| (**v).clone()).collect();
                let set = Arc::new(PolicySet::compile(&p, &b));
                *guard = Some((fingerprint, set.clone()));
                set
            }
        };
        Admission {
            set,
            store: store.clone(),
        }
    }
}

/// The policies one request is judged by. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    set: Arc<PolicySet>,
    store: Store,
}

impl Admission {
    /// Judge a write of `object` (None for DELETE) over `old` (None for
    /// CREATE) by the request `rr`; returns `Warning`s or the denial.
    pub fn check(
        &self,
        rr: &ResourceRequest,
        info: &ResourceInfo,
        object: Option<&Value>,
        old: Option<&Value>,
    ) -> Result<Vec<String>, ApiError> {
        if self.set.is_empty() {
            return Ok(Vec::new());
        }
        let operation = match (object, old) {
            (None, _) => "DELETE",
            (Some(_), None) => "CREATE",
            (Some(_), Some(_)) => "UPDATE",
        };
        let old_view = old.map(|o| present(info, o));
        let name = rr
            .name
            .clone()
            .or_else(|| {
                object
                    .or(old)
                    .and_then(|o| meta_str(o, "name"))
                    .map(String::from)
            })
            .unwrap_or_default();
        let attrs = RequestAttributes {
            operation,
            group: &info.group,
            version: &info.version,
            resource: &info.plural,
            kind: &info.kind,
            subresource: rr.subresource.as_deref().unwrap_or(""),
            name: &name,
            namespace: &rr.namespace,
            identity: &rr.identity,
            dry_run: rr.dry_run(),
            object,
            old_object: old_view.as_ref(),
        };
        let lookup = |ns: &str| {
            self.store
                .get(&store::key("", "namespaces", "", ns))
                .map(|v| (*v).clone())
        };
        self.set.validate(&attrs, &lookup).map_err(|d| {
            let shown = if name.is_empty() {
                object
                    .and_then(|o| o.pointer("/metadata/generateName"))
                    .and_then(Value::as_str)
                    .filter(|g| !g.is_empty())
                    .unwrap_or("Unknown")
            } else {
                &name
            };
            d.into_error(&info.group, &info.plural, shown)
        })
    }
}
