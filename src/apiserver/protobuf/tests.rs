use super::encode::encode_object;
use super::*;

#[test]
fn decodes_kubectl_create_namespace() {
    // Captured from `kubectl create ns foo` (kubectl 1.37).
    let body: &[u8] = &[
        0x6b, 0x38, 0x73, 0x00, 0x0a, 0x0f, 0x0a, 0x02, 0x76, 0x31, 0x12, 0x09, b'N', b'a', b'm',
        b'e', b's', b'p', b'a', b'c', b'e', 0x12, 0x1b, 0x0a, 0x13, 0x0a, 0x03, b'f', b'o', b'o',
        0x12, 0x00, 0x1a, 0x00, 0x22, 0x00, 0x2a, 0x00, 0x32, 0x00, 0x38, 0x00, 0x42, 0x00, 0x12,
        0x00, 0x1a, 0x02, 0x0a, 0x00, 0x1a, 0x00, 0x22, 0x00,
    ];
    let v = decode_body(body).unwrap();
    assert_eq!(
        v,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "foo"}, "spec": {}, "status": {}})
    );
}

#[test]
fn unknown_fields_with_a_value_are_errors_and_empty_ones_are_skipped() {
    let cm = tables::message_for("v1", "ConfigMap").unwrap();
    // Field 9 (not in the table) holding 1.
    assert!(matches!(
        decode(cm, &[0x48, 0x01]),
        Err(ProtobufError::UnknownField { number: 9, .. })
    ));
    // Field 9 holding 0, field 10 an empty string: a newer client's
    // non-pointer fields left empty.
    assert_eq!(decode(cm, &[0x48, 0x00, 0x52, 0x00]).unwrap(), json!({}));
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web", "namespace": "default", "labels": {"app": "web"},
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "apps/v1",
                "time": "2026-01-02T03:04:05Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "c", "image": "busybox", "command": ["sleep", "1d"],
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                        "securityContext": {"runAsUser": 0}
                    }],
                    "volumes": [{"name": "v", "configMap": {"name": "cfg", "defaultMode": 420}}]
                }
            }
        }
    })
}

#[test]
fn a_deployment_round_trips_with_pointer_zeros_inline_structs_and_quantities() {
    let d = deployment();
    let pb = encode_object(&d).unwrap();
    assert!(pb.starts_with(b"k8s\0"));
    assert_eq!(decode_body(&pb).unwrap(), d);
}

#[test]
fn micro_times_keep_microseconds() {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "l"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                 "renewTime": "2026-01-02T03:04:05.123456Z", "leaseTransitions": 0}
    });
    assert_eq!(decode_body(&encode_object(&lease).unwrap()).unwrap(), lease);
}

#[test]
fn json_fields_without_a_protobuf_place_are_not_encoded() {
    let mut d = deployment();
    d["spec"]["bogus"] = json!(1);
    assert!(matches!(
        encode_object(&d),
        Err(ProtobufError::Unencodable { field, .. }) if field == "bogus"
    ));
    let table = json!({"apiVersion": "meta.k8s.io/v1", "kind": "Table", "rows": []});
    assert!(matches!(
        encode_object(&table),
        Err(ProtobufError::UnsupportedKind(_))
    ));
}

#[test]
fn lists_encode_their_items() {
    let list = json!({
        "apiVersion": "v1", "kind": "ConfigMapList",
        "metadata": {"resourceVersion": "7", "continue": "abc"},
        "items": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}}]
    });
    let back = decode_body(&encode_object(&list).unwrap()).unwrap();
    assert_eq!(back["metadata"], list["metadata"]);
    // Items carry no TypeMeta in protobuf.
    assert_eq!(
        back["items"][0],
        json!({"metadata": {"name": "a"}, "data": {"k": "v"}})
    );
}
