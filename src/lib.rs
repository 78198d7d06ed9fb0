//! Ferry: declarative live migration of QEMU virtual machines between hosts.
//!
//! The crate is laid out one room per concern:
//!
//! - [`api`]: the custom resource types of `ferry.dev/v1alpha1` and the value
//!   types they use (durations, quantities, bandwidth). Nothing else.
//! - [`core`]: pure decisions over plain data — the scheduler, the migration
//!   state machine, convergence. No Kubernetes client, tokio, sockets or QMP.
//! - [`apiserver`]: the embedded Kubernetes API server that `ferry up` and the
//!   tests use as their cluster.
//! - [`controller`]: reconcilers that turn resources into decisions.
//! - [`agent`]: the node agent — QEMU over QMP, the mTLS migration relay, the
//!   test guest.
//! - [`cli`]: the `ferry` and `kubectl ferry` commands.

pub mod agent;
pub mod api;
pub mod apiserver;
pub mod bridge;
pub mod cli;
pub mod controller;
pub mod core;
