//! Crash safety: SIGKILL a server process during a burst of writes; after a
//! restart every acknowledged write is there, and a watch resumed from the
//! last version a watcher saw delivers the rest (or answers 410).
//!
//! The server process is this test binary re-run with only
//! `child_server_entry` selected and `FERRY_APISERVER_CHILD_DIR` set.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

const CHILD_ENV: &str = "FERRY_APISERVER_CHILD_DIR";

/// In the child: serve `DIR` until killed. Run directly (no env): a restart
/// on the same directory keeps the CA, the tokens and the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_server_entry() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let mut config = ferry::apiserver::ApiServerConfig::new(&dir);
        config.listen = "127.0.0.1:0".parse().unwrap();
        ferry::apiserver::serve(config, |handle| {
            std::fs::write(Path::new(&dir).join("ready"), handle.url()).unwrap();
        })
        .await
        .unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = ferry::apiserver::ApiServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let first = ferry::apiserver::start(config.clone()).await.unwrap();
    let token = first.admin_token().to_string();
    let ca = first.ca_pem().to_string();
    let api: Api<ConfigMap> = Api::namespaced(first.admin_client().await.unwrap(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "kept"}})).unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    first.shutdown().await;
    let second = ferry::apiserver::start(config).await.unwrap();
    assert_eq!(second.admin_token(), token);
    assert_eq!(second.ca_pem(), ca);
    let api: Api<ConfigMap> = Api::namespaced(second.admin_client().await.unwrap(), "default");
    assert!(api.get("kept").await.is_ok());
    second.shutdown().await;
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn spawn_server(dir: &Path) -> (ChildGuard, kube::Client) {
    let _ = std::fs::remove_file(dir.join("ready"));
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_server_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    for _ in 0..1000 {
        if dir.join("ready").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kc = kube::config::Kubeconfig::read_from(dir.join("kubeconfig")).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    (guard, kube::Client::try_from(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().to_path_buf();
    let (mut child, client) = spawn_server(&dir).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let start_rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    // A watcher records what it saw before the crash.
    let seen: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let last_rv = Arc::new(Mutex::new(start_rv.clone()));
    let (s2, l2, wapi, wrv) = (seen.clone(), last_rv.clone(), api.clone(), start_rv.clone());
    let watcher = tokio::spawn(async move {
        let Ok(stream) = wapi.watch(&WatchParams::default(), &wrv).await else {
            return;
        };
        let mut stream = stream.boxed();
        while let Some(Ok(WatchEvent::Added(o))) = stream.next().await {
            let rv = o.metadata.resource_version.clone().unwrap();
            s2.lock()
                .unwrap()
                .insert(o.metadata.name.clone().unwrap(), rv.parse().unwrap());
            *l2.lock().unwrap() = rv;
        }
    });

    // Writers record every acknowledged create.
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (api, acked) = (api.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}-{i}");
                let cm: ConfigMap = serde_json::from_value(
                    json!({"metadata": {"name": name}, "data": {"i": i.to_string()}}),
                )
                .unwrap();
                match api.create(&PostParams::default(), &cm).await {
                    Ok(o) => {
                        let rv = o.metadata.resource_version.unwrap().parse().unwrap();
                        acked.lock().unwrap().insert(name, rv);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 60 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.0.wait();
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), watcher).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 60);
    eprintln!("acknowledged before SIGKILL: {}", acked.len());

    let (_child2, client) = spawn_server(&dir).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let list = api.list(&ListParams::default()).await.unwrap();
    let stored: BTreeMap<String, u64> = list
        .items
        .iter()
        .map(|o| {
            (
                o.metadata.name.clone().unwrap(),
                o.metadata
                    .resource_version
                    .clone()
                    .unwrap()
                    .parse()
                    .unwrap(),
            )
        })
        .collect();
    for (name, rv) in &acked {
        assert_eq!(
            stored.get(name),
            Some(rv),
            "acknowledged write {name} at {rv} lost"
        );
    }

    // The watcher saw nothing that is not stored.
    let seen_before = seen.lock().unwrap().clone();
    for (name, rv) in &seen_before {
        assert_eq!(
            stored.get(name),
            Some(rv),
            "watched {name} but it is not stored"
        );
    }
    let end_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    // From before the burst, the persisted event log replays all of it.
    let replayed = resume(&api, &start_rv, end_rv)
        .await
        .expect("the window holds the burst");
    for name in acked.keys() {
        assert!(replayed.contains_key(name), "replay lost {name}");
    }
    // From the last version the watcher saw, it gets what it missed.
    let from = last_rv.lock().unwrap().clone();
    let mut all = seen_before;
    all.extend(
        resume(&api, &from, end_rv)
            .await
            .expect("the window holds the burst"),
    );
    for name in acked.keys() {
        assert!(all.contains_key(name), "watch lost {name}");
    }
}

/// Watch from `from` until `end_rv`; the ADDED objects, or None on 410.
async fn resume(api: &Api<ConfigMap>, from: &str, end_rv: u64) -> Option<BTreeMap<String, u64>> {
    let mut stream = api
        .watch(&WatchParams::default(), from)
        .await
        .unwrap()
        .boxed();
    let mut prev: u64 = from.parse().unwrap();
    let mut got = BTreeMap::new();
    while prev < end_rv {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Added(o) => {
                let rv: u64 = o
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(rv > prev, "events in order");
                prev = rv;
                got.insert(o.metadata.name.unwrap(), rv);
            }
            WatchEvent::Error(e) => {
                assert_eq!(e.code, 410);
                return None;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    Some(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_restarts_with_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, client) = spawn_server(tmp.path()).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "kept"}})).unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let (_child, client) = spawn_server(tmp.path()).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    assert!(api.get("kept").await.is_ok());
}
