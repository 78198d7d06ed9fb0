//! Paginated lists are snapshots: every page of a `limit`/`continue` walk
//! shows the objects as they were at the first page's resourceVersion, and
//! a token whose snapshot was compacted away answers 410 Expired with a
//! fresh token that continues at the latest version, as kube-apiserver does.

mod common;

use common::*;
use serde_json::{Value, json};

const CM: &str = "/api/v1/namespaces/default/configmaps";

fn cm(name: &str, v: &str) -> Value {
    json!({"metadata": {"name": name}, "data": {"v": v}})
}

fn page_items(page: &Value) -> Vec<(String, String)> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["metadata"]["name"].as_str().unwrap().to_string(),
                i["data"]["v"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn token(page: &Value) -> String {
    page["metadata"]["continue"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn later_pages_come_from_the_first_pages_snapshot() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    for n in ["a", "b", "c", "d", "e"] {
        assert_eq!(post(&c, CM, cm(n, "1")).await.0, 201);
    }
    let (code, first) = get(&c, &format!("{CM}?limit=2")).await;
    assert_eq!(code, 200);
    let rv = first["metadata"]["resourceVersion"].clone();
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let first_names: Vec<String> = page_items(&first).into_iter().map(|(n, _)| n).collect();
    assert_eq!(first_names, ["a", "b"]);

    // Between pages: a deleted object still to come, a new one, a change.
    assert_eq!(delete(&c, &format!("{CM}/c"), None).await.0, 200);
    assert_eq!(post(&c, CM, cm("bb", "1")).await.0, 201);
    assert_eq!(post(&c, CM, cm("zz", "1")).await.0, 201);
    let (_, mut d) = get(&c, &format!("{CM}/d")).await;
    d["data"]["v"] = json!("2");
    assert_eq!(put(&c, &format!("{CM}/d"), d).await.0, 200);

    let (code, second) = get(&c, &format!("{CM}?limit=2&continue={}", token(&first))).await;
    assert_eq!(code, 200);
    assert_eq!(second["metadata"]["resourceVersion"], rv);
    assert_eq!(
        page_items(&second),
        [("c".to_string(), "1".to_string()), ("d".into(), "1".into())]
    );
    let (code, third) = get(&c, &format!("{CM}?limit=2&continue={}", token(&second))).await;
    assert_eq!(code, 200);
    assert_eq!(page_items(&third), [("e".to_string(), "1".to_string())]);
    assert!(third["metadata"].get("continue").is_none_or(|t| t == ""));

    // A fresh list sees the present.
    let (_, now) = get(&c, CM).await;
    let names: Vec<String> = page_items(&now).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"bb".to_string()) && !names.contains(&"c".to_string()));
}

#[tokio::test]
async fn a_compacted_snapshot_is_410_with_a_token_to_continue_inconsistently() {
    let s = TestServer::start_with(|c| c.event_window = 4).await;
    let c = s.admin().await;
    for n in ["a", "b", "c", "d"] {
        assert_eq!(post(&c, CM, cm(n, "1")).await.0, 201);
    }
    let (_, first) = get(&c, &format!("{CM}?limit=2")).await;
    // More writes than the event window keeps.
    for i in 0..6 {
        assert_eq!(post(&c, CM, cm(&format!("x{i}"), "1")).await.0, 201);
    }
    let (code, gone) = get(&c, &format!("{CM}?limit=2&continue={}", token(&first))).await;
    assert_eq!(code, 410, "{gone}");
    assert_eq!(gone["kind"], "Status");
    assert_eq!(gone["reason"], "Expired");
    assert!(
        gone["message"]
            .as_str()
            .unwrap()
            .starts_with("The provided continue parameter is too old"),
        "{gone}"
    );
    // The fresh token continues after the last key, at the latest version.
    let fresh = gone["metadata"]["continue"].as_str().unwrap();
    let (code, next) = get(&c, &format!("{CM}?limit=2&continue={fresh}")).await;
    assert_eq!(code, 200, "{next}");
    let names: Vec<String> = page_items(&next).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["c", "d"]);
    let latest: u64 = next["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let first_rv: u64 = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(latest > first_rv);
    // And its own token pins that latest version.
    let (code, rest) = get(&c, &format!("{CM}?limit=100&continue={}", token(&next))).await;
    assert_eq!(code, 200);
    assert_eq!(
        rest["metadata"]["resourceVersion"],
        next["metadata"]["resourceVersion"]
    );
    assert_eq!(page_items(&rest).len(), 6);
}

/// Every item of a list is the object a get returns: with its apiVersion
/// and kind (written straight from storage), and in the version's shape for
/// events.k8s.io/v1 (stored in the core shape).
#[tokio::test]
async fn list_items_are_what_a_get_returns() {
    let s = TestServer::start().await;
    let c = s.admin().await;
    for n in ["a", "b"] {
        assert_eq!(post(&c, CM, cm(n, "1")).await.0, 201);
    }
    let (code, list) = get(&c, CM).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["apiVersion"], "v1");
    for item in list["items"].as_array().unwrap() {
        let name = item["metadata"]["name"].as_str().unwrap();
        let (_, one) = get(&c, &format!("{CM}/{name}")).await;
        assert_eq!(item, &one, "{name}");
        assert_eq!(item["apiVersion"], "v1");
        assert_eq!(item["kind"], "ConfigMap");
    }

    const EV: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
    let event = json!({"metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"kind": "Pod", "name": "p"}, "note": "hello", "reason": "R", "type": "Normal",
        "action": "A", "reportingController": "ferry.dev/test", "reportingInstance": "t"});
    assert_eq!(post(&c, EV, event).await.0, 201);
    let (code, list) = get(&c, EV).await;
    assert_eq!(code, 200);
    let item = &list["items"][0];
    let (_, one) = get(&c, &format!("{EV}/e1")).await;
    assert_eq!(item, &one);
    assert_eq!(item["note"], "hello");
    assert_eq!(item["apiVersion"], "events.k8s.io/v1");
}
