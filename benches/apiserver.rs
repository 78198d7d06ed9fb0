//! Throughput and latency of the embedded API server, measured through
//! kube-rs over HTTPS as a client sees them (client and server in one
//! process; storage in a temp dir on the machine's disk, fsync per write).
//!
//! `cargo bench --bench apiserver` prints: create, update and get
//! throughput; watch delivery latency (write acknowledged → event received)
//! p50/p99; list of 1,000 / 3,000 / 10,000 objects; resident memory with as many
//! VirtualMachines (Ferry's CRD and example object).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams};
use kube::discovery::ApiResource;
use serde_json::json;

const CONCURRENCY: usize = 8;

fn cm(name: &str, i: usize) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"bench": "yes"}}, "data": {"i": i.to_string()}})).unwrap()
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn parallel<F, Fut>(n: usize, f: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                f(i).await;
                i += CONCURRENCY;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ferry::apiserver::ApiServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = ferry::apiserver::start(config).await.unwrap();
    let client = server.admin_client().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let n = 2000;
    let api = cms.clone();
    let t = parallel(n, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &cm(&format!("c{i}"), i))
                .await
                .unwrap();
        }
    })
    .await;
    println!(
        "create: {n} in {t:?} = {:.0}/s ({CONCURRENCY} clients)",
        n as f64 / t.as_secs_f64()
    );

    let api = cms.clone();
    let t = parallel(n, move |i| {
        let api = api.clone();
        async move {
            let mut o = api.get(&format!("c{i}")).await.unwrap();
            o.data = Some([("i".to_string(), format!("{i}-2"))].into());
            api.replace(&format!("c{i}"), &PostParams::default(), &o)
                .await
                .unwrap();
        }
    })
    .await;
    println!(
        "get+update: {n} in {t:?} = {:.0}/s",
        n as f64 / t.as_secs_f64()
    );

    let gets = 10_000;
    let api = cms.clone();
    let t = parallel(gets, move |i| {
        let api = api.clone();
        async move {
            api.get(&format!("c{}", i % n)).await.unwrap();
        }
    })
    .await;
    println!(
        "get: {gets} in {t:?} = {:.0}/s",
        gets as f64 / t.as_secs_f64()
    );

    // Watch latency: acknowledged → received, one write at a time.
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let rv = cms
        .list(&ListParams::default().limit(1))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let r2 = received.clone();
    tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Added(o) = ev {
                r2.lock()
                    .unwrap()
                    .insert(o.metadata.name.unwrap(), Instant::now());
            }
        }
    });
    let mut latencies = Vec::new();
    for i in 0..500 {
        let name = format!("w{i}");
        cms.create(&PostParams::default(), &cm(&name, i))
            .await
            .unwrap();
        let acked = Instant::now();
        loop {
            if let Some(at) = received.lock().unwrap().get(&name) {
                latencies.push(at.saturating_duration_since(acked));
                break;
            }
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
    }
    latencies.sort();
    println!(
        "watch latency (ack → event): p50 {:?}, p99 {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );

    // 10,000 VirtualMachines: list time and memory.
    let root = env!("CARGO_MANIFEST_DIR");
    let crd: CustomResourceDefinition = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/crds/virtualmachines.ferry.dev.yaml")).unwrap(),
    )
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
    kube::runtime::wait::await_condition(
        crds,
        "virtualmachines.ferry.dev",
        kube::runtime::wait::conditions::is_crd_established(),
    )
    .await
    .unwrap();
    let ar = ApiResource {
        group: "ferry.dev".into(),
        version: "v1alpha1".into(),
        api_version: "ferry.dev/v1alpha1".into(),
        kind: "VirtualMachine".into(),
        plural: "virtualmachines".into(),
    };
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let template: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/examples/vm-memtest.yaml")).unwrap(),
    )
    .unwrap();
    // Grown in steps to see whether list time and memory grow linearly:
    // at each size, resident memory (before listing) and the median of 3
    // full lists, each also per 1,000 objects.
    let before = rss_mib();
    println!("resident memory: {before:.0} MiB with no VirtualMachine stored");
    let mut stored = 0usize;
    for size in [1_000usize, 3_000, 10_000] {
        let api = vms.clone();
        let template = template.clone();
        let from = stored;
        let t = parallel(size - stored, move |i| {
            let api = api.clone();
            let mut obj = template.clone();
            obj["metadata"]["name"] = json!(format!("vm-{}", from + i));
            async move {
                let o: DynamicObject = serde_json::from_value(obj).unwrap();
                api.create(&PostParams::default(), &o).await.unwrap();
            }
        })
        .await;
        println!(
            "create VirtualMachine (schema admission): {} in {t:?} = {:.0}/s",
            size - stored,
            (size - stored) as f64 / t.as_secs_f64()
        );
        stored = size;
        let rss = rss_mib();
        let mut lists = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let list = vms.list(&ListParams::default()).await.unwrap();
            assert_eq!(list.items.len(), size);
            lists.push(start.elapsed());
        }
        lists.sort();
        let list = lists[1];
        // The same list as bytes only: the server and the transfer, without
        // the client parsing 10,000 objects.
        let mut raws = Vec::new();
        for _ in 0..3 {
            let request = axum::http::Request::get(
                "/apis/ferry.dev/v1alpha1/namespaces/default/virtualmachines",
            )
            .body(Vec::new())
            .unwrap();
            let start = Instant::now();
            let body = client.request_text(request).await.unwrap();
            raws.push((start.elapsed(), body.len()));
        }
        raws.sort();
        let (raw, bytes) = raws[1];
        let per_k = size as f64 / 1000.0;
        println!(
            "{size} VirtualMachines: list {list:?} ({:.1} ms per 1,000), of which server and \
             transfer of {:.1} MiB {raw:?} ({:.1} ms per 1,000); resident {rss:.0} MiB \
             ({:.2} MiB per 1,000 above empty)",
            list.as_secs_f64() * 1e3 / per_k,
            bytes as f64 / (1 << 20) as f64,
            raw.as_secs_f64() * 1e3 / per_k,
            (rss - before) / per_k
        );
    }
    server.shutdown().await;
}
