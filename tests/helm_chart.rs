//! The Helm chart, rendered offline by Helm v4 (`helm-python-sdk`): lint,
//! schema, CRDs identical to `crds/`, the manifests for the default values
//! and for overrides, and RBAC exactly as intended with no wildcards.

mod helm_support;

use ferry::agent::pki::{ClusterCa, TlsSettings, host_of_certificate};
use helm_support::*;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

fn overrides() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        (
            "host-qemu-existing-ca",
            json!({"agent": {"qemu": {"mode": "host"}, "hostNetwork": false, "privileged": false,
                             "nodeSelector": {"role": "hypervisor", "ferry.dev/host": null}, "labels": {"rack": "r1"},
                             "capacity": {"cpus": 8, "memory": "32Gi"}, "watchdog": false,
                             "tlsCipherSuites": ["TLS13_AES_128_GCM_SHA256"],
                             "migration": {"port": 9443, "advertise": "10.0.0.1:9443"}},
                   "pki": {"mode": "existingSecret", "existingSecret": {"name": "my-ca", "certKey": "tls.crt", "keyKey": "tls.key"}}}),
        ),
        (
            "monitoring-hostpath-pki",
            json!({"controller": {"replicas": 3, "metrics": {"port": 9090, "serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}},
                                  "podDisruptionBudget": {"enabled": true}},
                   "pki": {"mode": "hostPath", "hostPath": {"path": "/etc/pki/ferry"}},
                   "defaultMigrationPolicy": {"enabled": false},
                   "agent": {"ownObjectPolicy": {"install": "always"}, "updateStrategy": {"type": "RollingUpdate"}}}),
        ),
    ]
}

#[test]
fn chart_lints_clean_for_defaults_and_overrides() {
    for (name, values) in overrides() {
        let report = helm(
            "lint",
            &json!({"chart": chart(), "values": values, "namespace": "ferry-system"}),
        )
        .unwrap_or_else(|e| panic!("{name}: lint failed to run: {e}"));
        assert_eq!(report["errors"], json!([]), "{name}: {report}");
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            serious.is_empty(),
            "{name}: lint warnings/errors: {serious:?}"
        );
    }
}

#[test]
fn chart_crds_are_identical_to_the_repository_crds() {
    let crds = helm("crds", &json!({"chart": chart()})).unwrap();
    let mut in_chart: Vec<(String, String)> = crds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let file = c["filename"].as_str().unwrap();
            let base = file.rsplit('/').next().unwrap().to_string();
            (base, c["data"].as_str().unwrap().to_string())
        })
        .collect();
    in_chart.sort();
    let mut in_repo: Vec<(String, String)> = std::fs::read_dir(repo().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    in_repo.sort();
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&in_chart), names(&in_repo), "CRD files differ");
    for ((name, chart_text), (_, repo_text)) in in_chart.iter().zip(&in_repo) {
        assert!(
            chart_text == repo_text,
            "charts/ferry/crds/{name} differs from crds/{name}: run `cp crds/*.yaml charts/ferry/crds/`"
        );
    }
}

#[test]
fn schema_rejects_invalid_values_and_names_the_key() {
    let cases = [
        (json!({"pki": {"mode": "vault"}}), "/pki/mode"),
        (
            json!({"pki": {"mode": "existingSecret"}}),
            "/pki/existingSecret/name",
        ),
        (
            json!({"controller": {"replicas": 0}}),
            "/controller/replicas",
        ),
        (
            json!({"controller": {"replica": 2}}),
            "additional properties 'replica'",
        ),
        (
            json!({"agent": {"qemu": {"mode": "kvm"}}}),
            "/agent/qemu/mode",
        ),
        (json!({"agent": {"stateDir": "var/lib"}}), "/agent/stateDir"),
        (
            json!({"agent": {"fenceAfter": "soon"}}),
            "/agent/fenceAfter",
        ),
        (
            json!({"agent": {"migration": {"port": 70000}}}),
            "/agent/migration/port",
        ),
        (
            json!({"agent": {"capacity": {"memory": "lots"}}}),
            "/agent/capacity/memory",
        ),
        (
            json!({"agent": {"updateStrategy": {"type": "Recreate"}}}),
            "/agent/updateStrategy/type",
        ),
    ];
    for (values, key) in cases {
        let out = helm("validate", &json!({"chart": chart(), "values": values})).unwrap();
        assert_eq!(out["ok"], false, "{values} should be rejected");
        let error = out["error"].as_str().unwrap();
        assert!(
            error.contains(key),
            "{values}: error {error:?} does not name {key}"
        );
    }
    for (name, values) in overrides() {
        let out = helm("validate", &json!({"chart": chart(), "values": values})).unwrap();
        assert_eq!(out["ok"], true, "{name}: {}", out["error"]);
    }
}

#[test]
fn chart_refuses_a_namespace_other_than_ferry_system() {
    let err = render_in("default", json!({})).unwrap_err();
    assert!(
        err.contains("install Ferry into the namespace \"ferry-system\""),
        "{err}"
    );
}

#[test]
fn default_render_installs_controller_agent_ca_and_policy() {
    let objects = render(json!({}));
    let deploy = find(&objects, "Deployment", "ferry-controller");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let c = container(deploy, "containers", "controller");
    assert!(
        args(c).contains(&"--metrics-listen=0.0.0.0:8080".to_string()),
        "{c}"
    );
    assert!(args(c).contains(&"--lease-duration=40s".to_string()));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["serviceAccountName"], "ferry-controller");
    let svc = find(&objects, "Service", "ferry-controller-metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert!(try_find(&objects, "ServiceMonitor", "ferry-controller").is_none());
    assert!(try_find(&objects, "PodDisruptionBudget", "ferry-controller").is_none());

    let ds = find(&objects, "DaemonSet", "ferry-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"ferry.dev/host": "true"}));
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "ferry-agent");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "OnDelete");
    let agent = container(ds, "containers", "agent");
    assert_eq!(agent["image"], "ghcr.io/ferry-dev/ferry:0.1.0-qemu");
    let a = args(agent);
    for want in [
        "run",
        "--host=$(FERRY_HOST)",
        "--state-dir=/var/lib/ferry",
        "--pki-dir=/etc/ferry/pki",
        "--migration-listen=0.0.0.0:7443",
        "--migration-advertise=$(ADVERTISE_IP):7443",
        "--qemu=qemu-system-x86_64",
        "--lease-duration=40s",
    ] {
        assert!(
            a.contains(&want.to_string()),
            "agent args lack {want}: {a:?}"
        );
    }
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(agent["ports"][0]["containerPort"], 7443);
    assert_eq!(agent["ports"][0]["hostPort"], 7443);
    assert!(agent["env"].to_string().contains("status.hostIP"));
    let volumes = pod["volumes"].as_array().unwrap();
    let state = volumes.iter().find(|v| v["name"] == "state").unwrap();
    assert_eq!(state["hostPath"]["path"], "/var/lib/ferry");
    let ca = volumes.iter().find(|v| v["name"] == "ca").unwrap();
    assert_eq!(ca["secret"]["secretName"], "ferry-ca");
    // Only the init container sees the CA key; the agent gets its own cert.
    let init = container(ds, "initContainers", "certificate");
    assert_eq!(args(init)[0], "certificate");
    let mounts = |c: &Value| -> Vec<String> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(mounts(init).contains(&"ca".to_string()));
    assert!(
        !mounts(agent).contains(&"ca".to_string()),
        "the agent must not mount the CA key"
    );

    let policy = find(&objects, "MigrationPolicy", "default");
    assert_eq!(policy["spec"]["convergence"]["mode"], "MinimalDowntime");
    assert!(policy["spec"].get("selector").is_none());
}

#[test]
fn generated_ca_issues_host_certificates_the_relay_accepts() {
    use base64::Engine;
    let objects = render(json!({}));
    let secret = find(&objects, "Secret", "ferry-ca");
    let decode = |k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"][k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let ca = ClusterCa::from_pem(&decode("ca.crt"), &decode("ca.key"))
        .expect("the agent loads Helm's generated CA");
    let id = ca.issue_host("node-a").unwrap();
    let der = CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap();
    assert_eq!(host_of_certificate(&der).unwrap(), "node-a");
    let tls = TlsSettings::default();
    tls.server_config(&id).expect("relay server config");
    tls.client_config(&id).expect("relay client config");
    // Two renders generate two different CAs; upgrades keep the first
    // through `lookup` (proven by helm_install).
    let again = render(json!({}));
    assert_ne!(find(&again, "Secret", "ferry-ca")["data"], secret["data"]);
}

#[test]
fn rbac_grants_exactly_what_each_component_needs_and_no_wildcards() {
    for (name, values) in overrides() {
        let objects = render(values);
        for role in all_of(&objects, "ClusterRole")
            .into_iter()
            .chain(all_of(&objects, "Role"))
        {
            for rule in role["rules"].as_array().unwrap() {
                for field in ["verbs", "resources", "apiGroups", "resourceNames"] {
                    let list = rule[field].as_array().cloned().unwrap_or_default();
                    assert!(
                        !list
                            .iter()
                            .any(|x| x.as_str().is_some_and(|s| s.contains('*'))),
                        "{name}: wildcard in {field} of {}: {rule}",
                        role["metadata"]["name"]
                    );
                }
                let resources = rule["resources"].to_string();
                assert!(
                    !resources.contains("secrets"),
                    "{name}: secrets granted: {rule}"
                );
                assert!(!resources.contains("pods"), "{name}: pods granted: {rule}");
            }
            for g in grants(role) {
                assert!(
                    !g.contains(" delete") && !g.contains(" deletecollection"),
                    "{name}: {g}"
                );
            }
        }
    }
    let objects = render(json!({}));
    assert_eq!(
        grants(find(&objects, "ClusterRole", "ferry-agent")),
        expect_grants(&[
            "ferry.dev hosts get list watch create patch",
            "ferry.dev hosts/status get patch",
            "ferry.dev virtualmachines/status get patch",
            "ferry.dev migrations/status get patch",
            "ferry.dev virtualmachines get list watch",
            "ferry.dev migrations get list watch",
            "ferry.dev migrationpolicies get list watch",
        ])
    );
    let agent_role = find(&objects, "Role", "ferry-agent");
    assert_eq!(agent_role["metadata"]["namespace"], "ferry-system");
    assert_eq!(
        grants(agent_role),
        expect_grants(&["coordination.k8s.io leases get create patch update"])
    );
    assert_eq!(
        grants(find(&objects, "ClusterRole", "ferry-controller")),
        expect_grants(&[
            "ferry.dev migrations get list watch create patch update",
            "ferry.dev hostmaintenances get list watch create patch update",
            "ferry.dev migrations/status get patch update",
            "ferry.dev hostmaintenances/status get patch update",
            "ferry.dev virtualmachines/status get patch update",
            "ferry.dev hosts/status get patch update",
            "ferry.dev migrations/finalizers update",
            "ferry.dev hostmaintenances/finalizers update",
            "ferry.dev hosts get list watch patch update",
            "ferry.dev virtualmachines get list watch",
            "ferry.dev migrationpolicies get list watch",
            "core namespaces get list watch",
            "core events create patch",
            "events.k8s.io events create patch",
        ])
    );
    let mut want = expect_grants(&["coordination.k8s.io leases get list watch create"]);
    want.insert("coordination.k8s.io leases update ferry-controller".into());
    want.insert("coordination.k8s.io leases patch ferry-controller".into());
    assert_eq!(grants(find(&objects, "Role", "ferry-controller")), want);
    for binding in all_of(&objects, "ClusterRoleBinding")
        .into_iter()
        .chain(all_of(&objects, "RoleBinding"))
    {
        let who = binding["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": who, "namespace": "ferry-system"}]),
            "{who} binds its own ServiceAccount only"
        );
        assert_eq!(binding["roleRef"]["name"], who);
    }
}

#[test]
fn overrides_reach_the_manifests() {
    let all = overrides();
    let objects = render(all[1].1.clone());
    let ds = find(&objects, "DaemonSet", "ferry-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"role": "hypervisor"}));
    assert_eq!(pod["hostNetwork"], false);
    assert!(pod.get("dnsPolicy").is_none());
    let agent = container(ds, "containers", "agent");
    assert_eq!(
        agent["image"], "ghcr.io/ferry-dev/ferry:0.1.0-agent",
        "host QEMU: the agent image without QEMU"
    );
    assert_eq!(agent["securityContext"]["privileged"], false);
    assert_eq!(
        agent["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(agent["ports"][0].get("hostPort").is_none());
    let a = args(agent);
    for want in [
        "--qemu=/usr/local/bin/ferry-qemu-host",
        "--migration-listen=0.0.0.0:9443",
        "--migration-advertise=10.0.0.1:9443",
        "--label=rack=r1",
        "--capacity-cpus=8",
        "--capacity-memory=32Gi",
        "--tls-cipher-suites=TLS13_AES_128_GCM_SHA256",
        "--no-watchdog",
    ] {
        assert!(
            a.contains(&want.to_string()),
            "agent args lack {want}: {a:?}"
        );
    }
    assert!(agent["env"].to_string().contains("FERRY_HOST_QEMU"));
    assert!(
        agent["env"].to_string().contains("status.podIP"),
        "without host networking the pod's IP is advertised"
    );
    assert!(
        try_find(&objects, "Secret", "ferry-ca").is_none(),
        "existingSecret: no generated CA"
    );
    let ca = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ca")
        .unwrap();
    assert_eq!(ca["secret"]["secretName"], "my-ca");
    assert_eq!(ca["secret"]["items"][0]["key"], "tls.crt");
    assert_eq!(ca["secret"]["items"][1]["key"], "tls.key");

    let objects = render(all[2].1.clone());
    assert_eq!(
        find(&objects, "Deployment", "ferry-controller")["spec"]["replicas"],
        3
    );
    let sm = find(&objects, "ServiceMonitor", "ferry-controller");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        find(&objects, "Service", "ferry-controller-metrics")["spec"]["ports"][0]["port"],
        9090
    );
    find(&objects, "PodDisruptionBudget", "ferry-controller");
    assert!(try_find(&objects, "MigrationPolicy", "default").is_none());
    assert!(try_find(&objects, "Secret", "ferry-ca").is_none());
    let ds = find(&objects, "DaemonSet", "ferry-agent");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(
        ds["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );
    let pki = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pki")
        .unwrap();
    assert_eq!(pki["hostPath"]["path"], "/etc/pki/ferry");
}

#[test]
fn own_object_policy_binds_each_agent_to_its_node() {
    // Offline, Helm's capabilities lack ValidatingAdmissionPolicy: `auto` skips it.
    let objects = render(json!({}));
    assert!(all_of(&objects, "ValidatingAdmissionPolicy").is_empty());
    let objects = render(json!({"agent": {"ownObjectPolicy": {"install": "never"}}}));
    assert!(all_of(&objects, "ValidatingAdmissionPolicy").is_empty());
    let objects = render(json!({"agent": {"ownObjectPolicy": {"install": "always"}}}));
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "ferry-agent-own-objects",
    );
    let text = policy.to_string();
    assert!(
        text.contains("system:serviceaccount:ferry-system:ferry-agent"),
        "{text}"
    );
    assert!(text.contains("authentication.kubernetes.io/node-name"));
    let resources = &policy["spec"]["matchConstraints"]["resourceRules"];
    assert_eq!(
        resources[0]["resources"],
        json!([
            "hosts",
            "hosts/status",
            "virtualmachines/status",
            "migrations/status"
        ])
    );
    assert_eq!(resources[1]["resources"], json!(["leases"]));
    let binding = find(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "ferry-agent-own-objects",
    );
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
}

#[test]
fn dockerfile_builds_the_images_and_paths_the_chart_runs() {
    // Docker cannot run on the development machine; this keeps the
    // Dockerfile and the chart agreeing on stage names and binary paths.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for stage in ["AS build", "AS agent", "AS agent-qemu", "AS runtime"] {
        assert!(
            dockerfile.contains(stage),
            "Dockerfile lacks stage {stage:?}"
        );
    }
    assert!(
        dockerfile.rfind("AS runtime") > dockerfile.rfind("AS agent-qemu"),
        "the small runtime image must be the last (default) stage"
    );
    assert!(
        dockerfile.contains("USER 65532:65532"),
        "runtime image runs as non-root"
    );
    for bin in ["ferry", "ferry-agent", "ferry-controller", "kubectl-ferry"] {
        assert!(
            dockerfile.contains(&format!("--bin {bin} "))
                || dockerfile.contains(&format!("--bin {bin}\n")),
            "{bin} not built"
        );
    }
    assert!(dockerfile.contains("/usr/local/bin/ferry-qemu-host"));
    assert!(dockerfile.contains("qemu-system-x86"));
    let objects = render(json!({"agent": {"qemu": {"mode": "host"}}}));
    let ds = find(&objects, "DaemonSet", "ferry-agent");
    let agent = container(ds, "containers", "agent");
    assert_eq!(agent["command"], json!(["/usr/local/bin/ferry-agent"]));
    assert!(args(agent).contains(&"--qemu=/usr/local/bin/ferry-qemu-host".to_string()));
    let deploy = find(&objects, "Deployment", "ferry-controller");
    assert_eq!(
        container(deploy, "containers", "controller")["command"],
        json!(["/usr/local/bin/ferry-controller"])
    );
}
