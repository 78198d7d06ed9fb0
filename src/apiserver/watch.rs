//! Watch: a stream of newline-delimited `{"type", "object"}` events.
//!
//! ```text
//! resourceVersion unset / "0" ─► ADDED for every current object, then follow
//! sendInitialEvents=true      ─► ADDED for every current object, BOOKMARK
//!                                 (k8s.io/initial-events-end), then follow
//! resourceVersion=N           ─► replay the log after N, then follow;
//!                                 N compacted ─► one ERROR event: 410 Expired
//! follow: broadcast channel, deduplicated by resourceVersion; BOOKMARK
//!         every BOOKMARK_INTERVAL if allowWatchBookmarks; ends at
//!         timeoutSeconds, on shutdown, or if the watcher falls too far behind
//!         (the client re-watches from its last resourceVersion)
//! ```
//!
//! With a label selector, a MODIFIED event that makes an object stop (start)
//! matching is sent as DELETED (ADDED), as kube-apiserver does.
//!
//! With `Accept: application/json;as=Table;g=meta.k8s.io;v=v1` (`kubectl get
//! -w`) each event's object is a `meta.k8s.io/v1` Table of one row, with the
//! column definitions, as kube-apiserver transforms watch events; bookmarks
//! and errors are sent as they are.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::admission::{include_policy, table_of, wants_table};
use super::crud::selectors;
use super::error::ApiError;
use super::http::{ApiState, ResourceRequest};
use super::objmeta::present;
use super::resources::ResourceInfo;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Event, EventType};
use super::table::IncludeObjectPolicy;

/// How often an idle watch with `allowWatchBookmarks` gets a BOOKMARK.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(10);
/// Upper bound on a watch's life when the client gives no timeout
/// (kube-apiserver picks 30–60 minutes).
const DEFAULT_TIMEOUT_SECS: u64 = 1800;

struct Filter {
    prefix: String,
    labels: LabelSelector,
    fields: FieldSelector,
    info: Arc<ResourceInfo>,
    /// Render objects as one-row Tables.
    table: Option<IncludeObjectPolicy>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
    /// A line for an object already in the served shape.
    fn line(&self, kind: &str, obj: &Value) -> Bytes {
        let mut s = match self.table {
            Some(include) => {
                let mut t = table_of(&self.info, include, std::slice::from_ref(obj));
                t["metadata"] =
                    json!({"resourceVersion": obj.pointer("/metadata/resourceVersion")});
                json!({"type": kind, "object": t}).to_string()
            }
            None => json!({"type": kind, "object": obj}).to_string(),
        };
        s.push('\n');
        Bytes::from(s)
    }
    /// The line to send for a stored event, if any.
    fn render(&self, ev: &Event) -> Option<Bytes> {
        if !ev.key.starts_with(&self.prefix) {
            return None;
        }
        let object = present(&self.info, &ev.object);
        let now = self.matches(&object);
        let before = ev
            .old
            .as_deref()
            .map(|o| self.matches(&present(&self.info, o)));
        let kind = match ev.kind {
            EventType::Added => now.then_some("ADDED"),
            EventType::Deleted => now.then_some("DELETED"),
            EventType::Modified => match (before.unwrap_or(now), now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }?;
        Some(self.line(kind, &object))
    }
    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.info.kind, "apiVersion": self.info.api_version(), "metadata": meta});
        let mut s = json!({"type": "BOOKMARK", "object": obj}).to_string();
        s.push('\n');
        Bytes::from(s)
    }
}

fn expired_line(rv: u64, current: u64) -> Bytes {
    let status = ApiError::gone(format!("too old resource version: {rv} ({current})")).status();
    let mut s = json!({"type": "ERROR", "object": status}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// `GET ...?watch=true`.
pub async fn watch(state: &ApiState, rr: ResourceRequest) -> Result<Response, ApiError> {
    let (labels, mut fields) = selectors(&rr)?;
    if let Some(name) = &rr.name {
        fields = FieldSelector::parse(&format!("metadata.name={name}"))
            .map_err(ApiError::bad_request)?;
    }
    let filter = Filter {
        prefix: rr.info.prefix(&rr.namespace),
        labels,
        fields,
        info: rr.info.clone(),
        table: if wants_table(&rr) {
            Some(include_policy(&rr)?)
        } else {
            None
        },
    };
    let rv_param = rr.param("resourceVersion").unwrap_or("");
    let send_initial = rr.param("sendInitialEvents") == Some("true");
    let bookmarks = rr.param("allowWatchBookmarks") == Some("true");
    let timeout = rr
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_TIMEOUT_SECS);

    // Subscribe first: anything written from here on reaches us either
    // through the log snapshot below or through the channel.
    let rx = state.store.subscribe();
    let mut first: Vec<Bytes> = Vec::new();
    let start_rv = if send_initial || rv_param.is_empty() || rv_param == "0" {
        let (items, rv) = state.store.list(&filter.prefix, None);
        for (_, stored) in &items {
            let obj = present(&filter.info, stored);
            if filter.matches(&obj) {
                first.push(filter.line("ADDED", &obj));
            }
        }
        if send_initial {
            first.push(filter.bookmark(rv, true));
        }
        rv
    } else {
        rv_param
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv_param:?}")))?
    };
    let replay = match state.store.events_since(start_rv) {
        Some((events, _)) => events,
        None => {
            let line = expired_line(start_rv, state.store.current_rv());
            return Ok(stream_response(
                futures::stream::once(async { line }).boxed(),
            ));
        }
    };

    let (tx, out) = mpsc::channel::<Bytes>(256);
    let cancel = state.cancel.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let _ = follow(
            tx, rx, filter, first, replay, start_rv, bookmarks, deadline, cancel,
        )
        .await;
    });
    Ok(stream_response(ReceiverStream::new(out).boxed()))
}

#[allow(clippy::too_many_arguments)]
async fn follow(
    tx: mpsc::Sender<Bytes>,
    mut rx: broadcast::Receiver<Arc<Event>>,
    filter: Filter,
    first: Vec<Bytes>,
    replay: Vec<Arc<Event>>,
    start_rv: u64,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), mpsc::error::SendError<Bytes>> {
    for line in first {
        tx.send(line).await?;
    }
    let mut seen = start_rv;
    for ev in replay {
        if ev.rv > seen {
            seen = ev.rv;
            if let Some(line) = filter.render(&ev) {
                tx.send(line).await?;
            }
        }
    }
    let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tx.closed() => return Ok(()),
            _ = tick.tick(), if bookmarks => tx.send(filter.bookmark(seen, false)).await?,
            msg = rx.recv() => match msg {
                Ok(ev) => {
                    if ev.rv > seen {
                        seen = ev.rv;
                        if let Some(line) = filter.render(&ev) {
                            tx.send(line).await?;
                        }
                    }
                }
                // Too far behind, or shutting down: end the watch; the
                // client resumes from the last resourceVersion it saw.
                Err(_) => return Ok(()),
            },
        }
    }
}

fn stream_response(stream: futures::stream::BoxStream<'static, Bytes>) -> Response {
    let body = Body::from_stream(stream.map(Ok::<_, Infallible>));
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("cache-control", "no-cache, private"),
        ],
        body,
    )
        .into_response()
}
