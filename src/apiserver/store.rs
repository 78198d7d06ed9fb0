//! Durable object storage: redb on disk, a copy of every object in memory for
//! reads, one global resourceVersion counter, and a bounded event log from
//! which watches resume.
//!
//! ```text
//!   mutate(key, f) ──► writer lock ──► f(current) ──► redb txn:
//!                                                       objects[key] = obj (rv = n+1)
//!                                                       events[n+1]  = {type, key, object}
//!                                                       meta.rv      = n+1
//!                                                       drop events older than the window
//!                                                     commit (fsync)  ◄── acknowledged only after this
//!                      memory map + event ring updated, event broadcast to watches
//! ```
//!
//! Writes are serialised by one lock, so resourceVersions are dense and
//! events reach the broadcast channel in resourceVersion order. A watch from
//! resourceVersion `r` replays the ring after `r`, then follows the channel;
//! if the ring no longer reaches back to `r` the version is compacted (410).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{Value, json};
use tokio::sync::broadcast;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Watches that fall this many events behind are ended; the client resumes
/// from its last resourceVersion, which the ring still holds.
const BROADCAST_CAPACITY: usize = 8192;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("opening database {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        source: Box<redb::DatabaseError>,
    },
    /// A read or write failed.
    #[error("database {op}: {message}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The cause.
        message: String,
    },
    /// A stored record is not valid JSON.
    #[error("stored record {key} is corrupt: {source}")]
    Corrupt {
        /// The record.
        key: String,
        /// The cause.
        source: serde_json::Error,
    },
}

fn db_err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db {
        op,
        message: e.to_string(),
    }
}

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "ADDED" => Self::Added,
            "DELETED" => Self::Deleted,
            _ => Self::Modified,
        }
    }
}

/// One change, as stored in the event log.
#[derive(Debug)]
pub struct Event {
    /// The resourceVersion the change created.
    pub rv: u64,
    /// What happened.
    pub kind: EventType,
    /// The storage key of the object.
    pub key: String,
    /// The object after the change (for a delete: its last state).
    pub object: Arc<Value>,
    /// The object before the change, when known (not kept across restarts).
    pub old: Option<Arc<Value>>,
}

/// What a mutation closure decides.
pub enum Mutation {
    /// Store this object (resourceVersion is assigned by the store).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Leave it as it is.
    Unchanged,
}

/// The result of [`Store::mutate`].
#[derive(Debug)]
pub struct Outcome {
    /// The object now (or, after a delete, its final state).
    pub object: Option<Arc<Value>>,
    /// The event the mutation produced, if any.
    pub event: Option<EventType>,
}

struct State {
    objects: BTreeMap<String, Arc<Value>>,
    events: VecDeque<Arc<Event>>,
    rv: u64,
    /// Every event with rv ≤ this has been dropped from the log.
    compacted: u64,
}

/// The storage key of an object.
pub fn key(group: &str, resource: &str, namespace: &str, name: &str) -> String {
    format!("{group}/{resource}/{namespace}/{name}")
}

/// The key prefix of a collection (`namespace` empty: all namespaces).
pub fn prefix(group: &str, resource: &str, namespace: &str) -> String {
    if namespace.is_empty() {
        format!("{group}/{resource}/")
    } else {
        format!("{group}/{resource}/{namespace}/")
    }
}

/// The durable store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    writer: Mutex<()>,
    state: RwLock<State>,
    tx: broadcast::Sender<Arc<Event>>,
    window: usize,
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

impl Store {
    /// Open (or create) the database at `path`, keeping the last `window`
    /// events for watch resumption.
    pub fn open(path: &Path, window: usize) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        })?;
        let txn = db.begin_write().map_err(db_err("begin"))?;
        txn.open_table(OBJECTS).map_err(db_err("open objects"))?;
        txn.open_table(EVENTS).map_err(db_err("open events"))?;
        txn.open_table(META).map_err(db_err("open meta"))?;
        txn.commit().map_err(db_err("commit"))?;

        let read = db.begin_read().map_err(db_err("begin read"))?;
        let meta = read.open_table(META).map_err(db_err("open meta"))?;
        let get_meta = |k: &str| -> Result<u64, StoreError> {
            Ok(meta
                .get(k)
                .map_err(db_err("read meta"))?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let rv = get_meta("rv")?;
        let compacted = get_meta("compacted")?;
        let mut objects = BTreeMap::new();
        let table = read.open_table(OBJECTS).map_err(db_err("open objects"))?;
        for entry in table.iter().map_err(db_err("scan objects"))? {
            let (k, v) = entry.map_err(db_err("scan objects"))?;
            let obj: Value =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                    key: k.value().to_string(),
                    source,
                })?;
            objects.insert(k.value().to_string(), Arc::new(obj));
        }
        let mut events = VecDeque::new();
        let table = read.open_table(EVENTS).map_err(db_err("open events"))?;
        for entry in table.iter().map_err(db_err("scan events"))? {
            let (k, v) = entry.map_err(db_err("scan events"))?;
            let rec: Value =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                    key: format!("event {}", k.value()),
                    source,
                })?;
            events.push_back(Arc::new(Event {
                rv: k.value(),
                kind: EventType::parse(rec["type"].as_str().unwrap_or("")),
                key: rec["key"].as_str().unwrap_or("").to_string(),
                object: Arc::new(rec["object"].clone()),
                old: None,
            }));
        }
        drop(read);
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                writer: Mutex::new(()),
                state: RwLock::new(State {
                    objects,
                    events,
                    rv,
                    compacted,
                }),
                tx,
                window: window.max(1),
            }),
        })
    }

    /// The current (latest) resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.read().rv
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The object at `key`.
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.read().objects.get(key).cloned()
    }

    /// The objects whose key starts with `prefix`, after `start_after` (for
    /// pagination), with the resourceVersion of the snapshot.
    pub fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> (Vec<(String, Arc<Value>)>, u64) {
        let state = self.read();
        let items = state
            .objects
            .range(prefix.to_string()..)
            .skip_while(|(k, _)| start_after.is_some_and(|s| k.as_str() <= s))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (items, state.rv)
    }

    /// Subscribe to new events. Subscribe before calling [`Store::events_since`]
    /// so no event falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.tx.subscribe()
    }

    /// The logged events after `rv`, or `None` if some of them were compacted.
    pub fn events_since(&self, rv: u64) -> Option<(Vec<Arc<Event>>, u64)> {
        let state = self.read();
        if rv < state.compacted && rv < state.rv {
            return None;
        }
        let events = state.events.iter().filter(|e| e.rv > rv).cloned().collect();
        Some((events, state.rv))
    }

    /// Atomically read-modify-write the object at `key`: `f` sees the current
    /// object and decides; the change is durable when this returns `Ok`.
    pub fn mutate<E>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Result<Mutation, E>,
    ) -> Result<Result<Outcome, E>, StoreError> {
        let _w = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (current, rv, compacted, oldest) = {
            let s = self.read();
            (
                s.objects.get(key).cloned(),
                s.rv,
                s.compacted,
                s.events.front().map(|e| e.rv),
            )
        };
        let decision = match f(current.as_deref()) {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let new_rv = rv + 1;
        let (kind, object) = match (decision, &current) {
            (Mutation::Unchanged, _) | (Mutation::Delete, None) => {
                return Ok(Ok(Outcome {
                    object: current,
                    event: None,
                }));
            }
            (Mutation::Put(mut obj), cur) => {
                set_rv(&mut obj, new_rv);
                let kind = if cur.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                (kind, Arc::new(obj))
            }
            (Mutation::Delete, Some(cur)) => {
                let mut obj = (**cur).clone();
                set_rv(&mut obj, new_rv);
                (EventType::Deleted, Arc::new(obj))
            }
        };
        // Drop the oldest events beyond the window, in the same transaction.
        let len = self.read().events.len();
        let drop_count = (len + 1).saturating_sub(self.inner.window);
        let new_compacted = if drop_count > 0 {
            let s = self.read();
            s.events
                .get(drop_count - 1)
                .map(|e| e.rv)
                .unwrap_or(compacted)
        } else {
            compacted
        };

        let record = json!({"type": kind.as_str(), "key": key, "object": &*object});
        let bytes = serde_json::to_vec(&record).map_err(db_err("encode"))?;
        let txn = self.inner.db.begin_write().map_err(db_err("begin write"))?;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(db_err("open objects"))?;
            if kind == EventType::Deleted {
                objects.remove(key).map_err(db_err("remove object"))?;
            } else {
                let obj_bytes = serde_json::to_vec(&*object).map_err(db_err("encode"))?;
                objects
                    .insert(key, obj_bytes.as_slice())
                    .map_err(db_err("write object"))?;
            }
            let mut events = txn.open_table(EVENTS).map_err(db_err("open events"))?;
            events
                .insert(new_rv, bytes.as_slice())
                .map_err(db_err("write event"))?;
            if let Some(oldest) = oldest
                && new_compacted > compacted
            {
                for r in oldest..=new_compacted {
                    events.remove(r).map_err(db_err("compact events"))?;
                }
            }
            let mut meta = txn.open_table(META).map_err(db_err("open meta"))?;
            meta.insert("rv", new_rv).map_err(db_err("write meta"))?;
            meta.insert("compacted", new_compacted)
                .map_err(db_err("write meta"))?;
        }
        txn.commit().map_err(db_err("commit"))?;

        let event = Arc::new(Event {
            rv: new_rv,
            kind,
            key: key.to_string(),
            object: object.clone(),
            old: current,
        });
        {
            let mut s = self
                .inner
                .state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if kind == EventType::Deleted {
                s.objects.remove(key);
            } else {
                s.objects.insert(key.to_string(), object.clone());
            }
            s.rv = new_rv;
            for _ in 0..drop_count {
                s.events.pop_front();
            }
            s.compacted = new_compacted;
            s.events.push_back(event.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = self.inner.tx.send(event);
        Ok(Ok(Outcome {
            object: Some(object),
            event: Some(kind),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, key: &str, v: Value) -> Outcome {
        store
            .mutate::<()>(key, move |_| Ok(Mutation::Put(v)))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn writes_survive_reopen_with_dense_resource_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path, 100).unwrap();
            put(&s, "g/r/ns/a", json!({"metadata": {"name": "a"}}));
            put(&s, "g/r/ns/b", json!({"metadata": {"name": "b"}}));
            s.mutate::<()>("g/r/ns/a", |_| Ok(Mutation::Delete))
                .unwrap()
                .unwrap();
        }
        let s = Store::open(&path, 100).unwrap();
        assert_eq!(s.current_rv(), 3);
        assert!(s.get("g/r/ns/a").is_none());
        assert_eq!(
            s.get("g/r/ns/b").unwrap()["metadata"]["resourceVersion"],
            "2"
        );
        let (events, _) = s.events_since(0).unwrap();
        let kinds: Vec<_> = events.iter().map(|e| (e.rv, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, EventType::Added),
                (2, EventType::Added),
                (3, EventType::Deleted)
            ]
        );
    }

    #[test]
    fn old_versions_are_compacted_beyond_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), 3).unwrap();
        for i in 0..6 {
            put(&s, &format!("g/r/ns/o{i}"), json!({"metadata": {}}));
        }
        assert!(s.events_since(1).is_none(), "rv 1 is compacted");
        let (events, rv) = s.events_since(3).unwrap();
        assert_eq!(rv, 6);
        assert_eq!(
            events.iter().map(|e| e.rv).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        drop(s);
        let s = Store::open(&dir.path().join("db"), 3).unwrap();
        assert!(s.events_since(2).is_none());
        assert!(s.events_since(3).is_some());
    }

    #[test]
    fn list_is_ordered_and_paginates_after_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), 10).unwrap();
        for n in ["c", "a", "b"] {
            put(
                &s,
                &key("g", "r", "ns", n),
                json!({"metadata": {"name": n}}),
            );
        }
        put(&s, &key("g", "other", "ns", "z"), json!({}));
        let (items, _) = s.list(&prefix("g", "r", "ns"), None);
        let names: Vec<_> = items.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["g/r/ns/a", "g/r/ns/b", "g/r/ns/c"]);
        let (items, _) = s.list(&prefix("g", "r", ""), Some("g/r/ns/a"));
        assert_eq!(items.len(), 2);
    }
}
