//! Resources served in more than one shape from one storage: Events.
//!
//! As in kube-apiserver, `events.k8s.io/v1` Events and core `v1` Events are
//! one collection: objects are stored in the core shape and converted when
//! served as `events.k8s.io/v1`, so an Event a controller records through
//! kube-runtime's `Recorder` shows in `kubectl get events` and
//! `kubectl describe`. The field correspondence is the one of
//! k8s.io/kubernetes `pkg/apis/events/v1` conversion:
//!
//! ```text
//! events.k8s.io/v1          core/v1
//! regarding            ◄──► involvedObject
//! note                 ◄──► message
//! reportingController  ◄──► reportingComponent
//! deprecatedSource     ◄──► source
//! deprecatedFirstTimestamp ◄► firstTimestamp
//! deprecatedLastTimestamp  ◄► lastTimestamp
//! deprecatedCount      ◄──► count
//! (reason, type, action, related, reportingInstance, eventTime, series: same)
//! ```

use serde_json::{Value, json};

use super::resources::ResourceInfo;

const RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// Whether `info` is the events.k8s.io view of core Events.
pub fn is_events_v1(info: &ResourceInfo) -> bool {
    info.group == "events.k8s.io" && info.plural == "events"
}

fn rename(obj: &mut Value, from_new: bool) {
    let Some(o) = obj.as_object_mut() else { return };
    for (new, core) in RENAMES {
        let (from, to) = if from_new { (new, core) } else { (core, new) };
        if let Some(v) = o.remove(*from) {
            o.insert((*to).to_string(), v);
        }
    }
}

/// The stored shape of an object written through `info`.
pub fn to_storage(info: &ResourceInfo, mut obj: Value) -> Value {
    if is_events_v1(info) {
        rename(&mut obj, true);
        if let Some(o) = obj.as_object_mut() {
            o.insert("apiVersion".into(), json!("v1"));
        }
    }
    obj
}

/// The shape of a stored object when served through `info` (apiVersion and
/// kind are set by the caller).
pub fn from_storage(info: &ResourceInfo, obj: &Value) -> Value {
    let mut out = obj.clone();
    if is_events_v1(info) {
        rename(&mut out, false);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::Registry;

    #[test]
    fn events_round_trip_between_shapes() {
        let reg = Registry::with_builtins();
        let v1 = reg.get("events.k8s.io", "v1", "events").unwrap();
        let new = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "hi", "reason": "R",
            "reportingController": "ferry", "deprecatedCount": 2});
        let core = to_storage(&v1, new.clone());
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "hi");
        assert_eq!(core["reportingComponent"], "ferry");
        assert_eq!(core["count"], 2);
        assert_eq!(core["apiVersion"], "v1");
        let mut back = from_storage(&v1, &core);
        back["apiVersion"] = json!("events.k8s.io/v1");
        assert_eq!(back, new);
    }
}
