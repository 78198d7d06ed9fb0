//! Watches that ask for `meta.k8s.io/v1` Tables (`kubectl get -w`): every
//! event's object is a Table of one row, through raw HTTP and through the
//! real kubectl, for a CRD's printer columns and a built-in kind.

mod common;

use std::process::Stdio;
use std::time::Duration;

use axum::http::Request;
use common::kubectl::Kubectl;
use common::*;
use futures::StreamExt;
use kube::api::WatchEvent;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

async fn table_watch(
    c: &kube::Client,
    path: &str,
) -> impl futures::Stream<Item = WatchEvent<Value>> + Unpin {
    let req = Request::builder()
        .uri(format!("{path}?watch=true&timeoutSeconds=30"))
        .header("accept", TABLE)
        .body(Vec::new())
        .unwrap();
    c.request_events::<Value>(req)
        .await
        .unwrap()
        .map(|e| e.expect("event decodes"))
        .boxed()
}

async fn next(s: &mut (impl futures::Stream<Item = WatchEvent<Value>> + Unpin)) -> (String, Value) {
    let ev = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("event in time")
        .expect("stream open");
    match ev {
        WatchEvent::Added(o) => ("ADDED".into(), o),
        WatchEvent::Modified(o) => ("MODIFIED".into(), o),
        WatchEvent::Deleted(o) => ("DELETED".into(), o),
        other => panic!("unexpected {other:?}"),
    }
}

fn cells(table: &Value) -> Vec<Value> {
    assert_eq!(table["kind"], "Table", "{table}");
    assert_eq!(table["apiVersion"], "meta.k8s.io/v1");
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{table}");
    rows[0]["cells"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_are_one_row_tables_for_custom_and_builtin_kinds() {
    let srv = TestServer::start().await;
    let c = srv.admin().await;
    install_widget_crd(&c).await;
    let widgets = "/apis/test.ferry.dev/v1/namespaces/default/widgets";
    let (code, _) = post(&c, widgets, widget("w1", 1)).await;
    assert_eq!(code, 201);

    let mut s = table_watch(&c, widgets).await;
    let (ty, t) = next(&mut s).await;
    assert_eq!(ty, "ADDED");
    let names: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Name", "Size"]);
    assert_eq!(cells(&t), [json!("w1"), json!(1)]);
    assert!(t["metadata"]["resourceVersion"].is_string(), "{t}");
    // The row carries the object's metadata (includeObject=Metadata).
    assert_eq!(
        t["rows"][0]["object"]["kind"], "PartialObjectMetadata",
        "{t}"
    );

    let (code, _) = post(&c, widgets, widget("w2", 7)).await;
    assert_eq!(code, 201);
    let (ty, t) = next(&mut s).await;
    assert_eq!(
        (ty.as_str(), cells(&t)),
        ("ADDED", vec![json!("w2"), json!(7)])
    );
    let (code, _) = delete(&c, &format!("{widgets}/w2"), None).await;
    assert_eq!(code, 200);
    let (ty, t) = next(&mut s).await;
    assert_eq!(
        (ty.as_str(), cells(&t)[0].clone()),
        ("DELETED", json!("w2"))
    );

    // A built-in kind: ConfigMaps with the real printer's DATA column.
    let cms = "/api/v1/namespaces/default/configmaps";
    let mut s = table_watch(&c, cms).await;
    let (code, _) = post(
        &c,
        cms,
        json!({"metadata": {"name": "c1"}, "data": {"a": "1", "b": "2"}}),
    )
    .await;
    assert_eq!(code, 201);
    let (ty, t) = loop {
        // kube-root-ca.crt and other bootstrap objects come first.
        let (ty, t) = next(&mut s).await;
        if cells(&t)[0] == "c1" {
            break (ty, t);
        }
    };
    assert_eq!(ty, "ADDED");
    assert_eq!(t["columnDefinitions"][1]["name"], "Data");
    assert_eq!(cells(&t)[1], 2);
}

/// Lines of a running `kubectl get -w`, killed on drop.
struct Watching {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Watching {
    fn start(k: &Kubectl, args: &[&str]) -> Self {
        let mut child = k
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }
    /// The next line whose first column is `name`, skipping others.
    async fn line_for(&mut self, name: &str) -> Vec<String> {
        let mut skipped = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                let cols: Vec<String> = line.split_whitespace().map(String::from).collect();
                if cols.first().map(String::as_str) == Some(name) {
                    return Some(cols);
                }
                skipped.push(line);
            }
            None
        })
        .await;
        match found {
            Ok(Some(cols)) => cols,
            _ => panic!("no line for {name}; kubectl printed {skipped:?}"),
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_prints_rows_for_new_objects() {
    let srv = TestServer::start().await;
    let c = srv.admin().await;
    let k = Kubectl::new(&srv);
    install_widget_crd(&c).await;
    let widgets = "/apis/test.ferry.dev/v1/namespaces/default/widgets";
    let (code, _) = post(&c, widgets, widget("w1", 3)).await;
    assert_eq!(code, 201);

    let mut w = Watching::start(&k, &["get", "widgets", "-w"]);
    assert_eq!(w.line_for("NAME").await, ["NAME", "SIZE"]);
    assert_eq!(w.line_for("w1").await, ["w1", "3"]);
    // Rows from the watch carry the printer columns.
    let (code, _) = post(&c, widgets, widget("w2", 7)).await;
    assert_eq!(code, 201);
    assert_eq!(w.line_for("w2").await, ["w2", "7"]);
    drop(w);

    let cms = "/api/v1/namespaces/default/configmaps";
    let (code, _) = post(&c, cms, json!({"metadata": {"name": "seed"}})).await;
    assert_eq!(code, 201);
    let mut w = Watching::start(&k, &["get", "configmaps", "-w"]);
    assert_eq!(w.line_for("NAME").await, ["NAME", "DATA", "AGE"]);
    assert_eq!(w.line_for("seed").await[1], "0");
    let (code, _) = post(
        &c,
        cms,
        json!({"metadata": {"name": "fresh"}, "data": {"a": "1", "b": "2", "c": "3"}}),
    )
    .await;
    assert_eq!(code, 201);
    let row = w.line_for("fresh").await;
    assert_eq!(row[1], "3", "{row:?}");
}
