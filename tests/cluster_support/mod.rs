//! A whole Ferry cluster in one test process: the embedded API server, the
//! CRDs, the controller and one agent per host (loopback relay ports), with
//! every QEMU killed on drop.
//!
//! The controller and each agent run on a runtime of their own, in a thread
//! of their own ([`Component`]): killing one drops every task it spawned at
//! once, as the death of its process would (the QEMUs, in sessions of their
//! own, live on), and it can be started again on the same state. The API
//! server can be stopped and started again on the same data directory and
//! port ([`Cluster::restart_api`]).
#![allow(dead_code)]

pub mod vcpu;

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
    /// The controller's leader Lease (how long a successor waits for a
    /// killed controller's term to lapse).
    pub leader_lease: Duration,
    /// The controller's retries of a drain's failed migrations.
    pub drain_retry: ferry::core::drain::RetryPolicy,
}

impl Options {
    /// Hosts with the defaults: 10 s leases, 40 s fencing, no watchdog.
    pub fn hosts(hosts: &[&str]) -> Options {
        Options {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            lease_duration: Duration::from_secs(10),
            fence_after: Duration::from_secs(40),
            watchdog: false,
            leader_lease: ferry::controller::ControllerConfig::default().leader_lease,
            drain_retry: ferry::core::drain::RetryPolicy::default(),
        }
    }
}

/// A component (the controller, an agent) on a Tokio runtime of its own in
/// a thread of its own. [`Component::kill`] ends the runtime: every task it
/// spawned is dropped at its next await, no shutdown code runs — what the
/// death of its process does to it. Dropped, it is killed.
pub struct Component {
    stop: CancellationToken,
    kill: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Component {
    /// Run `body(stop)` on a new two-thread runtime named `name`.
    pub fn spawn<F, Fut>(name: &str, body: F) -> Component
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let (graceful, killed) = (stop.clone(), kill.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for a test component");
                runtime.block_on(async move {
                    tokio::select! {
                        _ = body(graceful) => {}
                        _ = killed.cancelled() => {}
                    }
                });
                runtime.shutdown_background();
            })
            .expect("a thread for a test component");
        Component {
            stop,
            kill,
            thread: Some(thread),
        }
    }

    /// Ask it to stop the way it does on a signal (its own shutdown path).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// End it at once, dropping every task it spawned; returns when its
    /// runtime is gone.
    pub fn kill(mut self) {
        self.kill.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

/// A running cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api: Option<ApiServerHandle>,
    api_config: ApiServerConfig,
    pub client: kube::Client,
    pub hosts: Vec<String>,
    agent_configs: Vec<AgentConfig>,
    agents: std::sync::Mutex<Vec<(String, Component)>>,
    controller: std::sync::Mutex<Option<Component>>,
    options: Options,
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
        let api_config = config.clone();
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
        let mut agent_configs = Vec::new();
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
            agents.push((host.to_string(), start_agent(&config, &client)));
            agent_configs.push(config);
        }
        let controller = start_controller(&options, &client);
        let cluster = Cluster {
            dir,
            api: Some(api),
            api_config,
            client,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            agent_configs,
            agents: std::sync::Mutex::new(agents),
            controller: std::sync::Mutex::new(Some(controller)),
            options: options.clone(),
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
        let mut agents = self.agents.lock().unwrap();
        if let Some(i) = agents.iter().position(|(h, _)| h == host) {
            agents.remove(i).1.kill();
        }
    }

    /// Start a host's agent again (after [`Cluster::kill_agent`]) with the
    /// same configuration and state directory: it adopts the QEMUs it finds.
    pub fn restart_agent(&self, host: &str) {
        let config = self
            .agent_configs
            .iter()
            .find(|c| c.host == host)
            .unwrap_or_else(|| panic!("no agent for {host}"));
        let mut agents = self.agents.lock().unwrap();
        assert!(
            agents.iter().all(|(h, _)| h != host),
            "the agent of {host} still runs"
        );
        agents.push((host.to_string(), start_agent(config, &self.client)));
    }

    /// Kill the controller (no graceful shutdown: its leader Lease is left
    /// to lapse).
    pub fn kill_controller(&self) {
        if let Some(c) = self.controller.lock().unwrap().take() {
            c.kill();
        }
    }

    /// Start a new controller (a new identity) after
    /// [`Cluster::kill_controller`]; it leads once the old term lapses.
    pub fn restart_controller(&self) {
        let mut controller = self.controller.lock().unwrap();
        assert!(controller.is_none(), "the controller still runs");
        *controller = Some(start_controller(&self.options, &self.client));
    }

    /// Stop the API server (ending its connections and watches) and start it
    /// again on the same data directory and port after `down`; every client
    /// reconnects.
    pub async fn restart_api(&mut self, down: Duration) {
        self.stop_api().await;
        tokio::time::sleep(down).await;
        self.start_api().await;
    }

    /// Stop the API server, ending its connections and watches; its port
    /// is kept for [`Cluster::start_api`].
    pub async fn stop_api(&mut self) {
        let old = self.api.take().expect("the API server runs");
        self.api_config.listen = old.addr();
        old.shutdown().await;
    }

    /// Start the API server again on its data directory and port.
    pub async fn start_api(&mut self) {
        assert!(self.api.is_none(), "the API server runs");
        let config = self.api_config.clone();
        // The port was ours a moment ago; retry while the kernel lets go of it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let api = loop {
            match ferry::apiserver::start(config.clone()).await {
                Ok(api) => break api,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restarting the API server: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the API server does not start again: {e}"),
            }
        };
        self.api = Some(api);
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

/// Run an agent as a [`Component`].
fn start_agent(config: &AgentConfig, client: &kube::Client) -> Component {
    let (config, client) = (config.clone(), client.clone());
    Component::spawn(&format!("agent-{}", config.host), move |stop| async move {
        if let Err(e) = ferry::agent::daemon::run(config, client, stop).await {
            panic!("agent failed: {e}");
        }
    })
}

/// Run a controller (a fresh identity) as a [`Component`].
fn start_controller(options: &Options, client: &kube::Client) -> Component {
    let config = ferry::controller::ControllerConfig {
        lease_duration: options.lease_duration,
        leader_lease: options.leader_lease,
        drain_retry: options.drain_retry,
        ..ferry::controller::ControllerConfig::default()
    };
    let client = client.clone();
    Component::spawn("controller", move |stop| async move {
        ferry::controller::run(client, config, stop).await.unwrap();
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(mut c) = self.controller.lock() {
            c.take();
        }
        if let Ok(mut agents) = self.agents.lock() {
            agents.clear();
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
