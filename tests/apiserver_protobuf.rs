//! `application/vnd.kubernetes.protobuf` on the wire: request bodies written
//! by an independent encoder (prost with the `k8s-pb` types) and by the real
//! kubectl, responses negotiated by `Accept` and read back with prost.

mod common;

use axum::http::Request;
use common::kubectl::Kubectl;
use common::*;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::coordination::v1 as coordination;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::events::v1 as events;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::Value;

const PB: &str = "application/vnd.kubernetes.protobuf";

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn meta(name: &str) -> Option<meta::ObjectMeta> {
    Some(meta::ObjectMeta {
        name: s(name),
        labels: [("app".to_string(), name.to_string())].into(),
        ..Default::default()
    })
}

/// The `k8s\0` envelope around a message, as client-go writes it.
fn envelope(api_version: &str, kind: &str, msg: &impl Message) -> Vec<u8> {
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s(api_version),
            kind: s(kind),
        }),
        raw: Some(msg.encode_to_vec()),
        content_encoding: s(""),
        content_type: s(""),
    };
    let mut out = b"k8s\0".to_vec();
    out.extend(unknown.encode_to_vec());
    out
}

/// The message inside a protobuf response.
fn open<M: Message + Default>(body: &[u8]) -> (String, M) {
    let rest = body.strip_prefix(b"k8s\0").expect("k8s envelope");
    let u = Unknown::decode(rest).unwrap();
    let kind = u.type_meta.unwrap().kind.unwrap();
    (kind, M::decode(u.raw.unwrap().as_slice()).unwrap())
}

/// Send raw bytes; returns (status, content type, body).
async fn send(
    c: &kube::Client,
    method: &str,
    path: &str,
    body: Vec<u8>,
    accept: &str,
) -> (u16, String, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", PB)
        .header("accept", accept)
        .body(kube::client::Body::from(body))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let code = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect_bytes().await.unwrap();
    (code, ct, bytes.to_vec())
}

fn deployment() -> apps::Deployment {
    let container = core::Container {
        name: s("c"),
        image: s("busybox"),
        command: vec!["sleep".into(), "1d".into()],
        ports: vec![core::ContainerPort {
            container_port: Some(8080),
            protocol: s("TCP"),
            ..Default::default()
        }],
        resources: Some(core::ResourceRequirements {
            limits: [("memory".to_string(), Quantity { string: s("64Mi") })].into(),
            ..Default::default()
        }),
        // gogo writes non-pointer scalars even when empty.
        stdin: Some(false),
        termination_message_path: s(""),
        ..Default::default()
    };
    apps::Deployment {
        metadata: meta("web"),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(0),
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            }),
            template: Some(core::PodTemplateSpec {
                metadata: meta("web"),
                spec: Some(core::PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    ..Default::default()
                }),
            }),
            strategy: Some(apps::DeploymentStrategy {
                r#type: s("RollingUpdate"),
                rolling_update: Some(apps::RollingUpdateDeployment {
                    max_surge: Some(IntOrString {
                        r#type: Some(1),
                        str_val: s("25%"),
                        ..Default::default()
                    }),
                    max_unavailable: Some(IntOrString {
                        r#type: Some(0),
                        int_val: Some(1),
                        ..Default::default()
                    }),
                }),
            }),
            ..Default::default()
        }),
        status: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_bodies_of_deployments_services_leases_and_events_are_stored() {
    let srv = TestServer::start().await;
    let c = srv.admin().await;
    let both = format!("{PB}, application/json");

    // Deployment: the response comes back in protobuf, as client-go asked.
    let body = envelope("apps/v1", "Deployment", &deployment());
    let (code, ct, resp) = send(
        &c,
        "POST",
        "/apis/apps/v1/namespaces/default/deployments",
        body,
        &both,
    )
    .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(ct, PB);
    let (kind, d): (_, apps::Deployment) = open(&resp);
    assert_eq!(kind, "Deployment");
    let m = d.metadata.unwrap();
    assert!(m.uid.is_some_and(|u| !u.is_empty()));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(0));
    // And as JSON, the way kubectl get -o json shows it.
    let (_, j) = get(&c, "/apis/apps/v1/namespaces/default/deployments/web").await;
    assert_eq!(j["spec"]["replicas"], 0);
    assert_eq!(j["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    assert_eq!(j["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let pod = &j["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        pod["containers"][0]["resources"]["limits"]["memory"],
        "64Mi"
    );
    assert_eq!(pod["containers"][0]["ports"][0]["containerPort"], 8080);
    assert!(pod["containers"][0].get("stdin").is_none(), "{pod}");
    assert!(pod["containers"][0].get("terminationMessagePath").is_none());

    // Service with a named target port.
    let svc = core::Service {
        metadata: meta("web"),
        spec: Some(core::ServiceSpec {
            ports: vec![core::ServicePort {
                name: s("http"),
                port: Some(80),
                target_port: Some(IntOrString {
                    r#type: Some(1),
                    str_val: s("http"),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            selector: [("app".to_string(), "web".to_string())].into(),
            r#type: s("ClusterIP"),
            ..Default::default()
        }),
        status: None,
    };
    let (code, _, resp) = send(
        &c,
        "POST",
        "/api/v1/namespaces/default/services",
        envelope("v1", "Service", &svc),
        &both,
    )
    .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&resp));
    let (_, j) = get(&c, "/api/v1/namespaces/default/services/web").await;
    assert_eq!(j["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(j["spec"]["selector"]["app"], "web");

    // Lease, as leader election writes it (MicroTime keeps microseconds).
    let lease = coordination::Lease {
        metadata: meta("leader"),
        spec: Some(coordination::LeaseSpec {
            holder_identity: s("ctrl-1"),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(0),
            renew_time: Some(meta::MicroTime {
                seconds: Some(1_790_000_000),
                nanos: Some(123_456_000),
            }),
            ..Default::default()
        }),
    };
    let (code, _, resp) = send(
        &c,
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/default/leases",
        envelope("coordination.k8s.io/v1", "Lease", &lease),
        "application/json",
    )
    .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&resp));
    let j: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(j["spec"]["leaseTransitions"], 0);
    assert_eq!(j["spec"]["renewTime"], "2026-09-21T14:13:20.123456Z");

    // Events in both groups, as client-go's recorders write them.
    let reference = core::ObjectReference {
        kind: s("Deployment"),
        namespace: s("default"),
        name: s("web"),
        api_version: s("apps/v1"),
        ..Default::default()
    };
    let ev = core::Event {
        metadata: meta("web.1"),
        involved_object: Some(reference.clone()),
        reason: s("Scaled"),
        message: s("scaled to 0"),
        r#type: s("Normal"),
        count: Some(1),
        source: Some(core::EventSource {
            component: s("test"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (code, _, resp) = send(
        &c,
        "POST",
        "/api/v1/namespaces/default/events",
        envelope("v1", "Event", &ev),
        &both,
    )
    .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&resp));
    let ev2 = events::Event {
        metadata: meta("web.2"),
        event_time: Some(meta::MicroTime {
            seconds: Some(1_790_000_000),
            nanos: Some(0),
        }),
        reporting_controller: s("ferry.dev/test"),
        reporting_instance: s("test-1"),
        action: s("Scale"),
        reason: s("Scaled"),
        regarding: Some(reference),
        r#type: s("Normal"),
        ..Default::default()
    };
    let (code, _, resp) = send(
        &c,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        envelope("events.k8s.io/v1", "Event", &ev2),
        &both,
    )
    .await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&resp));
    let (_, list) = get(&c, "/api/v1/namespaces/default/events").await;
    let reasons: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["Scaled", "Scaled"]);

    // A list in protobuf decodes as the typed list.
    let (code, ct, resp) = send(
        &c,
        "GET",
        "/apis/apps/v1/namespaces/default/deployments",
        vec![],
        &both,
    )
    .await;
    assert_eq!((code, ct.as_str()), (200, PB));
    let (kind, list): (_, apps::DeploymentList) = open(&resp);
    assert_eq!(kind, "DeploymentList");
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.unwrap().resource_version.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_negotiates_protobuf_json_or_406() {
    let srv = TestServer::start().await;
    let c = srv.admin().await;
    install_widget_crd(&c).await;
    let (code, _) = post(
        &c,
        "/apis/test.ferry.dev/v1/namespaces/default/widgets",
        widget("w1", 1),
    )
    .await;
    assert_eq!(code, 201);
    let path = "/apis/test.ferry.dev/v1/namespaces/default/widgets/w1";
    // Custom resources have no protobuf form: JSON when also accepted...
    let (code, ct, body) = send(&c, "GET", path, vec![], &format!("{PB}, application/json")).await;
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["spec"]["size"],
        1
    );
    // ... 406 when protobuf is all the client takes.
    let (code, _, body) = send(&c, "GET", path, vec![], PB).await;
    assert_eq!(code, 406, "{}", String::from_utf8_lossy(&body));
    // q-values order the choice.
    let (code, ct, _) = send(
        &c,
        "GET",
        "/api/v1/namespaces/default",
        vec![],
        &format!("{PB};q=0.5, application/json"),
    )
    .await;
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    let (code, ct, body) = send(&c, "GET", "/api/v1/namespaces/default", vec![], PB).await;
    assert_eq!((code, ct.as_str()), (200, PB));
    let (_, ns): (_, core::Namespace) = open(&body);
    assert_eq!(ns.metadata.unwrap().name.as_deref(), Some("default"));
    // Errors come back as a protobuf Status too.
    let (code, ct, body) = send(&c, "GET", "/api/v1/namespaces/nope", vec![], PB).await;
    assert_eq!((code, ct.as_str()), (404, PB));
    let (kind, status): (_, meta::Status) = open(&body);
    assert_eq!(kind, "Status");
    assert_eq!(status.reason.as_deref(), Some("NotFound"));
    assert_eq!(status.code, Some(404));
    // A body that is not protobuf at all is a 415.
    let (code, _, _) = send(
        &c,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        b"{}".to_vec(),
        "application/json",
    )
    .await;
    assert_eq!(code, 415);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_deployment_and_service_send_protobuf() {
    let srv = TestServer::start().await;
    let k = Kubectl::new(&srv);
    k.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=0",
        "--port=8080",
    ])
    .await;
    k.ok(&["create", "service", "clusterip", "web", "--tcp=80:8080"])
        .await;
    assert_eq!(
        k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "0"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].ports[0].containerPort}"
        ])
        .await,
        "8080"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[0].targetPort}"
        ])
        .await,
        "8080"
    );
    k.ok(&["delete", "deployment", "web"]).await;
    k.ok(&["delete", "service", "web"]).await;
}
