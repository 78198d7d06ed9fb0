//! Status conditions shared by several writers.
//!
//! A VM's `status.conditions` has more than one writer (its agent owns
//! `Ready`; the controller `Scheduled`, `Quarantined`, `MaintenanceStopped`).
//! A JSON merge patch replaces a list whole, so every writer rewrites the
//! list from the object it read, changing only its own types, and sends the
//! `resourceVersion` it read: a concurrent write makes the patch fail with
//! 409 and the writer's next pass recomputes from fresh data. Nothing a
//! writer does not own is ever dropped.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition stamped now.
pub fn new(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    }
}

/// `list` with `condition` in place of any of its type. The transition time
/// is kept when the status does not change (Kubernetes' convention).
pub fn upsert(list: &[Condition], mut condition: Condition) -> Vec<Condition> {
    let mut out: Vec<Condition> = Vec::with_capacity(list.len() + 1);
    for c in list {
        if c.type_ == condition.type_ {
            if c.status == condition.status {
                condition.last_transition_time = c.last_transition_time.clone();
            }
        } else {
            out.push(c.clone());
        }
    }
    out.push(condition);
    out
}

/// Whether a condition of this type is `True`.
pub fn is_true(list: &[Condition], type_: &str) -> bool {
    list.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// A status merge patch that rewrites `conditions` and `fields`, valid only
/// against the object version `resource_version` (409 otherwise).
pub fn guarded_patch(
    resource_version: Option<String>,
    mut fields: serde_json::Value,
    conditions: Vec<Condition>,
) -> serde_json::Value {
    if let Some(map) = fields.as_object_mut() {
        map.insert(
            "conditions".into(),
            serde_json::to_value(conditions).unwrap_or_default(),
        );
    }
    serde_json::json!({
        "metadata": {"resourceVersion": resource_version},
        "status": fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_replaces_only_its_own_type_and_keeps_the_transition_time() {
        let mut ready = new("Ready", true, "Running", "runs");
        ready.last_transition_time = Time(Timestamp::from_second(1000).unwrap());
        let quarantined = new("Quarantined", true, "RetriesExhausted", "x");
        let list = vec![ready.clone(), quarantined.clone()];
        let out = upsert(&list, new("Ready", true, "Running", "still runs"));
        assert_eq!(out.len(), 2);
        assert!(
            out.contains(&quarantined),
            "another writer's condition stays"
        );
        let r = out.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r.message, "still runs");
        assert_eq!(
            r.last_transition_time, ready.last_transition_time,
            "no transition, same time"
        );
        let out = upsert(&out, new("Ready", false, "Stopped", "stopped"));
        assert_ne!(
            out.iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .last_transition_time,
            ready.last_transition_time
        );
        assert!(is_true(&out, "Quarantined") && !is_true(&out, "Ready"));
    }
}
