//! The writer thread: group commit.
//!
//! ```text
//! jobs ──► take all waiting (≤ MAX_BATCH) ──► decide each in order against
//!          stored state + this batch's earlier changes ──► one redb txn with
//!          every put/delete, event and the new rv ──► commit (fsync)
//!          ──► update memory, ring, broadcast ──► answer every job
//! ```
//!
//! Answers go out only after the commit, so an acknowledged write is always
//! durable; if the commit fails, every write of the batch fails and memory
//! is left as it was.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use serde_json::{Value, json};

use super::{
    EVENTS, Event, EventType, Inner, META, Mutation, OBJECTS, Outcome, StoreError, db_err, set_rv,
};

/// At most this many writes share one commit, to bound a batch's latency.
const MAX_BATCH: usize = 512;

type Decide = Box<dyn FnOnce(Option<&Value>) -> Option<Mutation> + Send>;

/// One read-modify-write request. `decide` returns `None` when it rejected
/// the write (its error is passed back out of band).
pub struct Job {
    pub key: String,
    pub decide: Decide,
    pub reply: Sender<Result<Option<Outcome>, StoreError>>,
}

/// Joins the writer thread when the last [`super::Store`] is dropped (after
/// its sender, which ends the thread's loop).
pub struct Guard(Option<JoinHandle<()>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// Start the writer thread over `inner`.
pub fn spawn(inner: Arc<Inner>) -> Result<(Sender<Job>, Guard), StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("apiserver-store-writer".into())
        .spawn(move || run(&inner, &rx))
        .map_err(db_err("start writer thread"))?;
    Ok((tx, Guard(Some(handle))))
}

fn run(inner: &Inner, rx: &Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        commit_batch(inner, batch);
    }
}

enum Answer {
    Rejected,
    Unchanged(Option<Arc<Value>>),
    Wrote(Arc<Event>),
}

fn commit_batch(inner: &Inner, batch: Vec<Job>) {
    let (mut rv, compacted, ring_len, ring_rvs) = {
        let s = inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            s.rv,
            s.compacted,
            s.events.len(),
            s.events.iter().map(|e| e.rv).collect::<Vec<u64>>(),
        )
    };
    // Changes of this batch so far: key → object (None: deleted).
    let mut overlay: HashMap<String, Option<Arc<Value>>> = HashMap::new();
    let mut answers = Vec::with_capacity(batch.len());
    let mut events: Vec<Arc<Event>> = Vec::new();
    for job in batch {
        let current: Option<Arc<Value>> = match overlay.get(&job.key) {
            Some(v) => v.clone(),
            None => inner
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .objects
                .get(&job.key)
                .cloned(),
        };
        let decide = job.decide;
        let decided = std::panic::catch_unwind(AssertUnwindSafe(|| decide(current.as_deref())));
        let answer = match decided {
            Err(_) => {
                let _ = job.reply.send(Err(StoreError::Db {
                    op: "decide",
                    message: "the write's decision panicked".into(),
                }));
                continue;
            }
            Ok(None) => Answer::Rejected,
            Ok(Some(Mutation::Unchanged)) | Ok(Some(Mutation::Delete)) if current.is_none() => {
                Answer::Unchanged(None)
            }
            Ok(Some(Mutation::Unchanged)) => Answer::Unchanged(current),
            Ok(Some(Mutation::Put(mut obj))) => {
                rv += 1;
                set_rv(&mut obj, rv);
                let kind = if current.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                let object = Arc::new(obj);
                overlay.insert(job.key.clone(), Some(object.clone()));
                let ev = Arc::new(Event {
                    rv,
                    kind,
                    key: job.key.clone(),
                    object,
                    old: current,
                });
                events.push(ev.clone());
                Answer::Wrote(ev)
            }
            Ok(Some(Mutation::Delete)) => {
                rv += 1;
                let cur = current.clone().unwrap_or_default();
                let mut obj = (*cur).clone();
                set_rv(&mut obj, rv);
                overlay.insert(job.key.clone(), None);
                let ev = Arc::new(Event {
                    rv,
                    kind: EventType::Deleted,
                    key: job.key.clone(),
                    object: Arc::new(obj),
                    old: current,
                });
                events.push(ev.clone());
                Answer::Wrote(ev)
            }
        };
        answers.push((answer, job.reply));
    }

    // Drop the oldest events beyond the window, in the same transaction.
    let drop_count = (ring_len + events.len()).saturating_sub(inner.window);
    let new_compacted = if drop_count == 0 {
        compacted
    } else if drop_count <= ring_len {
        ring_rvs[drop_count - 1]
    } else {
        events[drop_count - ring_len - 1].rv
    };

    let written = if events.is_empty() {
        Ok(())
    } else {
        write(
            inner,
            &events,
            &overlay,
            rv,
            compacted,
            new_compacted,
            &ring_rvs,
        )
    };
    if let Err(e) = written {
        let message = e.to_string();
        for (answer, reply) in answers {
            let r = match answer {
                Answer::Wrote(_) => Err(StoreError::Db {
                    op: "commit",
                    message: message.clone(),
                }),
                Answer::Rejected => Ok(None),
                Answer::Unchanged(o) => Ok(Some(Outcome {
                    object: o,
                    event: None,
                })),
            };
            let _ = reply.send(r);
        }
        return;
    }
    if !events.is_empty() {
        let mut s = inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, obj) in &overlay {
            match obj {
                Some(o) => {
                    s.objects.insert(key.clone(), o.clone());
                }
                None => {
                    s.objects.remove(key);
                }
            }
        }
        s.rv = rv;
        s.events.extend(events.iter().cloned());
        while s.events.front().is_some_and(|e| e.rv <= new_compacted) {
            s.events.pop_front();
        }
        s.compacted = new_compacted;
        for ev in &events {
            // No receivers is fine: nobody is watching.
            let _ = inner.tx.send(ev.clone());
        }
    }
    for (answer, reply) in answers {
        let r = match answer {
            Answer::Rejected => Ok(None),
            Answer::Unchanged(o) => Ok(Some(Outcome {
                object: o,
                event: None,
            })),
            Answer::Wrote(ev) => Ok(Some(Outcome {
                object: Some(ev.object.clone()),
                event: Some(ev.kind),
            })),
        };
        let _ = reply.send(r);
    }
}

fn write(
    inner: &Inner,
    events: &[Arc<Event>],
    overlay: &HashMap<String, Option<Arc<Value>>>,
    rv: u64,
    compacted: u64,
    new_compacted: u64,
    ring_rvs: &[u64],
) -> Result<(), StoreError> {
    let txn = inner.db.begin_write().map_err(db_err("begin write"))?;
    {
        let mut objects = txn.open_table(OBJECTS).map_err(db_err("open objects"))?;
        for (key, obj) in overlay {
            match obj {
                Some(o) => {
                    let bytes = serde_json::to_vec(&**o).map_err(db_err("encode"))?;
                    objects
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(db_err("write object"))?;
                }
                None => {
                    objects
                        .remove(key.as_str())
                        .map_err(db_err("remove object"))?;
                }
            }
        }
        let mut log = txn.open_table(EVENTS).map_err(db_err("open events"))?;
        for ev in events {
            let record = json!({"type": ev.kind.as_str(), "key": ev.key, "object": &*ev.object});
            let bytes = serde_json::to_vec(&record).map_err(db_err("encode"))?;
            log.insert(ev.rv, bytes.as_slice())
                .map_err(db_err("write event"))?;
        }
        if new_compacted > compacted {
            let oldest = ring_rvs.first().copied().unwrap_or(compacted + 1);
            for r in oldest..=new_compacted {
                log.remove(r).map_err(db_err("compact events"))?;
            }
        }
        let mut meta = txn.open_table(META).map_err(db_err("open meta"))?;
        meta.insert("rv", rv).map_err(db_err("write meta"))?;
        meta.insert("compacted", new_compacted)
            .map_err(db_err("write meta"))?;
    }
    txn.commit().map_err(db_err("commit"))
}
