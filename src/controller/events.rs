//! Kubernetes Events for every decision a user should see, recorded as
//! `events.k8s.io/v1` Events and counted the way Kubernetes counts them.
//!
//! ```text
//!  publish(regarding, event)
//!     │ key = (regarding, related, type, reason, action, note)
//!     ├─ key not seen within SERIES_WINDOW ──► create Event  <regarding>.<hex time>
//!     └─ seen ───────────────────────────────► patch its series {count+1, lastObservedTime}
//!                                               (404: it expired; create it again)
//! ```
//!
//! This is client-go's deduplication (an identical event is one Event whose
//! `series.count` grows, `kubectl describe` shows "(x4 over 2m)") with the
//! note in the key, as in client-go's legacy `EventCorrelator`: two
//! different decisions with the same reason ("Retrying ns/a", "Retrying
//! ns/b") stay two Events instead of one series that shows only the first
//! note (kube-runtime's `Recorder` keys without the note).
//!
//! Events on a cluster-scoped object (Host, HostMaintenance) go to the
//! `default` namespace, as kubectl expects. A failure to record an Event is
//! logged and never fails a reconcile: Events are a record, not state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp as Jiff;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use tokio::sync::Mutex;

/// An identical event within this window of the last one joins its series
/// (client-go and kube-runtime use 6 minutes).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// The name of the reporting controller in every Event.
pub const REPORTER: &str = "ferry-controller";
/// Longest note the API accepts (1 kB).
const MAX_NOTE: usize = 1024;

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Something happened as planned.
    Normal,
    /// Something a person may need to look at.
    Warning,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Normal => "Normal",
            Kind::Warning => "Warning",
        }
    }
}

/// One event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// Normal or Warning.
    pub kind: Kind,
    /// A stable `PascalCase` reason (`kubectl describe` column Reason).
    pub reason: String,
    /// What was being done (`Schedule`, `Drain`, `Fence`, …).
    pub action: String,
    /// For a person.
    pub note: String,
    /// A second object the event concerns (the Migration of a drain's
    /// event, the VM of a Migration's event).
    pub related: Option<ObjectReference>,
}

impl Note {
    /// A Normal event.
    pub fn normal(reason: &str, action: &str, note: impl Into<String>) -> Self {
        Self {
            kind: Kind::Normal,
            reason: reason.into(),
            action: action.into(),
            note: note.into(),
            related: None,
        }
    }

    /// A Warning event.
    pub fn warning(reason: &str, action: &str, note: impl Into<String>) -> Self {
        Self {
            kind: Kind::Warning,
            ..Self::normal(reason, action, note)
        }
    }

    /// The same event, also concerning `related`.
    pub fn about(mut self, related: ObjectReference) -> Self {
        self.related = Some(related);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    regarding: (String, String, String, String),
    related: Option<(String, String, String)>,
    kind: Kind,
    reason: String,
    action: String,
    note: String,
}

#[derive(Debug, Clone)]
struct Seen {
    name: String,
    namespace: String,
    count: i32,
    last: Instant,
}

/// Records Events, one series per identical event.
pub struct Recorder {
    inner: std::sync::Arc<Inner>,
    /// Events handed over by [`Recorder::enqueue`], recorded in order by one
    /// task.
    queue: tokio::sync::mpsc::UnboundedSender<(ObjectReference, Note)>,
}

struct Inner {
    client: kube::Client,
    instance: String,
    seen: Mutex<HashMap<Key, Seen>>,
}

/// A reference to an object, for `regarding` or `related`.
pub fn reference<K: Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    object.object_ref(&())
}

/// A reference to a namespaced VM by name (when only its name is at hand).
pub fn vm_reference(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("ferry.dev/v1alpha1".into()),
        kind: Some("VirtualMachine".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    }
}

/// A reference to a Host by name.
pub fn host_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("ferry.dev/v1alpha1".into()),
        kind: Some("Host".into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    }
}

/// A reference to a namespaced Migration by name.
pub fn migration_reference(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("ferry.dev/v1alpha1".into()),
        kind: Some("Migration".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    }
}

fn text(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

/// Cut a note to what the API accepts, on a character boundary.
fn bounded(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    let mut end = MAX_NOTE - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

impl Recorder {
    /// A recorder reporting as `ferry-controller`, instance `instance`
    /// (within a Tokio runtime: its queue has a task of its own).
    pub fn new(client: kube::Client, instance: &str) -> Self {
        let inner = std::sync::Arc::new(Inner {
            client,
            instance: instance.to_string(),
            seen: Mutex::default(),
        });
        let (queue, mut events) = tokio::sync::mpsc::unbounded_channel::<(ObjectReference, Note)>();
        let recorder = inner.clone();
        tokio::spawn(async move {
            while let Some((regarding, event)) = events.recv().await {
                recorder.publish(&regarding, event).await;
            }
        });
        Self { inner, queue }
    }

    /// Record `event` about `regarding`; failures are logged, not returned.
    pub async fn publish(&self, regarding: &ObjectReference, event: Note) {
        self.inner.publish(regarding, event).await;
    }

    /// Record `event` about `regarding` after the events enqueued before
    /// it, without waiting: a reconcile that tells a story of several steps
    /// is not held up by writing it (its next look would wait for it).
    pub fn enqueue(&self, regarding: &ObjectReference, event: Note) {
        let _ = self.queue.send((regarding.clone(), event));
    }
}

impl Inner {
    async fn publish(&self, regarding: &ObjectReference, event: Note) {
        if let Err(e) = self.try_publish(regarding, &event).await {
            tracing::debug!(error = %e, reason = %event.reason, "recording an event failed");
        }
    }

    async fn try_publish(
        &self,
        regarding: &ObjectReference,
        event: &Note,
    ) -> Result<(), kube::Error> {
        let note = bounded(&event.note);
        let key = Key {
            regarding: (
                text(&regarding.api_version),
                text(&regarding.kind),
                text(&regarding.namespace),
                text(&regarding.name),
            ),
            related: event
                .related
                .as_ref()
                .map(|r| (text(&r.kind), text(&r.namespace), text(&r.name))),
            kind: event.kind,
            reason: event.reason.clone(),
            action: event.action.clone(),
            note: note.clone(),
        };
        // One lock for the whole call: two reconciles recording the same
        // event at once make one series of two, not two Events.
        let mut seen = self.seen.lock().await;
        let now = Instant::now();
        seen.retain(|_, s| now.duration_since(s.last) < SERIES_WINDOW);
        let namespace = regarding
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(s) = seen.get_mut(&key) {
            let patch = serde_json::json!({"series": EventSeries {
                count: s.count + 1,
                last_observed_time: MicroTime(Jiff::now()),
            }});
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &s.namespace);
            match api
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    s.count += 1;
                    s.last = now;
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    seen.remove(&key);
                }
                Err(e) => return Err(e),
            }
        }
        let at = Jiff::now();
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(REPORTER),
            at.as_nanosecond()
        );
        let k8s = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: Some(note),
            type_: Some(event.kind.as_str().into()),
            event_time: Some(MicroTime(at)),
            regarding: Some(regarding.clone()),
            related: event.related.clone(),
            reporting_controller: Some(REPORTER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        };
        api.create(&PostParams::default(), &k8s).await?;
        seen.insert(
            key,
            Seen {
                name,
                namespace,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_note_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_NOTE);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_NOTE && cut.ends_with("..."));
        assert_eq!(bounded("short"), "short");
    }
}
