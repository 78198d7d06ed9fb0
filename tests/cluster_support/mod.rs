//! A whole Ferry cluster in one test process: the embedded API server, the
//! CRDs, the controller and one agent per host (loopback relay ports), with
//! every QEMU killed on drop.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry::agent::daemon::AgentConfig;
use ferry::agent::pki::{ClusterCa, TlsSettings};
use ferry::apiserver::{ApiServerConfig, ApiServerHandle};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// Poll `probe` until it returns `Some`, or give up after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a test cluster runs.
#[derive(Clone)]
pub struct Options {
    /// Host names.
    pub hosts: Vec<String>,
    /// The agents' Lease duration (and the controller's Unreachable threshold).
    pub lease_duration: Duration,
    /// The agents' fencing delay.
    pub fence_after: Duration,
    /// Run each host's fencing watchdog (in a thread of the test).
    pub watchdog: bool,
}

impl Options {
    /// Hosts with the defaults: 10 s leases, 40 s fencing, no watchdog.
    pub fn hosts(hosts: &[&str]) -> Options {
        Options {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            lease_duration: Duration::from_secs(10),
            fence_after: Duration::from_secs(40),
            watchdog: false,
        }
    }
}

/// A running cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api: Option<ApiServerHandle>,
    pub client: kube::Client,
    pub hosts: Vec<String>,
    pub agents: Vec<(String, CancellationToken)>,
    pub controller: CancellationToken,
}

impl Cluster {
    /// Start the API server, install the CRDs, then the controller and one
    /// agent per host.
    pub async fn start(hosts: &[&str]) -> Cluster {
        Cluster::start_with(Options::hosts(hosts)).await
    }

    /// As [`Cluster::start`], with options.
    pub async fn start_with(options: Options) -> Cluster {
        let hosts: Vec<&str> = options.hosts.iter().map(String::as_str).collect();
        let hosts = hosts.as_slice();
        let dir = tempfile::Builder::new()
            .prefix("fc")
            .tempdir_in("/tmp")
            .unwrap();
        let mut config = ApiServerConfig::new(dir.path().join("api"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.agents = hosts.iter().map(|h| h.to_string()).collect();
        let api = ferry::apiserver::start(config).await.unwrap();
        let client = api.admin_client().await.unwrap();
        install_crds(&client).await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(ferry::api::SYSTEM_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => panic!("creating ferry-system: {e}"),
        }
        let ca = ClusterCa::generate("ferry test CA").unwrap();
        let mut agents = Vec::new();
        for host in hosts {
            let pki_dir = dir.path().join(host).join("pki");
            ca.issue_host(host).unwrap().save(&pki_dir).unwrap();
            // Port 0: the relay binds a free port and publishes it (a port
            // picked here and bound later could be taken in between).
            let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let config = AgentConfig {
                host: host.to_string(),
                cluster: "default".into(),
                labels: Default::default(),
                state_dir: dir.path().join(host).join("state"),
                qemu_binary: ferry::agent::qemu::DEFAULT_QEMU.into(),
                migration_listen: listen,
                migration_advertise: None,
                pki_dir,
                tls: TlsSettings::default(),
                capacity_cpus: 4,
                capacity_memory: Some(1 << 30),
                lease_duration: options.lease_duration,
                renew_interval: Duration::from_millis(500),
                fence_after: options.fence_after,
                simulated_load_file: None,
                stall_timeout: Duration::from_secs(10),
                watchdog: false,
                networks: Default::default(),
            };
            if options.watchdog {
                let state_dir = config.state_dir.clone();
                std::fs::create_dir_all(&state_dir).unwrap();
                ferry::agent::daemon::watchdog::touch(&state_dir, options.fence_after).unwrap();
                std::thread::spawn(move || ferry::agent::daemon::watchdog::run(&state_dir));
            }
            let token = CancellationToken::new();
            let agent_client = client.clone();
            let stop = token.clone();
            tokio::spawn(async move {
                if let Err(e) = ferry::agent::daemon::run(config, agent_client, stop).await {
                    panic!("agent failed: {e}");
                }
            });
            agents.push((host.to_string(), token));
        }
        let controller = CancellationToken::new();
        let stop = controller.clone();
        let controller_client = client.clone();
        tokio::spawn(async move {
            let config = ferry::controller::ControllerConfig {
                lease_duration: options.lease_duration,
                ..ferry::controller::ControllerConfig::default()
            };
            ferry::controller::run(controller_client, config, stop)
                .await
                .unwrap();
        });
        let cluster = Cluster {
            dir,
            api: Some(api),
            client,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            agents,
            controller,
        };
        let hosts_api: Api<ferry::api::Host> = Api::all(cluster.client.clone());
        wait_for(Duration::from_secs(30), || async {
            let list = hosts_api.list(&Default::default()).await.ok()?;
            let active = list
                .items
                .iter()
                .filter(|h| {
                    h.status.as_ref().is_some_and(|s| {
                        s.phase == ferry::api::HostPhase::Active && s.capacity.is_some()
                    })
                })
                .count();
            (active == cluster.hosts.len()).then_some(())
        })
        .await
        .expect("every host is published and Active");
        cluster
    }

    /// Stop a host's agent the way a crash does: its QEMUs keep running, its
    /// Lease is no longer renewed (its watchdog, if any, goes on).
    pub fn kill_agent(&self, host: &str) {
        for (h, token) in &self.agents {
            if h == host {
                token.cancel();
            }
        }
    }

    /// A host's agent state directory.
    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host).join("state")
    }

    /// The serial console socket of a VM on a host.
    pub fn serial_socket(&self, host: &str, namespace: &str, name: &str) -> PathBuf {
        self.state_dir(host)
            .join("vms")
            .join(format!("{namespace}.{name}"))
            .join("serial.sock")
    }

    /// Pids of the QEMUs alive under a host's state directory.
    pub fn running_qemus(&self, host: &str) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.state_dir(host).join("vms")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
            .filter_map(|s| s.trim().parse::<i32>().ok())
            .filter(|pid| ferry::agent::qemu::pid_alive(*pid))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.controller.cancel();
        for (_, token) in &self.agents {
            token.cancel();
        }
        for host in self.hosts.clone() {
            let _ = ferry::agent::daemon::watchdog::stand_down(&self.state_dir(&host));
            for pid in self.running_qemus(&host) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Create Ferry's CRDs and wait until each is Established.
pub async fn install_crds(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ferry::api::crds() {
        api.create(&PostParams::default(), &crd).await.unwrap();
    }
    for crd in ferry::api::crds() {
        let name = crd.metadata.name.clone().unwrap();
        wait_for(Duration::from_secs(10), || async {
            let crd = api.get(&name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{name} is not Established"));
    }
}
