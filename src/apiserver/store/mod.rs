//! Durable object storage: redb on disk, a copy of every object in memory for
//! reads, one global resourceVersion counter, and a bounded event log from
//! which watches resume.
//!
//! ```text
//!   mutate(key, f) ──► writer thread ──► f(current) ──► redb txn (a batch):
//!                                                       objects[key] = obj (rv = n+1)
//!                                                       events[n+1]  = {type, key, object}
//!                                                       meta.rv      = n+1
//!                                                       drop events older than the window
//!                                                     commit (fsync)  ◄── acknowledged only after this
//!                      memory map + event ring updated, event broadcast to watches
//! ```
//!
//! Writes are serialised by one writer thread, which commits whatever
//! requests are waiting in one transaction (group commit: one fsync for
//! many writers), so resourceVersions are dense and events reach the
//! broadcast channel in resourceVersion order. A watch from
//! resourceVersion `r` replays the ring after `r`, then follows the channel;
//! if the ring no longer reaches back to `r` the version is compacted (410).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

mod writer;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
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

/// The durable store. Cheap to clone; the writer thread stops (and the
/// database closes) when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    // Field order matters: the sender must go before the guard joins.
    jobs: std::sync::mpsc::Sender<writer::Job>,
    _writer: Arc<writer::Guard>,
}

struct Inner {
    db: Database,
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
        let inner = Arc::new(Inner {
            db,
            state: RwLock::new(State {
                objects,
                events,
                rv,
                compacted,
            }),
            tx,
            window: window.max(1),
        });
        let (jobs, guard) = writer::spawn(inner.clone())?;
        Ok(Self {
            inner,
            jobs,
            _writer: Arc::new(guard),
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

    /// The objects under `prefix` after `start_after` as they were at
    /// resourceVersion `rv`: a paginated list's later pages come from the
    /// first page's snapshot, so objects written in between neither shift
    /// nor repeat. The current objects are rolled back through the event
    /// log; `None` when the log no longer reaches back to `rv` (compacted,
    /// or an old state not kept across a restart).
    pub fn list_at(
        &self,
        prefix: &str,
        start_after: &str,
        rv: u64,
    ) -> Option<Vec<(String, Arc<Value>)>> {
        let state = self.read();
        if rv > state.rv || (rv < state.compacted && rv < state.rv) {
            return None;
        }
        let mut items: BTreeMap<String, Arc<Value>> = state
            .objects
            .range(start_after.to_string()..)
            .skip_while(|(k, _)| k.as_str() <= start_after)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut rolled_back = std::collections::HashSet::new();
        for ev in state.events.iter().filter(|e| e.rv > rv) {
            let in_page = ev.key.starts_with(prefix) && ev.key.as_str() > start_after;
            // The first change after `rv` knows the state at `rv`.
            if !in_page || !rolled_back.insert(ev.key.as_str()) {
                continue;
            }
            match ev.kind {
                EventType::Added => {
                    items.remove(&ev.key);
                }
                EventType::Modified | EventType::Deleted => {
                    items.insert(ev.key.clone(), ev.old.clone()?);
                }
            }
        }
        Some(items.into_iter().collect())
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
    /// Concurrent calls are committed together (one fsync for the batch),
    /// each still seeing the effect of the ones before it.
    pub fn mutate<E: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Result<Mutation, E> + Send + 'static,
    ) -> Result<Result<Outcome, E>, StoreError> {
        let rejected: Arc<Mutex<Option<E>>> = Arc::new(Mutex::new(None));
        let slot = rejected.clone();
        let (reply, answer) = std::sync::mpsc::channel();
        let job = writer::Job {
            key: key.to_string(),
            decide: Box::new(move |cur| match f(cur) {
                Ok(m) => Some(m),
                Err(e) => {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(e);
                    }
                    None
                }
            }),
            reply,
        };
        self.jobs.send(job).map_err(|_| StoreError::Db {
            op: "submit write",
            message: "the writer has stopped".into(),
        })?;
        let result = answer.recv().map_err(|_| StoreError::Db {
            op: "await write",
            message: "the writer has stopped".into(),
        })?;
        match result? {
            Some(outcome) => Ok(Ok(outcome)),
            None => {
                let e = rejected
                    .lock()
                    .ok()
                    .and_then(|mut s| s.take())
                    .ok_or_else(|| StoreError::Db {
                        op: "mutate",
                        message: "decision failed without an error".into(),
                    })?;
                Ok(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    #[test]
    fn list_at_rolls_back_to_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), 5).unwrap();
        let p = prefix("g", "r", "ns");
        for n in ["a", "b", "c", "d"] {
            put(
                &s,
                &key("g", "r", "ns", n),
                json!({"metadata": {"name": n}, "v": 1}),
            );
        }
        let snapshot = s.current_rv();
        put(&s, &key("g", "r", "ns", "bb"), json!({"metadata": {}}));
        put(
            &s,
            &key("g", "r", "ns", "c"),
            json!({"metadata": {}, "v": 2}),
        );
        s.mutate::<()>(&key("g", "r", "ns", "d"), |_| Ok(Mutation::Delete))
            .unwrap()
            .unwrap();
        let page = s.list_at(&p, &key("g", "r", "ns", "a"), snapshot).unwrap();
        let seen: Vec<_> = page
            .iter()
            .map(|(k, v)| (k.as_str(), v["v"].clone()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("g/r/ns/b", json!(1)),
                ("g/r/ns/c", json!(1)),
                ("g/r/ns/d", json!(1))
            ]
        );
        for i in 0..5 {
            put(
                &s,
                &key("g", "r", "ns", &format!("z{i}")),
                json!({"metadata": {}}),
            );
        }
        assert!(s.list_at(&p, "", snapshot).is_none(), "compacted");
    }

    #[test]
    fn concurrent_writers_share_commits_and_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), 10_000).unwrap();
        put(&s, "g/r/ns/counter", json!({"metadata": {}, "n": 0}));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        s.mutate::<()>("g/r/ns/counter", |cur| {
                            let mut v = cur.unwrap().clone();
                            v["n"] = json!(v["n"].as_i64().unwrap() + 1);
                            Ok(Mutation::Put(v))
                        })
                        .unwrap()
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.get("g/r/ns/counter").unwrap()["n"], 400);
        assert_eq!(s.current_rv(), 401);
        let (events, _) = s.events_since(0).unwrap();
        let rvs: Vec<u64> = events.iter().map(|e| e.rv).collect();
        assert_eq!(rvs, (1..=401).collect::<Vec<_>>());
        drop(s);
        let s = Store::open(&dir.path().join("db"), 10_000).unwrap();
        assert_eq!(s.get("g/r/ns/counter").unwrap()["n"], 400);
    }

    #[test]
    fn a_rejected_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), 10).unwrap();
        let r = s.mutate("g/r/ns/x", |_| Err::<Mutation, _>("no")).unwrap();
        assert_eq!(r.unwrap_err(), "no");
        assert_eq!(s.current_rv(), 0);
        assert!(s.get("g/r/ns/x").is_none());
    }
}
