//! kube-runtime against the embedded server: a `Controller` with a finalizer
//! reconciling a test CRD, Lease renewal by a component token, and RBAC.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::wait::{await_condition, conditions};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.ferry.dev",
    version = "v1",
    kind = "Gizmo",
    namespaced,
    status = "GizmoStatus"
)]
pub struct GizmoSpec {
    pub want: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
pub struct GizmoStatus {
    pub have: i32,
}

struct Ctx {
    client: kube::Client,
    cleaned: Mutex<BTreeSet<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReconcileError(String);

const FINALIZER: &str = "test.ferry.dev/cleanup";

async fn reconcile(g: Arc<Gizmo>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let api: Api<Gizmo> = Api::namespaced(ctx.client.clone(), &g.namespace().unwrap());
    finalizer(&api, FINALIZER, g, |event| async {
        match event {
            Event::Apply(g) => {
                let status = json!({"apiVersion": "test.ferry.dev/v1", "kind": "Gizmo", "status": {"have": g.spec.want}});
                api.patch_status(&g.name_any(), &PatchParams::apply("gizmo-controller").force(), &Patch::Apply(status))
                    .await
                    .map_err(|e| ReconcileError(e.to_string()))?;
                Ok(Action::await_change())
            }
            Event::Cleanup(g) => {
                ctx.cleaned.lock().unwrap().insert(g.name_any());
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e: kube::runtime::finalizer::Error<ReconcileError>| ReconcileError(e.to_string()))
}

fn error_policy(_: Arc<Gizmo>, e: &ReconcileError, _: Arc<Ctx>) -> Action {
    eprintln!("reconcile failed: {e}");
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test]
async fn controller_with_finalizer_reconciles_and_cleans_up() {
    let s = TestServer::start().await;
    let client = s.admin().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Gizmo::crd())
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(
            crds,
            "gizmos.test.ferry.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .unwrap()
    .unwrap();

    let api: Api<Gizmo> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cleaned: Mutex::new(BTreeSet::new()),
    });
    let controller = tokio::spawn(
        Controller::new(api.clone(), Default::default())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {}),
    );

    api.create(
        &PostParams::default(),
        &Gizmo::new("g1", GizmoSpec { want: 3 }),
    )
    .await
    .unwrap();
    let a = api.clone();
    let g = eventually(|| {
        let a = a.clone();
        async move {
            let g = a.get("g1").await.ok()?;
            (g.status.as_ref().map(|s| s.have) == Some(3)).then_some(g)
        }
    })
    .await;
    assert_eq!(g.finalizers(), [FINALIZER]);

    // A spec change is reconciled again.
    api.patch(
        "g1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"want": 5}})),
    )
    .await
    .unwrap();
    let a = api.clone();
    eventually(|| {
        let a = a.clone();
        async move { (a.get("g1").await.ok()?.status?.have == 5).then_some(()) }
    })
    .await;

    api.delete("g1", &DeleteParams::default()).await.unwrap();
    let a = api.clone();
    eventually(|| {
        let a = a.clone();
        async move { a.get_opt("g1").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert!(ctx.cleaned.lock().unwrap().contains("g1"));
    controller.abort();
}

#[tokio::test]
async fn component_tokens_are_authorized_by_rbac() {
    let s = TestServer::start().await;
    let admin = s.admin().await;
    let token = s
        .handle
        .tokens()
        .token_for(ferry::apiserver::pki::CONTROLLER_USER)
        .unwrap()
        .to_string();
    let ctl = s.handle.client_for(&token).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(ctl.clone(), "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "ferry-controller"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))
    .unwrap();

    let err = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    let kube::Error::Api(st) = err else {
        panic!("{err:?}")
    };
    assert_eq!(st.code, 403);
    assert_eq!(
        st.message,
        "leases.coordination.k8s.io is forbidden: User \"ferry:controller\" cannot create resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"default\""
    );

    let (code, body) = post(&admin, "/apis/rbac.authorization.k8s.io/v1/clusterroles", json!({
        "metadata": {"name": "ferry-controller"},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]}]
    }))
    .await;
    assert_eq!(code, 201, "{body}");
    post(&admin, "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings", json!({
        "metadata": {"name": "ferry-controller"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ferry-controller"},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "ferry:controller"}]
    }))
    .await;

    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    // Renew: replace with the current resourceVersion, then a stale one.
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().renew_time =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        ));
    let after = leases
        .replace("ferry-controller", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_ne!(
        after.metadata.resource_version,
        created.metadata.resource_version
    );
    let err = leases
        .replace("ferry-controller", &PostParams::default(), &renewed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );
    leases
        .patch(
            "ferry-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "b"}})),
        )
        .await
        .unwrap();

    // Bound only in "default", and without list or delete.
    let elsewhere: Api<Lease> = Api::namespaced(ctl.clone(), "kube-system");
    assert!(
        matches!(elsewhere.get("x").await.unwrap_err(), kube::Error::Api(ref s) if s.code == 403)
    );
    assert!(
        matches!(leases.list(&Default::default()).await.unwrap_err(), kube::Error::Api(ref s) if s.code == 403)
    );
    assert!(
        matches!(leases.delete("ferry-controller", &Default::default()).await.unwrap_err(), kube::Error::Api(ref s) if s.code == 403)
    );

    // Agent tokens exist per host and are denied by default.
    let agent = s
        .handle
        .tokens()
        .token_for(&ferry::apiserver::pki::agent_user("host-a"))
        .unwrap()
        .to_string();
    let ag = s.handle.client_for(&agent).await.unwrap();
    let (code, st) = get(
        &ag,
        "/apis/coordination.k8s.io/v1/namespaces/default/leases/ferry-controller",
    )
    .await;
    assert_eq!(code, 403, "{st}");
    assert_eq!(st["details"]["name"], "ferry-controller");
}

#[tokio::test]
async fn recorded_events_show_as_core_events() {
    use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let s = TestServer::start().await;
    let client = s.admin().await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferry-test".into(),
            instance: None,
        },
    );
    let reference = ObjectReference {
        kind: Some("ConfigMap".into()),
        api_version: Some("v1".into()),
        name: Some("target".into()),
        namespace: Some("default".into()),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Normal,
        reason: "Tested".into(),
        note: Some("it works".into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    // The same event again becomes a series (a merge patch of the stored one).
    recorder.publish(&ev, &reference).await.unwrap();

    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let list = core
        .list(&kube::api::ListParams::default().fields("involvedObject.name=target,reason=Tested"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "{:?}", list.items);
    let e = &list.items[0];
    assert_eq!(e.message.as_deref(), Some("it works"));
    assert_eq!(e.reporting_component.as_deref(), Some("ferry-test"));
    assert_eq!(e.involved_object.kind.as_deref(), Some("ConfigMap"));
    assert!(
        e.series.as_ref().is_some_and(|s| s.count == Some(2)),
        "{e:?}"
    );
    let none = core
        .list(&kube::api::ListParams::default().fields("involvedObject.name=other"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
}
