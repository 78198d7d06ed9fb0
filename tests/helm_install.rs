//! The chart installed by Helm v4 (`helm-python-sdk`) into the embedded API
//! server with RBAC enforced. The agent and the controller authenticate as
//! their ServiceAccounts (static tokens, kube-apiserver's token file), and
//! prove both halves of least privilege: every request they need succeeds,
//! everything else is 403. Then the real binaries run with those identities,
//! and the release is upgraded (keeping its CA) and uninstalled cleanly.

mod common;
mod helm_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use helm_support::{chart, helm};
use serde_json::{Value, json};

const NS: &str = "ferry-system";
const AGENT_TOKEN: &str = "agent-sa-token-0123456789";
const CONTROLLER_TOKEN: &str = "controller-sa-token-0123456789";
const FERRY: &str = "/apis/ferry.dev/v1alpha1";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases";

/// Kills the child on drop, so a failing assertion leaves no process behind.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn helm_release(command: &'static str, kubeconfig: PathBuf, values: Value) -> Value {
    tokio::task::spawn_blocking(move || {
        helm(
            command,
            &json!({"kubeconfig": kubeconfig, "chart": chart(), "values": values,
                    "namespace": NS, "name": "ferry"}),
        )
        .unwrap_or_else(|e| panic!("helm {command}: {e}"))
    })
    .await
    .unwrap()
}

async fn patch(c: &kube::Client, path: &str, body: Value) -> (u16, Value) {
    call(c, "PATCH", path, Some(body), "application/merge-patch+json").await
}

/// (method, path, body) → expected status, checked one by one with the
/// server's answer in the failure message.
async fn expect(c: &kube::Client, who: &str, table: &[(&str, String, Option<Value>, u16)]) {
    for (method, path, body, want) in table {
        let (code, answer) = match *method {
            "PATCH" => patch(c, path, body.clone().unwrap()).await,
            m => call(c, m, path, body.clone(), "application/json").await,
        };
        assert_eq!(code, *want, "{who}: {method} {path} → {code}: {answer}");
        if *want == 403 {
            let message = answer["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("system:serviceaccount:ferry-system:ferry-{who}")),
                "{who}: 403 names the identity: {message}"
            );
        }
    }
}

fn host(name: &str) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Host", "metadata": {"name": name},
           "spec": {"cluster": "default"}})
}
fn lease(name: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
           "spec": {"holderIdentity": name}})
}
fn vm(name: &str) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": name},
           "spec": {"boot": {"kernel": {"kernel": "/boot/vmlinuz"}}, "memory": "128Mi"}})
}
fn migration(name: &str, vm: &str) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration", "metadata": {"name": name},
           "spec": {"vmName": vm}})
}
fn event(name: &str) -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": name},
           "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "ferry.dev/controller",
           "reportingInstance": "test", "action": "Test", "reason": "Test", "type": "Normal",
           "regarding": {"kind": "Migration", "namespace": "default", "name": "m0"}})
}
fn core_event(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": name},
           "involvedObject": {"kind": "Migration", "namespace": "default", "name": "m0"},
           "reason": "Test", "message": "test", "type": "Normal"})
}

async fn wait_for<F, Fut>(what: &str, mut f: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn spawn(bin: &str, args: &[&str], log: &Path) -> Guard {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Guard(
        Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_with_least_privilege_upgrades_and_uninstalls() {
    let s = TestServer::start_with(|c| {
        let tokens = format!(
            "{AGENT_TOKEN},system:serviceaccount:ferry-system:ferry-agent,agent-uid\n\
             {CONTROLLER_TOKEN},system:serviceaccount:ferry-system:ferry-controller,controller-uid\n"
        );
        std::fs::create_dir_all(&c.data_dir).unwrap();
        std::fs::write(c.data_dir.join("tokens.csv"), tokens).unwrap();
    })
    .await;
    let admin = s.admin().await;
    let kubeconfig = s.handle.kubeconfig_path().to_path_buf();
    let dir = s.dir.path().to_path_buf();

    // Install. The agent's own-object policy (tests/helm_admission.rs)
    // would confine this one token to one node; here RBAC alone is tested.
    let no_policy = json!({"agent": {"ownObjectPolicy": {"install": "never"}}});
    let release = helm_release("install", kubeconfig.clone(), no_policy.clone()).await;
    assert_eq!(release["status"], "deployed", "{release}");
    for crd in [
        "virtualmachines",
        "hosts",
        "migrations",
        "hostmaintenances",
        "migrationpolicies",
    ] {
        let path =
            format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}.ferry.dev");
        assert_eq!(get(&admin, &path).await.0, 200, "{crd}");
    }
    let deploy = "/apis/apps/v1/namespaces/ferry-system/deployments/ferry-controller";
    assert_eq!(get(&admin, deploy).await.1["spec"]["replicas"], 2);
    let ds = "/apis/apps/v1/namespaces/ferry-system/daemonsets/ferry-agent";
    assert_eq!(get(&admin, ds).await.0, 200);
    let ca_path = "/api/v1/namespaces/ferry-system/secrets/ferry-ca";
    let ca = get(&admin, ca_path).await.1["data"].clone();
    assert!(ca["ca.key"].is_string());
    assert_eq!(
        get(&admin, &format!("{FERRY}/migrationpolicies/default"))
            .await
            .0,
        200
    );

    // Objects for the agent and controller to work on.
    let vms = format!("{FERRY}/namespaces/default/virtualmachines");
    let migrations = format!("{FERRY}/namespaces/default/migrations");
    assert_eq!(post(&admin, &vms, vm("vm1")).await.0, 201);
    assert_eq!(
        patch(
            &admin,
            &format!("{vms}/vm1/status"),
            json!({"status": {"host": "node-b"}})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(&admin, &migrations, migration("m0", "vm1")).await.0,
        201
    );

    let agent = s.handle.client_for(AGENT_TOKEN).await.unwrap();
    let controller = s.handle.client_for(CONTROLLER_TOKEN).await.unwrap();
    let p = |s: &str| s.to_string();
    expect(&agent, "agent", &[
        ("GET", format!("{FERRY}/hosts"), None, 200),
        ("POST", format!("{FERRY}/hosts"), Some(host("node-b")), 201),
        ("PATCH", format!("{FERRY}/hosts/node-b"), Some(json!({"metadata": {"labels": {"rack": "r1"}}})), 200),
        ("PATCH", format!("{FERRY}/hosts/node-b/status"), Some(json!({"status": {"vmCount": 0}})), 200),
        ("GET", format!("{FERRY}/virtualmachines"), None, 200),
        ("GET", format!("{FERRY}/migrations"), None, 200),
        ("GET", format!("{FERRY}/migrationpolicies/default"), None, 200),
        ("PATCH", format!("{vms}/vm1/status"), Some(json!({"status": {"message": "running"}})), 200),
        ("PATCH", format!("{migrations}/m0/status"), Some(json!({"status": {"message": "sending"}})), 200),
        ("POST", p(LEASES), Some(lease("node-b")), 201),
        ("PATCH", format!("{LEASES}/node-b"), Some(json!({"spec": {"leaseDurationSeconds": 40}})), 200),
        ("GET", format!("{LEASES}/node-b"), None, 200),
        // Everything else is refused.
        ("POST", vms.clone(), Some(vm("vm2")), 403),
        ("PATCH", format!("{vms}/vm1"), Some(json!({"spec": {"memory": "256Mi"}})), 403),
        ("DELETE", format!("{vms}/vm1"), None, 403),
        ("POST", migrations.clone(), Some(migration("m9", "vm1")), 403),
        ("PATCH", format!("{migrations}/m0"), Some(json!({"spec": {"cancel": true}})), 403),
        ("DELETE", format!("{FERRY}/hosts/node-b"), None, 403),
        ("PATCH", format!("{FERRY}/migrationpolicies/default"), Some(json!({"spec": {"allowUnsafe": true}})), 403),
        ("GET", format!("{FERRY}/hostmaintenances"), None, 403),
        ("GET", p(ca_path), None, 403),
        ("GET", p("/api/v1/namespaces/ferry-system/secrets"), None, 403),
        ("GET", p(LEASES), None, 403),
        ("DELETE", format!("{LEASES}/node-b"), None, 403),
        ("POST", p("/apis/coordination.k8s.io/v1/namespaces/default/leases"), Some(lease("x")), 403),
        ("GET", p("/api/v1/namespaces"), None, 403),
        ("POST", p("/apis/events.k8s.io/v1/namespaces/default/events"), Some(event("e-agent")), 403),
        ("GET", p("/apis/apps/v1/namespaces/ferry-system/deployments"), None, 403),
        ("POST", p("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"), Some(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "escalate"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ferry-controller"},
            "subjects": [{"kind": "ServiceAccount", "name": "ferry-agent", "namespace": "ferry-system"}]})), 403),
    ]).await;
    expect(
        &controller,
        "controller",
        &[
            ("GET", format!("{FERRY}/virtualmachines"), None, 200),
            ("GET", format!("{FERRY}/hosts"), None, 200),
            ("GET", format!("{FERRY}/migrations"), None, 200),
            ("GET", format!("{FERRY}/migrationpolicies"), None, 200),
            ("GET", format!("{FERRY}/hostmaintenances"), None, 200),
            ("GET", p("/api/v1/namespaces"), None, 200),
            ("GET", p(LEASES), None, 200),
            (
                "POST",
                migrations.clone(),
                Some(migration("m1", "vm1")),
                201,
            ),
            (
                "PATCH",
                format!("{migrations}/m1"),
                Some(json!({"metadata": {"finalizers": ["ferry.dev/migration"]}})),
                200,
            ),
            (
                "PATCH",
                format!("{migrations}/m1/status"),
                Some(json!({"status": {"message": "scheduling"}})),
                200,
            ),
            (
                "PATCH",
                format!("{vms}/vm1/status"),
                Some(json!({"status": {"migration": "m1"}})),
                200,
            ),
            (
                "PATCH",
                format!("{FERRY}/hosts/node-b"),
                Some(json!({"spec": {"unschedulable": true}})),
                200,
            ),
            (
                "PATCH",
                format!("{FERRY}/hosts/node-b/status"),
                Some(json!({"status": {"phase": "Maintenance"}})),
                200,
            ),
            (
                "POST",
                p("/apis/events.k8s.io/v1/namespaces/default/events"),
                Some(event("e1")),
                201,
            ),
            (
                "POST",
                p("/api/v1/namespaces/default/events"),
                Some(core_event("e2")),
                201,
            ),
            ("POST", p(LEASES), Some(lease("ferry-controller")), 201),
            (
                "PATCH",
                format!("{LEASES}/ferry-controller"),
                Some(json!({"spec": {"leaseDurationSeconds": 15}})),
                200,
            ),
            // Everything else is refused.
            ("GET", p(ca_path), None, 403),
            (
                "GET",
                p("/api/v1/namespaces/ferry-system/secrets"),
                None,
                403,
            ),
            (
                "PATCH",
                format!("{LEASES}/node-b"),
                Some(json!({"spec": {"holderIdentity": "x"}})),
                403,
            ),
            ("DELETE", format!("{LEASES}/ferry-controller"), None, 403),
            ("POST", vms.clone(), Some(vm("vm3")), 403),
            (
                "PATCH",
                format!("{vms}/vm1"),
                Some(json!({"spec": {"memory": "256Mi"}})),
                403,
            ),
            ("DELETE", format!("{migrations}/m1"), None, 403),
            ("POST", format!("{FERRY}/hosts"), Some(host("node-c")), 403),
            ("DELETE", format!("{FERRY}/hosts/node-b"), None, 403),
            (
                "PATCH",
                format!("{FERRY}/migrationpolicies/default"),
                Some(json!({"spec": {"allowUnsafe": true}})),
                403,
            ),
            (
                "GET",
                p("/apis/apps/v1/namespaces/ferry-system/deployments"),
                None,
                403,
            ),
            ("GET", p("/api/v1/configmaps"), None, 403),
        ],
    )
    .await;

    // The real binaries, as these ServiceAccounts: the agent's certificate
    // comes from the chart's CA like the init container's.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    for key in ["ca.crt", "ca.key"] {
        let bytes = b64.decode(ca[key].as_str().unwrap()).unwrap();
        std::fs::write(ca_dir.join(key), bytes).unwrap();
    }
    let pki = dir.join("pki");
    let issued = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["certificate", "--host", "node-a"])
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--pki-dir")
        .arg(&pki)
        .output()
        .unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let agent_kc = dir.join("agent.kubeconfig");
    std::fs::write(&agent_kc, s.handle.kubeconfig_for(AGENT_TOKEN)).unwrap();
    let controller_kc = dir.join("controller.kubeconfig");
    std::fs::write(&controller_kc, s.handle.kubeconfig_for(CONTROLLER_TOKEN)).unwrap();
    let (agent_log, controller_log) = (dir.join("agent.log"), dir.join("controller.log"));
    let state = dir.join("state");
    let agent_proc = spawn(
        env!("CARGO_BIN_EXE_ferry-agent"),
        &[
            "run",
            "--host",
            "node-a",
            "--kubeconfig",
            agent_kc.to_str().unwrap(),
            "--pki-dir",
            pki.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--migration-listen",
            "127.0.0.1:0",
            "--migration-advertise",
            "127.0.0.1:7443",
            "--renew-interval",
            "300ms",
            "--no-watchdog",
        ],
        &agent_log,
    );
    let controller_proc = spawn(
        env!("CARGO_BIN_EXE_ferry-controller"),
        &["--kubeconfig", controller_kc.to_str().unwrap()],
        &controller_log,
    );
    let host_a = wait_for("the agent's Host with status", || {
        let admin = admin.clone();
        async move {
            let (code, h) = get(&admin, &format!("{FERRY}/hosts/node-a")).await;
            (code == 200 && h["status"]["agentVersion"].is_string()).then_some(h)
        }
    })
    .await;
    assert_eq!(host_a["spec"]["migrationEndpoint"], "127.0.0.1:7443");
    wait_for("the agent's Lease", || {
        let admin = admin.clone();
        async move {
            let (code, l) = get(&admin, &format!("{LEASES}/node-a")).await;
            (code == 200).then_some(l)
        }
    })
    .await;
    assert_eq!(
        post(&admin, &migrations, migration("ghost-move", "ghost"))
            .await
            .0,
        201
    );
    let failed = wait_for("the controller to judge a migration", || {
        let admin = admin.clone();
        let path = format!("{migrations}/ghost-move");
        async move {
            let (_, m) = get(&admin, &path).await;
            (m["status"]["phase"] == "Failed").then_some(m)
        }
    })
    .await;
    assert_eq!(failed["status"]["failureReason"], "VmNotFound");
    assert_eq!(
        failed["metadata"]["finalizers"],
        json!(["ferry.dev/migration"])
    );
    let events = get(&admin, "/apis/events.k8s.io/v1/namespaces/default/events")
        .await
        .1;
    assert!(
        events.to_string().contains("VmNotFound"),
        "the controller's Event: {events}"
    );
    drop(agent_proc);
    drop(controller_proc);
    for log in [&agent_log, &controller_log] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.to_lowercase().contains("forbidden"),
            "{}: {text}",
            log.display()
        );
    }

    // Upgrade: new values reach the cluster, the CA stays.
    let values = json!({"controller": {"replicas": 3}, "agent": no_policy["agent"],
                        "defaultMigrationPolicy": {"spec": {"convergence": {"mode": "PostCopy"}}}});
    let release = helm_release("upgrade", kubeconfig.clone(), values).await;
    assert_eq!(release["revision"], 2, "{release}");
    assert_eq!(get(&admin, deploy).await.1["spec"]["replicas"], 3);
    let policy = get(&admin, &format!("{FERRY}/migrationpolicies/default"))
        .await
        .1;
    assert_eq!(policy["spec"]["convergence"]["mode"], "PostCopy");
    assert_eq!(
        get(&admin, ca_path).await.1["data"],
        ca,
        "upgrade keeps the CA"
    );
    let releases = "/api/v1/namespaces/ferry-system/secrets?labelSelector=owner%3Dhelm";
    assert_eq!(
        get(&admin, releases).await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Uninstall: everything the chart made is gone but the CRDs (Helm never
    // deletes crds/, so VMs survive), and the identities lose their rights.
    helm_release("uninstall", kubeconfig, json!({})).await;
    for path in [
        deploy.to_string(),
        ds.to_string(),
        ca_path.to_string(),
        format!("{FERRY}/migrationpolicies/default"),
        "/api/v1/namespaces/ferry-system/serviceaccounts/ferry-agent".into(),
        "/api/v1/namespaces/ferry-system/serviceaccounts/ferry-controller".into(),
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/ferry-agent".into(),
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/ferry-controller".into(),
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ferry-system/roles/ferry-agent".into(),
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ferry-system/rolebindings/ferry-controller"
            .into(),
        "/api/v1/namespaces/ferry-system/services/ferry-controller-metrics".into(),
    ] {
        assert_eq!(
            get(&admin, &path).await.0,
            404,
            "{path} remains after uninstall"
        );
    }
    assert_eq!(
        get(&admin, releases).await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        get(
            &admin,
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/virtualmachines.ferry.dev"
        )
        .await
        .0,
        200
    );
    assert_eq!(get(&admin, &format!("{vms}/vm1")).await.0, 200);
    assert_eq!(get(&agent, &format!("{FERRY}/hosts")).await.0, 403);
    assert_eq!(
        get(&controller, &format!("{FERRY}/virtualmachines"))
            .await
            .0,
        403
    );
}
