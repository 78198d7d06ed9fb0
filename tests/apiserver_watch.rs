//! Watch semantics: ordered events from a resourceVersion, resume, 410 for a
//! compacted version, bookmarks, streaming lists, selector transitions; and
//! kube-rs watchers and reflectors working unmodified.

mod common;

use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

async fn next_event(
    s: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
) -> WatchEvent<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("event decodes")
}

fn describe(e: &WatchEvent<ConfigMap>) -> String {
    match e {
        WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.as_deref().unwrap()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.metadata.name.as_deref().unwrap()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.metadata.name.as_deref().unwrap()),
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(e) => format!("ERROR {}", e.code),
    }
}

#[tokio::test]
async fn watch_from_a_list_version_sees_every_change_in_order() {
    let s = TestServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(s.admin().await, "default");
    api.create(&PostParams::default(), &cm("before", json!({})))
        .await
        .unwrap();
    let list = api.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.clone().unwrap();

    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut a = api
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    a.data = Some([("k".to_string(), "w".to_string())].into());
    api.replace("a", &PostParams::default(), &a).await.unwrap();
    api.delete("a", &Default::default()).await.unwrap();
    let got: Vec<String> = vec![
        describe(&next_event(&mut stream).await),
        describe(&next_event(&mut stream).await),
        describe(&next_event(&mut stream).await),
    ];
    assert_eq!(got, ["ADDED a", "MODIFIED a", "DELETED a"]);

    // Resuming from the version of the first event replays the other two.
    let mut again = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let first = next_event(&mut again).await;
    let WatchEvent::Added(o) = &first else {
        panic!("{}", describe(&first))
    };
    let rv1 = o.metadata.resource_version.clone().unwrap();
    let mut resumed = api
        .watch(&WatchParams::default(), &rv1)
        .await
        .unwrap()
        .boxed();
    assert_eq!(describe(&next_event(&mut resumed).await), "MODIFIED a");
    assert_eq!(describe(&next_event(&mut resumed).await), "DELETED a");
}

#[tokio::test]
async fn compacted_version_is_gone() {
    let s = TestServer::start_with(|c| c.event_window = 3).await;
    let api: Api<ConfigMap> = Api::namespaced(s.admin().await, "default");
    let first = api
        .create(&PostParams::default(), &cm("x0", json!({})))
        .await
        .unwrap();
    for i in 1..6 {
        api.create(&PostParams::default(), &cm(&format!("x{i}"), json!({})))
            .await
            .unwrap();
    }
    let old = first.metadata.resource_version.unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410, got {}", describe(&other)),
    }
}

#[tokio::test]
async fn streaming_list_ends_with_initial_events_bookmark_and_selectors_transition() {
    let s = TestServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(s.admin().await, "default");
    api.create(&PostParams::default(), &cm("web1", json!({"tier": "web"})))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("db1", json!({"tier": "db"})))
        .await
        .unwrap();
    let wp = WatchParams::streaming_lists().labels("tier=web");
    let mut stream = api.watch(&wp, "").await.unwrap().boxed();
    assert_eq!(describe(&next_event(&mut stream).await), "ADDED web1");
    match next_event(&mut stream).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(
                b.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str),
                Some("true")
            )
        }
        other => panic!("expected bookmark, got {}", describe(&other)),
    }
    // db1 starts matching: ADDED; web1 stops matching: DELETED.
    let mut db1 = api.get("db1").await.unwrap();
    db1.metadata.labels = Some([("tier".to_string(), "web".to_string())].into());
    api.replace("db1", &PostParams::default(), &db1)
        .await
        .unwrap();
    let mut web1 = api.get("web1").await.unwrap();
    web1.metadata.labels = Some([("tier".to_string(), "db".to_string())].into());
    api.replace("web1", &PostParams::default(), &web1)
        .await
        .unwrap();
    assert_eq!(describe(&next_event(&mut stream).await), "ADDED db1");
    assert_eq!(describe(&next_event(&mut stream).await), "DELETED web1");
}

#[tokio::test]
async fn kube_runtime_watcher_and_reflector_track_the_store() {
    let s = TestServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(s.admin().await, "default");
    for config in [
        watcher::Config::default(),
        watcher::Config::default().streaming_lists(),
    ] {
        let (reader, writer) = reflector::store::<ConfigMap>();
        let rf = reflector(writer, watcher(api.clone(), config)).applied_objects();
        let task = tokio::spawn(async move { rf.try_for_each(|_| async { Ok(()) }).await });
        reader.wait_until_ready().await.unwrap();
        let name = format!("r{}", reader.state().len());
        api.create(&PostParams::default(), &cm(&name, json!({})))
            .await
            .unwrap();
        let r = reader.clone();
        let n = name.clone();
        eventually(|| {
            let r = r.clone();
            let n = n.clone();
            async move {
                r.state()
                    .iter()
                    .any(|c| c.metadata.name.as_deref() == Some(&n))
                    .then_some(())
            }
        })
        .await;
        api.delete(&name, &Default::default()).await.unwrap();
        eventually(|| {
            let r = reader.clone();
            let n = name.clone();
            async move {
                (!r.state()
                    .iter()
                    .any(|c| c.metadata.name.as_deref() == Some(&n)))
                .then_some(())
            }
        })
        .await;
        task.abort();
    }
}
