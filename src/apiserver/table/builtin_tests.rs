//! Built-in printers checked against `kubectl get` output of the real server.

use super::*;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn cells(kind: &str, o: Value) -> Value {
    let t = render_builtin(kind, &[o], IncludeObjectPolicy::None, now());
    assert_eq!(
        t["columnDefinitions"].as_array().unwrap().len(),
        t["rows"][0]["cells"].as_array().unwrap().len(),
        "{kind}: one cell per column"
    );
    t["rows"][0]["cells"].clone()
}

#[test]
fn builtin_printers_fill_their_columns() {
    let meta = json!({"name": "x", "creationTimestamp": "2026-01-01T11:00:00Z"});
    assert_eq!(
        cells(
            "Namespace",
            json!({"metadata": meta, "status": {"phase": "Active"}})
        ),
        json!(["x", "Active", "60m"])
    );
    assert_eq!(
        cells(
            "Lease",
            json!({"metadata": meta, "spec": {"holderIdentity": "ctrl-1"}})
        ),
        json!(["x", "ctrl-1", "60m"])
    );
    assert_eq!(
        cells(
            "Secret",
            json!({"metadata": meta, "type": "Opaque", "data": {"a": "", "b": ""}})
        ),
        json!(["x", "Opaque", 2, "60m"])
    );
    assert_eq!(
        cells(
            "Service",
            json!({"metadata": meta, "spec": {"type": "ClusterIP", "clusterIP": "10.0.0.1",
            "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP", "nodePort": 30053}],
            "selector": {"app": "web"}}})
        ),
        json!([
            "x",
            "ClusterIP",
            "10.0.0.1",
            "<none>",
            "80/TCP,53:30053/UDP",
            "60m",
            "app=web"
        ])
    );
    assert_eq!(
        cells(
            "Deployment",
            json!({"metadata": meta, "spec": {"replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"spec": {"containers": [{"name": "web", "image": "nginx:1"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}})
        ),
        json!(["x", "2/3", 3, 2, "60m", "web", "nginx:1", "app=web"])
    );
    assert_eq!(
        cells(
            "ClusterRoleBinding",
            json!({"metadata": meta, "roleRef": {"kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "ServiceAccount", "namespace": "ferry", "name": "ctrl"}]})
        ),
        json!(["x", "ClusterRole/admin", "60m", "", "", "ferry/ctrl"])
    );
    assert_eq!(
        cells("Widget", json!({"metadata": meta})),
        json!(["x", "2026-01-01T11:00:00Z"])
    );
}

#[test]
fn events_print_like_kubectl_get_events() {
    let e = json!({"metadata": {"name": "vm1.123"}, "type": "Normal", "reason": "Migrated",
        "involvedObject": {"kind": "VirtualMachine", "name": "vm1"}, "message": " done ",
        "firstTimestamp": "2026-01-01T11:00:00Z", "lastTimestamp": "2026-01-01T11:59:00Z", "count": 3,
        "source": {"component": "ferry-controller"}});
    assert_eq!(
        cells("Event", e),
        json!([
            "60s",
            "Normal",
            "Migrated",
            "virtualmachine/vm1",
            "",
            "ferry-controller",
            "done",
            "60m",
            3,
            "vm1.123"
        ])
    );
    let v1 = json!({"metadata": {"name": "e"}, "type": "Warning", "reason": "Failed",
        "regarding": {"kind": "Host", "name": "h"}, "note": "x", "eventTime": "2026-01-01T11:58:00.000000Z",
        "reportingController": "ferry.dev/agent", "reportingInstance": "h"});
    assert_eq!(
        cells("Event", v1),
        json!([
            "2m",
            "Warning",
            "Failed",
            "host/h",
            "",
            "ferry.dev/agent, h",
            "x",
            "2m",
            1,
            "e"
        ])
    );
}
