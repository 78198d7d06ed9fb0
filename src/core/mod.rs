//! Pure decisions over plain data.
//!
//! Nothing in this module performs I/O or reads a clock: no Kubernetes
//! client, no tokio, no sockets, no files, no QMP. The controller and the
//! agents gather observations, map API types onto the domain types defined
//! here, call a decision function with `now` as an argument, and carry out
//! the actions it returns. `tests/core_purity.rs` fails if an I/O import
//! creeps in.
//!
//! - [`policy`]: effective configuration and policy selection.
//! - [`scheduler`]: placement of one VM with reasons; automatic balancing.
//! - [`migration`]: the Migration lifecycle state machine.
//! - [`admission`]: the fair queue under the concurrency limits.
//! - [`convergence`]: what to do next with a live migration's progress.
//! - [`drain`]: host maintenance plans, retries and quarantine.
//! - [`resilience`]: failed hosts: unreachable, fenced, evacuated.
//!
//! How the controller uses them, per reconcile of a Migration:
//!
//! ```text
//!  API objects ──map──► EffectivePolicy::resolve(select(..)) ──┐
//!              ──map──► Snapshot::new(hosts, vms, in_flight) ──┼─► scheduler::place  (phase Scheduling)
//!              ──map──► admission::admit(queue, active, limits)┼─► AdmissionOutcome  (phase Queued)
//!              ──map──► migration::Observation ────────────────┴─► migration::decide → write state, act
//! ```
//!
//! The agent calls [`convergence::decide`] on its progress samples; the
//! maintenance reconciler calls [`drain::plan`] and [`drain::next_attempt`];
//! a periodic task calls [`scheduler::balance()`] and creates the moves as
//! automatic Migrations.

pub mod admission;
pub mod convergence;
pub mod drain;
pub mod migration;
pub mod policy;
pub mod resilience;
pub mod scheduler;
pub mod time;
